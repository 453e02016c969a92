// The CPU kernels' reader of a MaskView (csrc/kernels/view.h), with c10's float16 / bfloat16
// conversions: Mask::at(m, b, h, i, t), or Mask::value<K> with the kind tested outside a loop
// (kernels::with_mask_kind).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "kernels/view.h"

namespace kvfix {

struct C10Bits {
  static KVFIX_MASK_FN float f16(uint16_t bits) {
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
  static KVFIX_MASK_FN float bf16(uint16_t bits) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
};
using Mask = kernels::MaskRead<C10Bits>;

}  // namespace kvfix
