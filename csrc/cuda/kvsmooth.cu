// KVSmooth on CUDA (SPEC §2): the ATen side of csrc/kernels/kvsmooth.cuh.
//
// Checks are shared with the CPU path (kvfix::kvsmooth_check and friends in ops.cpp; they read
// metadata only). Each call is two launches on the current stream with a small workspace from the
// caching allocator (B * Hq * splits * 3 floats): no host synchronisation and no value read back,
// so a decode step can be captured in a CUDA graph. The number of position splits depends on the
// shapes and the device's SM count only (cached device properties, no sync).
//
// Includes are kept to what is used: no torch/extension.h or ATen/ATen.h (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <optional>

#include "kernels/kvsmooth.cuh"
#include "kvfix.h"

namespace kvfix {
namespace {

// SMs of a device (a runtime attribute query, no synchronisation), cached per device.
int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 1;
  }
  if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

void launch(kernels::KvsmoothArgs& a, const at::Tensor& q) {
  const int sms = sm_count(q.device().index());
  a.splits = kernels::kvsmooth_splits(a.B, a.Hkv, a.T, sms);
  at::Tensor work = at::empty({kernels::kvsmooth_workspace_floats(a)}, q.options().dtype(at::kFloat));
  a.work = work.mutable_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err;
  switch (q.scalar_type()) {
    case at::kFloat:
      err = kernels::kvsmooth_launch<float>(a, stream);
      break;
    case at::kHalf:
      err = kernels::kvsmooth_launch<__half>(a, stream);
      break;
    case at::kBFloat16:
      err = kernels::kvsmooth_launch<__nv_bfloat16>(a, stream);
      break;
    default:
      TORCH_CHECK(false, "kvsmooth: unsupported dtype ", q.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "kvsmooth: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

kernels::KvsmoothArgs args_of(const at::Tensor& q, const at::Tensor& k, const KvsMask& m, float scale) {
  // (the one statement of this limit: the Python wrapper no longer repeats it)
  TORCH_CHECK_VALUE(q.size(3) <= kernels::kKvsmoothMaxHeadDim, "kvsmooth: q head dim ", q.size(3),
                    " is larger than the CUDA kernel's ", kernels::kKvsmoothMaxHeadDim);
  kernels::KvsmoothArgs a{};
  a.q = q.const_data_ptr();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k = const_cast<void*>(k.const_data_ptr());
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.mask = m.data;
  a.mask_kind = m.kind;
  a.m_sb = m.sb;
  a.m_st = m.st;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.T = k.size(2);
  a.scale = scale;
  return a;
}

}  // namespace

at::Tensor row_entropy_cuda(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                            const std::optional<at::Tensor>& mask) {
  const KvsMask m = kvsmooth_check("row_entropy", q, k, nullptr, nullptr, mask);
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
                              const at::Tensor& queue, std::optional<double> scale,
                              const std::optional<at::Tensor>& mask, double lam_ref, double band) {
  kvsmooth_check_lam(lam_ref, band);
  const KvsMask m = kvsmooth_check("kvsmooth_step_", q, k_cache, &v_cache, &queue, mask);
  const float sc = kvsmooth_scale(scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lam = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0) return lam;
  kernels::KvsmoothArgs a = args_of(q, k_cache, m, sc);
  a.k = k_cache.mutable_data_ptr();
  a.v = v_cache.mutable_data_ptr();
  a.v_sb = v_cache.stride(0);
  a.v_sh = v_cache.stride(1);
  a.v_st = v_cache.stride(2);
  a.queue = queue.mutable_data_ptr<float>();
  a.qu_sb = queue.stride(0);
  a.qu_sm = queue.stride(1);
  a.M = queue.size(1);
  a.lam = lam.mutable_data_ptr<float>();
  a.lam_lo = static_cast<float>(lam_ref - band);
  a.lam_hi = static_cast<float>(lam_ref + band);
  launch(a, q);
  return lam;
}

}  // namespace kvfix
