// Structured DSCR on the CPU (kvfix/dscr_structured.py): the refinement with low-rank weights.
//
// Per block of kW = 16 feature columns (16 consecutive head dims of one head of one batch item
// of K or V) there are two passes over the block's N tokens, with the operands of the inner
// loops in AVX-512 registers (one FMA per factor and token: the kernel runs at the FMA rate):
//   pass A, one grid row a at a time:  [Z1[a] | t] = sum_{i in row a} Fa[i] x_i
//     with Fa[i] = [Rc[w_i] | U[i]] (q = pc + rd factors, zero-padded to a multiple of 4):
//     Z1[a] (the row reduced along w, pc vectors) is stored, t accumulates P = U^T X;
//   middle (small): Z2 = Rr^T Z1 (pr x pc vectors), Z3 = Lr Z2 (gh x pc);
//   pass B, one grid row a at a time:  out_i = Fb[i] . [Z3[a] | P] + a_i x_i
//     with Fb[i] = cinv_i [Lc[w_i] | U[i]] and a_i = -2 cinv_i (the diagonal, which is exactly
//     2), or Fb[i] = 0, a_i = 1 where cinv_i == 0 (the token keeps its key).
// Pass B reads x_i again from the source and writes out_i once in the output dtype, so K and V
// are read from memory once and written once, with no copy, and the in-place op is safe: pass
// B writes token i only after pass A has read the whole block, and reads token i just before
// writing it. A task is a group of m blocks of one head, sized so that the group (N tokens x
// m kW columns) stays in L2 between the passes; each pass walks the group grid row by grid row,
// all its blocks side by side, prefetching a later row. A head dim that is not a multiple of kW
// leaves a narrower last block: a task of its own, run on a zero-padded float32 copy. The per
// token factor rows Fa, Fb (N (2q + 1) floats per batch item) stay in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "fresh_pages.h"
#include "ops/dscr.h"

#include "cpu/simd.h"

