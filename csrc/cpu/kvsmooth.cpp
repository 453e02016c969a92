// KVSmooth on the CPU (METHODS §2): row entropy of a single-token query and the fused decoding step.
//
// One pass over K. Work items are (b, kv head, chunk of positions), pulled dynamically by the
// threads of at::parallel_for (parallel when the extension is compiled with OpenMP: see
// usable_threads); a chunk is all T positions unless B * Hkv gives fewer than kItemsPerThread
// items per thread. An item walks its positions in blocks of kRows keys:
//   - logits of the g = Hq / Hkv query heads that read this kv head (query rows in fp32, the dot
//     products scaled afterwards as in the reference: a pre-scaled query row adds its rounding error
//     to every logit, 2e-6 in the entropy of rows with logits near 300):
//     D = 64, 96, 128 and 256 are compile-time shapes: eight rows at a time, each row's dot
//     product in four 8-lane accumulators (GCC vector extensions, compiled per target clone:
//     AVX-512 / AVX2 / baseline) walked along the row, and the eight rows' lane sums through one
//     transposing shuffle tree (sums8). The 16-lane vectors and one horizontal sum per row used before spilled
//     to the stack in the AVX2 clone: bf16 T=2048 (L3-resident K) 0.52-0.86 -> 0.39-0.54 ms, T=8192
//     4.0-4.7 -> 3.0-4.1 ms (2 threads, interleaved processes); eight rows walked together (one
//     query load for eight rows) were slower where K comes from memory (T=8192: 4.4-6.1 ms).
//     Any other D takes a generic loop (one row at a time, 8-lane accumulators, one horizontal sum
//     per row and head). bf16 rows are read as u32 words (w << 16: even elements, w & 0xffff0000:
//     odd elements; the query chunks are stored permuted to match), fp16 rows are widened with
//     integer operations, once per row for the G heads. The next rows are software-prefetched
//     kPrefetchBytes ahead.
//   - the block is folded into each head's online-softmax state with an 8-lane exp (cpu/exp_nonpos.h;
//     the `omp simd` form of the fold compiled scalar in the AVX2 clone):
//
//       m = max logit, l = sum e^(x - m), u = sum e^(x - m) (x - m),   H = log l - u / l.
//
//     (METHODS §2's `H = m + log l - u / l`, with u kept relative to the running max so that no large
//     logit cancels against itself; partial states merge exactly: u = sum_c a_c (u_c + (m_c - m) l_c),
//     l = sum_c a_c l_c, a_c = e^(m_c - m).) Masked positions (bool False, additive -inf) take no
//     part, whatever k holds there, and so does a -inf logit; an all-masked row has entropy 0.
//     A nan or +inf logit of a position taking part has no softmax: the state turns nan (l = u =
//     nan, kept through every later fold and merge) and so does the row's entropy.
//
// Then, per batch item and in a fixed order (deterministic): merge the chunks, H per query head,
// z = mean over query heads; for the step also push z onto the queue (oldest first, NaN = empty),
// rank = k / M with k = #{entries <= z} (the 1-based rank of z, which counts itself; M the queue
// capacity, also while the queue fills; NaN slots never count: the paper's k / M),
// lam = clamp(clamp(rank, lam_ref - band, lam_ref + band), 0, 1) (a nan z: lam = nan), and
// the in-place EMA K[T-1] = (1 - lam) K[T-1] + lam K[T-2] (same for V, every kv head, in fp32,
// rounded once). No EMA (lam reported as 0) when T == 1 or position T - 2 is masked. All
// validation happens before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/exp_nonpos.h"
#include "cpu/mask.h"
#include "ops/kvsmooth.h"

// The vector-typed helpers below are always inlined into the target clones: no vector crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "cpu/simd.h"

