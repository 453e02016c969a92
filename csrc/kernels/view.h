// Tensors as the kernels' host-side argument packing sees them (framework-free, no CUDA headers).
//
// Each kernel header packs its launch arguments from `View`s (`<method>_pack` functions), and the
// same packing runs in both callers: csrc/cuda/*.cu fill the views from at::Tensor
// (csrc/cuda/aten_view.h), the SIMT emulator's shims from their ctypes arguments
// (tests/emu/include/kvemu/shim.h). So the strides, sizes and mask views a real launch receives
// are the ones the emulator tests exercise.
//
// MaskView is the one description of a broadcast attention mask, and MaskRead the one way to read
// it: every kernel (and the CPU kernels) read element (b, h, i, t) at
// data + b*sb + h*sh + i*si + t*st (stride 0 along broadcast dimensions) as an additive bias.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

// The mask reader below: device code under nvcc (the .cu files' host code never reads a mask),
// host code (always inlined: the CPU kernels call it from functions compiled per target,
// csrc/cpu/simd.h) for the host compiler and the SIMT emulator.
#ifdef __CUDACC__
#define KVFIX_MASK_FN __device__ __forceinline__
#elif defined(__GNUC__)
#define KVFIX_MASK_FN inline __attribute__((always_inline))
#else
#define KVFIX_MASK_FN inline
#endif

namespace kvfix::kernels {

enum class DType : int32_t { kF32, kF16, kBF16, kBool, kI64, kU8, kOther };

struct View {
  void* data = nullptr;
  DType dtype = DType::kOther;
  int ndim = 0;  // 0: an absent optional tensor
  int64_t sizes[8] = {};
  int64_t strides[8] = {};  // in elements

  bool present() const { return ndim > 0; }
  int64_t size(int d) const { return sizes[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
};

// Mask kinds the kernels read: 0 none, 1 bool (true = attend), 2/3/4 additive float32/float16/bfloat16.
inline int mask_kind_of(DType t) {
  switch (t) {
    case DType::kBool: return 1;
    case DType::kF32: return 2;
    case DType::kF16: return 3;
    case DType::kBF16: return 4;
    default: return -1;
  }
}

struct MaskView {
  const void* data = nullptr;
  int kind = 0;  // mask_kind_of; 0: no mask
  int64_t sb = 0, sh = 0, si = 0, st = 0;
};

// The view of a mask of up to 4 dims, right-aligned to [B, H, Tq, T]; size-1 (broadcast) dims read
// with stride 0. An absent mask gives kind 0. (Shape and dtype checks are the op's, csrc/ops/common.cpp: mask_check.)
inline MaskView mask_view(const View& m) {
  MaskView v;
  if (!m.present()) return v;
  int64_t s[4] = {0, 0, 0, 0};
  for (int i = 0; i < m.ndim && i < 4; ++i) {
    const int d = 4 - m.ndim + i;
    s[d] = m.sizes[i] == 1 ? 0 : m.strides[i];
  }
  v.data = m.data;
  v.kind = mask_kind_of(m.dtype);
  v.sb = s[0];
  v.sh = s[1];
  v.si = s[2];
  v.st = s[3];
  return v;
}

// Calls f(std::integral_constant<int, K>{}) with K = kind (0..4; any other value reads as 4), so a
// loop over a row of the mask can test the kind once, outside the loop (MaskRead::value<K>).
template <class F>
KVFIX_MASK_FN decltype(auto) with_mask_kind(int kind, F&& f) {
  switch (kind) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Reading a MaskView as an additive bias: 0 without a mask, 0 / -inf for bool true / false, an
// additive mask's value as float (-inf: the key takes no part; nan and +inf are passed on).
// Bits converts the raw bits of a float16 / bfloat16 element to float (static f16 / bf16): the
// CUDA kernels' kernels::Mask (num.h) and the CPU kernels' (csrc/cpu/mask.h) differ only in it.
template <class Bits>
struct MaskRead {
  // The element at offset `off` (offset below) of a mask of kind K.
  template <int K>
  static KVFIX_MASK_FN float value(const void* data, int64_t off) {
    if constexpr (K == 0) {
      return 0.0f;
    } else if constexpr (K == 1) {
      return static_cast<const bool*>(data)[off] ? 0.0f : -INFINITY;
    } else if constexpr (K == 2) {
      return static_cast<const float*>(data)[off];
    } else if constexpr (K == 3) {
      return Bits::f16(static_cast<const uint16_t*>(data)[off]);
    } else {
      return Bits::bf16(static_cast<const uint16_t*>(data)[off]);
    }
  }

  static KVFIX_MASK_FN int64_t offset(const MaskView& m, int64_t b, int64_t h, int64_t i, int64_t t) {
    return b * m.sb + h * m.sh + i * m.si + t * m.st;
  }

  // Element (b, h, i, t).
  static KVFIX_MASK_FN float at(const MaskView& m, int64_t b, int64_t h, int64_t i, int64_t t) {
    if (m.kind == 0) return 0.0f;
    const int64_t off = offset(m, b, h, i, t);
    switch (m.kind) {
      case 1: return value<1>(m.data, off);
      case 2: return value<2>(m.data, off);
      case 3: return value<3>(m.data, off);
      default: return value<4>(m.data, off);
    }
  }
};

}  // namespace kvfix::kernels
