// Emulated structured-DSCR kernels (csrc/kernels/dscr_lowrank.cuh), module "dscr_lowrank". The
// arguments are packed by dscr_lowrank_pack, as csrc/cuda/dscr_lowrank.cu packs them.
#include <kvemu/shim.h>

#include "kernels/dscr_lowrank.cuh"
#include "views.h"

using kvemu::shim::view;

// stage (1 or 2), x [B, H, N, D], out [B, H, N, D] | None (stage 1), gh, rc [gw, pc], lc [gw, pc],
// u [Bd, N, rd], cinv [Bd, N], z1 [B, H, gh, pc, D], pa [B, H, gh, rd, D], z3 [B, H, gh, pc, D],
// pd [B, H, rd, D] (float32 contiguous; the stage's unused ones may be None).
KVEMU_ENTRY(dscr_lowrank, args) {
  for (int i = 4; i <= 7; ++i) (void)args.data<const float>(i);  // dtype checks: float32 factors
  kvfix::kernels::DscrLowrankArgs a = kvfix::kernels::dscr_lowrank_pack(
      view(args, 1), view(args, 2), args.i(3), view(args, 4), view(args, 5), view(args, 6), view(args, 7));
  a.stage = static_cast<int>(args.i(0));
  if (!args.none(8)) a.z1 = args.data<float>(8);
  if (!args.none(9)) a.pa = args.data<float>(9);
  if (!args.none(10)) a.z3 = args.data<const float>(10);
  if (!args.none(11)) a.pd = args.data<const float>(11);
  return kvfix::kernels::dispatch_float(view(args, 1).dtype, [&](auto tag) {
    return kvfix::kernels::dscr_lowrank_launch<decltype(tag)>(a, nullptr);
  });
}
