// Banded structured DSCR on CUDA (kvfix/dscr_structured.py, variant "banded"; the CPU kernel is
// csrc/cpu/dscr_banded.cpp, whose header comment defines the structure). Framework-free (CUDA
// runtime and C++ headers only), so the ATen side (csrc/cuda/dscr_banded.cu),
// tools/ptxas_report.py and the SIMT emulator (tests/emu/) compile this same source.
//
// Per batch item the weights are  wt~ = S (x) S + A^T T A  (diagonal included, exactly 2):
//   S: the spatial axis kernel s_|k| cut to |k| <= K (band = s_0..s_K), on both grid axes;
//   A: token i touches the cnt consecutive depth nodes from tok[i], weights tokw[i, 0..cnt);
//   T: node row g holds tvals[row_ptr[g], row_ptr[g + 1]) on the nodes from row_lo[g].
// out_i = (S(x)S X + A^T T A X - 2 x_i) * cinv_i, or x_i where cinv_i == 0.
//
// Two kernels, all on one stream, no host synchronisation:
//
// dscr_banded_prep_kernel (once per call, one warp per batch item of the structure): checks that
// the item's indices are in range (node_off increasing from 0 to G, 1 <= cnt <= C, every token's
// cnt nodes and every node row inside the item's nodes, row_ptr increasing within tvals) and
// writes valid[bd]; for a valid item it orders the tokens by their first node (a stable counting
// sort: integer-atomic counts, a warp scan, then __match_any_sync ranks), giving perm and start
// (start[g] = the first position in perm whose token's first node is >= g). The main kernel reads
// only indices this kernel checked, so any structure is memory-safe; an item that fails the check
// gets NaN outputs (the CPU op raises instead: it reads the structure on the host, which CUDA
// would pay for with a host synchronisation).
//
// dscr_banded_kernel (one launch per group of up to kDscrBandedMaxTensors tensors of one dtype:
// the keys and values of every layer of a cache call): a work item is one head of one batch item
// of one tensor and a chunk of kDscrBandedCols = 16 head-dim columns; a block of 256 threads takes
// items (blockIdx.x, then + gridDim.x). Thread t owns column t % 16 and walks every 16th node or
// token from t / 16. Scratch per block, float32: Z [N, 16] (row pass), M [G, 16] and Y [G, 16]
// (G: all items' nodes, row_lo.numel()), in dynamic shared memory when it fits
// kDscrBandedDynamicSmemBytes (and the caller's limit), else in a global workspace (then the grid
// is capped so that the workspace stays at most kDscrBandedWorkspaceBytes and blocks loop over
// items). Phases of an item:
//   A: M[g] = sum over the tokens whose cnt nodes include g (perm[start[g - cnt + 1], start[g + 1]))
//      of tokw[i, g - tok[i]] x_i; and Z[i] = sum_{|k| <= K} s_|k| x[row of i, column of i + k].
//      cnt > 1: node by node. cnt = 1 ("values" mode, where a surface can put most tokens on one
//      node): a segmented sum over perm, each walker group taking N / 16 consecutive positions;
//      a node's sum inside a chunk goes straight to M, the chunk's first and last partial sums to
//      two shared slots per group;
//   -- __syncthreads --
//   (cnt = 1) the first 16 threads add the slots in chunk order into M (a node's parts are
//      consecutive there): a fixed order for a given N;
//   -- __syncthreads --
//   B: Y[g] = sum_e tvals[row_ptr[g] + e] M[row_lo[g] + e];
//   -- __syncthreads --
//   C: out_i = (sum_{|k| <= K} s_|k| Z[i + k gw] + sum_c tokw[i, c] Y[tok[i] + c] - 2 x_i) cinv_i,
//      written once in T;
//   -- __syncthreads -- (the next item overwrites the scratch).
// Phase C writes token i only after phase A has read every token, and reads only the scratch and
// x_i (in the thread that writes it): in place is safe. Sums in float32, in a fixed order (no
// float atomics): deterministic.
#pragma once

