// CMAC (METHODS §4) CUDA kernels: calibrated image keys, attention with IMD, contrastive logits.
// Framework-free: CUDA runtime and C++ headers only, so the ATen side (csrc/cuda/cmac.cu), the
// resource report (tools/ptxas_report.py) and the CPU-side SIMT emulator (tests/emu/) all compile
// this source.
//
// cmac_rope_kernel: one block per (b, kv head, image token); each thread rotates frequency pairs
//   (f, f + D/2) by delta = (1 - 1/gamma) (a - p) inv_freq[f], p the token's RoPE position and a
//   the anchor (per section): the position of the first token after the span, or one past the
//   span's last token's position where the span ends the sequence. The image is compressed
//   toward its end, next to the text. sincosf (full range reduction).
//
// cmac_threshold_kernel (IMD only): one block per (b, kv head): this kv head's share of mu_P,
//   (sum over its query heads and the after-image queries of q) . (mean image key) / N, into a
//   [B, Hkv] workspace; the attention kernel sums the shares of an item (fixed order).
//
// cmac_attention_kernel: flash attention in plain SIMT. One block of kCmacThreads (4 warps) per
//   (b, query head, query tile of QT rows); a warp owns QT / 4 rows, keeps their online-softmax
//   state (m, l, imd sum) and fp32 accumulators (D / 32 per lane and row) in registers. Query tiles
//   split where queries become after-image (position >= end), key tiles of up to KT rows end at
//   the span's edges, so a (query tile, key tile) pair is wholly in or out of the calibrated
//   segment: segment tiles are read from k_calibrated instead of k. Per key tile: K and V rows go
//   to shared memory as fp32 (K rows padded by one word: lanes reading different rows hit different
//   banks), lane j forms the logit of key j, the warp folds the tile into each row's state
//   (shuffle reductions), IMD hits (raw logit > mu_P, segment tiles of IMD items) are summed and
//   zeroed, and P V is accumulated with p_j broadcast by shuffles, each lane owning dims lane + 32c.
//   mu_V (the image values' mean) is summed from the shared V tiles of the segment. Output
//   (acc + imd_sum * mu_V) / l, zeros for a row without any key.
//
// cmac_contrastive_kernel: one block per row of V logits: block max, then
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
  float* work;                 // [B * Hkv] floats (IMD threshold shares)
  float scale;
  int causal;
  int64_t B, Hq, Hkv, Tq, T, D, N;
};

struct CmacContrastiveArgs {
  const void *l, *lt;  // [rows, V] contiguous
  void* out;
  int64_t rows, V;
  float a, log_beta;
};

namespace cmac_detail {

template <class T>
__device__ __forceinline__ float ld(const T* p) {
  return Num<T>::to_f(*p);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
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

}  // namespace cmac_detail

template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_rope_kernel(const CmacRopeArgs a) {
  const int64_t n = blockIdx.x % a.N, h = (blockIdx.x / a.N) % a.H, b = blockIdx.x / (a.N * a.H);
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const int64_t t = s + n;
  const int64_t half = a.D / 2;
  T* o = static_cast<T*>(a.out) + ((b * a.H + h) * a.N + n) * a.D;
  if (t >= e) {  // an out-of-range per-item span (device spans are not checked on the host): zeros
    for (int64_t d = threadIdx.x; d < a.D; d += blockDim.x) o[d] = Num<T>::from_f(0.0f);
    return;
  }
  const T* x = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh + t * a.k_st;
  for (int64_t f = threadIdx.x; f < half; f += blockDim.x) {
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
    const float x1 = cmac_detail::ld(x + f), x2 = cmac_detail::ld(x + f + half);
    o[f] = Num<T>::from_f(x1 * cs - x2 * sn);
    o[f + half] = Num<T>::from_f(x2 * cs + x1 * sn);
  }
}

template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_threshold_kernel(const CmacAttnArgs a) {
  const int64_t hk = blockIdx.x % a.Hkv, b = blockIdx.x / a.Hkv;
  const int64_t g = a.Hq / a.Hkv;
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  int64_t i_after = e - (a.T - a.Tq);
  i_after = i_after < 0 ? 0 : (i_after > a.Tq ? a.Tq : i_after);
  const bool on = a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  __shared__ float red[kCmacThreads / 32];
  float dot = 0.0f;
  if (on && e > s && i_after < a.Tq) {
    for (int64_t d = threadIdx.x; d < a.D; d += blockDim.x) {
      float kb = 0.0f, qs = 0.0f;
      for (int64_t t = 0; t < e - s; ++t)
        kb += a.kc != nullptr && t < a.N ? cmac_detail::ld(static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh + t * a.c_st + d)
                              : cmac_detail::ld(static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + (s + t) * a.k_st + d);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
        for (int64_t r = i_after; r < a.Tq; ++r)
          qs += cmac_detail::ld(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + r * a.q_st + d);
      dot += kb * qs;
    }
  }
  dot = cmac_detail::warp_sum(dot);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.0f;
    for (int w = 0; w < kCmacThreads / 32; ++w) tot += red[w];
    a.work[blockIdx.x] = e > s ? tot / static_cast<float>(e - s) : 0.0f;
  }
}

