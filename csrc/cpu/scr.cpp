// SCR on the CPU (METHODS §3): diagnostic attention mass of the image columns and the spatial
// redistribution of the visual tokens' hidden states.
//
// scr_scores: work items are (b, query head) pairs, run by at::parallel_for. An item walks its Tq
// query rows in blocks of R rows (R * T fp32 logits per thread, at most kBlockBytes, R <= 64):
//   1. logits = q_rows k^T: one ATen GEMM (at::mm_out, BLAS) per block, over the key columns the
//      block can see (causal: up to the last row's position), into the thread's block buffer;
//   2. per row, in place: x = logit * scale + mask (-inf where the key takes no part), the row
//      max m, e = exp(x - m) and l = sum e (8-lane exp, csrc/cpu/exp_nonpos.h);
//   3. per row: acc[j] += e[start + j] / l over the image columns.
// So the logits are computed once and never leave the thread's block; nothing [Tq, T] is kept per
// head. float16 / bfloat16 inputs are widened to float32 once per call (one fp32 copy of q and k).
// The per-item sums acc [B * Hq, N] are averaged over heads in a fixed order: deterministic.
//
// scr_redistribute: per batch item, the sources (top_k scores among the candidates, ties to the
// lower index: std::nth_element with a total order) as a flag per patch; then every row of the
// output is written once (parallel over rows): a source is h / lam, a non-source with source
// neighbours is h + (lam - 1) * sum of the neighbours' original rows (fp32, neighbours in a fixed
// order: row-major over the 3 x 3 window), any other row is copied. The in-place variant first
// copies the source rows aside (at most top_k rows per item) and then writes only the changed rows.
// (Staging fp32 copies of the sources for the out-of-place op too, to convert each source row once
// instead of once per neighbour, measured slower at 24 x 24, C = 4096.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/exp_nonpos.h"
#include "cpu/mask.h"
#include "ops/scr.h"

// The vector-typed helpers below are always inlined into the target clones: no vector crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "cpu/simd.h"

namespace kvfix {
namespace {

constexpr int64_t kMaxRows = 64;                 // query rows per block
constexpr int64_t kBlockBytes = int64_t(1) << 20;  // fp32 logits of one block, per thread
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// x[t] = x[t] * scale + mask(b, h, i, t) for t < n, -inf where the key takes no part.
KVFIX_INLINE void scale_and_mask(float* x, int64_t n, float scale, const MaskView& m, int64_t b, int64_t h,
                                     int64_t i) {
  const int64_t off = Mask::offset(m, b, h, i, 0), st = m.st;
  kernels::with_mask_kind(m.kind, [&](auto kind) {
    constexpr int K = decltype(kind)::value;
    if constexpr (K == 0) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) x[t] *= scale;
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const float v = Mask::value<K>(m.data, off + t * st);
        x[t] = v == kNegInf ? kNegInf : x[t] * scale + v;
      }
    }
  });
}

// Max of x[0, n) (-inf when empty; NaNs are skipped, and propagate through the exp pass), on
// 32-byte vectors (`#pragma omp simd reduction(max)` over std::max stays scalar in GCC: a serial
// vmaxss chain, which made the max pass cost more than the exp pass).
KVFIX_INLINE float row_max(const float* x, int64_t n) {
  using cpu::f32x8;
  const f32x8 lowest = cpu::splat8(kNegInf);
  f32x8 m[4] = {lowest, lowest, lowest, lowest};
  int64_t t = 0;
  for (; t + 32 <= n; t += 32)
    for (int i = 0; i < 4; ++i) {
      const f32x8 a = cpu::load8(x + t + 8 * i);
      m[i] = a > m[i] ? a : m[i];
    }
  for (; t + 8 <= n; t += 8) {
    const f32x8 a = cpu::load8(x + t);
    m[0] = a > m[0] ? a : m[0];
  }
  m[0] = m[1] > m[0] ? m[1] : m[0];
  m[2] = m[3] > m[2] ? m[3] : m[2];
  m[0] = m[2] > m[0] ? m[2] : m[0];
  float r = cpu::hmax8(m[0]);
  for (; t < n; ++t) r = x[t] > r ? x[t] : r;
  return r;
}

// A row without a softmax (a nan or +inf logit): nan in every image column.
KVFIX_INLINE void poison(int64_t start, int64_t end, float* acc) {
  for (int64_t t = start; t < end; ++t) acc[t - start] = std::numeric_limits<float>::quiet_NaN();
}

