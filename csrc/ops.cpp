// kvfix op schemas (declared once) and their CPU / CUDA registrations.
#ifndef KVFIX_NO_PYTHON_MODULE
#include <Python.h>
#endif
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

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

MaskView mask_check(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q, const int64_t want[4],
                    const char* dims, const char* hint) {
  if (!mask.has_value()) return MaskView{};
  const at::Tensor& mk = *mask;
  const auto st = mk.scalar_type();
  TORCH_CHECK_TYPE(st == at::kBool || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": mask must be bool (True = attend) or float32/float16/bfloat16 (additive), got ", st);
  TORCH_CHECK_VALUE(mk.device() == q.device(), op, ": mask is on ", mk.device(), " but q is on ", q.device());
  kernels::View v;
  bool ok = mk.dim() >= 1 && mk.dim() <= 4;
  if (ok) {
    v.ndim = static_cast<int>(mk.dim());
    for (int i = 0; i < v.ndim; ++i) {
      v.sizes[i] = mk.size(i);
      v.strides[i] = mk.stride(i);
      const int64_t w = want[4 - v.ndim + i];
      ok = ok && (v.sizes[i] == w || v.sizes[i] == 1);
    }
  }
  TORCH_CHECK_VALUE(ok, op, ": mask must be broadcastable to [", dims, "] = [", want[0], ", ", want[1], ", ", want[2],
                    ", ", want[3], "], got shape ", mk.sizes(), hint);
  v.dtype = st == at::kBool ? kernels::DType::kBool : st == at::kFloat ? kernels::DType::kF32
            : st == at::kHalf ? kernels::DType::kF16 : kernels::DType::kBF16;
  if (!mk.is_meta()) v.data = const_cast<void*>(mk.const_data_ptr());  // meta / fake tensors: checks only
  return kernels::mask_view(v);
}

constexpr double kFloatMax = std::numeric_limits<float>::max();
constexpr double kFloatMinNormal = std::numeric_limits<float>::min();

// The float32 proximity coefficients; errors name the parameter (ValueError).
static DscrCoefs dscr_coefs(const char* op, double sigma_d, double sigma_s, double alpha, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(sigma_d) && sigma_d > 0, op, ": sigma_d must be finite and > 0, got ", sigma_d);
  TORCH_CHECK_VALUE(std::isfinite(sigma_s) && sigma_s > 0, op, ": sigma_s must be finite and > 0, got ", sigma_s);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, op, ": alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, op, ": beta must be finite and >= 0, got ", beta);
  const float coef_d = static_cast<float>(alpha / (2.0 * sigma_d * sigma_d));
  const float coef_s = static_cast<float>(beta / (2.0 * sigma_s * sigma_s));
  // A tiny sigma overflows the float32 coefficient (inf * 0 = nan for equal depths).
  TORCH_CHECK_VALUE(std::isfinite(coef_d), op, ": sigma_d=", sigma_d,
                    " is too small: the proximity coefficient alpha / (2 sigma_d^2) overflows float32");
  TORCH_CHECK_VALUE(std::isfinite(coef_s), op, ": sigma_s=", sigma_s,
                    " is too small: the proximity coefficient beta / (2 sigma_s^2) overflows float32");
  return {coef_d, coef_s};
}

// A key / value tensor: [B, H, N, D], float32 / float16 / bfloat16, contiguous last dim.
static void dscr_check_kv(const char* op, const at::Tensor& x, const std::string& name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be [B, H, N, D], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.size(3) <= 1 || x.stride(3) == 1, op, ": ", name, " needs a contiguous last dimension (stride ",
                    x.stride(3), ")");
}

// The keys and values of a DSCR op: keys = {k} and values = {} or {v} for the out-of-place ops
// (cache = false: the errors say k, v), one tensor per layer for the in-place ones (keys[l],
// values[l]). Every layer [B, H, N, D] with k's B, N and device; values[l] like keys[l].
static void dscr_check_layers(const char* op, at::TensorList keys, at::TensorList values, bool cache) {
  auto key_name = [&](size_t l) { return cache ? "keys[" + std::to_string(l) + "]" : std::string("k"); };
  auto value_name = [&](size_t l) { return cache ? "values[" + std::to_string(l) + "]" : std::string("v"); };
  TORCH_CHECK_VALUE(!keys.empty(), op, ": keys must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(values.empty() || values.size() == keys.size(), op, ": values has ", values.size(),
                    " tensors but keys has ", keys.size());
  const at::Tensor& k = keys[0];
  for (size_t l = 0; l < keys.size(); ++l) {
    dscr_check_kv(op, keys[l], key_name(l));
    TORCH_CHECK_VALUE(keys[l].size(0) == k.size(0) && keys[l].size(2) == k.size(2) && keys[l].device() == k.device(),
                      op, ": ", key_name(l), " has shape ", keys[l].sizes(), " on ", keys[l].device(),
                      "; every layer needs B=", k.size(0), ", N=", k.size(2), " on ", k.device());
  }
  for (size_t l = 0; l < values.size(); ++l) {
    const at::Tensor &x = values[l], &kl = keys[l];
    const std::string vn = value_name(l), kn = key_name(l);
    dscr_check_kv(op, x, vn);
    if (cache) {
      TORCH_CHECK_VALUE(x.sizes() == kl.sizes() && x.scalar_type() == kl.scalar_type() && x.device() == kl.device(),
                        op, ": ", vn, " (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(), ") does not match ",
                        kn, " (", kl.sizes(), ", ", kl.scalar_type(), ", ", kl.device(), ")");
    } else {
      TORCH_CHECK_VALUE(x.sizes() == kl.sizes(), op, ": v shape ", x.sizes(), " does not match k shape ", kl.sizes());
      TORCH_CHECK_TYPE(x.scalar_type() == kl.scalar_type(), op, ": v dtype ", x.scalar_type(),
                       " does not match k dtype ", kl.scalar_type());
      TORCH_CHECK_VALUE(x.device() == kl.device(), op, ": v is on ", x.device(), " but k is on ", kl.device());
    }
  }
}

// A float32 input (the wrapper converts) on k's device; contiguous where the kernels need it.
static void dscr_check_f32(const char* op, const at::Tensor& x, const char* name, const at::Tensor& k) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a floating-point tensor (float32; the wrapper converts), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == k.device(), op, ": ", name, " is on ", x.device(), " but k is on ", k.device());
}

// depth: float32 [1 or B, N] on k's device.
static void dscr_check_depth(const char* op, const at::Tensor& depth, const at::Tensor& k) {
  dscr_check_f32(op, depth, "depth", k);
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK_VALUE(depth.dim() == 2 && (depth.size(0) == 1 || depth.size(0) == B) && depth.size(1) == N, op,
                    ": depth must be [N] or [B, N] with B=", B, ", N=", N, " (the op takes [1 or B, N]), got shape ",
                    depth.sizes());
}

