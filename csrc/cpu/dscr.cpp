// DSCR on the CPU (METHODS §1).
//
// k_hat[j] = sum_i w[i, j] k[i] with w the column-normalised proximity matrix. The weights are
// built kBlockCols columns at a time (vectorised, parallel over columns) as rows of a
// [cols, N] block -- w is symmetric before normalisation, so column j of w is row j of the
// block -- and each block multiplies K and V of every head with one batched GEMM (BLAS /
// oneDNN through at::bmm_out) written straight into the output rows. In dscr_refine the whole
// N x N matrix never exists: memory is O(kBlockCols * N) beyond inputs and outputs. The in-place
// multi-layer op builds the rows once and keeps them (N x N floats per geometry item, when that
// fits kSharedWeightBytes) so that every layer and head shares one computation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/exp_nonpos.h"
#include "ops/dscr.h"

#include "cpu/simd.h"

// The 8-lane helpers (cpu/exp_nonpos.h) are always inlined into the target clones: no vector
// crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kvfix {
namespace {

constexpr int64_t kBlockCols = 384;                      // at most this many columns of w at a time
constexpr int64_t kCacheGroupBytes = int64_t(64) << 20;   // source copies per in-place group
constexpr int64_t kSharedWeightBytes = int64_t(64) << 20;  // in-place op: weights kept for all groups

// Rows j in [j0, j1) of the block `w` (row j at w + (j - j0) * N): w[j][i] = wt(i, j) / c_j with
// the diagonal masked. A column with c_j == 0 (N == 1, underflow) becomes the unit row e_j, so
// the GEMM returns k[j] unchanged, as METHODS §1 asks.
KVFIX_CPU_CLONES void weight_rows(const float* d, const float* sy, const float* sx, int64_t N,
                                  int64_t j0, int64_t j1, float cd, float cs, float* w) {
  for (int64_t j = j0; j < j1; ++j) {
    float* row = w + (j - j0) * N;
    const float dj = d[j], yj = sy[j], xj = sx[j];
    auto wt = [&](auto di, auto yi, auto xi) __attribute__((always_inline)) {  // one lane or 8, the same arithmetic
      const auto dd = di - dj, dy = yi - yj, dx = xi - xj;
      return cpu::exp_nonpos(-cd * (dd * dd)) + cpu::exp_nonpos(-cs * (dy * dy + dx * dx));
    };
    int64_t i = 0;
    for (; i + 8 <= N; i += 8)  // 8 lanes (csrc/cpu/exp_nonpos.h: this loop had compiled scalar)
      cpu::store8(row + i, wt(cpu::load8(d + i), cpu::load8(sy + i), cpu::load8(sx + i)));
    for (; i < N; ++i) row[i] = wt(d[i], sy[i], sx[i]);
    row[j] = 0.0f;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < N; ++i) sum += row[i];
    if (sum > 0.0f) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) row[i] /= sum;
    } else {
      row[j] = 1.0f;
    }
  }
}

// Rows [j0, j0 + nj) of the normalised weights of geometry item bd into w (row stride N),
// parallel over rows.
void fill_rows(const at::Tensor& depth, const at::Tensor& coords, int64_t bd, int64_t j0, int64_t nj,
               DscrCoefs c, std::vector<float>& sy, std::vector<float>& sx, float* w) {
  const int64_t N = depth.size(1);
  const float* d = depth.data_ptr<float>() + bd * N;
  const float* s = coords.data_ptr<float>() + bd * N * 2;
  for (int64_t i = 0; i < N; ++i) {
    sy[i] = s[2 * i];
    sx[i] = s[2 * i + 1];
  }
  at::parallel_for(j0, j0 + nj, 8, [&](int64_t a, int64_t e) {
    weight_rows(d, sy.data(), sx.data(), N, a, e, c.coef_d, c.coef_s, w + (a - j0) * N);
  });
}

