"""Structured DSCR on a patch grid: the plan (algorithm, error bound, cost) and the factors.

On a row-major gh x gw grid with `patch_coords(gh, gw, unit=grid_unit)` the proximity is a sum
of two kernels (METHODS §1), `wt = f_d + f_s`, `f_d = exp(-cd (d_i - d_j)^2)`, `f_s = exp(-cs |s_i -
s_j|^2)`, with the dense backends' cut-off (an exponent below -87 counts as 0). Two structured
variants compute `k_hat_j = (sum_i wt~(i, j) x_i - 2 x_j) / c~_j` (the unmasked diagonal is
exactly 2) with approximated weights wt~ whose column sums c~_j are computed from the same wt~.
Both come with an a-priori bound of the approximation error, kept below the output dtype's
rounding; "auto" picks the variant (or the dense kernel) that its cost model says is fastest.

Error bound (common to both). If every column of wt~ differs from wt by at most
`E = max_j sum_i |wt~(i, j) - wt(i, j)|`, numerator and column sum are off by at most `E max|x|`
and `E`, and since |k_hat_j| <= max|x| (a convex combination):

    |k_hat~_j - k_hat_j| <= 2 E max|x| / (c_min - E),

with `c_min` a lower bound of every column sum c_j. `DscrPlan.bound` is this, relative to max|x|
of each feature column, in exact arithmetic; tol(dtype) = 2^-27 (float32), 2^-14 (float16),
2^-11 (bfloat16), a fraction of the output's unit roundoff. Floating-point rounding is separate
(`round_est`, an estimate).

Banded (the default units: patch coordinates, depth in [0, 255]; CPU, csrc/cpu/dscr_banded.cpp, and
CUDA, csrc/kernels/dscr_banded.cuh).
Both kernels are local there: in patch units `f_s` is `s_|da| s_|dc|` with `s_k = exp(-cs' k^2)`
(cs' = cs / G^2, G = 1 in patch units), 0.33 for a side neighbour and below float32 rounding a
few patches away; in depth, `f_d` is below `exp(-87)` beyond `sqrt(87 / cd)` = 10.2 levels at the
defaults. So

    wt~ = S_K (x) S_K + A^T T A,

- spatial: the two axis kernels cut to the band |k| <= K, applied as two 1-D passes over the
  grid (2 (2K + 1) multiply-adds per token). Dropped weight per column <= `tail_r tot_c + tot_r
  tail_c` (tot: an axis's full two-sided sum of s_k, tail: its part beyond K); K is the
  smallest with this <= E_max / 4 (K = 4 at the defaults for float32, 3 for bfloat16).
  Every token has a grid neighbour, so `c_min = (sum_k s_k over an axis's end row)^2 - 1`
  (0.77 at the defaults on grids of at least 2 x 2; 0.33 for 1 x N) bounds c_j from below.
- depth: `A` [G x N] maps tokens to depth nodes and `T` [G x G] is the node kernel, banded in
  the nodes' depth order (row g non-zero on consecutive nodes). Per image (per batch item) the
  plan builds one of:
  - "values": a node per distinct depth value (tokens of one value share it: exact); the dropped
    entries of T are the only error. Each row keeps its nearest nodes and drops the farthest
    while their weight `sum_{g' dropped} n_g' exp(-cd (e_g - e_g')^2)` (n_g': the tokens of node
    g') stays within E_d = E_max - E_sp (the depth part's budget: what the spatial band leaves;
    computed from the depths; then made symmetric and consecutive again, which only keeps more),
    or, where that would examine more than 2^18 entries, rows reach r with `(N - 1) exp(-cd r^2)
    <= E_d` (r <= 10.2). Cost 2N + nnz(T) per feature
    column: cheap where depths repeat (surfaces at one depth, constant maps) or are sparse (few
    tokens per level).
  - "grid": nodes on a uniform depth grid of step delta, each token interpolated from its p
    nearest nodes (Lagrange, the token inside the central interval), `T[g, g'] = exp(-cd ((g -
    g') delta)^2)` for `|g - g'| delta <= r_T`. Per entry `|f_d~ - f_d| <= eps (1 + Lambda_p) +
    Lambda_p^2 exp(-cd r_T^2) + exp(-87)` for pairs closer than r_T + p delta (0 vs at most
    exp(-cd r_T^2) beyond), with `eps = 1.0865 (2 cd)^{p/2} / sqrt(p!) P_p delta^p` (Cramér's
    bound of the Gaussian's p-th derivative over p!, times P_p = max prod_j |u - j|, the node
    polynomial on the central interval in units of delta) and Lambda_p the Lebesgue constant of
    that interval (P_p and Lambda_p evaluated on 4097 points, +2%). Summed
    over the at most n_int sources within r_T + p delta of a token (counted on the sorted
    depths) and the N - 1 beyond, this is within E_d by the choice of delta and r_T.
    Cost 2 p N + nnz(T): cheap where many tokens share few depth levels' worth of nodes
    (narrow depth ranges).
  - "gauss": Gaussian nodes, the depth kernel as a sum of narrower Gaussians, with T diagonal:
    `exp(-cd (x - y)^2) ~ w sum_k exp(-2 cd (x - x_k)^2) exp(-2 cd (y - x_k)^2)` on nodes x_k =
    d_min + k delta, w = delta sqrt(4 cd / pi). Each term is `exp(-cd (x - y)^2) exp(-4 cd (x_k -
    m)^2)` (m = (x + y) / 2), and by Poisson summation the sum over k is the integral times `1 +
    a`, `|a| <= 2 q / (1 - q)`, `q = exp(-pi^2 / (4 cd delta^2))`: a relative error `rel` of every
    entry. Token i keeps the C nodes from the first with x_k >= d_i - R, R = C delta / 2: every
    node in [d_i - R, d_i + R). For a pair Delta = |x - y| < 2R apart the dropped nodes are at
    least L = R - Delta / 2 from m, so (one side: nodes L + j delta or farther, and (L + j
    delta)^2 >= L^2 + (j delta)^2) the dropped part of the pair is at most `w exp(-cd Delta^2) 2
    tau exp(-4 cd L^2) = 2 w tau exp(-2 cd R^2) exp(-2 cd (Delta - R)^2)`, tau = sum_{j >= 0}
    exp(-4 cd (j delta)^2); and at most the whole sum `(1 + a) exp(-cd Delta^2)`, the only bound
    from Delta >= 2R on. Per column: the sum over its tokens of the smaller of the two (pairs
    beyond r_cut = sqrt(87 / cd): at most (1 + a) exp(-87) each, as the dense kernels' cut-off),
    bounded for every column at once by binning the depths 1/32 level wide (at most 2^16 bins:
    wider on ranges beyond 2048 levels) and summing, at every occupied bin, the bin counts times
    the largest bound over each bin distance (`_gauss_truncation`, kvfix::dscr_gauss_truncation;
    on a ramp 4-5x above the dropped weight counted pair by pair). delta puts rel at half of E_d, C
    is the fewest whose truncation fits the rest. Cost 2 C N + G (C = 21-22 at float32):
    cheap for continuous depth over a wide range at large N (a 64 x 64 ramp: C = 21, 63
    operations per token, against 104 on the depth grid).
    With a relative part the column error is `E_j <= E + rel (D_j - 1)`, D_j the column's depth
    sum, and the column sum is `c_j >= c_min + D_j - 1` (D_j >= 1, the diagonal): the bound
    `2 E_j / (c_j - E_j)` is then at most `max(2 E / (c_min - E), 2 rel / (1 - rel))` (a ratio of
    linear functions of D_j, largest at D_j = 1 or as D_j grows).
  The cheapest of "values", the grid orders p in (6, 8, 12, 16, 20, 24) and "gauss" is used per
  item. E_max = tol c_min / (2 + tol), E = E_sp + E_d <= E_max, so the bound is at most tol. The
  CPU kernel walks the head dim in blocks of 64 columns: M = A X (grid and gauss modes: the
  block's tokens copied in node order, then two nodes at a time over them), Y = T M, then per
  grid row the row pass (into a ring of 2K + 1 grid rows) and the column pass with A^T Y, the
  diagonal and 1 / c~_j in one write (K and V read
  from their strided cache slices, written once; in place is safe).
  The structure (sort, nodes, T, c~) is chosen and built in float64 by one C++ call per item
  (kvfix::dscr_depth_structure, csrc/kernels/dscr_plan.h: every mode's cost and bound, then the
  cheapest one's structure and column sums) once per call (once per image for `kvfix.hf.DSCR`),
  shared by every layer and head.

Low-rank (the earlier units: unit-square coordinates with depth in [0, 1]; CPU and CUDA,
csrc/cpu/dscr_lowrank.cpp):

- spatial: `f_s(i, j) = S_row[r_i, r_j] * S_col[c_i, c_j]`, each axis used exactly (`L = S`,
  `R = I`) or through its top-p eigenpairs (`L = V_p diag(lam_p)`, `R = V_p`), the fewest that
  meet the error budget (float64 eigendecomposition, cached). In patch units with sigma_s ~ 0.6
  the axis matrices are nearly diagonal and of full numerical rank (used exactly: slow).
- depth: with centred depths `x = d - m` (m the midpoint of the item's depth range, |x| <= R),
  `exp(-cd (x_i - x_j)^2) = sum_n U[i, n] U[j, n]`, `U[i, n] = exp(-cd x_i^2) (sqrt(2 cd) x_i)^n / sqrt(n!)`
  (Taylor series of exp(2 cd x_i x_j)), truncated at rank r, built by the op in float64.

    y_j = (U U^T X)_j + ((L_row R_row^T) (x) (L_col R_col^T) X)_j,   k_hat_j = (y_j - 2 x_j) / c_j.

  Cost per feature column: about `N (2 p_col + 2 r_depth + 3) + 2 gh p_col p_row`.
  Truncating the Taylor series at rank r leaves, for t = 2 c |x_i x_j| <= T = 2 c R^2, at most
  `P(Poisson(T) >= r) =: eps_d` per entry; an axis with p eigenpairs at most `max_a sum_{k >= p}
  |lam_k| V_ak^2 =: eps_axis` (Cauchy-Schwarz), plus 1e-13 g for the float64 eigensolver. Every
  entry is within `eps = eps_d + eps_row + eps_col + eps_row eps_col`, so E <= N eps, with
  `c_min = min_a sum_b S_row[a, b] * min_a sum_b S_col[a, b] - 1 + (N - 1) exp(-4 cd R^2)`; the
  ranks are the smallest with `eps_each <= tol c_min / (8 N)`. The Taylor terms alternate in
  sign, so the plan also requires `round_est = 4 u32 (N + 2) / c_min <= 2e-6`. The Taylor rank
  grows with (depth range / sigma_d)^2: at [0, 255] depth no rank up to 512 meets the bound.

Choice ("auto"): the fastest by the cost model `ms_per_column` of the candidates: dense
(0.031 ns x N^2), low-rank where its bound and rounding estimate are met and its factors fit
the kernels' register path (`rank_col + rank_depth <= 24`; 0.21 ns per multiply-add of
cost_structured), banded where its bound is met and K <= 64 (0.055 ns per counted operation:
2 (2K + 1) + 3 per token plus the depth part's 2N + nnz or 2pN + nnz). The constants are
single-thread CPU times per feature column measured on the development CPU (AVX2, float32;
K + V of 24 x 24 to 128 x 128 grids on the map kinds of bench.common.depth_map, within +-30%
of these across maps and sizes). method="structured" takes the faster feasible structured variant
(also the low-rank one off its fast path), and raises where none meets the tolerance.

Choice on CUDA (a stated rule, not a measurement: no GPU was available to calibrate device
constants, so `ms_per_column` stays the CPU model on every device). "auto" and "structured" run
the banded variant wherever it is planned (bound met, K <= 64; csrc/kernels/dscr_banded.cuh), and
otherwise choose as on the CPU. Reasoning: the banded CUDA path is 1 + ceil(tensors / 16) kernel
launches a call (a prep kernel, then every layer's K and V of a cache call together) with no
ATen ops and no host synchronisation, the launch count of the dense kernel, and does 2 (2K + 1)
+ 3 float32 operations per token and feature column plus the depth part's 2N + nnz or 2pN + nnz,
against the dense kernel's N^2 multiply-adds (about 30 against 576 per token at 24 x 24); the one
GPU run on record (H200, docs/DSCR_STRUCTURED.md) had the earlier structured CUDA path at
1.1-1.4 ms a call, bound by ~56 launches (~34 float64 ATen ops building the depth factors), and
dense at ~0.3 ms (bf16, LLaVA size): that launch overhead is what the banded path removes. The
structure is built on the host in float64 once per image and copied to the device once
(`BandedStructure.to`, kept with the plan), never per layer.

Underflow rule. The dense kernels count a term whose exponent is below -87 as 0 and keep a
token whose column sum is then 0. The structured forms never produce such a column while
every token has a grid neighbour with a non-negligible spatial term, so the plan requires
`exp(-cs / G^2) >= exp(-60)` (c_j >= e^{-60}) and picks dense otherwise (tiny sigma_s). Tokens
with c_j <= 0 (N == 1) keep their key, as in METHODS §1. The cut-off's effect on the entries the
structured forms keep is at most exp(-87) each, counted in the bounds.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math

import numpy as np
import torch

__all__ = ["DscrPlan", "dscr_plan", "dscr_factors", "DscrFactors"]

_METHODS = ("auto", "dense", "structured")
# Truncation target per output dtype, relative to max|x| of a feature column: a fraction of
# the dtype's unit roundoff, so the approximation stays below the rounding of the output.
_TOL = {torch.float32: 2.0 ** -27, torch.float16: 2.0 ** -14, torch.bfloat16: 2.0 ** -11,
        torch.float64: 2.0 ** -27}
_U32 = 2.0 ** -24
_ROUND_MAX = 2e-6                 # largest accepted float32 rounding estimate
_NEIGHBOUR_MIN_EXPONENT = -60.0   # see "Underflow rule" above
_MAX_RANK = 512
# "auto" only (see "Choice"): the low-rank kernels keep rank_col + rank_depth accumulators in
# registers up to this many (csrc/cpu/dscr_lowrank.cpp, kMaxUnrolled).
_FAST_PATH_Q = 24


def _poisson_tail(T: float, r: int) -> float:
    """P(Poisson(T) >= r), summed from the tail's first term (no cancellation)."""
    if r <= 0:
        return 1.0
    if T <= 0.0:
        return 0.0
    if r <= T:  # the tail holds the mode: about 1 (counted as 1, an upper bound)
        return 1.0
    # from n = r on the terms decrease (ratio T / (n + 1) < 1): sum until negligible
    log_term = -T + r * math.log(T) - math.lgamma(r + 1)
    total, n = 0.0, r
    while True:
        term = math.exp(log_term)
        total += term
        n += 1
        log_term += math.log(T) - math.log(n)
        if term <= 1e-18 * total or log_term < -745.0:
            break
    return min(1.0, total)


