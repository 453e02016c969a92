// Small CUDA kernels that test the kvemu emulator itself (tests/emu/test_emulator.py).
// Ordinary CUDA source: it compiles unchanged with nvcc, and through the emulator's rewrite.
// Some kernels are deliberately broken (marked BROKEN): the tests prove the emulator catches them.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>

namespace kvemu_selftest {

constexpr unsigned kFull = 0xffffffffu;

// ---- block reduction: shared memory tree + warp shuffles + one float atomic per block
template <int NT>
__global__ void block_sum(const float* __restrict__ x, int n, float* __restrict__ partial, float* __restrict__ total) {
  __shared__ float s[NT];
  const int tid = threadIdx.x;
  float v = 0.0f;
  for (int i = blockIdx.x * NT + tid; i < n; i += NT * gridDim.x) v += x[i];
  s[tid] = v;
  __syncthreads();
  for (int k = NT / 2; k >= 32; k >>= 1) {
    if (tid < k) s[tid] += s[tid + k];
    __syncthreads();
  }
  if (tid < 32) {
    v = s[tid];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
    if (tid == 0) {
      partial[blockIdx.x] = v;
      atomicAdd(total, v);
    }
  }
}

inline cudaError_t launch_block_sum(const float* x, int n, float* partial, float* total, int blocks) {
  block_sum<128><<<blocks, 128>>>(x, n, partial, total);
  return cudaGetLastError();
}

// BROKEN: the barrier inside the tree is missing.
template <int NT>
__global__ void block_sum_no_barrier(const float* __restrict__ x, int n, float* __restrict__ partial) {
  __shared__ float s[NT];
  const int tid = threadIdx.x;
  float v = 0.0f;
  for (int i = blockIdx.x * NT + tid; i < n; i += NT * gridDim.x) v += x[i];
  s[tid] = v;
  __syncthreads();
  for (int k = NT / 2; k > 0; k >>= 1) {
    if (tid < k) s[tid] += s[tid + k];
    // missing __syncthreads()
  }
  if (tid == 0) partial[blockIdx.x] = s[0];
}

inline cudaError_t launch_block_sum_no_barrier(const float* x, int n, float* partial, int blocks) {
  block_sum_no_barrier<128><<<blocks, 128>>>(x, n, partial);
  return cudaGetLastError();
}

// Thread 0 publishes a value through shared memory: correct with the barrier; BROKEN without
// it. In thread order thread 0 happens to run first, so only a random order exposes the bug.
template <bool kBarrier>
__global__ void broadcast(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float s_val;
  if (threadIdx.x == 0) s_val = x[blockIdx.x];
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s_val * static_cast<float>(threadIdx.x);
}

inline cudaError_t launch_broadcast(const float* x, float* out, int blocks, int threads, bool barrier) {
  if (barrier) {
    broadcast<true><<<blocks, threads>>>(x, out);
  } else {
    broadcast<false><<<blocks, threads>>>(x, out);
  }
  return cudaGetLastError();
}

// ---- shuffles: out[t] = shuffle(in[t]) of the given kind, argument and width
template <class T>
__global__ void shuffle(const T* __restrict__ in, T* __restrict__ out, int kind, int arg, int width) {
  const int t = threadIdx.x;
  const T v = in[t];
  T r;
  switch (kind) {
    case 0: r = __shfl_sync(kFull, v, arg, width); break;
    case 1: r = __shfl_up_sync(kFull, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_down_sync(kFull, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_xor_sync(kFull, v, arg, width); break;
  }
  out[t] = r;
}

template <class T>
inline cudaError_t launch_shuffle(const T* in, T* out, int threads, int kind, int arg, int width) {
  shuffle<<<1, threads>>>(in, out, kind, arg, width);  // T deduced from the arguments
  return cudaGetLastError();
}

// ---- votes: out[6 t + (0..5)] = ballot, any, all, match_any, reduce_add, match_all (or 0)
// over the lane's mask (the full warp, or its half)
__global__ void vote(const int* __restrict__ pred, unsigned* __restrict__ out, int half_masks) {
  const int t = threadIdx.x, lane = t % 32;
  unsigned mask = kFull;
  if (half_masks) mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const int p = pred[t];
  out[6 * t + 0] = __ballot_sync(mask, p);
  out[6 * t + 1] = static_cast<unsigned>(__any_sync(mask, p));
  out[6 * t + 2] = static_cast<unsigned>(__all_sync(mask, p));
  out[6 * t + 3] = __match_any_sync(mask, p);
  out[6 * t + 4] = __reduce_add_sync(mask, static_cast<unsigned>(p));
  int all_equal = 0;
  const unsigned m = __match_all_sync(mask, p, &all_equal);
  out[6 * t + 5] = all_equal ? m : 0u;
  __syncwarp(mask);
}

inline cudaError_t launch_vote(const int* pred, unsigned* out, int threads, int half_masks) {
  vote<<<1, threads>>>(pred, out, half_masks);
  return cudaGetLastError();
}

// ---- atomics on float, int, unsigned long long; counts via __syncthreads_count
__global__ void atomics(const float* __restrict__ x, const int* __restrict__ keys, int n, float* fsum, int* isum,
                        int* imax, int* imin, unsigned long long* usum, int* cas_count, int* sync_count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool in = i < n;
  if (in) {
    atomicAdd(fsum, x[i]);
    atomicAdd(isum, keys[i]);
    atomicMax(imax, keys[i]);
    atomicMin(imin, keys[i]);
    atomicAdd(usum, static_cast<unsigned long long>(keys[i]) + 1ull);
    int old = *cas_count, assumed;  // an increment through compare-and-swap
    do {
      assumed = old;
      old = atomicCAS(cas_count, assumed, assumed + 1);
    } while (old != assumed);
  }
  const int c = __syncthreads_count(in && keys[i] % 2 == 0);
  if (threadIdx.x == 0) atomicAdd(sync_count, c);
}

inline cudaError_t launch_atomics(const float* x, const int* keys, int n, float* fsum, int* isum, int* imax,
                                  int* imin, unsigned long long* usum, int* cas_count, int* sync_count) {
  atomics<<<(n + 63) / 64, 64>>>(x, keys, n, fsum, isum, imax, imin, usum, cas_count, sync_count);
  return cudaGetLastError();
}

// ---- wmma: C[M, N] = A[M, K] B[K, N] (+ C0), one warp per 16 x 16 tile of C.
// a_col / b_col: layouts of A and B in memory; c_col: layout of C0 and C.
template <class T>
__global__ void wmma_gemm(const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ C0,
                          float* __restrict__ C, int M, int N, int K, int a_col, int b_col, int c_col) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int tiles_n = N / 16;
  const int tile = blockIdx.x * (blockDim.x / 32) + warp;
  if (tile >= (M / 16) * tiles_n) return;  // warp-uniform
  const int tm = tile / tiles_n, tn = tile % tiles_n;
  const int lda = a_col ? M : K, ldb = b_col ? K : N, ldc = c_col ? M : N;
  const wmma::layout_t cl = c_col ? wmma::mem_col_major : wmma::mem_row_major;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  if (C0 != nullptr) {
    const float* c0 = c_col ? C0 + tn * 16 * ldc + tm * 16 : C0 + tm * 16 * ldc + tn * 16;
    wmma::load_matrix_sync(acc, c0, ldc, cl);
  } else {
    wmma::fill_fragment(acc, 0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += 16) {
    const T* a = a_col ? A + k0 * lda + tm * 16 : A + tm * 16 * lda + k0;
    const T* b = b_col ? B + tn * 16 * ldb + k0 : B + k0 * ldb + tn * 16;
    if (a_col) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, a, lda);
      if (b_col) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    } else {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a, lda);
      if (b_col) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
  }
  for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= 2.0f;  // element-wise ops on fragments
  float* c = c_col ? C + tn * 16 * ldc + tm * 16 : C + tm * 16 * ldc + tn * 16;
  wmma::store_matrix_sync(c, acc, ldc, cl);
}

template <class T>
inline cudaError_t launch_wmma_gemm(const T* A, const T* B, const float* C0, float* C, int M, int N, int K,
                                    int a_col, int b_col, int c_col) {
  const int tiles = (M / 16) * (N / 16);
  wmma_gemm<T><<<(tiles + 3) / 4, 128>>>(A, B, C0, C, M, N, K, a_col, b_col, c_col);
  return cudaGetLastError();
}

// ---- dynamic shared memory: each block reverses its chunk of x (blockDim.x elements) through
// `extern __shared__`; `pad` extra floats of dynamic shared memory are requested (and unused).
__global__ void reverse_chunks(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ float buf[];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - t);
  if (j < n) y[j] = buf[t];
}

