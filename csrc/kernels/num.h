// float <-> element type conversions shared by the kernels in csrc/kernels (framework-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "view.h"

namespace kvfix::kernels {

// Num<T>::to_f / from_f (round to nearest); bits_to_f reads a 16-bit element from its raw bits.
template <class T>
struct Num;
template <>
struct Num<float> {
  static __host__ __device__ __forceinline__ float to_f(float x) { return x; }
  static __host__ __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct Num<__half> {
  static __host__ __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __host__ __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float bits_to_f(uint16_t bits) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  }
};
template <>
struct Num<__nv_bfloat16> {
  static __host__ __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __host__ __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float bits_to_f(uint16_t bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);  // bf16 is the top half of a float
  }
};

// The kernels' reader of a MaskView (view.h): Mask::at(m, b, h, i, t), or Mask::value<K> with the
// kind tested outside a loop (with_mask_kind).
struct DeviceBits {
  static __device__ __forceinline__ float f16(uint16_t bits) { return Num<__half>::bits_to_f(bits); }
  static __device__ __forceinline__ float bf16(uint16_t bits) { return Num<__nv_bfloat16>::bits_to_f(bits); }
};
using Mask = MaskRead<DeviceBits>;

// V consecutive elements, accessed as one word (16 bytes for V = 16 / sizeof(T): the caller checks
// the alignment, e.g. with aligned16 on the host).
template <class T, int V>
struct alignas(sizeof(T) * V) Elems {
  T e[V];
};
template <class T, int V>
__device__ __forceinline__ Elems<T, V> load_elems(const T* p) {
  return *reinterpret_cast<const Elems<T, V>*>(p);
}
template <class T, int V>
__device__ __forceinline__ void store_elems(T* p, const Elems<T, V>& x) {
  *reinterpret_cast<Elems<T, V>*>(p) = x;
}

// Whether p is 16-byte aligned (host side: may the kernels access it 16 bytes at a time).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Runs f(T{}) with T the element type of a float dtype (float, __half, __nv_bfloat16) and returns
// its cudaError_t; cudaErrorInvalidValue for any other dtype. The one dtype dispatch of the CUDA
// launchers, shared by csrc/cuda/*.cu and the emulator's shims.
template <class F>
cudaError_t dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(float{});
    case DType::kF16: return f(__half{});
    case DType::kBF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvfix::kernels
