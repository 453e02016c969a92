// at::Tensor -> kernels::View (csrc/kernels/view.h), and the launch helpers every csrc/cuda/*.cu
// shares: the kernels' argument packing then runs on the same views the emulator tests.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <optional>

#include "kernels/view.h"

namespace kvfix {

inline kernels::DType kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return kernels::DType::kF32;
    case at::kHalf: return kernels::DType::kF16;
    case at::kBFloat16: return kernels::DType::kBF16;
    case at::kBool: return kernels::DType::kBool;
    case at::kLong: return kernels::DType::kI64;
    case at::kByte: return kernels::DType::kU8;
    default: return kernels::DType::kOther;
  }
}

// A tensor the kernel only reads. (The kernels take `const void*` for inputs; View holds void*.)
inline kernels::View view_of(const at::Tensor& t) {
  kernels::View v;
  TORCH_CHECK(t.dim() <= 8, "kvfix: tensors of more than 8 dims are not supported, got ", t.dim());
  v.data = const_cast<void*>(t.const_data_ptr());
  v.dtype = kernel_dtype(t.scalar_type());
  v.ndim = static_cast<int>(t.dim());
  for (int i = 0; i < v.ndim; ++i) {
    v.sizes[i] = t.size(i);
    v.strides[i] = t.stride(i);
  }
  return v;
}

// A tensor the kernel writes (an output or an in-place target): mutable_data_ptr, so that a
// copy-on-write tensor is materialised before the kernel writes it.
inline kernels::View out_view_of(const at::Tensor& t) {
  kernels::View v = view_of(t);
  v.data = t.mutable_data_ptr();
  return v;
}

inline kernels::View view_of(const std::optional<at::Tensor>& t) { return t.has_value() ? view_of(*t) : kernels::View{}; }

// SMs of a device (a runtime attribute query, no synchronisation), cached per device.
inline int sm_count(int device) {
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

inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// A launcher's status as an error naming the op.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace kvfix
