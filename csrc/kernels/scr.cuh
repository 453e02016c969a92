// SCR (METHODS §3) as CUDA launches. Framework-free: CUDA runtime and C++ headers only, so the ATen
// side (csrc/cuda/scr.cu), the resource report (tools/ptxas_report.py) and the CPU-side SIMT
// emulator (tests/emu/) all compile this source.
//
// scr_scores: q [B, Hq, Tq, D], k [B, Hkv, T, D] (query head hq reads kv head hq / g), image
// columns [start, start + N):
//
//   scores[b, j] = (1 / Hq) sum_hq sum_i p[b, hq, i, start + j],  p = softmax over all T keys of
//   q_i . k_t * scale + mask (keys with bool False / additive -inf / causal t > T - Tq + i take no
//   part; a row without keys contributes 0; a nan or +inf logit of a key taking part makes its
//   row's p nan in every column, as softmax does, hence the item's scores).
//
// Three launches, all with 128 threads (4 warps) and static shared memory. Logits come in tiles of
// kScrRows query rows x kScrCols keys: warp w owns rows 4w .. 4w + 3 of the tile, lane l key l; the
// q and k tiles are staged in shared memory (fp32) kScrDChunk dims at a time, so any D works.
//   1. scr_scores_stats_kernel, one block per (row tile, query head, item): walks the key tiles
//      (causal: up to the tile's last position) keeping a per-lane online softmax state (m, l) per
//      row, merges the lanes with xor shuffles and writes (m, l) per row to the workspace.
//   2. scr_scores_mass_kernel, one block per (tile of kScrCols image columns, query head, item):
//      recomputes the image columns' logits row tile by row tile, adds e^(x - m_i) / l_i per column
//      (nan for every column of a row whose state is nan, also rows a causal column cannot see),
//      merges the 4 warps in a fixed order and writes the head's column sums to the workspace.
//      (The image columns' logits are computed twice instead of keeping a [Tq, N] matrix per head.)
//   3. scr_scores_reduce_kernel: scores[b, j] = sum over heads in a fixed order / Hq.
// No atomics: deterministic.
//
// scr_redistribute: hidden [B, N, C] on a gh x gw grid, scores [B, N] float32. The host reads
// nothing: an item with a non-finite score (nan, +-inf) has no defined top_k, and every row of its
// output (in place: of hidden) is written nan; the other items are unaffected. (The CPU op raises
// instead, where reading the scores costs no device round trip.)
//   1. scr_select_kernel, one block of 128 candidates per (tile, item): a candidate's rank is the
//      number of candidates before it in the order (score descending, index ascending), counted
//      against tiles of scores and candidate flags staged in shared memory; it is a source when
//      rank < top_k. Every block scans all of its item's scores, so each one also sees whether
//      any is non-finite. Writes a flag per patch (1 = source, 2 = the item's scores are not finite).
//   2. scr_redistribute_apply_kernel, one block per (row, item) (C in a strided loop, 16 bytes per
//      access where the tensors' alignment allows, two accesses' loads in flight per thread): gathers its
//      8 neighbours' flags and writes h / lam (source), h + (lam - 1) sum of the adjacent sources'
//      rows (neighbour, fp32, neighbours in row-major window order), nan (flag 2) or a copy (other
//      rows, out of place only). Out of place every row reads the input only. In place it runs
//      twice on one stream: first the neighbour rows and the nan rows (reading the still untouched
//      source rows), then the source rows; nothing else is written.
#pragma once

