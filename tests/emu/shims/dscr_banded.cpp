// Emulated banded structured-DSCR kernels (csrc/kernels/dscr_banded.cuh), module "dscr_banded".
// The structure is packed by dscr_banded_pack and the call run by dscr_banded_run, as
// csrc/cuda/dscr_banded.cu does; the workspaces are allocated here at exactly the sizes the
// header asks for (poisoned: -1 for the int32 one, NaN for the float scratch), so ASan sees overruns.
// Also the planner's host loop (csrc/kernels/dscr_plan.h), with which the tests plan their
// structures (kvfix/dscr_structured.py loaded without the compiled extension).
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/dscr_banded.cuh"
#include "kernels/dscr_plan.h"
#include "views.h"

// e float64 [G], counts int64 [G], row_lo int64 [G], row_len int64 [G], cd, allowed, then the
// outputs kept_lo int64 [G], kept_len int64 [G], dropped float64 [G] (kvfix::dscr_fit_rows; the
// caller passes valid windows, as the op checks).
KVEMU_ENTRY(dscr_fit_rows, args) {
  const int64_t G = args.size(0, 0);
  kvfix::kernels::dscr_fit_rows(args.data<const double>(0), args.data<const int64_t>(1),
                                args.data<const int64_t>(2), args.data<const int64_t>(3), G, args.f(4), args.f(5),
                                args.data<int64_t>(6), args.data<int64_t>(7), args.data<double>(8));
  return cudaSuccess;
}

using kvemu::shim::view;

// tok int32 [Bd, N], tokw float32 [Bd, N, C], cnt int32 [Bd], row_ptr int64 [G + 1], row_lo int32
// [G], tvals float32 [nnz], node_off int64 [Bd + 1], cinv float32 [Bd, N], band float32 [K + 1], gh,
// smem_limit (bytes; 0 forces the global scratch), max_blocks (0: the launcher's cap), then pairs
// x [B, H, N, D], out (like x; may be x) for each tensor to refine.
KVEMU_ENTRY(dscr_banded, args) {
  (void)args.data<const int32_t>(0);
  (void)args.data<const float>(1);
  (void)args.data<const int32_t>(2);
  (void)args.data<const int64_t>(3);
  (void)args.data<const int32_t>(4);
  (void)args.data<const float>(5);
  (void)args.data<const int64_t>(6);
  (void)args.data<const float>(7);
  (void)args.data<const float>(8);
  const kvfix::kernels::DscrBandedStructure s =
      kvfix::kernels::dscr_banded_pack(view(args, 0), view(args, 1), view(args, 2), view(args, 3), view(args, 4),
                                       view(args, 5), view(args, 6), view(args, 7), view(args, 8), args.i(9));
  const int64_t smem_limit = args.i(10), max_blocks = args.i(11);
  std::vector<kvfix::kernels::View> xs, outs;
  int64_t items = 0;
  for (int i = 12; i + 1 < args.count(); i += 2) {
    xs.push_back(view(args, i));
    outs.push_back(view(args, i + 1));
    items += kvfix::kernels::dscr_banded_items(xs.back());
  }
  std::vector<int32_t> iws(static_cast<size_t>(kvfix::kernels::dscr_banded_int_workspace(s)), -1);
  std::vector<float> fws(
      static_cast<size_t>(kvfix::kernels::dscr_banded_float_workspace(s, items, smem_limit, max_blocks)), NAN);
  return kvfix::kernels::dscr_banded_run(s, xs.data(), outs.data(), static_cast<int>(xs.size()), iws.data(),
                                         fws.empty() ? nullptr : fws.data(), smem_limit, max_blocks, nullptr);
}
