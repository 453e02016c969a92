// KVSmooth (METHODS §2): the schemas of row_entropy, kvsmooth_step_ and kvsmooth_steps_, their
// checks (stated once), Meta kernels and CPU registrations (csrc/cpu/kvsmooth.cpp; the CUDA kernels
// register themselves in csrc/cuda/kvsmooth.cu).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "ops/kvsmooth.h"

namespace kvfix {

// Every check of row_entropy / kvsmooth_step_, stated once: the CPU and CUDA implementations and
// the Meta kernel (torch.compile, FakeTensor, meta tensors) call it; the Python wrappers only
// convert arguments. Errors name the argument: ValueError (shape, device, range), TypeError (dtype).
MaskView kvsmooth_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                       const at::Tensor* queue, const std::optional<at::Tensor>& mask) {
  const char* kn = queue != nullptr ? "k_cache" : "k";
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1, op, ": q must be [B, Hq, 1, D] (a single-token query), got shape ",
                    q.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16, op,
                   ": q must be float32, float16 or bfloat16, got ", qt);
  TORCH_CHECK_VALUE(q.size(3) <= 1 || q.stride(3) == 1, op, ": q needs a contiguous last dimension (stride ",
                    q.stride(3), ")");
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": ", kn, " must be [B, Hkv, T, D], got shape ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == qt, op, ": ", kn, " dtype ", k.scalar_type(), " does not match q dtype ", qt);
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": ", kn, " is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(k.size(3) <= 1 || k.stride(3) == 1, op, ": ", kn, " needs a contiguous last dimension (stride ",
                    k.stride(3), ")");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": ", kn, " shape ", k.sizes(), " does not match q shape ",
                    q.sizes(), " (same B and head dim D expected)");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, ": the query heads of q (", Hq,
                    ") must be a multiple of the kv heads of ", kn, " (", Hkv, ")");
  TORCH_CHECK_VALUE(T >= 1, op, ": ", kn, " needs at least one position (T >= 1), got shape ", k.sizes());
  if (v != nullptr) {
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), op, ": v_cache shape ", v->sizes(), " does not match k_cache shape ",
                      k.sizes());
    TORCH_CHECK_TYPE(v->scalar_type() == k.scalar_type(), op, ": v_cache dtype ", v->scalar_type(),
                     " does not match k_cache dtype ", k.scalar_type());
    TORCH_CHECK_VALUE(v->device() == k.device(), op, ": v_cache is on ", v->device(), " but k_cache is on ",
                      k.device());
    TORCH_CHECK_VALUE(v->size(3) <= 1 || v->stride(3) == 1, op,
                      ": v_cache needs a contiguous last dimension (stride ", v->stride(3), ")");
  }
  if (queue != nullptr) {
    TORCH_CHECK_VALUE(queue->dim() == 2 && queue->size(0) == B && queue->size(1) >= 1, op,
                      ": queue must be [B, M] with B=", B, " and M >= 1, got shape ", queue->sizes());
    TORCH_CHECK_TYPE(queue->scalar_type() == at::kFloat, op, ": queue must be float32, got ", queue->scalar_type());
    TORCH_CHECK_VALUE(queue->device() == q.device(), op, ": queue is on ", queue->device(), " but q is on ",
                      q.device());
  }
  const int64_t want[4] = {B, 1, 1, T};
  return mask_check(op, mask, q, want, "B, 1, 1, T", " (a 2-D [B, T] padding mask: pass mask[:, None, None, :])");
}

float kvsmooth_scale(std::optional<double> scale, int64_t D) {
  if (!scale.has_value()) return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D > 0 ? D : 1)));
  TORCH_CHECK_VALUE(std::isfinite(*scale), "scale must be finite, got ", *scale);
  return static_cast<float>(*scale);
}

void kvsmooth_check_lam(double lam_ref, double band) {
  TORCH_CHECK_VALUE(std::isfinite(lam_ref) && lam_ref >= 0 && lam_ref <= 1,
                    "kvsmooth_step_: lam_ref must be in [0, 1], got ", lam_ref);
  TORCH_CHECK_VALUE(std::isfinite(band) && band >= 0, "kvsmooth_step_: band must be finite and >= 0, got ", band);
}

void kvsmooth_check_position(const std::optional<at::Tensor>& position, const at::Tensor& q) {
  if (!position.has_value()) return;
  TORCH_CHECK_TYPE(position->scalar_type() == at::kLong, "kvsmooth_step_: position must be int64 (a cache position, "
                   "e.g. transformers' cache_position), got ", position->scalar_type());
  TORCH_CHECK_VALUE(position->numel() == 1, "kvsmooth_step_: position must hold one value (the current token's cache "
                    "position, shared by the batch), got shape ", position->sizes());
  TORCH_CHECK_VALUE(position->device() == q.device(), "kvsmooth_step_: position is on ", position->device(),
                    " but q is on ", q.device());
}