// Every check of dscr_refine / dscr_refine_cache_, stated once: the CPU, CUDA and Meta kernels
// call it; the Python wrappers only convert arguments. keys = {k} and values = {} or {v} for
// dscr_refine (cache = false: the errors say k, v), one tensor per layer for dscr_refine_cache_.
// Errors name the argument: ValueError (shape, device, range), TypeError (dtype). The values of
// depth and coords (finite) are checked by dscr_check_finite.
DscrCoefs dscr_check(const char* op, at::TensorList keys, at::TensorList values, bool cache, const at::Tensor& depth,
                     const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta) {
  dscr_check_layers(op, keys, values, cache);
  const DscrCoefs c = dscr_coefs(op, sigma_d, sigma_s, alpha, beta);
  const at::Tensor& k = keys[0];
  const int64_t B = k.size(0), N = k.size(2);
  dscr_check_depth(op, depth, k);
  dscr_check_f32(op, coords, "coords", k);
  TORCH_CHECK_VALUE(coords.dim() == 3 && coords.size(0) == depth.size(0) && coords.size(1) == N &&
                        coords.size(2) == 2,
                    op, ": coords must be [N, 2] or [B, N, 2] with B=", B, ", N=", N, " (the op takes [",
                    depth.size(0), ", N, 2], as depth), got shape ", coords.sizes());
  TORCH_CHECK_VALUE(depth.is_contiguous() && coords.is_contiguous(), op,
                    ": depth and coords must be contiguous (the wrapper converts)");
  return c;
}

// The grid form coords=(gh, gw) of dscr_refine / dscr_refine_cache_ (cache: which), checked before
// the plan reads depth on the host (kvfix.ops.dscr): the layers and parameters as dscr_check, the
// grid holds the N tokens, depth float32 [1 or B, N] on k's device and not meta. The op
// dscr_check_grid runs it (one kernel for every device).
static void dscr_check_grid(at::TensorList keys, at::TensorList values, bool cache, const at::Tensor& depth,
                            int64_t gh, int64_t gw, double sigma_d, double sigma_s, double alpha, double beta) {
  const char* op = cache ? "dscr_refine_cache_" : "dscr_refine";
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  TORCH_CHECK_VALUE(gh >= 1 && gw >= 1 && gh * gw == k.size(2), op, ": coords grid ", gh, " x ", gw, " has ", gh * gw,
                    " tokens but ", cache ? "keys[0]" : "k", " has N=", k.size(2));
  dscr_coefs(op, sigma_d, sigma_s, alpha, beta);
  dscr_check_depth(op, depth, k);
  TORCH_CHECK_VALUE(!depth.is_meta(), op, ": depth is a meta tensor: the grid form coords=(gh, gw) reads the depth "
                    "range on the host; pass coords=kvfix.patch_coords(gh, gw) (the dense algorithm) for meta tensors");
}

// The parameters alone (kvfix.dscr_plan, kvfix.hf.DSCR's settings): dscr_check_params runs it.
static void dscr_check_params(c10::string_view op, double sigma_d, double sigma_s, double alpha, double beta) {
  dscr_coefs(std::string(op).c_str(), sigma_d, sigma_s, alpha, beta);
}

// ---------------------------------------------------------------------------------------------
// Aliasing of the in-place ops (dscr_refine_cache_, dscr_refine_factored_cache_, kvsmooth_step_,
// scr_redistribute_): their outputs must not overlap themselves (a stride-0 `expand`), each other
// (the same view twice, keys that are the values) or an input the kernels read while writing, as
// torch's own in-place ops refuse. Metadata only (sizes, strides, addresses): nothing is read, so
// nothing synchronises. Called by the CPU and CUDA registrations before anything is written.

namespace {

using Dims = std::vector<std::pair<int64_t, int64_t>>;  // (stride, size) with size > 1

// x's dims of size > 1 by increasing stride, when each stride exceeds everything the smaller ones
// reach (x's elements are then distinct and every difference of two offsets has one signed-digit
// expansion per dim); false otherwise.
bool nested_dims(const at::Tensor& x, Dims& dims) {
  dims.clear();
  for (int64_t i = 0; i < x.dim(); ++i)
    if (x.size(i) > 1) dims.emplace_back(x.stride(i), x.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset reachable with the dims of smaller stride
  for (const auto& [s, n] : dims) {
    if (s <= reach) return false;
    reach += s * (n - 1);
  }
  return true;
}

// f(offset) for every element of x (offsets in elements from x's first element).
template <class F>
void for_each_offset(const at::Tensor& x, const F& f) {
  const int64_t nd = x.dim();
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  const int64_t numel = x.numel();
  int64_t off = 0;
  for (int64_t e = 0; e < numel; ++e) {
    f(off);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < x.size(d)) {
        off += x.stride(d);
        break;
      }
      off -= x.stride(d) * (x.size(d) - 1);
      idx[d] = 0;
    }
  }
}

// Whether two elements of x share memory (e.g. a stride-0 `expand`).
bool has_internal_overlap(const at::Tensor& x) {
  Dims dims;
  if (nested_dims(x, dims)) return false;
  for (int64_t i = 0; i < x.dim(); ++i)
    if (x.size(i) > 1 && x.stride(i) == 0) return true;
  std::vector<int64_t> offs;  // an exotic layout: look for a repeated offset
  offs.reserve(static_cast<size_t>(x.numel()));
  for_each_offset(x, [&](int64_t o) { offs.push_back(o); });
  std::sort(offs.begin(), offs.end());
  return std::adjacent_find(offs.begin(), offs.end()) != offs.end();
}

// Whether delta = sum_d e_d s_d with |e_d| < n_d, for nested dims[0, count) (at most two digits
// fit each dim, so the search is tiny).
bool is_offset_difference(int64_t delta, const Dims& dims, size_t count) {
  if (count == 0) return delta == 0;
  const auto [s, n] = dims[count - 1];
  int64_t reach = 0;
  for (size_t j = 0; j + 1 < count; ++j) reach += dims[j].first * (dims[j].second - 1);
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); };
  const int64_t lo = std::max(-(n - 1), -floor_div(reach - delta, s));
  const int64_t hi = std::min(n - 1, floor_div(delta + reach, s));
  for (int64_t e = lo; e <= hi; ++e)
    if (is_offset_difference(delta - e * s, dims, count - 1)) return true;
  return false;
}

std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& x) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  int64_t last = 0;
  for (int64_t i = 0; i < x.dim(); ++i) last += (x.size(i) - 1) * x.stride(i);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(x.element_size()))};
}

// Whether a and b share a byte (interleaved views, e.g. k and v of a fused buffer, do not).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [alo, ahi] = byte_span(a);
  const auto [blo, bhi] = byte_span(b);
  if (ahi <= blo || bhi <= alo) return false;
  Dims dims;
  if (a.sizes() == b.sizes() && a.strides() == b.strides() && a.element_size() == b.element_size() &&
      nested_dims(a, dims)) {
    // One layout (e.g. k and v of one cache): element x of a and y of b share a byte iff
    // (x - y) * size lies within one element of the two tensors' distance.
    const int64_t size = static_cast<int64_t>(a.element_size());
    const int64_t gap = static_cast<int64_t>(blo - alo);  // two's complement: negative when b starts first
    const int64_t fl = gap / size - ((gap % size != 0 && gap < 0) ? 1 : 0);
    const int64_t cl = fl + (gap % size != 0 ? 1 : 0);
    return is_offset_difference(fl, dims, dims.size()) || (cl != fl && is_offset_difference(cl, dims, dims.size()));
  }
  // Anything else: mark the bytes of a within the common range, then look for b's.
  const uintptr_t lo = std::max(alo, blo), hi = std::min(ahi, bhi);
  std::vector<bool> mark(hi - lo, false);
  auto bytes_of = [&](const at::Tensor& x, bool set, bool& hit) {
    const int64_t es = static_cast<int64_t>(x.element_size());
    const intptr_t base = static_cast<intptr_t>(reinterpret_cast<uintptr_t>(x.const_data_ptr()) - lo);
    for_each_offset(x, [&](int64_t o) {
      for (int64_t c = 0; c < es; ++c) {
        const intptr_t p = base + o * es + c;
        if (p < 0 || p >= static_cast<intptr_t>(hi - lo)) continue;
        if (set) mark[p] = true;
        else if (mark[p]) hit = true;
      }
    });
  };
  bool hit = false;
  bytes_of(a, true, hit);
  bytes_of(b, false, hit);
  return hit;
}

