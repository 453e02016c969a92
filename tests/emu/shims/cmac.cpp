// Emulated CMAC kernels (csrc/kernels/cmac.cuh), module "cmac". The arguments are packed by
// cmac_rope_pack / cmac_attention_pack / cmac_contrastive_pack, as csrc/cuda/cmac.cu packs them.
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/cmac.cuh"
#include "views.h"

using kvemu::shim::mask_arg;
using kvemu::shim::view;

namespace {

kvfix::kernels::CmacSpan span_arg(const kvemu::shim::Args& args, int i, int64_t start, int64_t end) {
  return {args.none(i) ? nullptr : args.data<int64_t>(i), start, end};
}

}  // namespace

// k [B, H, T, D], out [B, H, N, D] (contiguous), spans [B, 2] int64 | None, start, end,
// inv_freq [D/2] f32, positions [rows, B, T] int64 | None, section sizes [S] int64 | None, c = 1 - 1/gamma
KVEMU_ENTRY(rope_calibrate, args) {
  const int nsec = args.none(7) ? 0 : static_cast<int>(args.size(7, 0));
  if (nsec > kvfix::kernels::kCmacMaxSections) throw kvemu::shim::ArgError("too many sections");
  const kvfix::kernels::CmacRopeArgs a = kvfix::kernels::cmac_rope_pack(
      view(args, 0), view(args, 1), span_arg(args, 2, args.i(3), args.i(4)), args.data<float>(5), view(args, 6),
      args.data<int64_t>(7), nsec, static_cast<float>(args.f(8)));
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::cmac_rope_launch<decltype(tag)>(a, nullptr);
  });
}

// q, k, v, k_cal | None, out [B, Hq, Tq, D] (contiguous), spans | None, start, end, mask | None
// (broadcastable to [B, Hq, Tq, T]), imd (int), imd_items [B] bool | None, vector_mean (int), scale,
// causal (int), decode splits (int; the .cu takes them from the SM count), the mean image key
// [B, Hkv, D] float32 contiguous | None
KVEMU_ENTRY(cmac_attention, args) {
  kvfix::kernels::CmacAttnArgs a = kvfix::kernels::cmac_attention_pack(
      view(args, 0), view(args, 1), view(args, 2), view(args, 3), view(args, 4), span_arg(args, 5, args.i(6), args.i(7)),
      mask_arg(args, 8), static_cast<int>(args.i(9)), args.none(10) ? nullptr : args.data<bool>(10),
      static_cast<int>(args.i(11)), static_cast<float>(args.f(12)), static_cast<int>(args.i(13)),
      static_cast<int>(args.i(14)));
  kvfix::kernels::cmac_attention_set_key_mean(a, args.none(15) ? nullptr : args.data<float>(15));
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::cmac_attention_workspace_floats(a)), std::nanf(""));
  a.work = work.empty() ? nullptr : work.data();
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::cmac_attention_launch<decltype(tag)>(a, nullptr);
  });
}

// logits, logits_distorted [rows, V] (contiguous), out [rows, V], alpha, beta
KVEMU_ENTRY(contrastive_logits, args) {
  kvfix::kernels::CmacContrastiveArgs a = kvfix::kernels::cmac_contrastive_pack(
      view(args, 0), view(args, 1), view(args, 2), static_cast<float>(args.f(3)), static_cast<float>(std::log(args.f(4))));
  std::vector<float> part(static_cast<size_t>(kvfix::kernels::cmac_contrastive_workspace_floats(a)), std::nanf(""));
  a.part = part.data();  // poisoned: every chunk's maximum is written before it is read
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    return kvfix::kernels::cmac_contrastive_launch<decltype(tag)>(a, nullptr);
  });
}

// l [rows, V], lt, out like it, width int64 [1] (out): the elements per access of the contrastive
// kernels (cmac_contrastive_vec_width).
KVEMU_ENTRY(contrastive_width, args) {
  const kvfix::kernels::CmacContrastiveArgs a =
      kvfix::kernels::cmac_contrastive_pack(view(args, 0), view(args, 1), view(args, 2), 1.0f, 0.0f);
  int64_t* width = args.data<int64_t>(3);
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) {
    *width = kvfix::kernels::cmac_contrastive_vec_width<decltype(tag)>(a);
    return cudaSuccess;
  });
}
