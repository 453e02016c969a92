// Emulated structured-DSCR kernels (csrc/kernels/dscr_factored.cuh), module "dscr_factored".
#include <kvemu/shim.h>

#include "kernels/dscr_factored.cuh"

// stage (1 or 2), x [B, H, N, D], out [B, H, N, D] | None (stage 1), gh, rc [gw, pc], lc [gw, pc],
// u [Bd, N, rd], cinv [Bd, N], z1 [B, H, gh, pc, D], pa [B, H, gh, rd, D], z3 [B, H, gh, pc, D],
// pd [B, H, rd, D] (float32 contiguous; the stage's unused ones may be None).
KVEMU_ENTRY(dscr_factored, args) {
  kvfix::kernels::DscrFactoredArgs a{};
  a.stage = static_cast<int>(args.i(0));
  a.x = args.tensor(1).data;
  a.B = args.size(1, 0);
  a.H = args.size(1, 1);
  a.D = args.size(1, 3);
  a.x_sb = args.stride(1, 0);
  a.x_sh = args.stride(1, 1);
  a.x_sn = args.stride(1, 2);
  if (!args.none(2)) {
    a.out = args.tensor(2).data;
    a.o_sb = args.stride(2, 0);
    a.o_sh = args.stride(2, 1);
    a.o_sn = args.stride(2, 2);
  }
  a.gh = args.i(3);
  a.gw = args.size(4, 0);
  a.pc = args.size(4, 1);
  a.rc = args.data<const float>(4);
  a.lc = args.data<const float>(5);
  a.u = args.data<const float>(6);
  a.rd = args.size(6, 2);
  a.u_sb = args.size(6, 0) == 1 ? 0 : args.size(6, 1) * a.rd;
  a.cinv = args.data<const float>(7);
  if (!args.none(8)) a.z1 = args.data<float>(8);
  if (!args.none(9)) a.pa = args.data<float>(9);
  if (!args.none(10)) a.z3 = args.data<const float>(10);
  if (!args.none(11)) a.pd = args.data<const float>(11);
  return KVEMU_DISPATCH_FLOAT(args.dtype(1), T, { return kvfix::kernels::dscr_factored_launch<T>(a, nullptr); });
}
