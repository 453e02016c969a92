// C ABI entry points of emulated kernel modules, called from Python through ctypes
// (tests/emu/kvemu_build.py). An entry receives its arguments as an array of `kvemu_arg`
// (tensors: data pointer, dtype, sizes and strides in elements; numbers; None) and returns a
// cudaError_t; on failure `kvemu_last_error()` holds the report.
//
//   #include <kvemu/shim.h>
//   #include "kernels/foo.cuh"
//
//   KVEMU_ENTRY(foo, args) {                   // exported as kvemu_entry_foo
//     kvfix::kernels::FooArgs a{};
//     a.x = args.data<float>(0);               // checks that argument 0 is a float32 tensor
//     a.n = args.size(0, 0);
//     a.scale = static_cast<float>(args.f(1));
//     return kvfix::kernels::foo_launch(a, nullptr);
//   }
//
// kvfix's shims (tests/emu/shims) hand their arguments to the kernels' own packing functions
// through tests/emu/shims/views.h, and pick the element type with kvfix::kernels::dispatch_float,
// exactly as csrc/cuda/*.cu do.
#pragma once

#include <kvemu/emu.h>

#include <cstdint>
#include <stdexcept>
#include <string>

extern "C" {
struct kvemu_arg {
  int32_t kind;   // 0 none, 1 tensor, 2 float, 3 int
  int32_t dtype;  // kvemu::shim::DType
  int32_t ndim;
  int32_t reserved;
  void* data;
  double f;
  int64_t i;
  int64_t sizes[8];
  int64_t strides[8];  // in elements
};
}

namespace kvemu::shim {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5, kU8 = 6, kI8 = 7, kI16 = 8, kBool = 9 };

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return kF32; }
template <> constexpr DType dtype_of<__half>() { return kF16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return kBF16; }
template <> constexpr DType dtype_of<double>() { return kF64; }
template <> constexpr DType dtype_of<int32_t>() { return kI32; }
template <> constexpr DType dtype_of<int64_t>() { return kI64; }
template <> constexpr DType dtype_of<uint8_t>() { return kU8; }
template <> constexpr DType dtype_of<int8_t>() { return kI8; }
template <> constexpr DType dtype_of<int16_t>() { return kI16; }
template <> constexpr DType dtype_of<bool>() { return kBool; }

struct ArgError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Args {
 public:
  Args(const kvemu_arg* a, int n) : a_(a), n_(n) {}
  int count() const { return n_; }
  const kvemu_arg& at(int i) const {
    if (i < 0 || i >= n_) throw ArgError("argument " + std::to_string(i) + " missing (" + std::to_string(n_) + " given)");
    return a_[i];
  }
  bool none(int i) const { return at(i).kind == 0; }
  const kvemu_arg& tensor(int i) const {
    const kvemu_arg& t = at(i);
    if (t.kind != 1) throw ArgError("argument " + std::to_string(i) + " is not a tensor");
    return t;
  }
  DType dtype(int i) const { return static_cast<DType>(tensor(i).dtype); }
  int ndim(int i) const { return tensor(i).ndim; }
  int64_t size(int i, int dim) const {
    const kvemu_arg& t = tensor(i);
    if (dim < 0) dim += t.ndim;
    if (dim < 0 || dim >= t.ndim) throw ArgError("argument " + std::to_string(i) + " has no dim " + std::to_string(dim));
    return t.sizes[dim];
  }
  int64_t stride(int i, int dim) const {
    const kvemu_arg& t = tensor(i);
    if (dim < 0) dim += t.ndim;
    if (dim < 0 || dim >= t.ndim) throw ArgError("argument " + std::to_string(i) + " has no dim " + std::to_string(dim));
    return t.strides[dim];
  }
  // The data pointer of tensor argument i, checked against T (nullptr for None).
  template <class T>
  T* data(int i) const {
    if (none(i)) return nullptr;
    const kvemu_arg& t = tensor(i);
    if (t.dtype != dtype_of<std::remove_const_t<T>>())
      throw ArgError("argument " + std::to_string(i) + " has dtype code " + std::to_string(t.dtype) +
                     ", the entry expects " + std::to_string(dtype_of<std::remove_const_t<T>>()));
    return static_cast<T*>(t.data);
  }
  double f(int i) const {
    const kvemu_arg& t = at(i);
    if (t.kind == 2) return t.f;
    if (t.kind == 3) return static_cast<double>(t.i);
    throw ArgError("argument " + std::to_string(i) + " is not a number");
  }
  int64_t i(int idx) const {
    const kvemu_arg& t = at(idx);
    if (t.kind != 3) throw ArgError("argument " + std::to_string(idx) + " is not an integer");
    return t.i;
  }

 private:
  const kvemu_arg* a_;
  int n_;
};

inline std::string& error_text() {
  static thread_local std::string s;
  return s;
}

template <class F>
int invoke(const char* name, F&& f, const kvemu_arg* a, int n) {
  error_text().clear();
  try {
    const cudaError_t e = f(Args(a, n));
    if (e != cudaSuccess) {
      const std::string& rep = last_report();
      error_text() = std::string(name) + ": " + cudaGetErrorName(e) + (rep.empty() ? "" : "\n" + rep);
    }
    return static_cast<int>(e);
  } catch (const std::exception& ex) {
    error_text() = std::string(name) + ": bad arguments: " + ex.what();
    return -1;
  }
}

}  // namespace kvemu::shim

#define KVEMU_EXPORT extern "C" __attribute__((visibility("default"), used))

// Defines the entry `kvemu_entry_<name>`; the body sees `const kvemu::shim::Args& args_name`
// and returns a cudaError_t.
#define KVEMU_ENTRY(name, args_name)                                                            \
  static cudaError_t kvemu_impl_##name(const ::kvemu::shim::Args& args_name);                    \
  KVEMU_EXPORT int kvemu_entry_##name(const kvemu_arg* a, int n) {                               \
    return ::kvemu::shim::invoke(#name, kvemu_impl_##name, a, n);                                \
  }                                                                                              \
  static cudaError_t kvemu_impl_##name(const ::kvemu::shim::Args& args_name)

// Module-wide exports (defined once per module: a module is one shim translation unit).
KVEMU_EXPORT const char* kvemu_last_error() { return ::kvemu::shim::error_text().c_str(); }
KVEMU_EXPORT void kvemu_set_seed(long long seed) { ::kvemu::set_seed(seed); }
KVEMU_EXPORT long long kvemu_current_seed() { return static_cast<long long>(::kvemu::current_seed()); }
KVEMU_EXPORT int kvemu_is_asan() { return KVEMU_ASAN; }
KVEMU_EXPORT void kvemu_reset() { ::kvemu::reset(); }
KVEMU_EXPORT void kvemu_set_quiet(int q) { ::kvemu::set_quiet(q); }
KVEMU_EXPORT long long kvemu_grids_run() { return static_cast<long long>(::kvemu::grids_run()); }