struct Named {
  std::string name;
  const at::Tensor* t;
  bool output;
  uintptr_t lo, hi;
};

}  // namespace

static void check_no_overlap(const char* op, const std::vector<std::pair<std::string, const at::Tensor*>>& outputs,
                      const std::vector<std::pair<std::string, const at::Tensor*>>& inputs) {
  std::vector<Named> all;
  for (int pass = 0; pass < 2; ++pass)
    for (const auto& [name, t] : pass == 0 ? outputs : inputs) {
      if (t == nullptr || !t->defined()) continue;
      if (t->is_meta() || !t->has_storage()) return;  // no addresses (meta, FakeTensor)
      all.push_back({name, t, pass == 0, 0, 0});
    }
  for (const Named& x : all) {
    if (!x.output) break;
    if (has_internal_overlap(*x.t)) {
      TORCH_CHECK_VALUE(false, op, ": ", x.name, " has elements that share memory (e.g. a stride-0 expand(), strides ",
                        x.t->strides(), "): an in-place op needs distinct elements; pass a .clone()");
    }
  }
  // Sweep over the byte ranges in address order: only pairs whose ranges intersect are compared
  // (dscr_refine_cache_ gets tens of layers). The first offending pair in argument order is named.
  std::vector<size_t> order;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].t->numel() == 0) continue;
    std::tie(all[i].lo, all[i].hi) = byte_span(*all[i].t);
    order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return all[a].lo != all[b].lo ? all[a].lo < all[b].lo : a < b;
  });
  std::pair<size_t, size_t> first{all.size(), all.size()};
  for (size_t x = 0; x < order.size(); ++x) {
    for (size_t y = x + 1; y < order.size(); ++y) {
      const Named &a = all[order[x]], &b = all[order[y]];
      if (b.lo >= a.hi) break;
      if (!(a.output || b.output) || !overlaps(*a.t, *b.t)) continue;
      const std::pair<size_t, size_t> hit{std::min(order[x], order[y]), std::max(order[x], order[y])};
      first = std::min(first, hit);
    }
  }
  TORCH_CHECK_VALUE(first.first == all.size(), op, ": ", all[first.second].name, " overlaps ",
                    all[first.first < all.size() ? first.first : 0].name,
                    " in memory: an in-place op's outputs must not share memory with each other or with its inputs");
}

void dscr_check_finite(const char* op, const at::Tensor& depth, const at::Tensor& coords) {
  // Once per image after prefill (not a decode path): one host read each.
  TORCH_CHECK_VALUE(depth.isfinite().all().item<bool>(), op, ": depth has non-finite values (nan or inf)");
  TORCH_CHECK_VALUE(coords.isfinite().all().item<bool>(), op, ": coords has non-finite values (nan or inf)");
}

// The in-place registrations: the aliasing check, then the device's implementation.
using TensorRefs = std::vector<std::pair<std::string, const at::Tensor*>>;

static TensorRefs layer_refs(at::TensorList keys, at::TensorList values) {
  TensorRefs out;
  for (size_t i = 0; i < keys.size(); ++i) out.emplace_back("keys[" + std::to_string(i) + "]", &keys[i]);
  for (size_t i = 0; i < values.size(); ++i) out.emplace_back("values[" + std::to_string(i) + "]", &values[i]);
  return out;
}

template <auto Impl>
void dscr_refine_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                               const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta) {
  check_no_overlap("dscr_refine_cache_", layer_refs(keys, values), {{"depth", &depth}, {"coords", &coords}});
  Impl(keys, values, depth, coords, sigma_d, sigma_s, alpha, beta);
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static std::vector<at::Tensor> dscr_refine_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                const at::Tensor& depth, const at::Tensor& coords, double sigma_d,
                                                double sigma_s, double alpha, double beta) {
  std::vector<at::Tensor> ks{k}, vs;
  if (v.has_value()) vs.push_back(*v);
  dscr_check("dscr_refine", ks, vs, false, depth, coords, sigma_d, sigma_s, alpha, beta);
  std::vector<at::Tensor> outs{at::empty(k.sizes(), k.options())};
  if (v.has_value()) outs.push_back(at::empty(v->sizes(), v->options()));
  return outs;
}

static void dscr_refine_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                    const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                                    double beta) {
  dscr_check("dscr_refine_cache_", keys, values, true, depth, coords, sigma_d, sigma_s, alpha, beta);
}

}  // namespace kvfix

TORCH_LIBRARY(kvfix, m) {
  m.def("dscr_refine(Tensor k, Tensor? v, Tensor depth, Tensor coords, float sigma_d, "
        "float sigma_s, float alpha, float beta) -> Tensor[]");
  m.def("dscr_refine_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor depth, Tensor coords, "
        "float sigma_d, float sigma_s, float alpha, float beta) -> ()");
  // Checks only (the grid form before planning; the parameters of a plan): one kernel for every device.
  m.def("dscr_check_grid(Tensor[] keys, Tensor[] values, bool cache, Tensor depth, int gh, int gw, float sigma_d, "
        "float sigma_s, float alpha, float beta) -> ()");
  m.def("dscr_check_params(str op, float sigma_d, float sigma_s, float alpha, float beta) -> ()",
        &kvfix::dscr_check_params);
}

TORCH_LIBRARY_IMPL(kvfix, CompositeExplicitAutograd, m) {
  m.impl("dscr_check_grid", &kvfix::dscr_check_grid);
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cpu);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_checked<&kvfix::dscr_refine_cache_cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_meta);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache__meta);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cuda);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_checked<&kvfix::dscr_refine_cache_cuda>);
}
#endif

// ---------------------------------------------------------------------------------------------
// KVSmooth (METHODS §2): checks shared by the CPU and CUDA implementations, schemas, registrations.

namespace kvfix {

// x has elements; sizes may be symbolic (the Meta kernels under torch.compile's dynamic shapes,
// where numel() would throw): a guard on the symbolic count.
static bool nonempty(const at::Tensor& x) { return x.sym_numel() != 0; }  // (a guard when symbolic)

// Every check of row_entropy / kvsmooth_step_, stated once: the CPU and CUDA implementations and
// the Meta kernel (torch.compile, FakeTensor, meta tensors) call it; the Python wrappers only
// convert arguments. Errors name the argument: ValueError (shape, device, range), TypeError (dtype).
MaskView kvsmooth_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* queue, const std::optional<at::Tensor>& mask) {
  const char* kn = queue != nullptr ? "k_cache" : "k";
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1, op, ": q must be [B, Hq, 1, D] (a single-token query), got shape ",
                    q.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16, op,
                   ": q must be float32, float16 or bfloat16, got ", qt);
  TORCH_CHECK_VALUE(q.size(3) <= 1 || q.stride(3) == 1, op, ": q needs a contiguous last dimension (stride ",
                    q.stride(3), ")");
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": ", kn, " must be [B, Hkv, T, D], got shape ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == qt, op, ": ", kn, " dtype ", k.scalar_type(), " does not match q dtype ", qt);
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": ", kn, " is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(k.size(3) <= 1 || k.stride(3) == 1, op, ": ", kn, " needs a contiguous last dimension (stride ",
                    k.stride(3), ")");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": ", kn, " shape ", k.sizes(), " does not match q shape ",
                    q.sizes(), " (same B and head dim D expected)");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, ": the query heads of q (", Hq,
                    ") must be a multiple of the kv heads of ", kn, " (", Hkv, ")");
  TORCH_CHECK_VALUE(T >= 1, op, ": ", kn, " needs at least one position (T >= 1), got shape ", k.sizes());
  if (v != nullptr) {
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), op, ": v_cache shape ", v->sizes(), " does not match k_cache shape ",
                      k.sizes());
    TORCH_CHECK_TYPE(v->scalar_type() == k.scalar_type(), op, ": v_cache dtype ", v->scalar_type(),
                     " does not match k_cache dtype ", k.scalar_type());
    TORCH_CHECK_VALUE(v->device() == k.device(), op, ": v_cache is on ", v->device(), " but k_cache is on ",
                      k.device());
    TORCH_CHECK_VALUE(v->size(3) <= 1 || v->stride(3) == 1, op,
                      ": v_cache needs a contiguous last dimension (stride ", v->stride(3), ")");
  }
  if (queue != nullptr) {
    TORCH_CHECK_VALUE(queue->dim() == 2 && queue->size(0) == B && queue->size(1) >= 1, op,
                      ": queue must be [B, M] with B=", B, " and M >= 1, got shape ", queue->sizes());
    TORCH_CHECK_TYPE(queue->scalar_type() == at::kFloat, op, ": queue must be float32, got ", queue->scalar_type());
    TORCH_CHECK_VALUE(queue->device() == q.device(), op, ": queue is on ", queue->device(), " but q is on ",
                      q.device());
  }
  const int64_t want[4] = {B, 1, 1, T};
  return mask_check(op, mask, q, want, "B, 1, 1, T", " (a 2-D [B, T] padding mask: pass mask[:, None, None, :])");
}