namespace kvfix {
namespace {

constexpr int64_t kRows = 64;             // key rows per block of logits (a multiple of 8: block_logits)
static_assert(kRows % 8 == 0);
constexpr int64_t kMinChunkRows = 512;    // smallest chunk of positions worth a work item of its own
constexpr int64_t kItemsPerThread = 4;    // work items per thread wanted for dynamic load balance
// Below this many multiply-adds (B Hq T D) one thread does the work: a few microseconds of it,
// less than waking a second thread costs, and on a busy machine a worker the OS has not scheduled
// yet holds the call for milliseconds (a tiny step took ~8 ms on 2 threads next to another job).
constexpr int64_t kMinParallelMacs = int64_t(1) << 14;
constexpr int64_t kPrefetchBytes = 4096;  // software prefetch distance along a kv head's rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 floats / uint32 / int32, 16 uint16 (GCC / Clang vector extensions: each target clone lowers
// them to the widest registers it has).
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

KVFIX_INLINE vf bits_to_f(vu u) {
  vf f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
KVFIX_INLINE vu f_to_bits(vf f) {
  vu u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// 16 elements at p (any alignment) widened to fp32.
KVFIX_INLINE vf load16(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
KVFIX_INLINE vf load16(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return bits_to_f(__builtin_convertvector(h, vu) << 16);
}
KVFIX_INLINE vf load16(const c10::Half* p) {
  // IEEE half -> float with integer operations: the magnitude bits shifted into place and
  // rescaled by 2^112 (exact for normals and subnormals); inf / nan keep an all-ones exponent.
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu x = __builtin_convertvector(h, vu);
  const vu sign = (x & 0x8000u) << 16;
  const vu em = x & 0x7fffu;
  const vu shifted = em << 13;
  const vu finite = f_to_bits(bits_to_f(shifted) * 0x1p112f);
  const vu special = shifted | 0x7f800000u;
  const vi is_special = (vi)(em >= 0x7c00u);
  const vu mag = (vu)((is_special & (vi)special) | (~is_special & (vi)finite));
  return bits_to_f(mag | sign);
}

KVFIX_INLINE float to_f(float x) { return x; }
KVFIX_INLINE float to_f(c10::Half x) { return static_cast<float>(x); }
KVFIX_INLINE float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

// A 16-bit key row of D elements widened to float32 into dst: 16 at a time, then one by one.
template <class T>
KVFIX_INLINE void widen_row(const T* src, int64_t D, float* dst) {
  const int64_t D16 = D / 16 * 16;
  for (int64_t d = 0; d < D16; d += 16) {
    const vf x = load16(src + d);
    std::memcpy(dst + d, &x, sizeof(x));
  }
  for (int64_t d = D16; d < D; ++d) dst[d] = to_f(src[d]);
}

struct State {
  float m = kNegInf, l = 0.0f, u = 0.0f;
};

// Merge state b into a (exact up to rounding; states with l == 0 are empty, l = nan poisons).
inline void merge(State& a, const State& b) {
  if (a.l != a.l) return;
  if (b.l != b.l) {
    a = b;
    return;
  }
  if (!(b.l > 0.0f)) return;
  if (!(a.l > 0.0f)) {
    a = b;
    return;
  }
  const float m = std::max(a.m, b.m);
  const float ea = std::exp(a.m - m), eb = std::exp(b.m - m);
  a.u = ea * (a.u + (a.m - m) * a.l) + eb * (b.u + (b.m - m) * b.l);
  a.l = ea * a.l + eb * b.l;
  a.m = m;
}

inline float entropy_of(const State& s) {
  if (s.l != s.l) return s.l;  // a nan or +inf logit: no softmax
  return s.l > 0.0f ? std::log(s.l) - s.u / s.l : 0.0f;
}

struct Problem {
  const void* q;
  int64_t q_sb, q_sh;
  const void* k;
  int64_t k_sb, k_sh, k_st;
  int64_t B, Hq, Hkv, T, D, G;  // G = Hq / Hkv
  float scale;
  MaskView mask;
};

// The 8 lanes' sums of eight vectors: lane r of the result is the sum of a[r]'s lanes, added
// pairwise ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) through a transposing shuffle tree (7 adds
// and 14 shuffles for 8 rows, where one horizontal sum per row takes 7 adds and 6 shuffles).
KVFIX_INLINE cpu::f32x8 sums8(const cpu::f32x8* a) {
  using cpu::f32x8, cpu::i32x8;
  auto pair = [](f32x8 x, f32x8 y, i32x8 e, i32x8 o) __attribute__((always_inline)) {
    return __builtin_shuffle(x, y, e) + __builtin_shuffle(x, y, o);
  };
  const i32x8 e1{0, 8, 2, 10, 4, 12, 6, 14}, o1{1, 9, 3, 11, 5, 13, 7, 15};
  const i32x8 e2{0, 1, 8, 9, 4, 5, 12, 13}, o2{2, 3, 10, 11, 6, 7, 14, 15};
  const i32x8 e3{0, 1, 2, 3, 8, 9, 10, 11}, o3{4, 5, 6, 7, 12, 13, 14, 15};
  const f32x8 x = pair(pair(a[0], a[1], e1, o1), pair(a[2], a[3], e1, o1), e2, o2);
  const f32x8 y = pair(pair(a[4], a[5], e1, o1), pair(a[6], a[7], e1, o1), e2, o2);
  return pair(x, y, e3, o3);
}

// Dot products of a query row qj (fp32; bf16 layout: see run_item_d) with eight key rows of
// DC * 16 elements: one row after the other, each walked in order with four 8-lane accumulators
// (four independent multiply-add chains; the query reloaded from L1 per row), then the eight
// rows' lanes summed by sums8.
template <class T, int DC>
KVFIX_INLINE cpu::f32x8 dots8(const float* qj, const T* const* rows) {
  using cpu::f32x8;
  typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));
  f32x8 a[8];
#pragma GCC unroll 1
  for (int r = 0; r < 8; ++r) {
    const T* row = rows[r];
    f32x8 c0{}, c1{}, c2{}, c3{};
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma GCC unroll 8
      for (int c = 0; c < DC; c += 2) {
        const u32x8 w0 = *reinterpret_cast<const u32x8*>(row + 16 * c);
        c0 += cpu::load8(qj + 16 * c) * (f32x8)(w0 << 16);
        c1 += cpu::load8(qj + 16 * c + 8) * (f32x8)(w0 & 0xffff0000u);
        const u32x8 w1 = *reinterpret_cast<const u32x8*>(row + 16 * c + 16);
        c2 += cpu::load8(qj + 16 * c + 16) * (f32x8)(w1 << 16);
        c3 += cpu::load8(qj + 16 * c + 24) * (f32x8)(w1 & 0xffff0000u);
      }
    } else {
      static_assert(std::is_same_v<T, float>, "fp16 rows are widened to float first (block_logits)");
#pragma GCC unroll 8
      for (int c = 0; c < 2 * DC; c += 4) {
        c0 += cpu::load8(qj + 8 * c) * cpu::load8(row + 8 * c);
        c1 += cpu::load8(qj + 8 * c + 8) * cpu::load8(row + 8 * c + 8);
        c2 += cpu::load8(qj + 8 * c + 16) * cpu::load8(row + 8 * c + 16);
        c3 += cpu::load8(qj + 8 * c + 24) * cpu::load8(row + 8 * c + 24);
      }
    }
    a[r] = (c0 + c1) + (c2 + c3);
  }
  return sums8(a);
}

// Logits of one block of rows [t0, t0 + n) for the G heads of kv head h of item b, into
// s[j * kRows + r]; qs: the G query rows, fp32 [G][D]; kr: scratch [8, D]; bias[r]: the
// mask's value for row t0 + r (-inf: no part). DC = D / 16 when known at compile time, 0 for any D.
template <class T, int DC>
KVFIX_INLINE void block_logits(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t n, const float* qs,
                                   float* kr, const float* bias, float* s) {
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const int64_t D = p.D, G = p.G, st = p.k_st;
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = D * int64_t(sizeof(T));
  const int64_t pf_rows = (kPrefetchBytes + row_bytes - 1) / row_bytes;
  auto prefetch = [&](int64_t t) {  // the hardware prefetcher alone leaves the row loads exposed
    if (t + pf_rows < p.T) {
      const char* pf = reinterpret_cast<const char*>(kbase + (t + pf_rows) * st);
      for (int64_t o = 0; o < row_bytes; o += kLine) __builtin_prefetch(pf + o);
    }
  };
  auto put = [&](int64_t j, int64_t r, float dot) {
    s[j * kRows + r] = bias[r] == kNegInf ? kNegInf : dot * p.scale + bias[r];  // a nan bias takes part
  };
  if constexpr (DC > 0) {
    // eight rows at a time (a last group of fewer repeats its last row; s and bias have room for
    // whole groups: kRows is a multiple of 8, and the lanes past n are never read)
    for (int64_t r0 = 0; r0 < n; r0 += 8) {
      const int64_t c = std::min<int64_t>(8, n - r0);
      const T* rows[8];
      for (int64_t r = 0; r < 8; ++r) rows[r] = kbase + (t0 + r0 + std::min(r, c - 1)) * st;
      for (int64_t r = 0; r < c; ++r) prefetch(t0 + r0 + r);
      const cpu::f32x8 b8 = cpu::load8(bias + r0), ninf = cpu::splat8(kNegInf);
      auto heads = [&]<class R>(const R* const* rs) __attribute__((always_inline)) {  // (inlined into the clone)
        for (int64_t j = 0; j < G; ++j) {
          const cpu::f32x8 v = dots8<R, DC>(qs + j * D, rs) * p.scale + b8;  // a nan bias takes part
          cpu::store8(s + j * kRows + r0, b8 == ninf ? ninf : v);
        }
      };
      if constexpr (std::is_same_v<T, c10::Half>) {  // widened once for the G heads (kr: [8, D])
        const float* frows[8];
        for (int64_t r = 0; r < 8; ++r) {
          frows[r] = kr + std::min(r, c - 1) * D;
          if (r < c) widen_row(rows[r], D, kr + r * D);
        }
        heads(frows);
      } else {
        heads(rows);
      }
    }
  } else {
    for (int64_t r = 0; r < n; ++r) {
      prefetch(t0 + r);
      const T* krow = kbase + (t0 + r) * st;
      const float* kf;
      if constexpr (std::is_same_v<T, float>) {
        kf = krow;
      } else {  // widen once per row, reused by the G heads
        widen_row(krow, D, kr);
        kf = kr;
      }
      for (int64_t j = 0; j < G; ++j) {
        const float* qj = qs + j * D;
        // 8-lane vectors (16-lane ones go through the stack in the AVX2 clone): four chains over
        // 32 elements at a time, then 8 at a time, then the last D % 8 one by one
        cpu::f32x8 a0{}, a1{}, a2{}, a3{};
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
          a0 += cpu::load8(qj + d) * cpu::load8(kf + d);
          a1 += cpu::load8(qj + d + 8) * cpu::load8(kf + d + 8);
          a2 += cpu::load8(qj + d + 16) * cpu::load8(kf + d + 16);
          a3 += cpu::load8(qj + d + 24) * cpu::load8(kf + d + 24);
        }
        for (; d + 8 <= D; d += 8) a0 += cpu::load8(qj + d) * cpu::load8(kf + d);
        float dot = cpu::hsum8((a0 + a1) + (a2 + a3));
        for (; d < D; ++d) dot += qj[d] * kf[d];
        put(j, r, dot);
      }
    }
  }
}

// bias[r] for rows [t0, t0 + n) of item b (the mask's kind tested outside the row loop).
KVFIX_INLINE void block_bias(const MaskView& m, int64_t b, int64_t t0, int64_t n, float* bias) {
  const int64_t off = Mask::offset(m, b, 0, 0, t0), st = m.st;
  kernels::with_mask_kind(m.kind, [&](auto kind) {
    for (int64_t r = 0; r < n; ++r) bias[r] = Mask::value<decltype(kind)::value>(m.data, off + r * st);
  });
}

// Fold a block of logits x[0, n) into the state (vectorised over the block).
KVFIX_INLINE void fold_block(State& st, const float* x, int64_t n) {
  if (st.l != st.l) return;  // poisoned: stays nan
  constexpr float kMax = std::numeric_limits<float>::max();
  using cpu::f32x8, cpu::i32x8;
  // 8 lanes (csrc/cpu/exp_nonpos.h: written for `#pragma omp simd`, these loops compiled scalar
  // in GCC's AVX2 clone), then the tail
  f32x8 bmv = cpu::splat8(kNegInf);
  i32x8 badv{};
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    const f32x8 v = cpu::load8(x + r);
    bmv = v > bmv ? v : bmv;
    badv |= ~(v <= kMax);  // a nan or +inf logit (the max alone would skip a nan); -inf passes
  }
  float bm = cpu::hmax8(bmv);
  int bad = 0;
  for (int j = 0; j < 8; ++j) bad |= badv[j];
  for (; r < n; ++r) {
    bm = std::max(bm, x[r]);
    bad |= x[r] <= kMax ? 0 : 1;
  }
  if (bad) {
    st.l = st.u = st.m = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (!(bm > kNegInf)) return;  // everything masked
  const float m = std::max(st.m, bm);
  if (st.l > 0.0f) {
    const float a = std::exp(st.m - m);
    st.u = a * (st.u + (st.m - m) * st.l);
    st.l = a * st.l;
  }
  const f32x8 mv = cpu::splat8(m), lo = cpu::splat8(-87.0f);
  f32x8 lv{}, uv{};
  for (r = 0; r + 8 <= n; r += 8) {
    const f32x8 d = cpu::load8(x + r) - mv, e = cpu::exp_nonpos(d);
    lv += e;
    uv += e * (d < lo ? lo : d);  // e == 0 there: keeps -inf * 0 out
  }
  float l = cpu::hsum8(lv), u = cpu::hsum8(uv);
  for (; r < n; ++r) {
    const float d = x[r] - m;
    const float e = cpu::exp_nonpos(d);
    l += e;
    u += e * (d < -87.0f ? -87.0f : d);
  }
  st.l += l;
  st.u += u;
  st.m = m;
}

// One work item: positions [t0, t1) of kv head h of item b; out[j] = state of query head h*G + j.
template <class T, int DC>
KVFIX_INLINE void run_item_d(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, State* out) {
  const int64_t D = p.D, G = p.G;
  std::vector<float> buf(G * D + 8 * D + G * kRows + kRows);
  float* qs = buf.data();
  float* kr = qs + G * D;  // [8, D]: widened key rows (fp16, D = 16 DC) or one row (other D)
  float* s = kr + 8 * D;
  float* bias = s + G * kRows;
  for (int64_t j = 0; j < G; ++j) {
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_sb + (h * G + j) * p.q_sh;
    if constexpr (DC > 0 && std::is_same_v<T, c10::BFloat16>) {  // evens, then odds, per 16
      for (int64_t d = 0; d < D; ++d) qs[j * D + (d / 16) * 16 + (d % 2) * 8 + (d % 16) / 2] = to_f(qrow[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) qs[j * D + d] = to_f(qrow[d]);
    }
  }
  for (int64_t j = 0; j < G; ++j) out[j] = State{};
  for (int64_t t = t0; t < t1; t += kRows) {
    const int64_t n = std::min(kRows, t1 - t);
    block_bias(p.mask, b, t, n, bias);
    block_logits<T, DC>(p, b, h, t, n, qs, kr, bias, s);
    for (int64_t j = 0; j < G; ++j) fold_block(out[j], s + j * kRows, n);
  }
}

template <class T>
KVFIX_INLINE void run_item(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, State* out) {
  switch (p.D) {
    case 64:
      return run_item_d<T, 4>(p, b, h, t0, t1, out);
    case 96:
      return run_item_d<T, 6>(p, b, h, t0, t1, out);
    case 128:
      return run_item_d<T, 8>(p, b, h, t0, t1, out);
    case 256:
      return run_item_d<T, 16>(p, b, h, t0, t1, out);
    default:
      return run_item_d<T, 0>(p, b, h, t0, t1, out);
  }
}

KVFIX_CPU_CLONES void run_item_f32(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, State* out) {
  run_item<float>(p, b, h, t0, t1, out);
}
KVFIX_CPU_CLONES void run_item_f16(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, State* out) {
  run_item<c10::Half>(p, b, h, t0, t1, out);
}
KVFIX_CPU_CLONES void run_item_bf16(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, State* out) {
  run_item<c10::BFloat16>(p, b, h, t0, t1, out);
}

using ItemFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, State*);

Problem make_problem(const at::Tensor& q, const at::Tensor& k, float scale, const MaskView& mask) {
  Problem p{};
  p.q = q.const_data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.k = k.const_data_ptr();
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_st = k.stride(2);
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.T = k.size(2);
  p.G = p.Hq / p.Hkv;
  p.scale = scale;
  p.mask = mask;
  return p;
}

ItemFn item_fn(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return run_item_f32;
    case at::kHalf:
      return run_item_f16;
    case at::kBFloat16:
      return run_item_bf16;
    default:
      TORCH_CHECK(false, "kvsmooth: unsupported dtype ", st);
  }
}

