// Tensors as the kernels' host-side argument packing sees them (framework-free, no CUDA headers).
//
// Each kernel header packs its launch arguments from `View`s (`<method>_pack` functions), and the
// same packing runs in both callers: csrc/cuda/*.cu fill the views from at::Tensor
// (csrc/cuda/aten_view.h), the SIMT emulator's shims from their ctypes arguments
// (tests/emu/include/kvemu/shim.h). So the strides, sizes and mask views a real launch receives
// are the ones the emulator tests exercise.
//
// MaskView is the one description of a broadcast attention mask: every kernel (and the CPU
// kernels) read element (b, h, i, t) at data + b*sb + h*sh + i*si + t*st, with stride 0 along
// broadcast dimensions.
#pragma once

#include <cstdint>

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
// with stride 0. An absent mask gives kind 0. (Shape and dtype checks are the op's, ops.cpp.)
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

}  // namespace kvfix::kernels
