// DSCR (METHODS §1) as one fused CUDA kernel. Framework-free: CUDA runtime and C++ headers only, so
// the ATen side (csrc/cuda/dscr.cu), the resource report (tools/ptxas_report.py) and the CPU-side
// SIMT emulator (tests/emu/) all compile this same source.
//
// What it computes, for every batch item b, head h and output token j:
//
//   out[j] = sum_i wt[i, j] * x[i] / c_j,   c_j = sum_i wt[i, j],
//   wt[i, j] = exp(-coef_d (d_i - d_j)^2) + exp(-coef_s |s_i - s_j|^2),   wt[j, j] = 0,
//   out[j] = x[j] (bit-exact copy) where c_j == 0 (N == 1, or every weight underflowed),
//
// for x = K and, in the same launch, x = V. coef_d = alpha / (2 sigma_d^2) and
// coef_s = beta / (2 sigma_s^2) come from the host (kvfix::dscr_coefs).
//
// Design (one kernel fuses proximity, diagonal mask, column normalisation and both matmuls):
//   - A block owns one tile of TJ output tokens j of one (b, h), and every head-dim column of both
//     K and V (up to DMAX columns). It walks the source tokens i in tiles of TI rows; for each
//     tile it builds the TI x TJ weight tile in shared memory with accurate expf (the N x N
//     matrix never exists in global memory), adds the fp32 weights to per-thread partial column
//     sums (each thread owns one column j and TI / (NT / TJ) rows of every tile, so the sums need
//     no atomics and are deterministic; SIMT computes them in a pre-pass, below), and multiplies the tile into the K and V accumulators:
//     one weight tile serves both.
//   - The source tiles of K and V are copied to shared memory before the weights are computed:
//     with cp.async on sm_80+ (16-byte chunks, when pointers, strides and D allow it) so that the
//     global-load latency hides behind the expf work without holding registers; element by
//     element otherwise (any alignment).
//   - float16 / bfloat16 with D % 16 == 0: tensor cores through nvcuda::wmma 16x16x16, fp32
//     accumulate. The weight tile is stored in the input type (rounded to nearest) and c_j sums
//     those rounded weights (in fp32), so the normalised weights the tensor cores apply sum to 1. Warp w owns the 16-row j strip (w % (TJ/16)) and
//     two 16-column d strips, interleaved (u * DG + w / (TJ/16) for u < 2, DG = warps / (TJ/16))
//     so that heads narrower than DMAX still spread over the warps. A fragment: W^T (j x i),
//     read col_major straight from the [i][j] weight tile; B fragment: the [i][d] source tile,
//     row_major; one A fragment serves 2 strips x (K, V). At the end the accumulators go through
//     shared memory (aliasing the source tiles), are divided by c_j and converted, and leave in
//     16-byte stores where possible. Nothing depends on the fragments' register layout.
//   - float32 (and float16 / bfloat16 with D % 16 != 0): SIMT, fp32 FMA (no TF32). A pre-pass
//     computes the column sums c_j first, so the weight tiles hold w = wt / c_j (IEEE division)
//     as in the reference, and a column with a single neighbour (N == 2) reproduces x_i exactly;
//     it costs one more evaluation of the weights, small next to the 2 * D FMAs per weight. Each
//     thread holds a 4 x 4 register tile per tensor: rows j = 4 * (t / TD) + r, columns
//     d = 4 * (t % TD) + e (TD = DMAX / 4), so that its shared-memory reads are float4 for fp32
//     and a warp's stores are contiguous. Sums are two-level (each tile's products, then the
//     running total) to keep the fp32 rounding error below the reference's.
//   - Three shapes, picked per launch by D (16-bit SIMT: the middle one only, D chunked to 128);
//     NT = TJ * DMAX / 16 threads (16 outputs per thread and tensor); TI = 32 source rows per
//     tile (16 for fp32 at DMAX = 256):
//         D <= 64 : TJ = 64, DMAX =  64, 256 threads
//         D <= 128: TJ = 64, DMAX = 128, 512 threads
//         D <= 256: TJ = 32, DMAX = 256, 512 threads
//     __launch_bounds__(NT, 512 / NT) caps registers at 128 (16 warps per SM);
//     no kernel spills (docs/RESOURCES.md). All shared memory is static (< 48 KiB);
//     kDscrDynamicSmemBytes = 0. Grid: one block per (j tile, h, b), flattened into blockIdx.x
//     (j fastest, so the blocks that read the same (b, h) sources run together and share them
//     in L2). The weights are recomputed for every head: they depend on b only, but sharing them
//     across heads would need more accumulators per thread than 128 registers hold.
//   - D > 256 (16-bit SIMT path: D > 128): the launcher splits the head dim into near-equal
//     chunks (all but the last a multiple of 16) and launches once per chunk; the weights are
//     recomputed per chunk. (Columns are independent, so this is exact.)
//   - Tails: source rows i >= N are zero in both the weight tile and the source tile (so no
//     garbage times zero); columns d >= D are zero-filled and never stored; output rows j >= N
//     get zero weights and are never stored.
//   - Geometry: depth float32 [Bd, N], coords float32 [Bd, N, 2], contiguous, Bd in {1, B}:
//     item b reads depth + b * geo_sb and coords + 2 * b * geo_sb, geo_sb = 0 (broadcast) or N.
//   - Non-finite geometry: the host reads nothing (no device -> host sync per image), so the
//     kernel decides: every block first scans its item's N depths and N coordinate pairs
//     (__syncthreads_or) and, if one is nan or +-inf, writes nan over its whole output tile
//     (K and V, every head-dim column) and returns. So an item whose geometry is not finite comes
//     out all nan (in place: its span of every layer's cache); the other items are refined as
//     usual (with broadcast geometry, Bd = 1, every item is nan). The CPU op raises instead.
//
// Inputs: [B, H, N, D] with element strides (sb, sh, sn) and a contiguous last dim; outputs
// likewise. Inputs and outputs must not overlap (the ATen side copies first for in-place use).
// K and V share B, H, N, D. Launches on `stream`; returns the launch status (it does not
// synchronise). Plain CUDA C++: shared memory, __syncthreads(_or) and wmma only (no inline PTX, no
// dynamic shared memory, no warp-synchronous tricks), so the SIMT emulator can run it; the one
// intrinsic beyond that, cp.async, is compiled only for nvcc device passes on sm_80+ (see
// KVFIX_DSCR_CP_ASYNC; -DKVFIX_DSCR_NO_ASYNC_COPY turns it off) and has a plain-copy fallback.
#pragma once

