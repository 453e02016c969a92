// exp for non-positive float32 arguments, shared by the CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvfix::cpu {

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always inlined: no vector crosses an ABI
// Eight lanes of the same arithmetic, with GCC vector extensions. The scalar function vectorises
// in some loops but not in others: where it is inlined into a loop that also reduces, GCC's
// if-conversion of its selects can fail and the loop runs scalar with branches (the SCR scores'
// exp pass, CMAC's softmax fold, KVSmooth's fold and the dense DSCR weights were, in the AVX2
// clones). Written on 8 lanes the loop cannot fall back: 32-byte vectors are ymm registers in the
// AVX2 and AVX-512 clones (two SSE registers in the baseline one; 64-byte generic vectors would go
// through the stack on AVX2).
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8u __attribute__((vector_size(32), aligned(4)));  // any float alignment

inline __attribute__((always_inline)) f32x8 load8(const float* p) { return *reinterpret_cast<const f32x8u*>(p); }
inline __attribute__((always_inline)) void store8(float* p, f32x8 v) { *reinterpret_cast<f32x8u*>(p) = v; }
inline __attribute__((always_inline)) f32x8 splat8(float x) { return f32x8{} + x; }

// The lanes' sum, pairwise ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
inline __attribute__((always_inline)) float hsum8(f32x8 v) {
  const float a = (v[0] + v[4]) + (v[2] + v[6]), b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

// The lanes' max (nan lanes skipped).
inline __attribute__((always_inline)) float hmax8(f32x8 v) {
  float r = v[0];
  for (int j = 1; j < 8; ++j) r = v[j] > r ? v[j] : r;
  return r;
}

// 2^n for integral n in [-126, 0] (one lane or eight): the exponent bits.
inline __attribute__((always_inline)) float pow2i(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}
inline __attribute__((always_inline)) f32x8 pow2i(f32x8 n) {
  return (f32x8)((__builtin_convertvector(n, i32x8) + 127) << 23);
}

// exp(x) for x <= 0 (and -inf), float32 (V) or eight of them (f32x8), a few ulp; 0 below -87,
// where float32 leaves its normal range (DSCR's cut-off, kvfix/reference.py DSCR_EXP_CUTOFF).
// Written without calls or branches so that loops using the scalar form can vectorise (n =
// round(x / ln2) by adding and subtracting 1.5 * 2^23: a floorf call would stop the vectoriser).
// Callers pass x - max (times a scale > 0) or minus a square, <= 0 by construction; the exponent
// bits are only valid for n <= 0, so a positive argument (only a caller's rounding could make
// one) counts as 0 instead of giving garbage bits; nan stays nan. (SCR once passed x * scale - m
// * scale, which an FMA contraction leaves off by hundreds for logits ~1e10: compute the
// difference before scaling.)
template <class V>
inline __attribute__((always_inline)) V exp_nonpos(V x) {
  const V zero{}, lo = zero - 87.0f;
  x = x > zero ? zero : x;
  const V xc = x < lo ? lo : x;
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, Cody-Waite split
  V p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return x < lo ? zero : p * pow2i(n);
}

// x[t] = exp_nonpos((x[t] - m) * scale) for t < n, in place (times 1.0f is exact: scale 1 gives
// exp(x - m)); returns their sum (8 lanes, then the tail). The softmax rows of SCR's scores and
// CMAC's fold.
inline __attribute__((always_inline)) float exp_sum(float* x, int64_t n, float m, float scale) {
  const f32x8 mv = splat8(m), sv = splat8(scale);
  f32x8 lv{};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const f32x8 e = exp_nonpos((load8(x + t) - mv) * sv);
    store8(x + t, e);
    lv += e;
  }
  float l = hsum8(lv);
  for (; t < n; ++t) {
    const float e = exp_nonpos((x[t] - m) * scale);
    x[t] = e;
    l += e;
  }
  return l;
}
#pragma GCC diagnostic pop

}  // namespace kvfix::cpu
