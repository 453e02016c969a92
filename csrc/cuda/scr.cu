// SCR on CUDA (METHODS §3): the ATen side of csrc/kernels/scr.cuh.
//
// Checks are shared with the CPU path (kvfix::scr_scores_check and friends in csrc/ops/scr.cpp).
// scr_scores is three launches on the current stream with a workspace from the caching allocator
// (B * Hq * (2 Tq + N) floats) and reads nothing back. scr_redistribute reads nothing back either
// (an item with non-finite scores is written nan by the kernels); it launches the selection and the
// apply kernels with a [B, N] byte workspace for the source flags.
//
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "aten_view.h"
#include "kernels/scr.cuh"
#include "ops/scr.h"

namespace kvfix {
namespace {

void run_redistribute(const char* op, const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& out,
                      int64_t gh, int64_t gw, int64_t top_k, double lam, bool exclude_border, bool in_place) {
  at::Tensor flags = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kByte));
  const kernels::View ov = out_view_of(out);  // first: in place, out is hidden (materialised if copy-on-write)
  kernels::ScrRedistributeArgs a = kernels::scr_redistribute_pack(view_of(hidden), ov, view_of(scores), gh, gw, top_k,
                                                                  static_cast<float>(lam), exclude_border, in_place);
  a.flags = flags.mutable_data_ptr<uint8_t>();
  const cudaStream_t stream = stream_of(hidden);
  check_launch(op, kernels::dispatch_float(kernel_dtype(hidden.scalar_type()), [&](auto tag) {
                 return kernels::scr_redistribute_launch<decltype(tag)>(a, stream);
               }));
}

}  // namespace

at::Tensor scr_scores_cuda(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                           std::optional<double> scale, const std::optional<at::Tensor>& mask, bool causal) {
  const MaskView m = scr_scores_check(q, k, start, end, mask, causal);
  const float sc = scr_scale(scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), end - start}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  kernels::ScrScoresArgs a = kernels::scr_scores_pack(view_of(q), view_of(k), m, out_view_of(out), start, sc,
                                                       causal);
  TORCH_CHECK(a.Hq <= 65535 && a.B <= 65535, "scr_scores: the CUDA kernels take at most 65535 heads and items");
  at::Tensor work = at::empty({kernels::scr_scores_workspace_floats(a)}, q.options().dtype(at::kFloat));
  a.work = work.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(q);
  check_launch("scr_scores", kernels::dispatch_float(kernel_dtype(q.scalar_type()), [&](auto tag) {
                 return kernels::scr_scores_launch<decltype(tag)>(a, stream);
               }));
  return out;
}

at::Tensor scr_redistribute_cuda(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                 int64_t top_k, double lam, bool exclude_border) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  scr_redistribute_check("scr_redistribute", hidden, scores, gh, gw, top_k, lam);
  TORCH_CHECK(hidden.size(0) <= 65535, "scr_redistribute: the CUDA kernels take at most 65535 items");
  at::Tensor out = at::empty(hidden.sizes(), hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  run_redistribute("scr_redistribute", hidden, scores, out, gh, gw, top_k, lam, exclude_border, false);
  return out;
}

void scr_redistribute__cuda(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                            int64_t top_k, double lam, bool exclude_border) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  scr_redistribute_check("scr_redistribute_", hidden, scores, gh, gw, top_k, lam);
  TORCH_CHECK(hidden.size(0) <= 65535, "scr_redistribute_: the CUDA kernels take at most 65535 items");
  if (hidden.numel() == 0) return;
  run_redistribute("scr_redistribute_", hidden, scores, hidden, gh, gw, top_k, lam, exclude_border, true);
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("scr_scores", &kvfix::scr_scores_cuda);
  m.impl("scr_redistribute", &kvfix::scr_redistribute_cuda);
  m.impl("scr_redistribute_", &kvfix::scr_redistribute__checked<&kvfix::scr_redistribute__cuda>);
}