float kvsmooth_scale(std::optional<double> scale, int64_t D) {
  if (!scale.has_value()) return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D > 0 ? D : 1)));
  TORCH_CHECK_VALUE(std::isfinite(*scale), "scale must be finite, got ", *scale);
  return static_cast<float>(*scale);
}

void kvsmooth_check_lam(double lam_ref, double band) {
  TORCH_CHECK_VALUE(std::isfinite(lam_ref) && lam_ref >= 0 && lam_ref <= 1,
                    "kvsmooth_step_: lam_ref must be in [0, 1], got ", lam_ref);
  TORCH_CHECK_VALUE(std::isfinite(band) && band >= 0, "kvsmooth_step_: band must be finite and >= 0, got ", band);
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static at::Tensor row_entropy_meta(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                                   const std::optional<at::Tensor>& mask) {
  kvsmooth_check("row_entropy", q, k, nullptr, nullptr, mask);
  kvsmooth_scale(scale, q.size(3));
  return at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
}

static at::Tensor kvsmooth_step_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& queue, std::optional<double> scale,
                                     const std::optional<at::Tensor>& mask, double lam_ref, double band) {
  kvsmooth_check_lam(lam_ref, band);
  kvsmooth_check("kvsmooth_step_", q, k_cache, &v_cache, &queue, mask);
  kvsmooth_scale(scale, q.size(3));
  return at::empty({q.size(0)}, q.options().dtype(at::kFloat));
}

