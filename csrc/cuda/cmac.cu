// CMAC on CUDA (SPEC §4): the ATen side of csrc/kernels/cmac.cuh.
//
// Checks are shared with the CPU path (kvfix::cmac_check_* in ops.cpp; on CUDA they read
// metadata only: per-item spans and IMD flags stay on the device, read by the kernels). Each op is
// one launch on the current stream (cmac_attention with IMD: two, the threshold shares in a small
// workspace from the caching allocator): no host synchronisation, capturable in a CUDA graph.
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <optional>

#include "kernels/cmac.cuh"
#include "kvfix.h"

namespace kvfix {
namespace {

template <class F>
void dispatch(at::ScalarType st, const char* op, const F& f) {
  cudaError_t err;
  switch (st) {
    case at::kFloat: err = f(float{}); break;
    case at::kHalf: err = f(__half{}); break;
    case at::kBFloat16: err = f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

kernels::CmacSpan span_of(int64_t start, int64_t end, const std::optional<at::Tensor>& spans) {
  return {spans.has_value() ? spans->const_data_ptr<int64_t>() : nullptr, start, end};
}

}  // namespace

at::Tensor rope_calibrate_cuda(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                               int64_t n, const at::Tensor& inv_freq, double gamma,
                               const std::optional<at::Tensor>& positions, at::OptionalIntArrayRef sections) {
  cmac_check_rope(k, start, end, spans, n, inv_freq, gamma, positions, sections);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  at::Tensor out = at::empty({B, H, n, D}, k.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(!sections.has_value() || static_cast<int64_t>(sections->size()) <= kernels::kCmacMaxSections,
              "rope_calibrate: at most ", kernels::kCmacMaxSections, " mrope sections on CUDA");
  kernels::CmacRopeArgs a{};
  a.k = k.const_data_ptr();
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.out = out.mutable_data_ptr();
  a.span = span_of(start, end, spans);
  const at::Tensor freq = inv_freq.contiguous();
  a.inv_freq = freq.const_data_ptr<float>();
  const at::Tensor pos = positions.has_value() ? positions->contiguous() : at::Tensor();
  a.pos = pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr;
  a.rows = pos.defined() ? static_cast<int>(pos.size(0)) : 1;
  a.nsec = 1;
  a.sec[0] = 0;
  a.sec[1] = static_cast<int>(D / 2);
  if (sections.has_value()) {
    a.nsec = static_cast<int>(sections->size());
    int acc = 0;
    for (int i = 0; i < a.nsec; ++i) {
      a.sec[i] = acc;
      acc += static_cast<int>((*sections)[i]);
    }
    a.sec[a.nsec] = acc;
  }
  a.c = static_cast<float>(1.0 - 1.0 / gamma);
  a.B = B;
  a.H = H;
  a.T = T;
  a.D = D;
  a.N = n;
  dispatch(k.scalar_type(), "rope_calibrate", [&](auto tag) {
    return kernels::cmac_rope_launch<decltype(tag)>(a, stream_of(k));
  });
  return out;
}

at::Tensor cmac_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                               int64_t end, const std::optional<at::Tensor>& spans,
                               const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                               const std::optional<at::Tensor>& mask, bool causal, bool imd,
                               const std::optional<at::Tensor>& imd_items, int64_t value_mean) {
  const CmacMask mk = cmac_check_attention(q, k, v, start, end, spans, k_cal, mask, imd_items, value_mean);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(D <= kernels::kCmacMaxHeadDim, "cmac_attention: head dim ", D, " is larger than the CUDA kernel's ",
              kernels::kCmacMaxHeadDim);
  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options());
  if (out.numel() == 0) return out;
  kernels::CmacAttnArgs a{};
  a.q = q.const_data_ptr();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_st = q.stride(2);
  a.k = k.const_data_ptr();
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.v = v.const_data_ptr();
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_st = v.stride(2);
  if (k_cal.has_value()) {
    a.kc = k_cal->const_data_ptr();
    a.c_sb = k_cal->stride(0);
    a.c_sh = k_cal->stride(1);
    a.c_st = k_cal->stride(2);
    a.N = k_cal->size(2);
  }
  a.out = out.mutable_data_ptr();
  a.span = span_of(start, end, spans);
  a.mask = mk.data;
  a.mask_kind = mk.kind;
  a.m_sb = mk.sb;
  a.m_sh = mk.sh;
  a.m_si = mk.si;
  a.m_sj = mk.sj;
  a.imd = imd ? 1 : 0;
  a.imd_items = imd && imd_items.has_value() ? imd_items->const_data_ptr<bool>() : nullptr;
  a.vector_mean = value_mean == 1 ? 1 : 0;
  at::Tensor work;
  if (imd) {
    work = at::empty({B * Hkv}, q.options().dtype(at::kFloat));
    a.work = work.mutable_data_ptr<float>();
  }
  a.scale = kvsmooth_scale(scale, D);
  a.causal = causal ? 1 : 0;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.T = T;
  a.D = D;
  dispatch(q.scalar_type(), "cmac_attention", [&](auto tag) {
    return kernels::cmac_attention_launch<decltype(tag)>(a, stream_of(q));
  });
  return out;
}

at::Tensor contrastive_logits_cuda(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta) {
  cmac_check_contrastive(logits, distorted, alpha, beta);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor l = logits.contiguous(), lt = distorted.contiguous();
  at::Tensor out = at::empty(l.sizes(), l.options());
  if (out.numel() == 0) return out;
  kernels::CmacContrastiveArgs a{};
  a.l = l.const_data_ptr();
  a.lt = lt.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.V = l.size(-1);
  a.rows = l.numel() / a.V;
  a.a = static_cast<float>(alpha);
  a.log_beta = static_cast<float>(std::log(beta));
  dispatch(l.scalar_type(), "contrastive_logits", [&](auto tag) {
    return kernels::cmac_contrastive_launch<decltype(tag)>(a, stream_of(l));
  });
  return out;
}

}  // namespace kvfix
