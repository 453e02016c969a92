// scr_redistribute_'s registrations (csrc/ops/scr.cpp: CPU; csrc/cuda/scr.cu: CUDA): the aliasing check
// (ops/common.h), then the device's kernel.
#pragma once

#include "ops/common.h"

namespace kvfix {

template <auto Impl>
void scr_redistribute__checked(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                               int64_t top_k, double lam, bool exclude_border) {
  check_no_overlap("scr_redistribute_", {{"hidden", &hidden}}, {{"scores", &scores}});
  Impl(hidden, scores, gh, gw, top_k, lam, exclude_border);
}

}  // namespace kvfix
