// Structured DSCR on the CPU (kvfix/dscr_structured.py): the refinement with factored weights.
//
// Per block of kW feature columns (kW consecutive head dims of one head of one batch item of
// K or V) the block X [N, kW] is gathered once as float32 (N * kW * 4 bytes: 37 KiB at N = 576,
// 1 MiB at N = 16384, so it stays in L1 / L2), then, without leaving the cache:
//   Z1[a] = Rc^T X[a, :]           (reduce each grid row along w: [gh, pc, kW])
//   P     = U^T X                  (depth factors, same pass over X: [r, kW])
//   Z2    = Rr^T Z1                (reduce along h: [pr, pc, kW])
//   Z3    = Lr Z2                  (expand along h: [gh, pc, kW])
//   y_i   = Lc[w] Z3[a] + U[i] P - 2 x_i,  out_i = cinv_i > 0 ? y_i * cinv_i : x_i
// and written once in the input dtype. K and V are read once and written once; the factors
// (a few KiB) stay in cache. Blocks are independent, so the in-place op needs no copy: each
// block is read completely before any of it is written. Parallel over blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <vector>

#include "kvfix.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVFIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVFIX_CPU_CLONES
#endif

namespace kvfix {
namespace {

constexpr int64_t kW = 16;  // feature columns per block: one AVX-512 register of float32
constexpr int kMaxUnrolled = 16;  // factor widths up to this keep their operands in registers

// 16 float32 lanes (GCC vector extension: one zmm with AVX-512, two ymm with AVX2). Every
// pointer given to ld / st is 64-byte aligned (blocks of kW floats in aligned buffers).
typedef float v16 __attribute__((vector_size(64)));
#define KVFIX_AI static inline __attribute__((always_inline))
KVFIX_AI v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
KVFIX_AI void st(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

struct Factors {
  const float *lr, *rr, *lc, *rc, *u, *cinv;  // u, cinv: this batch item's rows
  int64_t gh, gw, pr, pc, rd;
};

// acc[p] = sum_i f[i * P + p] * x[i] over n vectors x (stride kW): the reductions Rc^T X[a]
// (one grid row) and U^T X. P accumulators stay in registers. P == 0: runtime width np.
template <int P>
KVFIX_AI void reduce(const float* x, const float* f, int64_t n, int64_t np, float* out) {
  if constexpr (P == 0) {
    for (int64_t p = 0; p < np; ++p) st(out + p * kW, v16{});
    for (int64_t i = 0; i < n; ++i) {
      const v16 xv = ld(x + i * kW);
      for (int64_t p = 0; p < np; ++p) st(out + p * kW, ld(out + p * kW) + f[i * np + p] * xv);
    }
  } else {
    v16 acc[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p] = v16{};
    for (int64_t i = 0; i < n; ++i) {
      const v16 xv = ld(x + i * kW);
      const float* fi = f + i * P;
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc[p] += fi[p] * xv;
    }
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) st(out + p * kW, acc[p]);
  }
}

// y[i] = finish(init + sum_p f[i * P + p] * z[p]) for n outputs. kInit (the expansion Lc Z3[a]):
// init = -2 x, no finish. Otherwise (the expansion U P, last): init = y, and finish normalises:
// y = acc * cinv[i], or x where cinv[i] == 0 (the token keeps its key). The P operands z stay
// in registers.
template <int P, bool kInit>
KVFIX_AI void expand(const float* z, const float* f, int64_t n, int64_t np, const float* x, float* y,
                     const float* cinv = nullptr) {
  constexpr int kRegs = P == 0 ? 1 : P;
  v16 zr[kRegs];
  if constexpr (P > 0) {
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) zr[p] = ld(z + p * kW);
  }
  for (int64_t i = 0; i < n; ++i) {
    v16 acc = kInit ? -2.0f * ld(x + i * kW) : ld(y + i * kW);
    if constexpr (P == 0) {
      for (int64_t p = 0; p < np; ++p) acc += f[i * np + p] * ld(z + p * kW);
    } else {
      const float* fi = f + i * P;
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc += fi[p] * zr[p];
    }
    if constexpr (!kInit) acc = cinv[i] > 0.0f ? acc * cinv[i] : ld(x + i * kW);
    st(y + i * kW, acc);
  }
}

// Calls F<P>(args...) with P = np when np <= kMaxUnrolled (operands in registers), else F<0>.
#define KVFIX_DISPATCH_WIDTH(np, CALL)                                                              \
  switch (np) {                                                                                    \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break;  \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break;  \
    case 9: CALL(9); break; case 10: CALL(10); break; case 11: CALL(11); break;                     \
    case 12: CALL(12); break; case 13: CALL(13); break; case 14: CALL(14); break;                   \
    case 15: CALL(15); break; case 16: CALL(16); break; default: CALL(0); break;                    \
  }

// y [N, kW] = refine(x [N, kW]); z1, z3: gh * pc * kW, z2: pr * pc * kW, pd: rd * kW floats.
KVFIX_CPU_CLONES void refine_block(const Factors& f, const float* x, float* y, float* z1, float* z2, float* z3,
                                   float* pd) {
  const int64_t gh = f.gh, gw = f.gw, pr = f.pr, pc = f.pc, rd = f.rd, N = gh * gw;
  const int64_t row = pc * kW;  // one grid row of Z1 / Z3, or one q of Z2
  for (int64_t a = 0; a < gh; ++a) {
#define KVFIX_RED_ROW(P) reduce<P>(x + a * gw * kW, f.rc, gw, pc, z1 + a * row)
    KVFIX_DISPATCH_WIDTH(pc, KVFIX_RED_ROW)
#undef KVFIX_RED_ROW
  }
#define KVFIX_RED_DEPTH(P) reduce<P>(x, f.u, N, rd, pd)
  KVFIX_DISPATCH_WIDTH(rd, KVFIX_RED_DEPTH)
#undef KVFIX_RED_DEPTH
  // Z2 = Rr^T Z1, Z3 = Lr Z2: gh * pr * pc vectors each, small next to the N-long passes.
  for (int64_t e = 0; e < pr * row; e += kW) st(z2 + e, v16{});
  for (int64_t a = 0; a < gh; ++a) {
    for (int64_t q = 0; q < pr; ++q) {
      const float s = f.rr[a * pr + q];
      for (int64_t e = 0; e < row; e += kW) st(z2 + q * row + e, ld(z2 + q * row + e) + s * ld(z1 + a * row + e));
    }
  }
  for (int64_t a = 0; a < gh; ++a) {
    for (int64_t e = 0; e < row; e += kW) {
      v16 acc{};
      for (int64_t q = 0; q < pr; ++q) acc += f.lr[a * pr + q] * ld(z2 + q * row + e);
      st(z3 + a * row + e, acc);
    }
  }
  for (int64_t a = 0; a < gh; ++a) {
#define KVFIX_EXP_ROW(P) expand<P, true>(z3 + a * row, f.lc, gw, pc, x + a * gw * kW, y + a * gw * kW)
    KVFIX_DISPATCH_WIDTH(pc, KVFIX_EXP_ROW)
#undef KVFIX_EXP_ROW
  }
#define KVFIX_EXP_DEPTH(P) expand<P, false>(pd, f.u, N, rd, x, y, f.cinv)
  KVFIX_DISPATCH_WIDTH(rd, KVFIX_EXP_DEPTH)
#undef KVFIX_EXP_DEPTH
}

// 64-byte aligned float buffer.
struct Buffer {
  float* p = nullptr;
  explicit Buffer(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64))) {
    TORCH_CHECK(p != nullptr, "dscr_refine_factored: out of memory");
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// x [N, kW] = float(src[i * sn + l]) for l < width, zeros beyond.
template <typename T>
void gather(const T* src, int64_t sn, int64_t N, int64_t width, float* x) {
  for (int64_t i = 0; i < N; ++i) {
    const T* s = src + i * sn;
    float* xi = x + i * kW;
    for (int64_t l = 0; l < width; ++l) xi[l] = static_cast<float>(s[l]);
    for (int64_t l = width; l < kW; ++l) xi[l] = 0.0f;
  }
}

template <typename T>
void scatter(const float* y, int64_t N, int64_t width, T* dst, int64_t sn) {
  for (int64_t i = 0; i < N; ++i) {
    const float* yi = y + i * kW;
    T* d = dst + i * sn;
    for (int64_t l = 0; l < width; ++l) d[l] = static_cast<T>(yi[l]);
  }
}

// dsts[p] = refine(srcs[p]); each [B, H, N, D] with a contiguous last dim; dsts[p] may be srcs[p].
void refine(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const at::Tensor& lr,
            const at::Tensor& rr, const at::Tensor& lc, const at::Tensor& rc, const at::Tensor& u,
            const at::Tensor& cinv) {
  const int64_t N = srcs[0].size(2), B = srcs[0].size(0);
  if (N == 0 || B == 0) return;
  const int64_t gh = lr.size(0), gw = lc.size(0), pr = lr.size(1), pc = lc.size(1), rd = u.size(2);
  const int64_t Bd = u.size(0);
  // Task t -> (pair p, batch b, head h, block c): prefix counts over the pairs.
  std::vector<int64_t> first(srcs.size() + 1, 0);
  for (size_t p = 0; p < srcs.size(); ++p) {
    const int64_t blocks = (srcs[p].size(3) + kW - 1) / kW;
    first[p + 1] = first[p] + B * srcs[p].size(1) * blocks;
  }
  at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
    Buffer x(N * kW), y(N * kW), z1(gh * pc * kW), z2(pr * pc * kW), z3(gh * pc * kW), pd(rd * kW);
    for (int64_t t = t0; t < t1; ++t) {
      const size_t p = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const at::Tensor& src = srcs[p];
      const at::Tensor& dst = dsts[p];
      const int64_t H = src.size(1), D = src.size(3), blocks = (D + kW - 1) / kW;
      const int64_t local = t - first[p];
      const int64_t c = local % blocks, h = (local / blocks) % H, b = local / (blocks * H);
      const int64_t d0 = c * kW, width = std::min(kW, D - d0);
      const int64_t bd = Bd == 1 ? 0 : b;
      const Factors f{lr.data_ptr<float>(), rr.data_ptr<float>(), lc.data_ptr<float>(), rc.data_ptr<float>(),
                      u.data_ptr<float>() + bd * N * rd, cinv.data_ptr<float>() + bd * N, gh, gw, pr, pc, rd};
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dscr_refine_factored", [&] {
        const scalar_t* s = src.const_data_ptr<scalar_t>() + b * src.stride(0) + h * src.stride(1) + d0;
        scalar_t* o = dst.data_ptr<scalar_t>() + b * dst.stride(0) + h * dst.stride(1) + d0;
        gather(s, src.stride(2), N, width, x.p);
        refine_block(f, x.p, y.p, z1.p, z2.p, z3.p, pd.p);
        scatter(y.p, N, width, o, dst.stride(2));
      });
    }
  });
}

}  // namespace

