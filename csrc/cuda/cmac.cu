// CMAC on CUDA (METHODS §4): the ATen side of csrc/kernels/cmac.cuh.
//
// Checks are shared with the CPU and Meta kernels (kvfix::cmac_check_* in csrc/ops/cmac.cpp; on CUDA they
// read metadata only: per-item spans and IMD flags stay on the device, read by the kernels); the
// CUDA kernels' own limits (head dim, mrope sections) are checked here. Each op is one launch on
// the current stream, except cmac_attention: with IMD a threshold kernel first (none for decode
// with a caller-held mean image key, k_calibrated_mean), and for a single query row (decode) a
// split kernel and a merge (csrc/kernels/cmac.cuh), with their partials in a
// workspace from the caching allocator: no host synchronisation, capturable in a CUDA graph.
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "aten_view.h"
#include "kernels/cmac.cuh"
#include "kernels/cmac_prefill_tc.cuh"
#include "ops/cmac.h"

namespace kvfix {
namespace {

kernels::CmacSpan span_of(int64_t start, int64_t end, const std::optional<at::Tensor>& spans) {
  return {spans.has_value() ? spans->const_data_ptr<int64_t>() : nullptr, start, end};
}

}  // namespace

at::Tensor rope_calibrate_cuda(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                               int64_t n, const at::Tensor& inv_freq, double gamma,
                               const std::optional<at::Tensor>& positions, at::OptionalIntArrayRef sections) {
  cmac_check_rope(k, start, end, spans, n, inv_freq, gamma, positions, sections);
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor out = at::empty({k.size(0), k.size(1), n, k.size(3)}, k.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(!sections.has_value() || static_cast<int64_t>(sections->size()) <= kernels::kCmacMaxSections,
                    "rope_calibrate: mrope_section has ", sections.has_value() ? sections->size() : 0,
                    " sections, the CUDA kernel takes at most ", kernels::kCmacMaxSections);
  const at::Tensor freq = inv_freq.contiguous();
  const at::Tensor pos = positions.has_value() ? positions->contiguous() : at::Tensor();
  const kernels::CmacRopeArgs a = kernels::cmac_rope_pack(
      view_of(k), out_view_of(out), span_of(start, end, spans), freq.const_data_ptr<float>(),
      pos.defined() ? view_of(pos) : kernels::View{}, sections.has_value() ? sections->data() : nullptr,
      sections.has_value() ? static_cast<int>(sections->size()) : 0, static_cast<float>(1.0 - 1.0 / gamma));
  const cudaStream_t stream = stream_of(k);
  check_launch("rope_calibrate", kernels::dispatch_float(kernel_dtype(k.scalar_type()), [&](auto tag) {
                 return kernels::cmac_rope_launch<decltype(tag)>(a, stream);
               }));
  return out;
}

at::Tensor cmac_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                               int64_t end, const std::optional<at::Tensor>& spans,
                               const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                               const std::optional<at::Tensor>& mask, bool causal, bool imd,
                               const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                               const std::optional<at::Tensor>& k_cal_mean) {
  const MaskView mk =
      cmac_check_attention(q, k, v, start, end, spans, k_cal, mask, imd_items, value_mean, k_cal_mean);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  // The CUDA kernel keeps a row's accumulators in registers: heads up to kCmacMaxHeadDim (stated there).
  TORCH_CHECK_VALUE(D <= kernels::kCmacMaxHeadDim, "cmac_attention: q head dim ", D,
                    " is larger than the CUDA kernel's ", kernels::kCmacMaxHeadDim);
  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options());
  if (out.numel() == 0) return out;
  // decode (one query row): the keys split across blocks, about 4 per SM (cmac_attention_splits)
  const int splits = Tq == 1 ? kernels::cmac_attention_splits(B, Hq, k.size(2), sm_count(q.device().index())) : 1;
  kernels::CmacAttnArgs a = kernels::cmac_attention_pack(
      view_of(q), view_of(k), view_of(v), view_of(k_cal), out_view_of(out), span_of(start, end, spans), mk,
      imd ? 1 : 0, imd && imd_items.has_value() ? imd_items->const_data_ptr<bool>() : nullptr, value_mean == 1 ? 1 : 0,
      kvsmooth_scale(scale, D), causal ? 1 : 0, splits);
  // a caller-held mean image key: decode launches no threshold kernel, prefill's reads no keys
  kernels::cmac_attention_set_key_mean(a, k_cal_mean.has_value() ? k_cal_mean->const_data_ptr<float>() : nullptr);
  at::Tensor work;
  if (const int64_t floats = kernels::cmac_attention_workspace_floats(a); floats > 0) {
    work = at::empty({floats}, q.options().dtype(at::kFloat));
    a.work = work.mutable_data_ptr<float>();
  }
  const cudaStream_t stream = stream_of(q);
  // prefill (Tq > 1) in fp16 / bf16 with D <= 128: the tensor-core kernel (cmac_prefill_tc.cuh); else cmac.cuh's
  check_launch("cmac_attention", kernels::dispatch_float(kernel_dtype(q.scalar_type()), [&](auto tag) {
                 return kernels::cmac_attention_dispatch<decltype(tag)>(a, stream);
               }));
  return out;
}

at::Tensor contrastive_logits_cuda(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta) {
  cmac_check_contrastive(logits, distorted, alpha, beta);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor l = logits.contiguous(), lt = distorted.contiguous();
  at::Tensor out = at::empty(l.sizes(), l.options());
  if (out.numel() == 0) return out;
  kernels::CmacContrastiveArgs a = kernels::cmac_contrastive_pack(
      view_of(l), view_of(lt), out_view_of(out), static_cast<float>(alpha), static_cast<float>(std::log(beta)));
  const at::Tensor part = at::empty({kernels::cmac_contrastive_workspace_floats(a)}, l.options().dtype(at::kFloat));
  a.part = part.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(l);
  check_launch("contrastive_logits", kernels::dispatch_float(kernel_dtype(l.scalar_type()), [&](auto tag) {
                 return kernels::cmac_contrastive_launch<decltype(tag)>(a, stream);
               }));
  return out;
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("rope_calibrate", &kvfix::rope_calibrate_cuda);
  m.impl("cmac_attention", &kvfix::cmac_attention_cuda);
  m.impl("contrastive_logits", &kvfix::contrastive_logits_cuda);
}
