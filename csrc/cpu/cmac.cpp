// CMAC on the CPU (METHODS §4): calibrated image keys, attention with IMD, contrastive logits.
//
// cmac_attention is a blocked flash attention: work items are (b, query head, query block),
// each walks its key blocks once with an online softmax, and both products run as BLAS GEMMs
// (the sgemm_ that libtorch_cpu carries: MKL on x86-64, looked up at run time, else ATen's mm;
// single-threaded inside the parallel region): S = Q_blk K_blk^T, then acc += P V_blk, fp32; float16/bfloat16 blocks are
// widened to fp32 scratch first (a 1/rows share of the GEMM's work). Block boundaries are placed at the image span's edges -- query blocks split
// where queries become "after the image" (position >= end), key blocks at start and end -- so
// that every (query block, key block) pair is wholly inside or wholly outside the calibrated
// segment: a segment block reads its keys from k_calibrated instead of k, nothing is copied.
// IMD costs one comparison per segment logit: the hit probabilities are summed and zeroed before
// P V, and the output gets (their sum) * mu_V; their softmax normalisation is unchanged.
// mu_P (per item) is a reduction over heads done before the main pass, mu_V is summed during it
// (only for items with IMD on). No [Tq, T] matrix exists; scratch is O(block) per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/exp_nonpos.h"
#include "cpu/mask.h"
#include "ops/cmac.h"

#ifndef KVFIX_CMAC_SGEMM_SYMBOL
#define KVFIX_CMAC_SGEMM_SYMBOL "sgemm_"  // -DKVFIX_CMAC_SGEMM_SYMBOL=\"none\" forces the ATen path
#endif

#include "cpu/simd.h"

// The 8-lane helpers (cpu/exp_nonpos.h) are always inlined into the target clones: no vector
// crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kvfix {
namespace {

// The Fortran BLAS sgemm_ that libtorch_cpu carries (MKL on x86-64), looked up at run time so
// that a torch build without it still loads kvfix (the GEMMs then go through ATen).
using SgemmFn = void (*)(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                         const int* ldc);

SgemmFn find_sgemm() {
  // Search from this library: libtorch_cpu is one of its dependencies, but Python loads torch
  // with RTLD_LOCAL, so the global scope (RTLD_DEFAULT) does not see it.
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&find_sgemm), &info) == 0 || info.dli_fname == nullptr) return nullptr;
  void* self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (self == nullptr) return nullptr;
  return reinterpret_cast<SgemmFn>(dlsym(self, KVFIX_CMAC_SGEMM_SYMBOL));  // handle kept: we stay loaded
}

SgemmFn blas_sgemm() {
  static const SgemmFn fn = find_sgemm();
  return fn;
}

// Column-major C[m, n] = alpha op(A) op(B) + beta C (BLAS).
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (const SgemmFn fn = blas_sgemm()) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    fn(ta ? "T" : "N", tb ? "T" : "N", &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  // ATen on column-major views of the same memory (single-threaded inside the parallel region).
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<float*>(p), {trans ? cols : rows, trans ? rows : cols}, {1, ld}, opt);
    return trans ? t.t() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {1, ldc}, opt);
  C.addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}

// Rows [0, n) of x (row stride ld) as fp32: x itself for float, else widened into buf (row stride D).
template <class T>
const float* as_float(const T* x, int64_t n, int64_t D, int64_t ld, std::vector<float>& buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    ld_out = ld;
    return x;
  } else {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<float>(x[r * ld + d]);
    ld_out = D;
    return buf.data();
  }
}

constexpr int64_t kQueryBlock = 64;   // query rows per work item
constexpr int64_t kKeyBlock = 256;    // key rows per GEMM (blocks also end at the span's edges)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// f(T{}) for the three input dtypes (the checks reject the others).
template <class F>
void dispatch_float(at::ScalarType st, const F& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "cmac: unsupported dtype ", st);
  }
}

// Per-item image span [s, e), clamped to [0, T].
struct Span {
  int64_t s, e;
};