// For tools/ptxas_report.py:
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_banded_launch<float>(const kvfix::kernels::DscrBandedArgs&, int64_t, int64_t, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_banded_launch<__half>(const kvfix::kernels::DscrBandedArgs&, int64_t, int64_t, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_banded_launch<__nv_bfloat16>(const kvfix::kernels::DscrBandedArgs&, int64_t, int64_t, cudaStream_t);
// @ptxas-instantiate: template cudaError_t kvfix::kernels::dscr_banded_prep_launch<int32_t>(const kvfix::kernels::DscrBandedPrepArgs&, cudaStream_t);

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "num.h"

namespace kvfix::kernels {

// The structure (the op's arguments), shared by every tensor of a call.
struct DscrBandedStructure {
  const int32_t* tok;       // [Bd, N] first node of each token (item-local)
  const float* tokw;        // [Bd, N, C] node weights (the first cnt[bd] used)
  const int32_t* cnt;       // [Bd]
  const int64_t* row_ptr;   // [G + 1] offsets into tvals
  const int32_t* row_lo;    // [G] first column node of each row (item-local)
  const float* tvals;       // [nnz]
  const int64_t* node_off;  // [Bd + 1] the items' node ranges
  const float* cinv;        // [Bd, N]
  const float* band;        // [K + 1] s_0..s_K
  int64_t Bd, N, C, G, nnz, K, gh, gw;
};

// One tensor of a launch: x [B, H, N, D] (strides x_s*, contiguous last dim), out like x (may be x).
struct DscrBandedTensor {
  const void* x;
  void* out;
  int64_t x_sb, x_sh, x_sn, o_sb, o_sh, o_sn;
  int64_t H, D;
  int64_t item0;  // the launch's first work item of this tensor
};

constexpr int kDscrBandedMaxTensors = 16;   // tensors per launch (kernel parameters stay < 4 KiB)
constexpr int kDscrBandedCols = 16;         // head-dim columns per work item
constexpr int kDscrBandedThreads = 256;
constexpr int kDscrBandedGroups = kDscrBandedThreads / kDscrBandedCols;  // token / node walkers
constexpr int kDscrBandedPrepThreads = 32;  // one warp per batch item
// The most dynamic shared memory the launcher requests (scratch that needs more goes to global
// memory); read by tools/ptxas_report.py.
constexpr int kDscrBandedDynamicSmemBytes = 98304;  // 96 KiB
constexpr int64_t kDscrBandedWorkspaceBytes = int64_t(128) << 20;  // global scratch cap

struct DscrBandedPrepArgs {
  DscrBandedStructure s;
  int32_t* perm;    // [Bd, N]
  int32_t* start;   // [G + Bd]: item bd's start[0..Gi] at start + node_off[bd] + bd
  int32_t* cursor;  // [G]
  int32_t* valid;   // [Bd]
};

struct DscrBandedArgs {
  DscrBandedStructure s;
  int64_t items;  // work items of this launch
  int ntensors;
  DscrBandedTensor t[kDscrBandedMaxTensors];
  const int32_t* perm;
  const int32_t* start;
  const int32_t* valid;
  float* scratch;          // global scratch, scratch_stride floats per block; nullptr: shared memory
  int64_t scratch_stride;
};

template <class I>
__global__ void __launch_bounds__(kDscrBandedPrepThreads) dscr_banded_prep_kernel(DscrBandedPrepArgs a) {
  const DscrBandedStructure& s = a.s;
  const int lane = static_cast<int>(threadIdx.x);
  const unsigned full = 0xffffffffu;
  const int64_t bd = blockIdx.x, N = s.N;
  bool ok = true;
  for (int64_t e = lane; e <= s.Bd; e += kDscrBandedPrepThreads) {  // node_off: 0 = off[0] <= ... <= off[Bd] = G
    const int64_t o = s.node_off[e];
    ok = ok && (e == 0 ? o == 0 : o >= s.node_off[e - 1]) && (e < s.Bd || o == s.G);
  }
  const int64_t g0 = s.node_off[bd];
  const int64_t c = s.cnt[bd];
  ok = __all_sync(full, ok) && c >= 1 && c <= s.C;
  const int64_t Gi = ok ? s.node_off[bd + 1] - g0 : 0;
  for (int64_t n = lane; ok && n < Gi; n += kDscrBandedPrepThreads) {
    const int64_t p0 = s.row_ptr[g0 + n], p1 = s.row_ptr[g0 + n + 1], lo = s.row_lo[g0 + n];
    ok = p0 >= 0 && p1 >= p0 && p1 <= s.nnz && lo >= 0 && lo + (p1 - p0) <= Gi;
  }
  const I* tok = s.tok + bd * N;
  for (int64_t i = lane; ok && i < N; i += kDscrBandedPrepThreads) ok = tok[i] >= 0 && tok[i] + c <= Gi;
  ok = __all_sync(full, ok);
  if (lane == 0) a.valid[bd] = ok ? 1 : 0;
  if (!ok) return;
  int32_t* st = a.start + g0 + bd;
  int32_t* cur = a.cursor + g0;
  int32_t* perm = a.perm + bd * N;
  for (int64_t n = lane; n <= Gi; n += kDscrBandedPrepThreads) st[n] = 0;
  __syncwarp();
  for (int64_t i = lane; i < N; i += kDscrBandedPrepThreads) atomicAdd(&st[tok[i] + 1], 1);  // counts
  __syncwarp();
  int32_t carry = 0;  // inclusive scan of st[0..Gi]: st[g] = #{i: tok[i] < g}
  for (int64_t n0 = 0; n0 <= Gi; n0 += kDscrBandedPrepThreads) {
    const int64_t n = n0 + lane;
    int32_t v = n <= Gi ? st[n] : 0;
    for (int o = 1; o < kDscrBandedPrepThreads; o <<= 1) {
      const int32_t u = __shfl_up_sync(full, v, o);
      if (lane >= o) v += u;
    }
    v += carry;
    if (n <= Gi) st[n] = v;
    carry = __shfl_sync(full, v, kDscrBandedPrepThreads - 1);
  }
  __syncwarp();
  for (int64_t n = lane; n < Gi; n += kDscrBandedPrepThreads) cur[n] = st[n];
  __syncwarp();
  // stable placement, 32 tokens at a time: a token's rank among the earlier lanes with its node
  for (int64_t i0 = 0; i0 < N; i0 += kDscrBandedPrepThreads) {
    const int64_t i = i0 + lane;
    const bool act = i < N;
    const int32_t key = act ? tok[i] : -1;
    const unsigned peers = __match_any_sync(full, key);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int32_t pos = act ? cur[key] + rank : 0;
    __syncwarp();  // every lane has read its cursor before the group's first lane moves it
    if (act) {
      perm[pos] = static_cast<int32_t>(i);
      if (rank == 0) cur[key] += __popc(peers);
    }
    __syncwarp();
  }
}

template <class T>
__global__ void __launch_bounds__(kDscrBandedThreads) dscr_banded_kernel(const DscrBandedArgs a) {
  extern __shared__ float dscr_banded_smem[];
  __shared__ int32_t slot_node[2 * kDscrBandedGroups];  // per group: its chunk's first and last node sums
  __shared__ float slot_val[2 * kDscrBandedGroups][kDscrBandedCols];
  const DscrBandedStructure& s = a.s;
  const int lane = static_cast<int>(threadIdx.x) % kDscrBandedCols;
  const int grp = static_cast<int>(threadIdx.x) / kDscrBandedCols;
  const int64_t N = s.N, gh = s.gh, gw = s.gw, K = s.K, C = s.C;
  float* const zs = a.scratch != nullptr ? a.scratch + int64_t(blockIdx.x) * a.scratch_stride : dscr_banded_smem;
  float* const ms = zs + N * kDscrBandedCols;
  float* const ys = ms + s.G * kDscrBandedCols;
  for (int64_t item = blockIdx.x; item < a.items; item += gridDim.x) {
    // this item's tensor (constant indices: the table stays in parameter space)
    const void* xp = a.t[0].x;
    void* op = a.t[0].out;
    int64_t x_sb = a.t[0].x_sb, x_sh = a.t[0].x_sh, x_sn = a.t[0].x_sn;
    int64_t o_sb = a.t[0].o_sb, o_sh = a.t[0].o_sh, o_sn = a.t[0].o_sn;
    int64_t H = a.t[0].H, D = a.t[0].D, item0 = a.t[0].item0;
#pragma unroll
    for (int p = 1; p < kDscrBandedMaxTensors; ++p) {
      if (p < a.ntensors && item >= a.t[p].item0) {
        xp = a.t[p].x;
        op = a.t[p].out;
        x_sb = a.t[p].x_sb;
        x_sh = a.t[p].x_sh;
        x_sn = a.t[p].x_sn;
        o_sb = a.t[p].o_sb;
        o_sh = a.t[p].o_sh;
        o_sn = a.t[p].o_sn;
        H = a.t[p].H;
        D = a.t[p].D;
        item0 = a.t[p].item0;
      }
    }
    const int64_t chunks = (D + kDscrBandedCols - 1) / kDscrBandedCols;
    const int64_t local = item - item0, chunk = local % chunks, bh = local / chunks;
    const int64_t b = bh / H, h = bh % H, bd = s.Bd == 1 ? 0 : b;
    const int64_t d = chunk * kDscrBandedCols + lane;
    const bool col = d < D;
    const T* x = static_cast<const T*>(xp) + b * x_sb + h * x_sh + (col ? d : 0);
    T* out = static_cast<T*>(op) + b * o_sb + h * o_sh + (col ? d : 0);
    if (a.valid[bd] == 0) {  // a structure that failed the prep kernel's check: NaN, nothing read
      const T nan = Num<T>::from_f(__int_as_float(0x7fc00000));
      for (int64_t i = grp; col && i < N; i += kDscrBandedGroups) out[i * o_sn] = nan;
    } else {
      const int64_t g0 = s.node_off[bd], Gi = s.node_off[bd + 1] - g0, cnt = s.cnt[bd];
      const int32_t* st = a.start + g0 + bd;
      const int32_t* perm = a.perm + bd * N;
      const int32_t* tok = s.tok + bd * N;
      const float* tokw = s.tokw + bd * N * C;
      const int64_t* rp = s.row_ptr + g0;
      const int32_t* lo = s.row_lo + g0;
      const float* band = s.band;
      // A: M = A X, Z = the row pass of S over X
      if (cnt == 1) {  // segmented sums over perm: group grp takes positions [c0, c1)
        const int64_t L = (N + kDscrBandedGroups - 1) / kDscrBandedGroups, c0 = grp * L;
        const int64_t c1 = c0 + L < N ? c0 + L : N;
        if (lane == 0) slot_node[2 * grp] = slot_node[2 * grp + 1] = -1;
        int32_t node = -1;
        bool head = true;
        float acc = 0.0f;
        for (int64_t q = c0; q <= c1; ++q) {
          const int64_t i = q < c1 ? perm[q] : 0;
          const int32_t n = q < c1 ? tok[i] : -1;
          if (n != node && node >= 0) {  // a segment ends: the chunk's first and last go to slots
            const int slot = head ? 2 * grp : (q == c1 ? 2 * grp + 1 : -1);
            if (slot < 0) {
              ms[int64_t(node) * kDscrBandedCols + lane] = acc;
            } else {
              slot_val[slot][lane] = acc;
              if (lane == 0) slot_node[slot] = node;
            }
            head = false;
            acc = 0.0f;
          }
          node = n;
          if (q < c1 && col) acc += tokw[i * C] * Num<T>::to_f(x[i * x_sn]);
        }
        for (int64_t n = grp; n < Gi; n += kDscrBandedGroups) {  // nodes without tokens
          if (st[n] == st[n + 1]) ms[n * kDscrBandedCols + lane] = 0.0f;
        }
      } else {  // node by node over the tokens whose cnt nodes include n
        for (int64_t n = grp; n < Gi; n += kDscrBandedGroups) {
          float acc = 0.0f;
          if (col) {
            for (int64_t q = st[n - cnt + 1 > 0 ? n - cnt + 1 : 0], e = st[n + 1]; q < e; ++q) {
              const int64_t i = perm[q];
              acc += tokw[i * C + (n - tok[i])] * Num<T>::to_f(x[i * x_sn]);
            }
          }
          ms[n * kDscrBandedCols + lane] = acc;
        }
      }
      for (int64_t i = grp; i < N; i += kDscrBandedGroups) {
        float acc = 0.0f;
        if (col) {
          const int64_t w = i % gw;
          const T* xr = x + (i - w) * x_sn;
          acc = band[0] * Num<T>::to_f(xr[w * x_sn]);
          for (int64_t k = 1; k <= K; ++k) {
            if (w - k >= 0) acc += band[k] * Num<T>::to_f(xr[(w - k) * x_sn]);
            if (w + k < gw) acc += band[k] * Num<T>::to_f(xr[(w + k) * x_sn]);
          }
        }
        zs[i * kDscrBandedCols + lane] = acc;
      }
      __syncthreads();
      if (cnt == 1 && grp == 0) {  // the slots in chunk order: a node's parts are consecutive
        int32_t node = -1;
        float acc = 0.0f;
        for (int e = 0; e < 2 * kDscrBandedGroups; ++e) {
          const int32_t n = slot_node[e];
          if (n < 0) continue;
          if (n != node) {
            if (node >= 0) ms[int64_t(node) * kDscrBandedCols + lane] = acc;
            node = n;
            acc = 0.0f;
          }
          acc += slot_val[e][lane];
        }
        if (node >= 0) ms[int64_t(node) * kDscrBandedCols + lane] = acc;
      }
      __syncthreads();  // M complete
      // B: Y = T M
      for (int64_t n = grp; n < Gi; n += kDscrBandedGroups) {
        const float* t = s.tvals + rp[n];
        const float* mp = ms + int64_t(lo[n]) * kDscrBandedCols + lane;
        const int64_t len = rp[n + 1] - rp[n];
        float acc = 0.0f;
        for (int64_t e = 0; e < len; ++e) acc += t[e] * mp[e * kDscrBandedCols];
        ys[n * kDscrBandedCols + lane] = acc;
      }
      __syncthreads();
      // C: the column pass of S over Z, A^T Y, the diagonal and the normalisation
      const float* cinv = s.cinv + bd * N;
      for (int64_t i = grp; i < N; i += kDscrBandedGroups) {
        const int64_t r = i / gw;
        const float* zp = zs + i * kDscrBandedCols + lane;
        float acc = band[0] * zp[0];
        for (int64_t k = 1; k <= K; ++k) {
          if (r - k >= 0) acc += band[k] * zp[-k * gw * kDscrBandedCols];
          if (r + k < gh) acc += band[k] * zp[k * gw * kDscrBandedCols];
        }
        const float* yp = ys + int64_t(tok[i]) * kDscrBandedCols + lane;
        const float* wv = tokw + i * C;
        for (int64_t c = 0; c < cnt; ++c) acc += wv[c] * yp[c * kDscrBandedCols];
        if (col) {
          const T xv = x[i * x_sn];
          const float ci = cinv[i];
          out[i * o_sn] = ci != 0.0f ? Num<T>::from_f((acc - 2.0f * Num<T>::to_f(xv)) * ci) : xv;
        }
      }
    }
    __syncthreads();  // the next item overwrites the scratch
  }
}

// Scratch floats per block (Z, M, Y).
inline int64_t dscr_banded_block_floats(const DscrBandedStructure& s) { return (s.N + 2 * s.G) * kDscrBandedCols; }

// Whether the scratch goes to dynamic shared memory (smem_limit: the device's per-block opt-in
// limit, or less).
inline bool dscr_banded_in_smem(const DscrBandedStructure& s, int64_t smem_limit) {
  const int64_t bytes = dscr_banded_block_floats(s) * int64_t(sizeof(float));
  return bytes <= kDscrBandedDynamicSmemBytes && bytes <= smem_limit;
}

// Blocks of a launch with global scratch: at most max_blocks (0: as many as
// kDscrBandedWorkspaceBytes holds, at least 1), at most `items`.
inline int64_t dscr_banded_global_blocks(const DscrBandedStructure& s, int64_t items, int64_t max_blocks) {
  int64_t cap = kDscrBandedWorkspaceBytes / (dscr_banded_block_floats(s) * int64_t(sizeof(float)));
  if (max_blocks > 0) cap = max_blocks;
  if (cap < 1) cap = 1;
  return items < cap ? items : cap;
}

// Workspace sizes of a call: int32 elements (perm, start, cursor, valid) and float32 elements
// (global scratch; 0 when it is in shared memory). items: the call's work items over all its tensors.
inline int64_t dscr_banded_int_workspace(const DscrBandedStructure& s) { return s.Bd * s.N + 2 * s.G + 2 * s.Bd; }
inline int64_t dscr_banded_float_workspace(const DscrBandedStructure& s, int64_t items, int64_t smem_limit,
                                           int64_t max_blocks) {
  if (dscr_banded_in_smem(s, smem_limit)) return 0;
  return dscr_banded_global_blocks(s, items, max_blocks) * dscr_banded_block_floats(s);
}

// Work items of one tensor [B, H, N, D].
inline int64_t dscr_banded_items(const View& x) {
  return x.size(0) * x.size(1) * ((x.size(3) + kDscrBandedCols - 1) / kDscrBandedCols);
}

template <class I>
cudaError_t dscr_banded_prep_launch(const DscrBandedPrepArgs& a, cudaStream_t stream) {
  if (a.s.Bd == 0) return cudaSuccess;
  if (a.s.Bd > 2147483647) return cudaErrorInvalidConfiguration;
  dscr_banded_prep_kernel<I><<<dim3(static_cast<unsigned>(a.s.Bd)), dim3(kDscrBandedPrepThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

// One launch over a.items work items: scratch in shared memory (smem_limit allowing), else in
// a.scratch (the caller's, dscr_banded_float_workspace floats) with at most max_blocks blocks.
template <class T>
cudaError_t dscr_banded_launch(const DscrBandedArgs& a, int64_t smem_limit, int64_t max_blocks, cudaStream_t stream) {
  if (a.items == 0) return cudaSuccess;
  const bool smem = dscr_banded_in_smem(a.s, smem_limit);
  int64_t blocks = smem ? a.items : dscr_banded_global_blocks(a.s, a.items, max_blocks);
  if (blocks > 2147483647) blocks = 2147483647;  // blocks loop over the items
  const int64_t bytes = smem ? dscr_banded_block_floats(a.s) * int64_t(sizeof(float)) : 0;
  if (!smem && a.scratch == nullptr) return cudaErrorInvalidValue;
  DscrBandedArgs b = a;
  if (smem) b.scratch = nullptr;
  b.scratch_stride = dscr_banded_block_floats(a.s);
  if (bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(dscr_banded_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes));
    if (e != cudaSuccess) return e;
  }
  dscr_banded_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kDscrBandedThreads), static_cast<size_t>(bytes),
                          stream>>>(b);
  return cudaGetLastError();
}

// Host-side packing of the structure (view.h): tok int32 [Bd, N], tokw float32 [Bd, N, C], cnt
// int32 [Bd], row_ptr int64 [G + 1], row_lo int32 [G], tvals float32 [nnz], node_off int64
// [Bd + 1], cinv float32 [Bd, N], band float32 [K + 1] (all contiguous; checked by the caller), gh.
inline DscrBandedStructure dscr_banded_pack(const View& tok, const View& tokw, const View& cnt, const View& row_ptr,
                                            const View& row_lo, const View& tvals, const View& node_off,
                                            const View& cinv, const View& band, int64_t gh) {
  DscrBandedStructure s{};
  s.tok = static_cast<const int32_t*>(tok.data);
  s.tokw = static_cast<const float*>(tokw.data);
  s.cnt = static_cast<const int32_t*>(cnt.data);
  s.row_ptr = static_cast<const int64_t*>(row_ptr.data);
  s.row_lo = static_cast<const int32_t*>(row_lo.data);
  s.tvals = static_cast<const float*>(tvals.data);
  s.node_off = static_cast<const int64_t*>(node_off.data);
  s.cinv = static_cast<const float*>(cinv.data);
  s.band = static_cast<const float*>(band.data);
  s.Bd = tok.size(0);
  s.N = tok.size(1);
  s.C = tokw.size(2);
  s.G = row_lo.size(0);
  s.nnz = tvals.size(0);
  s.K = band.size(0) - 1;
  s.gh = gh;
  s.gw = gh > 0 ? s.N / gh : 0;
  return s;
}

// The whole call: the prep kernel, then one launch per run of up to kDscrBandedMaxTensors
// consecutive tensors of one dtype. xs[p] -> outs[p] ([B, H, N, D], outs[p] may be xs[p]); iws:
// dscr_banded_int_workspace int32, fws: dscr_banded_float_workspace(s, total items, ...) float32.
inline cudaError_t dscr_banded_run(const DscrBandedStructure& s, const View* xs, const View* outs, int n, int32_t* iws,
                                   float* fws, int64_t smem_limit, int64_t max_blocks, cudaStream_t stream) {
  if (n == 0 || s.N == 0 || s.Bd == 0) return cudaSuccess;
  DscrBandedPrepArgs pa{};
  pa.s = s;
  pa.perm = iws;
  pa.start = iws + s.Bd * s.N;
  pa.cursor = pa.start + s.G + s.Bd;
  pa.valid = pa.cursor + s.G;
  cudaError_t e = dscr_banded_prep_launch<int32_t>(pa, stream);
  for (int p0 = 0; p0 < n && e == cudaSuccess;) {
    DscrBandedArgs a{};
    a.s = s;
    a.perm = pa.perm;
    a.start = pa.start;
    a.valid = pa.valid;
    a.scratch = fws;
    int p = p0;
    for (; p < n && p - p0 < kDscrBandedMaxTensors && xs[p].dtype == xs[p0].dtype; ++p) {
      DscrBandedTensor& t = a.t[p - p0];
      t.x = xs[p].data;
      t.out = outs[p].data;
      t.x_sb = xs[p].stride(0);
      t.x_sh = xs[p].stride(1);
      t.x_sn = xs[p].stride(2);
      t.o_sb = outs[p].stride(0);
      t.o_sh = outs[p].stride(1);
      t.o_sn = outs[p].stride(2);
      t.H = xs[p].size(1);
      t.D = xs[p].size(3);
      t.item0 = a.items;
      a.items += dscr_banded_items(xs[p]);
    }
    a.ntensors = p - p0;
    e = dispatch_float(xs[p0].dtype, [&](auto tag) {
      return dscr_banded_launch<decltype(tag)>(a, smem_limit, max_blocks, stream);
    });
    p0 = p;
  }
  return e;
}

}  // namespace kvfix::kernels
