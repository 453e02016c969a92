// Entry points of the emulator self-test kernels (module "selftest").
#include <kvemu/shim.h>

#include "selftest.cuh"

using kvemu::shim::Args;
namespace st = kvemu_selftest;

// x [n] f32, partial [blocks] f32, total [1] f32
KVEMU_ENTRY(block_sum, args) {
  return st::launch_block_sum(args.data<const float>(0), static_cast<int>(args.size(0, 0)), args.data<float>(1),
                              args.data<float>(2), static_cast<int>(args.size(1, 0)));
}

// x [n] f32, partial [blocks] f32
KVEMU_ENTRY(block_sum_no_barrier, args) {
  return st::launch_block_sum_no_barrier(args.data<const float>(0), static_cast<int>(args.size(0, 0)),
                                         args.data<float>(1), static_cast<int>(args.size(1, 0)));
}

// x [blocks] f32, out [blocks * threads] f32, threads, barrier
KVEMU_ENTRY(broadcast, args) {
  const int blocks = static_cast<int>(args.size(0, 0));
  return st::launch_broadcast(args.data<const float>(0), args.data<float>(1), blocks, static_cast<int>(args.i(2)),
                              args.i(3) != 0);
}

// in [threads], out [threads] (int32, float32 or float64), kind, arg, width
KVEMU_ENTRY(shuffle, args) {
  const int threads = static_cast<int>(args.size(0, 0));
  const int kind = static_cast<int>(args.i(2)), arg = static_cast<int>(args.i(3)), width = static_cast<int>(args.i(4));
  switch (args.dtype(0)) {
    case kvemu::shim::kI32:
      return st::launch_shuffle(args.data<const int32_t>(0), args.data<int32_t>(1), threads, kind, arg, width);
    case kvemu::shim::kF32:
      return st::launch_shuffle(args.data<const float>(0), args.data<float>(1), threads, kind, arg, width);
    case kvemu::shim::kF64:
      return st::launch_shuffle(args.data<const double>(0), args.data<double>(1), threads, kind, arg, width);
    case kvemu::shim::kF16:
      return st::launch_shuffle(args.data<const __half>(0), args.data<__half>(1), threads, kind, arg, width);
    default:
      throw kvemu::shim::ArgError("shuffle: int32, float32, float64 or float16");
  }
}

// pred [threads] i32, out [threads, 6] i32 (bit patterns of unsigned), half_masks
KVEMU_ENTRY(vote, args) {
  return st::launch_vote(args.data<const int32_t>(0), reinterpret_cast<unsigned*>(args.data<int32_t>(1)),
                         static_cast<int>(args.size(0, 0)), static_cast<int>(args.i(2)));
}

// x [n] f32, keys [n] i32, fsum [1] f32, isum/imax/imin [1] i32, usum [1] i64, cas [1] i32, sync [1] i32
KVEMU_ENTRY(atomics, args) {
  return st::launch_atomics(args.data<const float>(0), args.data<const int32_t>(1), static_cast<int>(args.size(0, 0)),
                            args.data<float>(2), args.data<int32_t>(3), args.data<int32_t>(4), args.data<int32_t>(5),
                            reinterpret_cast<unsigned long long*>(args.data<int64_t>(6)), args.data<int32_t>(7),
                            args.data<int32_t>(8));
}

// A, B (f16 or bf16), C0 f32 or None, C f32, M, N, K, a_col, b_col, c_col
KVEMU_ENTRY(wmma_gemm, args) {
  const int M = static_cast<int>(args.i(4)), N = static_cast<int>(args.i(5)), K = static_cast<int>(args.i(6));
  const int ac = static_cast<int>(args.i(7)), bc = static_cast<int>(args.i(8)), cc = static_cast<int>(args.i(9));
  if (args.dtype(0) == kvemu::shim::kF16)
    return st::launch_wmma_gemm(args.data<const __half>(0), args.data<const __half>(1), args.data<const float>(2),
                                args.data<float>(3), M, N, K, ac, bc, cc);
  return st::launch_wmma_gemm(args.data<const __nv_bfloat16>(0), args.data<const __nv_bfloat16>(1),
                              args.data<const float>(2), args.data<float>(3), M, N, K, ac, bc, cc);
}

// x [n] f32, y [n] f32, threads, pad (floats), opt_in
KVEMU_ENTRY(reverse_chunks, args) {
  return st::launch_reverse_chunks(args.data<const float>(0), args.data<float>(1), static_cast<int>(args.size(0, 0)),
                                   static_cast<int>(args.i(2)), static_cast<int>(args.i(3)),
                                   static_cast<int>(args.i(4)));
}

// out [prod(grid) * prod(block)] i32, gx, gy, gz, bx, by, bz
KVEMU_ENTRY(coords3d, args) {
  const dim3 g(static_cast<unsigned>(args.i(1)), static_cast<unsigned>(args.i(2)), static_cast<unsigned>(args.i(3)));
  const dim3 b(static_cast<unsigned>(args.i(4)), static_cast<unsigned>(args.i(5)), static_cast<unsigned>(args.i(6)));
  return st::launch_coords3d(args.data<int32_t>(0), g, b);
}

// next [1] i32, order [prod(grid)] i32, last [1] i32, gx, gy, gz, threads
KVEMU_ENTRY(block_order, args) {
  const dim3 g(static_cast<unsigned>(args.i(3)), static_cast<unsigned>(args.i(4)), static_cast<unsigned>(args.i(5)));
  return st::launch_block_order(args.data<int32_t>(0), args.data<int32_t>(1), args.data<int32_t>(2), g,
                                static_cast<unsigned>(args.i(6)));
}

// x [n] f32, out [n, 8] f32
KVEMU_ENTRY(math, args) {
  return st::launch_math(args.data<const float>(0), args.data<float>(1), static_cast<int>(args.size(0, 0)));
}

// which, iout i32 or None, fout f32 or None, hin f16 or None, n, threads
KVEMU_ENTRY(failure, args) {
  return st::launch_failure(static_cast<int>(args.i(0)), args.data<int32_t>(1), args.data<float>(2),
                            args.data<const __half>(3), static_cast<int>(args.i(4)), static_cast<int>(args.i(5)));
}

// grid.x, block.x, dynamic shared memory bytes
KVEMU_ENTRY(noop, args) {
  return st::launch_noop(static_cast<unsigned>(args.i(0)), static_cast<unsigned>(args.i(1)),
                         static_cast<size_t>(args.i(2)));
}
