// The kvfix extension module and what every method's op file (csrc/ops/<method>.cpp) shares: the
// one TORCH_LIBRARY(kvfix) (each method adds its schemas as a TORCH_LIBRARY_FRAGMENT), the mask
// check and the in-place ops' aliasing check.
#ifndef KVFIX_NO_PYTHON_MODULE
#include <Python.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "ops/common.h"

#ifndef KVFIX_NO_PYTHON_MODULE
// `import kvfix._C` loads this library, which registers the ops (csrc/ops/*.cpp) with the dispatcher.
// (CMake builds the same ops without it, for the C++ tests.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

// The namespace, claimed once; the schemas are in the method files.
TORCH_LIBRARY(kvfix, m) {}

namespace kvfix {

MaskView mask_check(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q, const int64_t want[4],
                    const char* dims, const char* hint) {
  if (!mask.has_value()) return MaskView{};
  const at::Tensor& mk = *mask;
  const auto st = mk.scalar_type();
  TORCH_CHECK_TYPE(st == at::kBool || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": mask must be bool (True = attend) or float32/float16/bfloat16 (additive), got ", st);
  TORCH_CHECK_VALUE(mk.device() == q.device(), op, ": mask is on ", mk.device(), " but q is on ", q.device());
  kernels::View v;
  bool ok = mk.dim() >= 1 && mk.dim() <= 4;
  if (ok) {
    v.ndim = static_cast<int>(mk.dim());
    for (int i = 0; i < v.ndim; ++i) {
      v.sizes[i] = mk.size(i);
      v.strides[i] = mk.stride(i);
      const int64_t w = want[4 - v.ndim + i];
      ok = ok && (v.sizes[i] == w || v.sizes[i] == 1);
    }
  }
  TORCH_CHECK_VALUE(ok, op, ": mask must be broadcastable to [", dims, "] = [", want[0], ", ", want[1], ", ", want[2],
                    ", ", want[3], "], got shape ", mk.sizes(), hint);
  v.dtype = st == at::kBool ? kernels::DType::kBool : st == at::kFloat ? kernels::DType::kF32
            : st == at::kHalf ? kernels::DType::kF16 : kernels::DType::kBF16;
  if (!mk.is_meta()) v.data = const_cast<void*>(mk.const_data_ptr());  // meta / fake tensors: checks only
  return kernels::mask_view(v);
}

// ---------------------------------------------------------------------------------------------
// The aliasing check of the in-place ops (ops/common.h).

namespace {

using Dims = std::vector<std::pair<int64_t, int64_t>>;  // (stride, size) with size > 1

// x's dims of size > 1 by increasing stride, when each stride exceeds everything the smaller ones
// reach (x's elements are then distinct and every difference of two offsets has one signed-digit
// expansion per dim); false otherwise.
bool nested_dims(const at::Tensor& x, Dims& dims) {
  dims.clear();
  for (int64_t i = 0; i < x.dim(); ++i)
    if (x.size(i) > 1) dims.emplace_back(x.stride(i), x.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset reachable with the dims of smaller stride
  for (const auto& [s, n] : dims) {
    if (s <= reach) return false;
    reach += s * (n - 1);
  }
  return true;
}

// f(offset) for every element of x (offsets in elements from x's first element).
template <class F>
void for_each_offset(const at::Tensor& x, const F& f) {
  const int64_t nd = x.dim();
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  const int64_t numel = x.numel();
  int64_t off = 0;
  for (int64_t e = 0; e < numel; ++e) {
    f(off);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < x.size(d)) {
        off += x.stride(d);
        break;
      }
      off -= x.stride(d) * (x.size(d) - 1);
      idx[d] = 0;
    }
  }
}

// Whether two elements of x share memory (e.g. a stride-0 `expand`).
bool has_internal_overlap(const at::Tensor& x) {
  Dims dims;
  if (nested_dims(x, dims)) return false;
  for (int64_t i = 0; i < x.dim(); ++i)
    if (x.size(i) > 1 && x.stride(i) == 0) return true;
  std::vector<int64_t> offs;  // an exotic layout: look for a repeated offset
  offs.reserve(static_cast<size_t>(x.numel()));
  for_each_offset(x, [&](int64_t o) { offs.push_back(o); });
  std::sort(offs.begin(), offs.end());
  return std::adjacent_find(offs.begin(), offs.end()) != offs.end();
}

// Whether delta = sum_d e_d s_d with |e_d| < n_d, for nested dims[0, count) (at most two digits
// fit each dim, so the search is tiny).
bool is_offset_difference(int64_t delta, const Dims& dims, size_t count) {
  if (count == 0) return delta == 0;
  const auto [s, n] = dims[count - 1];
  int64_t reach = 0;
  for (size_t j = 0; j + 1 < count; ++j) reach += dims[j].first * (dims[j].second - 1);
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); };
  const int64_t lo = std::max(-(n - 1), -floor_div(reach - delta, s));
  const int64_t hi = std::min(n - 1, floor_div(delta + reach, s));
  for (int64_t e = lo; e <= hi; ++e)
    if (is_offset_difference(delta - e * s, dims, count - 1)) return true;
  return false;
}