template <auto Impl>
at::Tensor kvsmooth_step_checked(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& queue, std::optional<double> scale,
                                 const std::optional<at::Tensor>& mask, double lam_ref, double band) {
  check_no_overlap("kvsmooth_step_", {{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"queue", &queue}},
                   {{"q", &q}, {"mask", mask.has_value() ? &*mask : nullptr}});
  return Impl(q, k_cache, v_cache, queue, scale, mask, lam_ref, band);
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("row_entropy(Tensor q, Tensor k, float? scale, Tensor? mask) -> Tensor");
  m.def("kvsmooth_step_(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) queue, float? scale, "
        "Tensor? mask, float lam_ref, float band) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("row_entropy", &kvfix::row_entropy_cpu);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_checked<&kvfix::kvsmooth_step_cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("row_entropy", &kvfix::row_entropy_meta);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_meta);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("row_entropy", &kvfix::row_entropy_cuda);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_checked<&kvfix::kvsmooth_step_cuda>);
}
#endif

// ---------------------------------------------------------------------------------------------
// Structured DSCR (kvfix/dscr_structured.py): the factored weights on a patch grid and the banded
// structure. Every check stated once (CPU, CUDA and Meta kernels), errors naming the argument.

namespace kvfix {

// A float32 / int32 / int64 tensor the plan builds: dtype, contiguous, on k's device.
static void dscr_check_operand(const char* op, const at::Tensor& x, const char* name, at::ScalarType st,
                               const at::Tensor& k) {
  TORCH_CHECK_TYPE(x.scalar_type() == st, op, ": ", name, " must be ",
                   st == at::kFloat ? "float32" : st == at::kInt ? "int32" : "int64", ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == k.device(), op, ": ", name, " is on ", x.device(), " but k is on ", k.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Every tensor to refine as one flat list: each layer's key, then its value.
static std::vector<at::Tensor> dscr_flatten(at::TensorList keys, at::TensorList values) {
  std::vector<at::Tensor> all;
  for (size_t l = 0; l < keys.size(); ++l) {
    all.push_back(keys[l]);
    if (!values.empty()) all.push_back(values[l]);
  }
  return all;
}

std::vector<at::Tensor> dscr_factored_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                               const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d) {
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  const int64_t N = k.size(2);
  dscr_check_depth(op, depth, k);
  TORCH_CHECK_VALUE(depth.is_contiguous(), op, ": depth must be contiguous (the wrapper converts)");
  for (const auto& [x, name] : {std::pair<const at::Tensor*, const char*>{&lr, "lr"}, {&rr, "rr"}, {&lc, "lc"},
                                {&rc, "rc"}})
    dscr_check_operand(op, *x, name, at::kFloat, k);
  TORCH_CHECK_VALUE(lr.dim() == 2, op, ": lr must be [gh, pr], got shape ", lr.sizes());
  TORCH_CHECK_VALUE(rr.sizes() == lr.sizes(), op, ": rr shape ", rr.sizes(), " does not match lr shape ", lr.sizes());
  TORCH_CHECK_VALUE(lc.dim() == 2, op, ": lc must be [gw, pc], got shape ", lc.sizes());
  TORCH_CHECK_VALUE(rc.sizes() == lc.sizes(), op, ": rc shape ", rc.sizes(), " does not match lc shape ", lc.sizes());
  TORCH_CHECK_VALUE(lr.size(0) * lc.size(0) == N, op, ": lr, lc: grid ", lr.size(0), " x ", lc.size(0),
                    " does not hold N=", N, " tokens");
  TORCH_CHECK_VALUE(std::isfinite(coef_d) && coef_d >= 0, op, ": coef_d must be finite and >= 0, got ", coef_d);
  TORCH_CHECK_VALUE(rank_d >= 1 && rank_d <= 4096, op, ": rank_d must be in [1, 4096], got ", rank_d);
  return dscr_flatten(keys, values);
}

std::vector<at::Tensor> dscr_banded_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                             const DscrBanded& s) {
  dscr_check_layers(op, keys, values, cache);
  const at::Tensor& k = keys[0];
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK_VALUE(s.gh >= 1 && N % s.gh == 0, op, ": gh=", s.gh, " does not divide N=", N);
  for (const auto& [x, name, st] : {std::tuple<const at::Tensor*, const char*, at::ScalarType>{&s.tok, "tok", at::kInt},
                                    {&s.tokw, "tokw", at::kFloat}, {&s.cnt, "cnt", at::kInt},
                                    {&s.row_ptr, "row_ptr", at::kLong}, {&s.row_lo, "row_lo", at::kInt},
                                    {&s.tvals, "tvals", at::kFloat}, {&s.node_off, "node_off", at::kLong},
                                    {&s.cinv, "cinv", at::kFloat}, {&s.band, "band", at::kFloat}})
    dscr_check_operand(op, *x, name, st, k);
  TORCH_CHECK_VALUE(s.tok.dim() == 2 && (s.tok.size(0) == 1 || s.tok.size(0) == B) && s.tok.size(1) == N, op,
                    ": tok must be [1 or B, N] with B=", B, ", N=", N, ", got shape ", s.tok.sizes());
  const int64_t Bd = s.tok.size(0);
  TORCH_CHECK_VALUE(s.cinv.sizes() == s.tok.sizes(), op, ": cinv shape ", s.cinv.sizes(), " does not match tok shape ",
                    s.tok.sizes());
  TORCH_CHECK_VALUE(s.tokw.dim() == 3 && s.tokw.size(0) == Bd && s.tokw.size(1) == N, op, ": tokw must be [", Bd, ", ",
                    N, ", C] (as tok), got shape ", s.tokw.sizes());
  TORCH_CHECK_VALUE(s.cnt.dim() == 1 && s.cnt.size(0) == Bd, op, ": cnt must be [", Bd, "] (as tok), got shape ",
                    s.cnt.sizes());
  TORCH_CHECK_VALUE(s.node_off.dim() == 1 && s.node_off.size(0) == Bd + 1, op, ": node_off must be [", Bd + 1,
                    "] (one more than tok's items), got shape ", s.node_off.sizes());
  TORCH_CHECK_VALUE(s.band.dim() == 1 && s.band.size(0) >= 1, op, ": band must be [K + 1] with K >= 0, got shape ",
                    s.band.sizes());
  TORCH_CHECK_VALUE(s.row_lo.dim() == 1 && s.tvals.dim() == 1, op, ": row_lo and tvals must be 1-D, got shapes ",
                    s.row_lo.sizes(), " and ", s.tvals.sizes());
  const int64_t G = s.row_lo.size(0);
  TORCH_CHECK_VALUE(s.row_ptr.dim() == 1 && s.row_ptr.size(0) == G + 1, op, ": row_ptr must be [", G + 1,
                    "] (one more than row_lo), got shape ", s.row_ptr.sizes());
  // The values index memory: read on the host where they are (CPU; a device's kernel relies on the plan).
  if (s.node_off.is_cpu() && !s.node_off.is_meta()) {
    const int64_t* off = s.node_off.const_data_ptr<int64_t>();
    const int64_t* rp = s.row_ptr.const_data_ptr<int64_t>();
    const int32_t* lo = s.row_lo.const_data_ptr<int32_t>();
    const int32_t* cnt = s.cnt.const_data_ptr<int32_t>();
    TORCH_CHECK_VALUE(off[0] == 0 && off[Bd] == G, op, ": node_off must run from 0 to G = ", G, " (row_lo's length)");
    TORCH_CHECK_VALUE(rp[0] == 0 && rp[G] == s.tvals.size(0), op, ": row_ptr must run from 0 to ", s.tvals.size(0),
                      " (tvals' length)");
    for (int64_t bd = 0; bd < Bd; ++bd) {
      const int64_t g0 = off[bd], g1 = off[bd + 1], Gi = g1 - g0;
      TORCH_CHECK_VALUE(g1 >= g0, op, ": node_off must not decrease (item ", bd, ")");
      TORCH_CHECK_VALUE(cnt[bd] >= 1 && cnt[bd] <= s.tokw.size(2), op, ": cnt of item ", bd, " is ", cnt[bd],
                        ", must be in [1, ", s.tokw.size(2), "] (tokw's last dim)");
      for (int64_t n = g0; n < g1; ++n)
        TORCH_CHECK_VALUE(rp[n + 1] >= rp[n] && lo[n] >= 0 && lo[n] + (rp[n + 1] - rp[n]) <= Gi, op,
                          ": row_lo / row_ptr: node row ", n, " out of range");
      const int32_t* tk = s.tok.const_data_ptr<int32_t>() + bd * N;
      for (int64_t i = 0; i < N; ++i)
        TORCH_CHECK_VALUE(tk[i] >= 0 && tk[i] + cnt[bd] <= Gi, op, ": tok: token node out of range (item ", bd,
                          ", token ", i, ")");
    }
  }
  return dscr_flatten(keys, values);
}

template <auto Impl>
void dscr_refine_factored_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                        const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                        const at::Tensor& rc, double coef_d, int64_t rank_d) {
  check_no_overlap("dscr_refine_factored_cache_", layer_refs(keys, values),
                   {{"depth", &depth}, {"lr", &lr}, {"rr", &rr}, {"lc", &lc}, {"rc", &rc}});
  Impl(keys, values, depth, lr, rr, lc, rc, coef_d, rank_d);
}

template <auto Impl>
void dscr_refine_banded_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                      const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                      const at::Tensor& row_lo, const at::Tensor& tvals, const at::Tensor& node_off,
                                      const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  check_no_overlap("dscr_refine_banded_cache_", layer_refs(keys, values),
                   {{"tok", &tok}, {"tokw", &tokw}, {"cnt", &cnt}, {"row_ptr", &row_ptr}, {"row_lo", &row_lo},
                    {"tvals", &tvals}, {"node_off", &node_off}, {"cinv", &cinv}, {"band", &band}});
  Impl(keys, values, tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh);
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static std::vector<at::Tensor> dscr_meta_outputs(const std::vector<at::Tensor>& srcs) {
  std::vector<at::Tensor> outs;
  for (const at::Tensor& x : srcs) outs.push_back(at::empty(x.sizes(), x.options()));
  return outs;
}

static std::vector<at::Tensor> dscr_refine_factored_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                         const at::Tensor& depth, const at::Tensor& lr,
                                                         const at::Tensor& rr, const at::Tensor& lc,
                                                         const at::Tensor& rc, double coef_d, int64_t rank_d) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  return dscr_meta_outputs(
      dscr_factored_operands("dscr_refine_factored", {k}, vs, false, depth, lr, rr, lc, rc, coef_d, rank_d));
}

static void dscr_refine_factored_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                             const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                             const at::Tensor& rc, double coef_d, int64_t rank_d) {
  dscr_factored_operands("dscr_refine_factored_cache_", keys, values, true, depth, lr, rr, lc, rc, coef_d, rank_d);
}

static std::vector<at::Tensor> dscr_refine_banded_meta(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                       const at::Tensor& tok, const at::Tensor& tokw,
                                                       const at::Tensor& cnt, const at::Tensor& row_ptr,
                                                       const at::Tensor& row_lo, const at::Tensor& tvals,
                                                       const at::Tensor& node_off, const at::Tensor& cinv,
                                                       const at::Tensor& band, int64_t gh) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const DscrBanded s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  return dscr_meta_outputs(dscr_banded_operands("dscr_refine_banded", {k}, vs, false, s));
}