std::vector<Span> read_spans(int64_t B, int64_t T, int64_t start, int64_t end, const std::optional<at::Tensor>& spans) {
  std::vector<Span> out(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t s = start, e = end;
    if (spans.has_value()) {
      const int64_t* p = spans->const_data_ptr<int64_t>();
      s = p[2 * b];
      e = p[2 * b + 1];
    }
    s = std::clamp<int64_t>(s, 0, T);
    out[b] = {s, std::clamp<int64_t>(e, s, T)};
  }
  return out;
}

// Online-softmax fold of one row of logits s[0, n) (already scaled; masked entries -inf).
// Updates the row state (m, l, imd) and returns the factor the row's accumulator must be scaled
// by; s becomes the probabilities e^(s - m). hit (may be null): entries whose probability goes to
// mu_V instead of v (1 or 0 per entry; summed into imd, zeroed in s). A nan logit counts as +inf
// in the max, so the row's state turns nan and stays nan (softmax's rule) even when every logit
// so far is nan.
KVFIX_CPU_CLONES float fold_row(float* s, int64_t n, const float* hit, float& m, float& l, float& imd) {
  using cpu::f32x8;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const f32x8 inf = cpu::splat8(kInf);
  f32x8 mv = cpu::splat8(kNegInf);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {  // 8 lanes (csrc/cpu/exp_nonpos.h: the `omp simd` loops had compiled scalar)
    const f32x8 v = cpu::load8(s + t), x = v == v ? v : inf;
    mv = x > mv ? x : mv;
  }
  float mx = cpu::hmax8(mv);
  for (; t < n; ++t) {
    const float x = s[t] == s[t] ? s[t] : kInf;
    mx = x > mx ? x : mx;
  }
  const float m_new = std::max(m, mx);
  if (m_new == kNegInf) {  // nothing taking part yet
    for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
    return 1.0f;
  }
  const float a = cpu::exp_nonpos(m - m_new);
  const float sum = cpu::exp_sum(s, n, m_new, 1.0f);
  float hsum = 0.0f;
  if (hit != nullptr) {
#pragma omp simd reduction(+ : hsum)
    for (int64_t j = 0; j < n; ++j) {
      const float p = hit[j] * s[j];
      hsum += p;
      s[j] -= p;
    }
  }
  m = m_new;
  l = l * a + sum;
  imd = imd * a + hsum;
  return a;
}

// sum[d] += x[j * ld + d] for rows j < n (mu_V's sums of the image values).
KVFIX_CPU_CLONES void add_rows(const float* x, int64_t n, int64_t ld, int64_t D, float* sum) {
  for (int64_t j = 0; j < n; ++j) {
    const float* r = x + j * ld;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) sum[d] += r[d];
  }
}

struct AttnArgs {
  int64_t B, Hq, Hkv, Tq, T, D;
  const void *q, *k, *v, *kc;
  int64_t qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, csb, csh, cst;
  float scale;
  bool causal;
  MaskView mask;
  const std::vector<Span>* spans;
  const std::vector<uint8_t>* imd;   // per item
  const float* mu_p;                 // [B]: IMD threshold per item
  const float* kmean;                // [B, Hkv, D] contiguous: the caller-held mean image key, or nullptr
  bool vector_mean;                  // mu_V per dim (else one scalar per head)
  void* out;                         // [B, Hq, Tq, D] contiguous
};