def _taylor_rank(T: float, eps: float) -> int:
    """Smallest r with P(Poisson(T) >= r) <= eps (capped at _MAX_RANK + 1). Below 1, eps rules
    out every r <= T (`_poisson_tail` counts those tails as 1): the search starts past T (a wide
    depth range puts T in the thousands)."""
    r = int(min(T, _MAX_RANK)) + 1 if eps < 1.0 and T >= 1.0 else 1
    while r <= _MAX_RANK and _poisson_tail(T, r) > eps:
        r += 1
    return r


def _grid_divisor(gh: int, gw: int, grid_unit: str) -> float:
    """G of the grid form's coordinates ((r + 0.5) / G, (c + 0.5) / G) = `patch_coords(gh, gw,
    unit=grid_unit)`: 1 in patch units, max(gh, gw) in the unit square."""
    return 1.0 if grid_unit == "patch" else float(max(gh, gw))


def _axis_matrix(g: int, G: float, cs: float) -> torch.Tensor:
    """Exact S[a, b] = exp(-cs ((a - b) / G)^2) in float64, with the dense backends' cut-off
    (G: the grid divisor, 1 in patch units, `_grid_divisor`)."""
    a = torch.arange(g, dtype=torch.float64)
    e = -cs * ((a[:, None] - a[None, :]) / G) ** 2
    return torch.where(e < -87.0, torch.zeros_like(e), torch.exp(e))