// One row of logits x[0, n) (scaled and masked): adds its softmax probabilities of columns
// [start, end) to acc. The row's exponentials are left in x. Non-finite rule (that of softmax and
// the reference): a nan or +inf logit (nan / inf in q, k or an additive mask) makes the row's
// probabilities nan in every image column, also columns a causal row cannot see; a row whose keys
// all take no part contributes 0.
KVFIX_INLINE void row_mass(float* x, int64_t n, int64_t start, int64_t end, float* acc) {
  const float m = row_max(x, n);
  if (!(m > kNegInf)) {  // no key takes part (the row contributes 0), or every logit is nan
    bool nan = false;
    for (int64_t t = 0; t < n; ++t) nan |= x[t] != x[t];
    if (nan) poison(start, end, acc);
    return;
  }
  const float l = cpu::exp_sum(x, n, m, 1.0f);
  if (l != l) return poison(start, end, acc);  // a nan or +inf logit
  const float inv = 1.0f / l;
  const int64_t stop = std::min(end, n);
#pragma omp simd
  for (int64_t t = start; t < stop; ++t) acc[t - start] += x[t] * inv;
}

// Without a mask and with scale > 0, the same in two passes instead of three: the max of the raw
// logits, then e = exp((x - m) * scale), which is exactly exp(0) = 1 at the maximum. (Not
// x * scale - m * scale: contracted to an FMA, that is off by up to half an ulp of m * scale,
// hundreds for logits ~1e10, so every e of the row underflowed to 0 or overflowed and the row
// gave nan.)
KVFIX_INLINE void row_mass_plain(float* x, int64_t n, float scale, int64_t start, int64_t end, float* acc) {
  const float m = row_max(x, n);
  const float l = cpu::exp_sum(x, n, m, scale);
  if (l != l) return poison(start, end, acc);  // a nan or +inf logit
  const float inv = 1.0f / l;
  const int64_t stop = std::min(end, n);
#pragma omp simd
  for (int64_t t = start; t < stop; ++t) acc[t - start] += x[t] * inv;
}

// Rows r0 + [0, rows) of item (b, h), logits in buf (row stride cols): their image mass into acc.
KVFIX_CPU_CLONES void block_mass(float* buf, int64_t rows, int64_t cols, int64_t r0, int64_t Tq, int64_t T,
                                 bool causal, float scale, const MaskView& m, int64_t b, int64_t h, int64_t start,
                                 int64_t end, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    const int64_t n = causal ? T - Tq + i + 1 : cols;
    float* x = buf + r * cols;
    if (m.kind == 0 && scale > 0.0f) {
      row_mass_plain(x, n, scale, start, end, acc);
    } else {
      scale_and_mask(x, n, scale, m, b, h, i);
      row_mass(x, n, start, end, acc);
    }
  }
}

}  // namespace

at::Tensor scr_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in, int64_t start, int64_t end,
                          std::optional<double> scale, const std::optional<at::Tensor>& mask, bool causal) {
  const MaskView m = scr_scores_check(q_in, k_in, start, end, mask, causal);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), T = k_in.size(2), N = end - start, G = Hq / Hkv;
  const float sc = scr_scale(scale, D);
  at::Tensor out = at::empty({B, N}, q_in.options().dtype(at::kFloat));
  if (N == 0) return out;
  const at::Tensor q = q_in.scalar_type() == at::kFloat ? q_in : q_in.to(at::kFloat);
  const at::Tensor k = k_in.scalar_type() == at::kFloat ? k_in : k_in.to(at::kFloat);
  const int64_t R = std::max<int64_t>(1, std::min({kMaxRows, Tq, kBlockBytes / (4 * T)}));
  std::vector<float> part(static_cast<size_t>(B * Hq * N), 0.0f);
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(static_cast<size_t>(R * T));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / Hq, h = item % Hq;
      const at::Tensor qh = q.select(0, b).select(0, h);          // [Tq, D]
      const at::Tensor kh = k.select(0, b).select(0, h / G);      // [T, D]
      float* acc = part.data() + item * N;
      for (int64_t r0 = 0; r0 < Tq; r0 += R) {
        const int64_t rows = std::min(R, Tq - r0);
        // keys the block can see: causal rows see up to T - Tq + row
        const int64_t cols = causal ? T - Tq + r0 + rows : T;
        at::Tensor logits = at::from_blob(buf.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
        at::mm_out(logits, qh.narrow(0, r0, rows), kh.narrow(0, 0, cols).t());
        block_mass(buf.data(), rows, cols, r0, Tq, T, causal, sc, m, b, h, start, end, acc);
      }
    }
  });
  float* o = out.mutable_data_ptr<float>();
  const float inv_h = 1.0f / static_cast<float>(Hq);
  for (int64_t b = 0; b < B; ++b) {  // fixed order over heads: deterministic
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.0f;
      for (int64_t h = 0; h < Hq; ++h) s += part[(b * Hq + h) * N + j];
      o[b * N + j] = s * inv_h;
    }
  }
  return out;
}