// mu_P per item, fp32, for items with IMD on: scale * sum_h qsum_h . kbar_{kv(h)} / (Hq * rows) with
// qsum_h the sum of head h's after-image queries and kbar the mean (calibrated) image key (the
// caller's k_calibrated_mean when given: then no key is read here): the mean of the segment's
// logits without forming them. (mu_V needs the image values, which the main pass reads anyway: it
// is summed there.)
template <class T>
void imd_threshold(const AttnArgs& a, std::vector<float>& mu_p) {
  const int64_t g = a.Hq / a.Hkv, D = a.D;
  std::vector<float> part(a.B * a.Hkv, 0.0f);  // per (item, kv head)
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* kc = static_cast<const T*>(a.kc);
  // (b innermost: each thread's share mixes the items, IMD on and off, e.g. CMAC's two branches)
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> kbar(D), qsum(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i % a.B, hk = i / a.B, bk = b * a.Hkv + hk;
      const Span sp = (*a.spans)[b];
      const int64_t i_after = std::clamp<int64_t>(sp.e - (a.T - a.Tq), 0, a.Tq);
      if (!(*a.imd)[b] || i_after == a.Tq || sp.e == sp.s) continue;
      if (a.kmean != nullptr) {
        std::copy(a.kmean + bk * D, a.kmean + (bk + 1) * D, kbar.begin());
      } else {
        std::fill(kbar.begin(), kbar.end(), 0.0f);
        for (int64_t t = 0; t < sp.e - sp.s; ++t) {
          const T* kr = kc != nullptr ? kc + b * a.csb + hk * a.csh + t * a.cst : k + b * a.ksb + hk * a.ksh + (sp.s + t) * a.kst;
          for (int64_t d = 0; d < D; ++d) kbar[d] += to_f(kr[d]);
        }
      }
      std::fill(qsum.begin(), qsum.end(), 0.0f);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
        for (int64_t r = i_after; r < a.Tq; ++r) {
          const T* qr = q + b * a.qsb + h * a.qsh + r * a.qst;
          for (int64_t d = 0; d < D; ++d) qsum[d] += to_f(qr[d]);
        }
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qsum[d] * kbar[d];
      part[bk] = a.kmean != nullptr ? dot : dot / static_cast<float>(sp.e - sp.s);
    }
  });
  for (int64_t b = 0; b < a.B; ++b) {
    const Span sp = (*a.spans)[b];
    const int64_t rows = a.Tq - std::clamp<int64_t>(sp.e - (a.T - a.Tq), 0, a.Tq);
    float tot = 0.0f;
    for (int64_t hk = 0; hk < a.Hkv; ++hk) tot += part[b * a.Hkv + hk];
    mu_p[b] = rows > 0 ? a.scale * tot / static_cast<float>(rows * a.Hq) : 0.0f;
  }
}

