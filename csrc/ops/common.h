// What the methods share (defined in csrc/ops/common.cpp): the mask view and its check, the float32
// limits the checks quote, the empty check of possibly symbolic sizes, and the aliasing check of
// the in-place ops. Each method's own signatures are in its csrc/ops/<method>.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/view.h"

namespace kvfix {

// A broadcast attention mask as every kernel reads it (csrc/kernels/view.h): element (b, h, i, t)
// at data + b*sb + h*sh + i*si + t*st, 0 strides where broadcast; kind 0 none, 1 bool (True =
// attend), 2/3/4 additive float32/float16/bfloat16 (-inf = masked). Built once, by mask_check.
using MaskView = kernels::MaskView;

// The one check of a mask argument: bool or additive float, on q's device, broadcastable (up to
// 4 dims, right-aligned) to `want` ([B, H, Tq, T]; `dims` names them in the message, e.g.
// "B, 1, 1, T"). Returns its view (data null for meta tensors: checks only); kind 0 for None.
MaskView mask_check(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q, const int64_t want[4],
                    const char* dims, const char* hint = "");

// The logit scale of KVSmooth and CMAC's attention (default 1 / sqrt(D)), finite; defined in
// csrc/ops/kvsmooth.cpp.
float kvsmooth_scale(std::optional<double> scale, int64_t D);

constexpr double kFloatMax = std::numeric_limits<float>::max();
constexpr double kFloatMinNormal = std::numeric_limits<float>::min();

// x has elements; sizes may be symbolic (the Meta kernels under torch.compile's dynamic shapes,
// where numel() would throw): a guard on the symbolic count.
inline bool nonempty(const at::Tensor& x) { return x.sym_numel() != 0; }

// Named tensors of an op, for its messages (null or undefined entries are skipped).
using TensorRefs = std::vector<std::pair<std::string, const at::Tensor*>>;

// The aliasing check of the in-place ops (dscr_refine_cache_ and the structured DSCR cache ops,
// kvsmooth_step_, scr_redistribute_): their outputs must not overlap themselves (a stride-0
// `expand`), each other (the same view twice, keys that are the values) or an input the kernels
// read while writing, as torch's own in-place ops refuse; ValueError naming the first offending
// pair in argument order. Metadata only (sizes, strides, addresses): nothing is read, so nothing
// synchronises; meta / fake tensors (no addresses) pass. The ops' CPU and CUDA registrations call
// it before anything is written.
void check_no_overlap(const char* op, const TensorRefs& outputs, const TensorRefs& inputs);

// keys[i] / values[i] of a DSCR cache op, as named tensors.
TensorRefs layer_refs(at::TensorList keys, at::TensorList values);

}  // namespace kvfix
