// Structured DSCR (kvfix/dscr_structured.py) on CUDA: the two token-long passes of the low-rank
// refinement. Framework-free (CUDA runtime and C++ headers only), so the ATen side
// (csrc/cuda/dscr_lowrank.cu), tools/ptxas_report.py and the SIMT emulator (tests/emu/) compile
// this same source.
//
// For one tensor x ([B, H, N, D], N = gh * gw tokens of a row-major grid, element strides
// sb, sh, sn, contiguous last dim) the refinement is
//     y = Lc Z3[a] + U P - 2 x,   out = y * cinv (cinv == 0: out = x, bit-exact)
// with Z3 = Lr Rr^T Z1 and P = sum_a P_a, where
//     Z1[b, h, a, p, d] = sum_w Rc[w, p] x[b, h, a * gw + w, d]          (reduce along the grid row)
//     P_a[b, h, a, n, d] = sum_w U[b, a * gw + w, n] x[b, h, a * gw + w, d]  (depth factor, per row)
// Pass 1 (dscr_lowrank_reduce_kernel) computes Z1 and P_a, pass 2 (dscr_lowrank_expand_kernel)
// computes and writes the output; the small steps between them (gh x pr x pc per column, and the
// sum of P_a over rows) are library GEMMs / reductions on the ATen side.
//
// Pass 1: one block per (grid row a, chunk of kDscrLowrankChunk factor columns, b * H + h).
// The factor columns are the concatenation [Rc | U] (pc + rd of them); the block stages the
// chunk's coefficients of its row ([gw, chunk] floats) in shared memory and each thread owns
// head-dim columns d (stride blockDim.x), keeping the chunk's kDscrLowrankChunk sums in
// registers while it walks the gw tokens of the row (coalesced along d). Rows are done in
// segments of kDscrLowrankRowSeg tokens so that static shared memory stays small.
// Pass 2: one block per (grid row a, b * H + h); each thread owns columns d: for every token of
// the row it accumulates -2 x + sum_p Lc[w, p] Z3[a, p, d] + sum_n U[i, n] P[n, d] (the
// coefficients are the same for all threads of the block: broadcast loads) and writes once.
// Intermediates and sums are float32; input / output in T (float, __half, __nv_bfloat16).
// Deterministic: no atomics, fixed summation order.
#pragma once

