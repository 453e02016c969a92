// CMAC (METHODS §4) CUDA kernels: calibrated image keys, attention with IMD, contrastive logits.
// Framework-free: CUDA runtime and C++ headers only, so the ATen side (csrc/cuda/cmac.cu), the
// resource report (tools/ptxas_report.py) and the CPU-side SIMT emulator (tests/emu/) all compile
// this source.
//
// cmac_rope_kernel: one warp per (b, kv head, image token), 4 per block; each lane rotates frequency
//   pairs (f, f + D/2) by delta = (1 - 1/gamma) (a - p) inv_freq[f], p the token's RoPE position and a
//   the anchor (per section): the position of the first token after the span, or one past the
//   span's last token's position where the span ends the sequence. The image is compressed
//   toward its end, next to the text. sincosf (full range reduction).
//
// cmac_threshold_kernel (IMD only): one block per (b, kv head, chunk of the image keys): this
//   chunk's share of mu_P, (sum over the kv head's query heads and the after-image queries of q) .
//   (sum of the chunk's image keys) / N, into a [B, Hkv, chunks] workspace; the attention kernels
//   sum the shares of an item (fixed order, mu_p_of). Without a caller-held mean it reads the
//   calibrated image keys once per call. With one (a.kmean, [B, Hkv, D] float32: the mean image
//   key, which does not change between decode steps) there is one chunk per (b, kv head) and it
//   reads the queries and the mean only; decode (Tq == 1) then launches no threshold kernel at all:
//   the decode blocks whose keys overlap the image form mu_P from q and the mean (mu_p_of_mean).
//
// cmac_decode_kernel + cmac_decode_merge_kernel (Tq == 1, decode): flash-decoding, see the kernel.
//
// cmac_attention_kernel (Tq > 1): flash attention in plain SIMT. One block of kCmacThreads (4
//   warps) per (b, query head, query tile of QT rows); a warp owns QT / 4 rows, keeps their
//   online-softmax state (m, l, imd sum) and fp32 accumulators (D / 32 per lane and row) in
//   registers. Query tiles split where queries become after-image (position >= end; query_tile),
//   key tiles of up to KT rows end at the span's edges, so a (query tile, key tile) pair is wholly
//   in or out of the calibrated segment: segment tiles are read from k_calibrated instead of k. Per
//   key tile: K and V rows go to shared memory as fp32 (16-byte loads where pointers and strides
//   allow; K rows padded by one word: lanes reading different rows hit different banks), lane j
//   forms the logit of key j, the warp folds the tile into each row's state (shuffle reductions),
//   IMD hits (raw logit > mu_P, segment tiles of IMD items) are summed and zeroed, and P V is
//   accumulated with p_j broadcast by shuffles, each lane owning dims lane + 32c. mu_V (the image
//   values' mean) is summed from the shared V tiles of the segment. Output (acc + imd_sum * mu_V)
//   / l, zeros for a row without any key.
//
// cmac_contrastive_max_kernel + cmac_contrastive_kernel: one block per chunk of 2048 logits of a
//   row (16-byte accesses where the alignment allows), so that a decode step's one or two rows of
//   a 32k-152k vocabulary spread over the GPU: the chunk maxima, then the row's maximum from them and
//   out = l - max >= log beta ? l + alpha (l - l~) : -inf
// ((1 + alpha) l - alpha l~ without cancelling two terms of size alpha |l|). A row whose l holds
// nan or +inf has no softmax and comes out nan (a nan counts as +inf in the max).
//
// Plain CUDA C++ (shared memory, __syncthreads, shuffles; no inline PTX, no dynamic shared memory).
// Head dims up to kCmacMaxHeadDim. Spans and IMD flags may live on the device (per-item tensors):
// nothing here needs a value on the host.
#pragma once