namespace kvfix {
namespace {

constexpr int64_t kW = 16;  // feature columns per block: one AVX-512 register of float32
constexpr int kMaxUnrolled = 24;  // factor counts q up to this keep their accumulators in registers
constexpr int64_t kQStep = 4;     // q = pc + rd is padded to a multiple of this
constexpr int64_t kPrefetchLines = 64;  // how far ahead (at least, in token blocks) the passes prefetch
constexpr int64_t kGroupBytes = 384 << 10;  // K / V bytes of one group of blocks (kept in L2)

// 16 float32 lanes (GCC vector extension: one zmm with AVX-512, two ymm with AVX2). ld / st
// take 64-byte aligned pointers (scratch); load_x / store_y access K and V (any alignment).
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
static KVFIX_INLINE v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
static KVFIX_INLINE void st(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// p[0, kW) as float32.
template <typename T>
static KVFIX_INLINE v16 load_x(const T* p) {
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
static KVFIX_INLINE void store_y(T* p, v16 v) {
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

struct Factors {
  const float *lr, *rr;  // row axis [gh, pr]
  const float *fa, *fb;  // per token of this batch item: fa [N, q], fb [N, q + 1] (see the top)
  int64_t gh, gw, pr, pc, q;
};

// Pass A over grid row a (gw tokens from x, stride sx): Z1[a] = the first pc sums, and
// pd += the last q - pc. Q > 0: Q == q accumulators in registers; Q == 0: any q, in acc.
// pf (or nullptr): the same tokens of a later grid row, prefetched (a block's tokens are
// 64-byte pieces D elements apart, which the hardware prefetchers follow poorly).
template <int Q, typename T>
static KVFIX_INLINE void reduce_row(const T* x, int64_t sx, const float* fa, int64_t gw, int64_t q, int64_t pc, float* z1a,
                         float* pd, float* acc_mem, const T* pf) {
  if constexpr (Q == 0) {
    for (int64_t p = 0; p < q; ++p) st(acc_mem + p * kW, v16{});
    for (int64_t w = 0; w < gw; ++w) {
      if (pf) __builtin_prefetch(pf + w * sx);
      const v16 xv = load_x(x + w * sx);
      for (int64_t p = 0; p < q; ++p) st(acc_mem + p * kW, ld(acc_mem + p * kW) + fa[w * q + p] * xv);
    }
    for (int64_t p = 0; p < q; ++p) {
      if (p < pc) st(z1a + p * kW, ld(acc_mem + p * kW));
      else st(pd + (p - pc) * kW, ld(pd + (p - pc) * kW) + ld(acc_mem + p * kW));
    }
  } else {
    v16 acc[Q];
#pragma GCC unroll 32
    for (int p = 0; p < Q; ++p) acc[p] = v16{};
    for (int64_t w = 0; w < gw; ++w) {
      if (pf) __builtin_prefetch(pf + w * sx);
      const v16 xv = load_x(x + w * sx);
      const float* f = fa + w * Q;
#pragma GCC unroll 32
      for (int p = 0; p < Q; ++p) acc[p] += f[p] * xv;
    }
#pragma GCC unroll 32
    for (int p = 0; p < Q; ++p) {
      if (p < pc) st(z1a + p * kW, acc[p]);
      else st(pd + (p - pc) * kW, ld(pd + (p - pc) * kW) + acc[p]);
    }
  }
}

// Pass B over grid row a: y_i = fb[i, :q] . [Z3[a] | P] + fb[i, q] x_i, written to y (stride sy).
// pf (or nullptr): the outputs of a later grid row, prefetched for writing.
template <int Q, typename T>
static KVFIX_INLINE void expand_row(const T* x, int64_t sx, T* y, int64_t sy, const float* fb, int64_t gw, int64_t q,
                         int64_t pc, const float* z3a, const float* pd, T* pf) {
  if constexpr (Q == 0) {
    for (int64_t w = 0; w < gw; ++w) {
      if (pf) __builtin_prefetch(pf + w * sy, 1);
      const float* f = fb + w * (q + 1);
      v16 acc = f[q] * load_x(x + w * sx);
      for (int64_t p = 0; p < q; ++p) acc += f[p] * ld(p < pc ? z3a + p * kW : pd + (p - pc) * kW);
      store_y(y + w * sy, acc);
    }
  } else {
    v16 z[Q];
#pragma GCC unroll 32
    for (int p = 0; p < Q; ++p) z[p] = ld(p < pc ? z3a + p * kW : pd + (p - pc) * kW);
    for (int64_t w = 0; w < gw; ++w) {
      if (pf) __builtin_prefetch(pf + w * sy, 1);
      const float* f = fb + w * (Q + 1);
      v16 acc0 = f[Q] * load_x(x + w * sx), acc1{};  // two chains: half the FMA latency
#pragma GCC unroll 32
      for (int p = 0; p < Q; p += 2) {
        acc0 += f[p] * z[p];
        if (p + 1 < Q) acc1 += f[p + 1] * z[p + 1];
      }
      store_y(y + w * sy, acc0 + acc1);
    }
  }
}

// q is padded to a multiple of kQStep (zero depth factors), so few widths are compiled.
#define KVFIX_DISPATCH_Q(q, CALL)                                                               \
  switch (q) {                                                                                 \
    case 4: CALL(4); break; case 8: CALL(8); break; case 12: CALL(12); break;                   \
    case 16: CALL(16); break; case 20: CALL(20); break; case 24: CALL(24); break;               \
    default: CALL(0); break;                                                                    \
  }
static_assert(kMaxUnrolled == 24 && kMaxUnrolled % kQStep == 0, "KVFIX_DISPATCH_Q lists the unrolled widths");

// Scratch of one group of m blocks (64-byte aligned floats): per block z1, z3 (gh * pc * kW)
// and pd ((q - pc) * kW); shared z2 (pr * pc * kW) and acc (q * kW).
struct Scratch {
  float *z1, *z2, *z3, *pd, *acc;
};

// m blocks of kW columns side by side (block c at column c * kW): x (stride sx tokens) -> y
// (stride sy; may be x). Grid rows outer, blocks inner, so each pass walks K and V row after
// row (the hardware prefetchers follow; software prefetches cover the rest).
template <typename T>
static KVFIX_INLINE void refine_group(const Factors& f, const T* x, int64_t sx, T* y, int64_t sy, int64_t m, const Scratch& w) {
  const int64_t gh = f.gh, gw = f.gw, pr = f.pr, pc = f.pc, q = f.q;
  const int64_t row = pc * kW;  // one grid row of Z1 / Z3, or one j of Z2
  const int64_t zb = gh * row, pb = (q - pc) * kW;  // per-block sizes of z1 / z3 and pd
  const int64_t ahead = (kPrefetchLines + gw * m - 1) / (gw * m);  // grid rows
  for (int64_t e = 0; e < m * pb; e += kW) st(w.pd + e, v16{});
  for (int64_t a = 0; a < gh; ++a) {
    for (int64_t c = 0; c < m; ++c) {
      const T* xa = x + a * gw * sx + c * kW;
      const T* pf = a + ahead < gh ? xa + ahead * gw * sx : nullptr;
#define KVFIX_RED(Q) \
  reduce_row<Q>(xa, sx, f.fa + a * gw * q, gw, q, pc, w.z1 + c * zb + a * row, w.pd + c * pb, w.acc, pf)
      KVFIX_DISPATCH_Q(q, KVFIX_RED)
#undef KVFIX_RED
    }
  }
  // Z2 = Rr^T Z1, Z3 = Lr Z2 per block: 2 gh pr pc vectors, small next to the N-long passes.
  for (int64_t c = 0; c < m; ++c) {
    const float* z1 = w.z1 + c * zb;
    float* z3 = w.z3 + c * zb;
    for (int64_t j = 0; j < pr; ++j) {
      for (int64_t e = 0; e < row; e += kW) {
        v16 s0{}, s1{};  // two chains
        int64_t a = 0;
        for (; a + 1 < gh; a += 2) {
          s0 += f.rr[a * pr + j] * ld(z1 + a * row + e);
          s1 += f.rr[(a + 1) * pr + j] * ld(z1 + (a + 1) * row + e);
        }
        if (a < gh) s0 += f.rr[a * pr + j] * ld(z1 + a * row + e);
        st(w.z2 + j * row + e, s0 + s1);
      }
    }
    for (int64_t a = 0; a < gh; ++a) {
      for (int64_t e = 0; e < row; e += kW) {
        v16 s{};
        for (int64_t j = 0; j < pr; ++j) s += f.lr[a * pr + j] * ld(w.z2 + j * row + e);
        st(z3 + a * row + e, s);
      }
    }
  }
  for (int64_t a = 0; a < gh; ++a) {
    for (int64_t c = 0; c < m; ++c) {
      const T* xa = x + a * gw * sx + c * kW;
      T* ya = y + a * gw * sy + c * kW;
      T* pf = a + ahead < gh ? ya + ahead * gw * sy : nullptr;
#define KVFIX_EXP(Q) \
  expand_row<Q>(xa, sx, ya, sy, f.fb + a * gw * (q + 1), gw, q, pc, w.z3 + c * zb + a * row, w.pd + c * pb, pf)
      KVFIX_DISPATCH_Q(q, KVFIX_EXP)
#undef KVFIX_EXP
    }
  }
}

// One instantiation per dtype, each compiled for AVX-512, AVX2 and baseline x86-64.
#define KVFIX_GROUP_FN(NAME, T)                                                                     \
  KVFIX_CPU_CLONES void NAME(const Factors& f, const T* x, int64_t sx, T* y, int64_t sy, int64_t m, \
                             const Scratch& w) {                                                    \
    refine_group<T>(f, x, sx, y, sy, m, w);                                                         \
  }
KVFIX_GROUP_FN(refine_group_f32, float)
KVFIX_GROUP_FN(refine_group_f16, c10::Half)
KVFIX_GROUP_FN(refine_group_bf16, c10::BFloat16)
#undef KVFIX_GROUP_FN

template <typename T>
void refine_group_any(const Factors& f, const T* x, int64_t sx, T* y, int64_t sy, int64_t m, const Scratch& w) {
  if constexpr (std::is_same_v<T, float>) refine_group_f32(f, x, sx, y, sy, m, w);
  else if constexpr (std::is_same_v<T, c10::Half>) refine_group_f16(f, x, sx, y, sy, m, w);
  else refine_group_bf16(f, x, sx, y, sy, m, w);
}

// 64-byte aligned float buffer.
struct Buffer {
  float* p = nullptr;
  explicit Buffer(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64))) {
    TORCH_CHECK(p != nullptr, "dscr_refine_lowrank: out of memory");
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// pc + rd rounded up to a multiple of kQStep: the extra depth factors are zero.
int64_t padded_q(int64_t pc, int64_t rd) { return (pc + rd + kQStep - 1) / kQStep * kQStep; }

// The per-token factor rows of every batch item of the depth factors (see the top):
// fa [Bd, N, q] = [Rc[w_i] | U[i]], fb [Bd, N, q + 1] = [cinv_i Lc[w_i] | cinv_i U[i] | a_i].
std::vector<float> token_factors(const at::Tensor& lc, const at::Tensor& rc, const at::Tensor& u,
                                 const at::Tensor& cinv, bool second) {
  const int64_t Bd = u.size(0), N = u.size(1), rd = u.size(2), gw = lc.size(0), pc = lc.size(1);
  const int64_t q = padded_q(pc, rd), width = second ? q + 1 : q;
  const float* axis = (second ? lc : rc).data_ptr<float>();
  std::vector<float> out(Bd * N * width, 0.0f);
  for (int64_t bd = 0; bd < Bd; ++bd) {
    for (int64_t i = 0; i < N; ++i) {
      const float* ui = u.data_ptr<float>() + (bd * N + i) * rd;
      const float c = second ? cinv.data_ptr<float>()[bd * N + i] : 1.0f;
      float* o = out.data() + (bd * N + i) * width;
      for (int64_t p = 0; p < pc; ++p) o[p] = c * axis[(i % gw) * pc + p];
      for (int64_t n = 0; n < rd; ++n) o[pc + n] = c * ui[n];
      if (second) o[q] = c > 0.0f ? -2.0f * c : 1.0f;
    }
  }
  return out;
}

// dsts[p] = refine(srcs[p]); each [B, H, N, D] with a contiguous last dim; dsts[p] may be srcs[p].
void refine(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const at::Tensor& lr,
            const at::Tensor& rr, const at::Tensor& lc, const at::Tensor& rc, const at::Tensor& u,
            const at::Tensor& cinv) {
  const int64_t N = srcs[0].size(2), B = srcs[0].size(0);
  if (N == 0 || B == 0) return;
  const int64_t gh = lr.size(0), pr = lr.size(1), gw = lc.size(0), pc = lc.size(1), q = padded_q(pc, u.size(2));
  const int64_t Bd = u.size(0);
  const std::vector<float> fa = token_factors(lc, rc, u, cinv, false), fb = token_factors(lc, rc, u, cinv, true);
  // Each head's full blocks run in groups of m (the group's N tokens x m * kW columns stay in L2
  // between the two passes); a last block narrower than kW is a task of its own.
  const int64_t m = std::max<int64_t>(1, kGroupBytes / (N * kW * static_cast<int64_t>(srcs[0].element_size())));
  struct Split {
    int64_t full, groups, tasks;  // per head: full blocks, their groups, tasks (groups + tail)
  };
  std::vector<Split> split;
  std::vector<int64_t> first(srcs.size() + 1, 0);  // task t -> (pair p, batch b, head h, task g)
  for (size_t p = 0; p < srcs.size(); ++p) {
    const int64_t D = srcs[p].size(3), full = D / kW, groups = (full + m - 1) / m;
    split.push_back({full, groups, groups + (D % kW != 0)});
    first[p + 1] = first[p] + B * srcs[p].size(1) * split.back().tasks;
  }
  at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
    Buffer z1(m * gh * pc * kW), z2(pr * pc * kW), z3(m * gh * pc * kW), pd(m * (q - pc) * kW), acc(q * kW);
    const Scratch w{z1.p, z2.p, z3.p, pd.p, acc.p};
    std::unique_ptr<Buffer> tail;  // the zero-padded copy of a narrow last block
    for (int64_t t = t0; t < t1; ++t) {
      const size_t p = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const at::Tensor& src = srcs[p];
      const at::Tensor& dst = dsts[p];
      const int64_t H = src.size(1), D = src.size(3), tasks = split[p].tasks, local = t - first[p];
      const int64_t g = local % tasks, h = (local / tasks) % H, b = local / (tasks * H);
      const int64_t bd = Bd == 1 ? 0 : b;
      const Factors f{lr.data_ptr<float>(), rr.data_ptr<float>(), fa.data() + bd * N * q,
                      fb.data() + bd * N * (q + 1), gh, gw, pr, pc, q};
      auto run = [&](auto zero) {
        using scalar_t = decltype(zero);
        const scalar_t* s = src.const_data_ptr<scalar_t>() + b * src.stride(0) + h * src.stride(1);
        scalar_t* o = dst.data_ptr<scalar_t>() + b * dst.stride(0) + h * dst.stride(1);
        const int64_t sn = src.stride(2), dn = dst.stride(2);
        if (g < split[p].groups) {
          const int64_t c0 = g * m;
          refine_group_any(f, s + c0 * kW, sn, o + c0 * kW, dn, std::min(m, split[p].full - c0), w);
          return;
        }
        const int64_t d0 = split[p].full * kW, width = D - d0;
        if (!tail) tail = std::make_unique<Buffer>(N * kW);
        float* xb = tail->p;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t l = 0; l < kW; ++l) xb[i * kW + l] = l < width ? static_cast<float>(s[i * sn + d0 + l]) : 0.0f;
        refine_group_any(f, static_cast<const float*>(xb), kW, xb, kW, 1, w);
        for (int64_t i = 0; i < N; ++i)
          for (int64_t l = 0; l < width; ++l) o[i * dn + d0 + l] = static_cast<scalar_t>(xb[i * kW + l]);
      };
      switch (src.scalar_type()) {  // the dtypes the op accepts (csrc/ops/dscr.cpp: dscr_check_kv)
        case at::kFloat: run(float{}); break;
        case at::kHalf: run(c10::Half{}); break;
        case at::kBFloat16: run(c10::BFloat16{}); break;
        default: TORCH_CHECK(false, "dscr_refine_lowrank: unsupported dtype ", src.scalar_type());
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> dscr_depth_factors_cpu(const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d) {
  const int64_t Bd = depth.size(0), N = depth.size(1), gw = lc.size(0);
  at::Tensor u = at::empty({Bd, N, rank_d}, depth.options());
  at::Tensor cinv = at::empty({Bd, N}, depth.options());
  // Spatial column sums: (Lr Rr^T 1)_a (Lc Rc^T 1)_w.
  auto axis_sums = [](const at::Tensor& L, const at::Tensor& R) {
    const int64_t g = L.size(0), p = L.size(1);
    const float *l = L.data_ptr<float>(), *r = R.data_ptr<float>();
    std::vector<double> rs(p, 0.0), out(g, 0.0);
    for (int64_t b = 0; b < g; ++b)
      for (int64_t q = 0; q < p; ++q) rs[q] += r[b * p + q];
    for (int64_t a = 0; a < g; ++a)
      for (int64_t q = 0; q < p; ++q) out[a] += double(l[a * p + q]) * rs[q];
    return out;
  };
  const std::vector<double> srow = axis_sums(lr, rr), scol = axis_sums(lc, rc);
  const double s2c = std::sqrt(2.0 * coef_d);
  std::vector<double> ud(N * rank_d), colsum(rank_d);
  for (int64_t bd = 0; bd < Bd; ++bd) {
    const float* d = depth.data_ptr<float>() + bd * N;
    float lo = d[0], hi = d[0];
    for (int64_t i = 1; i < N; ++i) lo = std::min(lo, d[i]), hi = std::max(hi, d[i]);
    const double mid = 0.5 * (double(lo) + double(hi));
    std::fill(colsum.begin(), colsum.end(), 0.0);
    for (int64_t i = 0; i < N; ++i) {  // Taylor factor exp(-c x^2) (sqrt(2c) x)^n / sqrt(n!), by recurrence
      const double x = double(d[i]) - mid;
      double* ui = ud.data() + i * rank_d;
      ui[0] = std::exp(-coef_d * x * x);
      for (int64_t n = 1; n < rank_d; ++n) ui[n] = ui[n - 1] * (s2c * x) / std::sqrt(double(n));
      for (int64_t n = 0; n < rank_d; ++n) colsum[n] += ui[n];
    }
    float* uo = u.data_ptr<float>() + bd * N * rank_d;
    float* co = cinv.data_ptr<float>() + bd * N;
    for (int64_t i = 0; i < N; ++i) {
      const double* ui = ud.data() + i * rank_d;
      double c = srow[i / gw] * scol[i % gw] - 2.0;
      for (int64_t n = 0; n < rank_d; ++n) {
        c += ui[n] * colsum[n];
        uo[i * rank_d + n] = static_cast<float>(ui[n]);
      }
      co[i] = (N > 1 && c > 0.0) ? static_cast<float>(1.0 / c) : 0.0f;
    }
  }
  return {u, cinv};
}

std::vector<at::Tensor> dscr_refine_lowrank_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                                const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                                int64_t rank_d) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs =
      dscr_lowrank_operands("dscr_refine_lowrank", {k}, vs, false, depth, lr, rr, lc, rc, coef_d, rank_d);
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs) outs.push_back(at::empty(s.sizes(), s.options()));
  prefault_outputs(outs);
  if (k.size(2) == 0) return outs;
  const auto uc = dscr_depth_factors_cpu(depth, lr, rr, lc, rc, coef_d, rank_d);
  refine(srcs, outs, lr, rr, lc, rc, uc[0], uc[1]);
  return outs;
}

void dscr_refine_lowrank_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                   const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                   const at::Tensor& rc, double coef_d, int64_t rank_d) {
  const std::vector<at::Tensor> all =
      dscr_lowrank_operands("dscr_refine_lowrank_cache_", keys, values, true, depth, lr, rr, lc, rc, coef_d, rank_d);
  if (keys[0].size(2) == 0) return;
  const auto uc = dscr_depth_factors_cpu(depth, lr, rr, lc, rc, coef_d, rank_d);
  refine(all, all, lr, rr, lc, rc, uc[0], uc[1]);
}

}  // namespace kvfix
