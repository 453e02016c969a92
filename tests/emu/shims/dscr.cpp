// Emulated DSCR kernel (csrc/kernels/dscr.cuh), module "dscr". The arguments are packed by
// dscr_pack, as csrc/cuda/dscr.cu packs them.
#include <kvemu/shim.h>

#include "kernels/dscr.cuh"
#include "views.h"

using kvemu::shim::view;

// k, v | None, k_out, v_out | None: [B, H, N, D] (one dtype, contiguous last dim);
// depth [Bd, N] f32, coords [Bd, N, 2] f32 (contiguous, Bd in {1, B}); coef_d, coef_s.
KVEMU_ENTRY(dscr_refine, args) {
  (void)args.data<const float>(4);  // dtype checks: float32 geometry
  (void)args.data<const float>(5);
  const kvfix::kernels::DscrArgs a =
      kvfix::kernels::dscr_pack(view(args, 0), view(args, 1), view(args, 2), view(args, 3), view(args, 4),
                                view(args, 5), static_cast<float>(args.f(6)), static_cast<float>(args.f(7)));
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::dscr_refine_launch<decltype(tag)>(a, nullptr);
  });
}