@dataclasses.dataclass(frozen=True)
class DscrPlan:
    """What `dscr_refine` will run for one geometry (see kvfix.dscr_plan).

    algorithm: "structured" or "dense"; variant: which structured algorithm ("banded" or
    "lowrank"; "" for dense). grid_unit: the units of the grid form's coordinates ("patch" or
    "unit_square", `kvfix.patch_coords`). bound: a-priori bound of the chosen structured
    variant's approximation error relative to max|x| per feature column (exact arithmetic; the
    low-rank one's when dense runs); round_est: estimate of float32 rounding, same scale; tol:
    the truncation target for the dtype. Low-rank variant: rank_depth, rank_row, rank_col, the
    factor widths (an axis whose Taylor rank would reach its length is exact: rank = its length),
    cost_structured its multiply-adds per feature column. Banded variant: band (spatial
    half-band K), depth_mode ("values": one node per distinct depth, exact; "grid": Lagrange
    interpolation of order grid_order on a depth grid of step grid_step; "gauss": Gaussian nodes
    grid_step apart, grid_order of them per token), the widest item's.
    cost_dense: N^2. ms_per_column: the cost model's estimate per variant (ms per feature
    column: one head dim of one head of K or V; CPU measurements). reason: why this algorithm.
    """

    algorithm: str
    gh: int
    gw: int
    rank_depth: int
    rank_row: int
    rank_col: int
    row_exact: bool
    col_exact: bool
    bound: float
    round_est: float
    tol: float
    cost_structured: float
    cost_dense: float
    depth_range: float
    reason: str
    grid_unit: str = "patch"
    variant: str = ""
    band: int = 0
    depth_mode: str = ""
    grid_order: int = 0
    grid_step: float = 0.0
    ms_per_column: dict = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=64)
def _axis_spectrum(g: int, G: float, cs: float):
    """Eigen-decomposition of one axis matrix (float64, cached): (S, eigenvalues by decreasing
    magnitude, eigenvectors, tail[r] = entry bound of keeping r of them, min row sum)."""
    S = _axis_matrix(g, G, cs)
    lam, V = torch.linalg.eigh(S)
    order = lam.abs().argsort(descending=True)
    lam, V = lam[order], V[:, order]
    # |E_ij| <= sqrt(e_i e_j) <= max_i e_i with e_i = sum_{k >= r} |lam_k| V_ik^2 (Cauchy-Schwarz),
    # plus a margin for the float64 eigensolver (well above its rounding).
    w = lam.abs()[None, :] * V * V                                       # [g, g]
    tails = w.flip(1).cumsum(1).flip(1).amax(0).tolist() + [0.0]        # tails[r] = max_i sum_{k >= r}
    tails = [t + 1e-13 * g if r < g else 0.0 for r, t in enumerate(tails)]
    return S, lam, V, tails, float(S.sum(1).min())


def _axis_plan(g: int, G: float, cs: float, eps: float):
    """(rank, exact, eps_axis) of one spatial axis: the fewest eigenvectors whose entry bound
    is <= eps; all g of them -> the exact matrix (L = S, R = I)."""
    tails = _axis_spectrum(g, G, cs)[3]
    r = next((r for r in range(1, g) if tails[r] <= eps), g)
    if r >= g:
        return g, True, 0.0
    return r, False, tails[r]


