"""Structured DSCR on a patch grid: the plan (algorithm, ranks, error bound, cost) and the factors.

On a row-major gh x gw grid with `patch_coords(gh, gw, unit=grid_unit)` the proximity is a sum
of two smooth kernels (SPEC §1), `wt = f_d + f_s`, and both have cheap structure:

- spatial: `f_s(i, j) = S_row[r_i, r_j] * S_col[c_i, c_j]` (the squared distance splits into the
  two axes), a Kronecker product of two tiny Gaussian matrices, `S[a, b] = exp(-cs ((a - b) / G)^2)`
  (G = 1 in patch units, the default; G = max(gh, gw) in the unit square; the dense backends'
  cut-off at exponents below -87 applied). Each axis is used either exactly (`L = S`, `R = I`)
  or through its top-p eigenpairs (`L = V_p diag(lam_p)`, `R = V_p`), the fewest that meet the
  error budget (float64 eigendecomposition, cached). In patch units with the default sigma_s
  the axis matrices are nearly diagonal and of full numerical rank: both axes are used exactly.
- depth: with centred depths `x = d - m` (m the midpoint of the item's depth range, |x| <= R),
  `exp(-cd (x_i - x_j)^2) = sum_n U[i, n] U[j, n]`, `U[i, n] = exp(-cd x_i^2) (sqrt(2 cd) x_i)^n / sqrt(n!)`
  (Taylor series of exp(2 cd x_i x_j)), truncated at rank r. (Data-dependent, so no
  eigendecomposition per image: U is built by the op, in float64, O(N r).)

The refinement is then

    y_j = sum_i wt~(i, j) x_i = (U U^T X)_j + ((L_row R_row^T) (x) (L_col R_col^T) X)_j
    k_hat_j = (y_j - 2 x_j) / c_j,   c_j = (wt~ 1)_j - 2,

because the unmasked diagonal is exactly 2 (both terms are 1 at distance 0). Cost per feature
column: about `N (2 p_col + 2 r_depth + 3) + 2 gh p_col p_row` multiply-adds, against `N^2`
for the dense product.

Error bound (exact arithmetic, relative to max_i |x_i| of each feature column).
- depth: truncating the Taylor series at rank r leaves, for |x_i|, |x_j| <= R and
  t = 2 c |x_i x_j| <= T = 2 c R^2, `e^{-c (x_i^2 + x_j^2)} sum_{n >= r} t^n / n! <= e^{-t} sum_{n >= r}
  t^n / n! = P(Poisson(t) >= r) <= P(Poisson(T) >= r) =: eps_d` per entry.
- spatial axis with p eigenpairs: the remainder E = sum_{k >= p} lam_k v_k v_k^T has
  `|E_ab| <= max_a sum_{k >= p} |lam_k| V_ak^2 =: eps_axis` (Cauchy-Schwarz), plus 1e-13 g for the
  float64 eigensolver.
With these, every entry of wt~ is within `eps = eps_d + eps_row + eps_col + eps_row eps_col` of
wt, so numerator and column sum are off by at most `N eps max|x|` and `N eps`, and since
|k_hat_j| <= max|x| (a convex combination):

    |k_hat~_j - k_hat_j| <= 2 N eps max|x| / (c_min - N eps),

with `c_min` a lower bound of every column sum: `min_a sum_b S_row[a, b] * min_a sum_b S_col[a, b]
- 1 + (N - 1) exp(-4 cd R^2)`. This is `DscrPlan.bound`. The ranks are the smallest with
`eps_each <= tol c_min / (8 N)` for each of the three factors. Floating-point rounding is
separate: the kernels accumulate in float32 and the Taylor terms alternate in sign for
opposite-signed x, so the plan also estimates `round_est = 4 u32 (N + 2) / c_min` (an estimate,
not a bound).

Depth units. The Taylor rank grows with `T = 2 cd R^2`, i.e. with (depth range / sigma_d)^2. At
the default units (depth maps scaled to [0, 255] by `patch_depth`, sigma_d = 0.6: T ~ 2.7e4)
no rank up to 512 meets the bound for any depth map with more than one level: "auto" runs the
exact dense kernel there and `DscrPlan.reason` says so. The structured path serves narrow
depth ranges (uniform depth, depth in [0, 1] units, or a wide sigma_d) with low-rank spatial
axes (the earlier unit-square coordinates, or a wide sigma_s). An exact fast algorithm for
8-bit depth is the open part of issue 13 (docs/DSCR_UNITS.md).

Choice ("auto"): structured when the grid form is given, N > 1, `bound <= tol(dtype)` is met by
some ranks (rank_depth <= 512), `round_est <= 2e-6`, the nearest grid neighbour's spatial term
is not below `exp(-60)` (see below), `rank_col + rank_depth <= 24` (the kernels' register
path) and the estimated cost is at most a tenth of the dense one (the structured kernels do
8-10x fewer useful operations per second than the dense kernel: measured on the CPU, break-even
near a ratio of 9); dense otherwise. In patch units with sigma_s ~ 0.6 the axes are full rank
(rank_col = gw), so "auto" picks dense there whatever the depth; `method="structured"` still
runs it wherever the bound is met. tol(dtype) = 2^-27 (float32), 2^-14 (float16), 2^-11
(bfloat16): a fraction of the output's unit roundoff.

Underflow rule. The dense kernels count a term whose exponent is below -87 as 0
(`reference.DSCR_EXP_CUTOFF`) and keep a token whose column sum is then 0. The structured
form applies the cut-off to each axis matrix only (per-axis exponent), and the depth Taylor
factor never underflows to an exact 0. The two agree to `N e^{-87} / c_j` relative, negligible
as long as column sums are not themselves near e^{-87}: the plan therefore requires
`exp(-cs / G^2) >= exp(-60)` (every token has a grid neighbour with a non-negligible spatial
term, so c_j >= e^{-60}) and picks dense otherwise (tiny sigma_s). Tokens with c_j <= 0 (N == 1)
keep their key, as in SPEC §1.
"""
from __future__ import annotations