static void dscr_refine_banded_cache__meta(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                           const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                           const at::Tensor& row_lo, const at::Tensor& tvals,
                                           const at::Tensor& node_off, const at::Tensor& cinv, const at::Tensor& band,
                                           int64_t gh) {
  const DscrBanded s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  dscr_banded_operands("dscr_refine_banded_cache_", keys, values, true, s);
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("dscr_refine_factored(Tensor k, Tensor? v, Tensor depth, Tensor lr, Tensor rr, Tensor lc, Tensor rc, "
        "float coef_d, int rank_d) -> Tensor[]");
  m.def("dscr_refine_factored_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor depth, Tensor lr, Tensor rr, "
        "Tensor lc, Tensor rc, float coef_d, int rank_d) -> ()");
  m.def("dscr_refine_banded(Tensor k, Tensor? v, Tensor tok, Tensor tokw, Tensor cnt, Tensor row_ptr, "
        "Tensor row_lo, Tensor tvals, Tensor node_off, Tensor cinv, Tensor band, int gh) -> Tensor[]");
  m.def("dscr_refine_banded_cache_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor tok, Tensor tokw, Tensor cnt, "
        "Tensor row_ptr, Tensor row_lo, Tensor tvals, Tensor node_off, Tensor cinv, Tensor band, int gh) -> ()");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("dscr_refine_factored", &kvfix::dscr_refine_factored_cpu);
  m.impl("dscr_refine_factored_cache_", &kvfix::dscr_refine_factored_cache_checked<&kvfix::dscr_refine_factored_cache_cpu>);
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_cpu);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache_checked<&kvfix::dscr_refine_banded_cache_cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("dscr_refine_factored", &kvfix::dscr_refine_factored_meta);
  m.impl("dscr_refine_factored_cache_", &kvfix::dscr_refine_factored_cache__meta);
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_meta);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache__meta);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine_factored", &kvfix::dscr_refine_factored_cuda);
  m.impl("dscr_refine_factored_cache_", &kvfix::dscr_refine_factored_cache_checked<&kvfix::dscr_refine_factored_cache_cuda>);
}
#endif

// ---------------------------------------------------------------------------------------------
// SCR (METHODS §3): checks shared by the CPU and CUDA implementations, schemas, registrations.

namespace kvfix {

// Every check of scr_scores / scr_redistribute(_), stated once: the CPU, CUDA and Meta kernels
// call them; the Python wrappers only convert arguments. Errors name the argument: ValueError
// (shape, device, range, non-finite scores), TypeError (dtype).
MaskView scr_scores_check(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                         const std::optional<at::Tensor>& mask, bool causal) {
  const char* op = "scr_scores";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Hq, Tq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be [B, Hkv, T, D], got shape ", k.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16, op,
                   ": q must be float32, float16 or bfloat16, got ", qt);
  TORCH_CHECK_TYPE(k.scalar_type() == qt, op, ": k dtype ", k.scalar_type(), " does not match q dtype ", qt);
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  for (const auto& [x, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}}) {
    TORCH_CHECK_VALUE(nonempty(*x), op, ": ", name, " must not be empty, got shape ", x->sym_sizes());
    TORCH_CHECK_VALUE(x->size(3) <= 1 || x->stride(3) == 1, op, ": ", name,
                      " needs a contiguous last dimension (stride ", x->stride(3), ")");
  }
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": k shape ", k.sizes(), " does not match q shape ",
                    q.sizes(), " (same B and D expected)");
  TORCH_CHECK_VALUE(Hq % Hkv == 0, op, ": the query heads of q (", Hq, ") must be a multiple of the kv heads of k (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= T, op, ": image_span (", start, ", ", end,
                    ") must satisfy 0 <= start <= end <= T = ", T);
  TORCH_CHECK_VALUE(!causal || Tq <= T, op, ": causal needs Tq <= T (query i sits at T - Tq + i), got Tq=", Tq,
                    ", T=", T);
  const int64_t want[4] = {B, Hq, Tq, T};
  return mask_check(op, mask, q, want, "B, Hq, Tq, T");
}

float scr_scale(std::optional<double> scale, int64_t D) {
  if (!scale.has_value()) return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D > 0 ? D : 1)));
  TORCH_CHECK_VALUE(std::isfinite(*scale), "scr_scores: scale must be finite, got ", *scale);
  return static_cast<float>(*scale);
}

void scr_redistribute_check(const char* op, const at::Tensor& hidden, const at::Tensor& scores, int64_t gh,
                            int64_t gw, int64_t top_k, double lam) {
  TORCH_CHECK_VALUE(hidden.dim() == 3, op, ": hidden must be [B, N, C], got shape ", hidden.sizes());
  const auto ht = hidden.scalar_type();
  TORCH_CHECK_TYPE(ht == at::kFloat || ht == at::kHalf || ht == at::kBFloat16, op,
                   ": hidden must be float32, float16 or bfloat16, got ", ht);
  TORCH_CHECK_VALUE(hidden.size(2) <= 1 || hidden.stride(2) == 1, op,
                    ": hidden needs a contiguous last dimension (stride ", hidden.stride(2), ")");
  TORCH_CHECK_VALUE(nonempty(hidden), op, ": hidden must not be empty, got shape ", hidden.sym_sizes());
  const int64_t B = hidden.size(0), N = hidden.size(1);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, op, ": scores must be float32 (the wrapper converts), got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == N, op, ": scores must be [B, N] = [",
                    B, ", ", N, "], got shape ", scores.sizes());
  TORCH_CHECK_VALUE(scores.is_contiguous(), op, ": scores must be contiguous (the wrapper converts)");
  TORCH_CHECK_VALUE(scores.device() == hidden.device(), op, ": scores is on ", scores.device(), " but hidden is on ",
                    hidden.device());
  TORCH_CHECK_VALUE(gh >= 1 && gw >= 1 && gh * gw == N, op, ": grid_hw (", gh, ", ", gw,
                    ") does not match the N = ", N, " tokens of hidden (gh * gw must be N)");
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0, got ", top_k);
  // float32 arithmetic (h / lam, lam - 1): lam must be a normal float32 number
  TORCH_CHECK_VALUE(lam >= kFloatMinNormal && lam <= kFloatMax, op,
                    ": lam must be in [1.2e-38, 3.4e38] (a normal float32 > 0), got ", lam);
  // Once per image (not a decode path): one host read; nothing to read on meta / fake tensors.
  if (!scores.is_meta() && scores.numel() > 0)
    TORCH_CHECK_VALUE(scores.isfinite().all().item<bool>(), op, ": scores has non-finite values (nan or inf)");
}

static at::Tensor scr_scores_meta(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                                  std::optional<double> scale, const std::optional<at::Tensor>& mask, bool causal) {
  scr_scores_check(q, k, start, end, mask, causal);
  scr_scale(scale, q.size(3));
  return at::empty({q.size(0), end - start}, q.options().dtype(at::kFloat));
}

static at::Tensor scr_redistribute_meta(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                        int64_t top_k, double lam, bool exclude_border) {
  scr_redistribute_check("scr_redistribute", hidden, scores, gh, gw, top_k, lam);
  return at::empty(hidden.sizes(), hidden.options());
}

static void scr_redistribute__meta(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                   int64_t top_k, double lam, bool exclude_border) {
  scr_redistribute_check("scr_redistribute_", hidden, scores, gh, gw, top_k, lam);
}

