// KVSmooth (METHODS §2) as two CUDA launches per step, of one layer or of up to kKvsMaxLayers
// layers of one shape (kvsmooth_steps_launch: the layers are the grid's y index). Framework-free:
// CUDA runtime and C++ headers only, so the ATen side (csrc/cuda/kvsmooth.cu), the resource report
// (tools/ptxas_report.py) and the CPU-side SIMT emulator (tests/emu/) all compile this source.
//
// What it computes, for a single-token query q [B, Hq, 1, D] over keys k [B, Hkv, T, D] (query
// head hq reads kv head hq / g, g = Hq / Hkv), per batch item b:
//
//   H[b, hq] = entropy of softmax(q . k^T * scale + mask) over the positions taking part
//   (bool mask False or additive -inf: no part, whatever k holds there; a -inf logit: no part;
//   no position at all: H = 0; a nan or +inf logit of a position taking part: H = nan);
//
// and for the step (queue given):
//
//   z = mean_hq H[b, hq];  push z onto queue[b] (oldest first, NaN = empty slot, drop slot 0);
//   rank = k / M, k = #{entries <= z} (the 1-based rank of z, z included; M = queue capacity,
//   also while the queue fills; NaN slots never count);  lam = clamp(clamp(rank, lam_lo, lam_hi), 0, 1)
//   (a nan z has no rank: lam = nan, which the EMA writes into position T - 1);
//   K[b, :, T-1] = (1 - lam) K[b, :, T-1] + lam K[b, :, T-2], the same for V (fp32, rounded once);
//   lam = 0 (and nothing smoothed) when T == 1 or the mask excludes position T - 2.
//
// A step may take the current token's cache position p from device memory (`pos`: a static cache
// of capacity T whose filled length changes between the replays of one CUDA graph): then every
// T above is p + 1 (positions after p take no part, p is smoothed from p - 1); a p outside [0, T)
// gives every entropy of the item nan, pushes nan, returns lam nan and writes no cache position.
//
// Launch 1, kvsmooth_partial_kernel: one block of 128 threads per (split of the positions, kv head,
// batch item) and layer. Positions are split so that one layer's grid has about 4 blocks per SM
// (kvsmooth_splits; the same splits for a layer launched alone or with others).
// Threads form row groups of TPR lanes; a row group owns one key row at a time, each lane 16 bytes
// (VEC elements) of it per chunk, CPL chunks (TPR * VEC * CPL >= D), read with 16-byte loads when
// pointers and strides allow, element by element otherwise. The query rows of up to
// kKvsHeadsPerPass heads (fp32) sit in shared memory; each lane forms its partial dot
// products, an xor-shuffle butterfly inside the row group completes them, and every lane of the
// group folds the logit into that group's online-softmax state per head
//
//   m = max logit, l = sum e^(x - m), u = sum e^(x - m) (x - m)     (H = log l - u / l)
//
// with one expf per logit (either the new term or the rescale of the old state is e^0 = 1). The
// row groups' states are merged through shared memory in a fixed order and the block writes one
// partial state (m, l, u) per query head to the workspace. More than kKvsHeadsPerPass query heads
// per kv head: the block runs several passes over its rows (the second and later ones hit L2).
//
// Launch 2, kvsmooth_finish_kernel: one block per batch item and layer merges the splits of every
// query head in a fixed order (row_entropy: writes H), sums the heads in a fixed tree
// (deterministic), and for the step: thread 0 pushes z, ranks it and clamps lam, then the block
// applies the EMA to the last position of every kv head of K and V. Launch order on one stream is
// what makes the EMA run after every key has been read; no atomics, no host synchronisation,
// nothing depends on values read back by the host: both launches (and the workspace from the
// caching allocator) can be captured in a CUDA graph.
//
// Plain CUDA C++: shared memory, __syncthreads and __shfl_xor_sync only (no inline PTX, no
// dynamic shared memory), so the SIMT emulator can run it. Head dims up to kKvsmoothMaxHeadDim.
#pragma once

