// exp for non-positive float32 arguments, shared by the CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvfix::cpu {

// exp(x) for x <= 0 (and -inf), float32, a few ulp; 0 below -87, where float32 leaves its normal
// range (DSCR's cut-off, kvfix/reference.py DSCR_EXP_CUTOFF). Written without calls or branches
// so that the loops using it vectorise (n = round(x / ln2) by adding and subtracting 1.5 * 2^23:
// a floorf call would stop the vectoriser). Callers pass x - max (times a scale > 0) or minus a
// square, <= 0 by construction; the exponent bits below are only valid for n <= 0, so a positive
// argument (only a caller's rounding could make one) counts as 0 instead of giving garbage bits;
// nan stays nan. (SCR once passed x * scale - m * scale, which an FMA contraction leaves off by
// hundreds for logits ~1e10: compute the difference before scaling.)
inline __attribute__((always_inline)) float exp_nonpos(float x) {
  x = x > 0.0f ? 0.0f : x;
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, Cody-Waite split
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace kvfix::cpu
