"""Mutation check: deliberately broken copies of a kernel must fail the emulated tests.

    python tests/emu/mutation_check.py            # every mutation below
    python tests/emu/mutation_check.py -k barrier # the mutations whose name contains "barrier"

Each mutation replaces one snippet of a kernel source in a temporary overlay directory
(KVFIX_EMU_SRC_OVERLAY: the working tree is never touched), rebuilds the emulated module and
runs the kernel's emulated tests with -x under KVFIX_EMU_SEED=0 (index and thread order), then 1
and 2 (random block and fiber orders), then the ASan build, until one fails. Prints which test caught each mutation; exits 1 if one was not caught.
A mutation whose snippet no longer exists in the source (the kernel changed) is reported as
"n/a" so the list can be kept up to date.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kvemu_build  # noqa: E402


@dataclass
class Mutation:
    name: str
    file: str  # repository-relative
    old: str
    new: str
    tests: str  # pytest target


DSCR = "csrc/kernels/dscr.cuh"
DSCR_TESTS = "tests/emu/test_emu_dscr.py"
LOWRANK = "csrc/kernels/dscr_lowrank.cuh"
LOWRANK_TESTS = "tests/emu/test_emu_dscr_lowrank.py"
KVS = "csrc/kernels/kvsmooth.cuh"
KVS_TESTS = "tests/emu/test_emu_kvsmooth.py"
SCR = "csrc/kernels/scr.cuh"
SCR_TESTS = "tests/emu/test_emu_scr.py"
BAND = "csrc/kernels/dscr_banded.cuh"
BAND_TESTS = "tests/emu/test_emu_dscr_banded.py"
CMAC = "csrc/kernels/cmac.cuh"
CMAC_TESTS = "tests/emu/test_emu_cmac.py"
CMAC_TC = "csrc/kernels/cmac_prefill_tc.cuh"
CMAC_TC_TESTS = "tests/emu/test_emu_cmac_tc.py"
VIEW = "csrc/kernels/view.h"


def cmac_prefill_both(what: str, old: str, new: str) -> list[Mutation]:
    """A mutation of the cmac_detail code both CMAC prefill kernels share (cmac.cuh), checked
    against each kernel's tests: "cmac: <what>" (SIMT) and "cmac tc: <what>" (tensor cores)."""
    return [Mutation(f"cmac: {what}", CMAC, old, new, CMAC_TESTS),
            Mutation(f"cmac tc: {what}", CMAC, old, new, CMAC_TC_TESTS)]


