// Banded structured DSCR on the CPU (kvfix/dscr_structured.py, variant "banded"): the default units
// (patch coordinates, depth in [0, 255]), where the proximity is local in space and in depth.
//
// Per item the weights are  wt~ = S (x) S  +  A^T T A  (diagonal included, exactly 2), with
//   S: the spatial axis kernel s_|a-b| cut to the band |a - b| <= K (both axes; `band` = s_0..s_K),
//   A: [G x N] token -> depth node weights, token i touching the cnt consecutive nodes from tok[i]
//      (cnt = 1: a node is one depth value shared by all its tokens, exact; cnt = p: Lagrange
//      weights of the p nearest nodes of a uniform depth grid; cnt = C: Gaussian weights of the
//      C nodes of a uniform grid within reach, T diagonal),
//   T: [G x G] node kernel, row g non-zero on the consecutive nodes [row_lo[g], row_lo[g] + len),
//      values tvals[row_ptr[g], row_ptr[g + 1]).
// The plan (Python) builds all of it in float64 once per image, with an a-priori error bound.
// out_i = (S(x) S X + A^T T A X - 2 x_i) * cinv_i, or x_i where cinv_i == 0.
//
// A task is one head of one batch item of one tensor; it walks the head dim in blocks of kB = 64
// columns: (1) M = A X (cnt > 1: the block's tokens copied in the order of their first node, then
// two nodes at a time over that copy; float32 with one token of weight 1 per node: nothing, M is
// X's rows read in node order), (2) Y = T M (node scratch), then one grid row a at a time
// (3) Z = the row pass of S over X for grid row a + K, into a ring of 2K + 1 grid rows (scratch),
// (4) the column pass of S over Z plus A^T Y, the diagonal and the normalisation, written once in
// the output dtype. Step (4) writes grid row a after (1) has read the whole block and (3) the rows
// up to a + K, and reads only scratch and x_i: in place is safe. A head dim not a multiple of kB leaves a narrow
// last block, run on a zero-padded float32 copy. While (1) (cnt > 1) or (2) (cnt == 1) computes
// from scratch, the rows of the thread's next block are prefetched into L2, so that its first
// pass over K or V does not wait on memory; large out-of-place outputs are written with
// non-temporal stores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/simd.h"
#include "fresh_pages.h"
#include "ops/dscr.h"

// The vector-typed helpers below are always inlined into the target clones: no vector crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kvfix {
namespace {

struct Item {
  const int32_t* tok;     // [N] first node of each token (item-local)
  const float* tokw;      // [N, C] node weights (the first cnt used)
  const int64_t* row_ptr; // [G + 1] offsets into tvals (absolute)
  const int32_t* row_lo;  // [G] first column node of each row (item-local)
  const float* tvals;
  const float* cinv;      // [N]
  const int32_t* perm;    // [N] tokens ordered by first node (cnt > 1)
  const int32_t* start;   // [G + 1] start[g]: first position in perm whose first node is >= g
  const int32_t* stok;    // [N] tok in perm order (cnt > 1)
  const float* stokw;     // [N, cnt + 2] the node weights in perm order between two zeros (cnt > 1)
  const int32_t* node_tok;  // [G] the one token of each node where every node has one token of weight 1, else null
  int64_t G, cnt, C;
};

struct Geometry {
  const float* band;  // s_0..s_K
  int64_t K, gh, gw;
};

// A block of kB = 64 columns: eight v8 (eight AVX2 registers; AVX-512VL ymm in the v4 clone), so
// that each scalar weight (a node kernel entry, a band coefficient) is broadcast once for 64
// multiply-adds and each loop step has 8 independent FMA chains. (GCC's 64-byte generic vectors
// compile to stack round trips on AVX2: 32-byte ones keep the accumulators in registers.)
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
constexpr int kNB = 8;
constexpr int64_t kL = 8;  // lanes of a v8
constexpr int64_t kB = kNB * kL;
constexpr int64_t kH = kB / 2;  // half a block
struct Vb {
  v8 v[kNB];
};
#define KVFIX_NB _Pragma("GCC unroll 8") for (int j = 0; j < kNB; ++j)

// p[0, 8) as float32 (K and V: any alignment).
template <typename T>
static KVFIX_INLINE v8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *reinterpret_cast<const v8u*>(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bfloat16 -> float32: the bits shifted up
    return (v8)(__builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16);
  } else {
    v8 t;
    for (int l = 0; l < kL; ++l) t[l] = static_cast<float>(p[l]);
    return t;
  }
}