// For tools/ptxas_report.py (each launcher instantiates every kernel shape it can launch):
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_rope_launch<float>(const kvfix::kernels::CmacRopeArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_rope_launch<__half>(const kvfix::kernels::CmacRopeArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_rope_launch<__nv_bfloat16>(const kvfix::kernels::CmacRopeArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_attention_launch<float>(const kvfix::kernels::CmacAttnArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_attention_launch<__half>(const kvfix::kernels::CmacAttnArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_attention_launch<__nv_bfloat16>(const kvfix::kernels::CmacAttnArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_contrastive_launch<float>(const kvfix::kernels::CmacContrastiveArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_contrastive_launch<__half>(const kvfix::kernels::CmacContrastiveArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::cmac_contrastive_launch<__nv_bfloat16>(const kvfix::kernels::CmacContrastiveArgs&, cudaStream_t);

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "num.h"

namespace kvfix::kernels {

constexpr int kCmacThreads = 128;       // 4 warps
constexpr int kCmacMaxHeadDim = 256;
constexpr int kCmacMaxSections = 8;     // RoPE position rows (mrope sections)
constexpr int kCmacDynamicSmemBytes = 0;
constexpr int kCmacMaxSplits = 64;          // decode: key splits per (b, query head)
constexpr int64_t kCmacMinSplitKeys = 64;   // decode: at least this many keys per split
constexpr int kCmacMaxChunks = 16;          // IMD threshold: image-key chunks per (b, kv head)
constexpr int64_t kCmacChunkKeys = 32;      // IMD threshold: at least this many image keys per chunk

// Per-item image span [s, e) clamped to [0, T]: from `spans` ([B, 2] int64) when given.
struct CmacSpan {
  const int64_t* spans;
  int64_t start, end;
  __host__ __device__ void get(int64_t b, int64_t T, int64_t& s, int64_t& e) const {
    s = spans != nullptr ? spans[2 * b] : start;
    e = spans != nullptr ? spans[2 * b + 1] : end;
    s = s < 0 ? 0 : (s > T ? T : s);
    e = e < s ? s : (e > T ? T : e);
  }
};

// Element strides; every last dim contiguous.
struct CmacRopeArgs {
  const void* k;  // [B, H, T, D]
  int64_t k_sb, k_sh, k_st;
  void* out;      // [B, H, N, D] contiguous
  CmacSpan span;
  const float* inv_freq;   // [D/2]
  const int64_t* pos;      // [rows, B, T] contiguous or nullptr (position = cache index)
  int rows;
  int sec[kCmacMaxSections + 1];  // frequencies [sec[r], sec[r + 1]) use position row r
  int nsec;
  float c;                 // 1 - 1 / gamma
  int64_t B, H, T, D, N;
};

struct CmacAttnArgs {
  const void *q, *k, *v, *kc;  // q [B, Hq, Tq, D], k/v [B, Hkv, T, D], kc [B, Hkv, N, D] or nullptr (N = 0)
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, c_sb, c_sh, c_st;
  void* out;                   // [B, Hq, Tq, D] contiguous
  CmacSpan span;
  MaskView mask;               // [B, Hq, Tq, T] broadcast (kind 0: none)
  int imd;                     // IMD on (for the items whose imd_items flag is set, when given)
  const bool* imd_items;       // [B] or nullptr
  int vector_mean;             // mu_V per dim (1) or one scalar per head (0)
  float* work;                 // cmac_attention_workspace_floats(*this) floats
  float scale;
  int causal;
  int splits;                  // decode (Tq == 1): key splits per (b, query head), cmac_attention_splits
  int chunks;                  // IMD: image-key chunks per (b, kv head) of the threshold (set by the packing)
  int vec;                     // set by the launcher: 16-byte row loads (pointers, strides and D allow)
  const float* kmean;          // [B, Hkv, D] contiguous float32 or nullptr: the mean of the segment's image
                               // keys, caller-held (cmac_attention_set_key_mean)
  int64_t B, Hq, Hkv, Tq, T, D, N;
};

// Decode splits per (b, query head): about 8 blocks per SM in all (each block has one key row per
// group in flight: the occupancy hides the DRAM latency), at least kCmacMinSplitKeys keys each.
inline int cmac_attention_splits(int64_t B, int64_t Hq, int64_t T, int num_sms) {
  const int64_t rows = B * Hq > 0 ? B * Hq : 1;
  const int64_t want = (8 * int64_t(num_sms > 0 ? num_sms : 1) + rows - 1) / rows;
  const int64_t most = (T + kCmacMinSplitKeys - 1) / kCmacMinSplitKeys;
  int64_t s = want < most ? want : most;
  s = s < kCmacMaxSplits ? s : kCmacMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

// Whether the threshold kernel runs: IMD on, except decode with a caller-held mean key (the decode
// kernel forms mu_P from q and the mean itself).
__host__ __device__ inline bool cmac_threshold_launched(const CmacAttnArgs& a) {
  return a.imd && !(a.Tq == 1 && a.kmean != nullptr);
}

// Workspace of one cmac_attention call, in floats: the threshold partials [B, Hkv, chunks] when the
// threshold kernel runs; for decode (Tq == 1) then one partial record per (b, query head, split): m,
// l, the IMD mass, the P V accumulator [D] and the image values' sum [D].
__host__ __device__ inline int64_t cmac_threshold_floats(const CmacAttnArgs& a) {
  return cmac_threshold_launched(a) ? a.B * a.Hkv * a.chunks : 0;
}
__host__ __device__ inline int64_t cmac_record_floats(const CmacAttnArgs& a) { return 3 + 2 * a.D; }
inline int64_t cmac_attention_workspace_floats(const CmacAttnArgs& a) {
  return cmac_threshold_floats(a) + (a.Tq == 1 ? a.B * a.Hq * a.splits * cmac_record_floats(a) : 0);
}

struct CmacContrastiveArgs {
  const void *l, *lt;  // [rows, V] contiguous
  void* out;
  int64_t rows, V;
  float a, log_beta;
  float* part;  // [rows, chunks] workspace (the caller's: cmac_contrastive_workspace_floats)
};

constexpr int64_t kCmacContrastiveChunk = 2048;  // logits per block of the contrastive kernels

__host__ __device__ inline int64_t cmac_contrastive_chunks(int64_t V) {
  return (V + kCmacContrastiveChunk - 1) / kCmacContrastiveChunk;
}
// Workspace floats of one contrastive_logits call: the maximum of each chunk of each row.
inline int64_t cmac_contrastive_workspace_floats(const CmacContrastiveArgs& a) {
  return a.rows * cmac_contrastive_chunks(a.V);
}
// Elements per access of the contrastive kernels: 16 bytes where the three tensors' bases and V
// allow it (rows are contiguous), else 1.
template <class T>
inline int cmac_contrastive_vec_width(const CmacContrastiveArgs& a) {
  constexpr int64_t v = 16 / int64_t(sizeof(T));
  return aligned16(a.l) && aligned16(a.lt) && aligned16(a.out) && a.V % v == 0 ? static_cast<int>(v) : 1;
}

namespace cmac_detail {

template <class T>
__device__ __forceinline__ float ld(const T* p) {
  return Num<T>::to_f(*p);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
// The maximum of x over the block (every thread gets it); red: kCmacThreads / 32 floats of shared
// memory. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ float block_max(float x, float* red) {
  x = warp_max(x);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < kCmacThreads / 32; ++w) x = fmaxf(x, red[w]);
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// mu_P of item b (the logit scale applied): the threshold partials of its kv heads and chunks
// summed in a fixed order (lane-strided, then a butterfly, which gives every lane the same sum).
// Every lane of the warp calls it.
__device__ __forceinline__ float mu_p_of(const CmacAttnArgs& a, int64_t b, int64_t rows_after, int lane) {
  const int n = static_cast<int>(a.Hkv) * a.chunks;
  const float* w = a.work + b * n;
  float t = 0.0f;
  for (int j = lane; j < n; j += 32) t += w[j];
  return a.scale * warp_sum(t) / static_cast<float>(rows_after * a.Hq);
}

// Decode (one query row) with a caller-held mean key: mu_P of item b = scale * sum_h q_h .
// kmean[b, kv(h)] / Hq, a fixed-order block reduction (every block of the item gets the same
// value). Every thread of the block calls it (a barrier inside); red: kCmacThreads / 32 floats of
// shared memory, written once.
template <class T>
__device__ __forceinline__ float mu_p_of_mean(const CmacAttnArgs& a, int64_t b, float* red) {
  const int g = static_cast<int>(a.Hq / a.Hkv), Hkv = static_cast<int>(a.Hkv), D = static_cast<int>(a.D);
  const T* qh = static_cast<const T*>(a.q) + b * a.q_sb;
  const float* mk = a.kmean + b * a.Hkv * a.D;
  float t = 0.0f;
  for (int hk = 0; hk < Hkv; ++hk, mk += D)
    for (int j = 0; j < g; ++j, qh += a.q_sh)
      for (int d = threadIdx.x; d < D; d += kCmacThreads) t += ld(qh + d) * mk[d];
  t = warp_sum(t);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = t;
  __syncthreads();  // the warps' sums are in shared memory
  float tot = 0.0f;
  for (int w = 0; w < kCmacThreads / 32; ++w) tot += red[w];
  return a.scale * tot / static_cast<float>(a.Hq);
}

// Elements [d0, d0 + V) of a row as floats, zeros from D on: one 16-byte load when `vec` (the row
// and d0 16-byte aligned, V == 16 / sizeof(T), D a multiple of V), else element by element.
template <class T, int V>
__device__ __forceinline__ void load_chunk(const T* row, int d0, int D, bool vec, float* out) {
  static_assert(V * sizeof(T) == 16, "a chunk is 16 bytes");
  if (vec && d0 < D) {
    const uint4 w = *reinterpret_cast<const uint4*>(row + d0);
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int e = 0; e < 4; ++e) out[e] = __uint_as_float(u[e]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out[2 * e] = Num<T>::bits_to_f(static_cast<uint16_t>(u[e] & 0xffffu));
        out[2 * e + 1] = Num<T>::bits_to_f(static_cast<uint16_t>(u[e] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = d0 + e < D ? Num<T>::to_f(row[d0 + e]) : 0.0f;
  }
}

// Tile shapes per head-dim bound: QT query rows per block, KT key rows per tile (<= 32: one key
// per lane), static shared memory QT*D + KT*(D+1) + KT*D floats <= 48 KiB.
template <int DMAX>
struct Cfg {
  static constexpr int QT = DMAX <= 128 ? 16 : 8;
  static constexpr int KT = DMAX <= 128 ? 32 : 16;
  static constexpr int RW = QT / (kCmacThreads / 32);  // rows per warp
  static constexpr int C = DMAX / 32;                  // accumulator columns per lane
};

// The first after-image query row of an item whose image span ends at e: query i sits at position
// T - Tq + i, so rows i >= e - (T - Tq), clamped to [0, Tq], see no image token after them.
__host__ __device__ inline int64_t first_after_row(const CmacAttnArgs& a, int64_t e) {
  const int64_t i_after = e - (a.T - a.Tq);
  return i_after < 0 ? 0 : (i_after > a.Tq ? a.Tq : i_after);
}

// The prefill kernels' query tiles per (b, query head) with tiles of QT rows: one more than
// ceil(Tq / QT), for the split at the span's end.
__host__ __device__ inline int64_t query_tiles(int64_t Tq, int QT) { return (Tq + QT - 1) / QT + 1; }

// Rows [i0, i1) of query tile u (< query_tiles(Tq, QT)): the tiles split where the queries become
// after-image (row i_after), so a tile is wholly before or wholly after the image: the first
// ceil(i_after / QT) tiles cover [0, i_after), the others [i_after, Tq). At most one tile of a
// (b, head) is empty (i0 >= i1: its block returns).
struct QueryTile {
  int64_t i0, i1;
};
__device__ __forceinline__ QueryTile query_tile(int64_t u, int QT, int64_t i_after, int64_t Tq) {
  const int64_t nb_before = (i_after + QT - 1) / QT;
  if (u < nb_before) {
    const int64_t i0 = u * QT;
    return {i0, i0 + QT < i_after ? i0 + QT : i_after};
  }
  const int64_t i0 = i_after + (u - nb_before) * QT;
  return {i0, i0 + QT < Tq ? i0 + QT : Tq};
}

// Logit x of query row i (at position qpos) for key j with the causal rule and the mask applied:
// -inf where the key takes no part (after qpos when causal; False or -inf in the mask); an
// additive mask's nan or +inf goes into the logit.
__device__ __forceinline__ float masked_logit(const CmacAttnArgs& a, int64_t b, int64_t h, int64_t i, int64_t qpos,
                                              int64_t j, float x) {
  if (a.causal && j > qpos) return -INFINITY;
  if (a.mask.kind != 0) {
    const float bias = Mask::at(a.mask, b, h, i, j);
    return bias != -INFINITY ? x + bias : -INFINITY;
  }
  return x;
}

// Everything a prefill block needs to know of its query tile u of (b, query head): the item's
// image span [s, e), its first after-image row, the tile's rows [i0, i1) (empty: the block
// returns), whether the tile is after the image, whether IMD applies to it and then mu_P (else 0).
// Every lane of the warp calls it (mu_p_of reduces across the warp).
struct PrefillTile {
  int64_t s, e, i_after, i0, i1;
  bool after, use_imd;
  float mu_p;
};
__device__ __forceinline__ PrefillTile prefill_tile(const CmacAttnArgs& a, int64_t b, int64_t u, int QT, int lane) {
  PrefillTile t;
  a.span.get(b, a.T, t.s, t.e);
  t.i_after = first_after_row(a, t.e);
  const QueryTile q = query_tile(u, QT, t.i_after, a.Tq);
  t.i0 = q.i0;
  t.i1 = q.i1;
  t.after = t.i0 >= t.i_after;
  t.use_imd = t.i0 < t.i1 && t.after && t.e > t.s && a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  t.mu_p = t.use_imd ? mu_p_of(a, b, a.Tq - t.i_after, lane) : 0.0f;
  return t;
}

}  // namespace cmac_detail

// One warp per (b, kv head, image token), kCmacThreads / 32 tokens per block: lane l rotates the
// frequency pairs (f, f + D/2) for f = l, l + 32, ..., in rounds of P pairs (one round for heads up
// to kCmacMaxHeadDim), reading a round's key elements before it writes any.
template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_rope_kernel(const CmacRopeArgs a) {
  constexpr int P = kCmacMaxHeadDim / 64;  // frequency pairs per lane at most
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (kCmacThreads / 32) + threadIdx.x / 32;
  if (w >= a.B * a.H * a.N) return;  // warp-uniform; the kernel has no block-wide synchronisation
  const int lane = threadIdx.x % 32;
  const int64_t n = w % a.N, h = (w / a.N) % a.H, b = w / (a.N * a.H);
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const int64_t t = s + n;
  const int64_t half = a.D / 2;
  T* o = static_cast<T*>(a.out) + w * a.D;  // out [B, H, N, D] contiguous: row w
  if (t >= e) {  // an out-of-range per-item span (device spans are not checked on the host): zeros
    for (int64_t d = lane; d < a.D; d += 32) o[d] = Num<T>::from_f(0.0f);
    return;
  }
  const T* x = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh + t * a.k_st;
  for (int64_t f0 = lane; f0 < half; f0 += 32 * P) {
    float x1[P], x2[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t f = f0 + 32 * i;
      if (f >= half) break;
      x1[i] = cmac_detail::ld(x + f);
      x2[i] = cmac_detail::ld(x + f + half);
    }
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t f = f0 + 32 * i;
      if (f >= half) break;
      int r = 0;
      while (r + 1 < a.nsec && f >= a.sec[r + 1]) ++r;
      if (r >= a.rows) r = a.rows - 1;
      int64_t p = t, anchor = e;
      if (a.pos != nullptr) {
        const int64_t* pr = a.pos + (static_cast<int64_t>(r) * a.B + b) * a.T;
        p = pr[t];
        anchor = e < a.T ? pr[e] : pr[e - 1] + 1;
      }
      const float ang = static_cast<float>(anchor - p) * a.c * a.inv_freq[f];
      float sn, cs;
      sincosf(ang, &sn, &cs);
      o[f] = Num<T>::from_f(x1[i] * cs - x2[i] * sn);
      o[f + half] = Num<T>::from_f(x2[i] * cs + x1[i] * sn);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_threshold_kernel(const CmacAttnArgs a) {
  const int c = static_cast<int>(blockIdx.x % a.chunks);
  const int64_t hk = (blockIdx.x / a.chunks) % a.Hkv, b = blockIdx.x / (a.chunks * a.Hkv);
  const int64_t g = a.Hq / a.Hkv;
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const int64_t i_after = cmac_detail::first_after_row(a, e);
  const bool on = a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  // this chunk's image keys [t0, t1) (of e - s; the span is per item, so the split is made here)
  const int64_t len = (e - s + a.chunks - 1) / a.chunks, t0 = c * len, t1 = t0 + len < e - s ? t0 + len : e - s;
  // a caller-held mean key (then one chunk per (b, kv head)): the keys are not read
  const float* km = a.kmean != nullptr ? a.kmean + (b * a.Hkv + hk) * a.D : nullptr;
  __shared__ float red[kCmacThreads / 32];
  float dot = 0.0f;
  if (on && t0 < t1 && i_after < a.Tq && (km == nullptr || c == 0)) {
    const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + s * a.k_st;
    const T* cb = a.kc != nullptr ? static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh : nullptr;
    for (int64_t d = threadIdx.x; d < a.D; d += blockDim.x) {
      float ks = 0.0f, qs = 0.0f;
      if (km != nullptr)
        ks = km[d];
      else
        for (int64_t t = t0; t < t1; ++t)  // coalesced across the threads (consecutive d)
          ks += cmac_detail::ld(cb != nullptr && t < a.N ? cb + t * a.c_st + d : kb + t * a.k_st + d);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
        for (int64_t r = i_after; r < a.Tq; ++r)
          qs += cmac_detail::ld(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + r * a.q_st + d);
      dot += ks * qs;
    }
  }
  dot = cmac_detail::warp_sum(dot);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.0f;
    for (int w = 0; w < kCmacThreads / 32; ++w) tot += red[w];
    a.work[blockIdx.x] = e > s ? (km != nullptr ? tot : tot / static_cast<float>(e - s)) : 0.0f;
  }
}

template <class T, int DMAX>
__global__ void __launch_bounds__(kCmacThreads) cmac_attention_kernel(const CmacAttnArgs a) {
  using C = cmac_detail::Cfg<DMAX>;
  constexpr int QT = C::QT, KT = C::KT, RW = C::RW, NC = C::C;
  __shared__ float qs[QT][DMAX];
  __shared__ float ks[KT][DMAX + 1];
  __shared__ float vs[KT][DMAX];
  const int64_t units = cmac_detail::query_tiles(a.Tq, QT);
  const int64_t u = blockIdx.x % units, h = (blockIdx.x / units) % a.Hq, b = blockIdx.x / (units * a.Hq);
  const int64_t hk = h / (a.Hq / a.Hkv);
  const int D = static_cast<int>(a.D);
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const int CPR = (D + VEC - 1) / VEC;  // 16-byte chunks per row
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const auto [s, e, i_after, i0, i1, after, use_imd, mu_p] = cmac_detail::prefill_tile(a, b, u, QT, lane);
  if (i0 >= i1) return;  // the unused unit of this (b, h): uniform for the whole block
  const int64_t off = a.T - a.Tq;  // query i sits at position off + i
  for (int idx = threadIdx.x; idx < QT * CPR; idx += blockDim.x) {
    const int r = idx / CPR, d0 = (idx - r * CPR) * VEC;
    float x[VEC];
    if (i0 + r < i1)
      cmac_detail::load_chunk<T, VEC>(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + (i0 + r) * a.q_st, d0, D,
                                      a.vec, x);
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (d0 + e < D) qs[r][d0 + e] = i0 + r < i1 ? x[e] : 0.0f;
  }
  float m[RW], l[RW], im[RW], acc[RW][NC], vsum[NC];
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    im[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;
  }
#pragma unroll
  for (int c = 0; c < NC; ++c) vsum[c] = 0.0f;
  const int64_t k_end = a.causal ? off + i1 : a.T;
  for (int64_t j0 = 0; j0 < k_end;) {
    int64_t j1 = j0 + KT < k_end ? j0 + KT : k_end;
    if (j0 < s) j1 = j1 < s ? j1 : s;
    else if (j0 < e) j1 = j1 < e ? j1 : e;
    const int n = static_cast<int>(j1 - j0);
    const bool image = j0 >= s && j0 < e;
    const bool cal = image && after && a.kc != nullptr;
    const bool tile_imd = use_imd && image;
    __syncthreads();  // the previous tile's readers are done (and qs is written, first time)
    for (int idx = threadIdx.x; idx < n * CPR; idx += blockDim.x) {
      const int j = idx / CPR, d0 = (idx - j * CPR) * VEC;
      // (j0 - s + j < N unless a device span disagrees with k_calibrated's N: then k, never out of bounds)
      const T* kp = cal && j0 - s + j < a.N
                        ? static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh + (j0 - s + j) * a.c_st
                        : static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + (j0 + j) * a.k_st;
      float kx[VEC], vx[VEC];
      cmac_detail::load_chunk<T, VEC>(kp, d0, D, a.vec, kx);
      cmac_detail::load_chunk<T, VEC>(static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh + (j0 + j) * a.v_st, d0, D,
                                      a.vec, vx);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (d0 + e < D) {
          ks[j][d0 + e] = kx[e];
          vs[j][d0 + e] = vx[e];
        }
      }
    }
    __syncthreads();
    if (tile_imd) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int d = lane + 32 * c;
        if (d < D)
          for (int j = 0; j < n; ++j) vsum[c] += vs[j][d];
      }
    }
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      const int64_t row = warp * RW + r, i = i0 + row;
      if (i >= i1) continue;  // warp-uniform
      const int64_t qpos = off + i;
      float x = -INFINITY;
      bool hit = false;
      if (lane < n) {
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += qs[row][d] * ks[lane][d];
        x = dot * a.scale;
        hit = tile_imd && x > mu_p;
        x = cmac_detail::masked_logit(a, b, h, i, qpos, j0 + lane, x);
      }
      // a nan logit counts as +inf in the max: the row's state turns nan and stays nan (softmax's
      // rule), even where every logit so far is nan (fmaxf alone would skip it)
      const float m_new = fmaxf(m[r], cmac_detail::warp_max(x == x ? x : INFINITY));
      if (m_new == -INFINITY) continue;  // nothing taking part yet (warp-uniform)
      const float alpha = __expf(m[r] - m_new);
      float p = x == -INFINITY ? 0.0f : __expf(x - m_new);
      const float ph = hit ? p : 0.0f;
      p -= ph;
      l[r] = l[r] * alpha + cmac_detail::warp_sum(p + ph);
      im[r] = im[r] * alpha + cmac_detail::warp_sum(ph);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] *= alpha;
      for (int j = 0; j < n; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int d = lane + 32 * c;
          if (d < D) acc[r][c] += pj * vs[j][d];
        }
      }
    }
    j0 = j1;
  }
  // mu_V from the segment's value sums: per dim, or one scalar (warp reduction over the dims).
  if (use_imd) {
    const float inv_n = 1.0f / static_cast<float>(e - s);
    float tot = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) tot += vsum[c];
    tot = cmac_detail::warp_sum(tot);
#pragma unroll
    for (int c = 0; c < NC; ++c) vsum[c] = a.vector_mean ? vsum[c] * inv_n : tot * inv_n / static_cast<float>(D);
  }
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    const int64_t i = i0 + warp * RW + r;
    if (i >= i1) continue;
    const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];  // no key: 0; a nan state stays nan
    T* o = static_cast<T*>(a.out) + ((b * a.Hq + h) * a.Tq + i) * D;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) o[d] = Num<T>::from_f((acc[r][c] + (use_imd ? im[r] * vsum[c] : 0.0f)) * inv);
    }
  }
}

// Decode (Tq == 1; the query sits at position T - 1 and sees every key): flash-decoding. Block
// (b, h, split) takes the keys [split * per, ...) of one query row; its 8 groups of 16 lanes (half
// warps) each fold every 8th of them into their own online-softmax state, lane l16 owning the
// 16-byte chunks c * 16 + l16 of q, of each key and value row and of the accumulators; a key's dot
// product is a 4-step shuffle reduction inside the group. Rows are read once, with 16-byte loads
// where pointers and strides allow (a.vec), and offsets inside the (b, kv head) planes are 32-bit
// where the launcher found them to fit (I). The groups' states are merged in shared memory into the
// block's record (m, l, IMD mass, P V accumulator, image value sum) in the workspace;
// cmac_decode_merge_kernel merges the splits' records.
template <class T, int DMAX, class I>
__global__ void __launch_bounds__(kCmacThreads) cmac_decode_kernel(const CmacAttnArgs a) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int NC = (DMAX + 16 * VEC - 1) / (16 * VEC);  // 16-byte chunks per lane
  constexpr int G = kCmacThreads / 16;                     // key groups
  __shared__ float sacc[G][DMAX];
  __shared__ float svs[G][DMAX];
  __shared__ float sst[G][3];
  __shared__ float sred[kCmacThreads / 32];
  const int S = a.splits;
  const int split = static_cast<int>(blockIdx.x % S);
  const int64_t bh = blockIdx.x / S, h = bh % a.Hq, b = bh / a.Hq;
  const int64_t hk = h / (a.Hq / a.Hkv);
  const int D = static_cast<int>(a.D);
  const int grp = threadIdx.x >> 4, l16 = threadIdx.x & 15, lane = threadIdx.x & 31;
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const bool after = a.T - 1 >= e;
  const bool use_imd = after && e > s && a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  const bool cal = after && a.kc != nullptr;
  const int64_t per = (a.T + S - 1) / S, j_lo = split * per, j_hi = j_lo + per < a.T ? j_lo + per : a.T;
  // mu_P: from the threshold kernel's partials, or (a caller-held mean key) from q and the mean, in
  // the blocks whose keys overlap the image only (a block-uniform condition: a barrier inside)
  float mu_p = 0.0f;
  if (use_imd && a.kmean == nullptr)
    mu_p = cmac_detail::mu_p_of(a, b, 1, lane);
  else if (use_imd && j_lo < e && s < j_hi)
    mu_p = cmac_detail::mu_p_of_mean<T>(a, b, sred);
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  const T* cb = cal ? static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh : nullptr;
  const I kst = static_cast<I>(a.k_st), vst = static_cast<I>(a.v_st), cst = static_cast<I>(a.c_st);
  float qf[NC][VEC], acc[NC][VEC], vsum[NC][VEC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    cmac_detail::load_chunk<T, VEC>(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh, (c * 16 + l16) * VEC, D,
                                    a.vec, qf[c]);
#pragma unroll
    for (int x = 0; x < VEC; ++x) acc[c][x] = vsum[c][x] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f, im = 0.0f;
  // The same number of rounds for every group (the shuffles need whole warps); key j_lo + r G + grp.
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += G) {
    const int64_t j = j0 + grp;
    const bool in = j < j_hi;
    const bool image = in && j >= s && j < e;
    float kf[NC][VEC], vf[NC][VEC];
    if (in) {
      // (j - s < N unless a device span disagrees with k_calibrated's N: then k, never out of bounds)
      const T* kr = cal && image && j - s < a.N ? cb + static_cast<I>(j - s) * cst : kb + static_cast<I>(j) * kst;
      const T* vr = vb + static_cast<I>(j) * vst;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        cmac_detail::load_chunk<T, VEC>(kr, (c * 16 + l16) * VEC, D, a.vec, kf[c]);
        cmac_detail::load_chunk<T, VEC>(vr, (c * 16 + l16) * VEC, D, a.vec, vf[c]);
      }
    }
    float dot = 0.0f;
    if (in) {
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int x = 0; x < VEC; ++x) dot += qf[c][x] * kf[c][x];
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, 16);
    if (!in) continue;  // (after the shuffles: uniform in a group)
    if (use_imd && image) {
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int x = 0; x < VEC; ++x) vsum[c][x] += vf[c][x];
    }
    const float x0 = dot * a.scale;
    const bool hit = use_imd && image && x0 > mu_p;
    const float xv = cmac_detail::masked_logit(a, b, h, 0, a.T - 1, j, x0);  // the one query sees every key
    // a nan logit counts as +inf in the max: the state turns nan and stays nan (softmax's rule)
    const float m_new = fmaxf(m, xv == xv ? xv : INFINITY);
    if (m_new == -INFINITY) continue;  // nothing taking part yet
    const float alpha = __expf(m - m_new);
    const float p = xv == -INFINITY ? 0.0f : __expf(xv - m_new);
    const float ph = hit ? p : 0.0f;
    l = l * alpha + p;
    im = im * alpha + ph;
    m = m_new;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int x = 0; x < VEC; ++x) acc[c][x] = acc[c][x] * alpha + (p - ph) * vf[c][x];
  }
  // The groups' states into the block's record.