// For tools/ptxas_report.py (each launcher instantiates every kernel shape it can launch):
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_scores_launch<float>(const kvfix::kernels::ScrScoresArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_scores_launch<__half>(const kvfix::kernels::ScrScoresArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_scores_launch<__nv_bfloat16>(const kvfix::kernels::ScrScoresArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_redistribute_launch<float>(const kvfix::kernels::ScrRedistributeArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_redistribute_launch<__half>(const kvfix::kernels::ScrRedistributeArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::scr_redistribute_launch<__nv_bfloat16>(const kvfix::kernels::ScrRedistributeArgs&, cudaStream_t);

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "num.h"

namespace kvfix::kernels {

// Element strides (not bytes); every last dim is contiguous.
struct ScrScoresArgs {
  const void* q;  // [B, Hq, Tq, D]
  int64_t q_sb, q_sh, q_si;
  const void* k;  // [B, Hkv, T, D]
  int64_t k_sb, k_sh, k_st;
  MaskView mask;     // [B, Hq, Tq, T] broadcast (kind 0: none)
  float* scores;     // [B, N] contiguous float32
  float* work;       // scr_scores_workspace_floats(*this) floats
  int64_t B, Hq, Hkv, Tq, T, D, start, N;
  float scale;
  bool causal;       // query i at position T - Tq + i sees keys <= it (needs Tq <= T)
};

struct ScrRedistributeArgs {
  const void* hidden;  // [B, N, C]
  int64_t h_sb, h_sn;
  void* out;           // [B, N, C]: a new tensor, or hidden itself (in place)
  int64_t o_sb, o_sn;
  const float* scores; // [B, N] contiguous
  uint8_t* flags;      // [B, N] workspace
  int64_t B, N, C, gh, gw, top_k;
  float lam;
  bool exclude_border;
  bool in_place;
};

// The kernels use static shared memory only (read by tools/ptxas_report.py).
constexpr int kScrDynamicSmemBytes = 0;
constexpr int kScrThreads = 128;  // every kernel
constexpr int kScrRows = 16;      // query rows per logits tile (4 per warp)
constexpr int kScrCols = 32;      // keys per logits tile (one per lane)
constexpr int kScrDChunk = 64;    // head dims staged at a time

// Workspace floats of one scr_scores call: (m, l) per (b, hq, row), then a column sum per (b, hq, j).
inline int64_t scr_scores_workspace_floats(const ScrScoresArgs& a) {
  return a.B * a.Hq * a.Tq * 2 + a.B * a.Hq * a.N;
}

namespace scr_detail {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// Logit of row i and key t (x = dot * scale + mask), -inf where the key takes no part or the
// (row, key) pair is outside the problem.
__device__ __forceinline__ float logit(const ScrScoresArgs& a, int64_t b, int64_t h, int64_t i, int64_t t, float dot) {
  if (i >= a.Tq || t >= a.T || (a.causal && t > a.T - a.Tq + i)) return neg_inf();
  const float bias = Mask::at(a.mask, b, h, i, t);
  return bias == neg_inf() ? neg_inf() : dot * a.scale + bias;
}

struct Tiles {
  float q[kScrRows][kScrDChunk];
  float k[kScrCols][kScrDChunk + 1];  // +1: lanes read different rows of one column without bank conflicts
};

// dot[r] = q[i0 + 4 * warp + r] . k[t0 + lane] over all D (0 outside the problem). Every thread of
// the block must call it (it synchronises).
template <class T>
__device__ __forceinline__ void tile_dots(const ScrScoresArgs& a, int64_t b, int64_t h, int64_t i0, int64_t t0,
                                          Tiles& s, float dot[4]) {
  const T* qb = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + (h / (a.Hq / a.Hkv)) * a.k_sh;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int r = 0; r < 4; ++r) dot[r] = 0.0f;
  for (int64_t d0 = 0; d0 < a.D; d0 += kScrDChunk) {
    const int dc = a.D - d0 < kScrDChunk ? static_cast<int>(a.D - d0) : kScrDChunk;
    __syncthreads();  // the previous chunk's readers are done
    for (int e = tid; e < kScrRows * kScrDChunk; e += kScrThreads) {
      const int r = e / kScrDChunk, d = e % kScrDChunk;
      const int64_t i = i0 + r;
      s.q[r][d] = (i < a.Tq && d < dc) ? Num<T>::to_f(qb[i * a.q_si + d0 + d]) : 0.0f;
    }
    for (int e = tid; e < kScrCols * kScrDChunk; e += kScrThreads) {
      const int c = e / kScrDChunk, d = e % kScrDChunk;
      const int64_t t = t0 + c;
      s.k[c][d] = (t < a.T && d < dc) ? Num<T>::to_f(kb[t * a.k_st + d0 + d]) : 0.0f;
    }
    __syncthreads();
    for (int d = 0; d < dc; ++d) {
      const float kv = s.k[lane][d];
      for (int r = 0; r < 4; ++r) dot[r] += s.q[4 * warp + r][d] * kv;
    }
  }
}

// Online softmax state (m, l) of x folded into (m, l). A nan or +inf logit has no softmax: l = nan,
// which every later fold and merge keeps (also where it is the row's only key).
__device__ __forceinline__ void fold(float& m, float& l, float x) {
  if (x == neg_inf()) return;
  if (!(x <= 3.402823466e38f)) {
    l = __int_as_float(0x7fffffff);
    return;
  }
  if (x > m) {
    l = l * expf(m - x) + 1.0f;  // m = -inf at first: expf(-inf) = 0
    m = x;
  } else {
    l += expf(x - m);
  }
}

__device__ __forceinline__ void merge(float& m, float& l, float m2, float l2) {
  if (l2 == 0.0f || l != l) return;
  if (l == 0.0f || l2 != l2) {
    m = m2;
    l = l2;
    return;
  }
  const float mm = m > m2 ? m : m2;
  l = l * expf(m - mm) + l2 * expf(m2 - mm);
  m = mm;
}

}  // namespace scr_detail

template <class T>
__global__ void __launch_bounds__(kScrThreads) scr_scores_stats_kernel(ScrScoresArgs a) {
  using namespace scr_detail;
  __shared__ Tiles s;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kScrRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float m[4], l[4], dot[4];
  for (int r = 0; r < 4; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
  }
  // Keys the tile can see: causal rows see up to T - Tq + their index.
  const int64_t last_row = i0 + kScrRows < a.Tq ? i0 + kScrRows : a.Tq;
  const int64_t t_end = a.causal ? a.T - a.Tq + last_row : a.T;
  for (int64_t t0 = 0; t0 < t_end; t0 += kScrCols) {
    tile_dots<T>(a, b, h, i0, t0, s, dot);
    for (int r = 0; r < 4; ++r) fold(m[r], l[r], logit(a, b, h, i0 + 4 * warp + r, t0 + lane, dot[r]));
  }
  for (int r = 0; r < 4; ++r) {
    for (int off = 16; off > 0; off /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
      merge(m[r], l[r], m2, l2);
    }
    const int64_t i = i0 + 4 * warp + r;
    if (lane == 0 && i < a.Tq) {
      float* st = a.work + ((b * a.Hq + h) * a.Tq + i) * 2;
      st[0] = m[r];
      st[1] = l[r];
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kScrThreads) scr_scores_mass_kernel(ScrScoresArgs a) {
  using namespace scr_detail;
  __shared__ Tiles s;
  __shared__ float part[4][kScrCols];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kScrCols, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = a.start + j0 + lane;  // this lane's key; past the image span: contributes nothing
  const bool in_span = j0 + lane < a.N;
  const float* stats = a.work + (b * a.Hq + h) * a.Tq * 2;
  float acc = 0.0f, dot[4];
  // Causal rows before T - Tq + ... never see the tile's first key: start at the first row that can
  // (a nan row among those still makes every column nan).
  int64_t first = 0;
  if (a.causal) {
    const int64_t need = a.start + j0 - (a.T - a.Tq);  // rows i >= need see key start + j0
    first = need > 0 ? (need / kScrRows) * kScrRows : 0;
    for (int64_t i = 0; i < first; ++i)  // every lane: each column must turn nan
      if (stats[2 * i + 1] != stats[2 * i + 1]) acc = stats[2 * i + 1];
  }
  for (int64_t i0 = first; i0 < a.Tq; i0 += kScrRows) {
    tile_dots<T>(a, b, h, i0, a.start + j0, s, dot);
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + 4 * warp + r;
      const float x = in_span ? logit(a, b, h, i, t, dot[r]) : neg_inf();
      if (i < a.Tq && (x != neg_inf() || stats[2 * i + 1] != stats[2 * i + 1])) {
        const float mi = stats[2 * i], li = stats[2 * i + 1];
        acc += expf(x - mi) / li;  // li nan: nan
      }
    }
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && in_span) {
    const float sum = ((part[0][lane] + part[1][lane]) + part[2][lane]) + part[3][lane];
    a.work[a.B * a.Hq * a.Tq * 2 + (b * a.Hq + h) * a.N + j0 + lane] = sum;
  }
}

__global__ void __launch_bounds__(kScrThreads) scr_scores_reduce_kernel(ScrScoresArgs a) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kScrThreads + threadIdx.x;
  if (e >= a.B * a.N) return;
  const int64_t b = e / a.N, j = e % a.N;
  const float* col = a.work + a.B * a.Hq * a.Tq * 2 + b * a.Hq * a.N + j;
  float sum = 0.0f;
  for (int64_t h = 0; h < a.Hq; ++h) sum += col[h * a.N];
  a.scores[e] = sum / static_cast<float>(a.Hq);
}

template <class T>
cudaError_t scr_scores_launch(const ScrScoresArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  const dim3 block(kScrThreads);
  scr_scores_stats_kernel<T><<<dim3(static_cast<unsigned>((a.Tq + kScrRows - 1) / kScrRows),
                                    static_cast<unsigned>(a.Hq), static_cast<unsigned>(a.B)),
                               block, 0, stream>>>(a);
  scr_scores_mass_kernel<T><<<dim3(static_cast<unsigned>((a.N + kScrCols - 1) / kScrCols),
                                   static_cast<unsigned>(a.Hq), static_cast<unsigned>(a.B)),
                              block, 0, stream>>>(a);
  scr_scores_reduce_kernel<<<dim3(static_cast<unsigned>((a.B * a.N + kScrThreads - 1) / kScrThreads)), block, 0,
                             stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// scr_redistribute

__global__ void __launch_bounds__(kScrThreads) scr_select_kernel(ScrRedistributeArgs a) {
  __shared__ float tile[kScrThreads];
  __shared__ bool tile_cand[kScrThreads];
  __shared__ bool not_finite;  // any score of the item is nan or +-inf
  const int64_t b = blockIdx.y, n = static_cast<int64_t>(blockIdx.x) * kScrThreads + threadIdx.x;
  if (threadIdx.x == 0) not_finite = false;  // the loop's first barrier orders this before any write
  const float* s = a.scores + b * a.N;
  auto candidate = [&](int64_t p) {
    if (!a.exclude_border) return true;
    const int64_t r = p / a.gw, c = p % a.gw;
    return r > 0 && r < a.gh - 1 && c > 0 && c < a.gw - 1;
  };
  const bool mine = n < a.N && candidate(n);
  const float sn = n < a.N ? s[n] : 0.0f;
  int64_t rank = 0;
  for (int64_t p0 = 0; p0 < a.N; p0 += kScrThreads) {
    __syncthreads();
    if (p0 + threadIdx.x < a.N) {
      const float v = s[p0 + threadIdx.x];
      tile[threadIdx.x] = v;
      tile_cand[threadIdx.x] = candidate(p0 + threadIdx.x);
      if ((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) not_finite = true;  // exponent all ones
    }
    __syncthreads();
    const int64_t len = a.N - p0 < kScrThreads ? a.N - p0 : kScrThreads;
    if (mine)
      for (int64_t e = 0; e < len; ++e) {
        const float sp = tile[e];
        if (tile_cand[e] && (sp > sn || (sp == sn && p0 + e < n))) ++rank;
      }
  }
  // the last tile's barrier ordered every thread's not_finite write before this read
  if (n < a.N) a.flags[b * a.N + n] = not_finite ? 2 : (mine && rank < a.top_k) ? 1 : 0;
}

// Elements per access of the apply kernel: 16 bytes (4 float32, 8 float16 / bfloat16) where both
// tensors' bases are 16-byte aligned and C and every stride used (dims of size > 1) are multiples
// of it, else 1.
template <class T>
inline int scr_redistribute_vec_width(const ScrRedistributeArgs& a) {
  constexpr int64_t v = 16 / int64_t(sizeof(T));
  const bool ok = aligned16(a.hidden) && aligned16(a.out) && a.C % v == 0 &&
                  (a.B <= 1 || (a.h_sb % v == 0 && a.o_sb % v == 0)) &&
                  (a.N <= 1 || (a.h_sn % v == 0 && a.o_sn % v == 0));
  return ok ? static_cast<int>(v) : 1;
}

// phase 0: every row (out of place); 1: neighbour and nan rows only; 2: source rows only (in place).
// V elements per access (C % V == 0); each thread handles accesses threadIdx.x + k * kScrThreads,
// two at a time, and issues both accesses' loads (its own row's and its source neighbours') before
// it stores: the output may be the input (in place), so the compiler would not move a load above
// an earlier store, and one 2-byte load in flight per thread is a few percent of DRAM bandwidth.
// In place, an element is read and written by the same thread only, and the rows read from
// other rows (sources, in phase 1) are not written in that phase. At least 6 blocks per SM (<= 80
// registers, no spills): LLaVA's 576 rows are one wave on an A100 (108 SMs) and an H100 (132).
template <class T, int V>
__global__ void __launch_bounds__(kScrThreads, 6) scr_redistribute_apply_kernel(ScrRedistributeArgs a, int phase) {
  using E = Elems<T, V>;
  constexpr int U = 2;  // accesses per thread per iteration
  const int64_t n = blockIdx.x, b = blockIdx.y;
  const uint8_t* flag = a.flags + b * a.N;
  const T* in = static_cast<const T*>(a.hidden) + b * a.h_sb + n * a.h_sn;
  T* out = static_cast<T*>(a.out) + b * a.o_sb + n * a.o_sn;
  if (flag[n] == 2) {  // the item's scores are not finite (every flag of the item is 2)
    if (phase == 2) return;
    const float nan = __int_as_float(0x7fc00000);
    for (int64_t c = threadIdx.x; c < a.C; c += kScrThreads) out[c] = Num<T>::from_f(nan);
    return;
  }
  const bool source = flag[n] != 0;
  if ((source && phase == 1) || (!source && phase == 2)) return;
  // Which of the 3 x 3 window's cells (row-major, 4 = this row) are sources: a bit mask, so that
  // no per-thread array of neighbour rows lives in local memory.
  const int64_t r = n / a.gw, cl = n % a.gw;
  unsigned sources = 0;
  if (!source) {
#pragma unroll
    for (int w = 0; w < 9; ++w) {
      const int64_t rr = r + w / 3 - 1, cc = cl + w % 3 - 1;
      if (w != 4 && rr >= 0 && rr < a.gh && cc >= 0 && cc < a.gw && flag[rr * a.gw + cc]) sources |= 1u << w;
    }
    if (sources == 0 && phase != 0) return;  // in place: nothing to write
  }
  const float lam1 = a.lam - 1.0f;
  const int64_t nv = a.C / V;
  for (int64_t v0 = threadIdx.x; v0 < nv; v0 += U * kScrThreads) {
    E x[U];
    float acc[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = (v0 + u * kScrThreads) * V;
      if (c >= a.C) break;
      x[u] = load_elems<T, V>(in + c);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[u][q] = 0.0f;
#pragma unroll
      for (int w = 0; w < 9; ++w)
        if (sources & (1u << w)) {
          const E y = load_elems<T, V>(in + ((w / 3 - 1) * a.gw + (w % 3 - 1)) * a.h_sn + c);
#pragma unroll
          for (int q = 0; q < V; ++q) acc[u][q] += Num<T>::to_f(y.e[q]);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = (v0 + u * kScrThreads) * V;
      if (c >= a.C) break;
      E o = x[u];
      if (source) {
#pragma unroll
        for (int q = 0; q < V; ++q) o.e[q] = Num<T>::from_f(Num<T>::to_f(x[u].e[q]) / a.lam);
      } else if (sources != 0) {
#pragma unroll
        for (int q = 0; q < V; ++q) o.e[q] = Num<T>::from_f(Num<T>::to_f(x[u].e[q]) + lam1 * acc[u][q]);
      }
      store_elems<T, V>(out + c, o);
    }
  }
}

template <class T, int V>
void scr_redistribute_apply(const ScrRedistributeArgs& a, cudaStream_t stream) {
  const dim3 rows(static_cast<unsigned>(a.N), static_cast<unsigned>(a.B)), block(kScrThreads);
  if (!a.in_place) {
    scr_redistribute_apply_kernel<T, V><<<rows, block, 0, stream>>>(a, 0);
  } else {
    scr_redistribute_apply_kernel<T, V><<<rows, block, 0, stream>>>(a, 1);
    scr_redistribute_apply_kernel<T, V><<<rows, block, 0, stream>>>(a, 2);
  }
}

template <class T>
cudaError_t scr_redistribute_launch(const ScrRedistributeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0 || a.C == 0) return cudaSuccess;
  scr_select_kernel<<<dim3(static_cast<unsigned>((a.N + kScrThreads - 1) / kScrThreads), static_cast<unsigned>(a.B)),
                      dim3(kScrThreads), 0, stream>>>(a);
  if (scr_redistribute_vec_width<T>(a) > 1)
    scr_redistribute_apply<T, 16 / int(sizeof(T))>(a, stream);
  else
    scr_redistribute_apply<T, 1>(a, stream);
  return cudaGetLastError();
}

// Host-side argument packing (view.h), shared by csrc/cuda/scr.cu and the emulator's shim.
// scr_scores: q [B, Hq, Tq, D], k [B, Hkv, T, D], the mask's view, scores float32 [B, N] (out),
// the image start and scale; `work` is the caller's (scr_scores_workspace_floats).
inline ScrScoresArgs scr_scores_pack(const View& q, const View& k, const MaskView& m, const View& scores,
                                     int64_t start, float scale, bool causal) {
  ScrScoresArgs a{};
  a.q = q.data;
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_si = q.stride(2);
  a.k = k.data;
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.mask = m;
  a.scores = static_cast<float*>(scores.data);
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Tq = q.size(2);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.T = k.size(2);
  a.start = start;
  a.N = scores.size(1);
  a.scale = scale;
  a.causal = causal;
  return a;
}

// scr_redistribute: hidden [B, N, C], out [B, N, C] (hidden itself in place), scores float32 [B, N];
// `flags` ([B, N] bytes) is the caller's.
inline ScrRedistributeArgs scr_redistribute_pack(const View& hidden, const View& out, const View& scores, int64_t gh,
                                                 int64_t gw, int64_t top_k, float lam, bool exclude_border,
                                                 bool in_place) {
  ScrRedistributeArgs a{};
  a.hidden = hidden.data;
  a.h_sb = hidden.stride(0);
  a.h_sn = hidden.stride(1);
  a.out = out.data;
  a.o_sb = out.stride(0);
  a.o_sn = out.stride(1);
  a.scores = static_cast<const float*>(scores.data);
  a.B = hidden.size(0);
  a.N = hidden.size(1);
  a.C = hidden.size(2);
  a.gh = gh;
  a.gw = gw;
  a.top_k = top_k;
  a.lam = lam;
  a.exclude_border = exclude_border;
  a.in_place = in_place;
  return a;
}

}  // namespace kvfix::kernels