// p[0, 8) = T(v), rounded to nearest even as c10's conversions.
template <typename T>
static KVFIX_INLINE void store8(T* p, v8 v) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<v8u*>(p) = v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // c10::BFloat16(float), NaN -> 0x7fc0
    const u32x8 b = (u32x8)v;
    const u32x8 r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const i32x8 nan = v != v;
    *reinterpret_cast<u16x8*>(p) = __builtin_convertvector(nan ? u32x8{} + 0x7fc0u : r, u16x8);
  } else {
    for (int l = 0; l < kL; ++l) p[l] = static_cast<T>(v[l]);
  }
}

// store8 with non-temporal stores (16-byte aligned p): an out-of-place output written once and not
// read back here goes to memory without first being read into the cache.
template <typename T>
static KVFIX_INLINE void store8_nt(T* p, v8 v) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    typedef float v4 __attribute__((vector_size(16)));
    _mm_stream_ps(p, (__m128)v4{v[0], v[1], v[2], v[3]});
    _mm_stream_ps(p + 4, (__m128)v4{v[4], v[5], v[6], v[7]});
  } else {
    alignas(16) T t[kL];
    store8(t, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), *reinterpret_cast<const __m128i*>(t));
  }
#else
  store8(p, v);
#endif
}

static KVFIX_INLINE Vb ldb(const float* p) {
  Vb r;
  KVFIX_NB r.v[j] = *reinterpret_cast<const v8*>(p + j * kL);
  return r;
}
template <typename T>
static KVFIX_INLINE Vb load_b(const T* p) {
  Vb r;
  KVFIX_NB r.v[j] = load8(p + j * kL);
  return r;
}
static KVFIX_INLINE void stb(float* p, const Vb& a) { KVFIX_NB *reinterpret_cast<v8*>(p + j * kL) = a.v[j]; }
static KVFIX_INLINE void fma_b(Vb& acc, float s, const Vb& x) { KVFIX_NB acc.v[j] += s * x.v[j]; }
static KVFIX_INLINE Vb scale_b(float s, const Vb& x) {
  Vb r;
  KVFIX_NB r.v[j] = s * x.v[j];
  return r;
}
// acc += s (a + b), one vector at a time: at most one sum live (a whole block of sums would take
// eight registers more than AVX2 has, spilled once per tap)
template <typename T>
static KVFIX_INLINE void fma_sum_b(Vb& acc, float s, const T* a, const T* b) {
  KVFIX_NB acc.v[j] += s * (load8(a + j * kL) + load8(b + j * kL));
}

// The next block's rows (kB columns of each token: `bytes` bytes at nx + i * snx) requested into
// L2 while this block computes from its scratch: tokens [i0, i1). nx == nullptr: no next block.
struct Next {
  const char* nx;
  int64_t snx, bytes;
};
static KVFIX_INLINE void prefetch_next(const Next& nb, int64_t i0, int64_t i1) {
  if (nb.nx == nullptr) return;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t b = 0; b < nb.bytes; b += 64) __builtin_prefetch(nb.nx + i * nb.snx + b, 0, 2);
}