// Threads the work items can use. at::parallel_for is an inline OpenMP loop: it runs serially
// unless this file is compiled with OpenMP (-fopenmp; see the build notes of the package).
// (A fallback onto ATen's inter-op pool was measured and dropped: right after the layer's own
// torch ops, torch's OpenMP workers still spin, and the extra threads made decoding slower.)
int64_t usable_threads() {
#ifdef INTRA_OP_PARALLEL
  return std::max<int64_t>(1, at::get_num_threads());
#else
  return 1;
#endif
}

// run(i) for every i in [0, items) on up to `threads` threads, dynamically scheduled: each worker
// pulls the next item, so a worker the OS descheduled (shared machines) does not hold the others
// back. run must not throw; results must not depend on which thread ran which item.
template <class F>
void parallel_items(int64_t items, int64_t threads, const F& run) {
  const int64_t workers = std::min(threads, items);
  if (workers > 1) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
           i = next.fetch_add(1, std::memory_order_relaxed))
        run(i);
    });
    return;
  }
  for (int64_t i = 0; i < items; ++i) run(i);
}

// Entropy of every query head's row: ent[b * Hq + hq] (B * Hq floats).
void entropies(const Problem& p, ItemFn fn, float* ent) {
  const int64_t pairs = p.B * p.Hkv;
  if (pairs == 0) return;
  const int64_t threads = p.B * p.Hq * p.T * p.D < kMinParallelMacs ? 1 : usable_threads();
  // Work items: (b, kv head, chunk of positions). Positions are split when the pairs alone give
  // fewer than kItemsPerThread items per thread, down to kMinChunkRows positions per chunk.
  int64_t chunks = 1;
  if (threads > 1 && pairs < kItemsPerThread * threads)
    chunks = std::max<int64_t>(1, std::min((kItemsPerThread * threads + pairs - 1) / pairs, p.T / kMinChunkRows));
  const int64_t per = (p.T + chunks - 1) / chunks;
  const int64_t items = pairs * chunks;
  std::vector<State> part(static_cast<size_t>(items * p.G));
  parallel_items(items, threads, [&](int64_t i) {
    const int64_t c = i % chunks, bh = i / chunks;
    const int64_t t0 = c * per, t1 = std::min(p.T, t0 + per);
    if (t0 < t1) fn(p, bh / p.Hkv, bh % p.Hkv, t0, t1, part.data() + i * p.G);
  });
  for (int64_t bh = 0; bh < pairs; ++bh) {  // fixed merge order: deterministic
    for (int64_t j = 0; j < p.G; ++j) {
      State s;
      for (int64_t c = 0; c < chunks; ++c) merge(s, part[(bh * chunks + c) * p.G + j]);
      ent[(bh / p.Hkv) * p.Hq + (bh % p.Hkv) * p.G + j] = entropy_of(s);
    }
  }
}