// For tools/ptxas_report.py (each launcher instantiates every kernel shape it can launch):
// @ptxas-instantiate: template cudaError_t kvfix::kernels::kvsmooth_launch<float>(const kvfix::kernels::KvsmoothArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::kvsmooth_launch<__half>(const kvfix::kernels::KvsmoothArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::kvsmooth_launch<__nv_bfloat16>(const kvfix::kernels::KvsmoothArgs&, cudaStream_t);

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "num.h"

namespace kvfix::kernels {

// Arguments of one row_entropy (entropy != nullptr) or step (queue != nullptr) call. Element
// strides (not bytes); every last dim is contiguous.
struct KvsmoothArgs {
  const void* q;  // [B, Hq, 1, D]
  int64_t q_sb, q_sh;
  void* k;        // [B, Hkv, T, D]; the step writes position T - 1
  int64_t k_sb, k_sh, k_st;
  void* v;        // [B, Hkv, T, D] (step) or nullptr
  int64_t v_sb, v_sh, v_st;
  MaskView mask;     // key mask [B, 1, 1, T] (kind 0: none), read at (b, 0, 0, t)
  float* queue;      // [B, M] float32 (step) or nullptr
  int64_t qu_sb, qu_sm, M;
  float* lam;        // [B] (step)
  const int64_t* pos;  // step: the current token's cache position p, read on the device (positions
                       // [0, p] take part, the EMA writes p), or nullptr: p = T - 1
  float* entropy;    // [B, Hq] contiguous (row_entropy) or nullptr
  float* work;       // kvsmooth_workspace_floats(*this) floats
  int64_t B, Hq, Hkv, T, D;
  int64_t splits;    // position splits per (b, kv head): kvsmooth_splits(...)
  int64_t rows_per_split;  // set by kvsmooth_launch: ceil(T / splits)
  float scale;       // logit scale
  float lam_lo, lam_hi;  // lam_ref -/+ band
};

// Largest head dim (TPR * VEC * CPL with the widest shape).
constexpr int kKvsmoothMaxHeadDim = 512;
// The kernels use static shared memory only (read by tools/ptxas_report.py).
constexpr int kKvsmoothDynamicSmemBytes = 0;
constexpr int kKvsThreads = 128;       // threads per block, both kernels
constexpr int kKvsHeadsPerPass = 8;    // query heads per kv head handled in one pass over the rows
constexpr int64_t kKvsMinRowsPerSplit = 64;
// Layers per launch pair (kvsmooth_steps_launch): the pointer table below is a kernel parameter,
// 3072 bytes at 64 layers, which with KvsmoothArgs (under 300 bytes) stays within the 4 KiB of
// kernel parameters that every CUDA 12 / 13 driver takes.
constexpr int kKvsMaxLayers = 64;

// What differs between the layers of one launch pair: layer blockIdx.y reads q[y] and k[y], and a
// step writes k[y], v[y], queue[y], lam[y] and its workspace work[y] (the KvsmoothArgs fields of
// the same names are layer 0's; no kernel reads them).
struct KvsmoothLayers {
  const void* q[kKvsMaxLayers];
  void* k[kKvsMaxLayers];
  void* v[kKvsMaxLayers];
  float* queue[kKvsMaxLayers];
  float* lam[kKvsMaxLayers];
  float* work[kKvsMaxLayers];  // kvsmooth_workspace_floats each
};
static_assert(sizeof(KvsmoothArgs) + sizeof(KvsmoothLayers) + sizeof(int) <= 4096,
              "the partial kernel's parameters must fit in 4 KiB");

// Position splits per (b, kv head): about 4 blocks per SM in all, at least kKvsMinRowsPerSplit
// positions per split.
inline int64_t kvsmooth_splits(int64_t B, int64_t Hkv, int64_t T, int num_sms) {
  const int64_t pairs = B * Hkv > 0 ? B * Hkv : 1;
  const int64_t want = (4 * int64_t(num_sms > 0 ? num_sms : 1) + pairs - 1) / pairs;
  const int64_t most = (T + kKvsMinRowsPerSplit - 1) / kKvsMinRowsPerSplit;
  int64_t s = want < most ? want : most;
  return s < 1 ? 1 : s;
}

// Workspace floats of one call: a partial (m, l, u) per (b, query head, split).
inline int64_t kvsmooth_workspace_floats(const KvsmoothArgs& a) { return a.B * a.Hq * a.splits * 3; }

namespace kvs_detail {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// 16 bytes at p (16-byte aligned) as VEC floats.
template <class T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(w.x);
    out[1] = __uint_as_float(w.y);
    out[2] = __uint_as_float(w.z);
    out[3] = __uint_as_float(w.w);
  } else {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: the lower element in the low half
      out[2 * i] = Num<T>::bits_to_f(static_cast<uint16_t>(words[i] & 0xffffu));
      out[2 * i + 1] = Num<T>::bits_to_f(static_cast<uint16_t>(words[i] >> 16));
    }
  }
}