std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& x) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  int64_t last = 0;
  for (int64_t i = 0; i < x.dim(); ++i) last += (x.size(i) - 1) * x.stride(i);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(x.element_size()))};
}

// Whether a and b share a byte (interleaved views, e.g. k and v of a fused buffer, do not).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [alo, ahi] = byte_span(a);
  const auto [blo, bhi] = byte_span(b);
  if (ahi <= blo || bhi <= alo) return false;
  Dims dims;
  if (a.sizes() == b.sizes() && a.strides() == b.strides() && a.element_size() == b.element_size() &&
      nested_dims(a, dims)) {
    // One layout (e.g. k and v of one cache): element x of a and y of b share a byte iff
    // (x - y) * size lies within one element of the two tensors' distance.
    const int64_t size = static_cast<int64_t>(a.element_size());
    const int64_t gap = static_cast<int64_t>(blo - alo);  // two's complement: negative when b starts first
    const int64_t fl = gap / size - ((gap % size != 0 && gap < 0) ? 1 : 0);
    const int64_t cl = fl + (gap % size != 0 ? 1 : 0);
    return is_offset_difference(fl, dims, dims.size()) || (cl != fl && is_offset_difference(cl, dims, dims.size()));
  }
  // Anything else: mark the bytes of a within the common range, then look for b's.
  const uintptr_t lo = std::max(alo, blo), hi = std::min(ahi, bhi);
  std::vector<bool> mark(hi - lo, false);
  auto bytes_of = [&](const at::Tensor& x, bool set, bool& hit) {
    const int64_t es = static_cast<int64_t>(x.element_size());
    const intptr_t base = static_cast<intptr_t>(reinterpret_cast<uintptr_t>(x.const_data_ptr()) - lo);
    for_each_offset(x, [&](int64_t o) {
      for (int64_t c = 0; c < es; ++c) {
        const intptr_t p = base + o * es + c;
        if (p < 0 || p >= static_cast<intptr_t>(hi - lo)) continue;
        if (set) mark[p] = true;
        else if (mark[p]) hit = true;
      }
    });
  };
  bool hit = false;
  bytes_of(a, true, hit);
  bytes_of(b, false, hit);
  return hit;
}

struct Named {
  std::string name;
  const at::Tensor* t;
  bool output;
  uintptr_t lo, hi;
};

}  // namespace

void check_no_overlap(const char* op, const TensorRefs& outputs, const TensorRefs& inputs) {
  std::vector<Named> all;
  for (int pass = 0; pass < 2; ++pass)
    for (const auto& [name, t] : pass == 0 ? outputs : inputs) {
      if (t == nullptr || !t->defined()) continue;
      if (t->is_meta() || !t->has_storage()) return;  // no addresses (meta, FakeTensor)
      all.push_back({name, t, pass == 0, 0, 0});
    }
  for (const Named& x : all) {
    if (!x.output) break;
    if (has_internal_overlap(*x.t)) {
      TORCH_CHECK_VALUE(false, op, ": ", x.name, " has elements that share memory (e.g. a stride-0 expand(), strides ",
                        x.t->strides(), "): an in-place op needs distinct elements; pass a .clone()");
    }
  }
  // Sweep over the byte ranges in address order: only pairs whose ranges intersect are compared
  // (dscr_refine_cache_ gets tens of layers). The first offending pair in argument order is named.
  std::vector<size_t> order;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].t->numel() == 0) continue;
    std::tie(all[i].lo, all[i].hi) = byte_span(*all[i].t);
    order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return all[a].lo != all[b].lo ? all[a].lo < all[b].lo : a < b;
  });
  std::pair<size_t, size_t> first{all.size(), all.size()};
  for (size_t x = 0; x < order.size(); ++x) {
    for (size_t y = x + 1; y < order.size(); ++y) {
      const Named &a = all[order[x]], &b = all[order[y]];
      if (b.lo >= a.hi) break;
      if (!(a.output || b.output) || !overlaps(*a.t, *b.t)) continue;
      const std::pair<size_t, size_t> hit{std::min(order[x], order[y]), std::max(order[x], order[y])};
      first = std::min(first, hit);
    }
  }
  TORCH_CHECK_VALUE(first.first == all.size(), op, ": ", all[first.second].name, " overlaps ",
                    all[first.first < all.size() ? first.first : 0].name,
                    " in memory: an in-place op's outputs must not share memory with each other or with its inputs");
}

TensorRefs layer_refs(at::TensorList keys, at::TensorList values) {
  TensorRefs out;
  for (size_t i = 0; i < keys.size(); ++i) out.emplace_back("keys[" + std::to_string(i) + "]", &keys[i]);
  for (size_t i = 0; i < values.size(); ++i) out.emplace_back("values[" + std::to_string(i) + "]", &values[i]);
  return out;
}

}  // namespace kvfix