// One block of kB columns: x (token stride sx) -> y (stride sy; may be x). m, yn: [G, kB] and
// z: [min(2K + 1, gh) gw, kB] (the ring), xs: [2, N, kH] (two planes) float scratch (64-byte aligned).
template <typename T>
static KVFIX_INLINE void refine_block(const Geometry& g, const Item& it, const T* x, int64_t sx, T* y, int64_t sy, float* m,
                           float* yn, float* z, float* xs, const Next& nb, bool nt) {
  const int64_t gh = g.gh, gw = g.gw, N = gh * gw, K = g.K, G = it.G, cnt = it.cnt, C = it.C;
  const float* s = g.band;
  // (1) M = A X. direct: one token of weight 1 per node (depth values all distinct, as on a tilted
  // plane) in float32: M is X's rows in node order, which (2) reads from X itself.
  const bool direct = it.node_tok != nullptr && std::is_same_v<T, float>;
  if (cnt == 1 && !direct) {
    for (int64_t n = 0; n < G * kB; ++n) m[n] = 0.0f;
    for (int64_t i = 0; i < N; ++i) {
      float* mp = m + int64_t(it.tok[i]) * kB;
      Vb acc = ldb(mp);
      fma_b(acc, it.tokw[i * C], load_b(x + i * sx));
      stb(mp, acc);
    }
  } else if (cnt > 1) {
    // the block's tokens copied in node order first (xs: each token read from K or V once, with
    // prefetches a few tokens ahead), then node by node over consecutive rows of xs (no
    // read-modify-write of M): the tokens whose cnt nodes include n, each used cnt times while in cache
    constexpr int64_t kAhead = 8;
    for (int64_t q = 0; q < N; ++q) {
      if (q + kAhead < N) {
        const char* pf = reinterpret_cast<const char*>(x + int64_t(it.perm[q + kAhead]) * sx);
        for (int64_t b = 0; b < int64_t(kB * sizeof(T)); b += 64) __builtin_prefetch(pf + b);
      }
      const Vb xv = load_b(x + int64_t(it.perm[q]) * sx);
      _Pragma("GCC unroll 8") for (int j = 0; j < kNB; ++j)
        *reinterpret_cast<v8*>(xs + (j / (kNB / 2)) * N * kH + q * kH + (j % (kNB / 2)) * kL) = xv.v[j];
    }
    // two nodes n, n + 1 at a time, on half a block (32 columns, so that the rows in use stay in
    // L1): each row of xs read once for both (a token's weight for a node outside its window is
    // one of the two zeros around its weights in stokw). xs holds the two halves as two planes
    // [N, kH]: the rows of a window (about (cnt + 2) N / G tokens) are then consecutive 128-byte
    // rows, where 256-byte rows used half of every row's lines and so half of L1's sets (this loop
    // alone, in a standalone test with 6 tokens per node and cnt = 21: ~1.4x faster as planes; the
    // 64 x 64 ramp has 6-11 per node, and the whole op showed no measurable change on a noisy host).
    const int64_t W = cnt + 2;
    for (int64_t h = 0; h < kNB; h += kNB / 2) {
      for (int64_t n = 0; n < G; n += 2) {
        if (h == 0) prefetch_next(nb, n * N / G, std::min(n + 2, G) * N / G);
        v8 a0[kNB / 2] = {}, a1[kNB / 2] = {};
        const int64_t n1 = std::min(n + 2, G);
        for (int64_t q = it.start[std::max<int64_t>(0, n - cnt + 1)], e = it.start[n1]; q < e; ++q) {
          const float* w = it.stokw + q * W + 1 + (n - it.stok[q]);
          const float w0 = w[0], w1 = w[1];
          const float* xp = xs + (h / (kNB / 2)) * N * kH + q * kH;
          // xv loaded once into a register (volatile: GCC otherwise folds the load into both
          // multiply-adds, two loads per vector, and the loop is bound by loads, not FMAs)
          _Pragma("GCC unroll 4") for (int j = 0; j < kNB / 2; ++j) {
            const v8 xv = *reinterpret_cast<const volatile v8*>(xp + j * kL);
            a0[j] += w0 * xv;
            a1[j] += w1 * xv;
          }
        }
        _Pragma("GCC unroll 4") for (int j = 0; j < kNB / 2; ++j) {
          *reinterpret_cast<v8*>(m + n * kB + (h + j) * kL) = a0[j];
          if (n + 1 < G) *reinterpret_cast<v8*>(m + (n + 1) * kB + (h + j) * kL) = a1[j];
        }
      }
    }
  }
  // (2) Y = T M. One token per node (direct): M's rows read from X, and Y written in token order,
  // so that (4) reads it in order too.
  auto tm = [&](auto mrow, auto yrow) __attribute__((always_inline)) {  // node n's rows of M and Y
    for (int64_t n = 0; n < G; ++n) {
      if (cnt == 1) prefetch_next(nb, n * N / G, (n + 1) * N / G);
      const float* t = it.tvals + it.row_ptr[n];
      const int64_t lo = it.row_lo[n], len = it.row_ptr[n + 1] - it.row_ptr[n];
      Vb acc{};
      for (int64_t e = 0; e < len; ++e) {
        const float* r = mrow(lo + e);
        KVFIX_NB acc.v[j] += t[e] * *reinterpret_cast<const v8u*>(r + j * kL);
      }
      stb(yrow(n), acc);
    }
  };
  if (direct) {
    const float* xf = reinterpret_cast<const float*>(x);  // T is float here
    tm([&](int64_t e) __attribute__((always_inline)) { return xf + int64_t(it.node_tok[e]) * sx; },
       [&](int64_t n) __attribute__((always_inline)) { return yn + int64_t(it.node_tok[n]) * kB; });
  } else {
    tm([&](int64_t e) __attribute__((always_inline)) { return m + e * kB; },
       [&](int64_t n) __attribute__((always_inline)) { return yn + n * kB; });
  }
  // (3) + (4), one grid row at a time: the row pass fills Z's grid row a + K into a ring of
  // R = min(2K + 1, gh) grid rows (z), then the column pass reads rows a - K .. a + K of it. The
  // ring stays in L2 where the whole Z would not (64 x 64: 144 KiB against 1 MiB). In place: the
  // row pass of row a + K reads only x's row a + K, which (4) has not written yet (rows < a).
  const int64_t R = std::min(2 * K + 1, gh), rs = gw * kB;  // rs: one grid row of Z
  // (always inlined: a lambda left out of line is compiled for the baseline target, not the clone's)
  auto row_pass = [&](int64_t a) __attribute__((always_inline)) {  // Z[a, w] = sum_{|k| <= K} s_|k| x[a, w + k]
    const T* xr = x + a * gw * sx;
    float* zr = z + (a % R) * rs;
    for (int64_t w = 0; w < gw; ++w) {
      Vb acc = scale_b(s[0], load_b(xr + w * sx));
      const int64_t klo = std::min(K, w), khi = std::min(K, gw - 1 - w);
      if (klo == K && khi == K) {
        for (int64_t k = 1; k <= K; ++k) fma_sum_b(acc, s[k], xr + (w - k) * sx, xr + (w + k) * sx);
      } else {
        for (int64_t k = 1; k <= klo; ++k) fma_b(acc, s[k], load_b(xr + (w - k) * sx));
        for (int64_t k = 1; k <= khi; ++k) fma_b(acc, s[k], load_b(xr + (w + k) * sx));
      }
      stb(zr + w * kB, acc);
    }
  };
  std::vector<const float*> ring(2 * K + 1);
  const float* const* zr = ring.data() + K;  // zr[k]: Z's grid row a + k in the ring, |k| <= K
  for (int64_t a = 0; a < std::min(K, gh); ++a) row_pass(a);
  for (int64_t a = 0; a < gh; ++a) {
    if (a + K < gh) row_pass(a + K);
    const int64_t klo = std::min(K, a), khi = std::min(K, gh - 1 - a);
    for (int64_t k = -klo; k <= khi; ++k) ring[K + k] = z + ((a + k) % R) * rs;
    for (int64_t w = 0; w < gw; ++w) {
      const int64_t i = a * gw + w, wo = w * kB;
      Vb acc = scale_b(s[0], ldb(zr[0] + wo));
      if (klo == K && khi == K) {
        for (int64_t k = 1; k <= K; ++k) fma_sum_b(acc, s[k], zr[-k] + wo, zr[k] + wo);
      } else {
        for (int64_t k = 1; k <= klo; ++k) fma_b(acc, s[k], ldb(zr[-k] + wo));
        for (int64_t k = 1; k <= khi; ++k) fma_b(acc, s[k], ldb(zr[k] + wo));
      }
      const float* yp = yn + (direct ? i : int64_t(it.tok[i])) * kB;
      const float* wv = it.tokw + i * C;
      for (int64_t c = 0; c < cnt; ++c) fma_b(acc, wv[c], ldb(yp + c * kB));
      const Vb xv = load_b(x + i * sx);
      const float ci = it.cinv[i];
      if (nt) {
        if (ci != 0.0f) {
          KVFIX_NB store8_nt(y + i * sy + j * kL, (acc.v[j] - 2.0f * xv.v[j]) * ci);
        } else {
          KVFIX_NB store8_nt(y + i * sy + j * kL, xv.v[j]);
        }
      } else if (ci != 0.0f) {
        KVFIX_NB store8(y + i * sy + j * kL, (acc.v[j] - 2.0f * xv.v[j]) * ci);
      } else {
        KVFIX_NB store8(y + i * sy + j * kL, xv.v[j]);
      }
    }
  }
}

