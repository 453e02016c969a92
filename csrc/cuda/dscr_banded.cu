// Banded structured DSCR on CUDA: the ATen side of csrc/kernels/dscr_banded.cuh, registered here
// as the CUDA implementations of kvfix::dscr_refine_banded and kvfix::dscr_refine_banded_cache_
// (schemas and checks: csrc/ops/dscr.cpp).
//
// The structure tensors (built once per image by kvfix/dscr_structured.py and moved to the
// device once, BandedStructure.to) are read where they are: one prep kernel per call checks and
// sorts them, then one kernel launch per group of up to kDscrBandedMaxTensors tensors (every
// layer's K and V of a cache call) refines in place or into new contiguous outputs. Everything
// runs on the current stream; no host synchronisation, no ATen arithmetic.
//
// Checked: every argument by the shared check (dscr_banded_operands, as on the CPU and Meta) and
// the in-place op's aliasing (dscr_refine_banded_cache_checked); the structure's index values,
// which the host does not read on a device, by the prep kernel (an item that fails gets NaN
// outputs; the CPU op raises).
#include "kernels/dscr_banded.cuh"

template cudaError_t kvfix::kernels::dscr_banded_launch<float>(const kvfix::kernels::DscrBandedArgs&, int64_t, int64_t,
                                                               cudaStream_t);
template cudaError_t kvfix::kernels::dscr_banded_launch<__half>(const kvfix::kernels::DscrBandedArgs&, int64_t,
                                                                int64_t, cudaStream_t);
template cudaError_t kvfix::kernels::dscr_banded_launch<__nv_bfloat16>(const kvfix::kernels::DscrBandedArgs&, int64_t,
                                                                       int64_t, cudaStream_t);
template cudaError_t kvfix::kernels::dscr_banded_prep_launch<int32_t>(const kvfix::kernels::DscrBandedPrepArgs&,
                                                                      cudaStream_t);

#ifndef __CUDA_ARCH__

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "aten_view.h"
#include "ops/dscr.h"

namespace kvfix {
namespace {

using Structure = DscrBanded;

// Every check in the shared one (csrc/ops/dscr.cpp, dscr_banded_operands: the CPU and Meta kernels
// run it too; on a device it reads no index value), then what only these kernels need: int32
// indices. Returns every tensor to refine (each layer's key, then its value).
std::vector<at::Tensor> operands(const char* op, at::TensorList keys, at::TensorList values, bool cache,
                                 const Structure& s) {
  std::vector<at::Tensor> all = dscr_banded_operands(op, keys, values, cache, s);
  // int32 indices of the kernels (token positions, nodes, the workspace)
  TORCH_CHECK_VALUE(s.tok.numel() + 2 * s.row_lo.numel() + 2 * s.tok.size(0) < (int64_t(1) << 31), op,
                    ": structure too large for the CUDA kernel's int32 indices");
  return all;
}

void refine(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const Structure& st) {
  if (srcs[0].size(0) == 0 || srcs[0].size(2) == 0) return;
  const c10::cuda::CUDAGuard guard(srcs[0].device());
  std::vector<kernels::View> outs, xs;
  int64_t items = 0;
  for (size_t p = 0; p < srcs.size(); ++p) {
    outs.push_back(out_view_of(dsts[p]));  // first: an in-place target is materialised (copy-on-write)
    xs.push_back(view_of(srcs[p]));
    items += kernels::dscr_banded_items(xs.back());
  }
  const kernels::DscrBandedStructure s =
      kernels::dscr_banded_pack(view_of(st.tok), view_of(st.tokw), view_of(st.cnt), view_of(st.row_ptr),
                                view_of(st.row_lo), view_of(st.tvals), view_of(st.node_off), view_of(st.cinv),
                                view_of(st.band), st.gh);
  const int64_t smem_limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const auto opts = srcs[0].options();
  const at::Tensor iws = at::empty({kernels::dscr_banded_int_workspace(s)}, opts.dtype(at::kInt));
  const at::Tensor fws =
      at::empty({kernels::dscr_banded_float_workspace(s, items, smem_limit, 0)}, opts.dtype(at::kFloat));
  check_launch("dscr_refine_banded",
               kernels::dscr_banded_run(s, xs.data(), outs.data(), static_cast<int>(xs.size()),
                                        iws.mutable_data_ptr<int32_t>(), fws.mutable_data_ptr<float>(), smem_limit, 0,
                                        stream_of(srcs[0])));
}

std::vector<at::Tensor> dscr_refine_banded_cuda(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                const at::Tensor& tok, const at::Tensor& tokw, const at::Tensor& cnt,
                                                const at::Tensor& row_ptr, const at::Tensor& row_lo,
                                                const at::Tensor& tvals, const at::Tensor& node_off,
                                                const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  const Structure s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs = operands("dscr_refine_banded", {k}, vs, false, s);
  std::vector<at::Tensor> outs;
  for (const auto& x : srcs) outs.push_back(at::empty(x.sizes(), x.options()));
  refine(srcs, outs, s);
  return outs;
}

void dscr_refine_banded_cache_cuda(at::TensorList keys, at::TensorList values, const at::Tensor& tok,
                                   const at::Tensor& tokw, const at::Tensor& cnt, const at::Tensor& row_ptr,
                                   const at::Tensor& row_lo, const at::Tensor& tvals, const at::Tensor& node_off,
                                   const at::Tensor& cinv, const at::Tensor& band, int64_t gh) {
  const Structure s{tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band, gh};
  const std::vector<at::Tensor> all = operands("dscr_refine_banded_cache_", keys, values, true, s);
  refine(all, all, s);
}

}  // namespace
}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_cuda);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache_checked<&kvfix::dscr_refine_banded_cache_cuda>);
}

#endif  // !__CUDA_ARCH__