template <auto Impl>
void scr_redistribute__checked(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                               int64_t top_k, double lam, bool exclude_border) {
  check_no_overlap("scr_redistribute_", {{"hidden", &hidden}}, {{"scores", &scores}});
  Impl(hidden, scores, gh, gw, top_k, lam, exclude_border);
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("scr_scores(Tensor q, Tensor k, int start, int end, float? scale, Tensor? mask, bool causal) -> Tensor");
  m.def("scr_redistribute(Tensor hidden, Tensor scores, int gh, int gw, int top_k, float lam, "
        "bool exclude_border) -> Tensor");
  m.def("scr_redistribute_(Tensor(a!) hidden, Tensor scores, int gh, int gw, int top_k, float lam, "
        "bool exclude_border) -> ()");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("scr_scores", &kvfix::scr_scores_cpu);
  m.impl("scr_redistribute", &kvfix::scr_redistribute_cpu);
  m.impl("scr_redistribute_", &kvfix::scr_redistribute__checked<&kvfix::scr_redistribute__cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("scr_scores", &kvfix::scr_scores_meta);
  m.impl("scr_redistribute", &kvfix::scr_redistribute_meta);
  m.impl("scr_redistribute_", &kvfix::scr_redistribute__meta);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("scr_scores", &kvfix::scr_scores_cuda);
  m.impl("scr_redistribute", &kvfix::scr_redistribute_cuda);
  m.impl("scr_redistribute_", &kvfix::scr_redistribute__checked<&kvfix::scr_redistribute__cuda>);
}
#endif

// ---------------------------------------------------------------------------------------------
// CMAC (METHODS §4): checks shared by the CPU, CUDA and Meta kernels, schemas, registrations.

namespace kvfix {

// Every check of rope_calibrate / cmac_attention, stated once: the CPU, CUDA and Meta kernels call
// cmac_check_rope / cmac_check_attention; the Python wrappers only convert arguments. Errors name
// the argument: ValueError (shape, device, range), TypeError (dtype). Where the device matters it
// is checked there: csrc/cuda/cmac.cu (the CUDA kernel's head dim and mrope section limits) and the
// CPU kernel (inv_freq finite: a host read the CUDA path does not make).

// A float32 / float16 / bfloat16 4-D tensor [layout] with a contiguous last dim, non-empty unless allowed.
static void cmac_check_float4(const char* op, const at::Tensor& x, const char* name, const char* layout,
                              bool allow_empty = false) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be ", layout, ", got shape ", x.sym_sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(allow_empty || nonempty(x), op, ": ", name, " is empty (shape ", x.sym_sizes(), ")");
  TORCH_CHECK_VALUE(x.size(3) <= 1 || x.stride(3) == 1, op, ": ", name,
                    " needs a contiguous last dimension (stride ", x.stride(3), ")");
}

// x has like's dtype and device.
static void cmac_check_same(const char* op, const at::Tensor& x, const char* name, const at::Tensor& like,
                            const char* like_name) {
  TORCH_CHECK_TYPE(x.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", x.scalar_type(),
                   " does not match ", like_name, " dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(x.device() == like.device(), op, ": ", name, " is on ", x.device(), " but ", like_name, " is on ",
                    like.device());
}

// image_span: two ints (one span for the batch), or spans, a contiguous int64 tensor [B, 2] on the
// inputs' device (the wrapper converts int32) whose values are checked here when it is on the CPU
// (on CUDA they stay on the device: the kernels clamp a span to [0, T]). n >= 0: every span's length.
static void cmac_check_spans(const char* op, int64_t B, int64_t T, int64_t start, int64_t end,
                             const std::optional<at::Tensor>& spans, const at::Tensor& like, const char* like_name,
                             int64_t n) {
  if (!spans.has_value()) {
    TORCH_CHECK_VALUE(0 <= start && start <= end && end <= T, op, ": image_span (", start, ", ", end,
                      ") is out of range: need 0 <= start <= end <= T = ", T);
    TORCH_CHECK_VALUE(n < 0 || end - start == n, op, ": image_span length ", end - start, " != N = ", n);
    return;
  }
  const at::Tensor& sp = *spans;
  TORCH_CHECK_TYPE(sp.scalar_type() == at::kLong, op,
                   ": image_span must be an int64 tensor [B, 2] or (start, end) ints, got dtype ", sp.scalar_type());
  TORCH_CHECK_VALUE(sp.dim() == 2 && sp.size(0) == B && sp.size(1) == 2, op, ": image_span must be [B, 2] = [", B,
                    ", 2] (per-item start, end), got shape ", sp.sym_sizes());
  TORCH_CHECK_VALUE(sp.is_contiguous(), op, ": image_span must be contiguous (the wrapper converts)");
  TORCH_CHECK_VALUE(sp.device() == like.device(), op, ": image_span is on ", sp.device(), " but ", like_name, " is on ",
                    like.device());
  if (sp.is_cpu()) {
    const int64_t* s = sp.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(0 <= s[2 * b] && s[2 * b] <= s[2 * b + 1] && s[2 * b + 1] <= T, op, ": image_span (",
                        s[2 * b], ", ", s[2 * b + 1], ") of item ", b, " is out of range: need 0 <= start <= end <= T = ",
                        T);
      TORCH_CHECK_VALUE(n < 0 || s[2 * b + 1] - s[2 * b] == n, op, ": image span length of item ", b, " is ",
                        s[2 * b + 1] - s[2 * b], ", expected N = ", n);
    }
  }
}

std::vector<int32_t> cmac_freq_sections(at::OptionalIntArrayRef sections, int64_t half, int64_t rows) {
  std::vector<int32_t> sec(half, 0);
  if (!sections.has_value()) return sec;
  int64_t f = 0;
  for (size_t i = 0; i < sections->size(); ++i)
    for (int64_t c = 0; c < (*sections)[i] && f < half; ++c) sec[f++] = static_cast<int32_t>(std::min<int64_t>(i, rows - 1));
  return sec;
}

void cmac_check_rope(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                     int64_t n, const at::Tensor& inv_freq, double gamma, const std::optional<at::Tensor>& positions,
                     at::OptionalIntArrayRef sections) {
  const char* op = "rope_calibrate";
  cmac_check_float4(op, k, "k", "[B, Hkv, T, D]");
  const int64_t B = k.size(0), T = k.size(2), D = k.size(3);
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": k head dim must be even for RoPE, got ", D);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0, op, ": gamma must be > 0 and finite, got ", gamma);
  // The float32 angles (1 - 1/gamma) (a - p) inv_freq, |a - p| <= T: a tiny gamma overflows them (sin(inf) = nan).
  TORCH_CHECK_VALUE(std::fabs(1.0 - 1.0 / gamma) * static_cast<double>(T > 1 ? T : 1) <= kFloatMax, op, ": gamma=",
                    gamma, " is too small: the rotation angles (1 - 1/gamma) (a - p) overflow float32");
  TORCH_CHECK_TYPE(inv_freq.scalar_type() == at::kFloat, op, ": inv_freq must be float32, got ",
                   inv_freq.scalar_type());
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) == D / 2, op, ": inv_freq must be [D/2] = [", D / 2,
                    "], got shape ", inv_freq.sym_sizes());
  TORCH_CHECK_VALUE(inv_freq.device() == k.device(), op, ": inv_freq is on ", inv_freq.device(), " but k is on ",
                    k.device());
  // The int span first (its range, then its length n); n: the output's token count (with a tensor
  // image_span, num_tokens or the first span's length, which the wrapper reads).
  if (!spans.has_value()) cmac_check_spans(op, B, T, start, end, spans, k, "k", -1);
  TORCH_CHECK_VALUE(0 <= n && n <= T, op, ": the image token count N = ", n,
                    " (num_tokens, or the length of image_span's first span) must be in [0, T = ", T, "]");
  cmac_check_spans(op, B, T, start, end, spans, k, "k", n);
  int64_t S = 1;
  if (sections.has_value()) {
    int64_t total = 0;
    for (int64_t s : *sections) {
      TORCH_CHECK_VALUE(s >= 0, op, ": mrope_section ", *sections, " has a negative size");
      total += s;
    }
    TORCH_CHECK_VALUE(!sections->empty() && total == D / 2, op, ": mrope_section ", *sections,
                      " must sum to D/2 = ", D / 2);
    S = static_cast<int64_t>(sections->size());
  }
  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, op, ": positions must be an integer tensor (int64 or int32), got ",
                     p.scalar_type());
    TORCH_CHECK_VALUE(p.device() == k.device(), op, ": positions is on ", p.device(), " but k is on ", k.device());
    // (a [B, T] tensor reaches here as [1, B, T]: the wrapper converts)
    TORCH_CHECK_VALUE(p.dim() == 3 && p.size(1) == B && p.size(2) == T && (p.size(0) == 1 || p.size(0) == S), op,
                      ": positions must be [B, T]", sections.has_value() ? " or [S, B, T] (S = len(mrope_section))" : "",
                      " with B=", B, ", T=", T, (sections.has_value() ? ", S=" : ""),
                      (sections.has_value() ? std::to_string(S) : std::string()), ", got shape ", p.sym_sizes());
  }
}