template <class T, int DMAX>
__global__ void __launch_bounds__(kCmacThreads) cmac_attention_kernel(const CmacAttnArgs a) {
  using C = cmac_detail::Cfg<DMAX>;
  constexpr int QT = C::QT, KT = C::KT, RW = C::RW, NC = C::C;
  __shared__ float qs[QT][DMAX];
  __shared__ float ks[KT][DMAX + 1];
  __shared__ float vs[KT][DMAX];
  const int64_t units = (a.Tq + QT - 1) / QT + 1;  // +1: the split at the span's end
  const int64_t u = blockIdx.x % units, h = (blockIdx.x / units) % a.Hq, b = blockIdx.x / (units * a.Hq);
  const int64_t hk = h / (a.Hq / a.Hkv), D = a.D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t s, e;
  a.span.get(b, a.T, s, e);
  const int64_t off = a.T - a.Tq;  // query i sits at position off + i
  int64_t i_after = e - off;
  i_after = i_after < 0 ? 0 : (i_after > a.Tq ? a.Tq : i_after);
  const int64_t nb_before = (i_after + QT - 1) / QT;
  int64_t i0, i1;
  if (u < nb_before) {
    i0 = u * QT;
    i1 = i0 + QT < i_after ? i0 + QT : i_after;
  } else {
    i0 = i_after + (u - nb_before) * QT;
    i1 = i0 + QT < a.Tq ? i0 + QT : a.Tq;
  }
  if (i0 >= i1) return;  // the unused unit of this (b, h): uniform for the whole block
  const bool after = i0 >= i_after;
  const bool use_imd = after && e > s && a.imd && (a.imd_items == nullptr || a.imd_items[b]);
  float mu_p = 0.0f;
  if (use_imd) {
    float tot = 0.0f;
    for (int64_t j = 0; j < a.Hkv; ++j) tot += a.work[b * a.Hkv + j];
    mu_p = a.scale * tot / static_cast<float>((a.Tq - i_after) * a.Hq);
  }
  for (int64_t idx = threadIdx.x; idx < QT * D; idx += blockDim.x) {
    const int64_t r = idx / D, d = idx % D;
    qs[r][d] = i0 + r < i1 ? cmac_detail::ld(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + (i0 + r) * a.q_st + d)
                           : 0.0f;
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
    for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(n) * D; idx += blockDim.x) {
      const int64_t j = idx / D, d = idx % D;
      // (j0 - s + j < N unless a device span disagrees with k_calibrated's N: then k, never out of bounds)
      const T* kp = cal && j0 - s + j < a.N
                        ? static_cast<const T*>(a.kc) + b * a.c_sb + hk * a.c_sh + (j0 - s + j) * a.c_st
                        : static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + (j0 + j) * a.k_st;
      ks[j][d] = cmac_detail::ld(kp + d);
      vs[j][d] = cmac_detail::ld(static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh + (j0 + j) * a.v_st + d);
    }
    __syncthreads();
    if (tile_imd) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int64_t d = lane + 32 * c;
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
        for (int64_t d = 0; d < D; ++d) dot += qs[row][d] * ks[lane][d];
        x = dot * a.scale;
        hit = tile_imd && x > mu_p;
        const int64_t j = j0 + lane;
        bool valid = !(a.causal && j > qpos);
        if (a.mask.kind != 0 && valid) {
          const float bias = Mask::at(a.mask, b, h, i, j);
          valid = bias != -INFINITY;
          x += bias;
        }
        if (!valid) x = -INFINITY;
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
          const int64_t d = lane + 32 * c;
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
      const int64_t d = lane + 32 * c;
      if (d < D) o[d] = Num<T>::from_f((acc[r][c] + (use_imd ? im[r] * vsum[c] : 0.0f)) * inv);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kCmacThreads) cmac_contrastive_kernel(const CmacContrastiveArgs a) {
  const int64_t row = blockIdx.x;
  const T* l = static_cast<const T*>(a.l) + row * a.V;
  const T* lt = static_cast<const T*>(a.lt) + row * a.V;
  T* o = static_cast<T*>(a.out) + row * a.V;
  __shared__ float red[kCmacThreads / 32];
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < a.V; j += blockDim.x) {
    const float x = cmac_detail::ld(l + j);
    mx = fmaxf(mx, x == x ? x : INFINITY);  // fmaxf would skip a nan
  }
  mx = cmac_detail::warp_max(mx);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < kCmacThreads / 32; ++w) mx = fmaxf(mx, red[w]);
  for (int64_t j = threadIdx.x; j < a.V; j += blockDim.x) {
    const float x = cmac_detail::ld(l + j);
    const float y = x - mx >= a.log_beta ? x + a.a * (x - cmac_detail::ld(lt + j)) : -INFINITY;
    o[j] = Num<T>::from_f(mx == INFINITY ? NAN : y);
  }
}