import dataclasses
import functools
import math

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
# "auto" only (see "Choice"): the structured kernels keep rank_col + rank_depth accumulators in
# registers up to this many (csrc/cpu/dscr_factored.cpp, kMaxUnrolled) ...
_FAST_PATH_Q = 24
# ... and even then do about 8-10x fewer useful operations per second than the dense kernel
# (measured on the CPU: break-even at a cost ratio of about 9), so they must save at least this.
_MIN_SAVING = 10.0


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
    """Smallest r with P(Poisson(T) >= r) <= eps (capped at _MAX_RANK + 1)."""
    r = 1
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

    algorithm: "structured" or "dense". grid_unit: the units of the grid form's coordinates
    ("patch" or "unit_square", `kvfix.patch_coords`). rank_depth, rank_row, rank_col: the factor widths
    (an axis whose Taylor rank would reach its length is exact: rank = its length). bound:
    a-priori bound of the structured approximation error relative to max|x| per feature
    column (exact arithmetic); round_est: estimate of float32 rounding, same scale; tol: the
    truncation target for the dtype. cost_structured, cost_dense: estimated multiply-adds per
    feature column (one head dim of one head of K or V). reason: why this algorithm.
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


def _plan(gh: int, gw: int, depth_range: float, cd: float, cs: float, dtype: torch.dtype,
          method: str, grid_unit: str = "patch") -> DscrPlan:
    N = gh * gw
    G = _grid_divisor(gh, gw, grid_unit)
    tol = _TOL[dtype]
    R = 0.5 * depth_range
    # Share the truncation budget between the three factors: eps <= tol c_min / (2 N) / ~3.
    min_row = min_col = 1.0
    rr = rc = rd = 1
    row_exact = col_exact = True
    bound = round_est = math.inf
    cost_s = math.inf
    cost_d = float(N) * N
    c_lb = 0.0
    if N > 1:
        min_row, min_col = _axis_spectrum(gh, G, cs)[4], _axis_spectrum(gw, G, cs)[4]
        c_lb = min_row * min_col - 1.0 + (N - 1) * math.exp(-4.0 * cd * R * R)
        if c_lb > 0:
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
    neighbour_ok = max(gh, gw) == 1 or -cs / (G * G) >= _NEIGHBOUR_MIN_EXPONENT
    feasible = N > 1 and rd <= _MAX_RANK and bound <= tol and round_est <= _ROUND_MAX and neighbour_ok
    if method == "dense":
        algorithm, reason = "dense", "method='dense'"
    elif method == "structured":
        if N > 1 and not feasible:
            raise ValueError(
                f"method='structured' cannot meet the {dtype} tolerance here (gh={gh}, gw={gw}, depth range "
                f"{depth_range:g}: bound {bound:.3g} vs tol {tol:.3g}, rounding estimate {round_est:.3g}"
                f"{'' if neighbour_ok else ', spatial neighbour term below exp(-60)'}); use method='dense'")
        algorithm, reason = "structured", "method='structured'"
    elif N <= 1:
        algorithm, reason = "dense", "N <= 1: nothing to refine"
    elif not neighbour_ok:
        algorithm, reason = "dense", "sigma_s so small that grid neighbours' spatial terms underflow"
    elif rd > _MAX_RANK or bound > tol:
        algorithm, reason = "dense", (
            f"depth range {depth_range:g} too wide for the depth kernel exp(-cd dd^2), cd = alpha / (2 sigma_d^2) "
            f"= {cd:.3g}: " + (f"its Taylor rank would exceed {_MAX_RANK}" if rd > _MAX_RANK else
                               f"error bound {bound:.3g} above the tolerance {tol:.3g}")
            + " (every multi-level depth map at the default [0, 255] units with sigma_d = 0.6 is)")
    elif round_est > _ROUND_MAX:
        algorithm, reason = "dense", (
            f"float32 rounding estimate {round_est:.3g} above {_ROUND_MAX:g}: the lower bound of the column sums "
            f"({c_lb:.3g}) is small, the depth range {depth_range:g} being wide for cd = {cd:.3g}")
    elif cost_s >= cost_d:
        algorithm, reason = "dense", f"structured costs more ({cost_s:.3g} vs {cost_d:.3g} per column)"
    elif rc + rd > _FAST_PATH_Q:
        algorithm, reason = "dense", (
            f"structured factors too wide for the kernels' fast path (rank_col + rank_depth = {rc} + {rd} > "
            f"{_FAST_PATH_Q}{'; the spatial axes are full rank at this sigma_s' if row_exact and col_exact else ''})")
    elif cost_d < _MIN_SAVING * cost_s:
        algorithm, reason = "dense", (f"structured saves only {cost_d / cost_s:.1f}x the operations "
                                      f"(< {_MIN_SAVING:g}x, the dense kernel's per-operation advantage)")
    else:
        algorithm, reason = "structured", f"{cost_d / cost_s:.1f}x fewer operations than dense"
    return DscrPlan(algorithm, gh, gw, rd, rr, rc, row_exact, col_exact, bound, round_est, tol, cost_s, cost_d,
                    depth_range, reason, grid_unit)


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
              grid_unit: str = "patch") -> DscrPlan:
    """The algorithm `kvfix.dscr_refine(..., coords=(gh, gw), method=method, grid_unit=grid_unit)`
    runs, and why.

    depth: the depth tensor ([N] or [B, N]) or its range max - min as a float (the plan depends
    on the largest per-item range only). dtype: the dtype of k and v. grid_unit: "patch"
    (default: the grid's coordinates are `patch_coords(gh, gw)`, adjacent patches 1 apart) or
    "unit_square" (the earlier units). Returns a `DscrPlan` (algorithm, ranks, error bound,
    estimated cost, reason). With method="structured" and no ranks that meet the dtype's
    tolerance: a ValueError. At the default units a multi-level depth map from `patch_depth`
    ([0, 255]) gets the dense kernel (module docstring, "Depth units").
    """
    from .geometry import check_grid_unit
    from .ops import _check_grid_form, _check_plan_depth, _dscr_params
    gh, gw = _check_grid_form((gh, gw))
    check_grid_unit(grid_unit)
    depth = _check_plan_depth(depth, gh, gw)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if dtype not in _TOL:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    sd, ss, a, b = _dscr_params(sigma_d, sigma_s, alpha, beta)
    rng = _depth_range(depth)
    if not math.isfinite(rng):
        raise ValueError("depth has non-finite values (nan or inf)")
    cd, cs = _coefs(sd, ss, a, b)
    return _plan(gh, gw, rng, cd, cs, dtype, method, grid_unit)


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