// K[b, :, T-1] = (1 - lam) K[b, :, T-1] + lam K[b, :, T-2] in fp32, rounded once.
template <class T>
void ema_item(const at::Tensor& x, int64_t b, float lam) {
  T* base = static_cast<T*>(x.mutable_data_ptr()) + b * x.stride(0);
  const int64_t H = x.size(1), Tn = x.size(2), D = x.size(3);
  for (int64_t h = 0; h < H; ++h) {
    T* last = base + h * x.stride(1) + (Tn - 1) * x.stride(2);
    const T* prev = base + h * x.stride(1) + (Tn - 2) * x.stride(2);
    for (int64_t d = 0; d < D; ++d)
      last[d] = static_cast<T>((1.0f - lam) * static_cast<float>(last[d]) + lam * static_cast<float>(prev[d]));
  }
}

void ema(const at::Tensor& x, int64_t b, float lam) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ema_item<float>(x, b, lam);
    case at::kHalf:
      return ema_item<c10::Half>(x, b, lam);
    default:
      return ema_item<c10::BFloat16>(x, b, lam);
  }
}

}  // namespace

at::Tensor row_entropy_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                           const std::optional<at::Tensor>& mask) {
  const MaskView m = kvsmooth_check("row_entropy", q, k, nullptr, nullptr, mask);
  const float sc = kvsmooth_scale(scale, q.size(3));
  at::Tensor out = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  entropies(make_problem(q, k, sc, m), item_fn(q.scalar_type()), out.mutable_data_ptr<float>());
  return out;
}