template <class T>
void attention(const AttnArgs& a) {
  const int64_t D = a.D, g = a.Hq / a.Hkv;
  const int64_t units_per_head = (a.Tq + kQueryBlock - 1) / kQueryBlock + 1;  // +1: the split at the span end
  const bool low = !std::is_same_v<T, float>;
  // Units (b, query head, query block), b innermost: each thread's contiguous share mixes the
  // items (IMD on and off: CMAC's two branches as one batch), not one item per thread.
  at::parallel_for(0, a.B * a.Hq * units_per_head, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> S(kQueryBlock * kKeyBlock), acc(kQueryBlock * D), m(kQueryBlock), l(kQueryBlock),
        imd(kQueryBlock), scal(kQueryBlock);
    std::vector<float> qbuf(low ? kQueryBlock * D : 0), kbuf(low ? kKeyBlock * D : 0), vbuf(low ? kKeyBlock * D : 0);
    std::vector<float> hit(kKeyBlock);
    std::vector<float> vsum(D);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u % a.B, ub = (u / a.B) % units_per_head, h = u / (a.B * units_per_head);
      const int64_t hk = h / g;
      const Span sp = (*a.spans)[b];
      const int64_t off = a.T - a.Tq;  // query i sits at position off + i
      const int64_t i_after = std::clamp<int64_t>(sp.e - off, 0, a.Tq);
      // Query blocks: [0, i_after) then [i_after, Tq), kQueryBlock rows each.
      const int64_t nb_before = (i_after + kQueryBlock - 1) / kQueryBlock;
      int64_t i0, i1;
      if (ub < nb_before) {
        i0 = ub * kQueryBlock;
        i1 = std::min(i_after, i0 + kQueryBlock);
      } else {
        i0 = i_after + (ub - nb_before) * kQueryBlock;
        i1 = std::min(a.Tq, i0 + kQueryBlock);
      }
      if (i0 >= i1) continue;
      const int64_t rows = i1 - i0;
      const bool after = i0 >= i_after;
      const bool use_imd = after && (*a.imd)[b] && sp.e > sp.s;
      const float mu_p = use_imd ? a.mu_p[b] : 0.0f;
      int64_t ldq = 0, ldk = 0, ldv = 0;
      const float* qb = as_float(static_cast<const T*>(a.q) + b * a.qsb + h * a.qsh + i0 * a.qst, rows, D, a.qst,
                                 qbuf, ldq);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(imd.begin(), imd.end(), 0.0f);
      std::fill(vsum.begin(), vsum.end(), 0.0f);
      const int64_t k_end = a.causal ? off + i1 : a.T;  // keys [0, k_end) can take part
      int64_t j0 = 0;
      while (j0 < k_end) {
        // The block ends at the next span edge, kKeyBlock or k_end.
        int64_t j1 = std::min(k_end, j0 + kKeyBlock);
        if (j0 < sp.s) j1 = std::min(j1, sp.s);
        else if (j0 < sp.e) j1 = std::min(j1, sp.e);
        const int64_t n = j1 - j0;
        const bool image = j0 >= sp.s && j0 < sp.e;
        const bool calibrated = image && after && a.kc != nullptr;
        const T* kraw = calibrated ? static_cast<const T*>(a.kc) + b * a.csb + hk * a.csh + (j0 - sp.s) * a.cst
                                   : static_cast<const T*>(a.k) + b * a.ksb + hk * a.ksh + j0 * a.kst;
        const float* kb = as_float(kraw, n, D, calibrated ? a.cst : a.kst, kbuf, ldk);
        // S[r, j] = scale * q_r . k_j  (column-major S^T = K Q^T).
        gemm(true, false, n, rows, D, a.scale, kb, ldk, qb, ldq, 0.0f, S.data(), kKeyBlock);
        const bool block_imd = use_imd && image;
        for (int64_t r = 0; r < rows; ++r) {
          float* s = S.data() + r * kKeyBlock;
          if (block_imd)
            for (int64_t j = 0; j < n; ++j) hit[j] = s[j] > mu_p ? 1.0f : 0.0f;
          const int64_t qpos = off + i0 + r;
          if (a.causal && j1 - 1 > qpos)
            for (int64_t j = std::max<int64_t>(0, qpos + 1 - j0); j < n; ++j) s[j] = kNegInf;
          if (a.mask.kind != 0) {
            const int64_t mrow = Mask::offset(a.mask, b, h, i0 + r, j0);
            kernels::with_mask_kind(a.mask.kind, [&](auto kind) {
              for (int64_t j = 0; j < n; ++j) {
                const float bias = Mask::value<decltype(kind)::value>(a.mask.data, mrow + j * a.mask.st);
                s[j] = bias != kNegInf ? s[j] + bias : kNegInf;
              }
            });
          }
          scal[r] = fold_row(s, n, block_imd ? hit.data() : nullptr, m[r], l[r], imd[r]);
          if (scal[r] != 1.0f) {
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= scal[r];
          }
        }
        const float* vb = as_float(static_cast<const T*>(a.v) + b * a.vsb + hk * a.vsh + j0 * a.vst, n, D, a.vst,
                                   vbuf, ldv);
        gemm(false, false, D, rows, n, 1.0f, vb, ldv, S.data(), kKeyBlock, 1.0f, acc.data(), D);
        if (block_imd) add_rows(vb, n, ldv, D, vsum.data());  // mu_V: the block is still in cache
        j0 = j1;
      }
      T* ob = static_cast<T*>(a.out) + ((b * a.Hq + h) * a.Tq + i0) * D;
      if (use_imd) {  // vsum -> mu_V
        const float inv_n = 1.0f / static_cast<float>(sp.e - sp.s);
        float tot = 0.0f;
        for (int64_t d = 0; d < D; ++d) tot += vsum[d];
        for (int64_t d = 0; d < D; ++d) vsum[d] = a.vector_mean ? vsum[d] * inv_n : tot * inv_n / static_cast<float>(D);
      }
      const float* mv = vsum.data();
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];  // no key: 0; a nan state stays nan
        const float* ar = acc.data() + r * D;
        const float wi = imd[r];
        for (int64_t d = 0; d < D; ++d) ob[r * D + d] = static_cast<T>((ar[d] + (use_imd ? wi * mv[d] : 0.0f)) * inv);
      }
    }
  });
}