def _lowrank(gh: int, gw: int, depth_range: float, cd: float, cs: float, tol: float, G: float) -> dict:
    """The low-rank variant's ranks, bound, rounding estimate and cost (module docstring, "Low-rank")."""
    N = gh * gw
    R = 0.5 * depth_range
    rr = rc = rd = 1
    row_exact = col_exact = True
    bound = round_est = math.inf
    cost_s = math.inf
    c_lb = 0.0
    if N > 1:
        min_row, min_col = _axis_spectrum(gh, G, cs)[4], _axis_spectrum(gw, G, cs)[4]
        c_lb = min_row * min_col - 1.0 + (N - 1) * math.exp(-4.0 * cd * R * R)
        if c_lb > 0:
            # Share the truncation budget between the three factors: eps <= tol c_min / (2 N) / ~3.
            eps_each = tol * c_lb / (2.0 * N) / 4.0
            rr, row_exact, e_row = _axis_plan(gh, G, cs, eps_each)
            rc, col_exact, e_col = _axis_plan(gw, G, cs, eps_each)
            Td = 2.0 * cd * R * R
            rd = _taylor_rank(Td, eps_each)
            e_d = _poisson_tail(Td, rd)
            eps = e_d + e_row + e_col + e_row * e_col
            bound = 2.0 * N * eps / (c_lb - N * eps) if c_lb > N * eps else math.inf
            round_est = 4.0 * _U32 * (N + 2) / c_lb
            cost_s = float(N) * (2 * rc + 2 * rd + 3) + 2.0 * gh * rc * rr
    if N <= 1:
        why = "N <= 1"
    elif rd > _MAX_RANK or bound > tol:
        why = (f"depth range {depth_range:g} too wide for its Taylor factor of exp(-cd dd^2), cd = {cd:.3g}: "
               + (f"the rank would exceed {_MAX_RANK}" if rd > _MAX_RANK else f"bound {bound:.3g} > tol {tol:.3g}"))
    elif round_est > _ROUND_MAX:
        why = f"float32 rounding estimate {round_est:.3g} above {_ROUND_MAX:g} (column sums >= {c_lb:.3g} only)"
    elif rc + rd > _FAST_PATH_Q:
        why = (f"factors too wide for its kernels' fast path (rank_col + rank_depth = {rc} + {rd} > {_FAST_PATH_Q}"
               f"{'; the spatial axes are full rank at this sigma_s' if row_exact and col_exact else ''})")
    else:
        why = ""
    feasible = N > 1 and rd <= _MAX_RANK and bound <= tol and round_est <= _ROUND_MAX
    return dict(rr=rr, rc=rc, rd=rd, row_exact=row_exact, col_exact=col_exact, bound=bound, round_est=round_est,
                cost=cost_s, feasible=feasible, fast=feasible and rc + rd <= _FAST_PATH_Q, why=why)


def _plan(gh: int, gw: int, depth_range: float, cd: float, cs: float, dtype: torch.dtype,
          method: str, grid_unit: str = "patch", depth=None, device_type: str = "cpu") -> DscrPlan:
    """The DscrPlan of `_plan_structure`."""
    return _plan_structure(gh, gw, depth_range, cd, cs, dtype, method, grid_unit, depth, device_type)[0]


def _plan_structure(gh: int, gw: int, depth_range: float, cd: float, cs: float, dtype: torch.dtype,
                    method: str, grid_unit: str = "patch", depth=None, device_type: str = "cpu"):
    """(DscrPlan, BandedStructure or None). depth: [Bd, N] float64 CPU tensor, or None (a range
    only: the banded variant is planned for depths spread evenly over the range)."""
    N = gh * gw
    G = _grid_divisor(gh, gw, grid_unit)
    tol = _TOL[dtype]
    cost_d = float(N) * N
    lr = _lowrank(gh, gw, depth_range, cd, cs, tol, G)
    neighbour_ok = max(gh, gw) == 1 or -cs / (G * G) >= _NEIGHBOUR_MIN_EXPONENT
    st, info = None, dict(reason="N <= 1")
    if N > 1 and neighbour_ok:
        if depth is None:
            depth = torch.linspace(0.0, depth_range, N, dtype=torch.float64)[None]
        st, info = _banded(gh, gw, depth, cd, cs / (G * G), tol)
        if st is not None and not info["bound"] <= tol:
            info["reason"] = f"bound {info['bound']:.3g} > tol {tol:.3g}"
            st = None
    ms = {"dense": _NS_DENSE * cost_d * 1e-6}
    if lr["fast"] and neighbour_ok:
        ms["lowrank"] = _NS_LOWRANK * lr["cost"] * 1e-6
    if st is not None:
        ms["banded"] = _NS_BANDED * info["ops"] * 1e-6
    structured = {v: ms[v] for v in ("banded", "lowrank") if v in ms}
    if method == "structured" and lr["feasible"] and neighbour_ok and "lowrank" not in structured:
        structured["lowrank"] = _NS_LOWRANK * lr["cost"] * 1e-6  # forced: its slow path too
    fmt = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))
    if method == "dense":
        variant, reason = "", "method='dense'"
    elif method == "structured":
        if N > 1 and not structured:
            raise ValueError(
                f"method='structured' cannot meet the {dtype} tolerance here (gh={gh}, gw={gw}, depth range "
                f"{depth_range:g}: banded: {info.get('reason', 'n/a')}; low-rank: {lr['why'] or 'n/a'}"
                f"{'' if neighbour_ok else '; spatial neighbour term below exp(-60)'}); use method='dense'")
        variant = min(structured, key=structured.get) if structured else "lowrank"  # N <= 1: keeps the token
        reason = "method='structured'"
    elif N <= 1:
        variant, reason = "", "N <= 1: nothing to refine"
    elif not neighbour_ok:
        variant, reason = "", "sigma_s so small that grid neighbours' spatial terms underflow"
    else:
        best = min(ms, key=ms.get)
        variant = "" if best == "dense" else best
        why = [] if "banded" in ms else [f"banded: {info.get('reason')}"]
        why += [] if "lowrank" in ms else [f"low-rank: {lr['why']}"]
        reason = f"estimated ms per column: {fmt}" + (f" ({'; '.join(why)})" if why else "")
    if device_type != "cpu" and variant != "banded" and "banded" in ms and method != "dense" and N > 1 \
            and neighbour_ok:
        # the CUDA rule (module docstring, "Choice on CUDA"): banded wherever it is planned
        variant = "banded"
        reason += "; on CUDA the banded variant runs wherever it applies (a rule, not calibrated on a GPU)"
    algorithm = "structured" if variant else "dense"
    use = "bound" in info and (variant == "banded" or (not variant and st is not None))
    bound = info["bound"] if use else lr["bound"]
    round_est = info["round_est"] if use else lr["round_est"]
    plan = DscrPlan(algorithm, gh, gw, lr["rd"], lr["rr"], lr["rc"], lr["row_exact"], lr["col_exact"], bound,
                    round_est, tol, lr["cost"], cost_d, depth_range, reason, grid_unit, variant,
                    info.get("K", 0) if st is not None else 0,
                    info.get("mode", "") if st is not None else "",
                    info.get("order", 0) if st is not None and info.get("mode") in ("grid", "gauss") else 0,
                    info.get("step", 0.0) if st is not None else 0.0, ms)
    return plan, (st if variant == "banded" else None)


