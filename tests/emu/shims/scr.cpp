// Emulated SCR kernels (csrc/kernels/scr.cuh), module "scr".
#include <kvemu/shim.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/scr.cuh"

// q [B, Hq, Tq, D], k [B, Hkv, T, D] (one float dtype, contiguous last dim), mask broadcastable to
// [B, Hq, Tq, T] given as a 4-D (possibly expanded: stride 0) view or None, scores [B, N] f32 (out),
// start, scale, causal (0 / 1)
KVEMU_ENTRY(scr_scores, args) {
  kvfix::kernels::ScrScoresArgs a{};
  a.q = args.tensor(0).data;
  a.q_sb = args.stride(0, 0);
  a.q_sh = args.stride(0, 1);
  a.q_si = args.stride(0, 2);
  a.k = args.tensor(1).data;
  a.k_sb = args.stride(1, 0);
  a.k_sh = args.stride(1, 1);
  a.k_st = args.stride(1, 2);
  a.B = args.size(0, 0);
  a.Hq = args.size(0, 1);
  a.Tq = args.size(0, 2);
  a.D = args.size(0, 3);
  a.Hkv = args.size(1, 1);
  a.T = args.size(1, 2);
  if (!args.none(2)) {
    a.mask = args.tensor(2).data;
    switch (args.dtype(2)) {
      case kvemu::shim::kBool: a.mask_kind = 1; break;
      case kvemu::shim::kF32: a.mask_kind = 2; break;
      case kvemu::shim::kF16: a.mask_kind = 3; break;
      case kvemu::shim::kBF16: a.mask_kind = 4; break;
      default: throw kvemu::shim::ArgError("mask must be bool or float32/float16/bfloat16");
    }
    a.m_sb = args.size(2, 0) == 1 ? 0 : args.stride(2, 0);
    a.m_sh = args.size(2, 1) == 1 ? 0 : args.stride(2, 1);
    a.m_si = args.size(2, 2) == 1 ? 0 : args.stride(2, 2);
    a.m_st = args.size(2, 3) == 1 ? 0 : args.stride(2, 3);
  }
  a.scores = args.data<float>(3);
  a.N = args.size(3, 1);
  a.start = args.i(4);
  a.scale = static_cast<float>(args.f(5));
  a.causal = args.i(6) != 0;
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::scr_scores_workspace_floats(a)), std::nanf(""));
  a.work = work.data();
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::scr_scores_launch<T>(a, nullptr); });
}

// hidden [B, N, C], out [B, N, C] (the same tensor for in place), scores [B, N] f32, gh, gw,
// top_k, lam, exclude_border (0 / 1), in_place (0 / 1)
KVEMU_ENTRY(scr_redistribute, args) {
  kvfix::kernels::ScrRedistributeArgs a{};
  a.hidden = args.tensor(0).data;
  a.h_sb = args.stride(0, 0);
  a.h_sn = args.stride(0, 1);
  a.out = args.tensor(1).data;
  a.o_sb = args.stride(1, 0);
  a.o_sn = args.stride(1, 1);
  a.scores = args.data<float>(2);
  a.B = args.size(0, 0);
  a.N = args.size(0, 1);
  a.C = args.size(0, 2);
  a.gh = args.i(3);
  a.gw = args.i(4);
  a.top_k = args.i(5);
  a.lam = static_cast<float>(args.f(6));
  a.exclude_border = args.i(7) != 0;
  a.in_place = args.i(8) != 0;
  std::vector<uint8_t> flags(static_cast<size_t>(a.B * a.N), uint8_t(0xab));  // poisoned: every flag is written
  a.flags = flags.data();
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::scr_redistribute_launch<T>(a, nullptr); });
}
