// kvfix op schemas (declared once) and their CPU / CUDA registrations.
#ifndef KVFIX_NO_PYTHON_MODULE
#include <Python.h>
#endif
#include <torch/library.h>

#include <cmath>

#include "kvfix.h"

#ifndef KVFIX_NO_PYTHON_MODULE
// `import kvfix._C` loads this library, which registers the ops below with the dispatcher.
// (CMake builds the same ops without it, for the C++ tests.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace kvfix {

DscrCoefs dscr_coefs(double sigma_d, double sigma_s, double alpha, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(sigma_d) && sigma_d > 0, "dscr: sigma_d must be finite and > 0, got ", sigma_d);
  TORCH_CHECK_VALUE(std::isfinite(sigma_s) && sigma_s > 0, "dscr: sigma_s must be finite and > 0, got ", sigma_s);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, "dscr: alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, "dscr: beta must be finite and >= 0, got ", beta);
  const float coef_d = static_cast<float>(alpha / (2.0 * sigma_d * sigma_d));
  const float coef_s = static_cast<float>(beta / (2.0 * sigma_s * sigma_s));
  // A tiny sigma overflows the float32 coefficient (inf * 0 = nan for equal depths).
  TORCH_CHECK_VALUE(std::isfinite(coef_d), "dscr: sigma_d=", sigma_d, " is too small (alpha / (2 sigma_d^2) overflows float32)");
  TORCH_CHECK_VALUE(std::isfinite(coef_s), "dscr: sigma_s=", sigma_s, " is too small (beta / (2 sigma_s^2) overflows float32)");
  return {coef_d, coef_s};
}

static void check_kv(const at::Tensor& x, const char* name, const at::Tensor& k) {
  TORCH_CHECK(x.dim() == 4, "dscr: ", name, " must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK(x.sizes() == k.sizes(), "dscr: ", name, " shape ", x.sizes(), " != k shape ", k.sizes());
  TORCH_CHECK(x.scalar_type() == k.scalar_type(), "dscr: ", name, " dtype differs from k");
  TORCH_CHECK(x.device() == k.device(), "dscr: ", name, " device differs from k");
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "dscr: ", name, " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "dscr: ", name, " needs a contiguous last dim");
}

void dscr_check(const at::Tensor& k, const std::optional<at::Tensor>& v, const at::Tensor& depth,
                const at::Tensor& coords) {
  check_kv(k, "k", k);
  if (v.has_value()) check_kv(*v, "v", k);
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK(depth.dim() == 2 && (depth.size(0) == 1 || depth.size(0) == B) && depth.size(1) == N,
              "dscr: depth must be [1 or B, N] with B=", B, ", N=", N, ", got ", depth.sizes());
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == depth.size(0) && coords.size(1) == N &&
                  coords.size(2) == 2,
              "dscr: coords must be [", depth.size(0), ", N, 2], got ", coords.sizes());
  TORCH_CHECK(depth.scalar_type() == at::kFloat && coords.scalar_type() == at::kFloat,
              "dscr: depth and coords must be float32");
  TORCH_CHECK(depth.is_contiguous() && coords.is_contiguous(), "dscr: depth and coords must be contiguous");
  TORCH_CHECK(depth.device() == k.device() && coords.device() == k.device(),
              "dscr: depth and coords must be on k's device");
}

void dscr_check_finite(const at::Tensor& depth, const at::Tensor& coords) {
  // Once per image after prefill (not a decode path): one host read each.
  TORCH_CHECK_VALUE(depth.isfinite().all().item<bool>(), "dscr: depth has non-finite values (nan or inf)");
  TORCH_CHECK_VALUE(coords.isfinite().all().item<bool>(), "dscr: coords has non-finite values (nan or inf)");
}

}  // namespace kvfix

TORCH_LIBRARY(kvfix, m) {
  m.def("dscr_refine(Tensor k, Tensor? v, Tensor depth, Tensor coords, float sigma_d, "
        "float sigma_s, float alpha, float beta) -> Tensor[]");
  m.def("dscr_refine_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor depth, Tensor coords, "
        "float sigma_d, float sigma_s, float alpha, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cpu);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_cpu);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cuda);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_cuda);
}
#endif
