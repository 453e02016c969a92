// Emulated KVSmooth kernels (csrc/kernels/kvsmooth.cuh), module "kvsmooth". The arguments are
// packed by kvsmooth_pack / kvsmooth_pack_step, as csrc/cuda/kvsmooth.cu packs them.
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/kvsmooth.cuh"
#include "views.h"

using kvemu::shim::mask_arg;
using kvemu::shim::view;

namespace {

cudaError_t run(kvfix::kernels::KvsmoothArgs& a, const kvemu::shim::Args& args) {
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::kvsmooth_workspace_floats(a)), std::nanf(""));
  a.work = work.data();
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::kvsmooth_launch<decltype(tag)>(a, nullptr);
  });
}

}  // namespace

// q [B, Hq, 1, D], k [B, Hkv, T, D] (one float dtype, contiguous last dim), mask broadcastable to
// [B, 1, 1, T] | None, entropy [B, Hq] f32 (out), scale, splits
KVEMU_ENTRY(row_entropy, args) {
  kvfix::kernels::KvsmoothArgs a =
      kvfix::kernels::kvsmooth_pack(view(args, 0), view(args, 1), mask_arg(args, 2), static_cast<float>(args.f(4)),
                                    args.i(5));
  a.entropy = args.data<float>(3);
  return run(a, args);
}

// q, k, v, mask | None, queue [B, M] f32 (in/out), lam [B] f32 (out), scale, lam_lo, lam_hi, splits,
// position (one int64) | None
KVEMU_ENTRY(kvsmooth_step, args) {
  kvfix::kernels::KvsmoothArgs a =
      kvfix::kernels::kvsmooth_pack(view(args, 0), view(args, 1), mask_arg(args, 3), static_cast<float>(args.f(6)),
                                    args.i(9));
  kvfix::kernels::kvsmooth_pack_step(a, view(args, 2), view(args, 4), args.data<float>(5),
                                     static_cast<float>(args.f(7)), static_cast<float>(args.f(8)),
                                     args.data<int64_t>(10));
  return run(a, args);
}

// The steps of L layers through kvsmooth_steps_launch (kvfix.kvsmooth_steps_ on CUDA): per layer
// q, k, v, mask | None, queue, scale, splits (7 arguments, one dtype for every layer's q); then lam
// [L, B] f32 (out), lam_lo, lam_hi.
KVEMU_ENTRY(kvsmooth_steps, args) {
  const int L = (args.count() - 3) / 7;
  if (L < 1 || args.count() != 7 * L + 3)
    throw kvemu::shim::ArgError("7 arguments per layer, then lam, lam_lo, lam_hi");
  const int tail = 7 * L;
  float* lam = args.data<float>(tail);
  std::vector<kvfix::kernels::KvsmoothArgs> layers(static_cast<size_t>(L));
  for (int i = 0; i < L; ++i) {
    const int j = 7 * i;
    layers[i] = kvfix::kernels::kvsmooth_pack(view(args, j), view(args, j + 1), mask_arg(args, j + 3),
                                              static_cast<float>(args.f(j + 5)), args.i(j + 6));
    kvfix::kernels::kvsmooth_pack_step(layers[i], view(args, j + 2), view(args, j + 4),
                                       lam + i * args.stride(tail, 0), static_cast<float>(args.f(tail + 1)),
                                       static_cast<float>(args.f(tail + 2)), nullptr);
  }
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::kvsmooth_steps_workspace_floats(layers.data(), L)),
                          std::nanf(""));
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::kvsmooth_steps_launch<decltype(tag)>(layers.data(), L, work.data(), nullptr);
  });
}