#pragma unroll
  for (int c = 0; c < NC; ++c) {
#pragma unroll
    for (int x = 0; x < VEC; ++x) {
      const int d = (c * 16 + l16) * VEC + x;
      if (d < D) {
        sacc[grp][d] = acc[c][x];
        svs[grp][d] = vsum[c][x];
      }
    }
  }
  if (l16 == 0) {
    sst[grp][0] = m;
    sst[grp][1] = l;
    sst[grp][2] = im;
  }
  __syncthreads();  // every group's state is in shared memory
  float mb = -INFINITY;
  for (int g = 0; g < G; ++g) mb = fmaxf(mb, sst[g][0]);
  float w[G];
  float lb = 0.0f, ib = 0.0f;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    w[g] = sst[g][0] == -INFINITY ? 0.0f : __expf(sst[g][0] - mb);  // an empty group weighs 0
    lb += w[g] * sst[g][1];
    ib += w[g] * sst[g][2];
  }
  float* rec = a.work + cmac_threshold_floats(a) + blockIdx.x * cmac_record_floats(a);
  if (threadIdx.x == 0) {
    rec[0] = mb;
    rec[1] = lb;
    rec[2] = ib;
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float ad = 0.0f, vd = 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      ad += w[g] * sacc[g][d];
      vd += svs[g][d];
    }
    rec[3 + d] = ad;
    rec[3 + D + d] = vd;
  }
}

