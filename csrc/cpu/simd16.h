// 16 float32 lanes for the structured DSCR CPU kernels (dscr_factored.cpp, dscr_banded.cpp): GCC
// vector extension, one zmm with AVX-512, two ymm with AVX2 (the kernels are compiled for both
// through target_clones). ld / st take 64-byte aligned pointers (scratch); load_x / store_y access
// K and V (any alignment) in their dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVFIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVFIX_CPU_CLONES
#endif

namespace kvfix {
namespace simd16 {

constexpr int64_t kW = 16;  // float32 lanes of one v16

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
#define KVFIX_AI static inline __attribute__((always_inline))
KVFIX_AI v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
KVFIX_AI void st(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// p[0, kW) as float32.
template <typename T>
KVFIX_AI v16 load_x(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *reinterpret_cast<const v16u*>(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bfloat16 -> float32: the bits shifted up
    return (v16)(__builtin_convertvector(*reinterpret_cast<const u16x16*>(p), u32x16) << 16);
  } else {
    alignas(64) float t[kW];
    for (int64_t l = 0; l < kW; ++l) t[l] = static_cast<float>(p[l]);
    return ld(t);
  }
}

// p[0, kW) = T(v), rounded to nearest even as c10's conversions.
template <typename T>
KVFIX_AI void store_y(T* p, v16 v) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<v16u*>(p) = v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // c10::BFloat16(float), NaN -> 0x7fc0
    const u32x16 b = (u32x16)v;
    const u32x16 r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const i32x16 nan = v != v;
    *reinterpret_cast<u16x16*>(p) = __builtin_convertvector(nan ? u32x16{} + 0x7fc0u : r, u16x16);
  } else {
    alignas(64) float t[kW];
    st(t, v);
    for (int64_t l = 0; l < kW; ++l) p[l] = static_cast<T>(t[l]);
  }
}

}  // namespace simd16
}  // namespace kvfix
