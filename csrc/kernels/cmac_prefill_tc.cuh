// CMAC attention prefill (Tq > 1) on tensor cores: the semantics of cmac_attention_kernel
// (csrc/kernels/cmac.cuh; METHODS §4) with both products through nvcuda::wmma 16x16x16 (fp16 or
// bf16 inputs, fp32 accumulation). Framework-free (CUDA runtime, cuda_fp16/bf16, mma.h), like
// cmac.cuh, whose argument packing, IMD threshold kernel and SIMT kernels it reuses.
//
// cmac_prefill_tc_kernel: one block of kCmacThreads (4 warps) per (b, query head, query tile of 64
//   rows); warp w owns rows [16 w, 16 w + 16) of the tile. Query tiles split where queries become
//   after-image (position >= end; cmac_detail::query_tile, shared with the SIMT kernel) and key
//   tiles of up to 32 rows end at the span's edges, so a (query tile, key tile) pair is wholly in
//   or out of the calibrated segment (segment tiles read k_calibrated). Q, K and V tiles are staged
//   in shared memory in the input type (16-byte copies where pointers and strides allow, element by
//   element otherwise; rows past the data and dims from D up to the next multiple of 16 are zeros),
//   so any D <= 128 runs.
//   One pass over the key tiles, as flash attention: S = Q K^T (wmma, fp32) goes to shared memory,
//   where two lanes per query row (16 keys each of a 32-key tile) form the logits (scale, causal,
//   masks; a nan logit gives p = nan whatever the max: the row turns nan, softmax's rule), set IMD hits
//   aside (raw logit > mu_P in segment tiles of IMD items: their mass is summed, their p zeroed) and
//   write P = exp(x - m) rounded to the input type (as flash attention does); P V accumulates in fp32
//   wmma fragments. The fragments' element layout is opaque, so a row cannot be rescaled in place:
//   the running max m moves lazily, only when a tile's max exceeds it by more than kLazy = 8 (so
//   p <= e^8, well inside fp16 and bf16), and then the warp's accumulators go through its 16 x 16
//   staging tile in shared memory to be rescaled (rare: typically never after the first tiles).
//   l and the IMD mass are summed in fp32 on the same scale, so the result is exact whatever m is.
//   mu_V is summed from the staged V tiles of the segment (warp w the rows w mod 4; combined in the
//   K tile's shared memory after the loop).
//   Output (P V + imd mass * mu_V) / l, zeros for a row without any key; the accumulators go through
//   the staging tile (the warp's rows of S).
//
// Shared memory (static, 48 KiB): Q 64 x 136 + K, V 32 x 136 (16-bit), S 64 x 36 (fp32), P 64 x 40
// (16-bit); the padded leading dims keep wmma pointers 32-byte aligned.
//
// Dispatch (cmac_attention_dispatch, called by csrc/cuda/cmac.cu and the emulator's shim): this
// kernel for fp16 / bf16 with Tq > 1 and D <= 128; the SIMT kernels of cmac.cuh otherwise (fp32:
// tf32 products would miss fp32's accuracy rule; D > 128; decode, Tq == 1).
#pragma once

// For tools/ptxas_report.py (the SIMT kernels are reported with cmac.cuh):
// @ptxas-instantiate: template __global__ void kvfix::kernels::cmac_prefill_tc_kernel<__half>(const kvfix::kernels::CmacAttnArgs);
// @ptxas-instantiate: template __global__ void kvfix::kernels::cmac_prefill_tc_kernel<__nv_bfloat16>(const kvfix::kernels::CmacAttnArgs);

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cmac.cuh"