// Decode: one block per (b, query head) merges the splits' records (fixed order) into the output:
// (sum_s w_s acc_s + (sum_s w_s imd_s) mu_V) / sum_s w_s l_s, w_s = exp(m_s - max m); mu_V from
// the splits' image value sums; zeros for a row without any key.
template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_decode_merge_kernel(const CmacAttnArgs a) {
  __shared__ float ws[kCmacMaxSplits];
  __shared__ float vsh[kCmacMaxHeadDim];
  __shared__ float red[kCmacThreads / 32];
  const int64_t bh = blockIdx.x, b = bh / a.Hq;
  const int S = a.splits, D = static_cast<int>(a.D);
  const int64_t R = cmac_record_floats(a);
  const float* rec = a.work + cmac_threshold_floats(a) + bh * S * R;
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const bool use_imd = a.T - 1 >= e && e > s && a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  float mx = -INFINITY;
  for (int k = 0; k < S; ++k) mx = fmaxf(mx, rec[k * R]);
  if (threadIdx.x < S) {
    const float mk = rec[threadIdx.x * R];
    ws[threadIdx.x] = mk == -INFINITY ? 0.0f : __expf(mk - mx);  // an empty split weighs 0
  }
  float vt = 0.0f;
  if (use_imd) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float vd = 0.0f;
      for (int k = 0; k < S; ++k) vd += rec[k * R + 3 + D + d];
      vsh[d] = vd;
      vt += vd;
    }
  }
  vt = cmac_detail::warp_sum(vt);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = vt;
  __syncthreads();  // the weights, value sums and warp partials are in shared memory
  float lt = 0.0f, it = 0.0f;
  for (int k = 0; k < S; ++k) {
    lt += ws[k] * rec[k * R + 1];
    it += ws[k] * rec[k * R + 2];
  }
  float vtot = 0.0f;
  for (int w = 0; w < kCmacThreads / 32; ++w) vtot += red[w];
  const float inv = lt == 0.0f ? 0.0f : 1.0f / lt;  // no key: 0; a nan state stays nan
  const float inv_n = use_imd ? 1.0f / static_cast<float>(e - s) : 0.0f;
  T* o = static_cast<T*>(a.out) + bh * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float ad = 0.0f;
    for (int k = 0; k < S; ++k) ad += ws[k] * rec[k * R + 3 + d];
    const float mu_v = a.vector_mean ? vsh[d] * inv_n : vtot * inv_n / static_cast<float>(D);
    o[d] = Num<T>::from_f((ad + (use_imd ? it * mu_v : 0.0f)) * inv);
  }
}

