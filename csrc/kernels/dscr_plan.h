// Host-side planning of banded structured DSCR (kvfix/dscr_structured.py): the per-entry loop of a
// new image's plan. Plain C++ (no CUDA, no torch), so that the ATen op (csrc/cpu/dscr_plan.cpp,
// kvfix::dscr_fit_rows, which the planner calls) and the SIMT emulator's dscr_banded module (whose
// tests build their structures with kvfix/dscr_structured.py loaded on its own, without the
// compiled extension) run this same source.
#pragma once

#include <cmath>
#include <cstdint>

namespace kvfix::kernels {

// Rows of the "values" node kernel fitted to the depths (`_atom_rows_fitted`). Nodes e[0..G):
// distinct depths in increasing order, counts[g] tokens each. Row g's candidate entries are the
// nodes [row_lo[g], row_lo[g] + row_len[g]), a window that holds g. Taken farthest from e[g] first
// (equal distances: the lower node first), entries are dropped while the weight dropped so far,
// sum of counts[g'] exp(-cd (e[g] - e[g'])^2) over them (an exponent below -87 counts 0), stays
// <= allowed. Each side of g is in distance order already (e increases), so the order is a merge
// of the two ends and what is kept is a window again: [kept_lo[g], kept_lo[g] + kept_len[g])
// (empty at g, length 0, if every entry is dropped); dropped[g] is the weight dropped from row g.
//
// The weights are summed in that order into one running sum over all the rows, a row's dropped
// weight so far being the sum less its value where the row started: what the numpy planner
// computed with one cumsum over every row, so that the plans stay the same (exp's last-bit
// rounding aside).
inline void dscr_fit_rows(const double* e, const int64_t* counts, const int64_t* row_lo, const int64_t* row_len,
                          int64_t G, double cd, double allowed, int64_t* kept_lo, int64_t* kept_len,
                          double* dropped) {
  double run = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    const double base = run;
    int64_t left = row_lo[g], right = row_lo[g] + row_len[g] - 1;
    int64_t lo = g, hi = g - 1;  // the kept window [lo, hi]
    bool dropping = true;
    double gone = 0.0;
    while (left <= right) {
      const double dl = std::fabs(e[g] - e[left]), dr = std::fabs(e[g] - e[right]);
      const bool take_left = dl >= dr;
      const double dist = take_left ? dl : dr;
      const double ex = -cd * dist * dist;
      const double v = ex < -87.0 ? 0.0 : static_cast<double>(counts[take_left ? left : right]) * std::exp(ex);
      run += v;
      if (dropping) {
        if (run - base <= allowed) {
          gone += v;
        } else {  // this entry and every nearer one stay
          dropping = false;
          lo = left;
          hi = right;
        }
      }
      if (take_left) {
        ++left;
      } else {
        --right;
      }
    }
    kept_lo[g] = lo;
    kept_len[g] = hi - lo + 1;
    dropped[g] = gone;
  }
}

}  // namespace kvfix::kernels