// Fold logit x into (m, l, u) with one expf: if x raises the max, the old state is rescaled by
// e^(m - x) and the new term is 1; otherwise the new term is e^(x - m). Non-finite logits without
// a branch (a branch per head in the hot loop cost up to ~25 registers, fewer resident blocks):
// an empty state starts at m = -FLT_MAX (kFoldEmpty), so a -inf logit gives d = -inf, e = 0 and
// changes nothing (the product takes d >= -104, below which e is 0 anyway: no 0 * -inf), i.e. it
// takes no part; a nan logit turns l nan (kept by every later fold and merge); a +inf one makes
// m = +inf (kept, or l turns nan): either has no softmax (is_poisoned).
constexpr float kFoldEmpty = -3.402823466e38f;
__device__ __forceinline__ void fold(float& m, float& l, float& u, float x) {
  const float d = x - m;  // huge while the state is empty
  const float e = expf(-fabsf(d));
  if (d > 0.0f) {
    u = l > 0.0f ? e * (u - d * l) : 0.0f;
    l = fmaf(e, l, 1.0f);
    m = x;
  } else {
    u = fmaf(e, fmaxf(d, -104.0f), u);
    l += e;
  }
}

__device__ __forceinline__ bool is_poisoned(float m, float l) { return l != l || m > 3.402823466e38f; }

// Positions taking part: T, or p + 1 with a device position p; 0 for a p outside [0, T) (the step
// then has no row: every entropy nan, lam nan, nothing written).
__device__ __forceinline__ int64_t positions(const int64_t* pos, int64_t T) {
  if (pos == nullptr) return T;
  const int64_t p = *pos;
  return p >= 0 && p < T ? p + 1 : 0;
}

// Merge state (m2, l2, u2) into (m, l, u) (empty: l == 0). l = nan survives it (nan times
// anything is nan; an empty state copies it); m = +inf stays +inf or turns l nan.
__device__ __forceinline__ void merge(float& m, float& l, float& u, float m2, float l2, float u2) {
  if (l2 == 0.0f) return;
  if (l == 0.0f) {
    m = m2;
    l = l2;
    u = u2;
    return;
  }
  const float mm = fmaxf(m, m2);
  const float e1 = expf(m - mm), e2 = expf(m2 - mm);
  u = e1 * (u + (m - mm) * l) + e2 * (u2 + (m2 - mm) * l2);
  l = e1 * l + e2 * l2;
  m = mm;
}

}  // namespace kvs_detail

// Blocks per SM the partial kernel asks ptxas for (0: ptxas's choice). fp32 rows of more than 256
// columns (4 chunks per lane): ptxas's own choice, 96 registers for 5 blocks, spilled once the
// kernel read the layer table; 4 blocks leave it the registers.
constexpr int kvs_min_blocks(int elem_bytes, int cpl) { return elem_bytes == 4 && cpl == 4 ? 4 : 0; }