// The contrastive kernels: block blockIdx.x owns chunk blockIdx.x % chunks of row blockIdx.x / chunks
// (kCmacContrastiveChunk logits); thread t makes the accesses t + k * kCmacThreads of V elements,
// all of its loads before any use. 1. cmac_contrastive_max_kernel: the chunk's maximum (a nan
// counts as +inf) into the workspace. 2. cmac_contrastive_kernel: the row's maximum from its
// chunks' (exact in any order), then the chunk's outputs.
template <class T, int V>
__global__ void __launch_bounds__(kCmacThreads) cmac_contrastive_max_kernel(const CmacContrastiveArgs a) {
  constexpr int A = static_cast<int>(kCmacContrastiveChunk / (kCmacThreads * V));  // accesses per thread
  const int64_t chunks = cmac_contrastive_chunks(a.V);
  const int64_t row = blockIdx.x / chunks, c0 = (blockIdx.x % chunks) * kCmacContrastiveChunk;
  const T* l = static_cast<const T*>(a.l) + row * a.V;
  __shared__ float red[kCmacThreads / 32];
  Elems<T, V> x[A];
#pragma unroll
  for (int i = 0; i < A; ++i) {
    const int64_t j = c0 + (static_cast<int64_t>(i) * kCmacThreads + threadIdx.x) * V;
    if (j < a.V) x[i] = load_elems<T, V>(l + j);
  }
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < A; ++i) {
    const int64_t j = c0 + (static_cast<int64_t>(i) * kCmacThreads + threadIdx.x) * V;
    if (j >= a.V) break;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float v = Num<T>::to_f(x[i].e[q]);
      mx = fmaxf(mx, v == v ? v : INFINITY);  // fmaxf would skip a nan
    }
  }
  mx = cmac_detail::block_max(mx, red);
  if (threadIdx.x == 0) a.part[blockIdx.x] = mx;
}