// For tools/ptxas_report.py:
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_lowrank_launch<float>(const kvfix::kernels::DscrLowrankArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_lowrank_launch<__half>(const kvfix::kernels::DscrLowrankArgs&, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_lowrank_launch<__nv_bfloat16>(const kvfix::kernels::DscrLowrankArgs&, cudaStream_t);

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "num.h"

namespace kvfix::kernels {

// One pass of one tensor. stage 1: reduce (x -> z1, pa); stage 2: expand (x, z3, pd -> out).
struct DscrLowrankArgs {
  int stage;
  const void* x;         // [B, H, N, D], strides x_sb, x_sh, x_sn
  void* out;             // [B, H, N, D], strides o_sb, o_sh, o_sn (stage 2); may equal x
  int64_t B, H, gh, gw, D;
  int64_t x_sb, x_sh, x_sn, o_sb, o_sh, o_sn;
  const float* rc;       // [gw, pc]  (stage 1)
  const float* lc;       // [gw, pc]  (stage 2)
  const float* u;        // [Bd, N, rd]
  const float* cinv;     // [Bd, N]   (stage 2)
  int64_t pc, rd;
  int64_t u_sb;          // 0 (depth broadcast over the batch) or N * rd; cinv uses u_sb / rd
  float* z1;             // [B, H, gh, pc, D] contiguous (stage 1 output)
  float* pa;             // [B, H, gh, rd, D] contiguous (stage 1 output)
  const float* z3;       // [B, H, gh, pc, D] contiguous (stage 2 input)
  const float* pd;       // [B, H, rd, D]     contiguous (stage 2 input)
};

constexpr int kDscrLowrankChunk = 16;     // factor columns per pass-1 block (register sums)
constexpr int kDscrLowrankRowSeg = 64;    // tokens of a row staged at a time (pass 1)
constexpr int kDscrLowrankThreads = 128;  // threads per block (columns d, strided)
// Static shared memory only (tools/ptxas_report.py).
constexpr int kDscrLowrankDynamicSmemBytes = 0;

template <class T>
__global__ void __launch_bounds__(kDscrLowrankThreads) dscr_lowrank_reduce_kernel(DscrLowrankArgs a) {
  __shared__ float coef[kDscrLowrankRowSeg][kDscrLowrankChunk];
  const int64_t row = blockIdx.x, f0 = int64_t(blockIdx.y) * kDscrLowrankChunk, bh = blockIdx.z;
  const int64_t b = bh / a.H, h = bh % a.H;
  const int64_t nf = a.pc + a.rd;
  const float* u = a.u + b * a.u_sb;
  const T* x = static_cast<const T*>(a.x) + b * a.x_sb + h * a.x_sh + row * a.gw * a.x_sn;
  for (int64_t d0 = 0; d0 < a.D; d0 += blockDim.x) {
    const int64_t d = d0 + threadIdx.x;
    float acc[kDscrLowrankChunk];
#pragma unroll
    for (int j = 0; j < kDscrLowrankChunk; ++j) acc[j] = 0.0f;
    for (int64_t w0 = 0; w0 < a.gw; w0 += kDscrLowrankRowSeg) {
      const int64_t nw = a.gw - w0 < kDscrLowrankRowSeg ? a.gw - w0 : kDscrLowrankRowSeg;
      __syncthreads();  // the previous segment's coefficients are no longer read
      for (int64_t e = threadIdx.x; e < nw * kDscrLowrankChunk; e += blockDim.x) {
        const int64_t w = w0 + e / kDscrLowrankChunk, f = f0 + e % kDscrLowrankChunk;
        float c = 0.0f;
        if (f < a.pc) {
          c = a.rc[w * a.pc + f];
        } else if (f < nf) {
          c = u[(row * a.gw + w) * a.rd + (f - a.pc)];
        }
        coef[e / kDscrLowrankChunk][e % kDscrLowrankChunk] = c;
      }
      __syncthreads();
      if (d < a.D) {
        for (int64_t w = 0; w < nw; ++w) {
          const float xv = Num<T>::to_f(x[(w0 + w) * a.x_sn + d]);
#pragma unroll
          for (int j = 0; j < kDscrLowrankChunk; ++j) acc[j] += coef[w][j] * xv;
        }
      }
    }
    if (d < a.D) {
#pragma unroll
      for (int j = 0; j < kDscrLowrankChunk; ++j) {
        const int64_t f = f0 + j;
        if (f < a.pc) {
          a.z1[((bh * a.gh + row) * a.pc + f) * a.D + d] = acc[j];
        } else if (f < nf) {
          a.pa[((bh * a.gh + row) * a.rd + (f - a.pc)) * a.D + d] = acc[j];
        }
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kDscrLowrankThreads) dscr_lowrank_expand_kernel(DscrLowrankArgs a) {
  const int64_t row = blockIdx.x, bh = blockIdx.y;
  const int64_t b = bh / a.H, h = bh % a.H;
  const int gw = static_cast<int>(a.gw), pc = static_cast<int>(a.pc), rd = static_cast<int>(a.rd);
  const int64_t D = a.D, i0 = row * a.gw;
  const float* u = a.u + b * a.u_sb + i0 * rd;
  const float* cinv = a.cinv + (a.u_sb == 0 ? 0 : b * (a.u_sb / rd)) + i0;
  const T* x = static_cast<const T*>(a.x) + b * a.x_sb + h * a.x_sh + i0 * a.x_sn;
  T* out = static_cast<T*>(a.out) + b * a.o_sb + h * a.o_sh + i0 * a.o_sn;
  const float* z3 = a.z3 + (bh * a.gh + row) * pc * D;
  const float* pd = a.pd + bh * rd * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    for (int w = 0; w < gw; ++w) {
      const float xv = Num<T>::to_f(x[w * a.x_sn + d]);
      float acc = -2.0f * xv;
      const float* lcw = a.lc + w * pc;
#pragma unroll 4
      for (int p = 0; p < pc; ++p) acc += lcw[p] * z3[p * D + d];
      const float* uw = u + w * rd;
#pragma unroll 4
      for (int n = 0; n < rd; ++n) acc += uw[n] * pd[n * D + d];
      const float ci = cinv[w];
      // Every thread reads its own x[i, d] before writing out[i, d]: in place is safe.
      out[w * a.o_sn + d] = ci > 0.0f ? Num<T>::from_f(acc * ci) : x[w * a.x_sn + d];
    }
  }
}

// Launches stage a.stage on `stream` (no synchronisation); returns the launch status.
template <class T>
cudaError_t dscr_lowrank_launch(const DscrLowrankArgs& a, cudaStream_t stream) {
  if (a.B * a.H == 0 || a.gh * a.gw == 0 || a.D == 0) return cudaSuccess;
  if (a.B * a.H > 65535 || a.gh > 2147483647) return cudaErrorInvalidConfiguration;
  if (a.stage == 1) {
    const int64_t chunks = (a.pc + a.rd + kDscrLowrankChunk - 1) / kDscrLowrankChunk;
    if (chunks > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(a.gh), static_cast<unsigned>(chunks), static_cast<unsigned>(a.B * a.H));
    dscr_lowrank_reduce_kernel<T><<<grid, dim3(kDscrLowrankThreads), kDscrLowrankDynamicSmemBytes, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(a.gh), static_cast<unsigned>(a.B * a.H));
    dscr_lowrank_expand_kernel<T><<<grid, dim3(kDscrLowrankThreads), kDscrLowrankDynamicSmemBytes, stream>>>(a);
  }
  return cudaGetLastError();
}

// Host-side argument packing (view.h), shared by csrc/cuda/dscr_lowrank.cu and the emulator's
// shim: x [B, H, N, D], out like x (stage 2; may be x) or absent, the grid height, the column
// factors rc, lc float32 [gw, pc], the depth factors u float32 [Bd, N, rd] and cinv [Bd, N]. The
// stage and the float32 workspaces (z1, pa, z3, pd) are the caller's.
inline DscrLowrankArgs dscr_lowrank_pack(const View& x, const View& out, int64_t gh, const View& rc, const View& lc,
                                         const View& u, const View& cinv) {
  DscrLowrankArgs a{};
  a.x = x.data;
  a.B = x.size(0);
  a.H = x.size(1);
  a.D = x.size(3);
  a.x_sb = x.stride(0);
  a.x_sh = x.stride(1);
  a.x_sn = x.stride(2);
  if (out.present()) {
    a.out = out.data;
    a.o_sb = out.stride(0);
    a.o_sh = out.stride(1);
    a.o_sn = out.stride(2);
  }
  a.gh = gh;
  a.gw = rc.size(0);
  a.pc = rc.size(1);
  a.rc = static_cast<const float*>(rc.data);
  a.lc = static_cast<const float*>(lc.data);
  a.u = static_cast<const float*>(u.data);
  a.rd = u.size(2);
  a.u_sb = u.size(0) == 1 ? 0 : u.size(1) * a.rd;
  a.cinv = static_cast<const float*>(cinv.data);
  return a;
}

}  // namespace kvfix::kernels