// One instantiation per dtype, each compiled for AVX-512, AVX2 and baseline x86-64.
#define KVFIX_BLOCK_FN(NAME, T)                                                                          \
  KVFIX_CPU_CLONES void NAME(const Geometry& g, const Item& it, const T* x, int64_t sx, T* y, int64_t sy, \
                             float* m, float* yn, float* z, float* xs, const Next& nb, bool nt) {        \
    refine_block<T>(g, it, x, sx, y, sy, m, yn, z, xs, nb, nt);                                          \
  }
KVFIX_BLOCK_FN(refine_block_f32, float)
KVFIX_BLOCK_FN(refine_block_f16, c10::Half)
KVFIX_BLOCK_FN(refine_block_bf16, c10::BFloat16)
#undef KVFIX_BLOCK_FN

template <typename T>
void refine_block_any(const Geometry& g, const Item& it, const T* x, int64_t sx, T* y, int64_t sy, float* m,
                      float* yn, float* z, float* xs, const Next& nb, bool nt) {
  if constexpr (std::is_same_v<T, float>) refine_block_f32(g, it, x, sx, y, sy, m, yn, z, xs, nb, nt);
  else if constexpr (std::is_same_v<T, c10::Half>) refine_block_f16(g, it, x, sx, y, sy, m, yn, z, xs, nb, nt);
  else refine_block_bf16(g, it, x, sx, y, sy, m, yn, z, xs, nb, nt);
}

