// nvcuda::wmma for the kvemu SIMT emulator.
//
// Each lane holds the whole tile (fragment::x has rows*cols elements, stored row-major whatever
// the layout), so element-wise loops over `x[0 .. num_elements)` work as on the GPU, while code
// that assumes which elements a lane owns does not. Every wmma call is a warp-wide collective:
// all live lanes of the warp must reach the same call. Loads and stores check the pointer
// alignment (32 bytes) and ldm (a multiple of 16 bytes) that the hardware requires.
// mma_sync multiplies the inputs exactly (fp16/bf16 products are exact in fp32) and accumulates
// in fp32 over k in order; tf32 inputs are truncated to 10 mantissa bits.
#pragma once

#include <kvemu/emu.h>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <class Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <class T> inline float to_f(const T& v) { return static_cast<float>(v); }
template <> inline float to_f(const __half& v) { return __half2float(v); }
template <> inline float to_f(const __nv_bfloat16& v) { return __bfloat162float(v); }
template <class T> inline T from_f(float v) { return static_cast<T>(v); }
template <> inline __half from_f<__half>(float v) { return __float2half(v); }
template <> inline __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

inline float tf32_trunc(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b &= 0xFFFFE000u;
  std::memcpy(&v, &b, 4);
  return v;
}

template <class T, int M, int N, int K>
constexpr bool supported_input() {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, signed char> ||
                std::is_same_v<T, unsigned char>)
    return (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16);
  else if constexpr (std::is_same_v<T, precision::tf32>)
    return M == 16 && N == 16 && K == 8;
  else if constexpr (std::is_same_v<T, double>)
    return M == 8 && N == 8 && K == 4;
  else
    return false;
}

struct MmaMemo {  // the last mma_sync of a warp: its inputs and result, as bytes
  const void* tag = nullptr;
  std::vector<unsigned char> in, out;
};
inline MmaMemo& mma_memo(int warp) {
  static thread_local std::vector<MmaMemo> memos;
  if (static_cast<size_t>(warp) >= memos.size()) memos.resize(static_cast<size_t>(warp) + 1);
  return memos[static_cast<size_t>(warp)];
}

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what, const std::source_location& loc) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    kvemu::kernel_fail(cudaErrorMisalignedAddress,
                       std::string(what) + " at " + kvemu::detail::where_str(loc) +
                           ": the pointer is not 256-bit (32-byte) aligned");
  if ((static_cast<size_t>(ldm) * elem) % 16 != 0)
    kvemu::kernel_fail(cudaErrorMisalignedAddress,
                       std::string(what) + " at " + kvemu::detail::where_str(loc) + ": ldm=" +
                           std::to_string(ldm) + " is not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, int m, int n, int k, class T, class Layout = void>
class fragment {
  static_assert(!std::is_same_v<Use, accumulator> || std::is_void_v<Layout>,
                "kvemu wmma: give accumulator fragments no layout (load/store take a layout_t)");
  static_assert(std::is_same_v<Use, accumulator> || detail::supported_input<T, m, n, k>(),
                "kvemu wmma: unsupported input type or shape");
  static_assert(!std::is_same_v<Use, accumulator> || std::is_same_v<T, float> || std::is_same_v<T, __half> ||
                    std::is_same_v<T, int> || std::is_same_v<T, double>,
                "kvemu wmma: accumulators are float, half, int or double");

 public:
  using element_type = T;
  using storage_element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, m, n, k>::rows;
  static constexpr int cols = detail::shape<Use, m, n, k>::cols;
  static constexpr int num_elements = rows * cols;
  storage_element_type x[num_elements];
};

template <class Use, int m, int n, int k, class T, class L, class V>
inline void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v,
                          std::source_location loc = std::source_location::current()) {
  kvemu::warp_converge("wmma::fill_fragment", loc);
  using S = typename fragment<Use, m, n, k, T, L>::storage_element_type;
  const S s = static_cast<S>(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = s;
}

// matrix_a / matrix_b: the layout is part of the fragment type
template <class Use, int m, int n, int k, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const P* p, unsigned ldm,
                             std::source_location loc = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  using F = fragment<Use, m, n, k, T, L>;
  kvemu::warp_converge("wmma::load_matrix_sync", loc);
  detail::check_ptr(p, ldm, sizeof(P), "wmma::load_matrix_sync", loc);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const size_t off = std::is_same_v<L, row_major> ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
      f.x[r * F::cols + c] = p[off];
    }
}

template <int m, int n, int k, class T, class P>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& f, const P* p, unsigned ldm, layout_t layout,
                             std::source_location loc = std::source_location::current()) {
  using F = fragment<accumulator, m, n, k, T>;
  kvemu::warp_converge("wmma::load_matrix_sync", loc);
  detail::check_ptr(p, ldm, sizeof(P), "wmma::load_matrix_sync", loc);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const size_t off = layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
      f.x[r * F::cols + c] = p[off];
    }
}

