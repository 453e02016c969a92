// Emulated KVSmooth kernels (csrc/kernels/kvsmooth.cuh), module "kvsmooth".
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/kvsmooth.cuh"

namespace {

// q [B, Hq, 1, D], k [B, Hkv, T, D] (one float dtype, contiguous last dim), mask [B, 1, 1, T]
// (possibly an expanded view: stride 0 where broadcast) or None.
kvfix::kernels::KvsmoothArgs common(const kvemu::shim::Args& args, int iq, int ik, int imask) {
  kvfix::kernels::KvsmoothArgs a{};
  a.q = args.tensor(iq).data;
  a.q_sb = args.stride(iq, 0);
  a.q_sh = args.stride(iq, 1);
  a.k = args.tensor(ik).data;
  a.k_sb = args.stride(ik, 0);
  a.k_sh = args.stride(ik, 1);
  a.k_st = args.stride(ik, 2);
  a.B = args.size(iq, 0);
  a.Hq = args.size(iq, 1);
  a.D = args.size(iq, 3);
  a.Hkv = args.size(ik, 1);
  a.T = args.size(ik, 2);
  if (!args.none(imask)) {
    a.mask = args.tensor(imask).data;
    switch (args.dtype(imask)) {
      case kvemu::shim::kBool: a.mask_kind = 1; break;
      case kvemu::shim::kF32: a.mask_kind = 2; break;
      case kvemu::shim::kF16: a.mask_kind = 3; break;
      case kvemu::shim::kBF16: a.mask_kind = 4; break;
      default: throw kvemu::shim::ArgError("mask must be bool or float32/float16/bfloat16");
    }
    a.m_sb = args.size(imask, 0) == 1 ? 0 : args.stride(imask, 0);
    a.m_st = args.size(imask, 3) == 1 ? 0 : args.stride(imask, 3);
  }
  return a;
}

}  // namespace

// q, k, mask | None, entropy [B, Hq] f32 (out), scale, splits
KVEMU_ENTRY(row_entropy, args) {
  kvfix::kernels::KvsmoothArgs a = common(args, 0, 1, 2);
  a.entropy = args.data<float>(3);
  a.scale = static_cast<float>(args.f(4));
  a.splits = args.i(5);
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::kvsmooth_workspace_floats(a)), std::nanf(""));
  a.work = work.data();
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::kvsmooth_launch<T>(a, nullptr); });
}

// q, k, v, mask | None, queue [B, M] f32 (in/out), lam [B] f32 (out), scale, lam_lo, lam_hi, splits
KVEMU_ENTRY(kvsmooth_step, args) {
  kvfix::kernels::KvsmoothArgs a = common(args, 0, 1, 3);
  a.v = args.tensor(2).data;
  a.v_sb = args.stride(2, 0);
  a.v_sh = args.stride(2, 1);
  a.v_st = args.stride(2, 2);
  a.queue = args.data<float>(4);
  a.qu_sb = args.stride(4, 0);
  a.qu_sm = args.stride(4, 1);
  a.M = args.size(4, 1);
  a.lam = args.data<float>(5);
  a.scale = static_cast<float>(args.f(6));
  a.lam_lo = static_cast<float>(args.f(7));
  a.lam_hi = static_cast<float>(args.f(8));
  a.splits = args.i(9);
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::kvsmooth_workspace_floats(a)), std::nanf(""));
  a.work = work.data();
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::kvsmooth_launch<T>(a, nullptr); });
}