namespace {

// One layer's step after its checks: entropies, queue, lam (into lam_p[0..B)), EMA in place.
void step_after_checks(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& queue, float sc, const MaskView& m, double lam_ref, double band,
                       float* lam_p) {
  const int64_t B = q.size(0), Hq = q.size(1), T = k_cache.size(2), M = queue.size(1);
  if (B == 0) return;
  std::vector<float> ent(static_cast<size_t>(B * Hq), 0.0f);
  if (Hq > 0) entropies(make_problem(q, k_cache, sc, m), item_fn(q.scalar_type()), ent.data());
  const float lo = static_cast<float>(lam_ref - band), hi = static_cast<float>(lam_ref + band);
  float* qu = queue.mutable_data_ptr<float>();
  const int64_t qs0 = queue.stride(0), qs1 = queue.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    float z = 0.0f;
    for (int64_t h = 0; h < Hq; ++h) z += ent[b * Hq + h];
    z = Hq > 0 ? z / static_cast<float>(Hq) : 0.0f;  // nan when a head's entropy is nan
    // FIFO push (oldest at index 0), then the 1-based rank k of z among the entries (z included).
    float* row = qu + b * qs0;
    for (int64_t i = 0; i + 1 < M; ++i) row[i * qs1] = row[(i + 1) * qs1];
    row[(M - 1) * qs1] = z;
    int64_t k = 0;
    for (int64_t i = 0; i < M; ++i) k += row[i * qs1] <= z ? 1 : 0;  // nan never counts
    float l = static_cast<float>(k) / static_cast<float>(M);
    l = std::min(std::max(l, lo), hi);
    l = std::min(std::max(l, 0.0f), 1.0f);
    if (z != z) l = z;  // no rank: nan, which the EMA writes into position T - 1
    if (T < 2 || !(Mask::at(m, b, 0, 0, T - 2) > kNegInf)) l = 0.0f;
    lam_p[b] = l;
    if (l != 0.0f) {
      ema(k_cache, b, l);
      ema(v_cache, b, l);
    }
  }
}

}  // namespace