// For tools/ptxas_report.py (each launcher instantiates every kernel shape it can launch):
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_refine_launch<float>(const kvfix::kernels::DscrArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_refine_launch<__half>(const kvfix::kernels::DscrArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_refine_launch<__nv_bfloat16>(const kvfix::kernels::DscrArgs&, cudaStream_t);

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "num.h"

// Source tiles are copied with cp.async (cuda_pipeline_primitives.h) when compiling device code
// for sm_80+ with nvcc; everywhere else (host passes, the CPU emulator, older archs, or with
// -DKVFIX_DSCR_NO_ASYNC_COPY) with plain 16-byte loads and stores. Same results either way.
#if defined(__CUDACC__) && !defined(KVFIX_DSCR_NO_ASYNC_COPY)
#include <cuda_pipeline_primitives.h>
#endif
#if defined(__CUDACC__) && !defined(KVFIX_DSCR_NO_ASYNC_COPY) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define KVFIX_DSCR_CP_ASYNC 1
#else
#define KVFIX_DSCR_CP_ASYNC 0
#endif

namespace kvfix::kernels {

// Arguments of one DSCR launch. Element strides (not bytes); the last dim is contiguous.
struct DscrArgs {
  const void* k;      // [B, H, N, D]
  const void* v;      // [B, H, N, D] or nullptr (keys only)
  void* k_out;        // [B, H, N, D]
  void* v_out;        // [B, H, N, D]; nullptr iff v is nullptr
  int64_t B, H, N, D;
  int64_t k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  int64_t ko_sb, ko_sh, ko_sn, vo_sb, vo_sh, vo_sn;
  const float* depth;   // [Bd, N]
  const float* coords;  // [Bd, N, 2]
  int64_t geo_sb;       // 0 (depth/coords broadcast over the batch) or N
  float coef_d, coef_s;
};

// Head-dim columns one launch covers; wider heads are split into chunks by the launcher.
constexpr int kDscrMaxHeadDimPerLaunch = 256;
// Largest N (the kernel indexes tokens, and coordinates 2 * i, with int).
constexpr int64_t kDscrMaxTokens = int64_t(1) << 30;
// The kernels use static shared memory only (read by tools/ptxas_report.py).
constexpr int kDscrDynamicSmemBytes = 0;

namespace dscr_detail {

// exp(x) with the cut-off every backend shares (kvfix/reference.py DSCR_EXP_CUTOFF): below -87,
// where float32 leaves its normal range, a proximity term counts as 0, so the CPU, the GPU and
// the float64 reference agree on when a column sum is 0 and a token keeps its own key.
__host__ __device__ __forceinline__ float dscr_exp(float x) { return x < -87.0f ? 0.0f : expf(x); }

// A 4-element group of T as one aligned word (16 bytes for float, 8 for 16-bit types).
template <int BYTES>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};

template <class T, int TJ_, int DMAX_, bool WMMA_>
struct Cfg {
  static constexpr int TJ = TJ_;      // output tokens per block
  static constexpr int DMAX = DMAX_;  // head-dim columns per block
  static constexpr bool WMMA = WMMA_;
  // threads per block: a 4 x 4 register tile per thread and tensor (SIMT), two 16 x 16
  // accumulator tiles per warp and tensor (WMMA); 16 outputs per thread and tensor either way
  static constexpr int NT = TJ * DMAX / 16;
  static constexpr int US = 2;  // WMMA: 16-column d strips per warp
  static constexpr int TI = (sizeof(T) == 4 && DMAX == 256) ? 16 : 32;  // source rows per tile
  static constexpr int VEC = 16 / int(sizeof(T));                    // elements per 16 bytes
  static constexpr int XP = DMAX + VEC;           // source tile pitch (elements; 16 B of padding)
  static constexpr int WP = WMMA ? TJ + 8 : TJ;   // weight tile pitch (elements)
  static constexpr int OP = DMAX + 4;             // fp32 output staging pitch (WMMA only)
  using WT = std::conditional_t<WMMA, T, float>;  // weight tile element type
  static constexpr int X_BYTES = 2 * TI * XP * int(sizeof(T));  // K and V source tiles
  static constexpr int O_BYTES = WMMA ? TJ * OP * 4 : 0;        // staging (aliases the sources)
  static constexpr int U_BYTES = X_BYTES > O_BYTES ? X_BYTES : O_BYTES;
  static constexpr int CPR = DMAX / VEC;    // 16-byte chunks per source row
  static constexpr int NCH = TI * CPR / NT;  // chunks per thread per tensor and tile
  static constexpr int RG = NT / TJ;         // row groups of the weight tile
  static constexpr int RPT = TI / RG;        // weight rows per thread and tile
  static constexpr int TD = DMAX / 4;        // SIMT: threads along d

  static_assert(NT % 32 == 0 && NT <= 1024, "block size");
  static_assert(TI * CPR % NT == 0, "source chunks must split evenly over the threads");
  static_assert(NT % TJ == 0 && TI % RG == 0, "weight rows must split evenly over the threads");
  static_assert(WMMA || (NT / TD) * 4 == TJ, "SIMT register tile is 4 rows");
  static_assert(!WMMA || (TJ % 16 == 0 && DMAX % 64 == 0 && TI % 16 == 0), "wmma tiling");
  static_assert(!WMMA || (NT / 32) * US * 16 == (TJ / 16) * DMAX, "wmma: US d strips per warp");
  static_assert(U_BYTES + TI * WP * int(sizeof(WT)) + (NT + TJ) * 4 <= 48 * 1024,
                "static shared memory must stay under 48 KiB");
};

template <bool WMMA>
struct Acc;
template <>
struct Acc<true> {  // US = 2 16x16 fp32 tiles per warp and tensor
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> k[2], v[2];
};
template <>
struct Acc<false> {  // a 4 x 4 register tile per thread and tensor, and this tile's part of it
  float k[4][4], v[4][4], pk[4][4], pv[4][4];
};

// Four consecutive elements of a shared-memory row as floats (p 4-element aligned).
template <class T>
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    out[0] = q.x;
    out[1] = q.y;
    out[2] = q.z;
    out[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = Num<T>::to_f(p[e]);
  }
}

// Copy source rows [0, TI) of a tile (src: its first row) into shared memory element by element
// (any alignment); rows >= rows and columns >= D become zero.
template <class C, class T>
__device__ __forceinline__ void load_tile_scalar(T* __restrict__ s_x, const T* __restrict__ src, int64_t sn,
                                                 int rows, int D, int tid) {
  const T zero = Num<T>::from_f(0.0f);
  for (int e = tid; e < C::TI * C::DMAX; e += C::NT) {
    const int r = e / C::DMAX, col = e % C::DMAX;
    s_x[r * C::XP + col] = (r < rows && col < D) ? src[r * sn + col] : zero;
  }
}

// The same in 16-byte chunks (src, sn and D multiples of 16 bytes): cp.async on sm_80+ (no
// registers held; completes at copy_tile_wait), plain 16-byte loads and stores elsewhere.
template <class C, class T>
__device__ __forceinline__ void copy_tile_vec(T* __restrict__ s_x, const T* __restrict__ src, int64_t sn,
                                              int rows, int D, int tid) {
#pragma unroll
  for (int q = 0; q < C::NCH; ++q) {
    const int idx = tid + q * C::NT;
    const int r = idx / C::CPR, col = (idx % C::CPR) * C::VEC;
    uint4* const dst = reinterpret_cast<uint4*>(s_x + r * C::XP + col);
    if (r < rows && col < D) {
#if KVFIX_DSCR_CP_ASYNC
      __pipeline_memcpy_async(dst, src + r * sn + col, 16);
#else
      *dst = *reinterpret_cast<const uint4*>(src + r * sn + col);
#endif
    } else {
      *dst = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Wait for this thread's copy_tile_vec copies (a __syncthreads must follow before others read).
__device__ __forceinline__ void copy_tile_wait() {
#if KVFIX_DSCR_CP_ASYNC
  __pipeline_commit();
  __pipeline_wait_prior(0);
#endif
}

// WMMA path: write the block's output rows [0, rows) (out, src: row j0) from the fp32 staging
// tile s_o.
template <class C, class T>
__device__ __forceinline__ void write_staged(const float* __restrict__ s_o, const float* __restrict__ s_col,
                                             T* __restrict__ out, int64_t osn, const T* __restrict__ src,
                                             int64_t sn, int rows, int D, bool vec_out, int tid) {
  constexpr int VEC = C::VEC, CPR = C::CPR;
  for (int e = tid; e < C::TJ * CPR; e += C::NT) {
    const int r = e / CPR, col = (e % CPR) * VEC;
    if (r >= rows || col >= D) continue;
    const float c = s_col[r];
    T* orow = out + r * osn;
    if (!(c > 0.0f)) {  // no weight reaches token j: keep it as it is
      const T* xrow = src + r * sn;
      for (int q = 0; q < VEC && col + q < D; ++q) orow[col + q] = xrow[col + q];
      continue;
    }
    const float* srow = s_o + r * C::OP + col;
    if (vec_out) {
      __align__(16) T vals[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) vals[q] = Num<T>::from_f(srow[q] / c);
      *reinterpret_cast<uint4*>(orow + col) = *reinterpret_cast<const uint4*>(vals);
    } else {
      for (int q = 0; q < VEC && col + q < D; ++q) orow[col + q] = Num<T>::from_f(srow[q] / c);
    }
  }
}

// nan or +-inf (exponent all ones).
__device__ __forceinline__ int not_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }

// Non-finite geometry: nan over the block's output rows [0, rows) x [0, D) (out: row j0).
template <class C, class T>
__device__ __forceinline__ void write_nan(T* __restrict__ out, int64_t osn, int rows, int D, int tid) {
  const T nan = Num<T>::from_f(__int_as_float(0x7fc00000));
  for (int e = tid; e < rows * D; e += C::NT) out[(e / D) * osn + e % D] = nan;
}

// SIMT path: write a thread's 4 x 4 register tile of one output (out, src: row j0); the weights
// were normalised before the products, so the tile is the result.
template <class C, class T>
__device__ __forceinline__ void write_regs(const float (&acc)[4][4], const float* __restrict__ s_col,
                                           T* __restrict__ out, int64_t osn, const T* __restrict__ src,
                                           int64_t sn, int rows, int D, bool vec_out, int tid) {
  using W4 = typename Word<4 * sizeof(T)>::type;
  const int td = tid % C::TD, tj = tid / C::TD;
  const int col = td * 4;
  if (col >= D) return;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int jl = tj * 4 + r;
    if (jl >= rows) continue;
    T* orow = out + jl * osn;
    if (!(s_col[jl] > 0.0f)) {  // no weight reaches token j: keep it as it is
      const T* xrow = src + jl * sn;
      for (int e = 0; e < 4 && col + e < D; ++e) orow[col + e] = xrow[col + e];
    } else if (vec_out) {  // D % VEC == 0, so all four are in range
      __align__(16) T vals[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) vals[e] = Num<T>::from_f(acc[r][e]);
      *reinterpret_cast<W4*>(orow + col) = *reinterpret_cast<const W4*>(vals);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (col + e < D) orow[col + e] = Num<T>::from_f(acc[r][e]);
    }
  }
}

}  // namespace dscr_detail

// The fused kernel. One block per (j tile, h, b); blockIdx.x = (b * H + h) * n_jtiles + jt.
// flags: bit 0 = 16-byte source loads allowed, bit 1 = 16-byte output stores allowed.
// __launch_bounds__: NT threads and 512 / NT blocks per SM, i.e. at most 128 registers.
template <class T, int TJ, int DMAX, bool WMMA>
__global__ void __launch_bounds__(dscr_detail::Cfg<T, TJ, DMAX, WMMA>::NT, 512 / dscr_detail::Cfg<T, TJ, DMAX, WMMA>::NT)
    dscr_refine_kernel(const DscrArgs a, const int n_jtiles, const int flags) {
  using namespace dscr_detail;
  using C = Cfg<T, TJ, DMAX, WMMA>;
  using WT = typename C::WT;
  constexpr int NT = C::NT, TI = C::TI, WP = C::WP, XP = C::XP, RG = C::RG, RPT = C::RPT;

  __shared__ __align__(128) unsigned char s_u[C::U_BYTES];  // K, V source tiles | output staging
  __shared__ __align__(128) WT s_w[TI * WP];                 // weight tile [i][j]
  __shared__ float s_part[NT];                               // partial column sums
  __shared__ float s_col[TJ];                                // c_j
  T* const s_xk = reinterpret_cast<T*>(s_u);
  T* const s_xv = s_xk + TI * XP;

  const int tid = threadIdx.x;
  const int N = static_cast<int>(a.N);  // the launcher guarantees N, H, D and the grid fit in int
  const int D = static_cast<int>(a.D);
  const bool has_v = a.v != nullptr;
  const bool vec_in = (flags & 1) != 0, vec_out = (flags & 2) != 0;

  const int jt = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_jtiles));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(n_jtiles));
  const int h = bh % static_cast<int>(a.H), b = bh / static_cast<int>(a.H);
  const int j0 = jt * TJ;

  const T* const kin = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* const vin = has_v ? static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh : nullptr;
  const float* const dep = a.depth + b * a.geo_sb;
  const float* const crd = a.coords + 2 * (b * a.geo_sb);

  // Non-finite geometry (issue 18: the host reads nothing): every block scans its item's depth and
  // coords (3N floats, from L2 after the item's first block) and, if any is nan or +-inf, writes
  // nan over its output tile of K and V instead of refining. Every block of the item (each head,
  // token tile and head-dim chunk) does the same, so the item's whole output is nan; the other
  // items are unaffected. The condition is block-uniform: the early return skips no barrier.
  int geo_bad = 0;
  for (int i = tid; i < N; i += NT)
    geo_bad |= not_finite(dep[i]) | not_finite(crd[2 * i]) | not_finite(crd[2 * i + 1]);
  if (__syncthreads_or(geo_bad)) {
    const int rows = N - j0 < TJ ? N - j0 : TJ;
    write_nan<C>(static_cast<T*>(a.k_out) + b * a.ko_sb + h * a.ko_sh + j0 * a.ko_sn, a.ko_sn, rows, D, tid);
    if (has_v)
      write_nan<C>(static_cast<T*>(a.v_out) + b * a.vo_sb + h * a.vo_sh + j0 * a.vo_sn, a.vo_sn, rows, D, tid);
    return;
  }

  // Weight role: column gj of every tile, rows grow + RG * q.
  const int gj = tid % TJ, grow = tid / TJ;
  const int j_own = j0 + gj;
  const bool j_ok = j_own < N;
  float dj = 0.0f, yj = 0.0f, xj = 0.0f;
  if (j_ok) {
    dj = dep[j_own];
    yj = crd[2 * j_own];
    xj = crd[2 * j_own + 1];
  }
  const float cd = a.coef_d, cs = a.coef_s;
  // wt[i, j_own] for i != j_own, accurate expf (not __expf). The explicit fmaf leaves the
  // compiler nothing to contract, so every evaluation of a weight (SIMT: pre-pass and main pass)
  // gives the same bits.
  const auto weight = [&](int i) -> float {
    const float dd = dep[i] - dj;
    const float dy = crd[2 * i] - yj, dx = crd[2 * i + 1] - xj;
    return dscr_exp(-(cd * (dd * dd))) + dscr_exp(-(cs * fmaf(dy, dy, dx * dx)));
  };
  float csum = 0.0f;  // this thread's part of c_j
  float c_own = 0.0f;  // SIMT: c_j of the owned column, known before the products

  // fp16 tensor cores multiply normalised weights: unnormalised ones (exp of the proximity
  // exponent) flush to zero below fp16's smallest subnormal (6e-8, exponents under ~-17), which
  // would turn an averaged token into a kept one. bf16 has float32's exponent range.
  constexpr bool kPrePass = !WMMA || std::is_same<T, __half>::value;
  if constexpr (kPrePass) {
    // Pre-pass: the column sums first, so that the products use w = wt / c_j as the
    // reference does (one neighbour, e.g. N == 2, then returns x_i exactly in fp32). It costs a
    // second evaluation of the weights, small next to the 2 * D FMAs each weight feeds.
    if (j_ok)
      for (int i = grow; i < N; i += RG)
        if (i != j_own) csum += weight(i);
    s_part[tid] = csum;
    __syncthreads();
    if (tid < TJ) {
      float c = 0.0f;
#pragma unroll
      for (int g = 0; g < RG; ++g) c += s_part[g * TJ + tid];
      s_col[tid] = c;
    }
    __syncthreads();
    c_own = s_col[gj];
    csum = 0.0f;  // WMMA (fp16) sums the rounded normalised weights again below
  }

  Acc<WMMA> acc;
  if constexpr (WMMA) {
#pragma unroll
    for (int u = 0; u < C::US; ++u) {
      nvcuda::wmma::fill_fragment(acc.k[u], 0.0f);
      nvcuda::wmma::fill_fragment(acc.v[u], 0.0f);
    }
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc.k[r][c] = acc.v[r][c] = 0.0f;
  }

  for (int i0 = 0; i0 < N; i0 += TI) {
    const int rows = N - i0 < TI ? N - i0 : TI;
    const T* const ksrc = kin + i0 * a.k_sn;
    const T* const vsrc = has_v ? vin + i0 * a.v_sn : nullptr;
    __syncthreads();  // the previous tile's readers are done with s_w, s_xk, s_xv

    if (vec_in) {  // asynchronous where possible: the copies overlap the weights below
      copy_tile_vec<C>(s_xk, ksrc, a.k_sn, rows, D, tid);
      if (has_v) copy_tile_vec<C>(s_xv, vsrc, a.v_sn, rows, D, tid);
    } else {
      load_tile_scalar<C>(s_xk, ksrc, a.k_sn, rows, D, tid);
      if (has_v) load_tile_scalar<C>(s_xv, vsrc, a.v_sn, rows, D, tid);
    }

#pragma unroll
    for (int q = 0; q < RPT; ++q) {
      const int il = grow + RG * q;
      const int i = i0 + il;
      const float w = (j_ok && il < rows && i != j_own) ? weight(i) : 0.0f;
      if constexpr (WMMA) {
        // c_j sums the weights the tensor cores multiply: normalised weights then sum to 1 up to
        // fp32 rounding, so a constant head column (or a single neighbour) comes back exactly.
        // (fp16: already divided by the pre-pass c_j, then renormalised by the rounded sum.)
        const T wr = Num<T>::from_f(kPrePass ? (c_own > 0.0f ? w / c_own : 0.0f) : w);
        csum += Num<T>::to_f(wr);
        s_w[il * WP + gj] = wr;
      } else {
        s_w[il * WP + gj] = c_own > 0.0f ? w / c_own : 0.0f;  // IEEE division, as the reference
      }
    }

    if (vec_in) copy_tile_wait();
    __syncthreads();  // tiles complete

    if constexpr (WMMA) {
      using namespace nvcuda;
      constexpr int JS = TJ / 16, DG = (NT / 32) / JS;
      const int warp = tid / 32, js = warp % JS, dg = warp / JS;
      const int nds = D / 16;
#pragma unroll
      for (int kk = 0; kk < TI / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, s_w + kk * 16 * WP + js * 16, WP);
#pragma unroll
        for (int u = 0; u < C::US; ++u) {
          const int ds = u * DG + dg;
          if (ds < nds) {  // warp-uniform
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, s_xk + kk * 16 * XP + ds * 16, XP);
            wmma::mma_sync(acc.k[u], fa, fb, acc.k[u]);
            if (has_v) {
              wmma::load_matrix_sync(fb, s_xv + kk * 16 * XP + ds * 16, XP);
              wmma::mma_sync(acc.v[u], fa, fb, acc.v[u]);
            }
          }
        }
      }
    } else {
      // Two-level sums (this tile's products, then the running total): the fp32 rounding error
      // grows with TI + N / TI terms instead of N.
      const int td = tid % C::TD, tj = tid / C::TD;
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc.pk[r][c] = acc.pv[r][c] = 0.0f;
#pragma unroll 4
      for (int il = 0; il < TI; ++il) {
        const float4 w4 = *reinterpret_cast<const float4*>(s_w + il * WP + tj * 4);
        const float w[4] = {w4.x, w4.y, w4.z, w4.w};
        float x[4];
        load4(s_xk + il * XP + td * 4, x);
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc.pk[r][c] = fmaf(w[r], x[c], acc.pk[r][c]);
        if (has_v) {
          load4(s_xv + il * XP + td * 4, x);
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc.pv[r][c] = fmaf(w[r], x[c], acc.pv[r][c]);
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc.k[r][c] += acc.pk[r][c];
          acc.v[r][c] += acc.pv[r][c];
        }
    }
  }

  // WMMA: column sums c_j = sum over the RG row groups (fixed order: deterministic).
  if constexpr (WMMA) {
    s_part[tid] = csum;
    __syncthreads();  // every warp is past its last tile; partial sums visible
    if (tid < TJ) {
      float c = 0.0f;
#pragma unroll
      for (int g = 0; g < RG; ++g) c += s_part[g * TJ + tid];
      s_col[tid] = c;
    }
  }

  const int jrows = N - j0 < TJ ? N - j0 : TJ;
  const T* const kj = kin + j0 * a.k_sn;
  T* const kout = static_cast<T*>(a.k_out) + b * a.ko_sb + h * a.ko_sh + j0 * a.ko_sn;

  if constexpr (WMMA) {
    using namespace nvcuda;
    float* const s_o = reinterpret_cast<float*>(s_u);  // aliases the source tiles (no longer read)
    constexpr int JS = TJ / 16, DG = (NT / 32) / JS;
    const int warp = tid / 32, js = warp % JS, dg = warp / JS;
    const int nds = D / 16;
#pragma unroll
    for (int u = 0; u < C::US; ++u) {
      const int ds = u * DG + dg;
      if (ds < nds) wmma::store_matrix_sync(s_o + js * 16 * C::OP + ds * 16, acc.k[u], C::OP, wmma::mem_row_major);
    }
    __syncthreads();  // staging and s_col visible
    write_staged<C>(s_o, s_col, kout, a.ko_sn, kj, a.k_sn, jrows, D, vec_out, tid);
    if (has_v) {
      __syncthreads();  // K's rows have left the staging tile
#pragma unroll
      for (int u = 0; u < C::US; ++u) {
        const int ds = u * DG + dg;
        if (ds < nds) wmma::store_matrix_sync(s_o + js * 16 * C::OP + ds * 16, acc.v[u], C::OP, wmma::mem_row_major);
      }
      __syncthreads();
      T* const vout = static_cast<T*>(a.v_out) + b * a.vo_sb + h * a.vo_sh + j0 * a.vo_sn;
      write_staged<C>(s_o, s_col, vout, a.vo_sn, vin + j0 * a.v_sn, a.v_sn, jrows, D, vec_out, tid);
    }
  } else {  // s_col is unchanged since the pre-pass
    write_regs<C>(acc.k, s_col, kout, a.ko_sn, kj, a.k_sn, jrows, D, vec_out, tid);
    if (has_v) {
      T* const vout = static_cast<T*>(a.v_out) + b * a.vo_sb + h * a.vo_sh + j0 * a.vo_sn;
      write_regs<C>(acc.v, s_col, vout, a.vo_sn, vin + j0 * a.v_sn, a.v_sn, jrows, D, vec_out, tid);
    }
  }
}

