// KVSmooth on CUDA (METHODS §2): the ATen side of csrc/kernels/kvsmooth.cuh.
//
// Checks are shared with the CPU path (kvfix::kvsmooth_check and friends in csrc/ops/kvsmooth.cpp; they read
// metadata only). Each call is two launches on the current stream (kvsmooth_steps_: two per run of
// up to 64 consecutive layers of one shape) with a small workspace from the caching allocator
// (B * Hq * splits * 3 floats per layer): no host synchronisation and no value read back,
// so a decode step can be captured in a CUDA graph. The number of position splits depends on the
// shapes and the device's SM count only (cached device properties, no sync).
//
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

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

at::Tensor kvsmooth_step_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& queue, float sc, const MaskView& m, double lam_ref, double band,
                              const std::optional<at::Tensor>& position) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lam = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0) return lam;
  kernels::KvsmoothArgs a = args_of(q, k_cache, m, sc);
  a.k = k_cache.mutable_data_ptr();  // the step writes position T - 1 (or `position`) of both caches
  kernels::kvsmooth_pack_step(a, out_view_of(v_cache), out_view_of(queue), lam.mutable_data_ptr<float>(),
                              static_cast<float>(lam_ref - band), static_cast<float>(lam_ref + band),
                              position.has_value() ? position->const_data_ptr<int64_t>() : nullptr);
  launch(a, q);
  return lam;
}

void kvsmooth_steps_cuda(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache, at::TensorList queue,
                         const std::vector<float>& scales, const std::vector<MaskView>& masks, double lam_ref,
                         double band, at::Tensor& lam) {
  const int64_t L = lam.size(0), B = lam.size(1);
  const c10::cuda::CUDAGuard guard(q[0].device());
  if (B == 0) return;
  std::vector<kernels::KvsmoothArgs> args(static_cast<size_t>(L));
  float* lam_p = lam.mutable_data_ptr<float>();
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK_VALUE(q[i].size(3) <= kernels::kKvsmoothMaxHeadDim, "kvsmooth_steps_: layer ", i, ": q head dim ",
                      q[i].size(3), " is larger than the CUDA kernel's ", kernels::kKvsmoothMaxHeadDim);
    kernels::KvsmoothArgs& a = args[i];
    a = args_of(q[i], k_cache[i], masks[i], scales[i]);
    a.k = k_cache[i].mutable_data_ptr();
    kernels::kvsmooth_pack_step(a, out_view_of(v_cache[i]), out_view_of(queue[i]), lam_p + i * B,
                                static_cast<float>(lam_ref - band), static_cast<float>(lam_ref + band), nullptr);
  }
  at::Tensor work = at::empty({kernels::kvsmooth_steps_workspace_floats(args.data(), L)},
                              q[0].options().dtype(at::kFloat));
  float* w = work.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(q[0]);
  for (int64_t i0 = 0; i0 < L;) {  // runs of one dtype: consecutive layers of one shape share launches
    int64_t n = 1;
    while (i0 + n < L && q[i0 + n].scalar_type() == q[i0].scalar_type()) ++n;
    check_launch("kvsmooth_steps_", kernels::dispatch_float(kernel_dtype(q[i0].scalar_type()), [&](auto tag) {
                   return kernels::kvsmooth_steps_launch<decltype(tag)>(args.data() + i0, n, w, stream);
                 }));
    w += kernels::kvsmooth_steps_workspace_floats(args.data() + i0, n);
    i0 += n;
  }
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("row_entropy", &kvfix::row_entropy_cuda);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_checked<&kvfix::kvsmooth_step_cuda>);
  m.impl("kvsmooth_steps_", &kvfix::kvsmooth_steps_checked<&kvfix::kvsmooth_steps_cuda>);
}