// Outputs from this size on are written with non-temporal stores when out of place: the CPU does
// not first read each fresh line into its caches (development machine, 2 threads, 24 x 24 ramp,
// 32 heads, float32, out of place: 8.4-8.9 ms -> 7.3 ms with the prefetches, 7.4-7.9 without).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

struct Buffer {  // 64-byte aligned floats
  float* p = nullptr;
  explicit Buffer(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64))) {
    TORCH_CHECK(p != nullptr, "dscr_refine_banded: out of memory");
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

using Structure = DscrBanded;  // checked by dscr_banded_operands (csrc/ops/dscr.cpp)

void refine(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const Structure& s) {
  const int64_t B = srcs[0].size(0), N = srcs[0].size(2);
  if (N == 0 || B == 0) return;
  const int64_t Bd = s.tok.size(0), C = s.tokw.size(2);
  const int64_t* off = s.node_off.data_ptr<int64_t>();
  int64_t Gmax = 0;
  for (int64_t bd = 0; bd < Bd; ++bd) Gmax = std::max(Gmax, off[bd + 1] - off[bd]);
  const Geometry geo{s.band.data_ptr<float>(), s.band.numel() - 1, s.gh, N / s.gh};
  // per item with cnt > 1: tokens ordered by their first node (a counting sort), their first
  // nodes and weights in that order, for the node-by-node sums; per item whose every node has one
  // token of weight 1 (cnt == 1, G == N): each node's token (node_tok)
  std::vector<std::vector<int32_t>> perm(Bd), start(Bd), stok(Bd), node_tok(Bd);
  std::vector<std::vector<float>> stokw(Bd);
  bool sorted = false;
  for (int64_t bd = 0; bd < Bd; ++bd) {
    const int64_t G = off[bd + 1] - off[bd], cnt = s.cnt.data_ptr<int32_t>()[bd];
    if (cnt == 1) {
      if (G != N) continue;
      const int32_t* tok = s.tok.data_ptr<int32_t>() + bd * N;
      const float* tokw = s.tokw.data_ptr<float>() + bd * N * C;
      node_tok[bd].assign(G, -1);
      bool one = true;
      for (int64_t i = 0; i < N && one; ++i) {
        one = tokw[i * C] == 1.0f && node_tok[bd][tok[i]] < 0;
        node_tok[bd][tok[i]] = static_cast<int32_t>(i);
      }
      if (!one) node_tok[bd].clear();
      continue;
    }
    sorted = true;
    const int32_t* tok = s.tok.data_ptr<int32_t>() + bd * N;
    const float* tokw = s.tokw.data_ptr<float>() + bd * N * C;
    start[bd].assign(G + 1, 0);
    for (int64_t i = 0; i < N; ++i) ++start[bd][tok[i] + 1];
    for (int64_t g = 0; g < G; ++g) start[bd][g + 1] += start[bd][g];
    std::vector<int32_t> fill(start[bd].begin(), start[bd].end() - 1);
    perm[bd].resize(N);
    for (int64_t i = 0; i < N; ++i) perm[bd][fill[tok[i]]++] = static_cast<int32_t>(i);
    stok[bd].resize(N);
    stokw[bd].assign(N * (cnt + 2), 0.0f);
    for (int64_t q = 0; q < N; ++q) {
      const int64_t i = perm[bd][q];
      stok[bd][q] = tok[i];
      std::copy(tokw + i * C, tokw + i * C + cnt, stokw[bd].begin() + q * (cnt + 2) + 1);
    }
  }
  std::vector<int64_t> first(srcs.size() + 1, 0);  // task t -> (tensor p, batch b, head h)
  for (size_t p = 0; p < srcs.size(); ++p) first[p + 1] = first[p] + B * srcs[p].size(1);
  // task t -> (its tensor, batch item, head)
  auto task = [&](int64_t t) {
    const size_t p = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t H = srcs[p].size(1), local = t - first[p];
    return std::make_tuple(p, local / H, local % H);
  };
  auto first_block = [&](int64_t t) {  // task t's first block, for prefetch_next
    const auto [p, b, h] = task(t);
    const at::Tensor& src = srcs[p];
    const int64_t esz = src.element_size();
    return Next{static_cast<const char*>(src.const_data_ptr()) + (b * src.stride(0) + h * src.stride(1)) * esz,
                src.stride(2) * esz, std::min(kB, src.size(3)) * esz};
  };
  at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
    Buffer m(Gmax * kB), yn(Gmax * kB), z(std::min(2 * geo.K + 1, geo.gh) * geo.gw * kB), xs(sorted ? N * kB : 1);
    std::unique_ptr<Buffer> tail;
    for (int64_t t = t0; t < t1; ++t) {
      const auto [p, b, h] = task(t);
      const at::Tensor& src = srcs[p];
      const at::Tensor& dst = dsts[p];
      const int64_t D = src.size(3);
      const Next after = t + 1 < t1 ? first_block(t + 1) : Next{nullptr, 0, 0};  // the task's last block's next
      const int64_t bd = Bd == 1 ? 0 : b, g0 = off[bd];
      const Item it{s.tok.data_ptr<int32_t>() + bd * N, s.tokw.data_ptr<float>() + bd * N * C,
                    s.row_ptr.data_ptr<int64_t>() + g0, s.row_lo.data_ptr<int32_t>() + g0, s.tvals.data_ptr<float>(),
                    s.cinv.data_ptr<float>() + bd * N, perm[bd].data(), start[bd].data(), stok[bd].data(),
                    stokw[bd].data(), node_tok[bd].empty() ? nullptr : node_tok[bd].data(), off[bd + 1] - g0,
                    s.cnt.data_ptr<int32_t>()[bd], C};
      auto run = [&](auto zero) {
        using scalar_t = decltype(zero);
        const scalar_t* x = src.const_data_ptr<scalar_t>() + b * src.stride(0) + h * src.stride(1);
        scalar_t* y = dst.data_ptr<scalar_t>() + b * dst.stride(0) + h * dst.stride(1);
        const int64_t sx = src.stride(2), sy = dst.stride(2), full = D / kB, d0 = full * kB, width = D - d0;
        const int64_t esz = sizeof(scalar_t);
        // non-temporal stores: a large out-of-place output (beyond what private caches keep)
        // whose rows are 16-byte aligned
        const bool nt = dst.data_ptr() != src.data_ptr() && dst.nbytes() >= kStreamBytes &&
                        reinterpret_cast<uintptr_t>(y) % 16 == 0 && (sy * esz) % 16 == 0;
        for (int64_t c = 0; c < full; ++c) {
          const Next nb = c + 1 < full ? Next{reinterpret_cast<const char*>(x + (c + 1) * kB), sx * esz, kB * esz}
                          : width > 0  ? Next{reinterpret_cast<const char*>(x + d0), sx * esz, width * esz}
                                       : after;
          refine_block_any(geo, it, x + c * kB, sx, y + c * kB, sy, m.p, yn.p, z.p, xs.p, nb, nt);
        }
        if (width == 0) return;
        if (!tail) tail = std::make_unique<Buffer>(N * kB);
        float* xb = tail->p;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t l = 0; l < kB; ++l) xb[i * kB + l] = l < width ? static_cast<float>(x[i * sx + d0 + l]) : 0.0f;
        refine_block_any(geo, it, static_cast<const float*>(xb), kB, xb, kB, m.p, yn.p, z.p, xs.p, after, false);
        for (int64_t i = 0; i < N; ++i)
          for (int64_t l = 0; l < width; ++l) y[i * sy + d0 + l] = static_cast<scalar_t>(xb[i * kB + l]);
      };
      switch (src.scalar_type()) {
        case at::kFloat: run(float{}); break;
        case at::kHalf: run(c10::Half{}); break;
        case at::kBFloat16: run(c10::BFloat16{}); break;
        default: TORCH_CHECK(false, "dscr_refine_banded: unsupported dtype ", src.scalar_type());
      }
    }
#if defined(__x86_64__)
    _mm_sfence();  // the non-temporal stores visible before the op returns
#endif
  });
}

}  // namespace

std::vector<at::Tensor> dscr_refine_banded_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                               const at::Tensor& tok, const at::Tensor& tokw, const at::Tensor& cnt,
                                               const at::Tensor& row_ptr, const at::Tensor& row_lo,
                                               const at::Tensor& tvals, const at::Tensor& node_off,
                                               const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  const Structure s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs = dscr_banded_operands("dscr_refine_banded", {k}, vs, false, s);
  std::vector<at::Tensor> outs;
  for (const auto& x : srcs) outs.push_back(at::empty(x.sizes(), x.options()));
  prefault_outputs(outs);
  refine(srcs, outs, s);
  return outs;
}

void dscr_refine_banded_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                  const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                  const at::Tensor& row_lo, const at::Tensor& tvals, const at::Tensor& node_off,
                                  const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  const Structure s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  const std::vector<at::Tensor> all = dscr_banded_operands("dscr_refine_banded_cache_", keys, values, true, s);
  refine(all, all, s);
}

}  // namespace kvfix