namespace dscr_detail {

// 16-byte accesses are safe for a [B, H, N, D] operand when its base is 16-byte aligned and
// every stride that is used (dims of size > 1) and D are multiples of 16 bytes.
inline bool vec_ok(const void* p, int64_t sb, int64_t sh, int64_t sn, const DscrArgs& a, int64_t vec) {
  return aligned16(p) && a.D % vec == 0 && (a.B <= 1 || sb % vec == 0) && (a.H <= 1 || sh % vec == 0) &&
         (a.N <= 1 || sn % vec == 0);
}

template <class T, int TJ, int DMAX, bool WMMA>
cudaError_t launch_shape(const DscrArgs& a, cudaStream_t stream) {
  constexpr int NT = Cfg<T, TJ, DMAX, WMMA>::NT;
  constexpr int64_t vec = 16 / int64_t(sizeof(T));
  const int64_t n_jtiles = (a.N + TJ - 1) / TJ;
  const int64_t blocks = n_jtiles * a.H * a.B;
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;  // grid.x and int math
  bool vin = vec_ok(a.k, a.k_sb, a.k_sh, a.k_sn, a, vec);
  bool vout = vec_ok(a.k_out, a.ko_sb, a.ko_sh, a.ko_sn, a, vec);
  if (a.v != nullptr) {
    vin = vin && vec_ok(a.v, a.v_sb, a.v_sh, a.v_sn, a, vec);
    vout = vout && vec_ok(a.v_out, a.vo_sb, a.vo_sh, a.vo_sn, a, vec);
  }
  const int flags = (vin ? 1 : 0) | (vout ? 2 : 0);
  void (*kernel)(const DscrArgs, const int, const int) = dscr_refine_kernel<T, TJ, DMAX, WMMA>;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(NT), kDscrDynamicSmemBytes, stream>>>(
      a, static_cast<int>(n_jtiles), flags);
  return cudaGetLastError();
}

// One launch covering a chunk of D <= 256 columns (<= 128 on the 16-bit SIMT path).
template <class T>
cudaError_t launch_chunk(const DscrArgs& a, bool simt16, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.D <= 64) return launch_shape<T, 64, 64, false>(a, stream);
    if (a.D <= 128) return launch_shape<T, 64, 128, false>(a, stream);
    return launch_shape<T, 32, 256, false>(a, stream);
  } else {
    // 16-bit inputs with D % 16 != 0 (rare): one SIMT shape, the launcher chunks D to <= 128.
    if (simt16) return launch_shape<T, 64, 128, false>(a, stream);
    if (a.D <= 64) return launch_shape<T, 64, 64, true>(a, stream);
    if (a.D <= 128) return launch_shape<T, 64, 128, true>(a, stream);
    return launch_shape<T, 32, 256, true>(a, stream);
  }
}

}  // namespace dscr_detail

