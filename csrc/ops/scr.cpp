// SCR (METHODS §3): the schemas of scr_scores and scr_redistribute(_), their checks (stated once),
// Meta kernels and CPU registrations (csrc/cpu/scr.cpp; the CUDA kernels register themselves in
// csrc/cuda/scr.cu).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "ops/scr.h"

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
  // On the CPU the scores are read here (no device round trip); a device never syncs with the
  // host for it: the CUDA kernels write nan over an item whose scores are not finite (scr.cuh).
  // (A loop over the contiguous float32 scores: isfinite().all().item() was three ATen calls, a
  // tenth of a 24 x 24 bf16 call.)
  if (scores.device().is_cpu()) {
    const float* s = scores.const_data_ptr<float>();
    TORCH_CHECK_VALUE(std::all_of(s, s + scores.numel(), [](float x) { return std::isfinite(x); }), op,
                      ": scores has non-finite values (nan or inf)");
  }
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
