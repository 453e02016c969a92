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

}  // namespace kvfix::kernels
