// Banded structured DSCR on CUDA: the ATen side of csrc/kernels/dscr_banded.cuh, registered here
// as the CUDA implementations of kvfix::dscr_refine_banded and kvfix::dscr_refine_banded_cache_
// (schemas: csrc/cpu/dscr_banded.cpp).
//
// The structure tensors (built once per image by kvfix/dscr_structured.py and moved to the
// device once, BandedStructure.to) are read where they are: one prep kernel per call checks and
// sorts them, then one kernel launch per group of up to kDscrBandedMaxTensors tensors (every
// layer's K and V of a cache call) refines in place or into new contiguous outputs. Everything
// runs on the current stream; no host synchronisation, no ATen arithmetic.
//
// Checked here: what the kernels' memory safety needs from the host side (devices, dtypes,
// contiguity and the shapes they index); the structure's index values are checked on the device
// by the prep kernel (an item that fails gets NaN outputs; the CPU op raises).
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

namespace kvfix {
namespace {

struct Structure {
  at::Tensor tok, tokw, cnt, row_ptr, row_lo, tvals, node_off, cinv, band;
  int64_t gh;
};

// Host-side checks the kernels' memory safety needs; returns every tensor to refine (keys, then
// each layer's values, as the CPU op orders them).
std::vector<at::Tensor> operands(const char* op, at::TensorList keys, at::TensorList values, const Structure& s) {
  TORCH_CHECK(!keys.empty(), op, ": needs at least one key tensor");
  TORCH_CHECK(values.empty() || values.size() == keys.size(), op, ": values must be empty or one per key");
  const at::Device dev = keys[0].device();
  std::vector<at::Tensor> all;
  for (size_t l = 0; l < keys.size(); ++l) {
    for (const at::Tensor* t : {&keys[l], values.empty() ? nullptr : &values[l]}) {
      if (t == nullptr) continue;
      TORCH_CHECK(t->dim() == 4 && t->sizes() == keys[l].sizes() && t->device() == dev, op,
                  ": k and v must be [B, H, N, D] tensors of one shape per layer, all on ", dev);
      TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16,
                  op, ": k and v must be float32, float16 or bfloat16");
      TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op, ": k and v need a contiguous last dim");
      TORCH_CHECK(t->size(0) == keys[0].size(0) && t->size(2) == keys[0].size(2), op,
                  ": every layer needs the same B and N");
      all.push_back(*t);
    }
  }
  const int64_t B = keys[0].size(0), N = keys[0].size(2);
  TORCH_CHECK(s.gh >= 1 && N % s.gh == 0, op, ": gh=", s.gh, " does not divide N=", N);
  auto is = [&](const at::Tensor& t, at::ScalarType st) {
    return t.scalar_type() == st && t.is_contiguous() && t.device() == dev;
  };
  TORCH_CHECK(is(s.tok, at::kInt) && is(s.cnt, at::kInt) && is(s.row_lo, at::kInt) && is(s.row_ptr, at::kLong) &&
                  is(s.node_off, at::kLong) && is(s.tokw, at::kFloat) && is(s.tvals, at::kFloat) &&
                  is(s.cinv, at::kFloat) && is(s.band, at::kFloat),
              op, ": the structure tensors must be contiguous tensors of the documented dtypes on ", dev,
              " (kvfix/dscr_structured.py, BandedStructure.to)");
  TORCH_CHECK(s.tok.dim() == 2 && s.tokw.dim() == 3 && s.cnt.dim() == 1 && s.row_ptr.dim() == 1 &&
                  s.row_lo.dim() == 1 && s.tvals.dim() == 1 && s.node_off.dim() == 1 && s.band.dim() == 1,
              op, ": structure tensors of the wrong rank");
  const int64_t Bd = s.tok.size(0);
  TORCH_CHECK((Bd == 1 || Bd == B) && s.tok.size(1) == N && s.cinv.sizes() == s.tok.sizes() &&
                  s.tokw.size(0) == Bd && s.tokw.size(1) == N && s.tokw.size(2) >= 1 && s.cnt.numel() == Bd &&
                  s.node_off.numel() == Bd + 1 && s.band.numel() >= 1 && s.row_ptr.numel() == s.row_lo.numel() + 1,
              op, ": structure shapes do not match B=", B, ", N=", N);
  // int32 indices of the kernels (token positions, nodes, the workspace)
  TORCH_CHECK(Bd * N + 2 * s.row_lo.numel() + 2 * Bd < (int64_t(1) << 31), op,
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
  const std::vector<at::Tensor> srcs = operands("dscr_refine_banded", {k}, vs, s);
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
  const std::vector<at::Tensor> all = operands("dscr_refine_banded_cache_", keys, values, s);
  refine(all, all, s);
}

}  // namespace
}  // namespace kvfix

TORCH_LIBRARY_IMPL(kvfix, CUDA, m) {
  m.impl("dscr_refine_banded", &kvfix::dscr_refine_banded_cuda);
  m.impl("dscr_refine_banded_cache_", &kvfix::dscr_refine_banded_cache_cuda);
}

#endif  // !__CUDA_ARCH__