// Launch 1: partial online-softmax states of every query head over one split of the positions.
// Block (split, kv head h, item b) = blockIdx.x (split fastest), layer blockIdx.y. vec: 16-byte
// loads of every layer's K allowed.
template <class T, int TPR, int CPL>
__global__ void __launch_bounds__(kKvsThreads, kvs_min_blocks(sizeof(T), CPL))
    kvsmooth_partial_kernel(const KvsmoothArgs a, const KvsmoothLayers ls, const int vec) {
  using namespace kvs_detail;
  constexpr int VEC = 16 / int(sizeof(T));   // elements per 16-byte chunk
  constexpr int NRG = kKvsThreads / TPR;     // row groups per block
  constexpr int DMAX = TPR * VEC * CPL;      // head-dim columns covered
  constexpr int GP = kKvsHeadsPerPass;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "row groups are powers of 2 within a warp");
  static_assert(GP * DMAX * 4 + NRG * GP * 3 * 4 <= 48 * 1024, "static shared memory must stay under 48 KiB");

  __shared__ __align__(16) float s_q[GP][DMAX];
  __shared__ float s_st[NRG][GP][3];
  __shared__ const void* s_qp;  // the layer's q and workspace (below)
  __shared__ float* s_wp;

  const int tid = threadIdx.x, lane = tid % TPR, rg = tid / TPR;
  // 32-bit index arithmetic (the launcher keeps the grid below 2^31 blocks): 64-bit division
  // would be a called subroutine.
  const unsigned S = static_cast<unsigned>(a.splits), Hkv = static_cast<unsigned>(a.Hkv);
  const unsigned bh = blockIdx.x / S, split = blockIdx.x - bh * S;
  const unsigned h = bh % Hkv, b = bh / Hkv;
  const int64_t per = a.rows_per_split;
  const int64_t t0 = split * per;
  const int64_t n = positions(a.pos, a.T);
  const int64_t t1 = t0 + per < n ? t0 + per : n;
  const int rows = t1 > t0 ? static_cast<int>(t1 - t0) : 0;  // <= rows_per_split < 2^31 (the launcher)
  const int g = static_cast<int>(a.Hq) / static_cast<int>(a.Hkv);
  const int D = static_cast<int>(a.D);
  const T* const kbase = static_cast<const T*>(ls.k[blockIdx.y]) + b * a.k_sb + h * a.k_sh;
  // The layer's query and workspace pointers through shared memory, read after barriers: so they
  // hold no register across the loop over the rows (which spilled in several instantiations).
  if (tid == 0) {
    s_qp = ls.q[blockIdx.y];
    s_wp = ls.work[blockIdx.y];
  }
  __syncthreads();

  for (int h0 = 0; h0 < g; h0 += GP) {
    const int gn = g - h0 < GP ? g - h0 : GP;
    // (No barrier needed here: the previous pass last read s_q before its s_st barrier, and
    // this pass writes s_st only after the barrier below.)
    for (int e = tid; e < GP * DMAX; e += kKvsThreads) {
      const int j = e / DMAX, d = e % DMAX;
      float x = 0.0f;
      if (j < gn && d < D) {
        const T* qrow = static_cast<const T*>(s_qp) + b * a.q_sb + (h * g + h0 + j) * a.q_sh;
        x = Num<T>::to_f(qrow[d]);
      }
      s_q[j][d] = x;
    }
    __syncthreads();

    float m[GP], l[GP], u[GP];
#pragma unroll
    for (int j = 0; j < GP; ++j) {
      m[j] = kFoldEmpty;
      l[j] = 0.0f;
      u[j] = 0.0f;
    }

    // Every thread runs the same number of iterations (the shuffles need whole warps).
    for (int r0 = 0; r0 < rows; r0 += NRG) {
      const int64_t t = t0 + r0 + rg;
      const bool in = r0 + rg < rows;
      float x[CPL][VEC];
      float bias = neg_inf();
      if (in) {
        bias = Mask::at(a.mask, b, 0, 0, t);
        const T* krow = kbase + t * a.k_st;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          const int d0 = (c * TPR + lane) * VEC;
          if (vec && d0 < D) {
            load_vec<T>(krow + d0, x[c]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) x[c][e] = d0 + e < D ? Num<T>::to_f(krow[d0 + e]) : 0.0f;
          }
        }
      } else {
#pragma unroll
        for (int c = 0; c < CPL; ++c)
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[c][e] = 0.0f;
      }
      float dot[GP];
#pragma unroll
      for (int j = 0; j < GP; ++j) {
        float s = 0.0f;
        if (j < gn) {
#pragma unroll
          for (int c = 0; c < CPL; ++c) {
            const float* qv = &s_q[j][(c * TPR + lane) * VEC];
#pragma unroll
            for (int e4 = 0; e4 < VEC; e4 += 4) {
              const float4 q4 = *reinterpret_cast<const float4*>(qv + e4);
              s = fmaf(q4.x, x[c][e4], s);
              s = fmaf(q4.y, x[c][e4 + 1], s);
              s = fmaf(q4.z, x[c][e4 + 2], s);
              s = fmaf(q4.w, x[c][e4 + 3], s);
            }
          }
        }
        dot[j] = s;
      }
#pragma unroll
      for (int off = TPR / 2; off >= 1; off /= 2)
#pragma unroll
        for (int j = 0; j < GP; ++j)
          if (j < gn) dot[j] += __shfl_xor_sync(0xffffffffu, dot[j], off, TPR);
      if (bias != neg_inf()) {  // (a nan bias takes part) scaled after the dot, as in the reference
                                // (a pre-scaled query row would add its rounding error to every logit)
#pragma unroll
        for (int j = 0; j < GP; ++j)
          if (j < gn) fold(m[j], l[j], u[j], dot[j] * a.scale + bias);
      }
    }

    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < GP; ++j) {
        s_st[rg][j][0] = m[j];
        s_st[rg][j][1] = l[j];
        s_st[rg][j][2] = u[j];
      }
    }
    __syncthreads();
    if (tid < gn) {
      float mm = neg_inf(), ll = 0.0f, uu = 0.0f;
      for (int r = 0; r < NRG; ++r) merge(mm, ll, uu, s_st[r][tid][0], s_st[r][tid][1], s_st[r][tid][2]);
      float* w = s_wp + ((b * a.Hq + h * g + h0 + tid) * S + split) * 3;
      w[0] = mm;
      w[1] = ll;
      w[2] = uu;
    }
  }
}