namespace kvfix::kernels {

constexpr int kCmacTcMaxHeadDim = 128;

namespace cmac_tc_detail {

constexpr int QT = 64;                      // query rows per block (16 per warp)
constexpr int KT = 32;                      // key rows per tile
constexpr int DMAX = kCmacTcMaxHeadDim;
constexpr int LD = DMAX + 8;                // Q, K, V rows (16-bit elements)
constexpr int SLD = KT + 4;                 // S rows (floats)
constexpr int PLD = KT + 8;                 // P rows (16-bit elements)
constexpr int CH = 8;                       // 16-bit elements per 16-byte chunk
constexpr float kLazy = 8.0f;               // a row's max moves when a tile's exceeds it by more
static_assert(QT == 16 * (kCmacThreads / 32), "a warp owns 16 query rows");
static_assert(KT == 32, "two lanes per row, 16 keys each");
static_assert(16 * SLD >= 16 * 16 + DMAX, "a warp's S rows hold its output staging tile and mu_V");
static_assert(KT * LD * 2 >= (kCmacThreads / 32) * DMAX * 4, "the K tile holds the warps' value sums");
static_assert((QT + 2 * KT) * LD * 2 + QT * SLD * 4 + QT * PLD * 2 <= 48 * 1024, "static shared memory");

// Rows [0, rows) of a tile, dims [0, Dp) (Dp a multiple of 16): row r < n from row(r), zeros past
// n and from D on. 16-byte copies when `vec` (row pointers 16-byte aligned, D a multiple of 8).
template <class T, class RowPtr>
__device__ __forceinline__ void stage(T* dst, int rows, int n, int D, int Dp, bool vec, RowPtr row) {
  const int cpr = Dp / CH;
  const T zero = Num<T>::from_f(0.0f);
  for (int idx = threadIdx.x; idx < rows * cpr; idx += blockDim.x) {
    const int r = idx / cpr, d0 = (idx - r * cpr) * CH;
    T* o = dst + r * LD + d0;
    if (r < n && vec && d0 < D) {
      *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(row(r) + d0);
    } else if (r < n) {
      const T* src = row(r);
#pragma unroll
      for (int x = 0; x < CH; ++x) o[x] = d0 + x < D ? src[d0 + x] : zero;
    } else {
#pragma unroll
      for (int x = 0; x < CH; ++x) o[x] = zero;
    }
  }
}

// S (16 x 32, fp32, this warp's rows) = Q_w (16 x Dp) K^T (Dp x 32).
template <class T>
__device__ __forceinline__ void scores(const T* qw, const T* ks, float* sw, int nd) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[2];
  wmma::fill_fragment(s[0], 0.0f);
  wmma::fill_fragment(s[1], 0.0f);
#pragma unroll
  for (int dk = 0; dk < DMAX / 16; ++dk) {
    if (dk < nd) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fq;
      wmma::load_matrix_sync(fq, qw + dk * 16, LD);
#pragma unroll
      for (int kt = 0; kt < 2; ++kt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fk;  // K^T: K rows are its columns
        wmma::load_matrix_sync(fk, ks + kt * 16 * LD + dk * 16, LD);
        wmma::mma_sync(s[kt], fq, fk, s[kt]);
      }
    }
  }
  wmma::store_matrix_sync(sw, s[0], SLD, wmma::mem_row_major);
  wmma::store_matrix_sync(sw + 16, s[1], SLD, wmma::mem_row_major);
}

}  // namespace cmac_tc_detail

template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_prefill_tc_kernel(const CmacAttnArgs a) {
  namespace wmma = nvcuda::wmma;
  using namespace cmac_tc_detail;
  __shared__ __align__(128) T qs[QT * LD];
  __shared__ __align__(128) T ks[KT * LD];
  __shared__ __align__(128) T vs[KT * LD];
  __shared__ __align__(128) float ss[QT * SLD];
  __shared__ __align__(128) T ps[QT * PLD];
  // Query tile u of (b, h): the tile index varies slowest and the last tiles (the most keys) come
  // first, so the blocks resident on one SM do not all have the same (the heaviest) tile.
  const int64_t units = cmac_detail::query_tiles(a.Tq, QT);
  const int64_t bh = blockIdx.x % (a.B * a.Hq), u = units - 1 - blockIdx.x / (a.B * a.Hq);
  const int64_t h = bh % a.Hq, b = bh / a.Hq;
  const int64_t hk = h / (a.Hq / a.Hkv);
  const int D = static_cast<int>(a.D), Dp = (D + 15) / 16 * 16, nd = Dp / 16;
  const bool vec = a.vec != 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const auto [s, e, i_after, i0, i1, after, use_imd, mu_p] = cmac_detail::prefill_tile(a, b, u, QT, lane);
  if (i0 >= i1) return;  // the unused unit of this (b, h): uniform for the whole block
  const int64_t off = a.T - a.Tq;  // query i sits at position off + i
  const T* const qb = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* const kb = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* const vb = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  const T* const cb = a.kc != nullptr ? static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh : nullptr;
  cmac_tc_detail::stage(qs, QT, static_cast<int>(i1 - i0), D, Dp, vec,
                        [&](int r) { return qb + (i0 + r) * a.q_st; });

  // This lane's row of the warp's 16 and its half of a key tile (keys 16 half + c, c < 16).
  const int r = lane >> 1, half = lane & 1;
  const int64_t i = i0 + 16 * warp + r, qpos = off + i;
  const bool row_ok = i < i1;
  const T* const qw = qs + 16 * warp * LD;
  float* const sw = ss + 16 * warp * SLD;
  T* const pw = ps + 16 * warp * PLD;
  const int64_t k_end = a.causal ? off + i1 : a.T;
  const auto tile_end = [&](int64_t j0) {
    int64_t j1 = j0 + KT < k_end ? j0 + KT : k_end;
    if (j0 < s) j1 = j1 < s ? j1 : s;
    else if (j0 < e) j1 = j1 < e ? j1 : e;
    return j1;
  };
  const auto stage_k = [&](int64_t j0, int n, bool cal) {
    // (j0 - s + j < N unless a device span disagrees with k_calibrated's N: then k, never out of bounds)
    cmac_tc_detail::stage(ks, KT, n, D, Dp, vec, [&](int j) {
      return cal && j0 - s + j < a.N ? cb + (j0 - s + j) * a.c_st : kb + (j0 + j) * a.k_st;
    });
  };
  // Logit of key 16 half + c of the tile at j0 (-inf where it takes no part); `hit`: an IMD hit.
  const auto logit = [&](int64_t j0, int n, int c, bool tile_imd, bool& hit) {
    const int jj = 16 * half + c;
    float x = -INFINITY;
    hit = false;
    if (row_ok && jj < n) {
      x = sw[r * SLD + jj] * a.scale;
      hit = tile_imd && x > mu_p;
      x = cmac_detail::masked_logit(a, b, h, i, qpos, j0 + jj, x);
    }
    return x;
  };

  // One pass over the key tiles, the P V accumulators in wmma fragments. Their element layout is
  // opaque, so they are rescaled (through the warp's staging tile) only when a row's max moves, and
  // the max moves lazily: only when a tile's max exceeds it by more than kLazy (p <= e^kLazy).
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DMAX / 16];
#pragma unroll
  for (int c = 0; c < DMAX / 16; ++c) wmma::fill_fragment(acc[c], 0.0f);
  float m = -INFINITY, l = 0.0f, im = 0.0f, vsum[DMAX / 32];
