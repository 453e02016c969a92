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

struct Factors {
  const float *lr, *rr, *lc, *rc, *u, *cinv;  // u, cinv: this batch item's rows
  int64_t gh, gw, pr, pc, rd;
};

// y [N, kW] = refine(x [N, kW]); z1, z3: gh * pc * kW, z2: pr * pc * kW, pd: rd * kW floats.
KVFIX_CPU_CLONES void refine_block(const Factors& f, const float* x, float* y, float* z1, float* z2, float* z3,
                                   float* pd) {
  const int64_t gh = f.gh, gw = f.gw, pr = f.pr, pc = f.pc, rd = f.rd;
  std::fill(pd, pd + rd * kW, 0.0f);
  for (int64_t a = 0; a < gh; ++a) {
    float* z = z1 + a * pc * kW;
    std::fill(z, z + pc * kW, 0.0f);
    for (int64_t w = 0; w < gw; ++w) {
      const int64_t i = a * gw + w;
      const float* xi = x + i * kW;
      const float* rcw = f.rc + w * pc;
      for (int64_t p = 0; p < pc; ++p) {
        const float s = rcw[p];
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) z[p * kW + l] += s * xi[l];
      }
      const float* ui = f.u + i * rd;
      for (int64_t n = 0; n < rd; ++n) {
        const float s = ui[n];
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) pd[n * kW + l] += s * xi[l];
      }
    }
  }
  const int64_t row = pc * kW;  // one grid row of Z1 / Z3, or one q of Z2
  std::fill(z2, z2 + pr * row, 0.0f);
  for (int64_t a = 0; a < gh; ++a) {
    for (int64_t q = 0; q < pr; ++q) {
      const float s = f.rr[a * pr + q];
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) z2[q * row + e] += s * z1[a * row + e];
    }
  }
  for (int64_t a = 0; a < gh; ++a) {
    float* z = z3 + a * row;
    std::fill(z, z + row, 0.0f);
    for (int64_t q = 0; q < pr; ++q) {
      const float s = f.lr[a * pr + q];
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) z[e] += s * z2[q * row + e];
    }
  }
  for (int64_t a = 0; a < gh; ++a) {
    const float* z = z3 + a * row;
    for (int64_t w = 0; w < gw; ++w) {
      const int64_t i = a * gw + w;
      const float* xi = x + i * kW;
      float acc[kW];
#pragma omp simd
      for (int64_t l = 0; l < kW; ++l) acc[l] = -2.0f * xi[l];
      const float* lcw = f.lc + w * pc;
      for (int64_t p = 0; p < pc; ++p) {
        const float s = lcw[p];
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) acc[l] += s * z[p * kW + l];
      }
      const float* ui = f.u + i * rd;
      for (int64_t n = 0; n < rd; ++n) {
        const float s = ui[n];
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) acc[l] += s * pd[n * kW + l];
      }
      const float ci = f.cinv[i];
      float* yi = y + i * kW;
      if (ci > 0.0f) {
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) yi[l] = acc[l] * ci;
      } else {
#pragma omp simd
        for (int64_t l = 0; l < kW; ++l) yi[l] = xi[l];
      }
    }
  }
}

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
    std::vector<float> x(N * kW), y(N * kW), z1(gh * pc * kW), z2(pr * pc * kW), z3(gh * pc * kW), pd(rd * kW);
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
        gather(s, src.stride(2), N, width, x.data());
        refine_block(f, x.data(), y.data(), z1.data(), z2.data(), z3.data(), pd.data());
        scatter(y.data(), N, width, o, dst.stride(2));
      });
    }
  });
}

}  // namespace

std::vector<at::Tensor> dscr_refine_factored_cpu(const at::Tensor& k, const std::optional<at::Tensor>& v,
                                                 const at::Tensor& lr, const at::Tensor& rr, const at::Tensor& lc,
                                                 const at::Tensor& rc, const at::Tensor& u, const at::Tensor& cinv) {
  std::vector<at::Tensor> vs;
  if (v.has_value()) vs.push_back(*v);
  const std::vector<at::Tensor> srcs = dscr_factored_operands("dscr_refine_factored", {k}, vs, lr, rr, lc, rc, u, cinv);
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs) outs.push_back(at::empty(s.sizes(), s.options()));
  refine(srcs, outs, lr, rr, lc, rc, u, cinv);
  return outs;
}

void dscr_refine_factored_cache_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& lr,
                                    const at::Tensor& rr, const at::Tensor& lc, const at::Tensor& rc,
                                    const at::Tensor& u, const at::Tensor& cinv) {
  const std::vector<at::Tensor> all =
      dscr_factored_operands("dscr_refine_factored_cache_", keys, values, lr, rr, lc, rc, u, cinv);
  refine(all, all, lr, rr, lc, rc, u, cinv);
}

}  // namespace kvfix