// Launch 2: per batch item (blockIdx.x) and layer (blockIdx.y), merge the splits; row_entropy:
// write H; step: z, queue, lam, EMA.
template <class T>
__global__ void __launch_bounds__(kKvsThreads)
    kvsmooth_finish_kernel(const KvsmoothArgs a, const KvsmoothLayers ls) {
  using namespace kvs_detail;
  __shared__ float s_sum[kKvsThreads];
  __shared__ float s_lam;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const unsigned layer = blockIdx.y;
  const int64_t S = a.splits;
  const int64_t n = positions(a.pos, a.T);
  const bool valid = a.pos == nullptr || n > 0;

  float hsum = 0.0f;
  for (int64_t hq = tid; hq < a.Hq; hq += kKvsThreads) {
    float m = neg_inf(), l = 0.0f, u = 0.0f;
    const float* w = ls.work[layer] + (b * a.Hq + hq) * S * 3;
    for (int64_t s = 0; s < S; ++s) merge(m, l, u, w[3 * s], w[3 * s + 1], w[3 * s + 2]);
    const float H = !valid || is_poisoned(m, l) ? __int_as_float(0x7fffffff)  // a nan or +inf logit: no softmax
                                                : l > 0.0f ? logf(l) - u / l : 0.0f;
    if (a.entropy != nullptr) a.entropy[b * a.Hq + hq] = H;
    hsum += H;
  }
  if (a.entropy != nullptr) return;  // row_entropy: done (uniform over the block)

  s_sum[tid] = hsum;
  __syncthreads();
#pragma unroll
  for (int w = kKvsThreads / 2; w >= 1; w /= 2) {  // fixed tree: deterministic
    if (tid < w) s_sum[tid] += s_sum[tid + w];
    __syncthreads();
  }
  if (tid == 0) {
    const float z = a.Hq > 0 ? s_sum[0] / static_cast<float>(a.Hq) : 0.0f;
    float* row = ls.queue[layer] + b * a.qu_sb;
    const int64_t M = a.M;
    for (int64_t i = 0; i + 1 < M; ++i) row[i * a.qu_sm] = row[(i + 1) * a.qu_sm];
    row[(M - 1) * a.qu_sm] = z;
    int64_t k = 0;  // the 1-based rank of z (it counts itself)
    for (int64_t i = 0; i < M; ++i) k += row[i * a.qu_sm] <= z ? 1 : 0;  // nan never counts
    float lam = static_cast<float>(k) / static_cast<float>(M);
    lam = fminf(fmaxf(lam, a.lam_lo), a.lam_hi);
    lam = fminf(fmaxf(lam, 0.0f), 1.0f);
    if (z != z) lam = z;  // no rank (fminf / fmaxf would drop the nan)
    if (valid && (n < 2 || !(Mask::at(a.mask, b, 0, 0, n - 2) > neg_inf()))) lam = 0.0f;
    ls.lam[layer][b] = lam;
    s_lam = lam;
  }
  __syncthreads();
  const float lam = s_lam;
  if (lam == 0.0f || !valid) return;
  const int hd = static_cast<int>(a.Hkv * a.D);  // < 2^31 (checked by the launcher)
  const int D = static_cast<int>(a.D);
  for (int e = tid; e < 2 * hd; e += kKvsThreads) {
    const bool is_v = e >= hd;
    const int i = is_v ? e - hd : e, hh = i / D, d = i - hh * D;
    T* base = static_cast<T*>(is_v ? ls.v[layer] : ls.k[layer]) + b * (is_v ? a.v_sb : a.k_sb) +
              hh * (is_v ? a.v_sh : a.k_sh);
    const int64_t st = is_v ? a.v_st : a.k_st;
    T* last = base + (n - 1) * st + d;
    const float prev = Num<T>::to_f(base[(n - 2) * st + d]);
    *last = Num<T>::from_f((1.0f - lam) * Num<T>::to_f(*last) + lam * prev);
  }
}