std::vector<at::Tensor> dscr_depth_factors_cpu(const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                               const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                               int64_t rank_d) {
  const int64_t Bd = depth.size(0), N = depth.size(1), gw = lc.size(0);
  at::Tensor u = at::empty({Bd, N, rank_d}, depth.options());
  at::Tensor cinv = at::empty({Bd, N}, depth.options());
  // Spatial column sums: (Lr Rr^T 1)_a (Lc Rc^T 1)_w.
  auto axis_sums = [](const at::Tensor& L, const at::Tensor& R) {
    const int64_t g = L.size(0), p = L.size(1);
    const float *l = L.data_ptr<float>(), *r = R.data_ptr<float>();
    std::vector<double> rs(p, 0.0), out(g, 0.0);
    for (int64_t b = 0; b < g; ++b)
      for (int64_t q = 0; q < p; ++q) rs[q] += r[b * p + q];
    for (int64_t a = 0; a < g; ++a)
      for (int64_t q = 0; q < p; ++q) out[a] += double(l[a * p + q]) * rs[q];
    return out;
  };
  const std::vector<double> srow = axis_sums(lr, rr), scol = axis_sums(lc, rc);
  const double s2c = std::sqrt(2.0 * coef_d);
  std::vector<double> ud(N * rank_d), colsum(rank_d);
  for (int64_t bd = 0; bd < Bd; ++bd) {
    const float* d = depth.data_ptr<float>() + bd * N;
    float lo = d[0], hi = d[0];
    for (int64_t i = 1; i < N; ++i) lo = std::min(lo, d[i]), hi = std::max(hi, d[i]);
    const double mid = 0.5 * (double(lo) + double(hi));
    std::fill(colsum.begin(), colsum.end(), 0.0);
    for (int64_t i = 0; i < N; ++i) {  // Taylor factor exp(-c x^2) (sqrt(2c) x)^n / sqrt(n!), by recurrence
      const double x = double(d[i]) - mid;
      double* ui = ud.data() + i * rank_d;
      ui[0] = std::exp(-coef_d * x * x);
      for (int64_t n = 1; n < rank_d; ++n) ui[n] = ui[n - 1] * (s2c * x) / std::sqrt(double(n));
      for (int64_t n = 0; n < rank_d; ++n) colsum[n] += ui[n];
    }
    float* uo = u.data_ptr<float>() + bd * N * rank_d;
    float* co = cinv.data_ptr<float>() + bd * N;
    for (int64_t i = 0; i < N; ++i) {
      const double* ui = ud.data() + i * rank_d;
      double c = srow[i / gw] * scol[i % gw] - 2.0;
      for (int64_t n = 0; n < rank_d; ++n) {
        c += ui[n] * colsum[n];
        uo[i * rank_d + n] = static_cast<float>(ui[n]);
      }
      co[i] = (N > 1 && c > 0.0) ? static_cast<float>(1.0 / c) : 0.0f;
    }
  }
  return {u, cinv};
}

