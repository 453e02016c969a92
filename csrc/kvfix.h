// Declarations shared by the op files (csrc/ops/<method>.cpp: schemas, checks, Meta kernels, CPU
// registrations) and the per-device implementations: each method's checks (defined in its op
// file, called by its CPU, CUDA and Meta kernels) and its CPU kernels (csrc/cpu, registered by the
// op file). The CUDA kernels (csrc/cuda/<method>.cu) register themselves and need no declaration.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <vector>

#include "kernels/view.h"

namespace kvfix {

// A broadcast attention mask as every kernel reads it (csrc/kernels/view.h): element (b, h, i, t)
// at data + b*sb + h*sh + i*si + t*st, 0 strides where broadcast; kind 0 none, 1 bool (True =
// attend), 2/3/4 additive float32/float16/bfloat16 (-inf = masked). Built once, by mask_check.
using MaskView = kernels::MaskView;

// The one check of a mask argument: bool or additive float, on q's device, broadcastable (up to
// 4 dims, right-aligned) to `want` ([B, H, Tq, T]; `dims` names them in the message, e.g.
// "B, 1, 1, T"). Returns its view (data null for meta tensors: checks only); kind 0 for None.
MaskView mask_check(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q, const int64_t want[4],
                    const char* dims, const char* hint = "");

// DSCR (METHODS §1). Proximity coefficients, as the kernels use them:
//   wt[i, j] = exp(-coef_d * (d_i - d_j)^2) + exp(-coef_s * |s_i - s_j|^2)
//   coef_d = alpha / (2 sigma_d^2), coef_s = beta / (2 sigma_s^2).
struct DscrCoefs {
  float coef_d;
  float coef_s;
};

// Every check of dscr_refine (keys = {k}, values = {} or {v}, cache = false) and dscr_refine_cache_
// (one tensor per layer, cache = true), stated once (csrc/ops/dscr.cpp) and run by the CPU,
// CUDA and Meta kernels: ValueError / TypeError naming the argument. Returns the coefficients.
// depth: float32 [Bd, N], coords: float32 [Bd, N, 2], both contiguous, Bd in {1, B}.
DscrCoefs dscr_check(const char* op, at::TensorList keys, at::TensorList values, bool cache, const at::Tensor& depth,
                     const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta);
// depth and coords are finite (ValueError otherwise). One host read each: call it once per op
// call, after dscr_check and before anything is written.
void dscr_check_finite(const char* op, const at::Tensor& depth, const at::Tensor& coords);

// Out-of-place refinement: returns {k_hat} or {k_hat, v_hat}.
std::vector<at::Tensor> dscr_refine_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                        const at::Tensor& depth, const at::Tensor& coords,
                                        double sigma_d, double sigma_s, double alpha, double beta);
// In place over several layers' image spans ([B, H, N, D] views of a cache); values may be empty.
void dscr_refine_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                           const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                           double beta);


// ---------------------------------------------------------------------------------------------
// KVSmooth (METHODS §2): row entropy of a single-token query and the fused decoding step.

// Every check of the KVSmooth ops, shared by the CPU, CUDA and Meta kernels (csrc/ops/kvsmooth.cpp).
// q [B, Hq, 1, D], k [B, Hkv, T, D] (Hq % Hkv == 0, T >= 1), v like k or null, queue float32
// [B, M >= 1] or null, mask broadcastable to [B, 1, 1, T]. Returns the mask view the kernels read.
MaskView kvsmooth_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* queue, const std::optional<at::Tensor>& mask);
// The logit scale (default 1 / sqrt(D)); lam_ref in [0, 1] and band >= 0, finite.
float kvsmooth_scale(std::optional<double> scale, int64_t D);
void kvsmooth_check_lam(double lam_ref, double band);

at::Tensor row_entropy_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                           const std::optional<at::Tensor>& mask);
at::Tensor kvsmooth_step_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& queue, std::optional<double> scale,
                             const std::optional<at::Tensor>& mask, double lam_ref, double band);

}  // namespace kvfix

