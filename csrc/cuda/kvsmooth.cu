// KVSmooth on CUDA (METHODS §2): the ATen side of csrc/kernels/kvsmooth.cuh.
//
// Checks are shared with the CPU path (kvfix::kvsmooth_check and friends in csrc/ops/kvsmooth.cpp; they read
// metadata only). Each call is two launches on the current stream with a small workspace from the
// caching allocator (B * Hq * splits * 3 floats): no host synchronisation and no value read back,
// so a decode step can be captured in a CUDA graph. The number of position splits depends on the
// shapes and the device's SM count only (cached device properties, no sync).
//
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "aten_view.h"
#include "kernels/kvsmooth.cuh"
#include "ops/kvsmooth.h"

namespace kvfix {
namespace {

void launch(kernels::KvsmoothArgs& a, const at::Tensor& q) {
  at::Tensor work = at::empty({kernels::kvsmooth_workspace_floats(a)}, q.options().dtype(at::kFloat));
  a.work = work.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(q);
  check_launch("kvsmooth", kernels::dispatch_float(kernel_dtype(q.scalar_type()), [&](auto tag) {
                 return kernels::kvsmooth_launch<decltype(tag)>(a, stream);
               }));
}

kernels::KvsmoothArgs args_of(const at::Tensor& q, const at::Tensor& k, const MaskView& m, float scale) {
  // (the one statement of this limit: the Python wrapper no longer repeats it)
  TORCH_CHECK_VALUE(q.size(3) <= kernels::kKvsmoothMaxHeadDim, "kvsmooth: q head dim ", q.size(3),
                    " is larger than the CUDA kernel's ", kernels::kKvsmoothMaxHeadDim);
  const int64_t splits = kernels::kvsmooth_splits(q.size(0), k.size(1), k.size(2), sm_count(q.device().index()));
  return kernels::kvsmooth_pack(view_of(q), view_of(k), m, scale, splits);
}

}  // namespace

at::Tensor row_entropy_cuda(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                            const std::optional<at::Tensor>& mask) {
  const MaskView m = kvsmooth_check("row_entropy", q, k, nullptr, nullptr, mask);
  const float sc = kvsmooth_scale(scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  kernels::KvsmoothArgs a = args_of(q, k, m, sc);
  a.entropy = out.mutable_data_ptr<float>();
  launch(a, q);
  return out;
}

void kvsmooth_step_cuda_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& queue, std::optional<double> scale,
                             const std::optional<at::Tensor>& mask, double lam_ref, double band,
                             const std::optional<at::Tensor>& position, at::Tensor& lam) {
  kvsmooth_check_lam(lam_ref, band);
  const MaskView m = kvsmooth_check("kvsmooth_step_", q, k_cache, &v_cache, &queue, mask);
  kvsmooth_check_position(position, q);
  const float sc = kvsmooth_scale(scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  if (!lam.defined()) lam = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0) return;
  kernels::KvsmoothArgs a = args_of(q, k_cache, m, sc);
  a.k = k_cache.mutable_data_ptr();  // the step writes position T - 1 (or `position`) of both caches
  kernels::kvsmooth_pack_step(a, out_view_of(v_cache), out_view_of(queue), lam.mutable_data_ptr<float>(),
                              static_cast<float>(lam_ref - band), static_cast<float>(lam_ref + band),
                              position.has_value() ? position->const_data_ptr<int64_t>() : nullptr);
  launch(a, q);
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("row_entropy", &kvfix::row_entropy_cuda);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_checked<&kvfix::kvsmooth_step_cuda_into>);
  m.impl("kvsmooth_steps_", &kvfix::kvsmooth_steps_checked<&kvfix::kvsmooth_step_cuda_into>);
}
