// SCR's signatures: its checks (defined in csrc/ops/scr.cpp), its CPU kernels (csrc/cpu/scr.cpp) and
// scr_redistribute_'s registrations (csrc/ops/scr.cpp: CPU; csrc/cuda/scr.cu: CUDA): the aliasing
// check (ops/common.h), then the device's kernel.
#pragma once

#include <optional>
#include <vector>

#include "ops/common.h"

namespace kvfix {

// SCR (METHODS §3): diagnostic attention mass of the image columns and the spatial redistribution.

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

template <auto Impl>
void scr_redistribute__checked(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                               int64_t top_k, double lam, bool exclude_border) {
  check_no_overlap("scr_redistribute_", {{"hidden", &hidden}}, {{"scores", &scores}});
  Impl(hidden, scores, gh, gw, top_k, lam, exclude_border);
}

}  // namespace kvfix
