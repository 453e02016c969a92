// KVSmooth's signatures: its checks (defined in csrc/ops/kvsmooth.cpp), its CPU kernels
// (csrc/cpu/kvsmooth.cpp) and kvsmooth_step_'s registrations (csrc/ops/kvsmooth.cpp: CPU;
// csrc/cuda/kvsmooth.cu: CUDA): the aliasing check (ops/common.h), then the device's kernel.
#pragma once

#include <ATen/core/List.h>

#include <optional>
#include <vector>

#include "ops/common.h"

namespace kvfix {

// KVSmooth (METHODS §2): row entropy of a single-token query and the fused decoding step.

// Every check of the KVSmooth ops, shared by the CPU, CUDA and Meta kernels (csrc/ops/kvsmooth.cpp).
// q [B, Hq, 1, D], k [B, Hkv, T, D] (Hq % Hkv == 0, T >= 1), v like k or null, queue float32
// [B, M >= 1] or null, mask broadcastable to [B, 1, 1, T]. Returns the mask view the kernels read.
MaskView kvsmooth_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* queue, const std::optional<at::Tensor>& mask);
// lam_ref in [0, 1] and band >= 0, finite (the logit scale: kvsmooth_scale, ops/common.h).
void kvsmooth_check_lam(double lam_ref, double band);
// kvsmooth_step_'s position (the current token's cache position, read by the kernel from the
// device): one int64 on q's device. Metadata only: its value is the kernel's to check.
void kvsmooth_check_position(const std::optional<at::Tensor>& position, const at::Tensor& q);

at::Tensor row_entropy_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                           const std::optional<at::Tensor>& mask);

// kvsmooth_step_ on a device: every check (the aliasing check of ops/common.h and kvsmooth_check
// and friends), then its step (kvsmooth_step_cpu or kvsmooth_step_cuda, below).
template <auto Impl>
at::Tensor kvsmooth_step_checked(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& queue, std::optional<double> scale,
                                 const std::optional<at::Tensor>& mask, double lam_ref, double band,
                                 const std::optional<at::Tensor>& position) {
  check_no_overlap("kvsmooth_step_", {{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"queue", &queue}},
                   {{"q", &q}, {"mask", mask.has_value() ? &*mask : nullptr},
                    {"position", position.has_value() ? &*position : nullptr}});
  kvsmooth_check_lam(lam_ref, band);
  const MaskView m = kvsmooth_check("kvsmooth_step_", q, k_cache, &v_cache, &queue, mask);
  kvsmooth_check_position(position, q);
  return Impl(q, k_cache, v_cache, queue, kvsmooth_scale(scale, q.size(3)), m, lam_ref, band, position);
}

// The step of one layer after its checks (m: the mask's view, scale: the logit scale); returns
// lam [B] float32.
at::Tensor kvsmooth_step_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& queue, float scale, const MaskView& m, double lam_ref, double band,
                             const std::optional<at::Tensor>& position);
at::Tensor kvsmooth_step_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& queue, float scale, const MaskView& m, double lam_ref, double band,
                              const std::optional<at::Tensor>& position);

// kvsmooth_steps_: several layers' steps in one call (kvfix.hf.KVSmooth issues one per decoded
// token). Every layer is checked (kvsmooth_check, its scale, one batch size and device for all), then the
// aliasing check over all layers' operands, before any layer is written; returns the layers' mask
// views (one per layer, L >= 1).
std::vector<MaskView> kvsmooth_steps_check(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache,
                                           at::TensorList queue, at::ArrayRef<double> scale,
                                           const c10::List<std::optional<at::Tensor>>& mask, double lam_ref,
                                           double band);

// kvsmooth_steps_ on either device: the checks (kvsmooth_steps_check), then Impl(q, k_cache, v_cache,
// queue, scales (each layer's logit scale), masks, lam_ref, band, lam) with lam [L, B] float32, each
// layer writing its row; returns lam.
template <auto Impl>
at::Tensor kvsmooth_steps_checked(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache,
                                  at::TensorList queue, at::ArrayRef<double> scale,
                                  const c10::List<std::optional<at::Tensor>>& mask, double lam_ref, double band) {
  const std::vector<MaskView> masks = kvsmooth_steps_check(q, k_cache, v_cache, queue, scale, mask, lam_ref, band);
  std::vector<float> scales(masks.size());
  for (size_t i = 0; i < masks.size(); ++i) scales[i] = kvsmooth_scale(scale[i], q[i].size(3));
  at::Tensor lam = at::empty({static_cast<int64_t>(masks.size()), q[0].size(0)}, q[0].options().dtype(at::kFloat));
  Impl(q, k_cache, v_cache, queue, scales, masks, lam_ref, band, lam);
  return lam;
}

// The steps after their checks: on the CPU each layer's step in order (checked once); on CUDA
// (csrc/cuda/kvsmooth.cu) the layers' steps launched together.
void kvsmooth_steps_cpu(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache, at::TensorList queue,
                        const std::vector<float>& scales, const std::vector<MaskView>& masks, double lam_ref,
                        double band, at::Tensor& lam);
void kvsmooth_steps_cuda(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache, at::TensorList queue,
                         const std::vector<float>& scales, const std::vector<MaskView>& masks, double lam_ref,
                         double band, at::Tensor& lam);

}  // namespace kvfix
