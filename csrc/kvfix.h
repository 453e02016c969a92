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

}  // namespace kvfix