inline cudaError_t launch_reverse_chunks(const float* x, float* y, int n, int threads, int pad, int opt_in) {
  const size_t smem = (threads + pad) * sizeof(float);
  if (opt_in) {
    const cudaError_t e = cudaFuncSetAttribute(reverse_chunks, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  reverse_chunks<<<(n + threads - 1) / threads, threads, smem, 0>>>(x, y, n);
  return cudaGetLastError();
}

// ---- built-in variables in 3-D: out[linear thread] = packed (block, thread) coordinates
__global__ void coords3d(int* __restrict__ out) {
  const int bl = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int tl = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  out[bl * nt + tl] = ((blockIdx.x * 4 + blockIdx.y) * 4 + blockIdx.z) * 1000 +
                      (threadIdx.x * 8 + threadIdx.y) * 8 + threadIdx.z;
}

inline cudaError_t launch_coords3d(int* out, dim3 grid, dim3 block) {
  coords3d<<<grid, block>>>(out);
  return cudaGetLastError();
}

// ---- block order: order[linear block] = the block's ticket (0 for the first block to run);
// BROKEN on purpose: every block writes *last (a race: the block that runs last wins).
__global__ void block_order(int* next, int* __restrict__ order, int* last) {
  const int bl = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) {
    order[bl] = atomicAdd(next, 1);
    *last = bl;
  }
}

inline cudaError_t launch_block_order(int* next, int* order, int* last, dim3 grid, unsigned threads) {
  block_order<<<grid, threads>>>(next, order, last);
  return cudaGetLastError();
}

// ---- math intrinsics: out[8 i + k]
__global__ void math(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i];
  out[8 * i + 0] = expf(-v * v) + __expf(-fabsf(v));
  out[8 * i + 1] = exp2f(v) * rsqrtf(fabsf(v) + 1.0f);
  out[8 * i + 2] = fmaxf(v, 0.25f) + fminf(v, -0.25f);
  out[8 * i + 3] = __half2float(__float2half(v));
  out[8 * i + 4] = __bfloat162float(__float2bfloat16(v));
  out[8 * i + 5] = __half2float(hexp(__float2half(v * 0.5f)));
  out[8 * i + 6] = __bfloat162float(__hfma(__float2bfloat16(v), __float2bfloat16(v), __float2bfloat16(1.0f)));
  out[8 * i + 7] = __fdividef(v, 3.0f) + static_cast<float>(max(i, 3) + min(i, 3));
}