std::vector<at::Tensor> dscr_refine_factored_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                 const at::Tensor& depth, const at::Tensor& lr, const at::Tensor& rr,
                                                 const at::Tensor& lc, const at::Tensor& rc, double coef_d,
                                                 int64_t rank_d) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs =
      dscr_factored_operands("dscr_refine_factored", {k}, vs, depth, lr, rr, lc, rc, coef_d, rank_d);
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs) outs.push_back(at::empty(s.sizes(), s.options()));
  if (k.size(2) == 0) return outs;
  const auto uc = dscr_depth_factors_cpu(depth, lr, rr, lc, rc, coef_d, rank_d);
  refine(srcs, outs, lr, rr, lc, rc, uc[0], uc[1]);
  return outs;
}

void dscr_refine_factored_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& depth,
                                    const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                    const at::Tensor& rc, double coef_d, int64_t rank_d) {
  const std::vector<at::Tensor> all =
      dscr_factored_operands("dscr_refine_factored_cache_", keys, values, depth, lr, rr, lc, rc, coef_d, rank_d);
  if (keys[0].size(2) == 0) return;
  const auto uc = dscr_depth_factors_cpu(depth, lr, rr, lc, rc, coef_d, rank_d);
  refine(all, all, lr, rr, lc, rc, uc[0], uc[1]);
}

}  // namespace kvfix
