// Structured DSCR on CUDA: the ATen side of csrc/kernels/dscr_lowrank.cuh.
//
// Per tensor (each layer's K, then V): pass 1 kernel (row reductions Z1 = Rc^T X[a] and the
// per-row depth sums P_a = U_a^T X[a]), then library GEMMs on the small intermediates
// (Z3 = Lr (Rr^T Z1), P = sum_a P_a: O(gh pr pc D) and O(gh rd D) per head, next to O(N (pc + rd) D)
// of the passes), then the pass 2 kernel that writes the output once. The depth factor U and
// the column sums are built here with ATen ops in float64 (O(N rd) per item, no host sync), as
// the CPU op builds them (csrc/cpu/dscr_lowrank.cpp). In place is safe: pass 1 has read every
// token of a tensor before pass 2 (same stream) writes it, and pass 2 reads x[i, d] in the
// thread that then writes it. Everything runs on the current stream; no host synchronisation.
#include "kernels/dscr_lowrank.cuh"

template cudaError_t kvfix::kernels::dscr_lowrank_launch<float>(const kvfix::kernels::DscrLowrankArgs&,
                                                                cudaStream_t);
template cudaError_t kvfix::kernels::dscr_lowrank_launch<__half>(const kvfix::kernels::DscrLowrankArgs&,
                                                                 cudaStream_t);
template cudaError_t kvfix::kernels::dscr_lowrank_launch<__nv_bfloat16>(const kvfix::kernels::DscrLowrankArgs&,
                                                                        cudaStream_t);

#ifndef __CUDA_ARCH__

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cumprod.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "aten_view.h"
#include "ops/dscr.h"

namespace kvfix {
namespace {

// {u [Bd, N, r], cinv [Bd, N]} float32, as dscr_depth_factors_cpu computes them (float64 here too).
std::vector<at::Tensor> depth_factors(const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                      const at::Tensor& lc, const at::Tensor& rc, double coef_d, int64_t rank_d) {
  const int64_t N = depth.size(1);
  const at::Tensor d = depth.to(at::kDouble);
  const auto mm = at::aminmax(d, 1, /*keepdim=*/true);
  const at::Tensor x = d - (std::get<0>(mm) + std::get<1>(mm)) * 0.5;          // [Bd, N]
  // u[:, :, n] = exp(-c x^2) prod_{m <= n} (sqrt(2c) x / sqrt(m)): a cumulative product.
  const at::Tensor m = at::arange(rank_d, d.options());                        // [r]
  at::Tensor step = (x.unsqueeze(-1) * std::sqrt(2.0 * coef_d)) / at::sqrt(m.clamp_min(1.0));
  step.select(-1, 0).fill_(1.0);
  const at::Tensor u = at::exp(x * x * -coef_d).unsqueeze(-1) * at::cumprod(step, -1);  // [Bd, N, r]
  const at::Tensor srow = at::matmul(lr.to(at::kDouble), rr.to(at::kDouble).sum(0));  // [gh]
  const at::Tensor scol = at::matmul(lc.to(at::kDouble), rc.to(at::kDouble).sum(0));  // [gw]
  const at::Tensor spatial = (srow.unsqueeze(1) * scol.unsqueeze(0)).reshape({1, N});
  const at::Tensor c = spatial + at::matmul(u, u.sum(1).unsqueeze(-1)).squeeze(-1) - 2.0;
  at::Tensor cinv = at::where(c > 0, c.reciprocal(), at::zeros_like(c));
  if (N == 1) cinv.zero_();
  return {u.to(at::kFloat).contiguous(), cinv.to(at::kFloat).contiguous()};
}

void refine_one(const at::Tensor& x, const at::Tensor& out, const at::Tensor& lr, const at::Tensor& rr,
                const at::Tensor& lc, const at::Tensor& rc, const at::Tensor& u, const at::Tensor& cinv) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3), gh = lr.size(0);
  const int64_t pc = lc.size(1), rd = u.size(2);
  if (x.numel() == 0) return;
  const auto opts = x.options().dtype(at::kFloat);
  const at::Tensor z1 = at::empty({B, H, gh, pc, D}, opts);
  const at::Tensor pa = at::empty({B, H, gh, rd, D}, opts);
  const kernels::View ov = out_view_of(out);  // first: in place, out is x (materialised if copy-on-write)
  kernels::DscrLowrankArgs a =
      kernels::dscr_lowrank_pack(view_of(x), ov, gh, view_of(rc), view_of(lc), view_of(u), view_of(cinv));
  a.z1 = z1.mutable_data_ptr<float>();
  a.pa = pa.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(x);
  auto run = [&](int stage) {
    a.stage = stage;
    check_launch("dscr_refine_lowrank", kernels::dispatch_float(kernel_dtype(x.scalar_type()), [&](auto tag) {
                   return kernels::dscr_lowrank_launch<decltype(tag)>(a, stream);
                 }));
  };
  run(1);
  // Z3[b, h] = Lr (Rr^T Z1[b, h]) over the row axis (Z1 viewed as [gh, pc * D]); P = sum_a P_a.
  const at::Tensor z2 = at::matmul(rr.t(), z1.view({B, H, gh, pc * D}));     // [B, H, pr, pc D]
  const at::Tensor z3 = at::matmul(lr, z2).contiguous();                       // [B, H, gh, pc D]
  const at::Tensor pd = pa.sum(2).contiguous();                                // [B, H, rd, D]
  a.z3 = z3.const_data_ptr<float>();
  a.pd = pd.const_data_ptr<float>();
  run(2);
}

void refine_all(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const at::Tensor& depth,
                const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc, const at::Tensor& rc,
                double coef_d, int64_t rank_d) {
  if (srcs[0].size(2) == 0) return;
  const c10::cuda::CUDAGuard guard(srcs[0].device());
  const auto uc = depth_factors(depth, lr, rr, lc, rc, coef_d, rank_d);
  for (size_t p = 0; p < srcs.size(); ++p) refine_one(srcs[p], dsts[p], lr, rr, lc, rc, uc[0], uc[1]);
}

}  // namespace

std::vector<at::Tensor> dscr_refine_lowrank_cuda(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                 const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                                 const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                                 int64_t rank_d) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs =
      dscr_lowrank_operands("dscr_refine_lowrank", {k}, vs, false, depth, lr, rr, lc, rc, coef_d, rank_d);
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs) outs.push_back(at::empty(s.sizes(), s.options()));
  refine_all(srcs, outs, depth, lr, rr, lc, rc, coef_d, rank_d);
  return outs;
}

void dscr_refine_lowrank_cache_cuda(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                    const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                    const at::Tensor& rc, double coef_d, int64_t rank_d) {
  const std::vector<at::Tensor> all =
      dscr_lowrank_operands("dscr_refine_lowrank_cache_", keys, values, true, depth, lr, rr, lc, rc, coef_d, rank_d);
  refine_all(all, all, depth, lr, rr, lc, rc, coef_d, rank_d);
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine_lowrank", &kvfix::dscr_refine_lowrank_cuda);
  m.impl("dscr_refine_lowrank_cache_", &kvfix::dscr_refine_lowrank_cache_checked<&kvfix::dscr_refine_lowrank_cache_cuda>);
}

#endif  // !__CUDA_ARCH__
