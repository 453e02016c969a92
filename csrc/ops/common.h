// What the op files (csrc/ops/<method>.cpp) share (defined in csrc/ops/common.cpp): the float32
// limits the checks quote, the empty check of possibly symbolic sizes, and the aliasing check of
// the in-place ops. The mask check (mask_check) is declared in kvfix.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvfix.h"

namespace kvfix {

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