template <class S>
void rope_rotate(const at::Tensor& k, const std::vector<Span>& spans, int64_t N, const float* inv_freq, float c,
                 const int64_t* pos, int64_t rows, const std::vector<int32_t>& sec, at::Tensor& out) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), half = D / 2;
  const int64_t sb = k.stride(0), sh = k.stride(1), st = k.stride(2);
  const S* kp = k.const_data_ptr<S>();
  S* op = out.data_ptr<S>();
  at::parallel_for(0, B * N, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> cs(half), sn(half), delta(rows);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, n = i % N;
      const int64_t t = spans[b].s + n;
      S* ob = op + (b * H * N + n) * D;
      if (t >= T) {  // a per-item span past the end (CUDA-style clamping): zeros
        for (int64_t h = 0; h < H; ++h) std::fill(ob + h * N * D, ob + h * N * D + D, static_cast<S>(0.0f));
        continue;
      }
      const int64_t e = spans[b].e;
      for (int64_t r = 0; r < rows; ++r) {
        // anchor: the position of the first token after the span (one past its last token's
        // position where the span ends the sequence); the image is compressed toward it
        const int64_t* pr = pos != nullptr ? pos + (r * B + b) * T : nullptr;
        const int64_t p = pr != nullptr ? pr[t] : t;
        const int64_t a = pr == nullptr ? e : (e < T ? pr[e] : pr[e - 1] + 1);
        delta[r] = static_cast<float>(a - p) * c;
      }
      for (int64_t f = 0; f < half; ++f) {
        const float ang = delta[sec[f]] * inv_freq[f];
        cs[f] = std::cos(ang);
        sn[f] = std::sin(ang);
      }
      for (int64_t h = 0; h < H; ++h) {
        const S* x = kp + b * sb + h * sh + t * st;
        S* o = ob + h * N * D;
        for (int64_t f = 0; f < half; ++f) {
          const float x1 = to_f(x[f]), x2 = to_f(x[f + half]);
          o[f] = static_cast<S>(x1 * cs[f] - x2 * sn[f]);
          o[f + half] = static_cast<S>(x2 * cs[f] + x1 * sn[f]);
        }
      }
    }
  });
}

// out = l + alpha (l - l~) (= (1 + alpha) l - alpha l~ without the cancellation of two terms
// of size alpha |l|) where l - max l >= log beta, else -inf. A row whose l holds nan or +inf has
// no softmax: it comes out nan (a nan counts as +inf in the max).
template <class T>
void contrastive_rows(const T* l, const T* lt, T* out, int64_t rows, int64_t V, float a, float log_beta) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = l + r * V;
    const T* y = lt + r * V;
    T* o = out + r * V;
    float mx = kNegInf;
    for (int64_t j = 0; j < V; ++j) {
      const float xv = to_f(x[j]);
      mx = std::max(mx, xv == xv ? xv : kInf);
    }
    if (mx == kInf) {
      std::fill(o, o + V, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    for (int64_t j = 0; j < V; ++j) {
      const float xv = to_f(x[j]);
      o[j] = static_cast<T>(xv - mx >= log_beta ? xv + a * (xv - to_f(y[j])) : kNegInf);
    }
  }
}

}  // namespace

at::Tensor rope_calibrate_cpu(const at::Tensor& k, int64_t start, int64_t end, const std::optional<at::Tensor>& spans,
                              int64_t n, const at::Tensor& inv_freq, double gamma,
                              const std::optional<at::Tensor>& positions, at::OptionalIntArrayRef sections) {
  cmac_check_rope(k, start, end, spans, n, inv_freq, gamma, positions, sections);
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  at::Tensor out = at::empty({B, H, n, D}, k.options());
  if (out.numel() == 0) return out;
  const std::vector<Span> sp = read_spans(B, T, start, end, spans);
  const at::Tensor freq = inv_freq.contiguous();
  TORCH_CHECK_VALUE(freq.isfinite().all().item<bool>(), "rope_calibrate: inv_freq has non-finite values");
  const int64_t rows = positions.has_value() ? positions->size(0) : 1;
  const at::Tensor pos = positions.has_value() ? positions->contiguous() : at::Tensor();
  const std::vector<int32_t> sec = cmac_freq_sections(sections, D / 2, rows);
  const float c = static_cast<float>(1.0 - 1.0 / gamma);
  dispatch_float(k.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rope_rotate<scalar_t>(k, sp, n, freq.const_data_ptr<float>(), c,
                          pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr, rows, sec, out);
  });
  return out;
}