// Host entry point: T = float, __half or __nv_bfloat16. Returns cudaErrorInvalidValue for bad
// arguments (negative sizes, null pointers, geo_sb not in {0, N}, v and v_out not both given),
// cudaSuccess without launching for empty problems, else the launch status.
template <typename T>
cudaError_t dscr_refine_launch(const DscrArgs& a, cudaStream_t stream) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "dscr_refine_launch: T must be float, __half or __nv_bfloat16");
  if (a.B < 0 || a.H < 0 || a.N < 0 || a.D < 0) return cudaErrorInvalidValue;
  if (a.B == 0 || a.H == 0 || a.N == 0 || a.D == 0) return cudaSuccess;
  if (a.k == nullptr || a.k_out == nullptr || a.depth == nullptr || a.coords == nullptr) return cudaErrorInvalidValue;
  if ((a.v == nullptr) != (a.v_out == nullptr)) return cudaErrorInvalidValue;
  if (a.geo_sb != 0 && a.geo_sb != a.N) return cudaErrorInvalidValue;
  if (a.N > kDscrMaxTokens || a.H > 0x7fffffff) return cudaErrorInvalidValue;
  // The path is chosen once for the whole head (every chunk takes the same one): tensor cores for
  // 16-bit inputs with D % 16 == 0, SIMT otherwise.
  const bool simt16 = !std::is_same_v<T, float> && a.D % 16 != 0;
  // Head-dim chunks of at most 256 (16-bit SIMT: 128) columns, all but the last a multiple of 16
  // (keeps 16-byte alignment).
  const int64_t max_cols = simt16 ? 128 : kDscrMaxHeadDimPerLaunch;
  const int64_t n_chunks = (a.D + max_cols - 1) / max_cols;
  const int64_t per = ((a.D + n_chunks - 1) / n_chunks + 15) / 16 * 16;
  for (int64_t d0 = 0; d0 < a.D; d0 += per) {
    DscrArgs c = a;
    c.D = a.D - d0 < per ? a.D - d0 : per;
    c.k = static_cast<const T*>(a.k) + d0;
    c.k_out = static_cast<T*>(a.k_out) + d0;
    if (a.v != nullptr) {
      c.v = static_cast<const T*>(a.v) + d0;
      c.v_out = static_cast<T*>(a.v_out) + d0;
    }
    const cudaError_t err = dscr_detail::launch_chunk<T>(c, simt16, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Host-side argument packing (view.h), shared by csrc/cuda/dscr.cu and the emulator's shim:
// k [B, H, N, D], v like k or absent (keys only), their outputs, depth float32 [Bd, N] and coords
// float32 [Bd, N, 2] (contiguous, Bd in {1, B}), the proximity coefficients.
inline DscrArgs dscr_pack(const View& k, const View& v, const View& k_out, const View& v_out, const View& depth,
                          const View& coords, float coef_d, float coef_s) {
  DscrArgs a{};
  a.B = k.size(0);
  a.H = k.size(1);
  a.N = k.size(2);
  a.D = k.size(3);
  a.k = k.data;
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_sn = k.stride(2);
  a.k_out = k_out.data;
  a.ko_sb = k_out.stride(0);
  a.ko_sh = k_out.stride(1);
  a.ko_sn = k_out.stride(2);
  if (v.present()) {
    a.v = v.data;
    a.v_sb = v.stride(0);
    a.v_sh = v.stride(1);
    a.v_sn = v.stride(2);
    a.v_out = v_out.data;
    a.vo_sb = v_out.stride(0);
    a.vo_sh = v_out.stride(1);
    a.vo_sn = v_out.stride(2);
  }
  a.depth = static_cast<const float*>(depth.data);
  a.coords = static_cast<const float*>(coords.data);
  a.geo_sb = depth.size(0) == 1 ? 0 : a.N;
  a.coef_d = coef_d;
  a.coef_s = coef_s;
  return a;
}

}  // namespace kvfix::kernels