def _coefs(sigma_d, sigma_s, alpha, beta):
    return alpha / (2.0 * sigma_d * sigma_d), beta / (2.0 * sigma_s * sigma_s)


def _depth_range(depth: torch.Tensor | float) -> float:
    """Largest per-item max - min of depth ([N] or [B, N]); one host read."""
    if isinstance(depth, torch.Tensor):
        if depth.numel() == 0:
            return 0.0
        d = depth.detach()
        lo, hi = torch.aminmax(d[None] if d.dim() == 1 else d, dim=1)
        return float((hi.double() - lo.double()).max())
    return float(depth)


def dscr_plan(gh: int, gw: int, depth, *, sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6,
              beta: float = 0.8, dtype: torch.dtype = torch.float32, method: str = "auto",
              grid_unit: str = "patch", device=None) -> DscrPlan:
    """The algorithm `kvfix.dscr_refine(..., coords=(gh, gw), method=method, grid_unit=grid_unit)`
    runs, and why.

    depth: the depth tensor ([N] or [B, N]) or its range max - min as a float (then the banded
    variant is planned for depths spread evenly over that range: the densest case). dtype: the
    dtype of k and v. grid_unit: "patch" (default: the grid's coordinates are `patch_coords(gh,
    gw)`, adjacent patches 1 apart) or "unit_square" (the earlier units). device: where k and v
    are (default: depth's device, or the CPU): on CUDA "auto" and "structured" run the banded
    variant wherever it applies (module docstring, "Choice on CUDA"). Returns a
    `DscrPlan` (algorithm, variant, error bound, cost estimates, reason). With
    method="structured" and no structured variant that meets the dtype's tolerance: a ValueError.
    """
    if device is None:
        device = depth.device if isinstance(depth, torch.Tensor) else "cpu"
    return _plan_cached(gh, gw, depth, sigma_d, sigma_s, alpha, beta, dtype, method, grid_unit, device)[0]


def _check_plan_depth(depth, gh: int, gw: int):
    """dscr_plan's depth: a real tensor [N] / [B, N] (N = gh * gw, not meta), or a range >= 0."""
    if isinstance(depth, torch.Tensor):
        if not depth.is_floating_point():
            raise TypeError(f"depth must be a floating-point tensor or a float range, got {depth.dtype}")
        if not ((depth.dim() == 1 and depth.shape[0] == gh * gw) or (depth.dim() == 2 and depth.shape[1] == gh * gw)):
            raise ValueError(f"depth must be [N] or [B, N] with N = gh * gw = {gh * gw}, got shape {tuple(depth.shape)}")
        if depth.device.type == "meta":
            raise ValueError("depth is a meta tensor: the plan reads the depth range on the host")
        return depth
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        raise TypeError(f"depth must be a tensor or a float range max - min, got {type(depth).__name__}")
    if not (math.isfinite(depth) and depth >= 0):
        raise ValueError(f"depth as a range max - min must be finite and >= 0, got {depth}")
    return float(depth)


