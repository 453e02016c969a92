// Emulated CMAC kernels (csrc/kernels/cmac.cuh), module "cmac".
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/cmac.cuh"

namespace {

kvfix::kernels::CmacSpan span_arg(const kvemu::shim::Args& args, int i, int64_t start, int64_t end) {
  return {args.none(i) ? nullptr : args.data<int64_t>(i), start, end};
}

}  // namespace

// k [B, H, T, D], out [B, H, N, D] (contiguous), spans [B, 2] int64 | None, start, end,
// inv_freq [D/2] f32, positions [rows, B, T] int64 | None, section sizes [S] int64 | None, c = 1 - 1/gamma
KVEMU_ENTRY(rope_calibrate, args) {
  kvfix::kernels::CmacRopeArgs a{};
  a.k = args.tensor(0).data;
  a.k_sb = args.stride(0, 0);
  a.k_sh = args.stride(0, 1);
  a.k_st = args.stride(0, 2);
  a.out = args.tensor(1).data;
  a.span = span_arg(args, 2, args.i(3), args.i(4));
  a.inv_freq = args.data<float>(5);
  a.B = args.size(0, 0);
  a.H = args.size(0, 1);
  a.T = args.size(0, 2);
  a.D = args.size(0, 3);
  a.N = args.size(1, 2);
  a.pos = args.none(6) ? nullptr : args.data<int64_t>(6);
  a.rows = args.none(6) ? 1 : static_cast<int>(args.size(6, 0));
  a.nsec = 1;
  a.sec[0] = 0;
  a.sec[1] = static_cast<int>(a.D / 2);
  if (!args.none(7)) {
    const int64_t* s = args.data<int64_t>(7);
    a.nsec = static_cast<int>(args.size(7, 0));
    int acc = 0;
    for (int i = 0; i < a.nsec && i < kvfix::kernels::kCmacMaxSections; ++i) {
      a.sec[i] = acc;
      acc += static_cast<int>(s[i]);
    }
    a.sec[a.nsec] = acc;
  }
  a.c = static_cast<float>(args.f(8));
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::cmac_rope_launch<T>(a, nullptr); });
}

// q, k, v, k_cal | None, out [B, Hq, Tq, D] (contiguous), spans | None, start, end, mask | None
// ([B, Hq, Tq, T] view, stride 0 where broadcast), imd (int), imd_items [B] bool | None,
// vector_mean (int), scale, causal (int)
KVEMU_ENTRY(cmac_attention, args) {
  kvfix::kernels::CmacAttnArgs a{};
  a.q = args.tensor(0).data;
  a.q_sb = args.stride(0, 0);
  a.q_sh = args.stride(0, 1);
  a.q_st = args.stride(0, 2);
  a.k = args.tensor(1).data;
  a.k_sb = args.stride(1, 0);
  a.k_sh = args.stride(1, 1);
  a.k_st = args.stride(1, 2);
  a.v = args.tensor(2).data;
  a.v_sb = args.stride(2, 0);
  a.v_sh = args.stride(2, 1);
  a.v_st = args.stride(2, 2);
  if (!args.none(3)) {
    a.kc = args.tensor(3).data;
    a.c_sb = args.stride(3, 0);
    a.c_sh = args.stride(3, 1);
    a.c_st = args.stride(3, 2);
    a.N = args.size(3, 2);
  }
  a.out = args.tensor(4).data;
  a.span = span_arg(args, 5, args.i(6), args.i(7));
  if (!args.none(8)) {
    a.mask = args.tensor(8).data;
    switch (args.dtype(8)) {
      case kvemu::shim::kBool: a.mask_kind = 1; break;
      case kvemu::shim::kF32: a.mask_kind = 2; break;
      case kvemu::shim::kF16: a.mask_kind = 3; break;
      case kvemu::shim::kBF16: a.mask_kind = 4; break;
      default: throw kvemu::shim::ArgError("mask must be bool or float32/float16/bfloat16");
    }
    a.m_sb = args.stride(8, 0);
    a.m_sh = args.stride(8, 1);
    a.m_si = args.stride(8, 2);
    a.m_sj = args.stride(8, 3);
  }
  a.imd = static_cast<int>(args.i(9));
  a.imd_items = args.none(10) ? nullptr : args.data<bool>(10);
  a.vector_mean = static_cast<int>(args.i(11));
  a.scale = static_cast<float>(args.f(12));
  a.causal = static_cast<int>(args.i(13));
  a.B = args.size(0, 0);
  a.Hq = args.size(0, 1);
  a.Tq = args.size(0, 2);
  a.D = args.size(0, 3);
  a.Hkv = args.size(1, 1);
  a.T = args.size(1, 2);
  std::vector<float> work(static_cast<size_t>(a.B * a.Hkv), std::nanf(""));
  a.work = work.data();
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::cmac_attention_launch<T>(a, nullptr); });
}

// logits, logits_distorted [rows, V] (contiguous), out [rows, V], alpha, beta
KVEMU_ENTRY(contrastive_logits, args) {
  kvfix::kernels::CmacContrastiveArgs a{};
  a.l = args.tensor(0).data;
  a.lt = args.tensor(1).data;
  a.out = args.tensor(2).data;
  a.rows = args.size(0, 0);
  a.V = args.size(0, 1);
  a.a = static_cast<float>(args.f(3));
  a.log_beta = static_cast<float>(std::log(args.f(4)));
  return KVEMU_DISPATCH_FLOAT(args.dtype(0), T, { return kvfix::kernels::cmac_contrastive_launch<T>(a, nullptr); });
}