at::Tensor cmac_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              int64_t end, const std::optional<at::Tensor>& spans,
                              const std::optional<at::Tensor>& k_cal, std::optional<double> scale,
                              const std::optional<at::Tensor>& mask, bool causal, bool imd,
                              const std::optional<at::Tensor>& imd_items, int64_t value_mean,
                              const std::optional<at::Tensor>& k_cal_mean) {
  const MaskView mk =
      cmac_check_attention(q, k, v, start, end, spans, k_cal, mask, imd_items, value_mean, k_cal_mean);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), T = k.size(2);
  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options());
  if (out.numel() == 0) return out;
  const float sc = kvsmooth_scale(scale, D);
  // The GEMMs need row strides >= D (BLAS leading dimensions); broadcast views get a copy.
  auto rows_ok = [D](const at::Tensor& x) { return x.size(2) <= 1 || x.stride(2) >= D; };
  const at::Tensor qq = rows_ok(q) && q.stride(2) >= 1 ? q : q.contiguous();
  const at::Tensor kk = rows_ok(k) && k.stride(2) >= 1 ? k : k.contiguous();
  const at::Tensor vv = rows_ok(v) && v.stride(2) >= 1 ? v : v.contiguous();
  at::Tensor cc;
  if (k_cal.has_value()) cc = rows_ok(*k_cal) && k_cal->stride(2) >= 1 ? *k_cal : k_cal->contiguous();
  const std::vector<Span> sp = read_spans(B, T, start, end, spans);
  std::vector<uint8_t> on(B, imd ? 1 : 0);
  if (imd && imd_items.has_value())
    for (int64_t b = 0; b < B; ++b) on[b] = imd_items->const_data_ptr<bool>()[b] ? 1 : 0;
  const bool any_imd = std::any_of(on.begin(), on.end(), [](uint8_t x) { return x != 0; });
  std::vector<float> mu_p(B, 0.0f);
  AttnArgs a{};
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.Tq = Tq; a.T = T; a.D = D;
  a.q = qq.const_data_ptr(); a.k = kk.const_data_ptr(); a.v = vv.const_data_ptr();
  a.kc = cc.defined() ? cc.const_data_ptr() : nullptr;
  a.qsb = qq.stride(0); a.qsh = qq.stride(1); a.qst = std::max<int64_t>(qq.stride(2), D);
  a.ksb = kk.stride(0); a.ksh = kk.stride(1); a.kst = std::max<int64_t>(kk.stride(2), D);
  a.vsb = vv.stride(0); a.vsh = vv.stride(1); a.vst = std::max<int64_t>(vv.stride(2), D);
  if (cc.defined()) {
    a.csb = cc.stride(0); a.csh = cc.stride(1); a.cst = std::max<int64_t>(cc.stride(2), D);
  }
  a.scale = sc;
  a.causal = causal;
  a.mask = mk;
  a.spans = &sp;
  a.imd = &on;
  a.mu_p = mu_p.data();
  a.kmean = k_cal_mean.has_value() ? k_cal_mean->const_data_ptr<float>() : nullptr;
  a.vector_mean = value_mean == 1;
  a.out = out.data_ptr();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (any_imd) imd_threshold<scalar_t>(a, mu_p);
    attention<scalar_t>(a);
  });
  return out;
}

at::Tensor contrastive_logits_cpu(const at::Tensor& logits, const at::Tensor& distorted, double alpha, double beta) {
  cmac_check_contrastive(logits, distorted, alpha, beta);
  const at::Tensor l = logits.contiguous(), lt = distorted.contiguous();
  at::Tensor out = at::empty(l.sizes(), l.options());
  const int64_t V = l.size(-1);
  if (out.numel() == 0) return out;
  const int64_t rows = l.numel() / V;
  const float a = static_cast<float>(alpha);
  const float log_beta = static_cast<float>(std::log(beta));
  dispatch_float(l.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = l.const_data_ptr<scalar_t>();
    const scalar_t* y = lt.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / V), [&](int64_t r0, int64_t r1) {
      contrastive_rows<scalar_t>(x + r0 * V, y + r0 * V, o + r0 * V, r1 - r0, V, a, log_beta);
    });
  });
  return out;
}

}  // namespace kvfix