// dsts[p] = refine(srcs[p]) for every pair p; all [B, H_p, N, D_p] with the same B and N, last dim
// contiguous. dsts must not overlap srcs. depth [Bd, N], coords [Bd, N, 2] float32 contiguous.
// `shared`, if defined, holds every weight row already ([Bd, N, N] float32, from fill_rows), so
// several calls share one computation; otherwise the rows are built a block at a time.
void refine(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts,
            const at::Tensor& depth, const at::Tensor& coords, DscrCoefs c,
            const at::Tensor& shared = at::Tensor()) {
  if (srcs.empty()) return;
  const int64_t B = srcs[0].size(0), N = srcs[0].size(2);
  if (B == 0 || N == 0) return;
  const int64_t Bd = depth.size(0);
  // Equal blocks (576 -> 2 x 288, not 384 + 192): a thin last block is an inefficient GEMM.
  const int64_t cols = (N + (N + kBlockCols - 1) / kBlockCols - 1) / ((N + kBlockCols - 1) / kBlockCols);

  at::Tensor w32 = shared.defined() ? at::Tensor() : at::empty({cols, N}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor w16, wbf;  // the block in the GEMM dtype, for low-precision inputs
  for (const auto& s : srcs) {
    if (s.scalar_type() == at::kHalf && !w16.defined()) w16 = at::empty({cols, N}, at::TensorOptions().dtype(at::kHalf));
    if (s.scalar_type() == at::kBFloat16 && !wbf.defined()) wbf = at::empty({cols, N}, at::TensorOptions().dtype(at::kBFloat16));
  }
  std::vector<float> sy(N), sx(N);

  for (int64_t bd = 0; bd < Bd; ++bd) {
    // Broadcast depth/coords: one block of weights serves every batch item.
    const int64_t b_begin = Bd == 1 ? 0 : bd, b_end = Bd == 1 ? B : bd + 1;
    for (int64_t j0 = 0; j0 < N; j0 += cols) {
      const int64_t nj = std::min(cols, N - j0);
      if (!shared.defined()) fill_rows(depth, coords, bd, j0, nj, c, sy, sx, w32.data_ptr<float>());
      const at::Tensor wf = shared.defined() ? shared.select(0, bd).narrow(0, j0, nj) : w32.narrow(0, 0, nj);
      const at::Tensor wh = w16.defined() ? w16.narrow(0, 0, nj).copy_(wf) : at::Tensor();
      const at::Tensor wb16 = wbf.defined() ? wbf.narrow(0, 0, nj).copy_(wf) : at::Tensor();
      for (int64_t b = b_begin; b < b_end; ++b) {
        for (size_t p = 0; p < srcs.size(); ++p) {
          const at::Tensor src = srcs[p].select(0, b);  // [H, N, D]
          if (src.numel() == 0) continue;
          const auto st = src.scalar_type();
          const at::Tensor& wb = st == at::kHalf ? wh : st == at::kBFloat16 ? wb16 : wf;
          at::Tensor out = dsts[p].select(0, b).narrow(1, j0, nj);
          at::bmm_out(out, wb.expand({src.size(0), nj, N}), src);
        }
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> dscr_refine_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                        const at::Tensor& depth, const at::Tensor& coords,
                                        double sigma_d, double sigma_s, double alpha, double beta) {
  std::vector<at::Tensor> srcs{k}, outs;
  if (v.has_value()) srcs.push_back(*v);
  const DscrCoefs c = dscr_check("dscr_refine", {k}, at::TensorList(srcs).slice(1), false, depth, coords, sigma_d,
                                 sigma_s, alpha, beta);
  dscr_check_finite("dscr_refine", depth, coords);
  for (const at::Tensor& x : srcs) outs.push_back(at::empty(x.sizes(), x.options()));
  if (k.size(2) == 0) return outs;
  refine(srcs, outs, depth, coords, c);
  return outs;
}

void dscr_refine_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                           const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                           double beta) {
  const DscrCoefs c = dscr_check("dscr_refine_cache_", keys, values, true, depth, coords, sigma_d, sigma_s, alpha,
                                 beta);
  std::vector<at::Tensor> all;
  for (size_t l = 0; l < keys.size(); ++l) {
    all.push_back(keys[l]);
    if (!values.empty()) all.push_back(values[l]);
  }
  dscr_check_finite("dscr_refine_cache_", depth, coords);
  // The weights depend only on the geometry: build them once for every layer and head when they
  // fit kSharedWeightBytes (N <= 2896 for one image: every realistic grid), else once per group.
  at::Tensor shared;
  const int64_t Bd = depth.size(0), N = depth.size(1);
  if (N > 0 && Bd * N * N * int64_t(sizeof(float)) <= kSharedWeightBytes) {
    shared = at::empty({Bd, N, N}, depth.options());
    std::vector<float> sy(N), sx(N);
    for (int64_t bd = 0; bd < Bd; ++bd) {
      fill_rows(depth, coords, bd, 0, N, c, sy, sx, shared.select(0, bd).data_ptr<float>());
    }
  }
  // The refinement reads every source token for every output token, so each group of tensors
  // is copied first; groups are bounded in bytes.
  size_t start = 0;
  while (start < all.size()) {
    size_t end = start;
    int64_t bytes = 0;
    do {
      bytes += all[end].numel() * all[end].element_size();
      ++end;
    } while (end < all.size() && bytes + all[end].numel() * all[end].element_size() <= kCacheGroupBytes);
    std::vector<at::Tensor> srcs, dsts;
    for (size_t p = start; p < end; ++p) {
      srcs.push_back(all[p].clone(at::MemoryFormat::Contiguous));
      dsts.push_back(all[p]);
    }
    refine(srcs, dsts, depth, coords, c, shared);
    start = end;
  }
}

}  // namespace kvfix