def _check_params(sigma_d, sigma_s, alpha, beta, op: str = "dscr_plan"):
    """DSCR's parameters as floats (TypeError otherwise), their ranges checked by the ops' C++ check
    (dscr_check_params): for the plan, kvfix.hf.DSCR's settings and the diagnostics; op names the
    caller in the message."""
    params = []
    for name, x in (("sigma_d", sigma_d), ("sigma_s", sigma_s), ("alpha", alpha), ("beta", beta)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
        params.append(float(x))
    from . import _C  # noqa: F401  (registers torch.ops.kvfix.*; imported here: tests/emu loads this file alone)
    torch.ops.kvfix.dscr_check_params.default(op, *params)
    return tuple(params)


def _plan_checked(gh, gw, depth, sigma_d, sigma_s, alpha, beta, dtype, method, grid_unit, device):
    """dscr_plan's checks, then (DscrPlan, BandedStructure on `device` or None): what the ops run."""
    plan, st = _plan_cached(gh, gw, depth, sigma_d, sigma_s, alpha, beta, dtype, method, grid_unit, device)
    return plan, (st.to(device) if st is not None else None)


def _plan_cached(gh, gw, depth, sigma_d, sigma_s, alpha, beta, dtype, method, grid_unit, device):
    """dscr_plan's checks, then (DscrPlan, BandedStructure on the CPU or None), cached."""
    from .geometry import check_grid_form, check_grid_unit  # (tests/emu loads this file alone)
    gh, gw = check_grid_form((gh, gw))
    check_grid_unit(grid_unit)
    depth = _check_plan_depth(depth, gh, gw)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if dtype not in _TOL:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    sd, ss, a, b = _check_params(sigma_d, sigma_s, alpha, beta)
    cd, cs = _coefs(sd, ss, a, b)
    dev = torch.device(device).type
    d = None
    if isinstance(depth, torch.Tensor):  # keyed by its values (the range follows from them)
        d = depth.detach().to("cpu", torch.float64)
        d = d[None] if d.dim() == 1 else d
        key = (gh, gw, cd, cs, dtype, method, grid_unit, dev, tuple(d.shape), d.numpy().tobytes())
    else:
        key = (gh, gw, cd, cs, dtype, method, grid_unit, dev, depth)
    got = _PLANS.get(key)
    if got is None:  # a planned depth was finite: the range is read on a miss only
        rng = _depth_range(depth if d is None else d)
        if not math.isfinite(rng):
            raise ValueError("depth has non-finite values (nan or inf)")
        got = _plan_structure(gh, gw, rng, cd, cs, dtype, method, grid_unit, d, dev)
        _PLANS[key] = got
        while len(_PLANS) > _PLAN_CACHE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return got


# The last plans and their banded structures, by geometry, parameters and the depth values: the
# same image planned again (every layer of a model through dscr_refine, a benchmark's repeats)
# reuses its structure. Each entry holds O(N p + nnz) numbers.
_PLAN_CACHE = 16
_PLANS: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass
class DscrFactors:
    """Factors of the structured weights (float32 unless built otherwise), on depth's device.

    lr, rr: [gh, p_row]; lc, rc: [gw, p_col] (spatial: S_axis ~ L R^T); u: [Bd, N, r_depth]
    (depth: f_d ~ U U^T); cinv: [Bd, N], 1 / c_j, or 0 where the token keeps its own key.
    """

    lr: torch.Tensor
    rr: torch.Tensor
    lc: torch.Tensor
    rc: torch.Tensor
    u: torch.Tensor
    cinv: torch.Tensor


def _taylor_factor(x: torch.Tensor, c: float, r: int) -> torch.Tensor:
    """[..., r]: exp(-c x^2) (sqrt(2c) x)^n / sqrt(n!), n < r, by the stable recurrence."""
    cols = [torch.exp(-c * x * x)]
    s = math.sqrt(2.0 * c)
    for n in range(1, r):
        cols.append(cols[-1] * (s * x) / math.sqrt(n))
    return torch.stack(cols, dim=-1)


@functools.lru_cache(maxsize=64)
def _axis_factors_cached(g: int, G: float, cs: float, rank: int, exact: bool, device: str, dtype: torch.dtype):
    S, lam, V, _, _ = _axis_spectrum(g, G, cs)
    if exact:
        L, R = S, torch.eye(g, dtype=torch.float64)
    else:
        L, R = V[:, :rank] * lam[:rank], V[:, :rank]
    return L.to(device, dtype).contiguous(), R.to(device, dtype).contiguous()


def _axis_factors(g: int, G: float, cs: float, rank: int, exact: bool, device, dtype):
    """(L, R) with S ~ L R^T: the exact matrix and I, or the top-`rank` eigenpairs."""
    return _axis_factors_cached(g, G, cs, rank, exact, str(torch.device(device)), dtype)


def spatial_factors(plan: DscrPlan, *, sigma_s: float, beta: float, device) -> tuple:
    """(lr, rr, lc, rc) float32 on `device` for a structured plan (cached per geometry)."""
    cs = beta / (2.0 * sigma_s * sigma_s)
    G = _grid_divisor(plan.gh, plan.gw, plan.grid_unit)
    return (_axis_factors(plan.gh, G, cs, plan.rank_row, plan.row_exact, device, torch.float32)
            + _axis_factors(plan.gw, G, cs, plan.rank_col, plan.col_exact, device, torch.float32))


def depth_args(plan: DscrPlan, sigma_d: float, alpha: float) -> tuple:
    """(coef_d, rank_d): what the op needs to build the depth factor itself."""
    return alpha / (2.0 * sigma_d * sigma_d), plan.rank_depth


def dscr_factors(plan: DscrPlan, depth: torch.Tensor, *, sigma_d: float, sigma_s: float, alpha: float,
                 beta: float, dtype: torch.dtype = torch.float32) -> DscrFactors:
    """All factors of `plan` (structured) for depth [Bd, N], as the op builds them (the op builds
    u and cinv itself from depth; this is for the reference and tests). Computed in float64,
    rounded once to `dtype`. No host synchronisation.
    """
    cd, cs = _coefs(sigma_d, sigma_s, alpha, beta)
    G = _grid_divisor(plan.gh, plan.gw, plan.grid_unit)
    dev = depth.device
    lr, rr = _axis_factors(plan.gh, G, cs, plan.rank_row, plan.row_exact, dev, torch.float64)
    lc, rc = _axis_factors(plan.gw, G, cs, plan.rank_col, plan.col_exact, dev, torch.float64)
    d = depth.to(torch.float64)
    mid = 0.5 * (d.amax(1, keepdim=True) + d.amin(1, keepdim=True)) if d.shape[1] else d[:, :1]
    u = _taylor_factor(d - mid, cd, plan.rank_depth)                  # [Bd, N, r]
    # column sums of wt~ (with the diagonal 2 removed): exact for the factors used.
    srow = lr @ rr.sum(0)                                              # [gh]
    scol = lc @ rc.sum(0)                                              # [gw]
    spatial = (srow[:, None] * scol[None, :]).reshape(-1)              # [N]
    c = spatial[None] + (u @ u.sum(1, keepdim=True).transpose(1, 2))[..., 0] - 2.0
    cinv = torch.where(c > 0, 1.0 / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(c))
    if plan.gh * plan.gw == 1:
        cinv = torch.zeros_like(cinv)
    return DscrFactors(lr.to(dtype), rr.to(dtype), lc.to(dtype), rc.to(dtype), u.to(dtype).contiguous(),
                       cinv.to(dtype).contiguous())


# ---------------------------------------------------------------------------------------------
# the banded variant (module docstring, "Banded")

_CRAMER = 1.0865       # |H_n(x)| e^{-x^2 / 2} <= 1.0865 sqrt(2^n n!) (Cramér's inequality, constant 1.086435)
_MAX_BAND = 64         # spatial half-band beyond which the banded variant is not planned (wide sigma_s)
_GRID_ORDERS = (6, 8, 12, 16, 20, 24)
# Measured per-operation costs (see "Choice"; ns of single-thread CPU time per feature column,
# float32, AVX2): the dense kernel per N^2, the low-rank kernel per multiply-add of
# cost_structured, the banded kernel per counted operation (2 (2K + 1) + 3 per token plus the
# depth part's).
_NS_DENSE = 0.031
_NS_LOWRANK = 0.21
_NS_BANDED = 0.055


def _axis_band(g: int, cs_eff: float):
    """s_k = exp(-cs_eff k^2) with the dense cut-off, k = 0..g-1 (float64 list)."""
    return [0.0 if -cs_eff * k * k < -87.0 else math.exp(-cs_eff * k * k) for k in range(g)]


@functools.lru_cache(maxsize=64)
def _spatial_sums(gh: int, gw: int, s: tuple) -> torch.Tensor:
    """The banded spatial kernel's column sums per token, float64 [gh * gw]: the product of the
    two axes' row sums, sum of s[|a - b|] over the 0 <= b < g with |a - b| <= K = len(s) - 1
    (b ascending)."""
    K = len(s) - 1

    def axis(g):
        a = np.arange(g)
        sums = np.zeros(g)
        for k in range(-K, K + 1):
            sums += np.where((a + k >= 0) & (a + k < g), s[abs(k)], 0.0)
        return sums
    return torch.from_numpy(np.outer(axis(gh), axis(gw)).reshape(-1))


def _spatial_band(gh: int, gw: int, cs_eff: float, budget: float):
    """(K, E_sp, c_min, s[0..K]): the smallest half-band K whose dropped spatial weight per
    column, sum over (da, dc) with |da| > K or |dc| > K of s_da s_dc <= tail_r tot_c + tot_r tail_c,
    is <= budget (tot: an axis's full two-sided sum, tail: its part beyond K); c_min: the
    smallest spatial column sum minus the diagonal (a lower bound of every c_j)."""
    g = max(gh, gw)
    s = _axis_band(g, cs_eff)
    sr, sc = s[:gh], s[:gw]
    tot_r, tot_c = 1.0 + 2.0 * sum(sr[1:]), 1.0 + 2.0 * sum(sc[1:])

    # the smallest row sum of an axis matrix is an end row's (s_k decreases in k)
    c_min = sum(sr) * sum(sc) - 1.0
    K = 0
    while True:
        tail_r, tail_c = 2.0 * sum(sr[K + 1:]), 2.0 * sum(sc[K + 1:])
        e_sp = tail_r * tot_c + tot_r * tail_c
        if e_sp <= budget or K >= g - 1:
            return K, (0.0 if K >= g - 1 else e_sp), c_min, s[:K + 1] if K + 1 <= g else s
        K += 1


@functools.lru_cache(maxsize=None)
def _lebesgue(p: int) -> float:
    """max over the central interval of sum_k |L_k(u)| for p equispaced nodes (j = 1 - p/2 .. p/2,
    u in [0, 1]): evaluated on 4097 points, +2% (the function is a polynomial of degree p - 1 on
    that interval with |L'| small; the margin covers the sampling)."""
    u = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64)
    return float(_lagrange(u, p).abs().sum(1).max()) * 1.02