namespace kvs_detail {

// The checks of one call's arguments (kvsmooth_launch's contract), pointers left to the caller.
inline cudaError_t check_args(const KvsmoothArgs& a) {
  if (a.B < 0 || a.Hq < 0 || a.Hkv < 1 || a.T < 1 || a.D < 0 || a.D > kKvsmoothMaxHeadDim) return cudaErrorInvalidValue;
  if (a.Hq % a.Hkv != 0 || a.splits < 1 || (a.mask.kind != 0 && a.mask.data == nullptr)) return cudaErrorInvalidValue;
  if (a.Hq > 0x3fffffff || 2 * a.Hkv * a.D > 0x7fffffff) return cudaErrorInvalidValue;  // 32-bit head indices
  if ((a.entropy == nullptr) == (a.queue == nullptr)) return cudaErrorInvalidValue;
  if (a.queue != nullptr && (a.M < 1 || a.lam == nullptr || a.v == nullptr)) return cudaErrorInvalidValue;
  if (a.B > 0 && (a.q == nullptr || a.k == nullptr)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// The two launches for n layers (1 <= n <= kKvsMaxLayers) of a's shape: grid (blocks, n).
template <class T, int TPR, int CPL>
cudaError_t launch_shape(const KvsmoothArgs& a, const KvsmoothLayers& ls, int n, cudaStream_t stream) {
  constexpr int64_t vec_elems = 16 / int64_t(sizeof(T));
  bool vec = a.D % vec_elems == 0 && (a.B <= 1 || a.k_sb % vec_elems == 0) &&
             (a.Hkv <= 1 || a.k_sh % vec_elems == 0) && (a.T <= 1 || a.k_st % vec_elems == 0);
  for (int i = 0; i < n; ++i) vec = vec && aligned16(ls.k[i]);
  const int64_t blocks = a.splits * a.Hkv * a.B;
  if (blocks > int64_t(0x7fffffff) || a.B > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  KvsmoothArgs c = a;
  c.rows_per_split = (a.T + a.splits - 1) / a.splits;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(n));
  kvsmooth_partial_kernel<T, TPR, CPL><<<grid, dim3(kKvsThreads), kKvsmoothDynamicSmemBytes, stream>>>(c, ls,
                                                                                                    vec ? 1 : 0);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  kvsmooth_finish_kernel<T><<<dim3(static_cast<unsigned>(a.B), static_cast<unsigned>(n)), dim3(kKvsThreads),
                              kKvsmoothDynamicSmemBytes, stream>>>(c, ls);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_layers(const KvsmoothArgs& a, const KvsmoothLayers& ls, int n, cudaStream_t stream) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int64_t chunks = (a.D + VEC - 1) / VEC;
  if (chunks <= 8) return launch_shape<T, 8, 1>(a, ls, n, stream);
  if (chunks <= 16) return launch_shape<T, 16, 1>(a, ls, n, stream);
  if (chunks <= 32) return launch_shape<T, 32, 1>(a, ls, n, stream);
  if (chunks <= 64) return launch_shape<T, 32, 2>(a, ls, n, stream);
  return launch_shape<T, 32, 4>(a, ls, n, stream);
}

template <class T>
constexpr void check_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "kvsmooth: T must be float, __half or __nv_bfloat16");
}

}  // namespace kvs_detail