MUTATIONS = [
    Mutation("barrier removed: before a tile's copy (previous tile still being read)", DSCR,
             "__syncthreads();  // the previous tile's readers are done", "//", DSCR_TESTS),
    Mutation("barrier removed: after the copies (tiles incomplete)", DSCR,
             "__syncthreads();  // tiles complete", "//", DSCR_TESTS),
    Mutation("barrier removed: before the column sums", DSCR,
             "__syncthreads();  // every warp is past its last tile", "//", DSCR_TESTS),
    Mutation("wrong tile index: 16-byte tile load reads source rows swapped in pairs", DSCR,
             "*dst = *reinterpret_cast<const uint4*>(src + r * sn + col);",
             "*dst = *reinterpret_cast<const uint4*>(src + (r ^ 1) * sn + col);", DSCR_TESTS),
    Mutation("wrong tile index: scalar tile load reads column + 1", DSCR,
             "? src[r * sn + col] : zero;", "? src[r * sn + col + 1] : zero;", DSCR_TESTS),
    Mutation("wrong tile index: output token tiles spaced TJ + 16 apart", DSCR,
             "const int j0 = jt * TJ;", "const int j0 = jt * (TJ + 16);", DSCR_TESTS),
    Mutation("wrong layout: weight fragment row_major instead of col_major", DSCR,
             "wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;",
             "wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;", DSCR_TESTS),
    Mutation("missing guard: SIMT path stores rows j >= N", DSCR,
             "if (jl >= rows) continue;", "", DSCR_TESTS),
    Mutation("diagonal not masked", DSCR, "il < rows && i != j_own", "il < rows", DSCR_TESTS),
    Mutation("geometry batch offset ignored", DSCR,
             "const float* const dep = a.depth + b * a.geo_sb;", "const float* const dep = a.depth;", DSCR_TESTS),
    # dense DSCR, non-finite geometry on the device (issue 18: the item is written nan, no host read)
    Mutation("dscr nonfinite: not detected (the item refined as if its geometry were finite)", DSCR,
             "if (__syncthreads_or(geo_bad)) {", "if (__syncthreads_or(geo_bad) && false) {", DSCR_TESTS),
    Mutation("dscr nonfinite: the test misses +-inf", DSCR,
             "return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;", "return x != x;", DSCR_TESTS),
    Mutation("dscr nonfinite: coords not scanned", DSCR,
             "geo_bad |= not_finite(dep[i]) | not_finite(crd[2 * i]) | not_finite(crd[2 * i + 1]);",
             "geo_bad |= not_finite(dep[i]);", DSCR_TESTS),
    # structured DSCR (dscr_lowrank.cuh)
    Mutation("lowrank: barrier removed before a segment's coefficients are staged", LOWRANK,
             "__syncthreads();  // the previous segment's coefficients are no longer read", "//", LOWRANK_TESTS),
    Mutation("lowrank: barrier removed after the coefficients are staged", LOWRANK,
             "      __syncthreads();\n      if (d < a.D) {\n        for (int64_t w = 0; w < nw; ++w) {",
             "      if (d < a.D) {\n        for (int64_t w = 0; w < nw; ++w) {", LOWRANK_TESTS),
    Mutation("lowrank: wrong index: depth factor of the next token", LOWRANK,
             "c = u[(row * a.gw + w) * a.rd + (f - a.pc)];", "c = u[(row * a.gw + w + 1) * a.rd + (f - a.pc)];",
             LOWRANK_TESTS),
    Mutation("lowrank: every block reduces the first factor chunk", LOWRANK,
             "f0 = int64_t(blockIdx.y) * kDscrLowrankChunk", "f0 = 0", LOWRANK_TESTS),
    Mutation("lowrank: missing guard: pass 1 stores columns d >= D", LOWRANK,
             "    if (d < a.D) {\n#pragma unroll\n      for (int j = 0; j < kDscrLowrankChunk; ++j) {",
             "    {\n#pragma unroll\n      for (int j = 0; j < kDscrLowrankChunk; ++j) {", LOWRANK_TESTS),
    Mutation("lowrank: diagonal subtracted once instead of twice", LOWRANK,
             "float acc = -2.0f * xv;", "float acc = -1.0f * xv;", LOWRANK_TESTS),
    Mutation("lowrank: column-sum batch offset ignored", LOWRANK,
             "a.cinv + (a.u_sb == 0 ? 0 : b * (a.u_sb / rd)) + i0", "a.cinv + i0", LOWRANK_TESTS),
    # KVSmooth (kvsmooth.cuh)
    Mutation("kvsmooth: barrier removed after the query rows are staged", KVS,
             "    __syncthreads();\n\n    float m[GP], l[GP], u[GP];", "\n    float m[GP], l[GP], u[GP];", KVS_TESTS),
    Mutation("kvsmooth: barrier removed before the row groups' states are merged", KVS,
             "    __syncthreads();\n    if (tid < gn) {", "    if (tid < gn) {", KVS_TESTS),
    Mutation("kvsmooth: mask ignored", KVS, "bias = Mask::at(a.mask, b, 0, 0, t);", "bias = 0.0f;", KVS_TESTS),
    Mutation("kvsmooth: every split writes the first split's slot", KVS,
             "((b * a.Hq + h * g + h0 + tid) * S + split) * 3", "((b * a.Hq + h * g + h0 + tid) * S) * 3", KVS_TESTS),
    Mutation("kvsmooth: logit scale dropped", KVS, "dot[j] * a.scale + bias", "dot[j] + bias", KVS_TESTS),
    Mutation("kvsmooth: EMA not skipped when position T - 2 is masked", KVS,
             "if (valid && (n < 2 || !(Mask::at(a.mask, b, 0, 0, n - 2) > neg_inf()))) lam = 0.0f;",
             "if (valid && n < 2) lam = 0.0f;", KVS_TESTS),
    Mutation("kvsmooth: a device position's later positions take part (the partial reads all T)", KVS,
             "const int64_t t1 = t0 + per < n ? t0 + per : n;", "const int64_t t1 = t0 + per < a.T ? t0 + per : a.T;",
             KVS_TESTS),
    Mutation("kvsmooth: a device position off by one (positions [0, p) take part, p - 1 smoothed)", KVS,
             "return p >= 0 && p < T ? p + 1 : 0;", "return p >= 0 && p < T ? p : 0;", KVS_TESTS),
    Mutation("kvsmooth: a position outside [0, T) not refused (read and written past the cache)", KVS,
             "return p >= 0 && p < T ? p + 1 : 0;", "return p + 1;", KVS_TESTS),
    Mutation("kvsmooth: the EMA writes T - 1 whatever the device position", KVS,
             "    T* last = base + (n - 1) * st + d;\n    const float prev = Num<T>::to_f(base[(n - 2) * st + d]);",
             "    T* last = base + (a.T - 1) * st + d;\n    const float prev = Num<T>::to_f(base[(a.T - 2) * st + d]);",
             KVS_TESTS),
    Mutation("kvsmooth: rank counts the entries strictly below z (#{< z}: ties and z itself left out)", KVS,
             "k += row[i * a.qu_sm] <= z ? 1 : 0;", "k += row[i * a.qu_sm] < z ? 1 : 0;", KVS_TESTS),
    Mutation("kvsmooth: rank leaves z itself out (the entries before the push that are <= z)", KVS,
             "for (int64_t i = 0; i < M; ++i) k += row[i * a.qu_sm] <= z",
             "for (int64_t i = 0; i + 1 < M; ++i) k += row[i * a.qu_sm] <= z", KVS_TESTS),
    Mutation("kvsmooth: rank counts z but not the entries equal to it (ties)", KVS,
             "k += row[i * a.qu_sm] <= z ? 1 : 0;", "k += (row[i * a.qu_sm] < z || i + 1 == M) ? 1 : 0;", KVS_TESTS),
    Mutation("kvsmooth: a +inf max not taken as no softmax (a row whose only key is +inf gets entropy 0)", KVS,
             "return l != l || m > 3.402823466e38f;", "return l != l;", KVS_TESTS),
    Mutation("kvsmooth: an empty state starts at m = -inf (a -inf logit then turns it nan)", KVS,
             "m[j] = kFoldEmpty;", "m[j] = neg_inf();", KVS_TESTS),
    Mutation("kvsmooth: the d >= -104 clamp dropped (a -inf logit adds 0 * -inf = nan)", KVS,
             "u = fmaf(e, fmaxf(d, -104.0f), u);", "u = fmaf(e, d, u);", KVS_TESTS),
    Mutation("kvsmooth: a nan bias treated as a masked position", KVS,
             "if (bias != neg_inf()) {", "if (bias > neg_inf()) {", KVS_TESTS),
    Mutation("kvsmooth: the merge drops a nan split (the original empty test !(l2 > 0))", KVS,
             "  if (l2 == 0.0f) return;\n  if (l == 0.0f) {", "  if (!(l2 > 0.0f)) return;\n  if (!(l > 0.0f)) {",
             KVS_TESTS),
    Mutation("kvsmooth: a nan z gets a rank (lam from the band instead of nan)", KVS,
             "if (z != z) lam = z;", "", KVS_TESTS),
    Mutation("kvsmooth: every layer of a launch reads layer 0's keys", KVS,
             "static_cast<const T*>(ls.k[blockIdx.y]) + b * a.k_sb", "static_cast<const T*>(ls.k[0]) + b * a.k_sb",
             KVS_TESTS),
    Mutation("kvsmooth: every layer of a launch writes layer 0's partial states", KVS,
             "s_wp = ls.work[blockIdx.y];", "s_wp = ls.work[0];", KVS_TESTS),
    Mutation("kvsmooth: every layer of a launch writes layer 0's lam", KVS,
             "ls.lam[layer][b] = lam;", "ls.lam[0][b] = lam;", KVS_TESTS),
    Mutation("kvsmooth: layers with different masks share a launch", KVS,
             "m.data == n.data && m.kind == n.kind", "m.kind == n.kind", KVS_TESTS),
    Mutation("kvsmooth: more layers in a launch than its table holds", KVS,
             "i0 + m < n && m < kKvsMaxLayers &&", "i0 + m < n &&", KVS_TESTS),
    Mutation("kvsmooth: a misaligned layer shares a launch with aligned ones (16-byte loads of its keys)", KVS,
             "         aligned16(x.k) == aligned16(y.k);", "         true;", KVS_TESTS),
    # SCR (scr.cuh)
    Mutation("scr: a +inf logit that is its row's only key poisons one column only", SCR,
             "  if (!(x <= 3.402823466e38f)) {\n    l = __int_as_float(0x7fffffff);\n    return;\n  }\n", "",
             SCR_TESTS),
    Mutation("scr: a nan row adds nan only to the columns it sees", SCR,
             "(x != neg_inf() || stats[2 * i + 1] != stats[2 * i + 1])", "x != neg_inf()", SCR_TESTS),
    Mutation("scr: causal rows before the column tile's first visible row not checked for nan", SCR,
             "      if (stats[2 * i + 1] != stats[2 * i + 1]) acc = stats[2 * i + 1];", "      (void)0;", SCR_TESTS),
    Mutation("scr: barrier removed before the warps' partial sums are read", SCR,
             "  part[warp][lane] = acc;\n  __syncthreads();", "  part[warp][lane] = acc;", SCR_TESTS),
    Mutation("scr: selection barrier removed before a score tile is overwritten", SCR,
             "    __syncthreads();\n    if (p0 + threadIdx.x < a.N) {", "    if (p0 + threadIdx.x < a.N) {", SCR_TESTS),
    Mutation("scr: selection barrier removed after a score tile is staged", SCR,
             "    __syncthreads();\n    const int64_t len = a.N - p0", "    const int64_t len = a.N - p0", SCR_TESTS),
    Mutation("scr: equal scores not ranked by index", SCR,
             "(sp > sn || (sp == sn && p0 + e < n))", "(sp > sn)", SCR_TESTS),
    Mutation("scr: 16-byte accesses whatever the tensors' alignment", SCR,
             "const bool ok = aligned16(a.hidden) && aligned16(a.out) && a.C % v == 0 &&",
             "const bool ok = a.C % v == 0 &&", SCR_TESTS),
    Mutation("scr: the second access of a thread's iteration is loaded but not written", SCR,
             "      E o = x[u];", "      if (u == 1) break;\n      E o = x[u];", SCR_TESTS),
    Mutation("scr: a neighbour row's sum starts from its first access's sum", SCR,
             "      for (int q = 0; q < V; ++q) acc[u][q] = 0.0f;", "      for (int q = 0; q < V; ++q) acc[u][q] = acc[0][q];",
             SCR_TESTS),
    Mutation("scr: border patches not excluded", SCR,
             "return r > 0 && r < a.gh - 1 && c > 0 && c < a.gw - 1;", "return true;", SCR_TESTS),
    Mutation("scr: neighbour window shifted one column", SCR,
             "(w % 3 - 1)) * a.h_sn + c)", "(w % 3)) * a.h_sn + c)", SCR_TESTS),
    Mutation("scr: causal rows start one tile late", SCR,
             "first = need > 0 ? (need / kScrRows) * kScrRows : 0;",
             "first = need > 0 ? (need / kScrRows + 1) * kScrRows : 0;", SCR_TESTS),
    Mutation("scr: mass pass not shifted by the row max (exp(x) / exp(m) overflows for large logits)", SCR,
             "acc += expf(x - mi) / li;", "acc += expf(x) / expf(mi) / li;", SCR_TESTS),
    Mutation("scr: non-finite scores not detected (the item ranked as if they were finite)", SCR,
             "not_finite ? 2 : (mine", "(mine", SCR_TESTS),
    Mutation("scr: the non-finite test misses +-inf", SCR,
             "if ((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) not_finite", "if (v != v) not_finite",
             SCR_TESTS),
    Mutation("scr: non-finite scores looked for in the first tile only", SCR,
             "if ((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) not_finite",
             "if (p0 == 0 && (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) not_finite", SCR_TESTS),
    # banded structured DSCR (dscr_banded.cuh)
    Mutation("banded: barrier removed after phase A (M and Z incomplete)", BAND,
             "      __syncthreads();\n      if (cnt == 1 && grp == 0) {", "      if (cnt == 1 && grp == 0) {",
             BAND_TESTS),
    Mutation("banded: barrier removed after the segment slots are merged into M", BAND,
             "__syncthreads();  // M complete", "//", BAND_TESTS),
    Mutation("banded: slot merge keeps a node's last part only", BAND,
             "acc += slot_val[e][lane];", "acc = slot_val[e][lane];", BAND_TESTS),
    Mutation("banded: a chunk's last segment written to M directly (its continuation lost)", BAND,
             "(q == c1 ? 2 * grp + 1 : -1)", "-1", BAND_TESTS),
    Mutation("banded: nodes without tokens not zeroed", BAND,
             "if (st[n] == st[n + 1]) ms[n * kDscrBandedCols + lane] = 0.0f;", "(void)st;", BAND_TESTS),
    Mutation("banded: barrier removed after phase B (Y incomplete)", BAND,
             "      __syncthreads();\n      // C: the column pass", "      // C: the column pass", BAND_TESTS),
    Mutation("banded: barrier removed before the next item overwrites the scratch", BAND,
             "__syncthreads();  // the next item overwrites the scratch", "//", BAND_TESTS),
    Mutation("banded: prep placement sync removed (a cursor moved before the warp has read it)", BAND,
             "__syncwarp();  // every lane has read its cursor", "//", BAND_TESTS),
    Mutation("banded: prep scan adds the shuffled value on every lane", BAND,
             "if (lane >= o) v += u;", "v += u;", BAND_TESTS),
    Mutation("banded: prep counts at the token's node instead of one past it", BAND,
             "atomicAdd(&st[tok[i] + 1], 1)", "atomicAdd(&st[tok[i]], 1)", BAND_TESTS),
    Mutation("banded: M sums one node too many (tokens whose nodes end below g)", BAND,
             "st[n - cnt + 1 > 0 ? n - cnt + 1 : 0]", "st[n - cnt > 0 ? n - cnt : 0]", BAND_TESTS),
    Mutation("banded: row pass reads across the row end", BAND,
             "if (w + k < gw) acc +=", "if (w + k <= gw) acc +=", BAND_TESTS),
    Mutation("banded: column pass steps gh instead of gw tokens", BAND,
             "if (r + k < gh) acc += band[k] * zp[k * gw * kDscrBandedCols];",
             "if (r + k < gh) acc += band[k] * zp[k * gh * kDscrBandedCols];", BAND_TESTS),
    Mutation("banded: Y = T M reads M from the row's first node for every entry", BAND,
             "acc += t[e] * mp[e * kDscrBandedCols];", "acc += t[e] * mp[0];", BAND_TESTS),
    Mutation("banded: depth gather uses only the first node's weight", BAND,
             "acc += wv[c] * yp[c * kDscrBandedCols];", "acc += wv[0] * yp[c * kDscrBandedCols];", BAND_TESTS),
    Mutation("banded: diagonal subtracted once instead of twice", BAND,
             "(acc - 2.0f * Num<T>::to_f(xv)) * ci", "(acc - Num<T>::to_f(xv)) * ci", BAND_TESTS),
    Mutation("banded: row pass accumulated in the element type", BAND,
             "acc += band[k] * Num<T>::to_f(xr[(w - k) * x_sn]);",
             "acc = Num<T>::to_f(Num<T>::from_f(acc + band[k] * Num<T>::to_f(xr[(w - k) * x_sn])));", BAND_TESTS),
    Mutation("banded: structure batch offset ignored", BAND,
             "bd = s.Bd == 1 ? 0 : b;", "bd = 0;", BAND_TESTS),
    Mutation("banded: tensor table picks the previous tensor at its first item", BAND,
             "item >= a.t[p].item0", "item > a.t[p].item0", BAND_TESTS),
    Mutation("banded: prep does not check the tokens' nodes", BAND,
             "ok = tok[i] >= 0 && tok[i] + c <= Gi;", "ok = true;", BAND_TESTS),
    Mutation("banded: keep rule (cinv == 0) not applied", BAND,
             "ci != 0.0f ? Num<T>::from_f", "true ? Num<T>::from_f", BAND_TESTS),
    # the mask reader every kernel uses (view.h), caught by the CMAC tests (bool and per-row masks)
    Mutation("mask reader: a bool mask read inverted", VIEW, "[off] ? 0.0f : -INFINITY", "[off] ? -INFINITY : 0.0f",
             CMAC_TESTS),
    Mutation("mask reader: the row stride ignored", VIEW, "h * m.sh + i * m.si + t * m.st", "h * m.sh + t * m.st",
             CMAC_TESTS),
    # CMAC (cmac.cuh)
    # the query-tile split both prefill kernels share (cmac_detail::query_tile): the last tile before
    # the image's end runs on into after-image rows, which the first after-image tile also writes;
    # which block's rows survive depends on the block order (a race on a GPU)
    *cmac_prefill_both("a before-image query tile runs into the after-image rows (blocks race on them)",
                       "return {i0, i0 + QT < i_after ? i0 + QT : i_after};",
                       "return {i0, i0 + QT < Tq ? i0 + QT : Tq};"),
    Mutation("cmac: barrier removed before a K/V tile is overwritten", CMAC,
             "__syncthreads();  // the previous tile's readers are done (and qs is written, first time)", "//",
             CMAC_TESTS),
    Mutation("cmac: barrier removed after a K/V tile is staged", CMAC,
             "    __syncthreads();\n    if (tile_imd) {", "    if (tile_imd) {", CMAC_TESTS),
    Mutation("cmac: calibrated image keys ignored", CMAC,
             "const bool cal = image && after && a.kc != nullptr;", "const bool cal = false;", CMAC_TESTS),
    Mutation("cmac: CMPC anchored at the image start (the pre-2026-12 calibration)", CMAC,
             "int64_t p = t, anchor = e;", "int64_t p = t, anchor = s;", CMAC_TESTS),
    Mutation("cmac: CMPC anchor read past the sequence when the span ends it", CMAC,
             "anchor = e < a.T ? pr[e] : pr[e - 1] + 1;", "anchor = e < a.T ? pr[e] : pr[e - 1];", CMAC_TESTS),
    # the logit masking (cmac_detail::masked_logit; decode uses it too) and the per-tile prologue
    # (cmac_detail::prefill_tile) both prefill kernels share
    *cmac_prefill_both("causal mask dropped", "if (a.causal && j > qpos) return -INFINITY;", ""),
    *cmac_prefill_both("mask ignored", "const float bias = Mask::at(a.mask, b, h, i, j);", "const float bias = 0.0f;"),
    *cmac_prefill_both("threshold averaged over every query row", "mu_p_of(a, b, a.Tq - t.i_after, lane)",
                       "mu_p_of(a, b, a.Tq, lane)"),
    *cmac_prefill_both("the first after-image query tile taken as before the image", "t.after = t.i0 >= t.i_after;",
                       "t.after = t.i0 > t.i_after;"),
    Mutation("cmac rope: only the first round of a lane's frequency pairs", CMAC,
             "for (int64_t f0 = lane; f0 < half; f0 += 32 * P)",
             "for (int64_t f0 = lane; f0 < half && f0 < 32 * P; f0 += 32 * P)", CMAC_TESTS),
    Mutation("cmac rope: every warp of a block rotates the block's first token", CMAC,
             "blockIdx.x) * (kCmacThreads / 32) + threadIdx.x / 32;", "blockIdx.x) * (kCmacThreads / 32);",
             CMAC_TESTS),
    Mutation("cmac rope: the second frequency of a pair reads the first's element", CMAC,
             "x2[i] = cmac_detail::ld(x + f + half);", "x2[i] = cmac_detail::ld(x + f);", CMAC_TESTS),
    Mutation("cmac: contrastive row max skips nan (a row with a nan logit keeps its other tokens)", CMAC,
             "mx = fmaxf(mx, v == v ? v : INFINITY);", "mx = fmaxf(mx, v);", CMAC_TESTS),
    Mutation("cmac: contrastive row max taken from the block's own chunk only", CMAC,
             "mx = fmaxf(mx, a.part[row * chunks + k]);", "mx = fmaxf(mx, a.part[blockIdx.x]);", CMAC_TESTS),
    Mutation("cmac: contrastive 16-byte accesses whatever the alignment", CMAC,
             "return aligned16(a.l) && aligned16(a.lt) && aligned16(a.out) && a.V % v == 0",
             "return a.V % v == 0", CMAC_TESTS),
    Mutation("cmac: contrastive chunk max ends one access early", CMAC,
             "    if (j >= a.V) break;\n#pragma unroll\n    for (int q = 0; q < V; ++q) {\n      const float v =",
             "    if (j + kCmacThreads * V >= a.V) break;\n#pragma unroll\n    for (int q = 0; q < V; ++q) {\n"
             "      const float v =", CMAC_TESTS),
    Mutation("cmac: attention row max skips nan (a row of nan logits comes out 0)", CMAC,
             "cmac_detail::warp_max(x == x ? x : INFINITY)", "cmac_detail::warp_max(x)", CMAC_TESTS),
    Mutation("cmac: image-value mean term dropped", CMAC,
             "(acc[r][c] + (use_imd ? im[r] * vsum[c] : 0.0f)) * inv", "acc[r][c] * inv", CMAC_TESTS),
    Mutation("cmac decode: barrier removed before the key groups' states are merged", CMAC,
             "__syncthreads();  // every group's state is in shared memory", "//", CMAC_TESTS),
    Mutation("cmac decode: merge barrier removed before the split weights are read", CMAC,
             "__syncthreads();  // the weights, value sums and warp partials are in shared memory", "//", CMAC_TESTS),
    Mutation("cmac decode: every split takes the first split's keys", CMAC,
             "j_lo = split * per,", "j_lo = 0 * per,", CMAC_TESTS),
    Mutation("cmac decode: key groups merged without rescaling to the block max", CMAC,
             "w[g] = sst[g][0] == -INFINITY ? 0.0f : __expf(sst[g][0] - mb);",
             "w[g] = sst[g][0] == -INFINITY ? 0.0f : 1.0f;", CMAC_TESTS),
    Mutation("cmac decode: an empty split not weighed 0 (a row without keys turns nan)", CMAC,
             "ws[threadIdx.x] = mk == -INFINITY ? 0.0f : __expf(mk - mx);", "ws[threadIdx.x] = __expf(mk - mx);",
             CMAC_TESTS),
    Mutation("cmac decode: the group's dot-product reduction skips a step", CMAC,
             "for (int o = 8; o > 0; o >>= 1) dot +=", "for (int o = 4; o > 0; o >>= 1) dot +=", CMAC_TESTS),
    Mutation("cmac decode: image value sum takes every key", CMAC,
             "    if (use_imd && image) {\n#pragma unroll\n      for (int c = 0; c < NC; ++c)",
             "    if (use_imd) {\n#pragma unroll\n      for (int c = 0; c < NC; ++c)", CMAC_TESTS),
    Mutation("cmac decode: row max skips nan (a nan row comes out finite)", CMAC,
             "fmaxf(m, xv == xv ? xv : INFINITY)", "fmaxf(m, xv)", CMAC_TESTS),
    Mutation("cmac: 16-byte loads unpack the two halves of a word swapped", CMAC,
             "out[2 * e] = Num<T>::bits_to_f(static_cast<uint16_t>(u[e] & 0xffffu));",
             "out[2 * e] = Num<T>::bits_to_f(static_cast<uint16_t>(u[e] >> 16));", CMAC_TESTS),
    Mutation("cmac threshold: every chunk sums the first chunk's image keys", CMAC,
             "t0 = c * len,", "t0 = 0 * len,", CMAC_TESTS),
    Mutation("cmac threshold: the caller's mean key divided by N again", CMAC,
             "(km != nullptr ? tot : tot / static_cast<float>(e - s))", "tot / static_cast<float>(e - s)", CMAC_TESTS),
    Mutation("cmac decode: the caller's mean key ignored (threshold partials read, none written)", CMAC,
             "if (use_imd && a.kmean == nullptr)", "if (use_imd)", CMAC_TESTS),
    Mutation("cmac decode: the mean-key threshold from the first kv head's query heads only", CMAC,
             "for (int hk = 0; hk < Hkv; ++hk, mk += D)", "for (int hk = 0; hk < 1; ++hk, mk += D)", CMAC_TESTS),
    Mutation("cmac decode: the mean-key threshold's barrier removed", CMAC,
             "__syncthreads();  // the warps' sums are in shared memory", "//", CMAC_TESTS),
    # CMAC prefill on tensor cores (cmac_prefill_tc.cuh)
    Mutation("cmac tc: barrier removed before the K and V tiles are overwritten", CMAC_TC,
             "__syncthreads();  // the previous tile's readers are done", "//", CMAC_TC_TESTS),
    Mutation("cmac tc: barrier removed after the K and V tiles are staged", CMAC_TC,
             "__syncthreads();  // the K and V tiles are staged", "//", CMAC_TC_TESTS),
    Mutation("cmac tc: staged tiles not zeroed past the last row (shared-memory poison reaches the products)",
             CMAC_TC, "    } else {\n#pragma unroll\n      for (int x = 0; x < CH; ++x) o[x] = zero;\n    }", "    }",
             CMAC_TC_TESTS),
    Mutation("cmac tc: element-wise staging reads past D instead of zero padding", CMAC_TC,
             "o[x] = d0 + x < D ? src[d0 + x] : zero;", "o[x] = src[d0 + x];", CMAC_TC_TESTS),
    Mutation("cmac tc: 16-byte staging copies a row's chunks swapped in pairs", CMAC_TC,
             "*reinterpret_cast<const uint4*>(row(r) + d0);", "*reinterpret_cast<const uint4*>(row(r) + (d0 ^ CH));",
             CMAC_TC_TESTS),
    Mutation("cmac tc: K fragment row_major (S = Q K instead of Q K^T)", CMAC_TC,
             "wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fk;",
             "wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fk;", CMAC_TC_TESTS),
    Mutation("cmac tc: calibrated image keys ignored", CMAC_TC,
             "return cal && j0 - s + j < a.N ?", "return false && j0 - s + j < a.N ?", CMAC_TC_TESTS),
    Mutation("cmac tc: key tiles not cut at the span's end", CMAC_TC,
             "    else if (j0 < e) j1 = j1 < e ? j1 : e;\n", "", CMAC_TC_TESTS),
    Mutation("cmac tc: GQA maps query head h to kv head h % Hkv", CMAC_TC,
             "const int64_t hk = h / (a.Hq / a.Hkv);", "const int64_t hk = h % a.Hkv;", CMAC_TC_TESTS),
    Mutation("cmac tc: a nan logit's p taken as 0 (a row of nan logits comes out finite)", CMAC_TC,
             "const float p = x[c] == -INFINITY ? 0.0f", "const float p = !(x[c] > -INFINITY) ? 0.0f", CMAC_TC_TESTS),
    Mutation("cmac tc: a tile's row max not combined over the row's two lanes", CMAC_TC,
             "    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));\n", "", CMAC_TC_TESTS),
    Mutation("cmac tc: accumulators not rescaled when a row's max moves", CMAC_TC,
             "if (__any_sync(0xffffffffu, rescale)) {", "if (false) {", CMAC_TC_TESTS),
    Mutation("cmac tc: rescale takes the factor of lane rr instead of 2 rr", CMAC_TC,
             "alpha, 2 * (el >> 4));", "alpha, (el >> 4));", CMAC_TC_TESTS),
    Mutation("cmac tc: l not rescaled when a row's max moves", CMAC_TC, "      l *= alpha;\n", "", CMAC_TC_TESTS),
    Mutation("cmac tc: barrier removed before the warps' value sums are combined", CMAC_TC,
             "__syncthreads();  // the warps' value sums are in shared memory", "//", CMAC_TC_TESTS),
    Mutation("cmac tc: mu_V from warp 0's value sums only", CMAC_TC,
             "vsum[c] += vpart[w * DMAX + d];", "vsum[c] += w == 0 ? vpart[d] : 0.0f;", CMAC_TC_TESTS),
    Mutation("cmac tc: blocks of items b > 0 computed for item 0", CMAC_TC,
             "const int64_t h = bh % a.Hq, b = bh / a.Hq;", "const int64_t h = bh % a.Hq, b = 0 * bh;", CMAC_TC_TESTS),
    Mutation("cmac tc: IMD hits not zeroed in P", CMAC_TC, "= Num<T>::from_f(p - ph);", "= Num<T>::from_f(p);",
             CMAC_TC_TESTS),
    Mutation("cmac tc: image-value mean term dropped", CMAC_TC,
             "(stg[el] + (use_imd ? im_r * muv[d] : 0.0f)) * inv_r", "stg[el] * inv_r", CMAC_TC_TESTS),
    Mutation("cmac tc: image value sum takes every key tile", CMAC_TC,
             "    if (tile_imd) {\n#pragma unroll\n      for (int c = 0; c < DMAX / 32; ++c) {",
             "    if (use_imd) {\n#pragma unroll\n      for (int c = 0; c < DMAX / 32; ++c) {", CMAC_TC_TESTS),
    Mutation("cmac tc: a row's sum l not combined over its two lanes", CMAC_TC,
             "  l += __shfl_xor_sync(0xffffffffu, l, 1);\n", "", CMAC_TC_TESTS),
    Mutation("cmac tc: output rows take the row statistics of lane rr instead of 2 rr", CMAC_TC,
             "__shfl_sync(0xffffffffu, inv, 2 * rr)", "__shfl_sync(0xffffffffu, inv, rr)", CMAC_TC_TESTS),
    Mutation("cmac tc: dispatch sends decode (Tq == 1) to the prefill kernel", CMAC_TC,
             "return a.Tq > 1 && a.D >= 1", "return a.Tq >= 1 && a.D >= 1", CMAC_TC_TESTS),
]