// ---------------------------------------------------------------------------------------------
// Structured DSCR (kvfix/dscr_structured.py): the refinement with factored weights on a gh x gw grid,
//   y = U U^T X + (Lr Rr^T) (x) (Lc Rc^T) X,   out_j = (y_j - 2 x_j) / c_j   (c_j <= 0 or N == 1: keep x_j)
// lr, rr: [gh, pr]; lc, rc: [gw, pc] (float32 contiguous, N = gh * gw); depth: [Bd, N] float32,
// Bd in {1, B}. U [Bd, N, rank_d] is the Taylor factor of exp(-coef_d (d_i - d_j)^2) around the
// midpoint of each item's depth range and c_j = (wt~ 1)_j - 2, both built by the op (float64,
// rounded once to float32) by dscr_depth_factors.
namespace kvfix {

// Every check of dscr_refine_factored (keys = {k}, values = {} or {v}, cache = false) and
// dscr_refine_factored_cache_ (one tensor per layer, cache = true), stated once (csrc/ops/dscr.cpp) and
// run by the CPU, CUDA and Meta kernels: ValueError / TypeError naming the argument. Returns every
// tensor to refine as one flat list (each layer's key, then its value).
std::vector<at::Tensor> dscr_factored_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                               const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d);
// {u [Bd, N, rank_d], cinv [Bd, N]} float32 on depth's device; cinv_j = 1 / c_j, or 0 where the
// token keeps its own key.
std::vector<at::Tensor> dscr_depth_factors_cpu(const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d);

std::vector<at::Tensor> dscr_refine_factored_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                 const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                                 const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                                 int64_t rank_d);
void dscr_refine_factored_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                    const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                    const at::Tensor& rc, double coef_d, int64_t rank_d);
// The banded structure (csrc/cpu/dscr_banded.cpp; kvfix/dscr_structured.py's BandedStructure):
// tok int32 [Bd, N], tokw float32 [Bd, N, C], cnt int32 [Bd], row_ptr int64 [G + 1], row_lo int32
// [G], tvals float32 [nnz], node_off int64 [Bd + 1], cinv float32 [Bd, N], band float32 [K + 1],
// all contiguous on k's device; gh divides N.
struct DscrBanded {
  at::Tensor tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band;
  int64_t gh;
};
// Every check of dscr_refine_banded / dscr_refine_banded_cache_ (as dscr_factored_operands; the
// structure's index values too where it is on the CPU). Returns every tensor to refine.
std::vector<at::Tensor> dscr_banded_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                             const DscrBanded& s);
std::vector<at::Tensor> dscr_refine_banded_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                               const at::Tensor& tok, const at::Tensor& tokw, const at::Tensor& cnt,
                                               const at::Tensor& row_ptr, const at::Tensor& row_lo,
                                               const at::Tensor& tvals, const at::Tensor& node_off,
                                               const at::Tensor& cinv, const at::Tensor& band, int64_t gh);
void dscr_refine_banded_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                  const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                  const at::Tensor& row_lo, const at::Tensor& tvals, const at::Tensor& node_off,
                                  const at::Tensor& cinv, const at::Tensor& band, int64_t gh);


}  // namespace kvfix


// ---------------------------------------------------------------------------------------------
// SCR (METHODS §3): diagnostic attention mass of the image columns and the spatial redistribution.

namespace kvfix {

// Every check of the SCR ops, shared by the CPU, CUDA and Meta kernels (csrc/ops/scr.cpp). q [B, Hq, Tq, D],
// k [B, Hkv, T, D] (same dtype, Hq % Hkv == 0, nothing empty), 0 <= start <= end <= T, causal
// needs Tq <= T, mask broadcastable to [B, Hq, Tq, T]. Returns the mask view the kernels read.
MaskView scr_scores_check(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                         const std::optional<at::Tensor>& mask, bool causal);
// The logit scale (default 1 / sqrt(D)), finite.
float scr_scale(std::optional<double> scale, int64_t D);
// hidden [B, N, C] float (contiguous last dim), scores float32 contiguous [B, N] on hidden's
// device, gh * gw == N, top_k >= 0, lam finite and > 0; scores finite (one host read: SCR runs
// once per image, not per decoded token).
void scr_redistribute_check(const char* op, const at::Tensor& hidden, const at::Tensor& scores, int64_t gh,
                            int64_t gw, int64_t top_k, double lam);

at::Tensor scr_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                          std::optional<double> scale, const std::optional<at::Tensor>& mask, bool causal);
at::Tensor scr_redistribute_cpu(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                int64_t top_k, double lam, bool exclude_border);
void scr_redistribute__cpu(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                           int64_t top_k, double lam, bool exclude_border);

}  // namespace kvfix


// ---------------------------------------------------------------------------------------------
// CMAC (METHODS §4): calibrated image keys, attention with IMD, contrastive logits.

namespace kvfix {

// Every check of the CMAC ops, shared by the CPU, CUDA and Meta kernels (csrc/ops/cmac.cpp).
void cmac_check_rope(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                     int64_t n, const at::Tensor& inv_freq, double gamma, const std::optional<at::Tensor>& positions,
                     at::OptionalIntArrayRef sections);
MaskView cmac_check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
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

}  // namespace kvfix