// Host entry point: T = float, __half or __nv_bfloat16. Two launches on `stream` (no
// synchronisation). Returns cudaErrorInvalidValue for bad arguments (negative sizes, D too large,
// Hq not a multiple of Hkv, missing pointers, neither or both of entropy / queue), cudaSuccess
// without launching for empty problems, else the launch status.
template <typename T>
cudaError_t kvsmooth_launch(const KvsmoothArgs& a, cudaStream_t stream) {
  kvs_detail::check_type<T>();
  const cudaError_t err = kvs_detail::check_args(a);
  if (err != cudaSuccess) return err;
  if (a.B == 0) return cudaSuccess;
  if (a.work == nullptr) return cudaErrorInvalidValue;
  KvsmoothLayers ls{};
  ls.q[0] = a.q;
  ls.k[0] = a.k;
  ls.v[0] = a.v;
  ls.queue[0] = a.queue;
  ls.lam[0] = a.lam;
  ls.work[0] = a.work;
  return kvs_detail::launch_layers<T>(a, ls, 1, stream);
}

// Whether two layers' steps can share launches: every field but the per-layer pointers (q, k, v,
// queue, lam) and the workspace equal, and both k 16-byte aligned or neither (so that a group's
// loads are as wide as each layer's alone).
inline bool kvsmooth_same_launch(const KvsmoothArgs& x, const KvsmoothArgs& y) {
  const MaskView &m = x.mask, &n = y.mask;
  return x.q_sb == y.q_sb && x.q_sh == y.q_sh && x.k_sb == y.k_sb && x.k_sh == y.k_sh && x.k_st == y.k_st &&
         x.v_sb == y.v_sb && x.v_sh == y.v_sh && x.v_st == y.v_st && m.data == n.data && m.kind == n.kind &&
         m.sb == n.sb && m.sh == n.sh && m.si == n.si && m.st == n.st && x.qu_sb == y.qu_sb &&
         x.qu_sm == y.qu_sm && x.M == y.M && x.pos == y.pos && x.entropy == y.entropy && x.B == y.B &&
         x.Hq == y.Hq && x.Hkv == y.Hkv && x.T == y.T && x.D == y.D && x.splits == y.splits &&
         x.scale == y.scale && x.lam_lo == y.lam_lo && x.lam_hi == y.lam_hi &&
         aligned16(x.k) == aligned16(y.k);
}