at::Tensor kvsmooth_step_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& queue, float scale, const MaskView& m, double lam_ref, double band,
                             const std::optional<at::Tensor>& position) {
  const int64_t T = k_cache.size(2);
  int64_t n = T;  // positions taking part
  if (position.has_value()) {  // the step on the first p + 1 positions (reading a CPU value: no sync)
    const int64_t p = *position->const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(p >= 0 && p < T, "kvsmooth_step_: position ", p, " is outside the cache's positions [0, ", T,
                      ")");
    n = p + 1;  // (the mask's view reads positions [0, n) only: it needs no narrowing)
  }
  at::Tensor lam = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  float* lam_p = lam.mutable_data_ptr<float>();
  if (n < T)
    step_after_checks(q, k_cache.narrow(2, 0, n), v_cache.narrow(2, 0, n), queue, scale, m, lam_ref, band, lam_p);
  else
    step_after_checks(q, k_cache, v_cache, queue, scale, m, lam_ref, band, lam_p);
  return lam;
}

void kvsmooth_steps_cpu(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache, at::TensorList queue,
                        const std::vector<float>& scales, const std::vector<MaskView>& masks, double lam_ref,
                        double band, at::Tensor& lam) {
  const int64_t L = lam.size(0), B = lam.size(1);
  float* lam_p = lam.mutable_data_ptr<float>();
  for (int64_t i = 0; i < L; ++i)  // (every layer checked before any is written)
    step_after_checks(q[i], k_cache[i], v_cache[i], queue[i], scales[i], masks[i], lam_ref, band, lam_p + i * B);
}

}  // namespace kvfix