template <int m, int n, int k, class T, class P>
inline void store_matrix_sync(P* p, const fragment<accumulator, m, n, k, T>& f, unsigned ldm, layout_t layout,
                              std::source_location loc = std::source_location::current()) {
  using F = fragment<accumulator, m, n, k, T>;
  kvemu::warp_converge("wmma::store_matrix_sync", loc);
  detail::check_ptr(p, ldm, sizeof(P), "wmma::store_matrix_sync", loc);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const size_t off = layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
      p[off] = f.x[r * F::cols + c];
    }
}

template <int m, int n, int k, class TA, class LA, class TB, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, m, n, k, TD>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TB, LB>& b, const fragment<accumulator, m, n, k, TC>& c,
                     bool satf = false, std::source_location loc = std::source_location::current()) {
  static_assert(std::is_same_v<TA, TB>, "kvemu wmma: matrix_a and matrix_b need the same element type");
  static_assert(!std::is_same_v<TA, __nv_bfloat16> || std::is_same_v<TC, float>,
                "kvemu wmma: bf16 inputs accumulate in float");
  kvemu::warp_converge("wmma::mma_sync", loc);
  // Every lane of a warp normally multiplies the same tiles: the first lane computes, the others
  // reuse its result when their inputs are bytewise identical (and compute their own otherwise).
  static const char tag = 0;  // one per instantiation (types and shape)
  detail::MmaMemo& memo = detail::mma_memo(kvemu::current_warp());
  constexpr size_t kIn = sizeof(a.x) + sizeof(b.x) + sizeof(c.x) + 1;
  unsigned char in[kIn];
  std::memcpy(in, a.x, sizeof(a.x));
  std::memcpy(in + sizeof(a.x), b.x, sizeof(b.x));
  std::memcpy(in + sizeof(a.x) + sizeof(b.x), static_cast<const void*>(c.x), sizeof(c.x));
  in[kIn - 1] = satf ? 1 : 0;
  if (memo.tag == &tag && memo.in.size() == kIn && std::memcmp(memo.in.data(), in, kIn) == 0) {
    std::memcpy(static_cast<void*>(d.x), memo.out.data(), sizeof(d.x));
    return;
  }
  using Acc = std::conditional_t<std::is_same_v<TC, double> || std::is_same_v<TA, double>, double,
                                 std::conditional_t<std::is_same_v<TC, int>, long long, float>>;
  using In = std::conditional_t<std::is_same_v<Acc, float>, float, Acc>;  // inputs, converted once
  In fa[m * k], fb[k * n];
  for (int e = 0; e < m * k; ++e) {
    if constexpr (std::is_same_v<TA, precision::tf32>) fa[e] = detail::tf32_trunc(a.x[e]);
    else if constexpr (std::is_same_v<In, float>) fa[e] = detail::to_f(a.x[e]);
    else fa[e] = static_cast<In>(a.x[e]);
  }
  for (int e = 0; e < k * n; ++e) {
    if constexpr (std::is_same_v<TA, precision::tf32>) fb[e] = detail::tf32_trunc(b.x[e]);
    else if constexpr (std::is_same_v<In, float>) fb[e] = detail::to_f(b.x[e]);
    else fb[e] = static_cast<In>(b.x[e]);
  }
  Acc out[m * n];
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      Acc acc;
      if constexpr (std::is_same_v<Acc, float>) acc = detail::to_f(c.x[i * n + j]);
      else acc = static_cast<Acc>(c.x[i * n + j]);
      for (int kk = 0; kk < k; ++kk) {
        if constexpr (std::is_same_v<Acc, long long>) acc += fa[i * k + kk] * fb[kk * n + j];
        else acc = std::fma(fa[i * k + kk], fb[kk * n + j], acc);
      }
      out[i * n + j] = acc;
    }
  for (int i = 0; i < m * n; ++i) {
    if constexpr (std::is_same_v<TD, int>) {
      d.x[i] = static_cast<int>(std::clamp<long long>(out[i], INT32_MIN, INT32_MAX));
    } else {
      float v = static_cast<float>(out[i]);
      if (satf) v = __saturatef(v);
      if constexpr (std::is_same_v<TD, double>) d.x[i] = out[i];
      else d.x[i] = detail::from_f<TD>(v);
    }
  }
  memo.tag = &tag;
  memo.in.assign(in, in + kIn);
  memo.out.resize(sizeof(d.x));
  std::memcpy(memo.out.data(), static_cast<const void*>(d.x), sizeof(d.x));
}

}  // namespace wmma
}  // namespace nvcuda

// tf32 conversion (round to nearest, ties away from zero, to 10 mantissa bits)
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b = (b + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &b, 4);
  return v;
}