template <class T, int V>
__global__ void __launch_bounds__(kCmacThreads) cmac_contrastive_kernel(const CmacContrastiveArgs a) {
  constexpr int A = static_cast<int>(kCmacContrastiveChunk / (kCmacThreads * V));
  const int64_t chunks = cmac_contrastive_chunks(a.V);
  const int64_t row = blockIdx.x / chunks, c0 = (blockIdx.x % chunks) * kCmacContrastiveChunk;
  const T* l = static_cast<const T*>(a.l) + row * a.V;
  const T* lt = static_cast<const T*>(a.lt) + row * a.V;
  T* o = static_cast<T*>(a.out) + row * a.V;
  __shared__ float red[kCmacThreads / 32];
  Elems<T, V> x[A], y[A];
#pragma unroll
  for (int i = 0; i < A; ++i) {
    const int64_t j = c0 + (static_cast<int64_t>(i) * kCmacThreads + threadIdx.x) * V;
    if (j < a.V) {
      x[i] = load_elems<T, V>(l + j);
      y[i] = load_elems<T, V>(lt + j);
    }
  }
  float mx = -INFINITY;
  for (int64_t k = threadIdx.x; k < chunks; k += kCmacThreads) mx = fmaxf(mx, a.part[row * chunks + k]);
  mx = cmac_detail::block_max(mx, red);
#pragma unroll
  for (int i = 0; i < A; ++i) {
    const int64_t j = c0 + (static_cast<int64_t>(i) * kCmacThreads + threadIdx.x) * V;
    if (j >= a.V) break;
    Elems<T, V> r;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float xv = Num<T>::to_f(x[i].e[q]);
      const float yv = xv - mx >= a.log_beta ? xv + a.a * (xv - Num<T>::to_f(y[i].e[q])) : -INFINITY;
      r.e[q] = Num<T>::from_f(mx == INFINITY ? NAN : yv);
    }
    store_elems<T, V>(o + j, r);
  }
}