#pragma unroll
  for (int c = 0; c < DMAX / 32; ++c) vsum[c] = 0.0f;
  for (int64_t j0 = 0; j0 < k_end;) {
    const int64_t j1 = tile_end(j0);
    const int n = static_cast<int>(j1 - j0);
    const bool image = j0 >= s && j0 < e;
    const bool tile_imd = use_imd && image;
    __syncthreads();  // the previous tile's readers are done (and Q is staged, first time)
    stage_k(j0, n, image && after && a.kc != nullptr);
    cmac_tc_detail::stage(vs, KT, n, D, Dp, vec, [&](int j) { return vb + (j0 + j) * a.v_st; });
    __syncthreads();  // the K and V tiles are staged
    if (tile_imd) {
#pragma unroll
      for (int c = 0; c < DMAX / 32; ++c) {
        const int d = lane + 32 * c;
        if (d < D)  // warp w sums the rows j = w mod 4 (combined after the loop)
          for (int j = warp; j < n; j += kCmacThreads / 32) vsum[c] += Num<T>::to_f(vs[j * LD + d]);
      }
    }
    cmac_tc_detail::scores(qw, ks, sw, nd);
    __syncwarp();
    float x[16];
    unsigned hits = 0;
    float mt = -INFINITY;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      bool hit;
      x[c] = logit(j0, n, c, tile_imd, hit);
      hits |= hit ? 1u << c : 0u;
      mt = fmaxf(mt, x[c]);  // (a nan logit gives p = nan below, whatever m: the row turns nan)
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    float alpha = 1.0f;
    const bool move = mt > m + kLazy;  // (m = -inf: the row's first key; a nan row moves to +inf)
    const bool rescale = move && m != -INFINITY;  // (an accumulator row without any key yet is 0)
    if (move) {
      alpha = __expf(m - mt);
      m = mt;
      l *= alpha;
      im *= alpha;
    }
    __syncwarp();  // S is read: its rows become the staging tile
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int c = 0; c < DMAX / 16; ++c) {
        if (c < nd) {
          wmma::store_matrix_sync(sw, acc[c], 16, wmma::mem_row_major);
          __syncwarp();
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const int el = lane + 32 * k;
            sw[el] *= __shfl_sync(0xffffffffu, alpha, 2 * (el >> 4));
          }
          __syncwarp();
          wmma::load_matrix_sync(acc[c], sw, 16, wmma::mem_row_major);
          __syncwarp();
        }
      }
    }
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float p = x[c] == -INFINITY ? 0.0f : __expf(x[c] - m);
      const float ph = (hits >> c) & 1u ? p : 0.0f;
      l += p;
      im += ph;
      pw[r * PLD + 16 * half + c] = Num<T>::from_f(p - ph);
    }
    __syncwarp();  // P complete
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp;
      wmma::load_matrix_sync(fp, pw + kk * 16, PLD);
