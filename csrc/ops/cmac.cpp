// CMAC (METHODS §4): the schemas of rope_calibrate, cmac_attention and contrastive_logits, their
// checks (stated once), Meta kernels and CPU registrations (csrc/cpu/cmac.cpp; the CUDA kernels
// register themselves in csrc/cuda/cmac.cu).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "ops/cmac.h"

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
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                              const std::optional<at::Tensor>& k_cal_mean) {
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
  if (k_cal_mean.has_value()) {
    // the caller-held mean of the segment's image keys (k_calibrated's, else k's over the span)
    const at::Tensor& km = *k_cal_mean;
    TORCH_CHECK_TYPE(km.scalar_type() == at::kFloat, op, ": k_calibrated_mean must be float32, got ",
                     km.scalar_type());
    TORCH_CHECK_VALUE(km.dim() == 3 && km.size(0) == B && km.size(1) == Hkv && km.size(2) == D, op,
                      ": k_calibrated_mean must be [B, Hkv, D] = [", B, ", ", Hkv, ", ", D, "], got shape ",
                      km.sym_sizes());
    TORCH_CHECK_VALUE(km.device() == q.device(), op, ": k_calibrated_mean is on ", km.device(), " but q is on ",
                      q.device());
    TORCH_CHECK_VALUE(km.is_contiguous(), op, ": k_calibrated_mean must be contiguous (the wrapper converts)");
  }
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
                                      const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                                      const std::optional<at::Tensor>& k_cal_mean) {
  cmac_check_attention(q, k, v, start, end, spans, k_cal, mask, imd_items, value_mean, k_cal_mean);
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
        "float? scale, Tensor? mask, bool causal, bool imd, Tensor? imd_items, int value_mean, "
        "Tensor? k_calibrated_mean=None) -> Tensor");
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
