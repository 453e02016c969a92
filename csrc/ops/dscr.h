// DSCR's signatures: its checks (defined in csrc/ops/dscr.cpp, run by the CPU, CUDA and Meta kernels),
// its CPU kernels (csrc/cpu/dscr*.cpp, registered by csrc/ops/dscr.cpp) and its in-place registrations
// (csrc/ops/dscr.cpp: CPU; csrc/cuda/dscr*.cu: CUDA): the aliasing check (ops/common.h), then the
// device's kernel. The CUDA kernels register themselves and need no declaration.
#pragma once

#include <optional>
#include <vector>

#include "ops/common.h"

namespace kvfix {

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
// depth and coords are finite (ValueError otherwise). One read each: the CPU kernels call it once
// per op call, after dscr_check and before anything is written. The CUDA kernels do not (no host
// sync): csrc/kernels/dscr.cuh writes nan over every output of an item whose geometry is not finite.
void dscr_check_finite(const char* op, const at::Tensor& depth, const at::Tensor& coords);

// Out-of-place refinement: returns {k_hat} or {k_hat, v_hat}.
std::vector<at::Tensor> dscr_refine_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                        const at::Tensor& depth, const at::Tensor& coords,
                                        double sigma_d, double sigma_s, double alpha, double beta);
// In place over several layers' image spans ([B, H, N, D] views of a cache); values may be empty.
void dscr_refine_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                           const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                           double beta);

// Structured DSCR (kvfix/dscr_structured.py): the refinement with low-rank weights on a gh x gw grid,
//   y = U U^T X + (Lr Rr^T) (x) (Lc Rc^T) X,   out_j = (y_j - 2 x_j) / c_j   (c_j <= 0 or N == 1: keep x_j)
// lr, rr: [gh, pr]; lc, rc: [gw, pc] (float32 contiguous, N = gh * gw); depth: [Bd, N] float32,
// Bd in {1, B}. U [Bd, N, rank_d] is the Taylor factor of exp(-coef_d (d_i - d_j)^2) around the
// midpoint of each item's depth range and c_j = (wt~ 1)_j - 2, both built by the op (float64,
// rounded once to float32) by dscr_depth_factors.
// Every check of dscr_refine_lowrank (keys = {k}, values = {} or {v}, cache = false) and
// dscr_refine_lowrank_cache_ (one tensor per layer, cache = true), stated once (csrc/ops/dscr.cpp) and
// run by the CPU, CUDA and Meta kernels: ValueError / TypeError naming the argument. Returns every
// tensor to refine as one flat list (each layer's key, then its value).
std::vector<at::Tensor> dscr_lowrank_operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                              const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                              const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                              int64_t rank_d);
// {u [Bd, N, rank_d], cinv [Bd, N]} float32 on depth's device; cinv_j = 1 / c_j, or 0 where the
// token keeps its own key.
std::vector<at::Tensor> dscr_depth_factors_cpu(const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d);

std::vector<at::Tensor> dscr_refine_lowrank_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                                const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                                int64_t rank_d);
void dscr_refine_lowrank_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
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
// Every check of dscr_refine_banded / dscr_refine_banded_cache_ (as dscr_lowrank_operands; the
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

template <auto Impl>
void dscr_refine_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                               const at::Tensor& coords, double sigma_d, double sigma_s, double alpha, double beta) {
  check_no_overlap("dscr_refine_cache_", layer_refs(keys, values), {{"depth", &depth}, {"coords", &coords}});
  Impl(keys, values, depth, coords, sigma_d, sigma_s, alpha, beta);
}

template <auto Impl>
void dscr_refine_lowrank_cache_checked(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                       const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                       const at::Tensor& rc, double coef_d, int64_t rank_d) {
  check_no_overlap("dscr_refine_lowrank_cache_", layer_refs(keys, values),
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
