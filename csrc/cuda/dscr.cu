// DSCR on CUDA (METHODS §1): the ATen side of csrc/kernels/dscr.cuh.
//
// Checks and coefficients are shared with the CPU path (kvfix::dscr_check in
// csrc/ops/dscr.cpp). The values of depth and coords are not read on the host (issue 18: no
// device -> host sync per image): the kernel writes nan over every output of an item whose
// depth or coords are not finite (csrc/kernels/dscr.cuh), where the CPU op raises. The kernel reads any [B, H, N, D] strides with a contiguous last dim and writes any
// such strides, so the out-of-place op allocates contiguous outputs and the in-place cache op
// writes straight into the cache views after copying each layer's span to a temporary (every
// output token reads every source token, so sources and outputs must not overlap).
//
// Compile time: the kernels are instantiated explicitly below, where every nvcc pass sees them;
// the ATen side is compiled in the host pass only (#ifndef __CUDA_ARCH__), so the two device
// passes (sm_80, sm_90) do not parse the ATen/c10 headers. Includes are kept to what is used
// (no torch/extension.h or ATen/ATen.h).
#include "kernels/dscr.cuh"

template cudaError_t kvfix::kernels::dscr_refine_launch<float>(const kvfix::kernels::DscrArgs&, cudaStream_t);
template cudaError_t kvfix::kernels::dscr_refine_launch<__half>(const kvfix::kernels::DscrArgs&, cudaStream_t);
template cudaError_t kvfix::kernels::dscr_refine_launch<__nv_bfloat16>(const kvfix::kernels::DscrArgs&,
                                                                       cudaStream_t);

#ifndef __CUDA_ARCH__

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "aten_view.h"
#include "ops/dscr.h"

namespace kvfix {
namespace {

// out_k[...] = refine(k), out_v = refine(v) (v / out_v may be null) on the current stream.
void launch_dscr(const at::Tensor& k, const at::Tensor* v, const at::Tensor& out_k, const at::Tensor* out_v,
                 const at::Tensor& depth, const at::Tensor& coords, DscrCoefs c) {
  if (k.numel() == 0) return;
  TORCH_CHECK(k.size(2) <= kernels::kDscrMaxTokens, "dscr: the CUDA kernel supports up to ", kernels::kDscrMaxTokens,
              " tokens, got N=", k.size(2));
  // Outputs first: an in-place target is materialised (copy-on-write) before any pointer is read.
  const kernels::View ko = out_view_of(out_k), vo = out_v != nullptr ? out_view_of(*out_v) : kernels::View{};
  const kernels::DscrArgs a = kernels::dscr_pack(view_of(k), v != nullptr ? view_of(*v) : kernels::View{}, ko, vo,
                                                 view_of(depth), view_of(coords), c.coef_d, c.coef_s);
  const cudaStream_t stream = stream_of(k);
  check_launch("dscr", kernels::dispatch_float(kernel_dtype(k.scalar_type()), [&](auto tag) {
                 return kernels::dscr_refine_launch<decltype(tag)>(a, stream);
               }));
}

}  // namespace

std::vector<at::Tensor> dscr_refine_cuda(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                         const at::Tensor& depth, const at::Tensor& coords,
                                         double sigma_d, double sigma_s, double alpha, double beta) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const DscrCoefs c = dscr_check("dscr_refine", {k}, vs, false, depth, coords, sigma_d, sigma_s, alpha, beta);
  const c10::cuda::CUDAGuard guard(k.device());
  std::vector<at::Tensor> outs{at::empty(k.sizes(), k.options())};
  if (v.has_value()) outs.push_back(at::empty(v->sizes(), v->options()));
  launch_dscr(k, v ? &*v : nullptr, outs[0], v ? &outs[1] : nullptr, depth, coords, c);
  return outs;
}

void dscr_refine_cache_cuda(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                            const at::Tensor& coords, double sigma_d, double sigma_s, double alpha,
                            double beta) {
  // Every tensor is validated before any is written.
  const DscrCoefs c = dscr_check("dscr_refine_cache_", keys, values, true, depth, coords, sigma_d, sigma_s, alpha,
                                 beta);
  const c10::cuda::CUDAGuard guard(keys[0].device());
  for (size_t l = 0; l < keys.size(); ++l) {
    if (keys[l].numel() == 0) continue;
    // Stream-ordered temporaries: the caching allocator reuses them for the next layer only after
    // this layer's kernel (same stream) has consumed them.
    const at::Tensor ks = keys[l].clone(at::MemoryFormat::Contiguous);
    if (values.empty()) {
      launch_dscr(ks, nullptr, keys[l], nullptr, depth, coords, c);
    } else {
      const at::Tensor vs = values[l].clone(at::MemoryFormat::Contiguous);
      launch_dscr(ks, &vs, keys[l], &values[l], depth, coords, c);
    }
  }
}

}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine", &kvfix::dscr_refine_cuda);
  m.impl("dscr_refine_cache_", &kvfix::dscr_refine_cache_checked<&kvfix::dscr_refine_cache_cuda>);
}

#endif  // !__CUDA_ARCH__