def _run(tests: str, env: dict[str, str]) -> tuple[bool, str]:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["KVFIX_EMU_QUIET"] = "1"
    # -v names each test before it runs; --capture=sys leaves fd 2 alone, so an ASan report or a
    # crash of the test process is not swallowed by pytest's output capture
    cmd = [sys.executable, "-m", "pytest", tests, "-x", "-v", "-rf", "-p", "no:cacheprovider", "--capture=sys"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if "BuildError" in r.stdout or "building emulated module" in r.stdout:
        return False, "the mutated source does not compile"
    m = re.search(r"^(FAILED|ERROR) (\S+)", r.stdout, re.M)
    if m:
        return True, m.group(2)
    out = r.stdout + r.stderr
    started = re.findall(r"^(tests/\S+::\S+)", r.stdout, re.M)
    during = f" during {started[-1]}" if started else ""
    if "ERROR: AddressSanitizer" in out:
        s = re.search(r"SUMMARY: AddressSanitizer: (.*)", out)
        return True, f"AddressSanitizer {s.group(1) if s else 'error'}{during}"
    if r.returncode < 0 or "Fatal Python error" in out:
        how = f"signal {-r.returncode}" if r.returncode < 0 else "fatal error"
        return True, f"the test process crashed ({how}){during}"
    return r.returncode != 0, out[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--no-asan", action="store_true")
    ap.add_argument("--config", action="append", choices=["seed0", "seed1", "seed2", "asan"],
                    help="run only these configurations (default: all, in order, until one fails)")
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("KVFIX_EMU_ASAN", "KVFIX_EMU_SEED", "KVFIX_EMU_SRC_OVERLAY")}
    configs = [("seed 0", {"KVFIX_EMU_SEED": "0"}), ("seed 1", {"KVFIX_EMU_SEED": "1"}),
               ("seed 2", {"KVFIX_EMU_SEED": "2"})]
    if not a.no_asan:
        configs.append(("asan", {**kvemu_build.asan_env({}), "KVFIX_EMU_ASAN": "1", "KVFIX_EMU_SEED": "0"}))
    if a.config:
        configs = [c for c in configs if c[0].replace(" ", "") in a.config]
    missed = 0
    for mut in MUTATIONS:
        if a.k not in mut.name:
            continue
        src = (REPO / mut.file).read_text(encoding="utf-8")
        if src.count(mut.old) != 1:
            print(f"n/a      {mut.name}: snippet not found once in {mut.file}", flush=True)
            continue
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kvemu-mut-") as ov:
            dest = Path(ov) / mut.file
            dest.parent.mkdir(parents=True)
            dest.write_text(src.replace(mut.old, mut.new), encoding="utf-8")
            caught, note = None, ""
            for cname, cenv in configs:
                failed, where = _run(mut.tests, {**base, **cenv, "KVFIX_EMU_SRC_OVERLAY": ov})
                if failed:
                    caught = (cname, where)
                    break
                if where == "the mutated source does not compile":
                    note = f": {where} (fix the mutation)"
                    break
        dt = time.monotonic() - t0
        if caught:
            print(f"caught   {mut.name}: {caught[0]}, {caught[1]} ({dt:.0f} s)", flush=True)
        else:
            missed += 1
            print(f"MISSED   {mut.name}{note} ({dt:.0f} s)", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
