// Emulated SCR kernels (csrc/kernels/scr.cuh), module "scr". The arguments are packed by
// scr_scores_pack / scr_redistribute_pack, as csrc/cuda/scr.cu packs them.
#include <kvemu/shim.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/scr.cuh"
#include "views.h"

using kvemu::shim::mask_arg;
using kvemu::shim::view;

// q [B, Hq, Tq, D], k [B, Hkv, T, D] (one float dtype, contiguous last dim), mask broadcastable to
// [B, Hq, Tq, T] | None, scores [B, N] f32 (out), start, scale, causal (0 / 1)
KVEMU_ENTRY(scr_scores, args) {
  kvfix::kernels::ScrScoresArgs a =
      kvfix::kernels::scr_scores_pack(view(args, 0), view(args, 1), mask_arg(args, 2), view(args, 3), args.i(4),
                                      static_cast<float>(args.f(5)), args.i(6) != 0);
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::scr_scores_workspace_floats(a)), std::nanf(""));
  a.work = work.data();
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::scr_scores_launch<decltype(tag)>(a, nullptr);
  });
}

// hidden [B, N, C], out [B, N, C] (the same tensor for in place), scores [B, N] f32, gh, gw,
// top_k, lam, exclude_border (0 / 1), in_place (0 / 1)
KVEMU_ENTRY(scr_redistribute, args) {
  kvfix::kernels::ScrRedistributeArgs a = kvfix::kernels::scr_redistribute_pack(
      view(args, 0), view(args, 1), view(args, 2), args.i(3), args.i(4), args.i(5), static_cast<float>(args.f(6)),
      args.i(7) != 0, args.i(8) != 0);
  std::vector<uint8_t> flags(static_cast<size_t>(a.B * a.N), uint8_t(0xab));  // poisoned: every flag is written
  a.flags = flags.data();
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::scr_redistribute_launch<decltype(tag)>(a, nullptr);
  });
}

// hidden [B, N, C], out [B, N, C], width int64 [1] (out): the elements per access the apply kernel
// would use (scr_redistribute_vec_width).
KVEMU_ENTRY(scr_redistribute_width, args) {
  const kvfix::kernels::ScrRedistributeArgs a = kvfix::kernels::scr_redistribute_pack(
      view(args, 0), view(args, 1), view(args, 0), 1, 1, 0, 1.0f, false, false);
  int64_t* width = args.data<int64_t>(2);
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    *width = kvfix::kernels::scr_redistribute_vec_width<decltype(tag)>(a);
    return cudaSuccess;
  });
}