template <class T, int V>
void cmac_contrastive_run(const CmacContrastiveArgs& a, unsigned blocks, cudaStream_t stream) {
  cmac_contrastive_max_kernel<T, V><<<dim3(blocks), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
  cmac_contrastive_kernel<T, V><<<dim3(blocks), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
}

template <class T>
cudaError_t cmac_rope_launch(const CmacRopeArgs& a, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_rope_launch: T must be float, __half or __nv_bfloat16");
  const int64_t tokens = a.B * a.H * a.N, blocks = (tokens + kCmacThreads / 32 - 1) / (kCmacThreads / 32);
  if (tokens == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || a.rows < 1 || a.nsec < 1 || a.nsec > kCmacMaxSections) return cudaErrorInvalidValue;
  cmac_rope_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

namespace cmac_detail {

// 16-byte row loads: every row pointer 16-byte aligned (base pointers and element strides) and D a
// multiple of the chunk.
template <class T>
inline bool vec_ok(const CmacAttnArgs& a) {
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  bool ok = a.D % V == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) &&
            (a.kc == nullptr || aligned16(a.kc));
  for (int64_t st : {a.q_sb, a.q_sh, a.q_st, a.k_sb, a.k_sh, a.k_st, a.v_sb, a.v_sh, a.v_st}) ok = ok && st % V == 0;
  if (a.kc != nullptr)
    for (int64_t st : {a.c_sb, a.c_sh, a.c_st}) ok = ok && st % V == 0;
  return ok;
}

// The decode kernel's row offsets inside a (b, kv head) plane fit in 32 bits.
inline bool offsets_fit_32(const CmacAttnArgs& a) {
  const int64_t lim = 0x7fffffff - a.D;
  const auto fits = [&](int64_t rows, int64_t st) { return st >= 0 && (rows == 0 || st <= lim / rows); };
  return fits(a.T, a.k_st) && fits(a.T, a.v_st) && (a.kc == nullptr || fits(a.N, a.c_st));
}

template <class T, int DMAX>
cudaError_t launch_decode(const CmacAttnArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.B * a.Hq * a.splits);
  if (offsets_fit_32(a))
    cmac_decode_kernel<T, DMAX, int32_t><<<dim3(blocks), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
  else
    cmac_decode_kernel<T, DMAX, int64_t><<<dim3(blocks), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cmac_detail

// Host entry point: the IMD threshold (when IMD is on; not for decode with a caller-held mean key),
// then for a single query row (decode) the split kernel and the merge, else the query-tile kernel.
// All on `stream`, no synchronisation.
template <class T>
cudaError_t cmac_attention_launch(const CmacAttnArgs& args, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_attention_launch: T must be float, __half or __nv_bfloat16");
  if (args.B * args.Hq * args.Tq == 0) return cudaSuccess;
  if (args.D > kCmacMaxHeadDim || args.Hkv < 1 || args.Hq % args.Hkv != 0) return cudaErrorInvalidValue;
  CmacAttnArgs a = args;
  a.vec = cmac_detail::vec_ok<T>(a) ? 1 : 0;
  const bool decode = a.Tq == 1;
  if ((a.imd || decode) && a.work == nullptr) return cudaErrorInvalidValue;
  if (cmac_threshold_launched(a)) {
    const int64_t blocks = a.B * a.Hkv * a.chunks;
    if (a.chunks < 1 || a.chunks > kCmacMaxChunks || blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_threshold_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                               stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (decode) {
    if (a.splits < 1 || a.splits > kCmacMaxSplits || a.B * a.Hq * a.splits > 0x7fffffff) return cudaErrorInvalidValue;
    const cudaError_t err = a.D <= 128 ? cmac_detail::launch_decode<T, 128>(a, stream)
                                       : cmac_detail::launch_decode<T, 256>(a, stream);
    if (err != cudaSuccess) return err;
    cmac_decode_merge_kernel<T><<<dim3(static_cast<unsigned>(a.B * a.Hq)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                  stream>>>(a);
    return cudaGetLastError();
  }
  if (a.D <= 128) {
    const int64_t blocks = a.B * a.Hq * cmac_detail::query_tiles(a.Tq, cmac_detail::Cfg<128>::QT);
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_attention_kernel<T, 128><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                    stream>>>(a);
  } else {
    const int64_t blocks = a.B * a.Hq * cmac_detail::query_tiles(a.Tq, cmac_detail::Cfg<256>::QT);
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_attention_kernel<T, 256><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                    stream>>>(a);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t cmac_contrastive_launch(const CmacContrastiveArgs& a, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_contrastive_launch: T must be float, __half or __nv_bfloat16");
  if (a.rows == 0 || a.V == 0) return cudaSuccess;
  const int64_t blocks = cmac_contrastive_workspace_floats(a);  // one block per (row, chunk)
  if (blocks > 0x7fffffff || a.part == nullptr) return cudaErrorInvalidValue;
  if (cmac_contrastive_vec_width<T>(a) > 1)
    cmac_contrastive_run<T, 16 / static_cast<int>(sizeof(T))>(a, static_cast<unsigned>(blocks), stream);
  else
    cmac_contrastive_run<T, 1>(a, static_cast<unsigned>(blocks), stream);
  return cudaGetLastError();
}

// Host-side argument packing (view.h), shared by csrc/cuda/cmac.cu and the emulator's shim.
// rope_calibrate: k [B, H, T, D], out [B, H, N, D], the span, inv_freq float32 [D/2], positions
// int64 [rows, B, T] (contiguous) or absent, `nsections` RoPE section sizes (0: one section), c = 1 - 1/gamma.
inline CmacRopeArgs cmac_rope_pack(const View& k, const View& out, CmacSpan span, const float* inv_freq,
                                   const View& positions, const int64_t* sections, int nsections, float c) {
  CmacRopeArgs a{};
  a.k = k.data;
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.out = out.data;
  a.span = span;
  a.inv_freq = inv_freq;
  a.pos = positions.present() ? static_cast<const int64_t*>(positions.data) : nullptr;
  a.rows = positions.present() ? static_cast<int>(positions.size(0)) : 1;
  a.B = k.size(0);
  a.H = k.size(1);
  a.T = k.size(2);
  a.D = k.size(3);
  a.N = out.size(2);
  a.nsec = 1;
  a.sec[0] = 0;
  a.sec[1] = static_cast<int>(a.D / 2);
  if (nsections > 0) {
    a.nsec = nsections < kCmacMaxSections ? nsections : kCmacMaxSections;
    int acc = 0;
    for (int i = 0; i < a.nsec; ++i) {
      a.sec[i] = acc;
      acc += static_cast<int>(sections[i]);
    }
    a.sec[a.nsec] = acc;
  }
  a.c = c;
  return a;
}

// cmac_attention: q [B, Hq, Tq, D], k, v [B, Hkv, T, D], calibrated keys [B, Hkv, N, D] or absent,
// out [B, Hq, Tq, D], the span, the mask's view and the decode splits (cmac_attention_splits; read
// when Tq == 1); `work` (cmac_attention_workspace_floats) is the caller's.
inline CmacAttnArgs cmac_attention_pack(const View& q, const View& k, const View& v, const View& k_cal,
                                        const View& out, CmacSpan span, const MaskView& m, int imd,
                                        const bool* imd_items, int vector_mean, float scale, int causal,
                                        int splits) {
  CmacAttnArgs a{};
  a.q = q.data;
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_st = q.stride(2);
  a.k = k.data;
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.v = v.data;
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_st = v.stride(2);
  if (k_cal.present()) {
    a.kc = k_cal.data;
    a.c_sb = k_cal.stride(0);
    a.c_sh = k_cal.stride(1);
    a.c_st = k_cal.stride(2);
    a.N = k_cal.size(2);
  }
  a.out = out.data;
  a.span = span;
  a.mask = m;
  a.imd = imd;
  a.imd_items = imd_items;
  a.vector_mean = vector_mean;
  a.scale = scale;
  a.causal = causal;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Tq = q.size(2);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.T = k.size(2);
  a.splits = splits;
  // IMD threshold chunks from the image size known here (per-item spans live on the device: up to T)
  int64_t img = a.T;
  if (span.spans == nullptr) {
    int64_t s0, e0;
    span.get(0, a.T, s0, e0);
    img = e0 - s0;
  }
  const int64_t chunks = (img + kCmacChunkKeys - 1) / kCmacChunkKeys;
  a.chunks = static_cast<int>(chunks < 1 ? 1 : (chunks > kCmacMaxChunks ? kCmacMaxChunks : chunks));
  return a;
}

// cmac_attention with a caller-held mean of the segment's image keys ([B, Hkv, D] contiguous
// float32; nullptr: none): the threshold then takes one chunk per (b, kv head), the keys unread. Call
// after cmac_attention_pack, before sizing the workspace.
inline void cmac_attention_set_key_mean(CmacAttnArgs& a, const float* kmean) {
  a.kmean = kmean;
  if (kmean != nullptr) a.chunks = 1;
}

// contrastive_logits: logits and distorted logits [..., V] (contiguous), out like them.
inline CmacContrastiveArgs cmac_contrastive_pack(const View& l, const View& lt, const View& out, float alpha,
                                                 float log_beta) {
  CmacContrastiveArgs a{};
  a.l = l.data;
  a.lt = lt.data;
  a.out = out.data;
  a.V = l.size(-1);
  int64_t rows = 1;
  for (int i = 0; i + 1 < l.ndim; ++i) rows *= l.size(i);
  a.rows = a.V > 0 ? rows : 0;
  a.a = alpha;
  a.log_beta = log_beta;
  return a;
}

}  // namespace kvfix::kernels