MaskView cmac_check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              int64_t end, const std::optional<at::Tensor>& spans,
                              const std::optional<at::Tensor>& k_cal, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean) {
  const char* op = "cmac_attention";
  cmac_check_float4(op, q, "q", "[B, Hq, Tq, D]");
  cmac_check_float4(op, k, "k", "[B, Hkv, T, D]");
  cmac_check_float4(op, v, "v", "[B, Hkv, T, D]");
  cmac_check_same(op, k, "k", q, "q");
  cmac_check_same(op, v, "v", q, "q");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": k shape ", k.sizes(), " does not match q shape ",
                    q.sizes(), " (same B and D expected)");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " does not match k shape ", k.sizes());
  TORCH_CHECK_VALUE(Hq % Hkv == 0, op, ": the query heads of q (", Hq, ") must be a multiple of the kv heads of k (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(Tq <= T, op, ": q has more positions (Tq=", Tq, ") than k (T=", T,
                    "): queries are the last Tq cache positions");
  if (!spans.has_value()) cmac_check_spans(op, B, T, start, end, spans, q, "q", -1);
  int64_t n = -1;
  if (k_cal.has_value()) {
    // (empty where the span is: rope_calibrate of an empty span)
    cmac_check_float4(op, *k_cal, "k_calibrated", "[B, Hkv, N, D]", /*allow_empty=*/true);
    cmac_check_same(op, *k_cal, "k_calibrated", q, "q");
    n = spans.has_value() ? k_cal->size(2) : end - start;
    TORCH_CHECK_VALUE(k_cal->size(0) == B && k_cal->size(1) == Hkv && k_cal->size(2) == n && k_cal->size(3) == D, op,
                      ": k_calibrated must be [B, Hkv, N, D] = [", B, ", ", Hkv, ", ", n, ", ", D,
                      "] (N = the span length), got shape ", k_cal->sizes());
  }
  cmac_check_spans(op, B, T, start, end, spans, q, "q", n);
  if (imd_items.has_value()) {
    const at::Tensor& im = *imd_items;
    TORCH_CHECK_VALUE(im.scalar_type() == at::kBool && im.dim() == 1 && im.size(0) == B, op,
                      ": imd must be a bool or a bool tensor [B] = [", B, "], got ", im.scalar_type(), " ",
                      im.sym_sizes());
    TORCH_CHECK_VALUE(im.device() == q.device(), op, ": imd is on ", im.device(), " but q is on ", q.device());
    TORCH_CHECK_VALUE(im.is_contiguous(), op, ": imd must be contiguous (the wrapper converts)");
  }
  TORCH_CHECK_VALUE(value_mean == 0 || value_mean == 1, op,
                    ": value_mean must be 0 ('scalar') or 1 ('vector'), got ", value_mean);
  const int64_t want[4] = {B, Hq, Tq, T};
  return mask_check(op, mask, q, want, "B, Hq, Tq, T");
}

// Every check of contrastive_logits, stated once (CPU, CUDA and Meta kernels; the wrapper only
// converts arguments).
void cmac_check_contrastive(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta) {
  const char* op = "contrastive_logits";
  for (const auto& [x, name] : {std::pair<const at::Tensor*, const char*>{&logits, "logits"},
                                {&distorted, "logits_distorted"}}) {
    const auto st = x->scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                     " must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK_VALUE(x->dim() >= 1 && nonempty(*x), op, ": ", name,
                      " must be a non-empty [..., V] tensor, got shape ", x->sym_sizes());
  }
  TORCH_CHECK_VALUE(distorted.sizes() == logits.sizes(), op, ": logits_distorted shape ", distorted.sizes(),
                    " does not match logits shape ", logits.sizes());
  TORCH_CHECK_TYPE(distorted.scalar_type() == logits.scalar_type(), op, ": logits_distorted dtype ",
                   distorted.scalar_type(), " does not match logits dtype ", logits.scalar_type());
  TORCH_CHECK_VALUE(distorted.device() == logits.device(), op, ": logits_distorted is on ", distorted.device(),
                    " but logits is on ", logits.device());
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= kFloatMax, op, ": alpha must be >= 0 and finite in float32 (<= 3.4e38), got ",
                    alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0 && beta <= 1, op, ": beta must be in (0, 1], got ", beta);
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static at::Tensor rope_calibrate_meta(const at::Tensor& k, int64_t start, int64_t end,
                                      const std::optional<at::Tensor>& spans, int64_t n, const at::Tensor& inv_freq,
                                      double gamma, const std::optional<at::Tensor>& positions,
                                      at::OptionalIntArrayRef sections) {
  cmac_check_rope(k, start, end, spans, n, inv_freq, gamma, positions, sections);
  return at::empty({k.size(0), k.size(1), n, k.size(3)}, k.options());
}

static at::Tensor cmac_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                                      int64_t end, const std::optional<at::Tensor>& spans,
                                      const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                                      const std::optional<at::Tensor>& mask, bool causal, bool imd,
                                      const std::optional<at::Tensor>& imd_items, int64_t value_mean) {
  cmac_check_attention(q, k, v, start, end, spans, k_cal, mask, imd_items, value_mean);
  kvsmooth_scale(scale, q.size(3));
  return at::empty(q.sizes(), q.options());
}

static at::Tensor contrastive_logits_meta(const at::Tensor& logits, const at::Tensor& distorted, double alpha,
                                          double beta) {
  cmac_check_contrastive(logits, distorted, alpha, beta);
  return at::empty(logits.sizes(), logits.options());
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("rope_calibrate(Tensor k, int start, int end, Tensor? spans, int n, Tensor inv_freq, float gamma, "
        "Tensor? positions, int[]? sections) -> Tensor");
  m.def("cmac_attention(Tensor q, Tensor k, Tensor v, int start, int end, Tensor? spans, Tensor? k_calibrated, "
        "float? scale, Tensor? mask, bool causal, bool imd, Tensor? imd_items, int value_mean) -> Tensor");
  m.def("contrastive_logits(Tensor logits, Tensor logits_distorted, float alpha, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("rope_calibrate", &kvfix::rope_calibrate_cpu);
  m.impl("cmac_attention", &kvfix::cmac_attention_cpu);
  m.impl("contrastive_logits", &kvfix::contrastive_logits_cpu);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("rope_calibrate", &kvfix::rope_calibrate_meta);
  m.impl("cmac_attention", &kvfix::cmac_attention_meta);
  m.impl("contrastive_logits", &kvfix::contrastive_logits_meta);
}

#ifdef KVFIX_WITH_CUDA
TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("rope_calibrate", &kvfix::rope_calibrate_cuda);
  m.impl("cmac_attention", &kvfix::cmac_attention_cuda);
  m.impl("contrastive_logits", &kvfix::contrastive_logits_cuda);
}
#endif