namespace {

// Source flags [N] of one item: the top_k scores among the candidates, ties to the lower index.
void select_sources(const float* s, int64_t gh, int64_t gw, int64_t top_k, bool exclude_border, uint8_t* flag) {
  std::vector<int64_t> cand;
  for (int64_t r = 0; r < gh; ++r)
    for (int64_t c = 0; c < gw; ++c)
      if (!exclude_border || (r > 0 && r < gh - 1 && c > 0 && c < gw - 1)) cand.push_back(r * gw + c);
  const int64_t k = std::min<int64_t>(top_k, static_cast<int64_t>(cand.size()));
  std::fill(flag, flag + gh * gw, uint8_t(0));
  if (k == 0) return;
  auto before = [s](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
  if (k < static_cast<int64_t>(cand.size())) std::nth_element(cand.begin(), cand.begin() + k, cand.end(), before);
  for (int64_t i = 0; i < k; ++i) flag[cand[i]] = 1;
}

constexpr int64_t kChunk = 256;  // fp32 accumulator per chunk of a row

// Element <-> fp32 with integer operations only (no calls, no branches), so that the row loops
// vectorise in the target clones (c10's scalar conversions and GCC 12's _Float16 do not).
KVFIX_INLINE float bits_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
KVFIX_INLINE uint32_t f_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
KVFIX_INLINE float load_f(const float* p) { return *p; }
KVFIX_INLINE float load_f(const c10::BFloat16* p) {  // bf16 is the top half of a float
  uint16_t b;
  std::memcpy(&b, p, sizeof(b));
  return bits_f(static_cast<uint32_t>(b) << 16);
}
KVFIX_INLINE float load_f(const c10::Half* p) {
  // magnitude bits shifted into place and rescaled by 2^112 (exact for normals and subnormals);
  // inf / nan keep an all-ones exponent
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  const uint32_t x = h, em = x & 0x7fffu, shifted = em << 13;
  const uint32_t mag = em >= 0x7c00u ? (shifted | 0x7f800000u) : f_bits(bits_f(shifted) * 0x1p112f);
  return bits_f(mag | ((x & 0x8000u) << 16));
}
KVFIX_INLINE void store_f(float* p, float x) { *p = x; }
KVFIX_INLINE void store_f(c10::BFloat16* p, float x) {  // round to nearest even, NaN stays quiet NaN
  const uint32_t u = f_bits(x);
  const uint16_t b = static_cast<uint16_t>(x != x ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  std::memcpy(p, &b, sizeof(b));
}
KVFIX_INLINE void store_f(c10::Half* p, float x) {
  // round to nearest even: overflow -> inf, NaN -> quiet NaN; subnormal results by adding 0.5 in
  // float arithmetic (the FPU rounds), normal results by integer rounding of the mantissa
  const uint32_t u = f_bits(x), sign = u & 0x80000000u, a = u ^ sign;
  const uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t sub = f_bits(bits_f(a) + 0.5f) - 0x3f000000u;
  const uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t o = a >= 0x47800000u ? special : a < 0x38800000u ? sub : norm;
  const uint16_t h = static_cast<uint16_t>(o | (sign >> 16));
  std::memcpy(p, &h, sizeof(h));
}

// fp16 rows <-> fp32 chunks with the F16C instructions where the CPU has them (GCC 12 vectorises
// neither c10's scalar conversion nor _Float16's; the integer versions above cost about twice as
// much), picked once at run time.
using HalfToFloat = void (*)(const c10::Half*, float*, int64_t);
using FloatToHalf = void (*)(const float*, c10::Half*, int64_t);
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = load_f(in + i);
}
__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) store_f(out + i, in[i]);
}
#endif
void half_to_float_int(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = load_f(in + i);
}
void float_to_half_int(const float* in, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store_f(out + i, in[i]);
}
struct HalfConv {
  HalfToFloat to_f;
  FloatToHalf from_f;
};
const HalfConv& half_conv() {
#if defined(__x86_64__)
  static const HalfConv c = __builtin_cpu_supports("f16c") ? HalfConv{half_to_float_f16c, float_to_half_f16c}
                                                            : HalfConv{half_to_float_int, float_to_half_int};
#else
  static const HalfConv c{half_to_float_int, float_to_half_int};
#endif
  return c;
}