std::vector<MaskView> kvsmooth_steps_check(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache,
                                           at::TensorList queue, at::ArrayRef<double> scale,
                                           const c10::List<std::optional<at::Tensor>>& mask, double lam_ref,
                                           double band) {
  const size_t L = q.size();
  TORCH_CHECK_VALUE(k_cache.size() == L && v_cache.size() == L && queue.size() == L && scale.size() == L &&
                        mask.size() == L,
                    "kvsmooth_steps_: q, k_cache, v_cache, queue, scale and mask need one entry per layer, got ",
                    L, ", ", k_cache.size(), ", ", v_cache.size(), ", ", queue.size(), ", ", scale.size(), " and ",
                    mask.size());
  TORCH_CHECK_VALUE(L >= 1, "kvsmooth_steps_: needs at least one layer");
  kvsmooth_check_lam(lam_ref, band);
  TensorRefs outputs, inputs;
  std::vector<std::optional<at::Tensor>> masks(L);
  std::vector<MaskView> views(L);
  for (size_t i = 0; i < L; ++i) {
    masks[i] = mask.get(i);
    try {
      views[i] = kvsmooth_check("kvsmooth_step_", q[i], k_cache[i], &v_cache[i], &queue[i], masks[i]);
      kvsmooth_scale(scale[i], q[i].size(3));
    } catch (const c10::TypeError& e) {
      TORCH_CHECK_TYPE(false, "kvsmooth_steps_: layer ", i, ": ", e.msg());
    } catch (const c10::ValueError& e) {
      TORCH_CHECK_VALUE(false, "kvsmooth_steps_: layer ", i, ": ", e.msg());
    }
    TORCH_CHECK_VALUE(q[i].size(0) == q[0].size(0), "kvsmooth_steps_: layer ", i, ": q has batch size ",
                      q[i].size(0), " but layer 0's has ", q[0].size(0), " (one lam row [B] per layer)");
    TORCH_CHECK_VALUE(q[i].device() == q[0].device(), "kvsmooth_steps_: layer ", i, ": q is on ", q[i].device(),
                      " but layer 0's is on ", q[0].device(), " (lam [L, B] is on one device)");
    const std::string at = "[" + std::to_string(i) + "]";
    outputs.emplace_back("k_cache" + at, &k_cache[i]);
    outputs.emplace_back("v_cache" + at, &v_cache[i]);
    outputs.emplace_back("queue" + at, &queue[i]);
    inputs.emplace_back("q" + at, &q[i]);
    inputs.emplace_back("mask" + at, masks[i].has_value() ? &*masks[i] : nullptr);
  }
  check_no_overlap("kvsmooth_steps_", outputs, inputs);
  return views;
}

// Meta (torch.compile / FakeTensor / meta tensors): the same checks, outputs of the right shape.
static at::Tensor row_entropy_meta(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                                   const std::optional<at::Tensor>& mask) {
  kvsmooth_check("row_entropy", q, k, nullptr, nullptr, mask);
  kvsmooth_scale(scale, q.size(3));
  return at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
}

static at::Tensor kvsmooth_step_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& queue, std::optional<double> scale,
                                     const std::optional<at::Tensor>& mask, double lam_ref, double band,
                                     const std::optional<at::Tensor>& position) {
  kvsmooth_check_lam(lam_ref, band);
  kvsmooth_check("kvsmooth_step_", q, k_cache, &v_cache, &queue, mask);
  kvsmooth_check_position(position, q);
  kvsmooth_scale(scale, q.size(3));
  return at::empty({q.size(0)}, q.options().dtype(at::kFloat));
}

static at::Tensor kvsmooth_steps_meta(at::TensorList q, at::TensorList k_cache, at::TensorList v_cache,
                                      at::TensorList queue, at::ArrayRef<double> scale,
                                      const c10::List<std::optional<at::Tensor>>& mask, double lam_ref, double band) {
  const size_t L = kvsmooth_steps_check(q, k_cache, v_cache, queue, scale, mask, lam_ref, band).size();
  return at::empty({static_cast<int64_t>(L), q[0].size(0)}, q[0].options().dtype(at::kFloat));
}

}  // namespace kvfix

TORCH_LIBRARY_FRAGMENT(kvfix, m) {
  m.def("row_entropy(Tensor q, Tensor k, float? scale, Tensor? mask) -> Tensor");
  m.def("kvsmooth_step_(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) queue, float? scale, "
        "Tensor? mask, float lam_ref, float band, Tensor? position=None) -> Tensor");
  m.def("kvsmooth_steps_(Tensor[] q, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor(c!)[] queue, float[] scale, "
        "Tensor?[] mask, float lam_ref, float band) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvfix, CPU, m) {
  m.impl("row_entropy", &kvfix::row_entropy_cpu);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_checked<&kvfix::kvsmooth_step_cpu>);
  m.impl("kvsmooth_steps_", &kvfix::kvsmooth_steps_checked<&kvfix::kvsmooth_steps_cpu>);
}

TORCH_LIBRARY_IMPL(kvfix, Meta, m) {
  m.impl("row_entropy", &kvfix::row_entropy_meta);
  m.impl("kvsmooth_step_", &kvfix::kvsmooth_step_meta);
  m.impl("kvsmooth_steps_", &kvfix::kvsmooth_steps_meta);
}