// Workspace floats of kvsmooth_steps_launch over n layers.
inline int64_t kvsmooth_steps_workspace_floats(const KvsmoothArgs* layers, int64_t n) {
  int64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += kvsmooth_workspace_floats(layers[i]);
  return sum;
}

// The steps of n >= 1 layers of element type T (each packed as for kvsmooth_launch's step: queue
// set), in the order given, with the results of n kvsmooth_launch calls bit for bit: each run of
// consecutive layers that kvsmooth_same_launch groups (at most kKvsMaxLayers) is one launch pair,
// its layers the grid's y index (the same splits per layer, so the same sums in the same order).
// `work`: kvsmooth_steps_workspace_floats(layers, n) floats (each layer's `work` is ignored).
// Returns cudaErrorInvalidValue, before launching anything, if any layer's arguments are bad.
template <typename T>
cudaError_t kvsmooth_steps_launch(const KvsmoothArgs* layers, int64_t n, float* work, cudaStream_t stream) {
  kvs_detail::check_type<T>();
  if (layers == nullptr || n < 1) return cudaErrorInvalidValue;
  for (int64_t i = 0; i < n; ++i) {
    const cudaError_t err = kvs_detail::check_args(layers[i]);
    if (err != cudaSuccess) return err;
    if (layers[i].queue == nullptr) return cudaErrorInvalidValue;  // steps only
  }
  if (work == nullptr && kvsmooth_steps_workspace_floats(layers, n) > 0) return cudaErrorInvalidValue;
  for (int64_t i0 = 0; i0 < n;) {
    KvsmoothArgs a = layers[i0];
    KvsmoothLayers ls{};
    int m = 0;
    for (; i0 + m < n && m < kKvsMaxLayers && (m == 0 || kvsmooth_same_launch(a, layers[i0 + m])); ++m) {
      const KvsmoothArgs& l = layers[i0 + m];
      ls.q[m] = l.q;
      ls.k[m] = l.k;
      ls.v[m] = l.v;
      ls.queue[m] = l.queue;
      ls.lam[m] = l.lam;
      ls.work[m] = work;
      work += kvsmooth_workspace_floats(l);
    }
    if (a.B > 0) {
      const cudaError_t err = kvs_detail::launch_layers<T>(a, ls, m, stream);
      if (err != cudaSuccess) return err;
    }
    i0 += m;
  }
  return cudaSuccess;
}

// Host-side argument packing (view.h), shared by csrc/cuda/kvsmooth.cu and the emulator's shim:
// q [B, Hq, 1, D], k [B, Hkv, T, D], the mask's view, the logit scale and the position splits
// (kvsmooth_splits). row_entropy then sets `entropy`; a step adds kvsmooth_pack_step. `work` is
// the caller's (kvsmooth_workspace_floats).
inline KvsmoothArgs kvsmooth_pack(const View& q, const View& k, const MaskView& m, float scale, int64_t splits) {
  KvsmoothArgs a{};
  a.q = q.data;
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k = k.data;
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_st = k.stride(2);
  a.mask = m;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.T = k.size(2);
  a.scale = scale;
  a.splits = splits;
  return a;
}

// The step's arguments: v like k, queue float32 [B, M] (in/out), lam float32 [B] (out), lam_ref -/+ band,
// the current token's cache position (one int64 on the device) or nullptr (T - 1).
inline void kvsmooth_pack_step(KvsmoothArgs& a, const View& v, const View& queue, float* lam, float lam_lo,
                               float lam_hi, const int64_t* position) {
  a.v = v.data;
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_st = v.stride(2);
  a.queue = static_cast<float*>(queue.data);
  a.qu_sb = queue.stride(0);
  a.qu_sm = queue.stride(1);
  a.M = queue.size(1);
  a.lam = lam;
  a.lam_lo = lam_lo;
  a.lam_hi = lam_hi;
  a.pos = position;
}

}  // namespace kvfix::kernels
