// SCR on CUDA (SPEC §3): the ATen side of csrc/kernels/scr.cuh.
//
// Checks are shared with the CPU path (kvfix::scr_scores_check and friends in ops.cpp).
// scr_scores is three launches on the current stream with a workspace from the caching allocator
// (B * Hq * (2 Tq + N) floats) and reads nothing back. scr_redistribute checks that the scores are
// finite (one host read: it runs once per image), then launches the selection and the apply kernels
// with a [B, N] byte workspace for the source flags.
//
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "kernels/scr.cuh"
#include "kvfix.h"

namespace kvfix {
namespace {

template <class Args>
void dispatch(const char* op, at::ScalarType st, const Args& a, cudaStream_t stream,
              cudaError_t (*f32)(const Args&, cudaStream_t), cudaError_t (*f16)(const Args&, cudaStream_t),
              cudaError_t (*bf16)(const Args&, cudaStream_t)) {
  cudaError_t err;
  switch (st) {
    case at::kFloat:
      err = f32(a, stream);
      break;
    case at::kHalf:
      err = f16(a, stream);
      break;
    case at::kBFloat16:
      err = bf16(a, stream);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void run_redistribute(const char* op, const at::Tensor& hidden, const at::Tensor& scores, void* out, int64_t o_sb,
                      int64_t o_sn, int64_t gh, int64_t gw, int64_t top_k, double lam, bool exclude_border,
                      bool in_place) {
  at::Tensor flags = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kByte));
  kernels::ScrRedistributeArgs a{};
  a.hidden = hidden.const_data_ptr();
  a.h_sb = hidden.stride(0);
  a.h_sn = hidden.stride(1);
  a.out = out;
  a.o_sb = o_sb;
  a.o_sn = o_sn;
  a.scores = scores.const_data_ptr<float>();
  a.flags = flags.mutable_data_ptr<uint8_t>();
  a.B = hidden.size(0);
  a.N = hidden.size(1);
  a.C = hidden.size(2);
  a.gh = gh;
  a.gw = gw;
  a.top_k = top_k;
  a.lam = static_cast<float>(lam);
  a.exclude_border = exclude_border;
  a.in_place = in_place;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  dispatch(op, hidden.scalar_type(), a, stream, &kernels::scr_redistribute_launch<float>,
           &kernels::scr_redistribute_launch<__half>, &kernels::scr_redistribute_launch<__nv_bfloat16>);
}

}  // namespace

at::Tensor scr_scores_cuda(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t end,
                           std::optional<double> scale, const std::optional<at::Tensor>& mask, bool causal) {
  const ScrMask m = scr_scores_check(q, k, start, end, mask, causal);
  const float sc = scr_scale(scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), end - start}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  kernels::ScrScoresArgs a{};
  a.q = q.const_data_ptr();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_si = q.stride(2);
  a.k = k.const_data_ptr();
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.mask = m.data;
  a.mask_kind = m.kind;
  a.m_sb = m.sb;
  a.m_sh = m.sh;
  a.m_si = m.si;
  a.m_st = m.st;
  a.scores = out.mutable_data_ptr<float>();
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Hkv = k.size(1);
  a.Tq = q.size(2);
  a.T = k.size(2);
  a.D = q.size(3);
  a.start = start;
  a.N = end - start;
  a.scale = sc;
  a.causal = causal;
  TORCH_CHECK(a.Hq <= 65535 && a.B <= 65535, "scr_scores: the CUDA kernels take at most 65535 heads and items");
  at::Tensor work = at::empty({kernels::scr_scores_workspace_floats(a)}, q.options().dtype(at::kFloat));
  a.work = work.mutable_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  dispatch("scr_scores", q.scalar_type(), a, stream, &kernels::scr_scores_launch<float>,
           &kernels::scr_scores_launch<__half>, &kernels::scr_scores_launch<__nv_bfloat16>);
  return out;
}

at::Tensor scr_redistribute_cuda(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                 int64_t top_k, double lam, bool exclude_border) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  scr_redistribute_check("scr_redistribute", hidden, scores, gh, gw, top_k, lam);
  TORCH_CHECK(hidden.size(0) <= 65535, "scr_redistribute: the CUDA kernels take at most 65535 items");
  at::Tensor out = at::empty(hidden.sizes(), hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  run_redistribute("scr_redistribute", hidden, scores, out.mutable_data_ptr(), out.stride(0), out.stride(1), gh, gw,
                   top_k, lam, exclude_border, false);
  return out;
}

void scr_redistribute__cuda(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                            int64_t top_k, double lam, bool exclude_border) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  scr_redistribute_check("scr_redistribute_", hidden, scores, gh, gw, top_k, lam);
  TORCH_CHECK(hidden.size(0) <= 65535, "scr_redistribute_: the CUDA kernels take at most 65535 items");
  if (hidden.numel() == 0) return;
  run_redistribute("scr_redistribute_", hidden, scores, hidden.mutable_data_ptr(), hidden.stride(0), hidden.stride(1),
                   gh, gw, top_k, lam, exclude_border, true);
}

}  // namespace kvfix