inline cudaError_t launch_math(const float* x, float* out, int n) {
  math<<<(n + 31) / 32, 32>>>(x, out, n);
  return cudaGetLastError();
}

// ---- failures the emulator must report
// A lane skips the shuffle and waits at the barrier: the shuffle can never complete.
__global__ void shfl_deadlock(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x != 5) v = __shfl_xor_sync(kFull, v, 1);  // BROKEN: lane 5 never arrives
  __syncthreads();
  out[threadIdx.x] = v;
}

// Thread 0 returns early; the others wait at a barrier it never reaches.
__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 0) return;  // BROKEN
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lanes of one warp reach different collectives.
__global__ void divergent_collectives(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(kFull, v, 1);  // BROKEN: odd lanes are at the ballot
  } else {
    v = static_cast<int>(__ballot_sync(kFull, v > 3));
  }
  out[threadIdx.x] = v;
}

// No bounds check: threads past n store out of bounds.
__global__ void oob_store(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  (void)n;                              // BROKEN: `if (i < n)` is missing
  out[i] = static_cast<float>(i);  // kvemu-selftest: oob store
}

// wmma on a pointer that is not 32-byte aligned.
__global__ void wmma_misaligned(const __half* a, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 8, 16);  // BROKEN: 16-byte offset
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, static_cast<float>(fa.x[0]));
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// Off-by-one into a static shared array.
__global__ void shared_oob(float* out) {
  __shared__ float s[32];
  s[threadIdx.x + 1] = 1.0f;  // kvemu-selftest: shared oob store
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Dynamic shared memory one float too small for the block.
__global__ void dynamic_shared_oob(float* out) {
  extern __shared__ float d[];
  d[threadIdx.x] = 2.0f;  // kvemu-selftest: dynamic shared oob store
  __syncthreads();
  out[threadIdx.x] = d[0];
}

inline cudaError_t launch_failure(int which, int* iout, float* fout, const __half* hin, int n, int threads) {
  switch (which) {
    case 0: shfl_deadlock<<<1, threads>>>(iout); break;
    case 1: barrier_after_exit<<<1, threads>>>(iout); break;
    case 2: divergent_collectives<<<1, threads>>>(iout); break;
    case 3: oob_store<<<(n + threads - 1) / threads, threads>>>(fout, n); break;
    case 4: wmma_misaligned<<<1, 32>>>(hin, fout); break;
    case 5: shared_oob<<<1, 32>>>(fout); break;
    default: dynamic_shared_oob<<<1, 32, 31 * sizeof(float)>>>(fout); break;
  }
  return cudaGetLastError();
}

// Launch configurations that CUDA rejects.
__global__ void noop() {}
inline cudaError_t launch_noop(unsigned gx, unsigned bx, size_t smem) {
  noop<<<dim3(gx), dim3(bx), smem>>>();
  return cudaGetLastError();
}

}  // namespace kvemu_selftest
