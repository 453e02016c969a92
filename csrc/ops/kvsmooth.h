// kvsmooth_step_'s registrations (csrc/ops/kvsmooth.cpp: CPU; csrc/cuda/kvsmooth.cu: CUDA): the aliasing
// check (ops/common.h), then the device's kernel.
#pragma once

#include "ops/common.h"

namespace kvfix {

template <auto Impl>
at::Tensor kvsmooth_step_checked(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& queue, std::optional<double> scale,
                                 const std::optional<at::Tensor>& mask, double lam_ref, double band) {
  check_no_overlap("kvsmooth_step_", {{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"queue", &queue}},
                   {{"q", &q}, {"mask", mask.has_value() ? &*mask : nullptr}});
  return Impl(q, k_cache, v_cache, queue, scale, mask, lam_ref, band);
}

}  // namespace kvfix