template <class T>
cudaError_t cmac_rope_launch(const CmacRopeArgs& a, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_rope_launch: T must be float, __half or __nv_bfloat16");
  const int64_t blocks = a.B * a.H * a.N;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || a.rows < 1 || a.nsec < 1 || a.nsec > kCmacMaxSections) return cudaErrorInvalidValue;
  cmac_rope_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t cmac_attention_launch(const CmacAttnArgs& a, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "cmac_attention_launch: T must be float, __half or __nv_bfloat16");
  if (a.B * a.Hq * a.Tq == 0) return cudaSuccess;
  if (a.D > kCmacMaxHeadDim || a.Hkv < 1 || a.Hq % a.Hkv != 0) return cudaErrorInvalidValue;
  if (a.imd) {
    const int64_t blocks = a.B * a.Hkv;
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_threshold_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                               stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.D <= 128) {
    constexpr int QT = cmac_detail::Cfg<128>::QT;
    const int64_t blocks = a.B * a.Hq * ((a.Tq + QT - 1) / QT + 1);
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    cmac_attention_kernel<T, 128><<<dim3(static_cast<unsigned>(blocks)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                                    stream>>>(a);
  } else {
    constexpr int QT = cmac_detail::Cfg<256>::QT;
    const int64_t blocks = a.B * a.Hq * ((a.Tq + QT - 1) / QT + 1);
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
  if (a.rows > 0x7fffffff) return cudaErrorInvalidValue;
  cmac_contrastive_kernel<T><<<dim3(static_cast<unsigned>(a.rows)), dim3(kCmacThreads), kCmacDynamicSmemBytes,
                               stream>>>(a);
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
// out [B, Hq, Tq, D], the span and the mask's view; `work` ([B * Hkv] floats with IMD) is the caller's.
inline CmacAttnArgs cmac_attention_pack(const View& q, const View& k, const View& v, const View& k_cal,
                                        const View& out, CmacSpan span, const MaskView& m, int imd,
                                        const bool* imd_items, int vector_mean, float scale, int causal) {
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
  return a;
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
