// Host-side planning of banded structured DSCR (kvfix/dscr_structured.py, "Banded"): the depth part
// of a new image's structure, chosen and built, and its column sums. Plain C++ (no CUDA, no torch),
// so that the ATen ops (csrc/ops/dscr.cpp: kvfix::dscr_depth_structure, which the planner calls,
// kvfix::dscr_gauss_truncation and kvfix::dscr_fit_rows, tested on their own) and the SIMT
// emulator's dscr_banded module (whose tests plan their structures with kvfix/dscr_structured.py
// loaded without the compiled extension) run this same source.
//
// Everything is float64. The derivations of the bounds are in kvfix/dscr_structured.py's module
// docstring and in docs/DSCR_STRUCTURED.md; the comments here say what is computed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvfix::kernels {

// Rows of the "values" node kernel fitted to the depths (dscr_depth_structure, below). Nodes e[0..G):
// distinct depths in increasing order, counts[g] tokens each. Row g's candidate entries are the
// nodes [row_lo[g], row_lo[g] + row_len[g]), a window that holds g. Taken farthest from e[g] first
// (equal distances: the lower node first), entries are dropped while the weight dropped so far,
// sum of counts[g'] exp(-cd (e[g] - e[g'])^2) over them (an exponent below -87 counts 0), stays
// <= allowed. Each side of g is in distance order already (e increases), so the order is a merge
// of the two ends and what is kept is a window again: [kept_lo[g], kept_lo[g] + kept_len[g])
// (empty at g, length 0, if every entry is dropped); dropped[g] is the weight dropped from row g.
//
// A row's dropped weight is summed from zero in that order, and the walk stops at the first entry
// that stays: the sum compared with `allowed` is the one returned, so dropped[g] <= allowed always.
// (An earlier version summed every entry of every row into one running sum, as the numpy planner's
// cumsum over all rows had, and took a row's share as a difference of two values of it: with
// ~1e4 in the sum, its rounding, ~1e-12, is 0.1% of float32's budget: in 12 of 1080 plans of
// 24 x 24 and 32 x 32 maps some row dropped up to 0.09% more than allowed, and a plan whose depth
// error passes its budget fails its bound and falls back to another algorithm.)
inline void dscr_fit_rows(const double* e, const int64_t* counts, const int64_t* row_lo, const int64_t* row_len,
                          int64_t G, double cd, double allowed, int64_t* kept_lo, int64_t* kept_len,
                          double* dropped) {
  for (int64_t g = 0; g < G; ++g) {
    int64_t left = row_lo[g], right = row_lo[g] + row_len[g] - 1;
    double gone = 0.0;
    while (left <= right) {
      const double dl = std::fabs(e[g] - e[left]), dr = std::fabs(e[g] - e[right]);
      const bool take_left = dl >= dr;
      const double dist = take_left ? dl : dr;
      const double ex = -cd * dist * dist;
      const double v = ex < -87.0 ? 0.0 : static_cast<double>(counts[take_left ? left : right]) * std::exp(ex);
      if (!(gone + v <= allowed)) {
        break;  // this entry and every nearer one stay
      }
      gone += v;
      if (take_left) {
        ++left;
      } else {
        --right;
      }
    }
    // the kept window [left, right], or empty at g when every entry was dropped
    kept_lo[g] = left <= right ? left : g;
    kept_len[g] = left <= right ? right - left + 1 : 0;
    dropped[g] = gone;
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers over sorted arrays (numpy's searchsorted, as the planner was first written).

// first index i with a[i] >= v (left) or a[i] > v (right), for every v[j] of a nondecreasing v
inline void dscr_search_sorted(const double* a, int64_t n, const double* v, int64_t m, bool right, int64_t* out) {
  int64_t i = 0;
  for (int64_t j = 0; j < m; ++j) {
    while (i < n && (right ? a[i] <= v[j] : a[i] < v[j])) {
      ++i;
    }
    out[j] = i;
  }
}

// Banded rows over sorted positions: row g holds the positions within `reach` of pos[g]
// (pos[g] - reach <= pos[g'] <= pos[g] + reach, each side rounded once as numpy would).
inline void dscr_rows(const std::vector<double>& pos, double reach, std::vector<int64_t>& lo,
                      std::vector<int64_t>& len) {
  const int64_t n = static_cast<int64_t>(pos.size());
  std::vector<double> v(n);
  std::vector<int64_t> hi(n);
  lo.resize(n);
  len.resize(n);
  for (int64_t g = 0; g < n; ++g) v[g] = pos[g] - reach;
  dscr_search_sorted(pos.data(), n, v.data(), n, false, lo.data());
  for (int64_t g = 0; g < n; ++g) v[g] = pos[g] + reach;
  dscr_search_sorted(pos.data(), n, v.data(), n, true, hi.data());
  for (int64_t g = 0; g < n; ++g) len[g] = hi[g] - lo[g];
}

inline int64_t dscr_sum(const std::vector<int64_t>& x) {
  int64_t s = 0;
  for (int64_t v : x) s += v;
  return s;
}

// max over j of #{i: |ds[i] - ds[j]| <= r} (ds sorted; each side rounded as numpy would)
inline int64_t dscr_reach_count(const std::vector<double>& ds, double r) {
  const int64_t n = static_cast<int64_t>(ds.size());
  int64_t lo = 0, hi = 0, best = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double a = ds[j] - r, b = ds[j] + r;
    while (lo < n && ds[lo] < a) ++lo;
    while (hi < n && ds[hi] <= b) ++hi;
    best = std::max(best, hi - lo);
  }
  return best;
}

// The sorted distinct values of first[i] + c, 0 <= c < width, and each first[i]'s index among them:
// a coverage count over the span of the values, or a sort where that span is far wider than the
// values (as the planner's numpy version did).
inline void dscr_touched(const std::vector<int64_t>& first, int64_t width, std::vector<int64_t>& touched,
                         std::vector<int64_t>& index) {
  const int64_t n = static_cast<int64_t>(first.size());
  touched.clear();
  index.resize(n);
  if (n == 0) return;
  const auto [mn, mx] = std::minmax_element(first.begin(), first.end());
  const int64_t lo = *mn, span = *mx - lo + width;
  if (span <= 8 * n * width + 4096) {
    std::vector<int64_t> at(static_cast<size_t>(span + 1), 0);  // coverage differences, then indices
    for (int64_t f : first) {
      ++at[f - lo];
      --at[f - lo + width];
    }
    int64_t cover = 0;
    for (int64_t v = 0; v < span; ++v) {
      cover += at[v];
      at[v] = cover > 0 ? static_cast<int64_t>(touched.size()) : -1;
      if (cover > 0) touched.push_back(lo + v);
    }
    for (int64_t i = 0; i < n; ++i) index[i] = at[first[i] - lo];
    return;
  }
  std::vector<int64_t> f(first);
  std::sort(f.begin(), f.end());
  for (int64_t i = 0; i < n; ++i) {  // the union of [f, f + width), walked in order
    const int64_t from = touched.empty() ? f[i] : std::max(f[i], touched.back() + 1);
    for (int64_t v = from; v < f[i] + width; ++v) touched.push_back(v);
  }
  for (int64_t i = 0; i < n; ++i) {
    index[i] = std::lower_bound(touched.begin(), touched.end(), first[i]) - touched.begin();
  }
}

// ---------------------------------------------------------------------------------------------
// The Gaussian nodes' truncation bound (`_gauss_truncation` in kvfix/dscr_structured.py's
// docstring "gauss"): an upper bound of max_j sum_i drop(|d_i - d_j|) over the pairs closer than
// sqrt(87 / cd). The depths are binned kGaussBin levels wide (wider where the range would need
// more than kGaussMaxBins bins or bins x taps would pass kGaussMaxWork: wide kernels, a looser
// bound); a pair of tokens in bins m apart is bounded by the largest drop over the distances
// [(m - 1) h, (m + 1) h]; the bin counts summed with those bounds at every occupied bin (over its
// occupied neighbours within M bins, or its whole window of 2M + 1 bins where the occupied ones
// are many: at most the whole convolution's work, bins x taps).
constexpr double kPi = 3.141592653589793;  // Python's math.pi
constexpr double kGaussBin = 1.0 / 32;
constexpr double kGaussMaxBins = 65536.0;
constexpr double kGaussMaxWork = 67108864.0;  // 2^26

inline double dscr_gauss_truncation(const double* x, int64_t n, double cd, double R, double step, double alias) {
  if (n <= 0) return 0.0;
  double xmin = x[0], xmax = x[0];
  for (int64_t i = 1; i < n; ++i) {
    xmin = std::min(xmin, x[i]);
    xmax = std::max(xmax, x[i]);
  }
  const double span = xmax - xmin;
  const double reach = std::min(std::sqrt(87.0 / cd), span);  // no pair is farther apart than the range
  const double hb = std::max({kGaussBin, span / kGaussMaxBins, std::sqrt(span * reach / kGaussMaxWork)});
  const double w = step * std::sqrt(4.0 * cd / kPi);
  double tau = 0.0;
  for (int64_t k = 0;; ++k) {  // sum_{k >= 0} exp(-4 cd (k step)^2), to float64 rounding
    const double ks = static_cast<double>(k) * step;
    const double t = std::exp(-4.0 * cd * (ks * ks));
    tau += t;
    if (t < 1e-18 * tau) break;
  }
  const double a1 = 2.0 * w * tau * std::exp(-2.0 * cd * R * R);
  const double b1 = 1.0 + alias;
  const int64_t M = static_cast<int64_t>(std::ceil(reach / hb)) + 2;
  std::vector<double> hmax(M + 1);
  for (int64_t m = 0; m <= M; ++m) {
    const double md = static_cast<double>(m);
    const double lo = std::max(0.0, (md - 1.0) * hb - 1e-9), hi = (md + 1.0) * hb + 1e-9;
    const double h2 = b1 * std::exp(-cd * lo * lo);  // the whole sum: decreasing in the distance
    const double peak = std::min(std::max(R, lo), hi);
    const double h1 = a1 * std::exp(-2.0 * cd * ((peak - R) * (peak - R)));  // the dropped nodes: largest at R
    hmax[m] = hi < 2.0 * R ? std::min(h1, h2) : h2;
  }
  // the bin counts with M empty bins on each side, and the taps m = -M..M
  std::vector<int64_t> b(n);
  int64_t nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    b[i] = static_cast<int64_t>(std::floor((x[i] - xmin) / hb));
    nb = std::max(nb, b[i] + 1);
  }
  std::vector<double> cnt(static_cast<size_t>(nb + 2 * M), 0.0), ker(static_cast<size_t>(2 * M + 1));
  std::vector<char> occupied(static_cast<size_t>(nb), 0);
  for (int64_t i = 0; i < n; ++i) {
    cnt[M + b[i]] += 1.0;
    occupied[b[i]] = 1;
  }
  for (int64_t m = -M; m <= M; ++m) ker[M + m] = hmax[std::abs(m)];
  // the sum at every occupied bin j over the bins j - M .. j + M: over the occupied ones only
  // where they are few (a pair per occupied neighbour), else the whole window times the taps
  std::vector<int64_t> occ;
  for (int64_t j = 0; j < nb; ++j) {
    if (occupied[j]) occ.push_back(j);
  }
  const int64_t no = static_cast<int64_t>(occ.size()), taps = 2 * M + 1;
  int64_t pairs = 0;
  for (int64_t a = 0, lo = 0, hi = 0; a < no; ++a) {
    while (occ[lo] < occ[a] - M) ++lo;
    while (hi < no && occ[hi] <= occ[a] + M) ++hi;
    pairs += hi - lo;
  }
  double best = 0.0;
  if (4 * pairs < no * taps) {
    for (int64_t a = 0, lo = 0, hi = 0; a < no; ++a) {
      while (occ[lo] < occ[a] - M) ++lo;
      while (hi < no && occ[hi] <= occ[a] + M) ++hi;
      double acc = 0.0;
      for (int64_t c = lo; c < hi; ++c) acc += cnt[M + occ[c]] * ker[M + occ[c] - occ[a]];
      best = std::max(best, acc);
    }
    return best;
  }
  for (int64_t j : occ) {
    const double* win = &cnt[j];  // bins j - M .. j + M (8 running sums)
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t t = 0;
    for (; t + 8 <= taps; t += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += win[t + k] * ker[t + k];
    }
    for (; t < taps; ++t) acc[0] += win[t] * ker[t];
    best = std::max(best, ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// One item's depth structure (`_depth_structure`): the depth term exp(-cd (d_i - d_j)^2) as
// A^T T A with A mapping tokens to depth nodes (token i: nodes tok[i] .. tok[i] + order - 1,
// weights tokw[i, 0 .. order)) and T the node kernel's banded rows (row g: nodes row_lo[g] ..
// row_lo[g] + row_len[g] - 1, values in tvals row by row), within `budget` per column:
// - values (mode 1): one node per distinct depth, each row fitted to the depths (dscr_fit_rows)
//   or reaching r with (N - 1) exp(-cd r^2) <= budget;
// - grid (mode 2): a uniform grid of step `step`, each token interpolated from its p nearest
//   nodes (Lagrange), p one of the given orders (with the Lebesgue constant lam and the
//   interpolation error coefficient coef of each; an infinite coef: that order is not considered);
// - gauss (mode 3): Gaussian nodes `step` apart, each token on the C nodes within R = C step / 2,
//   T = w I; rel: the relative error part.
// The cheapest (counted operations per feature column, `ops`) is built; `force` builds one mode
// alone (0 values, -2 gauss, p > 0 the grid of order p) if it meets the budget at a cost below
// `cap` (mode 0 otherwise). With `spatial` (the band's column sums per token, or nullptr) also
// cinv[i] = 1 / c~_i (0 where c~_i <= 0 or N == 1), c~_i = spatial[i] + (A^T T A 1)_i - 2, and amp,
// the largest (spatial[i] + (|A|^T |T| |A| 1)_i + 2) / c~_i.
struct DscrGridOrder {
  int64_t p;
  double lam, coef;
};

struct DscrDepthStructure {
  int mode = 0;  // 0 none, 1 values, 2 grid, 3 gauss
  double error = 0.0, ops = 0.0, step = 0.0, rel = 0.0, amp = 0.0;
  int64_t order = 1;
  std::vector<int64_t> tok, row_lo, row_len;
  std::vector<double> tokw, tvals, cinv;
};

// The grid orders from rows (p, lam, coef) of a float64 [n, 3] table, as the op and the emulator
// receive them.
inline std::vector<DscrGridOrder> dscr_grid_orders(const double* table, int64_t n) {
  std::vector<DscrGridOrder> orders;
  for (int64_t k = 0; k < n; ++k) {
    orders.push_back({static_cast<int64_t>(table[3 * k]), table[3 * k + 1], table[3 * k + 2]});
  }
  return orders;
}

// The scalars of a structure, in the order the op returns them as `info`: mode, error, ops, step,
// order, rel, amp.
constexpr int kDscrDepthInfo = 7;
inline void dscr_depth_info(const DscrDepthStructure& s, double* info) {
  const double v[kDscrDepthInfo] = {static_cast<double>(s.mode), s.error, s.ops, s.step,
                                    static_cast<double>(s.order), s.rel, s.amp};
  std::copy(v, v + kDscrDepthInfo, info);
}

namespace dscr_plan_detail {

const double kE87 = std::exp(-87.0);
constexpr int64_t kFitMax = int64_t{1} << 18;  // the most node kernel entries the fitted rows examine
// The most node steps a depth range may span in the grid and Gaussian modes (node indices stay far
// from int64's range; such a fine step would never be the cheapest: a huge cd, a tiny sigma_d).
constexpr double kMaxNodeSpan = 1099511627776.0;  // 2^40
// Nodes are not built farther apart than this: the node steps grow as 1 / sqrt(cd), and squared
// distances between nodes (cd (k step)^2, of order 1) overflow float64 past ~1e154. With cd below
// ~1e-280 (alpha ~1e-308, found by hypothesis) the Gaussian nodes overflowed so and were built with
// an error bound of 4e-9 and weights off by 3 (N = 3); the values structure is exact there.
constexpr double kMaxNodeStep = 1e140;

// exp(-cd (pos[g] - pos[g'])^2) row by row (an exponent below -87 as 0 where `cut`)
inline std::vector<double> band_values(const std::vector<double>& pos, const std::vector<int64_t>& lo,
                                       const std::vector<int64_t>& len, double cd, bool cut) {
  std::vector<double> v;
  v.reserve(static_cast<size_t>(dscr_sum(len)));
  for (size_t g = 0; g < pos.size(); ++g) {
    for (int64_t c = lo[g]; c < lo[g] + len[g]; ++c) {
      const double diff = pos[g] - pos[c];
      const double ex = -cd * (diff * diff);
      v.push_back(cut && ex < -87.0 ? 0.0 : std::exp(ex));
    }
  }
  return v;
}

struct Values {  // the distinct depths and the kept rows
  std::vector<double> e;
  std::vector<int64_t> inv, counts, lo, len;
  double error = 0.0, ops = 0.0;
};

inline Values values(const std::vector<double>& d, double cd, double budget) {
  const int64_t N = static_cast<int64_t>(d.size());
  Values s;
  std::vector<int64_t> order(N);
  for (int64_t i = 0; i < N; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] < d[b]; });
  s.inv.resize(N);
  for (int64_t k = 0; k < N; ++k) {
    const double v = d[order[k]];
    if (s.e.empty() || v != s.e.back()) {
      s.e.push_back(v);
      s.counts.push_back(0);
    }
    ++s.counts.back();
    s.inv[order[k]] = static_cast<int64_t>(s.e.size()) - 1;
  }
  const int64_t G = static_cast<int64_t>(s.e.size());
  const double inf = std::numeric_limits<double>::infinity();
  const double r_cut = cd > 0 ? std::sqrt(87.0 / cd) : inf;
  double r = cd > 0 && N > 1 ? std::sqrt(std::log(static_cast<double>(std::max<int64_t>(N - 1, 1)) / budget) / cd)
                             : inf;
  if (r >= r_cut) {
    r = r_cut;
    s.error = static_cast<double>(N) * kE87;
  } else {
    s.error = static_cast<double>(N - 1) * std::exp(-cd * r * r) + static_cast<double>(N) * kE87;
  }
  if (cd > 0) {
    dscr_rows(s.e, r, s.lo, s.len);
    const double allowed = budget - static_cast<double>(N) * kE87;
    if (N > 1 && dscr_sum(s.len) > G && allowed > 0) {
      std::vector<int64_t> lo_c, len_c;
      dscr_rows(s.e, r_cut, lo_c, len_c);
      if (dscr_sum(len_c) <= kFitMax) {
        std::vector<int64_t> lo(G), len(G), hi(G);
        std::vector<double> dropped(G);
        dscr_fit_rows(s.e.data(), s.counts.data(), lo_c.data(), len_c.data(), G, cd, allowed, lo.data(),
                      len.data(), dropped.data());
        // symmetric again (T[g, g'] kept iff T[g', g] is), the rows still consecutive, each only
        // wider: monotone row bounds, then each row extended to the rows that reach it
        for (int64_t g = 0; g < G; ++g) hi[g] = lo[g] + len[g];
        for (int64_t g = G - 2; g >= 0; --g) lo[g] = std::min(lo[g], lo[g + 1]);
        for (int64_t g = 1; g < G; ++g) hi[g] = std::max(hi[g], hi[g - 1]);
        int64_t a = 0, b = 0;  // #{rows with hi <= g}, #{rows with lo <= g}
        double worst = 0.0;
        for (int64_t g = 0; g < G; ++g) {
          while (a < G && hi[a] <= g) ++a;
          while (b < G && lo[b] <= g) ++b;
          s.lo[g] = std::min(lo[g], a);
          s.len[g] = std::max(hi[g], b) - s.lo[g];
          worst = std::max(worst, dropped[g]);
        }
        s.error = worst + static_cast<double>(N) * kE87;
      }
    }
  } else {  // alpha = 0: one node (the caller zeroed the depths), its full row
    s.lo.assign(G, 0);
    s.len.assign(G, G);
  }
  s.ops = static_cast<double>(2 * N + dscr_sum(s.len));
  return s;
}

struct Nodes {  // grid or Gaussian nodes: tokens' first nodes, the touched nodes, the rows
  int64_t order = 0;
  double step = 0.0, error = 0.0, ops = 0.0, rel = 0.0, d0 = 0.0;
  std::vector<int64_t> first, touched, index, lo, len;
  std::vector<double> pos, frac;  // node positions (relative to d0); grid: t - floor(t) per token
};

inline bool grid(const std::vector<double>& d, const std::vector<double>& ds, double cd, double budget,
                 const DscrGridOrder& o, double best, Nodes& out) {
  const int64_t N = static_cast<int64_t>(d.size()), p = o.p;
  if (2.0 * static_cast<double>(p) * static_cast<double>(N) >= best || !std::isfinite(o.coef)) return false;
  const double lam = o.lam, C = o.coef;
  // tail: (N + n_int lam^2) exp(-cd r^2) <= budget / 4, with n_int <= N
  const double r = std::sqrt(std::log(4.0 * static_cast<double>(N) * (1.0 + lam * lam) / budget) / cd);
  int64_t n_int = N;
  double step = 0.0;
  for (int it = 0; it < 3; ++it) {
    const double st = std::pow(budget / (2.0 * static_cast<double>(n_int) * (1.0 + lam) * C),
                               1.0 / static_cast<double>(p));
    const int64_t n_new = dscr_reach_count(ds, r + static_cast<double>(p) * st);
    if (it > 0 && n_new > n_int) break;
    step = st;
    n_int = std::max<int64_t>(n_new, 1);
  }
  const double tail = std::exp(-cd * r * r);
  const double err = static_cast<double>(n_int) *
                         (C * std::pow(step, static_cast<double>(p)) * (1.0 + lam) + lam * lam * tail + kE87) +
                     static_cast<double>(N) * tail;
  if (!(err <= budget) || !(step < kMaxNodeStep) || !(ds.back() - ds.front() <= kMaxNodeSpan * step)) return false;
  Nodes s;
  s.order = p;
  s.step = step;
  s.error = err;
  s.d0 = ds[0];
  s.first.resize(N);
  s.frac.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const double t = (d[i] - s.d0) / step;
    const double m = std::floor(t);
    s.frac[i] = t - m;
    s.first[i] = static_cast<int64_t>(m) + (1 - p / 2);  // global node of weight 0
  }
  dscr_touched(s.first, p, s.touched, s.index);
  s.pos.resize(s.touched.size());
  for (size_t g = 0; g < s.touched.size(); ++g) s.pos[g] = static_cast<double>(s.touched[g]) * step;
  dscr_rows(s.pos, std::floor(r / step + 1e-9) * step + 0.5 * step, s.lo, s.len);
  s.ops = static_cast<double>(2 * p * N + dscr_sum(s.len));
  if (s.ops >= best) return false;
  out = std::move(s);
  return true;
}

inline bool gauss(const std::vector<double>& d, const std::vector<double>& ds, double cd, double budget,
                  double best, Nodes& out) {
  const int64_t N = static_cast<int64_t>(d.size());
  const double Nd = static_cast<double>(N);
  // relative part (Poisson summation of the nodes' Gaussian, coefficient 4 cd): 2 q / (1 - q) <= budget / 2
  const double eps = 0.5 * budget;
  const double q = eps / (2.0 + eps);
  const double step = kPi / std::sqrt(4.0 * cd * -std::log(q));
  const double alias = 2.0 * q / (1.0 - q);
  const double fixed = Nd * (1.0 + alias) * kE87 + alias;  // the cut-off's entries, the diagonal's relative part
  const double eta = (budget - fixed) * (1.0 - 1e-9);     // the margin keeps err <= budget through rounding
  if (!(eta > 0) || !(step < kMaxNodeStep) || !(ds.back() - ds.front() <= kMaxNodeSpan * step)) return false;
  std::vector<double> bounds;  // by C, each computed once (NaN: not yet)
  auto trunc = [&](int64_t C) {
    if (static_cast<int64_t>(bounds.size()) <= C) bounds.resize(C + 1, std::nan(""));
    if (std::isnan(bounds[C])) {  // R = C delta / 2, less a hair for the rounding of the first node
      bounds[C] = dscr_gauss_truncation(ds.data(), N, cd, 0.5 * static_cast<double>(C) * step * (1.0 - 1e-12), step,
                                        alias);
    }
    return bounds[C];
  };
  // the bound falls as C grows: the fewest C that meets it is found walking from a first guess,
  // and only C up to c_hi (2 C N < best) can be cheaper than the best so far
  int64_t c_hi = std::numeric_limits<int64_t>::max();
  if (std::isfinite(best)) {
    c_hi = static_cast<int64_t>(std::floor(best / (2.0 * Nd)));
    if (2.0 * static_cast<double>(c_hi) * Nd >= best) --c_hi;
    if (c_hi < 1) return false;
  }
  const double guess = std::ceil(2.0 * std::sqrt(std::log(std::max(2.0, 4.0 * Nd) / eta) / (2.0 * cd)) / step);
  int64_t C = std::min(c_hi, std::max<int64_t>(1, static_cast<int64_t>(guess)));
  while (trunc(C) > eta) {
    ++C;
    if (2.0 * static_cast<double>(C) * Nd >= best) return false;
  }
  while (C > 1 && trunc(C - 1) <= eta) --C;
  if (2.0 * static_cast<double>(C) * Nd >= best) return false;
  Nodes s;
  s.order = C;
  s.step = step;
  s.rel = alias;
  s.d0 = ds[0];
  const double R = 0.5 * static_cast<double>(C) * step;
  s.first.resize(N);
  for (int64_t i = 0; i < N; ++i) s.first[i] = static_cast<int64_t>(std::ceil((d[i] - s.d0 - R) / step));
  dscr_touched(s.first, C, s.touched, s.index);
  const int64_t G = static_cast<int64_t>(s.touched.size());
  s.ops = static_cast<double>(2 * C * N + G);
  if (s.ops >= best) return false;
  s.error = trunc(C) + fixed;
  s.lo.resize(G);
  s.len.assign(G, 1);
  for (int64_t g = 0; g < G; ++g) s.lo[g] = g;
  out = std::move(s);
  return true;
}

// Lagrange weights at u in [0, 1] of the p nodes j = 1 - p/2 .. p/2 (barycentric form; a node
// hit exactly gets weight 1)
inline void lagrange(double u, int64_t p, double* L) {
  double sum = 0.0, w = 1.0;  // w_k = (-1)^k binom(p - 1, k)
  int64_t exact = -1;
  for (int64_t k = 0; k < p; ++k) {
    const double diff = u - static_cast<double>(1 - p / 2 + k);
    if (diff == 0.0) exact = k;
    L[k] = w / (diff == 0.0 ? 1.0 : diff);
    sum += L[k];
    w = -w * static_cast<double>(p - 1 - k) / static_cast<double>(k + 1);
  }
  for (int64_t k = 0; k < p; ++k) L[k] = exact >= 0 ? (k == exact ? 1.0 : 0.0) : L[k] / sum;
}

}  // namespace dscr_plan_detail

inline DscrDepthStructure dscr_depth_structure(const double* depth, int64_t N, double cd, double budget,
                                               const DscrGridOrder* orders, int64_t n_orders, int64_t force,
                                               double cap, const double* spatial) {
  namespace dd = dscr_plan_detail;
  DscrDepthStructure out;
  std::vector<double> d(depth, depth + N);
  if (cd == 0.0) d.assign(N, 0.0);  // alpha = 0: the depth term is 1 for every pair
  std::vector<double> ds(d);
  std::sort(ds.begin(), ds.end());
  int mode = 0;
  dd::Values val;
  dd::Nodes nodes;
  double best = cap;
  if (force == -1 || force == 0) {
    val = dd::values(d, cd, budget);
    if (force == -1 || val.ops < cap) {
      mode = 1;
      best = val.ops;
    }
  }
  if (cd > 0 && N > 0 && (force != -1 || best > 4.0 * static_cast<double>(N))) {
    for (int64_t k = 0; k < n_orders; ++k) {
      if ((force == -1 || force == orders[k].p) && dd::grid(d, ds, cd, budget, orders[k], best, nodes)) {
        mode = 2;
        best = nodes.ops;
      }
    }
    if ((force == -1 || force == -2) && dd::gauss(d, ds, cd, budget, best, nodes)) {
      mode = 3;
      best = nodes.ops;
    }
  }
  out.mode = mode;
  if (mode == 0) return out;
  std::vector<double> pos;  // node positions, for T's values
  if (mode == 1) {
    out.error = val.error;
    out.ops = val.ops;
    out.tok = std::move(val.inv);
    out.tokw.assign(N, 1.0);
    out.row_lo = std::move(val.lo);
    out.row_len = std::move(val.len);
    out.tvals = dd::band_values(val.e, out.row_lo, out.row_len, cd, true);
  } else {
    out.error = nodes.error;
    out.ops = nodes.ops;
    out.step = nodes.step;
    out.order = nodes.order;
    out.rel = nodes.rel;
    out.tok = std::move(nodes.index);
    out.row_lo = std::move(nodes.lo);
    out.row_len = std::move(nodes.len);
    const int64_t c = nodes.order;
    out.tokw.resize(static_cast<size_t>(N * c));
    if (mode == 2) {
      for (int64_t i = 0; i < N; ++i) dd::lagrange(nodes.frac[i], c, &out.tokw[i * c]);
      out.tvals = dd::band_values(nodes.pos, out.row_lo, out.row_len, cd, false);
    } else {
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t k = 0; k < c; ++k) {
          const double x = static_cast<double>(nodes.first[i] + k) * nodes.step + nodes.d0;
          const double diff = d[i] - x;
          out.tokw[i * c + k] = std::exp(-2.0 * cd * (diff * diff));
        }
      }
      out.tvals.assign(out.row_lo.size(), nodes.step * std::sqrt(4.0 * cd / kPi));
    }
  }
  if (spatial != nullptr) {  // the column sums of the approximated weights, and |.|'s
    const int64_t G = static_cast<int64_t>(out.row_lo.size()), c = out.order;
    std::vector<double> ones(G, 0.0), aones(G, 0.0), y1(G, 0.0), ay1(G, 0.0);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t k = 0; k < c; ++k) {
        ones[out.tok[i] + k] += out.tokw[i * c + k];
        aones[out.tok[i] + k] += std::fabs(out.tokw[i * c + k]);
      }
    }
    int64_t e = 0;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t col = out.row_lo[g]; col < out.row_lo[g] + out.row_len[g]; ++col, ++e) {
        y1[g] += out.tvals[e] * ones[col];
        ay1[g] += std::fabs(out.tvals[e]) * aones[col];
      }
    }
    out.cinv.resize(N);
    for (int64_t i = 0; i < N; ++i) {
      double s = 0.0, as = 0.0;
      for (int64_t k = 0; k < c; ++k) {
        s += out.tokw[i * c + k] * y1[out.tok[i] + k];
        as += std::fabs(out.tokw[i * c + k]) * ay1[out.tok[i] + k];
      }
      const double col = spatial[i] + s - 2.0;
      out.cinv[i] = col > 0 && N > 1 ? 1.0 / col : 0.0;
      out.amp = std::max(out.amp, (spatial[i] + as + 2.0) * out.cinv[i]);
    }
  }
  return out;
}

}  // namespace kvfix::kernels
