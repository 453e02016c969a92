// CMAC's signatures: its checks (defined in csrc/ops/cmac.cpp, run by the CPU, CUDA and Meta kernels)
// and its CPU kernels (csrc/cpu/cmac.cpp, registered by csrc/ops/cmac.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "ops/common.h"

namespace kvfix {

// CMAC (METHODS §4): calibrated image keys, attention with IMD, contrastive logits.

// Every check of the CMAC ops, shared by the CPU, CUDA and Meta kernels (csrc/ops/cmac.cpp).
void cmac_check_rope(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                     int64_t n, const at::Tensor& inv_freq, double gamma, const std::optional<at::Tensor>& positions,
                     at::OptionalIntArrayRef sections);
MaskView cmac_check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              int64_t end, const std::optional<at::Tensor>& spans,
                              const std::optional<at::Tensor>& k_cal, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                              const std::optional<at::Tensor>& k_cal_mean);
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
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                              const std::optional<at::Tensor>& k_cal_mean);
at::Tensor contrastive_logits_cpu(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta);

}  // namespace kvfix