def _lagrange(u: torch.Tensor, p: int) -> torch.Tensor:
    """[N, p] Lagrange weights at u in [0, 1] of the nodes j = 1 - p/2 .. p/2 (barycentric form)."""
    j = torch.arange(1 - p // 2, p // 2 + 1, dtype=torch.float64, device=u.device)
    w = torch.tensor([(-1.0) ** k * math.comb(p - 1, k) for k in range(p)], dtype=torch.float64, device=u.device)
    diff = u[:, None] - j[None, :]
    exact = diff == 0
    q = w / torch.where(exact, torch.ones_like(diff), diff)
    L = q / q.sum(1, keepdim=True)
    return torch.where(exact.any(1, keepdim=True), exact.to(torch.float64), L)


@functools.lru_cache(maxsize=None)
def _node_poly(p: int) -> float:
    """max over u in [0, 1] of prod_j |u - j| (nodes j = 1 - p/2 .. p/2): evaluated on 4097 points,
    +2% (a smooth polynomial; the margin covers the sampling). Below ((p/2)!)^2 / 4, its
    closed-form bound, by 6x at p = 16."""
    u = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64)
    j = torch.arange(1 - p // 2, p // 2 + 1, dtype=torch.float64)
    return float((u[:, None] - j[None, :]).abs().prod(1).max()) * 1.02


def _interp_error_coef(p: int, cd: float) -> float:
    """C with |f - I_p f| <= C delta^p for f(x) = exp(-cd (x - s)^2), any s, x in the central interval
    of p equispaced nodes delta apart: |f^(p)| <= 1.0865 (2 cd)^{p/2} sqrt(p!) (Cramér) and
    prod |x - x_m| <= delta^p `_node_poly(p)`. inf where that overflows (a huge cd: the grid mode
    is then not considered)."""
    try:
        return _CRAMER * (2.0 * cd) ** (p / 2) / math.sqrt(math.factorial(p)) * _node_poly(p)
    except OverflowError:
        return math.inf


@dataclasses.dataclass
class _DepthStructure:
    """One item's depth part (float64 until packed): token -> nodes, node kernel rows, bound, and
    (given the spatial column sums) 1 / c~_j and the rounding amplification."""
    mode: str             # "values" (the distinct values), "grid" or "gauss"
    tok: torch.Tensor     # [N] first node
    tokw: torch.Tensor    # [N, c]
    row_lo: torch.Tensor  # [G]
    row_len: torch.Tensor
    tvals: torch.Tensor   # [nnz]
    error: float          # E_d: bound of sum_i |f_d~(i, j) - f_d(i, j)| per column
    ops: float            # counted operations per feature column (M, T, the gather)
    step: float = 0.0
    order: int = 1
    rel: float = 0.0      # relative part: sum_i |f_d~ - f_d| <= error + rel * (sum_i f_d(i, j) - 1)
    cinv: torch.Tensor | None = None  # [N] 1 / c~_j (0 where c~_j <= 0 or N == 1)
    amp: float = 0.0      # max_j (spatial_j + (|A|^T |T| |A| 1)_j + 2) / c~_j


_MODE_NAMES = {1: "values", 2: "grid", 3: "gauss"}


@functools.lru_cache(maxsize=64)
def _grid_table(cd: float, orders: tuple) -> torch.Tensor:
    """float64 [len(orders), 3]: each grid order p with its Lebesgue constant and interpolation
    error coefficient at cd (what the C++ planner needs of them)."""
    return torch.tensor([[float(p), _lebesgue(p), _interp_error_coef(p, cd)] for p in orders], dtype=torch.float64)


def _depth_op(d, cd, budget, orders, force, cap, spatial):
    """kvfix::dscr_depth_structure (csrc/kernels/dscr_plan.h). A function of its own so that the
    emulator's tests, which load this file without the compiled extension, can run the same C++
    from their own build of it."""
    return torch.ops.kvfix.dscr_depth_structure.default(d, cd, budget, orders, force, cap, spatial)


def _depth_structure(d: torch.Tensor, cd: float, budget: float, spatial: torch.Tensor | None = None,
                     mode="auto", cap: float = math.inf) -> _DepthStructure | None:
    """One item's depth part within `budget` per column (d: [N] float64 on the CPU; spatial: [N]
    float64, the band's column sums, for cinv and amp): the cheapest (mode "auto") of the exact
    distinct-value nodes, the grid orders and the Gaussian nodes, chosen and built in C++
    (kvfix::dscr_depth_structure, csrc/kernels/dscr_plan.h: the module docstring's "Banded" says
    what each is and how its bound is found). mode "values", "gauss" or a grid order p builds that
    one alone: None where it does not meet the budget at a cost below `cap`."""
    orders = _GRID_ORDERS if mode in ("auto", "values", "gauss") else (int(mode),)
    force = {"auto": -1, "values": 0, "gauss": -2}.get(mode, orders[0])
    d = d.detach().to("cpu", torch.float64).contiguous()
    sp = None if spatial is None else spatial.detach().to("cpu", torch.float64).contiguous()
    tok, tokw, row_lo, row_len, tvals, cinv, info = _depth_op(d, float(cd), float(budget),
                                                              _grid_table(float(cd), orders), force, float(cap), sp)
    code, error, ops, step, order, rel, amp = info.tolist()
    if code == 0:
        return None
    return _DepthStructure(_MODE_NAMES[int(code)], tok, tokw, row_lo, row_len, tvals, error, ops, step, int(order),
                           rel, cinv if sp is not None else None, amp)


def _gauss_truncation(d: torch.Tensor, cd: float, R: float, step: float, alias: float) -> float:
    """The Gaussian nodes' truncation bound (kvfix::dscr_gauss_truncation): an upper bound of
    max_j sum_i drop(|d_i - d_j|) over the pairs closer than sqrt(87 / cd) (module docstring,
    "gauss"; the binning in csrc/kernels/dscr_plan.h)."""
    return torch.ops.kvfix.dscr_gauss_truncation.default(d.detach().to("cpu", torch.float64).contiguous(), cd, R,
                                                         step, alias)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (built on the CPU) on `device` without a host synchronisation: a CUDA copy goes through
    pinned memory with non_blocking=True (from pageable memory the driver may wait for the stream;
    torch's pinned-memory cache keeps the staging block until the copy has run)."""
    if device.type == "cpu" or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclasses.dataclass
class BandedStructure:
    """What the banded kernels take (csrc/cpu/dscr_banded.cpp, csrc/kernels/dscr_banded.cuh),
    float32 / int32 / int64: tok [Bd, N], tokw [Bd, N, C], cnt [Bd], row_ptr [G + 1], row_lo [G],
    tvals [nnz], node_off [Bd + 1] (items' node ranges), cinv [Bd, N], band [K + 1] (s_0..s_K); gh.
    Built on the CPU; `to(device)` gives the copy on a GPU (made once per device and kept)."""
    tok: torch.Tensor
    tokw: torch.Tensor
    cnt: torch.Tensor
    row_ptr: torch.Tensor
    row_lo: torch.Tensor
    tvals: torch.Tensor
    node_off: torch.Tensor
    cinv: torch.Tensor
    band: torch.Tensor
    gh: int

    _copies: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def args(self) -> tuple:
        return (self.tok, self.tokw, self.cnt, self.row_ptr, self.row_lo, self.tvals, self.node_off, self.cinv,
                self.band, self.gh)

    def to(self, device) -> "BandedStructure":
        """This structure on `device` (itself on the CPU). The first call per device copies it
        (asynchronously: no host synchronisation) and keeps the copy, so every later call for the
        same image (each layer through dscr_refine, a cache call's layers, a benchmark's repeats)
        reuses it."""
        dev = torch.device(device)
        if dev.type == "cpu":
            return self
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        got = self._copies.get(str(dev))
        if got is None:
            got = BandedStructure(*(to_device_async(t, dev) for t in self.args()[:-1]), self.gh)
            self._copies[str(dev)] = got
        return got


def _banded(gh: int, gw: int, depth: torch.Tensor, cd: float, cs_eff: float, tol: float,
            dtype: torch.dtype = torch.float32):
    """(structure or None, info dict) of the banded variant for depth [Bd, N] (any device); the
    weights packed in `dtype` (float32 for the kernel; float64 to test the truncation alone)."""
    N = gh * gw
    K, e_sp, c_min, s = _spatial_band(gh, gw, cs_eff, math.inf)
    if not c_min > 0:
        return None, dict(reason="column sums not bounded away from 0")
    e_max = tol * c_min / (2.0 + tol)
    K, e_sp, c_min, s = _spatial_band(gh, gw, cs_eff, e_max / 4.0)
    if K > _MAX_BAND:
        return None, dict(reason=f"spatial band {K} > {_MAX_BAND} (wide sigma_s)")
    d64 = depth.detach().to("cpu", torch.float64)
    # the band's column sums per token (the depth part's C++ adds its own for 1 / c~_j)
    spatial = _spatial_sums(gh, gw, tuple(s))
    # the depth part takes what the spatial band leaves of E_max (the band's share is e_max / 4 at most;
    # K = 4 drops ~6e-12 at the defaults): E = e_sp + e_d <= E_max
    items = [_depth_structure(d64[b], cd, (e_max - e_sp) * (1.0 - 1e-9), spatial) for b in range(d64.shape[0])]
    e_d = max(it.error for it in items)
    rel = max(it.rel for it in items)
    E = e_sp + e_d
    bound = 2.0 * E / (c_min - E) if c_min > E else math.inf
    if rel > 0:  # a relative part: 2 E_j / (c_j - E_j) also as the depth sum grows (module docstring)
        bound = max(bound, 2.0 * rel / (1.0 - rel))
    ops_sp = 2.0 * (2 * K + 1) + 3.0
    ops = max(N * ops_sp + it.ops for it in items)
    # pack; rounding amplification: (sum_i |wt~(i, j)| + 2) / c~_j, the magnitude of the float32
    # sums before the diagonal is subtracted, relative to the result's scale
    amp = max([1.0] + [it.amp for it in items])
    C = max(it.tokw.shape[1] for it in items)
    toks, tokws, cinvs, ptrs, los, vals, offs = [], [], [], [], [], [], [0]
    nnz = 0
    for it in items:
        toks.append(it.tok.to(torch.int32))
        tokws.append(torch.nn.functional.pad(it.tokw, (0, C - it.tokw.shape[1])).to(dtype))
        cinvs.append(it.cinv.to(dtype))
        ptrs.append(torch.cumsum(it.row_len, 0) + nnz)
        nnz += it.tvals.numel()
        los.append(it.row_lo.to(torch.int32))
        vals.append(it.tvals.to(dtype))
        offs.append(offs[-1] + it.row_lo.numel())
    st = BandedStructure(torch.stack(toks), torch.stack(tokws),
                         torch.tensor([it.tokw.shape[1] for it in items], dtype=torch.int32),
                         torch.cat([torch.zeros(1, dtype=torch.int64)] + ptrs), torch.cat(los), torch.cat(vals),
                         torch.tensor(offs, dtype=torch.int64), torch.stack(cinvs),
                         torch.tensor(s, dtype=dtype), gh)
    worst = max(items, key=lambda it: it.ops)
    info = dict(K=K, bound=bound, ops=ops, c_min=c_min, mode=worst.mode, order=worst.order, step=worst.step,
                nnz=max(it.tvals.numel() for it in items), round_est=4.0 * _U32 * amp)
    return st, info


def banded_weights(st: BandedStructure, item: int = 0) -> torch.Tensor:
    """The [N, N] float64 weights wt~[i, j] (diagonal included) that structure `st` applies to
    item `item`: for tests and the reference."""
    N = st.tok.shape[1]
    gh = st.gh
    gw = N // gh
    s = st.band.double()
    K = s.numel() - 1
    a = torch.arange(gh)
    w = torch.arange(gw)

    def axis(idx):
        dist = (idx[:, None] - idx[None, :]).abs()
        return torch.where(dist <= K, s[dist.clamp(max=K)], torch.zeros((), dtype=torch.float64))

    spatial = torch.kron(axis(a), axis(w))
    g0, g1 = int(st.node_off[item]), int(st.node_off[item + 1])
    G = g1 - g0
    T = torch.zeros(G, G, dtype=torch.float64)
    ptr = st.row_ptr[g0:g1 + 1]
    for g in range(G):
        lo = int(st.row_lo[g0 + g])
        n = int(ptr[g + 1] - ptr[g])
        T[g, lo:lo + n] = st.tvals[int(ptr[g]):int(ptr[g]) + n].double()
    c = int(st.cnt[item])
    A = torch.zeros(G, N, dtype=torch.float64)
    tok = st.tok[item].long()
    for k in range(c):
        A[tok + k, torch.arange(N)] += st.tokw[item, :, k].double()
    return spatial + A.T @ T @ A
