// Emulated CMAC attention as csrc/cuda/cmac.cu dispatches it (csrc/kernels/cmac_prefill_tc.cuh),
// module "cmac_tc": the tensor-core prefill kernel where it applies, the SIMT kernels of
// csrc/kernels/cmac.cuh otherwise. Arguments as the "cmac" module's cmac_attention (packed by
// cmac_attention_pack, as the .cu packs them).
#include <kvemu/shim.h>

#include <cmath>
#include <vector>

#include "kernels/cmac_prefill_tc.cuh"
#include "views.h"

using kvemu::shim::mask_arg;
using kvemu::shim::view;

namespace {

// q, k, v, k_cal | None, out [B, Hq, Tq, D] (contiguous), spans | None, start, end, mask | None
// (broadcastable to [B, Hq, Tq, T]), imd (int), imd_items [B] bool | None, vector_mean (int), scale,
// causal (int), decode splits (int), the mean image key [B, Hkv, D] float32 contiguous | None
template <class Launch>
cudaError_t run(const kvemu::shim::Args& args, Launch launch) {
  kvfix::kernels::CmacAttnArgs a = kvfix::kernels::cmac_attention_pack(
      view(args, 0), view(args, 1), view(args, 2), view(args, 3), view(args, 4),
      {args.none(5) ? nullptr : args.data<int64_t>(5), args.i(6), args.i(7)}, mask_arg(args, 8),
      static_cast<int>(args.i(9)), args.none(10) ? nullptr : args.data<bool>(10), static_cast<int>(args.i(11)),
      static_cast<float>(args.f(12)), static_cast<int>(args.i(13)), static_cast<int>(args.i(14)));
  kvfix::kernels::cmac_attention_set_key_mean(a, args.none(15) ? nullptr : args.data<float>(15));
  std::vector<float> work(static_cast<size_t>(kvfix::kernels::cmac_attention_workspace_floats(a)), std::nanf(""));
  a.work = work.empty() ? nullptr : work.data();
  return kvfix::kernels::dispatch_float(view(args, 0).dtype, [&](auto tag) { return launch(tag, a); });
}

}  // namespace

// What csrc/cuda/cmac.cu runs: cmac_attention_dispatch.
KVEMU_ENTRY(cmac_attention, args) {
  return run(args, [](auto tag, const kvfix::kernels::CmacAttnArgs& a) {
    return kvfix::kernels::cmac_attention_dispatch<decltype(tag)>(a, nullptr);
  });
}

// The tensor-core path alone: fails (cudaErrorNotSupported) where the dispatch falls back.
KVEMU_ENTRY(cmac_attention_tc, args) {
  return run(args, [](auto tag, const kvfix::kernels::CmacAttnArgs& a) {
    return kvfix::kernels::cmac_prefill_tc_launch<decltype(tag)>(a, nullptr);
  });
}
