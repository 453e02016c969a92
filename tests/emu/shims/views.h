// kvemu ctypes arguments -> kvfix::kernels::View (csrc/kernels/view.h): the shims hand the kernels'
// own argument packing (`<method>_pack` in each kernel header) the views csrc/cuda/*.cu build from
// at::Tensor, so that packing is what the emulator tests run.
#pragma once

#include <kvemu/shim.h>

#include "kernels/view.h"

namespace kvemu::shim {

inline kvfix::kernels::DType kernel_dtype(DType t) {
  switch (t) {
    case kF32: return kvfix::kernels::DType::kF32;
    case kF16: return kvfix::kernels::DType::kF16;
    case kBF16: return kvfix::kernels::DType::kBF16;
    case kBool: return kvfix::kernels::DType::kBool;
    case kI64: return kvfix::kernels::DType::kI64;
    case kU8: return kvfix::kernels::DType::kU8;
    default: return kvfix::kernels::DType::kOther;
  }
}

// Argument i as a view; None gives an absent view (ndim 0).
inline kvfix::kernels::View view(const Args& args, int i) {
  kvfix::kernels::View v;
  if (args.none(i)) return v;
  const kvemu_arg& t = args.tensor(i);
  v.data = t.data;
  v.dtype = kernel_dtype(static_cast<DType>(t.dtype));
  v.ndim = t.ndim;
  for (int d = 0; d < t.ndim && d < 8; ++d) {
    v.sizes[d] = t.sizes[d];
    v.strides[d] = t.strides[d];
  }
  return v;
}

// A mask argument (bool or additive float32/float16/bfloat16, or None) as the kernels read it.
inline kvfix::kernels::MaskView mask_arg(const Args& args, int i) {
  const kvfix::kernels::MaskView m = kvfix::kernels::mask_view(view(args, i));
  if (m.kind < 0) throw ArgError("mask must be bool or float32/float16/bfloat16");
  return m;
}

}  // namespace kvemu::shim
