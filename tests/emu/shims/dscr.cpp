// Emulated DSCR kernel (csrc/kernels/dscr.cuh), module "dscr".
#include <kvemu/shim.h>

#include "kernels/dscr.cuh"

// k, v | None, k_out, v_out | None: [B, H, N, D] (one dtype, contiguous last dim);
// depth [Bd, N] f32, coords [Bd, N, 2] f32 (contiguous, Bd in {1, B}); coef_d, coef_s.
KVEMU_ENTRY(dscr_refine, args) {
  kvfix::kernels::DscrArgs a{};
  a.B = args.size(0, 0);
  a.H = args.size(0, 1);
  a.N = args.size(0, 2);
  a.D = args.size(0, 3);
  a.k = args.tensor(0).data;
  a.k_sb = args.stride(0, 0);
  a.k_sh = args.stride(0, 1);
  a.k_sn = args.stride(0, 2);
  a.k_out = args.tensor(2).data;
  a.ko_sb = args.stride(2, 0);
  a.ko_sh = args.stride(2, 1);
  a.ko_sn = args.stride(2, 2);
  if (!args.none(1)) {
    a.v = args.tensor(1).data;
    a.v_sb = args.stride(1, 0);
    a.v_sh = args.stride(1, 1);
    a.v_sn = args.stride(1, 2);
    a.v_out = args.tensor(3).data;
    a.vo_sb = args.stride(3, 0);
    a.vo_sh = args.stride(3, 1);
    a.vo_sn = args.stride(3, 2);
  }
  a.depth = args.data<const float>(4);
  a.coords = args.data<const float>(5);
  a.geo_sb = args.size(4, 0) == 1 ? 0 : a.N;
  a.coef_d = static_cast<float>(args.f(6));
  a.coef_s = static_cast<float>(args.f(7));
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::dscr_refine_launch<T>(a, nullptr); });
}
