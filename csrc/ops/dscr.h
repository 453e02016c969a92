// DSCR's in-place registrations (csrc/ops/dscr.cpp: CPU; csrc/cuda/dscr*.cu: CUDA): the aliasing check
// (ops/common.h), then the device's kernel.
#pragma once

#include "ops/common.h"

namespace kvfix {

template <auto Impl>
void dscr_refine_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                               const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta) {
  check_no_overlap("dscr_refine_cache_", layer_refs(keys, values), {{"depth", &depth}, {"coords", &coords}});
  Impl(keys, values, depth, coords, sigma_d, sigma_s, alpha, beta);
}

template <auto Impl>
void dscr_refine_factored_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                        const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                        const at::Tensor& rc, double coef_d, int64_t rank_d) {
  check_no_overlap("dscr_refine_factored_cache_", layer_refs(keys, values),
                   {{"depth", &depth}, {"lr", &lr}, {"rr", &rr}, {"lc", &lc}, {"rc", &rc}});
  Impl(keys, values, depth, lr, rr, lc, rc, coef_d, rank_d);
}

template <auto Impl>
void dscr_refine_banded_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                      const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                      const at::Tensor& row_lo, const at::Tensor& tvals, const at::Tensor& node_off,
                                      const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  check_no_overlap("dscr_refine_banded_cache_", layer_refs(keys, values),
                   {{"tok", &tok}, {"tokw", &tokw}, {"cnt", &cnt}, {"row_ptr", &row_ptr}, {"row_lo", &row_lo},
                    {"tvals", &tvals}, {"node_off", &node_off}, {"cinv", &cinv}, {"band", &band}});
  Impl(keys, values, tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh);
}

}  // namespace kvfix
