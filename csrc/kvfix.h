// Declarations shared by csrc/ops.cpp and the per-device implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <vector>

namespace kvfix {

// DSCR (SPEC §1). Proximity coefficients, as the kernels use them:
//   wt[i, j] = exp(-coef_d * (d_i - d_j)^2) + exp(-coef_s * |s_i - s_j|^2)
//   coef_d = alpha / (2 sigma_d^2), coef_s = beta / (2 sigma_s^2).
struct DscrCoefs {
  float coef_d;
  float coef_s;
};
DscrCoefs dscr_coefs(double sigma_d, double sigma_s, double alpha, double beta);

// Checks shared by every device (TORCH_CHECK: the Python wrappers raise friendlier errors first).
// depth: float32 [Bd, N], coords: float32 [Bd, N, 2], both contiguous, Bd in {1, B}.
void dscr_check(const at::Tensor& k, const std::optional<at::Tensor>& v, const at::Tensor& depth,
                const at::Tensor& coords);
// depth and coords are finite (ValueError otherwise). One host read each: call it once per op
// call, after the shape checks and before anything is written.
void dscr_check_finite(const at::Tensor& depth, const at::Tensor& coords);

// Out-of-place refinement: returns {k_hat} or {k_hat, v_hat}.
std::vector<at::Tensor> dscr_refine_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                        const at::Tensor& depth, const at::Tensor& coords,
                                        double sigma_d, double sigma_s, double alpha, double beta);
// In place over several layers' image spans ([B, H, N, D] views of a cache); values may be empty.
void dscr_refine_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                           const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                           double beta);

#ifdef KVFIX_WITH_CUDA
std::vector<at::Tensor> dscr_refine_cuda(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                         const at::Tensor& depth, const at::Tensor& coords,
                                         double sigma_d, double sigma_s, double alpha, double beta);
void dscr_refine_cache_cuda(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                            const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                            double beta);
#endif


// ---------------------------------------------------------------------------------------------
// KVSmooth (SPEC §2): row entropy of a single-token query and the fused decoding step.

// A key mask broadcast to [B, 1, 1, T], as the kernels read it: element (b, t) at
// data + b * sb + t * st (strides in elements, 0 where broadcast). kind: 0 no mask, 1 bool
// (True = attend), 2/3/4 additive float32/float16/bfloat16 (-inf = masked).
struct KvsMask {
  const void* data = nullptr;
  int kind = 0;
  int64_t sb = 0, st = 0;
};

// Checks shared by every device (the Python wrappers raise friendlier errors first). q [B, Hq, 1, D],
// k [B, Hkv, T, D] (Hq % Hkv == 0, T >= 1), v like k or null, queue float32 [B, M >= 1] or null,
// mask broadcastable to [B, 1, 1, T]. Returns the mask view the kernels read.
KvsMask kvsmooth_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* queue, const std::optional<at::Tensor>& mask);
// The logit scale (default 1 / sqrt(D)); lam_ref in [0, 1] and band >= 0, finite.
float kvsmooth_scale(std::optional<double> scale, int64_t D);
void kvsmooth_check_lam(double lam_ref, double band);

at::Tensor row_entropy_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                           const std::optional<at::Tensor>& mask);
at::Tensor kvsmooth_step_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& queue, std::optional<double> scale,
                             const std::optional<at::Tensor>& mask, double lam_ref, double band);
#ifdef KVFIX_WITH_CUDA
at::Tensor row_entropy_cuda(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                            const std::optional<at::Tensor>& mask);
at::Tensor kvsmooth_step_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& queue, std::optional<double> scale,
                              const std::optional<at::Tensor>& mask, double lam_ref, double band);
#endif

}  // namespace kvfix


// ---------------------------------------------------------------------------------------------
// CMAC (SPEC §4): calibrated image keys, attention with IMD, contrastive logits.

namespace kvfix {

// A mask broadcast to [B, Hq, Tq, T]: element (b, h, i, j) at data + b*sb + h*sh + i*si + j*sj
// (element strides, 0 where broadcast). kind: 0 none, 1 bool (True = attend), 2/3/4 additive
// float32/float16/bfloat16 (-inf = masked).
struct CmacMask {
  const void* data = nullptr;
  int kind = 0;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

// Checks shared by every device (the Python wrappers raise friendlier errors first).
void cmac_check_rope(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                     int64_t n, const at::Tensor& inv_freq, double gamma, const std::optional<at::Tensor>& positions,
                     at::OptionalIntArrayRef sections);
CmacMask cmac_check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              int64_t end, const std::optional<at::Tensor>& spans,
                              const std::optional<at::Tensor>& k_cal, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean);
void cmac_check_contrastive(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta);
// Frequency f's RoPE section (index into positions' first dim), for D/2 frequencies.
std::vector<int32_t> cmac_freq_sections(at::OptionalIntArrayRef sections, int64_t half,
                                        int64_t num_position_rows);

at::Tensor rope_calibrate_cpu(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                              int64_t n, const at::Tensor& inv_freq, double gamma,
                              const std::optional<at::Tensor>& positions,
                              at::OptionalIntArrayRef sections);
at::Tensor cmac_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              int64_t end, const std::optional<at::Tensor>& spans,
                              const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                              const std::optional<at::Tensor>& mask, bool causal, bool imd,
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean);
at::Tensor contrastive_logits_cpu(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta);
#ifdef KVFIX_WITH_CUDA
at::Tensor rope_calibrate_cuda(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                               int64_t n, const at::Tensor& inv_freq, double gamma,
                               const std::optional<at::Tensor>& positions,
                               at::OptionalIntArrayRef sections);
at::Tensor cmac_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                               int64_t end, const std::optional<at::Tensor>& spans,
                               const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                               const std::optional<at::Tensor>& mask, bool causal, bool imd,
                               const std::optional<at::Tensor>& imd_items, int64_t value_mean);
at::Tensor contrastive_logits_cuda(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta);
#endif

}  // namespace kvfix