#pragma unroll
      for (int c = 0; c < DMAX / 16; ++c) {
        if (c < nd) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
          wmma::load_matrix_sync(fv, vs + kk * 16 * LD + c * 16, LD);
          wmma::mma_sync(acc[c], fp, fv, acc[c]);
        }
      }
    }
    j0 = j1;
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  im += __shfl_xor_sync(0xffffffffu, im, 1);

  // Output: the warp's S rows (private to it) hold a 16 x 16 staging tile and mu_V.
  float* const stg = sw;
  float* const muv = sw + 16 * 16;
  __syncwarp();  // the last tile's S is read
  if (use_imd) {  // (uniform for the block)
    float* const vpart = reinterpret_cast<float*>(ks);  // the warps' value sums [4][DMAX]
    __syncthreads();  // every warp is past its last tile: ks is free
#pragma unroll
    for (int c = 0; c < DMAX / 32; ++c)
      if (lane + 32 * c < D) vpart[warp * DMAX + lane + 32 * c] = vsum[c];
    __syncthreads();  // the warps' value sums are in shared memory
#pragma unroll
    for (int c = 0; c < DMAX / 32; ++c) {
      const int d = lane + 32 * c;
      vsum[c] = 0.0f;
      if (d < D)
        for (int w = 0; w < kCmacThreads / 32; ++w) vsum[c] += vpart[w * DMAX + d];
    }
    const float inv_n = 1.0f / static_cast<float>(e - s);
    float tot = 0.0f;
#pragma unroll
    for (int c = 0; c < DMAX / 32; ++c) tot += vsum[c];
    tot = cmac_detail::warp_sum(tot);
#pragma unroll
    for (int c = 0; c < DMAX / 32; ++c) {
      const int d = lane + 32 * c;
      if (d < D) muv[d] = a.vector_mean ? vsum[c] * inv_n : tot * inv_n / static_cast<float>(D);
    }
  }
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // no key: 0; a nan state stays nan
  T* const ob = static_cast<T*>(a.out) + ((b * a.Hq + h) * a.Tq + i0 + 16 * warp) * D;
#pragma unroll
  for (int c = 0; c < DMAX / 16; ++c) {
    if (c < nd) {
      __syncwarp();  // the previous staging tile is read (and mu_V written, first time)
      wmma::store_matrix_sync(stg, acc[c], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int el = lane + 32 * k, rr = el >> 4, d = c * 16 + (el & 15);
        const float inv_r = __shfl_sync(0xffffffffu, inv, 2 * rr);
        const float im_r = __shfl_sync(0xffffffffu, im, 2 * rr);
        if (i0 + 16 * warp + rr < i1 && d < D)
          ob[rr * D + d] = Num<T>::from_f((stg[el] + (use_imd ? im_r * muv[d] : 0.0f)) * inv_r);
      }
    }
  }
}

// The tensor-core kernel takes this call: fp16 / bf16, Tq > 1, D <= kCmacTcMaxHeadDim.
template <class T>
inline bool cmac_prefill_tc_supported(const CmacAttnArgs& a) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    return a.Tq > 1 && a.D >= 1 && a.D <= kCmacTcMaxHeadDim;
  }
}

// The IMD threshold (when IMD is on), then cmac_prefill_tc_kernel; cudaErrorNotSupported where
// cmac_prefill_tc_supported is false. All on `stream`, no synchronisation.
template <class T>
cudaError_t cmac_prefill_tc_launch(const CmacAttnArgs& args, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_prefill_tc_launch: T must be float, __half or __nv_bfloat16");
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorNotSupported;
  } else {
    if (!cmac_prefill_tc_supported<T>(args)) return cudaErrorNotSupported;
    if (args.B * args.Hq == 0) return cudaSuccess;
    if (args.Hkv < 1 || args.Hq % args.Hkv != 0) return cudaErrorInvalidValue;
    CmacAttnArgs a = args;
    a.vec = cmac_detail::vec_ok<T>(a) ? 1 : 0;
    if (cmac_threshold_launched(a)) {  // Tq > 1: whenever IMD is on (with a caller's mean: one chunk, no key read)
      const int64_t blocks = a.B * a.Hkv * a.chunks;
      if (a.work == nullptr || a.chunks < 1 || a.chunks > kCmacMaxChunks || blocks > 0x7fffffff)
        return cudaErrorInvalidValue;
      cmac_threshold_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                 stream>>>(a);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    const int64_t blocks = a.B * a.Hq * cmac_detail::query_tiles(a.Tq, cmac_tc_detail::QT);
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_prefill_tc_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                stream>>>(a);
    return cudaGetLastError();
  }
}

// cmac_attention on CUDA: the tensor-core prefill kernel where it applies, else cmac_attention_launch.
template <class T>
cudaError_t cmac_attention_dispatch(const CmacAttnArgs& a, cudaStream_t stream) {
  return cmac_prefill_tc_supported<T>(a) ? cmac_prefill_tc_launch<T>(a, stream) : cmac_attention_launch<T>(a, stream);
}

}  // namespace kvfix::kernels