// redistribute_row for fp16 rows: the same arithmetic on fp32 chunks.
KVFIX_INLINE void redistribute_row_half(int64_t C, bool is_source, const c10::Half* const* nb, int count,
                                            float lam, const c10::Half* in, c10::Half* out) {
  const HalfConv& cv = half_conv();
  const float w = lam - 1.0f;
  float acc[kChunk], x[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t len = std::min(kChunk, C - c0);
    cv.to_f(in + c0, x, len);
    if (is_source) {
      for (int64_t c = 0; c < len; ++c) x[c] /= lam;
    } else {
      cv.to_f(nb[0] + c0, acc, len);
      for (int i = 1; i < count; ++i) {
        float y[kChunk];
        cv.to_f(nb[i] + c0, y, len);
        for (int64_t c = 0; c < len; ++c) acc[c] += y[c];
      }
      for (int64_t c = 0; c < len; ++c) x[c] += w * acc[c];
    }
    cv.from_f(x, out + c0, len);
  }
}

// A non-source row with K source neighbours (fp32 / bf16): out = in + w * (nb[0] + ... + nb[K-1]),
// summed in that order, in one pass over the row (K fixed, so the loop vectorises over the row;
// an fp32 accumulator chunk on the stack, written and re-read once per neighbour, made these rows
// ~4x a row copy at 24 x 24, C = 4096, bf16).
template <int K, class T>
KVFIX_INLINE void neighbour_row(int64_t C, const T* const* nb, float w, const T* in, T* out) {
  for (int64_t c = 0; c < C; ++c) {
    float a = load_f(nb[0] + c);
    for (int i = 1; i < K; ++i) a += load_f(nb[i] + c);
    store_f(out + c, load_f(in + c) + w * a);
  }
}

// Output row n of one item. src(s): the original row of source s. in: the row's input, out: where
// it goes (may alias in); copy_plain: write rows that do not change (out of place).
template <class T, class Src>
KVFIX_INLINE void redistribute_row(int64_t n, int64_t gh, int64_t gw, int64_t C, const uint8_t* flag, float lam,
                                       const T* in, T* out, bool copy_plain, const Src& src) {
  if (flag[n]) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      redistribute_row_half(C, true, nullptr, 0, lam, in, out);
    } else {
      for (int64_t c = 0; c < C; ++c) store_f(out + c, load_f(in + c) / lam);
    }
    return;
  }
  const int64_t r = n / gw, cl = n % gw;
  const T* nb[8];
  int count = 0;
  for (int64_t dr = -1; dr <= 1; ++dr)
    for (int64_t dc = -1; dc <= 1; ++dc) {
      const int64_t rr = r + dr, cc = cl + dc;
      if ((dr || dc) && rr >= 0 && rr < gh && cc >= 0 && cc < gw && flag[rr * gw + cc]) nb[count++] = src(rr * gw + cc);
    }
  if (count == 0) {
    if (copy_plain) std::memcpy(out, in, static_cast<size_t>(C) * sizeof(T));
    return;
  }
  if constexpr (std::is_same_v<T, c10::Half>) {
    redistribute_row_half(C, false, nb, count, lam, in, out);
    return;
  }
  const float w = lam - 1.0f;
  switch (count) {
    case 1: return neighbour_row<1>(C, nb, w, in, out);
    case 2: return neighbour_row<2>(C, nb, w, in, out);
    case 3: return neighbour_row<3>(C, nb, w, in, out);
    case 4: return neighbour_row<4>(C, nb, w, in, out);
    case 5: return neighbour_row<5>(C, nb, w, in, out);
    case 6: return neighbour_row<6>(C, nb, w, in, out);
    case 7: return neighbour_row<7>(C, nb, w, in, out);
    default: return neighbour_row<8>(C, nb, w, in, out);
  }
}

// One redistribution: hidden rows at h + b * sb + n * sn, output rows at out + b * osb + n * osn,
// flags [B * N]; in place: slot [B * N] (index of a source's copy in staged, C elements each).
struct RedisJob {
  const void* h;
  void* out;
  int64_t sb, sn, osb, osn, B, N, C, gh, gw;
  const uint8_t* flags;
  const int64_t* slot;
  const void* staged;
  float lam;
  bool in_place;
};

