// Emulated banded structured-DSCR kernels (csrc/kernels/dscr_banded.cuh), module "dscr_banded".
// The structure is packed by dscr_banded_pack and the call run by dscr_banded_run, as
// csrc/cuda/dscr_banded.cu does; the workspaces are allocated here at exactly the sizes the
// header asks for (poisoned: -1 for the int32 one, NaN for the float scratch), so ASan sees overruns.
// Also the planner's host code (csrc/kernels/dscr_plan.h), with which the tests plan their
// structures (kvfix/dscr_structured.py loaded without the compiled extension).
#include <kvemu/shim.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/dscr_banded.cuh"
#include "kernels/dscr_plan.h"
#include "views.h"

// One item's depth structure (kvfix::dscr_depth_structure), in two calls since its sizes are
// found by the planner: dscr_depth_plan takes depth float64 [N], cd, budget, orders float64 [n, 3],
// force, cap, spatial float64 [N] or None, then writes sizes int64 [3] (order, G, nnz) and info
// float64 [7] (as the op's) and keeps the structure; dscr_depth_take copies it into tok int64 [N],
// tokw float64 [N, order], row_lo int64 [G], row_len int64 [G], tvals float64 [nnz] and cinv
// float64 [N] (or None where no spatial sums were given). (The emulator runs one call at a time.)
static kvfix::kernels::DscrDepthStructure g_depth;

KVEMU_ENTRY(dscr_depth_plan, args) {
  const int64_t N = args.size(0, 0), n_orders = args.size(3, 0);
  const std::vector<kvfix::kernels::DscrGridOrder> orders =
      kvfix::kernels::dscr_grid_orders(args.data<const double>(3), n_orders);
  g_depth = kvfix::kernels::dscr_depth_structure(args.data<const double>(0), N, args.f(1), args.f(2), orders.data(),
                                                 n_orders, args.i(4), args.f(5), args.data<const double>(6));
  int64_t* sizes = args.data<int64_t>(7);
  sizes[0] = g_depth.order;
  sizes[1] = static_cast<int64_t>(g_depth.row_lo.size());
  sizes[2] = static_cast<int64_t>(g_depth.tvals.size());
  kvfix::kernels::dscr_depth_info(g_depth, args.data<double>(8));
  return cudaSuccess;
}

KVEMU_ENTRY(dscr_depth_take, args) {
  std::copy(g_depth.tok.begin(), g_depth.tok.end(), args.data<int64_t>(0));
  std::copy(g_depth.tokw.begin(), g_depth.tokw.end(), args.data<double>(1));
  std::copy(g_depth.row_lo.begin(), g_depth.row_lo.end(), args.data<int64_t>(2));
  std::copy(g_depth.row_len.begin(), g_depth.row_len.end(), args.data<int64_t>(3));
  std::copy(g_depth.tvals.begin(), g_depth.tvals.end(), args.data<double>(4));
  if (!args.none(5)) std::copy(g_depth.cinv.begin(), g_depth.cinv.end(), args.data<double>(5));
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