template <class T>
KVFIX_INLINE void redistribute_range(const RedisJob& j, int64_t i0, int64_t i1) {
  const T* h = static_cast<const T*>(j.h);
  T* out = static_cast<T*>(j.out);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / j.N, n = i % j.N;
    const uint8_t* flag = j.flags + b * j.N;
    const T* hb = h + b * j.sb;
    if (j.in_place) {
      const T* st = static_cast<const T*>(j.staged);
      const int64_t* sl = j.slot + b * j.N;
      redistribute_row<T>(n, j.gh, j.gw, j.C, flag, j.lam, hb + n * j.sn, out + b * j.osb + n * j.osn, false,
                          [&](int64_t s) { return st + sl[s] * j.C; });
    } else {
      redistribute_row<T>(n, j.gh, j.gw, j.C, flag, j.lam, hb + n * j.sn, out + b * j.osb + n * j.osn, true,
                          [&](int64_t s) { return hb + s * j.sn; });
    }
  }
}

KVFIX_CPU_CLONES void redistribute_f32(const RedisJob& j, int64_t i0, int64_t i1) {
  redistribute_range<float>(j, i0, i1);
}
KVFIX_CPU_CLONES void redistribute_f16(const RedisJob& j, int64_t i0, int64_t i1) {
  redistribute_range<c10::Half>(j, i0, i1);
}
KVFIX_CPU_CLONES void redistribute_bf16(const RedisJob& j, int64_t i0, int64_t i1) {
  redistribute_range<c10::BFloat16>(j, i0, i1);
}

template <class T>
void redistribute(RedisJob j, void (*fn)(const RedisJob&, int64_t, int64_t)) {
  // In place: the original source rows, copied aside before any row is written.
  // (Uninitialised: a std::vector<T> would zero it element by element first, a fifth of the
  // in-place call at 24 x 24, C = 4096, bf16.)
  std::vector<int64_t> slot;
  std::unique_ptr<T[]> staged;
  if (j.in_place) {
    const T* h = static_cast<const T*>(j.h);
    slot.assign(static_cast<size_t>(j.B * j.N), -1);
    int64_t n_src = 0;
    for (int64_t i = 0; i < j.B * j.N; ++i)
      if (j.flags[i]) slot[i] = n_src++;
    staged = std::make_unique_for_overwrite<T[]>(static_cast<size_t>(n_src * j.C));
    for (int64_t i = 0; i < j.B * j.N; ++i)
      if (j.flags[i])
        std::memcpy(staged.get() + slot[i] * j.C, h + (i / j.N) * j.sb + (i % j.N) * j.sn, j.C * sizeof(T));
    j.slot = slot.data();
    j.staged = staged.get();
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(j.C, 1));
  at::parallel_for(0, j.B * j.N, grain, [&](int64_t i0, int64_t i1) { fn(j, i0, i1); });
}

void run_redistribute(const at::Tensor& hidden, const at::Tensor& scores, void* out, int64_t osb, int64_t osn,
                      int64_t gh, int64_t gw, int64_t top_k, double lam, bool exclude_border, bool in_place) {
  const int64_t B = hidden.size(0), N = hidden.size(1);
  std::vector<uint8_t> flags(static_cast<size_t>(B * N));
  const float* s = scores.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) select_sources(s + b * N, gh, gw, top_k, exclude_border, flags.data() + b * N);
  RedisJob j{};
  j.h = hidden.const_data_ptr();
  j.out = out;
  j.sb = hidden.stride(0);
  j.sn = hidden.stride(1);
  j.osb = osb;
  j.osn = osn;
  j.B = B;
  j.N = N;
  j.C = hidden.size(2);
  j.gh = gh;
  j.gw = gw;
  j.flags = flags.data();
  j.lam = static_cast<float>(lam);
  j.in_place = in_place;
  switch (hidden.scalar_type()) {
    case at::kFloat:
      return redistribute<float>(j, redistribute_f32);
    case at::kHalf:
      return redistribute<c10::Half>(j, redistribute_f16);
    default:
      return redistribute<c10::BFloat16>(j, redistribute_bf16);
  }
}

}  // namespace

at::Tensor scr_redistribute_cpu(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                                int64_t top_k, double lam, bool exclude_border) {
  scr_redistribute_check("scr_redistribute", hidden, scores, gh, gw, top_k, lam);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  run_redistribute(hidden, scores, out.mutable_data_ptr(), out.stride(0), out.stride(1), gh, gw, top_k, lam,
                   exclude_border, false);
  return out;
}

void scr_redistribute__cpu(const at::Tensor& hidden, const at::Tensor& scores, int64_t gh, int64_t gw,
                           int64_t top_k, double lam, bool exclude_border) {
  scr_redistribute_check("scr_redistribute_", hidden, scores, gh, gw, top_k, lam);
  if (hidden.numel() == 0) return;
  run_redistribute(hidden, scores, hidden.mutable_data_ptr(), hidden.stride(0), hidden.stride(1), gh, gw, top_k,
                   lam, exclude_border, true);
}

}  // namespace kvfix
