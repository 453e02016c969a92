"""Structured DSCR (kvfix/dscr_structured.py): plan, error bound, kernels vs the float64 dense reference."""
import dataclasses
import math

import pytest
import torch

import kvfix
from kvfix import dscr_structured as S
from kvfix import reference as R
from bench import common
from bench.common import reference_columns_f64
from test_dscr import DEVICES, assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)


def _depth(kind, B, N, device="cpu"):
    if kind == "constant":
        return torch.full((B, N), 0.37, device=device)
    if kind == "unit":
        return torch.rand(B, N, device=device)
    return 80.0 * torch.rand(B, N, device=device)  # unnormalised, e.g. metres


def _truth(k, v, depth, gh, gw, unit="patch", **kw):
    c = kvfix.patch_coords(gh, gw, unit=unit, dtype=torch.float64, device=k.device)  # exact, not float32-rounded
    f = lambda x: None if x is None else x.double()  # noqa: E731
    return R.dscr_refine(f(k), f(v), depth.double(), c, **kw)


# ---------------------------------------------------------------------------------------------
# the plan

def test_plan_patch_units_exact_axes():
    # Patch units (default): the axis matrices exp(-cs (a - b)^2) are nearly diagonal, of full
    # numerical rank, so the low-rank variant uses both axes exactly (too wide for its fast
    # path); the banded variant runs instead (CPU).
    for gh, gw in [(24, 24), (23, 37), (64, 64), (128, 128)]:
        for depth in (torch.rand(gh * gw), torch.zeros(gh * gw)):
            p = kvfix.dscr_plan(gh, gw, depth, method="structured")
            assert p.grid_unit == "patch" and p.bound <= p.tol and p.algorithm == "structured"
            assert p.row_exact and p.col_exact and (p.rank_row, p.rank_col) == (gh, gw)
            assert 1 <= p.rank_depth <= 16
            a = kvfix.dscr_plan(gh, gw, depth)
            assert a.algorithm == "structured" and a.variant == "banded" and a.band == 4, a
            assert "lowrank" not in a.ms_per_column and a.ms_per_column["banded"] < a.ms_per_column["dense"]
    # a wide sigma_s makes the axes low-rank again (and the spatial band wide): both variants are
    # candidates, the cost model picks
    p = kvfix.dscr_plan(24, 24, torch.zeros(576), sigma_s=6.0)
    assert p.algorithm == "structured" and not p.row_exact and p.rank_col + p.rank_depth <= 24, p
    assert {"lowrank", "banded"} <= set(p.ms_per_column) and p.band > 4
    assert p.variant == min(("lowrank", "banded"), key=p.ms_per_column.get)


def test_plan_unit_square_units_use_low_rank_axes():
    # The earlier units (coordinates in the unit square): a smooth, numerically low-rank axis
    # kernel; the banded variant's spatial band spans the grid (beyond 64: not planned).
    for gh, gw in [(24, 24), (23, 37), (64, 64), (128, 128)]:
        p = kvfix.dscr_plan(gh, gw, torch.rand(gh * gw), grid_unit="unit_square", method="structured")
        assert p.algorithm == "structured" and p.grid_unit == "unit_square" and "lowrank" in p.ms_per_column, p
        assert p.bound <= p.tol and p.cost_structured < p.cost_dense
        assert 1 <= p.rank_depth <= 16 and p.rank_row <= 12 and p.rank_col <= 12
        assert ("banded" in p.ms_per_column) == (max(gh, gw) <= 65)
        assert p.variant == min(("lowrank", "banded"), key=lambda v: p.ms_per_column.get(v, math.inf))


@pytest.mark.parametrize("kind", common.DEPTH_KINDS)
def test_plan_picks_banded_for_depth_maps_at_default_units(kind):
    """patch_depth scales a depth map to [0, 255]: no Taylor rank <= 512 meets the low-rank bound,
    the banded variant does (its bound below the dtype's tolerance) and "auto" runs it on the CPU
    where it is faster, and on CUDA wherever it applies (the CUDA rule)."""
    for gh, gw in [(24, 24), (6, 8), (32, 20)]:
        depth = kvfix.patch_depth(common.depth_map(kind, gh, gw), gh, gw)
        for dtype in DTYPES:
            p = kvfix.dscr_plan(gh, gw, depth, dtype=dtype)
            if gh * gw >= 576:
                assert p.algorithm == "structured" and p.variant == "banded", p
            assert p.bound <= p.tol and p.depth_mode in ("values", "grid", "gauss")
            assert p.band == (4 if dtype == torch.float32 else 3)
            if kind != "surfaces-1":
                assert p.rank_depth > 512 and "lowrank" not in p.ms_per_column
            c = kvfix.dscr_plan(gh, gw, depth, dtype=dtype, device="cuda")
            assert c.variant == "banded" and (c.band, c.depth_mode, c.bound) == (p.band, p.depth_mode, p.bound), c


def test_plan_grid_mode_for_dense_continuous_depth():
    """Many tokens per depth level: interpolation on a depth grid is cheaper than one node per
    value, and its bound still holds."""
    depth = 3.0 * torch.rand(4096)
    p = kvfix.dscr_plan(64, 64, depth)
    assert p.variant == "banded" and p.depth_mode == "grid" and p.grid_order in S._GRID_ORDERS, p
    assert 0 < p.grid_step < 1 and p.bound <= p.tol
    # a float range plans for the evenly spread depth of that range (the densest continuum)
    q = kvfix.dscr_plan(64, 64, 255.0)
    assert q.variant == "banded" and q.bound <= q.tol


def test_plan_constant_depth_needs_rank_one():
    p = kvfix.dscr_plan(24, 24, torch.full((576,), 3.0))
    assert p.rank_depth == 1 and p.depth_range == 0.0 and p.depth_mode == "values"


@pytest.mark.parametrize("gh,gw,rng,kw,why", [
    (24, 24, 1.0, dict(sigma_s=0.07), "underflow"),                 # grid neighbours' spatial terms ~ 0
    (1, 7, 1.0, {}, "estimated ms per column: dense"),              # tiny grid: dense is cheaper
    (128, 128, 80.0, dict(grid_unit="unit_square"), "band"),        # neither variant applies
    (1, 1, 0.0, {}, "N <= 1"),
])
def test_plan_falls_back_to_dense(gh, gw, rng, kw, why):
    p = kvfix.dscr_plan(gh, gw, rng, **kw)
    assert p.algorithm == "dense" and p.variant == "" and why in p.reason, p


def test_plan_auto_picks_the_cheapest_estimate():
    for gh, gw, depth, kw in [(24, 24, torch.rand(576), {}), (24, 24, torch.rand(576), dict(grid_unit="unit_square")),
                              (64, 64, 255 * torch.rand(4096), {}), (3, 3, torch.rand(9), {})]:
        p = kvfix.dscr_plan(gh, gw, depth, **kw)
        best = min(p.ms_per_column, key=p.ms_per_column.get)
        assert (p.variant or "dense") == best, p


def test_plan_underflow_rule_follows_the_units():
    # The neighbour term is exp(-cs / G^2): G = 1 in patch units, max(gh, gw) in the unit square.
    assert "underflow" in kvfix.dscr_plan(24, 24, 1.0, sigma_s=0.07).reason            # cs = 81.6 > 60
    kvfix.dscr_plan(24, 24, 1.0, sigma_s=0.09, method="structured")                   # cs = 49.4 < 60
    p = kvfix.dscr_plan(24, 24, 1.0, sigma_s=0.002, grid_unit="unit_square")           # cs / 576 = 173
    assert p.algorithm == "dense" and "underflow" in p.reason
    kvfix.dscr_plan(24, 24, 1.0, sigma_s=0.07, grid_unit="unit_square", method="structured")


def test_plan_bad_grid_unit():
    with pytest.raises(ValueError, match="unit must be one of"):
        kvfix.dscr_plan(24, 24, 1.0, grid_unit="pixel")


def test_plan_method_override():
    assert kvfix.dscr_plan(24, 24, 1.0, method="dense").algorithm == "dense"
    assert kvfix.dscr_plan(1, 7, 1.0, method="structured").algorithm == "structured"
    with pytest.raises(ValueError, match="method='structured' cannot meet"):
        kvfix.dscr_plan(24, 24, 1.0, sigma_s=0.07, method="structured")
    with pytest.raises(ValueError, match="method='structured' cannot meet"):
        kvfix.dscr_plan(128, 128, 80.0, grid_unit="unit_square", method="structured")
    assert kvfix.dscr_plan(24, 24, 255.0, method="structured", device="cuda").variant == "banded"
    with pytest.raises(ValueError, match="method must be one of"):
        kvfix.dscr_plan(24, 24, 1.0, method="fast")


def test_plan_low_precision_needs_fewer_ranks():
    p32 = kvfix.dscr_plan(24, 24, 1.0)
    pbf = kvfix.dscr_plan(24, 24, 1.0, dtype=torch.bfloat16)
    assert pbf.rank_depth < p32.rank_depth and pbf.tol > p32.tol


# ---------------------------------------------------------------------------------------------
# the a-priori bound holds (float64 arithmetic, so only the truncation error is measured)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gh,gw,kind,sigma_d,unit", [
    (24, 24, "unit", 0.6, "patch"), (24, 24, "unit", 0.6, "unit_square"), (23, 37, "unit", 0.05, "unit_square"),
    (8, 9, "unnormalised", 2.0, "unit_square"), (16, 16, "unit", 2.0, "patch"), (5, 40, "constant", 0.6, "patch"),
    (5, 40, "constant", 0.6, "unit_square")])
def test_bound_is_never_violated(gh, gw, kind, sigma_d, unit, dtype):
    N = gh * gw
    kw = dict(PARAMS, sigma_d=sigma_d)
    depth = _depth(kind, 2, N)
    # dtype sets the tolerance, hence the ranks: bf16 ranks are small enough to see the truncation.
    plan = kvfix.dscr_plan(gh, gw, depth, dtype=dtype, method="structured", grid_unit=unit, **kw)
    f = S.dscr_factors(plan, depth, dtype=torch.float64, **kw)
    k = torch.randn(2, 3, N, 8, dtype=torch.float64)
    got = R.dscr_refine_lowrank(k, None, f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)[0]
    truth = _truth(k, None, depth, gh, gw, unit, **kw)[0]
    rel = ((got - truth).abs().amax(2) / k.abs().amax(2)).max().item()  # per feature column
    cd, cs = S._coefs(sigma_d, 0.6, 0.6, 0.8)
    bound = S._lowrank(gh, gw, plan.depth_range, cd, cs, plan.tol, S._grid_divisor(gh, gw, unit))["bound"]
    # The bound is for exact arithmetic (0 where every factor is exact): allow float64 rounding
    # of the N-term sums on top.
    assert rel <= bound + N * 2.0 ** -52, (rel, plan)


def test_bound_is_tight_enough_to_matter():
    """Lowering a rank below the plan's raises both the bound and the measured error."""
    gh, gw = 12, 12
    depth = _depth("unit", 1, gh * gw)
    plan = kvfix.dscr_plan(gh, gw, depth, dtype=torch.bfloat16, **PARAMS)
    low = dataclasses.replace(plan, rank_depth=2)
    f = S.dscr_factors(low, depth, dtype=torch.float64, **PARAMS)
    k = torch.randn(1, 2, gh * gw, 8, dtype=torch.float64)
    got = R.dscr_refine_lowrank(k, None, f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)[0]
    rel = ((got - _truth(k, None, depth, gh, gw, **PARAMS)[0]).abs().amax(2) / k.abs().amax(2)).max().item()
    cd = 0.6 / (2 * 0.6 ** 2)
    R_ = 0.5 * float(depth.max() - depth.min())
    assert rel > 1e-6  # truncation at rank 2 is visible ...
    assert rel <= 2 * gh * gw * S._poisson_tail(2 * cd * R_ * R_, 2) / 1.0  # ... and within the depth bound


# ---------------------------------------------------------------------------------------------
# kernels vs the float64 dense reference (flash-attention rule of test_dscr)

CASES = [  # (gh, gw, depth kind, sigma_d, alpha, beta, D, grid unit)
    (1, 7, "unit", 0.6, 0.6, 0.8, 16, "patch"),
    (24, 24, "unit", 0.6, 0.6, 0.8, 16, "patch"),          # exact axes, depth rank ~10
    (24, 24, "unit", 0.6, 0.6, 0.8, 16, "unit_square"),    # the earlier units: low-rank axes
    (24, 24, "constant", 0.05, 0.6, 0.8, 8, "patch"),
    (23, 37, "unit", 0.05, 0.6, 0.8, 8, "unit_square"),
    (23, 37, "unnormalised", 8.0, 1.0, 0.5, 8, "unit_square"),  # depth in metres, kernel width in metres
    (64, 64, "unit", 2.0, 0.6, 0.8, 4, "patch"),
    (64, 64, "unit", 2.0, 0.6, 0.8, 4, "unit_square"),
    (64, 64, "unit", 0.6, 0.0, 0.8, 4, "patch"),
    (12, 20, "unit", 0.3, 1.5, 0.0, 24, "patch"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gh,gw,kind,sigma_d,alpha,beta,D,unit", CASES)
def test_structured_matches_dense_reference(gh, gw, kind, sigma_d, alpha, beta, D, unit, dtype, device):
    N = gh * gw
    kw = dict(sigma_d=sigma_d, sigma_s=0.6, alpha=alpha, beta=beta)
    big = N > 1000
    B, H = (1, 1) if big else (2, 2)
    k = torch.randn(B, H, N, D, device=device).to(dtype)
    v = torch.randn(B, H, N, D, device=device).to(dtype)
    depth = _depth(kind, B, N, device)
    kvfix.dscr_plan(gh, gw, depth, dtype=dtype, grid_unit=unit, method="structured", **kw)  # the bound is met
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured", grid_unit=unit, **kw)
    if not big:
        tk, tv = _truth(k, v, depth, gh, gw, unit, **kw)
        coords = kvfix.patch_coords(gh, gw, unit=unit, device=device).expand(B, N, 2)
        assert_close_to_reference(k_hat, k, tk, depth, coords, which="k", **kw)
        assert_close_to_reference(v_hat, v, tv, depth, coords, which="v", **kw)
        return
    # N = 4096: float64 truth on 256 output tokens only; the dense kernel's tolerance
    # (test_dscr: 2e-5 for fp32; the output rounding for 16-bit dtypes).
    cols = torch.linspace(0, N - 1, 256).round().long()
    tk, tv = reference_columns_f64(k.cpu(), v.cpu(), depth[0].cpu(),
                                   kvfix.patch_coords(gh, gw, unit=unit, dtype=torch.float64), cols, **kw)
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for out, t in ((k_hat, tk), (v_hat, tv)):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out[:, :, cols].double().cpu() - t).abs().max().item() <= tol * max(1.0, t.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_lowrank_reference(dtype, device):
    """Same factors, same formula: the kernel equals reference.dscr_refine_lowrank to rounding."""
    gh, gw, B, H, D = 6, 9, 3, 2, 40  # D not a multiple of the CPU block width
    depth = torch.rand(B, gh * gw, device=device)
    plan = kvfix.dscr_plan(gh, gw, depth, dtype=dtype)
    sp = S.spatial_factors(plan, sigma_s=0.6, beta=0.8, device=device)
    f = S.dscr_factors(plan, depth, dtype=torch.float64, **PARAMS)
    k = torch.randn(B, H, gh * gw, D, device=device).to(dtype)
    got = torch.ops.kvfix.dscr_refine_lowrank(k, None, depth, *sp, *S.depth_args(plan, 0.6, 0.6))[0]
    want = R.dscr_refine_lowrank(k.double(), None, f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)[0]
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_block_groups_and_tail(dtype):
    """The CPU kernel's work split: at N = 2048 a float32 head's 5 full 16-column blocks run as
    groups of 3 and 2 (16-bit dtypes: one group of 5), then the 8-column tail on its own; the
    outputs (6 MB in float32) are large enough to be prefaulted. In place gives the same bits."""
    gh, gw, B, H, D = 32, 64, 1, 8, 88
    depth = torch.rand(B, gh * gw)
    plan = kvfix.dscr_plan(gh, gw, depth, dtype=dtype)
    sp = S.spatial_factors(plan, sigma_s=0.6, beta=0.8, device="cpu")
    f = S.dscr_factors(plan, depth, dtype=torch.float64, **PARAMS)
    k = torch.randn(B, H, gh * gw, D).to(dtype)
    v = torch.randn(B, gh * gw, H, D).to(dtype).transpose(1, 2)  # strided
    got_k, got_v = torch.ops.kvfix.dscr_refine_lowrank(k, v, depth, *sp, *S.depth_args(plan, 0.6, 0.6))
    want_k, want_v = R.dscr_refine_lowrank(k.double(), v.double(), f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for got, want in ((got_k, want_k), (got_v, want_v)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))
    kk, vv = k.clone(), v.clone()
    torch.ops.kvfix.dscr_refine_lowrank_cache_([kk], [vv], depth, *sp, *S.depth_args(plan, 0.6, 0.6))
    assert torch.equal(kk, got_k) and torch.equal(vv, got_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_16bit_output_is_the_rounded_float32_result(dtype):
    """Same factors and inputs exactly representable in `dtype`: the 16-bit output is the float32
    output rounded to nearest even, bit for bit, and NaN where it is NaN (torch's own conversions
    disagree on a NaN's bits: c10::BFloat16 gives 0x7fc0, the vectorised cast 0xffff)."""
    gh, gw, D = 12, 16, 48
    depth = torch.rand(1, gh * gw)
    plan = kvfix.dscr_plan(gh, gw, depth, dtype=torch.float32)
    args = (depth, *S.spatial_factors(plan, sigma_s=0.6, beta=0.8, device="cpu"), *S.depth_args(plan, 0.6, 0.6))
    k = torch.randn(2, 3, gh * gw, D).to(dtype)
    k[1, 2, 7, 21] = float("nan")  # column 21 of that head: NaN everywhere
    out32 = torch.ops.kvfix.dscr_refine_lowrank(k.float(), None, *args)[0]
    out16 = torch.ops.kvfix.dscr_refine_lowrank(k, None, *args)[0]
    nan = out32.isnan()
    assert nan[1, 2, :, 21].all() and nan.sum() == gh * gw and torch.equal(out16.isnan(), nan)
    assert torch.equal(out16[~nan].view(torch.int16), out32[~nan].to(dtype).view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_single_token_grid_keeps_the_token(device):
    k = torch.randn(2, 3, 1, 16, device=device)
    for method in ("auto", "structured", "dense"):
        k_hat, _ = kvfix.dscr_refine(k, None, torch.rand(2, 1, device=device), (1, 1), method=method)
        assert torch.equal(k_hat, k)


@pytest.mark.parametrize("device", DEVICES)
def test_grid_form_equals_patch_coords(device):
    """coords=(gh, gw) with method='dense' is exactly the tensor form: patch_coords(gh, gw), patch
    units by default (adjacent patches 1 apart), the unit square with grid_unit="unit_square"."""
    k = torch.randn(2, 2, 30, 16, device=device)
    depth = torch.rand(30, device=device)
    a = kvfix.dscr_refine(k, None, depth, (5, 6), method="dense")[0]
    b = kvfix.dscr_refine(k, None, depth, kvfix.patch_coords(5, 6, device=device))[0]
    assert torch.equal(a, b)
    s = torch.stack(torch.meshgrid(torch.arange(5) + 0.5, torch.arange(6) + 0.5, indexing="ij"), -1).reshape(30, 2)
    assert torch.equal(b, kvfix.dscr_refine(k, None, depth, s.to(device))[0])
    a = kvfix.dscr_refine(k, None, depth, (5, 6), method="dense", grid_unit="unit_square")[0]
    b = kvfix.dscr_refine(k, None, depth, kvfix.patch_coords(5, 6, unit="unit_square", device=device))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, kvfix.dscr_refine(k, None, depth, (5, 6), method="dense")[0])


@pytest.mark.parametrize("device", DEVICES)
def test_grid_unit_structured_matches_its_dense_form(device):
    """The structured factors follow grid_unit: each unit's structured result is its own dense one."""
    gh, gw = 6, 7
    k = torch.randn(1, 2, gh * gw, 16, device=device)
    depth = torch.rand(gh * gw, device=device)
    for unit in ("patch", "unit_square"):
        s = kvfix.dscr_refine(k, None, depth, (gh, gw), method="structured", grid_unit=unit)[0]
        d = kvfix.dscr_refine(k, None, depth, kvfix.patch_coords(gh, gw, unit=unit, device=device))[0]
        torch.testing.assert_close(s, d, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# the in-place multi-layer path

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keys_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_inplace_structured(keys_only, dtype, device):
    L, B, H, T, D, s, gh, gw = 3, 2, 2, 80, 24, 7, 8, 8
    N = gh * gw
    ks = [torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(L)]
    vs = [torch.randn(B, T, H, D, device=device).to(dtype).transpose(1, 2) for _ in range(L)]  # strided
    depth = torch.rand(B, N, device=device)
    expected = [kvfix.dscr_refine(k[:, :, s:s + N], v[:, :, s:s + N], depth, (gh, gw), method="structured")
                for k, v in zip(ks, vs)]
    before = [(k.clone(), v.clone()) for k, v in zip(ks, vs)]
    kvfix.dscr_refine_cache_([k[:, :, s:s + N] for k in ks], None if keys_only else [v[:, :, s:s + N] for v in vs],
                             depth, (gh, gw), method="structured")
    for (k, v), (k0, v0), (ek, ev) in zip(zip(ks, vs), before, expected):
        assert torch.equal(k[:, :, s:s + N], ek)
        assert torch.equal(v[:, :, s:s + N], v0[:, :, s:s + N] if keys_only else ev)
        assert torch.equal(k[:, :, :s], k0[:, :, :s]) and torch.equal(k[:, :, s + N:], k0[:, :, s + N:])
        assert torch.equal(v[:, :, :s], v0[:, :, :s]) and torch.equal(v[:, :, s + N:], v0[:, :, s + N:])


def test_cache_auto_uses_structured_and_dense_consistently():
    """auto on the cache path follows the plan (structured or dense) and equals the out-of-place op."""
    B, H, D = 1, 2, 16
    m = torch.rand(48, 48)
    for gh, gw, unit, depth, algorithm in [(24, 24, "unit_square", torch.rand(576), "structured"),
                                           (24, 24, "patch", torch.rand(576), "structured"),
                                           (24, 24, "patch", kvfix.patch_depth(m, 24, 24), "structured"),
                                           (4, 4, "patch", kvfix.patch_depth(m, 4, 4), "dense"),
                                           (24, 24, "patch", torch.rand(576), "dense")]:
        kw = dict(sigma_s=0.07) if algorithm == "dense" and gh == 24 else {}  # underflow rule: dense
        assert kvfix.dscr_plan(gh, gw, depth, grid_unit=unit, **kw).algorithm == algorithm
        k = torch.randn(B, H, gh * gw, D)
        ref = kvfix.dscr_refine(k, None, depth, (gh, gw), grid_unit=unit, **kw)[0]
        kvfix.dscr_refine_cache_([k], None, depth, (gh, gw), grid_unit=unit, **kw)
        assert torch.equal(k, ref)


# ---------------------------------------------------------------------------------------------
# bad input and op registration

@pytest.mark.parametrize("coords,method,exc,match", [
    ((5, 5), "auto", ValueError, "grid 5 x 5 has 25 tokens but k has N=24"),
    ((4, 6, 1), "auto", ValueError, r"grid must be \(gh, gw\)"),
    ((4, 6.0), "auto", ValueError, r"grid must be \(gh, gw\)"),
    ((0, 24), "auto", ValueError, r"grid must be \(gh, gw\)"),
    ("4x6", "auto", TypeError, "coords must be a tensor"),
    (None, "structured", ValueError, "needs coords in the grid form"),
    ((4, 6), "sparse", ValueError, "method must be one of"),
])
def test_bad_grid_input(coords, method, exc, match):
    k = torch.randn(1, 2, 24, 8)
    if coords is None:
        coords = torch.rand(24, 2)
    with pytest.raises(exc, match=match):
        kvfix.dscr_refine(k, None, torch.rand(24), coords, method=method)


def test_bad_grid_unit():
    k = torch.randn(1, 2, 24, 8)
    with pytest.raises(ValueError, match="unit must be one of"):
        kvfix.dscr_refine(k, None, torch.rand(24), (4, 6), grid_unit="pixel")
    with pytest.raises(ValueError, match="applies to the grid form"):
        kvfix.dscr_refine(k, None, torch.rand(24), torch.rand(24, 2), grid_unit="unit_square")
    with pytest.raises(ValueError, match="unit must be one of"):
        kvfix.dscr_refine_cache_([k], None, torch.rand(24), (4, 6), grid_unit="pixel")


def test_non_finite_depth_with_grid_writes_nothing():
    ks = [torch.randn(1, 2, 24, 8) for _ in range(2)]
    before = [k.clone() for k in ks]
    depth = torch.rand(24)
    depth[5] = math.nan
    with pytest.raises(ValueError, match="depth has non-finite"):
        kvfix.dscr_refine_cache_(ks, None, depth, (4, 6))
    assert all(torch.equal(a, b) for a, b in zip(ks, before))


def _lowrank_args(gh, gw, depth):
    plan = kvfix.dscr_plan(gh, gw, depth, method="structured")
    return (depth,) + S.spatial_factors(plan, sigma_s=0.6, beta=0.8, device="cpu") + S.depth_args(plan, 0.6, 0.6)


def test_lowrank_op_checks_shapes():
    k = torch.randn(1, 2, 24, 8)
    depth, lr, rr, lc, rc, cd, r = _lowrank_args(4, 6, torch.rand(1, 24))
    with pytest.raises(ValueError, match="lr, lc: grid 4 x 6 does not hold N=20"):
        torch.ops.kvfix.dscr_refine_lowrank(k[:, :, :20], None, depth[:, :20], lr, rr, lc, rc, cd, r)
    with pytest.raises(TypeError, match="lr must be float32"):
        torch.ops.kvfix.dscr_refine_lowrank(k, None, depth, lr.double(), rr, lc, rc, cd, r)
    with pytest.raises(ValueError, match="depth must be"):
        torch.ops.kvfix.dscr_refine_lowrank(k, None, depth[:, :20], lr, rr, lc, rc, cd, r)
    with pytest.raises(ValueError, match="rank_d must be"):
        torch.ops.kvfix.dscr_refine_lowrank(k, None, depth, lr, rr, lc, rc, cd, 0)


def test_opcheck_lowrank():
    args = _lowrank_args(4, 5, torch.rand(2, 20))
    k, v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_lowrank.default, (k, v) + args)
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_lowrank.default, (k, None) + args)
    ks = [torch.randn(2, 2, 20, 16) for _ in range(2)]
    vs = [torch.randn(2, 2, 20, 16) for _ in range(2)]
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_lowrank_cache_.default, (ks, vs) + args)


def test_empty_batch_or_heads():
    for shape in [(0, 2, 6, 16), (1, 0, 6, 16), (2, 2, 6, 0)]:
        k = torch.randn(shape)
        k_hat, v_hat = kvfix.dscr_refine(k, k.clone(), torch.rand(6), (2, 3), method="structured")
        assert k_hat.shape == k.shape and v_hat.shape == k.shape


# ---------------------------------------------------------------------------------------------
# the banded variant (default units): bound, kernel, every depth-map kind

CD, CS = S._coefs(0.6, 0.6, 0.6, 0.8)
GRIDS = [(24, 24), (12, 20), (20, 7), (1, 9), (9, 1), (2, 2), (1, 2)]


def _map_depth(kind, gh, gw, B=1, seed=0):
    return torch.stack([kvfix.patch_depth(common.depth_map(kind, gh, gw, seed=seed + b), gh, gw) for b in range(B)])


def _column_error(st, depth, gh, gw, item=0):
    """max_j sum_i |w~(i, j) - w(i, j)| of the normalised weights (float64): the error of k_hat
    relative to max|x| per feature column, in exact arithmetic."""
    N = gh * gw
    wt = S.banded_weights(st, item) - 2.0 * torch.eye(N, dtype=torch.float64)
    c = wt.sum(0)
    w = torch.where(c > 0, wt / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(wt))
    ref = R.dscr_weights(depth.double(), kvfix.patch_coords(gh, gw, dtype=torch.float64))[0]
    return (w - ref).abs().sum(0).max().item()


@pytest.mark.parametrize("tol", [2.0 ** -27, 2.0 ** -11], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", common.DEPTH_KINDS)
def test_banded_bound_holds(kind, tol):
    """The structure built in float64 (truncation only): every column's weight error is within
    the a-priori bound, which is below the dtype's tolerance."""
    for gh, gw in GRIDS:
        depth = _map_depth(kind, gh, gw)
        st, info = S._banded(gh, gw, depth.double(), CD, CS, tol, dtype=torch.float64)
        assert info["bound"] <= tol
        assert _column_error(st, depth[0], gh, gw) <= info["bound"] + gh * gw * 2.0 ** -50, (gh, gw, info)


@pytest.mark.parametrize("tol", [2.0 ** -27, 2.0 ** -11], ids=["fp32", "bf16"])
def test_banded_bound_holds_in_grid_mode(tol):
    """Interpolation on the depth grid (many tokens per level): its bound holds too, and a
    coarser grid (a step 1.5x larger) would break the tolerance somewhere (the bound matters)."""
    gh, gw = 16, 16
    depth = 2.0 * torch.rand(1, gh * gw, dtype=torch.float64)
    N = gh * gw
    budget = tol * 0.77 / (2 + tol) / 2
    for p in (6, 12):
        it = S._depth_structure(depth[0], CD, budget, mode=p)
        assert it.mode == "grid" and it.order == p and it.error <= budget
        st, info = S._banded(gh, gw, depth, CD, CS, tol, dtype=torch.float64)
        assert info["bound"] <= tol
    st, info = S._banded(gh, gw, depth, CD, CS, tol, dtype=torch.float64)
    assert info["mode"] == "grid"
    assert _column_error(st, depth[0], gh, gw) <= info["bound"] + N * 2.0 ** -50


@pytest.mark.parametrize("tol", [2.0 ** -27, 2.0 ** -11], ids=["fp32", "bf16"])
def test_banded_bound_holds_in_gauss_mode(tol):
    """Gaussian nodes (many tokens per depth level over a range of many levels): the plan picks
    them, every column's weight error is within the bound (its relative part included: a depth
    map whose tokens crowd at a few depths has large depth column sums), and a step 1.5x larger
    would break the tolerance somewhere (the bound matters)."""
    gh, gw = 24, 24
    N = gh * gw
    g = torch.Generator().manual_seed(0)
    spread = 40.0 * torch.rand(1, N, generator=g, dtype=torch.float64)
    crowded = 10.0 * torch.randint(0, 4, (1, N), generator=g).double() + 4.0 * torch.rand(
        1, N, generator=g, dtype=torch.float64)  # four clusters 4 levels wide
    for depth in (spread, crowded):
        st, info = S._banded(gh, gw, depth, CD, CS, tol, dtype=torch.float64)
        assert info["mode"] == "gauss" and info["bound"] <= tol, info
        assert _column_error(st, depth[0], gh, gw) <= info["bound"] + N * 2.0 ** -50, info
    budget = tol * 0.77 / (2 + tol) / 2
    it = S._depth_structure(spread[0], CD, budget, mode="gauss")
    assert it.mode == "gauss" and it.error <= budget and 0 < it.rel <= budget
    d = spread[0]
    for step, fine in ((it.step, True), (1.5 * it.step, False)):  # every node, no window: the step's error only
        nodes = torch.arange(float(d.min()) - 8.0, float(d.max()) + 8.0, step, dtype=torch.float64)
        A = torch.exp(-2.0 * CD * (d[:, None] - nodes[None, :]) ** 2)
        approx = step * math.sqrt(4.0 * CD / math.pi) * A @ A.T
        exact = torch.exp(-CD * (d[:, None] - d[None, :]) ** 2)
        near = exact > 1e-30  # pairs within 9 levels (float64's rounding of exp(-e), e ~ 300, is ~1e-13)
        err = ((approx - exact).abs()[near] / exact[near]).max().item()
        assert err <= it.rel * (1 + 1e-3) if fine else err > tol, (step, err, it.rel)


def test_gauss_nodes_under_a_cost_cap_as_without_it():
    """The Gaussian nodes with a cost to beat (cap, as the plan passes the best so far: the search
    starts at the largest node count that can still beat it) are the uncapped result wherever that
    result is cheaper, else None: caps around the uncapped cost, spread and clustered depths, two
    budgets."""
    g = torch.Generator().manual_seed(3)
    for d in (255.0 * torch.rand(576, generator=g, dtype=torch.float64),
              30.0 * torch.randint(0, 6, (576,), generator=g).double() + 6.0 * torch.rand(
                  576, generator=g, dtype=torch.float64)):
        for budget in (1e-4, 1e-7):
            free = S._depth_structure(d, CD, budget, mode="gauss")
            assert free is not None and free.mode == "gauss"
            C = free.order
            for cap in (free.ops - 1.0, free.ops, free.ops + 1.0, free.ops + 2.0 * 576, 2.0 * 576 * (C + 3),
                        2.0 * 576 * 2, 1.0):
                got = S._depth_structure(d, CD, budget, mode="gauss", cap=cap)
                if free.ops < cap:
                    assert got is not None and got.ops == free.ops and got.order == C, (budget, cap)
                    assert torch.equal(got.tokw, free.tokw) and torch.equal(got.tok, free.tok)
                else:
                    assert got is None, (budget, cap)


def test_gauss_truncation_bound_holds_and_is_tight():
    """The Gaussian nodes' truncation bound (`_gauss_truncation`, module docstring "gauss") against
    the dropped weight counted pair by pair over every node (float64): at or above every column's
    dropped sum, on a ramp (continuous depth, many tokens per level), random depths and a crowded
    map, and within 20x of it where float64 resolves the dropped sum (C = 14, 18): the bound
    sets C, and each node fewer multiplies it by ~10 on these maps."""
    g = torch.Generator().manual_seed(1)
    ramp = kvfix.patch_depth(common.depth_map("ramp", 32, 32), 32, 32, scale=60.0).double()
    spread = 30.0 * torch.rand(1024, generator=g, dtype=torch.float64)
    crowded = 8.0 * torch.randint(0, 3, (1024,), generator=g).double() + 2.0 * torch.rand(
        1024, generator=g, dtype=torch.float64)
    step = 0.37
    w = step * math.sqrt(4.0 * CD / math.pi)
    for d in (ramp, spread, crowded):
        d0 = float(d.min())
        nodes = d0 + step * torch.arange(-40, int((float(d.max()) - d0) / step) + 41, dtype=torch.float64)
        phi = torch.exp(-2.0 * CD * (d[:, None] - nodes[None, :]) ** 2)           # [N, all nodes]
        near = (d[:, None] - d[None, :]).abs() <= math.sqrt(87.0 / CD)
        for C in (14, 18, 22):
            R = 0.5 * C * step
            first = torch.ceil((d - d0 - R) / step).long() + 40                   # index into nodes
            idx = torch.arange(nodes.numel())
            win = (idx[None, :] >= first[:, None]) & (idx[None, :] < first[:, None] + C)
            kept = phi * win
            dropped = w * (phi @ phi.T - kept @ kept.T)  # >= 0 entry by entry (float64 rounding ~1e-16)
            actual = (dropped * near).sum(0).max().item()
            bound = S._gauss_truncation(d, CD, R, step, 0.0)
            assert actual <= bound * (1 + 1e-9) + 1e-13, (C, actual, bound)
            assert C == 22 or bound <= 20.0 * actual, (C, actual, bound)  # (22: float64 rounding ~1e-14)


def test_gauss_truncation_wide_kernels_bounded_work():
    """A tiny alpha makes the depth kernel's reach (sqrt(87 / cd)) astronomically wide: the bins
    widen so that bins x taps stay within kGaussMaxWork (found by the fuzz test: the reach alone
    had asked numpy for ~1e40 taps): the bound comes back finite, and the grid form of the op
    (whatever the plan picks) still matches the reference."""
    def step(cd):  # as _depth_gauss sets it: relative aliasing q = 1e-8
        return math.pi / math.sqrt(4.0 * cd * -math.log(1e-8))

    d = torch.tensor([0.0, 17.0, 255.0], dtype=torch.float64)
    for cd in (5e-77, 1e-6, 1e-2):
        b = S._gauss_truncation(d, cd, 10 * step(cd), step(cd), 0.0)
        assert math.isfinite(b) and b >= 0.0
    ramp = kvfix.patch_depth(common.depth_map("ramp", 64, 64), 64, 64).double()  # 4096 depths over [0, 255]
    assert math.isfinite(S._gauss_truncation(ramp, 1e-4, 10 * step(1e-4), step(1e-4), 0.0))
    k = torch.randn(1, 1, 3, 2)
    got = kvfix.dscr_refine(k, None, torch.tensor([0.0, 0.5, 1.0]), (1, 3), alpha=5.0311135979441406e-77, beta=0.0)
    want = R.dscr_refine(k.double(), None, torch.tensor([0.0, 0.5, 1.0]).double(), kvfix.patch_coords(1, 3).double(),
                         alpha=5.0311135979441406e-77, beta=0.0)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-6, atol=1e-6)


def test_banded_values_rows_fitted_and_symmetric():
    """The "values" node kernel's rows keep the nearest nodes while the dropped weight stays
    within the budget: symmetric, consecutive, and fewer entries than the count-based reach."""
    depth = kvfix.patch_depth(common.depth_map("ramp", 24, 24), 24, 24).double()
    budget = 2.0 ** -27 * 0.77 / (2 + 2.0 ** -27) / 2
    it = S._depth_structure(depth, CD, budget, mode="values")
    G = it.row_lo.numel()
    T = torch.zeros(G, G, dtype=torch.bool)
    for g in range(G):
        T[g, int(it.row_lo[g]):int(it.row_lo[g] + it.row_len[g])] = True
    assert torch.equal(T, T.T) and T.diagonal().all() and it.error <= budget
    e, counts = torch.unique(depth, return_counts=True)
    f = counts[None, :] * torch.exp(-CD * (e[:, None] - e[None, :]) ** 2)
    assert (f * ~T).sum(1).max().item() <= it.error
    reach = math.sqrt(math.log((depth.numel() - 1) / budget) / CD)  # the count-based rows' reach
    assert int(it.row_len.sum()) < int(((e[:, None] - e[None, :]).abs() <= reach).sum())


def test_taylor_rank_is_the_smallest_rank_meeting_eps():
    """_taylor_rank (which starts its search past T, every tail up to T counting as 1) against
    the search from r = 1, over small to infinite T and eps below and at or above 1."""
    for T in (0.0, 0.5, 1.0, 3.7, 40.0, 511.9, 512.0, 600.0, 1e9, math.inf):
        for eps in (1e-12, 1e-3, 0.999, 1.0, 2.0):
            r = 1
            while r <= S._MAX_RANK and S._poisson_tail(T, r) > eps:
                r += 1
            assert S._taylor_rank(T, eps) == r, (T, eps)


def _fit_rows_by_sorting(e, counts, lo, ln, cd, allowed):
    """kvfix::dscr_fit_rows written out another way: every row's entries sorted farthest first
    (np.lexsort, stable: the lower node first among equal distances), each row's weights summed
    in that order from zero (np.cumsum per row), dropped while that sum stays <= allowed."""
    import numpy as np
    e, counts, lo, ln = (t.numpy() for t in (e, counts, lo, ln))
    rows = np.repeat(np.arange(e.size), ln)
    cols = np.concatenate([np.arange(a, a + n) for a, n in zip(lo, ln)]) if e.size else rows
    dist = np.abs(e[rows] - e[cols])
    ex = -cd * dist * dist
    v = np.where(ex < -87.0, 0.0, counts[cols] * np.exp(ex))
    order = np.lexsort((-dist, rows))
    starts = np.cumsum(ln) - ln
    kept_lo, kept_len, dropped = np.arange(e.size), np.zeros(e.size, dtype=np.int64), np.zeros(e.size)
    for g in range(e.size):
        mine = order[starts[g]:starts[g] + ln[g]]
        tail = np.cumsum(v[mine])
        drop = tail <= allowed
        assert drop.all() or drop.argmin() == drop.sum()  # a prefix: the weights are >= 0
        dropped[g] = tail[drop][-1] if drop.any() else 0.0
        kept = cols[mine][~drop]
        if kept.size:
            kept_lo[g], kept_len[g] = kept.min(), kept.size
            assert kept.max() - kept.min() + 1 == kept.size  # a window
    return kept_lo, kept_len, dropped


@pytest.mark.parametrize("case", ["ties", "spread", "one node", "wide budget", "exact sums", "float32 budget", "none"])
def test_fit_rows_against_sorting(case):
    """The planner's C++ loop (kvfix::dscr_fit_rows: each row's two ends merged, farthest first)
    keeps and drops what sorting every row's entries does: windows of various widths around each
    node, equal distances on both sides (symmetric depths), a budget that drops every entry of a
    row, weights that are whole numbers (cd = 0: a row's dropped sum reaches the budget exactly,
    which still drops), a float32-sized budget among many heavy rows (where a running sum over all
    the rows, as an earlier loop kept, has rounding errors of a visible part of the budget), one
    node, none. The kept windows are equal; the dropped weights to float64 rounding (the loop adds
    a row's weights in the same order, np.exp and the C library's exp may differ in the last
    bit), and never above the budget."""
    import numpy as np
    gen = np.random.default_rng({"ties": 0, "spread": 1, "one node": 2, "wide budget": 3, "exact sums": 5,
                                 "float32 budget": 1, "none": 4}[case])  # 1: an earlier loop dropped 6.8% too much
    G = {"one node": 1, "none": 0, "float32 budget": 600}.get(case, 60)
    if case == "ties":
        e = np.arange(G, dtype=np.float64) * 0.5 - 15.0  # evenly spaced: equal distances on both sides
    else:
        e = np.sort(gen.choice(np.arange(4000), size=G, replace=False)).astype(np.float64) / 16.0
    counts = gen.integers(1, 2000 if case == "float32 budget" else 20, size=G)
    reach = gen.integers(*((20, 60) if case == "float32 budget" else (0, 12)), size=G)  # rows' half widths (nodes)
    lo = np.maximum(np.arange(G) - reach, 0)
    ln = np.minimum(np.arange(G) + reach + 1, G) - lo
    cd = 0.0 if case == "exact sums" else 0.83
    allowed = {"wide budget": 50.0, "exact sums": 12.0, "float32 budget": 3.7e-9}.get(case, 0.3)
    args = [torch.from_numpy(np.ascontiguousarray(x)) for x in (e, counts.astype(np.int64), lo.astype(np.int64),
                                                                ln.astype(np.int64))]
    kept_lo, kept_len, dropped = torch.ops.kvfix.dscr_fit_rows(*args, cd, allowed)
    want_lo, want_len, want_dropped = _fit_rows_by_sorting(*args, cd, allowed)
    assert kept_lo.dtype == kept_len.dtype == torch.int64 and dropped.dtype == torch.float64
    assert np.array_equal(kept_len.numpy(), want_len)
    assert np.array_equal(kept_lo.numpy()[want_len > 0], want_lo[want_len > 0])
    np.testing.assert_allclose(dropped.numpy(), want_dropped, rtol=1e-13, atol=0)
    assert (dropped <= allowed).all()
    if case == "float32 budget":
        assert ((dropped > 0.5 * allowed) & (kept_len > 0)).sum() > 100  # rows stopped near the budget
    if case == "wide budget":
        assert (want_len == 0).any()  # rows dropped whole: an empty window at the node
        assert torch.equal(kept_lo[kept_len == 0], torch.arange(G)[kept_len == 0])
    if case == "ties":
        assert (ln > 2).any() and (want_len < ln).any()
    if case == "exact sums":  # some row's dropped weight is the budget itself
        assert (want_dropped == allowed).any()


def test_depth_structure_bad_inputs():
    """The planner's C++ entry checks what it reads and names the argument."""
    d = torch.linspace(0.0, 5.0, 6, dtype=torch.float64)
    table = S._grid_table(CD, S._GRID_ORDERS)
    op = torch.ops.kvfix.dscr_depth_structure
    with pytest.raises(TypeError, match="depth must be float64"):
        op(d.float(), CD, 1e-6, table, -1, math.inf, None)
    with pytest.raises(ValueError, match="depth must be a contiguous 1-D CPU tensor"):
        op(d[::2], CD, 1e-6, table, -1, math.inf, None)
    with pytest.raises(ValueError, match=r"depth must be finite \(entry 2 is nan\)"):
        op(torch.tensor([0.0, 1.0, math.nan], dtype=torch.float64), CD, 1e-6, table, -1, math.inf, None)
    with pytest.raises(ValueError, match="budget must be finite and > 0"):
        op(d, CD, 0.0, table, -1, math.inf, None)
    with pytest.raises(ValueError, match="cd must be finite and >= 0"):
        op(d, -1.0, 1e-6, table, -1, math.inf, None)
    with pytest.raises(ValueError, match=r"orders must be a contiguous \[n, 3\] CPU tensor"):
        op(d, CD, 1e-6, table[:, :2], -1, math.inf, None)
    with pytest.raises(ValueError, match="orders row 0 must hold an order p in"):
        op(d, CD, 1e-6, torch.tensor([[2.5, 1.0, 1.0]], dtype=torch.float64), -1, math.inf, None)
    with pytest.raises(ValueError, match="force must be -1"):
        op(d, CD, 1e-6, table, 7, math.inf, None)
    with pytest.raises(ValueError, match="spatial must have 6 entries"):
        op(d, CD, 1e-6, table, -1, math.inf, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cap must not be nan"):
        op(d, CD, 1e-6, table, -1, math.nan, None)
    tg = torch.ops.kvfix.dscr_gauss_truncation
    with pytest.raises(ValueError, match="d must not be empty"):
        tg(torch.zeros(0, dtype=torch.float64), CD, 1.0, 0.4, 0.0)
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        tg(d, CD, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="alias must be finite and >= 0"):
        tg(d, CD, 1.0, 0.4, -1.0)


def test_depth_structure_forced_modes_and_cap():
    """The C++ planner's modes on their own: "auto" is the cheapest of values, the grid orders and
    gauss; a mode under a cap at or below its cost is None, as the grid and Gaussian nodes at a
    step too fine to index (a huge cd); N = 1 and alpha = 0 (cd = 0) give the
    one-node values structure; the column sums given the spatial ones are 1 / (spatial + depth
    sums - 2), as the weights they come from (`banded_weights`)."""
    g = torch.Generator().manual_seed(2)
    d = 40.0 * torch.rand(576, generator=g, dtype=torch.float64)
    budget = 2.0 ** -27 * 0.77 / (2 + 2.0 ** -27) / 2
    auto = S._depth_structure(d, CD, budget)
    costs = {m: S._depth_structure(d, CD, budget, mode=m) for m in ("values", "gauss") + S._GRID_ORDERS}
    feasible = {m: it.ops for m, it in costs.items() if it is not None}
    assert auto.ops == min(feasible.values()) and auto.error <= budget
    for m, it in costs.items():
        if it is not None:
            assert it.error <= budget
            assert S._depth_structure(d, CD, budget, mode=m, cap=it.ops) is None
            assert S._depth_structure(d, CD, budget, mode=m, cap=it.ops + 1.0).ops == it.ops
    for mode in (6, "gauss"):  # a node step ~1e-17 levels: never built (node indices would pass int64)
        assert S._depth_structure(d, 1e36, budget, mode=mode) is None
    for sd in (1e-15, 1e-3):  # the grid orders' error coefficients overflow float64 at the first
        assert kvfix.dscr_plan(24, 24, 255.0 * d / 40.0, sigma_d=sd).depth_mode == "values"
    one = S._depth_structure(d[:1], CD, budget)
    assert one.mode == "values" and one.tok.tolist() == [0] and one.row_len.tolist() == [1]
    flat = S._depth_structure(d, 0.0, budget)
    assert flat.mode == "values" and flat.row_lo.numel() == 1 and float(flat.tvals[0]) == 1.0
    spatial = torch.full((576,), 1.5, dtype=torch.float64)
    it = S._depth_structure(d, CD, budget, spatial)
    A = torch.zeros(it.row_lo.numel(), 576, dtype=torch.float64)
    for k in range(it.order):
        A[it.tok + k, torch.arange(576)] += it.tokw[:, k]
    T = torch.zeros(it.row_lo.numel(), it.row_lo.numel(), dtype=torch.float64)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(it.row_len, 0)])
    for r in range(T.shape[0]):
        T[r, int(it.row_lo[r]):int(it.row_lo[r] + it.row_len[r])] = it.tvals[int(ptr[r]):int(ptr[r + 1])]
    torch.testing.assert_close(it.cinv, 1.0 / (spatial + (A.T @ T @ A).sum(1) - 2.0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("alpha", [1.1125369292536007e-308, 1e-290])
@pytest.mark.parametrize("n", [3, 64])
def test_banded_plan_tiny_alpha(alpha, n):
    """alpha ~1e-308 (hypothesis, 2026-12-08): the node steps grow as 1 / sqrt(cd) and squared node
    distances overflowed float64, so the Gaussian nodes were built with a bound of 4e-9 and weights
    off by 3 (N = 3; 0.06 for a 64-token ramp). Nodes are no longer built past a step of 1e140; the
    plan's weights are the reference's within its bound."""
    gh, gw = (1, 3) if n == 3 else (8, 8)
    d = (0.5 * torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) if n == 3
         else torch.linspace(0, 255, n, dtype=torch.float64))
    cd, cs = S._coefs(3.0, 0.6, alpha, 1.0)
    plan_st, info = S._banded(gh, gw, d[None], cd, cs, 2.0 ** -27, dtype=torch.float64)
    assert plan_st is not None and info["bound"] <= 2.0 ** -27
    wt = S.banded_weights(plan_st) - 2.0 * torch.eye(n, dtype=torch.float64)
    ref = R.dscr_weights(d, kvfix.patch_coords(gh, gw, dtype=torch.float64), sigma_d=3.0, sigma_s=0.6, alpha=alpha,
                         beta=1.0)[0]
    assert (wt / wt.sum(0) - ref).abs().sum(0).max().item() <= info["bound"] + n * 2.0 ** -50
    for mode in (6, 12, "gauss"):  # no nodes that far apart
        assert S._depth_structure(d, cd, 2.0 ** -30, mode=mode) is None


@pytest.mark.parametrize("mode", ["gauss", 6, 12])
def test_depth_structure_nodes_over_far_apart_clusters(mode):
    """Grid and Gaussian nodes for depths in two clusters ~5e4 levels apart (the touched nodes
    found by sorting: their span is far wider than the nodes): every token's nodes are the ones
    around its depth, and the structure's weights A^T T A are the depth kernel within its error
    bound (absolute per column, plus the relative part of the Gaussian nodes)."""
    g = torch.Generator().manual_seed(4)
    d = torch.cat([3.0 * torch.rand(20, generator=g, dtype=torch.float64),
                   5e4 + 3.0 * torch.rand(20, generator=g, dtype=torch.float64)])
    budget = 1e-6
    it = S._depth_structure(d, CD, budget, mode=mode)
    assert it is not None and it.mode == ("gauss" if mode == "gauss" else "grid")
    G, N = it.row_lo.numel(), d.numel()
    assert G < 4 * N * it.order  # only the nodes near the clusters, not the ~1e5 in between
    A = torch.zeros(G, N, dtype=torch.float64)
    for k in range(it.order):
        A[it.tok + k, torch.arange(N)] += it.tokw[:, k]
    T = torch.zeros(G, G, dtype=torch.float64)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(it.row_len, 0)])
    for r in range(G):
        T[r, int(it.row_lo[r]):int(it.row_lo[r] + it.row_len[r])] = it.tvals[int(ptr[r]):int(ptr[r + 1])]
    exact = torch.exp(-CD * (d[:, None] - d[None, :]) ** 2)
    err = ((A.T @ T @ A) - exact).abs()
    assert (err.sum(0) <= it.error + it.rel * exact.sum(0) + 1e-12).all(), (err.sum(0).max(), it.error)


def test_fit_rows_bad_inputs():
    e = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    n = torch.ones(3, dtype=torch.int64)
    lo, ln = torch.zeros(3, dtype=torch.int64), torch.full((3,), 3, dtype=torch.int64)
    op = torch.ops.kvfix.dscr_fit_rows
    with pytest.raises(TypeError, match="e must be float64"):
        op(e.float(), n, lo, ln, 1.0, 0.1)
    with pytest.raises(TypeError, match="counts must be int64"):
        op(e, n.int(), lo, ln, 1.0, 0.1)
    with pytest.raises(ValueError, match="row_len must have 3 entries"):
        op(e, n, lo, ln[:2], 1.0, 0.1)
    with pytest.raises(ValueError, match="row 1 must be a window of the 3 nodes that holds node 1"):
        op(e, n, torch.tensor([0, 2, 0]), ln, 1.0, 0.1)
    with pytest.raises(ValueError, match="row 2 must be a window"):
        op(e, n, lo, torch.tensor([3, 3, 4]), 1.0, 0.1)
    with pytest.raises(ValueError, match="e must be finite and strictly increasing"):
        op(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), n, lo, ln, 1.0, 0.1)
    with pytest.raises(ValueError, match="cd must be finite"):
        op(e, n, lo, ln, float("nan"), 0.1)
    with pytest.raises(ValueError, match="row_lo must be a contiguous 1-D CPU tensor"):
        op(e, n, torch.zeros(6, dtype=torch.int64)[::2], ln, 1.0, 0.1)


def _gauss_truncation_by_convolution(d, cd, R, step, alias):
    """The Gaussian nodes' truncation bound written out with numpy: the depths binned, the largest
    drop per bin distance, and the bin counts convolved with it (np.convolve over every bin), the
    largest sum at an occupied bin (the C++ sums each occupied bin's window only)."""
    import numpy as np
    x = d.numpy()
    span = float(x.max() - x.min())
    reach = min(math.sqrt(87.0 / cd), span)
    hb = max(1.0 / 32, span / 65536, math.sqrt(span * reach / 2.0 ** 26))
    w = step * math.sqrt(4.0 * cd / math.pi)
    tau = sum(math.exp(-4.0 * cd * (k * step) ** 2) for k in range(10 ** 6) if 4.0 * cd * (k * step) ** 2 < 745)
    M = int(math.ceil(reach / hb)) + 2
    m = np.arange(M + 1, dtype=np.float64)
    lo, hi = np.maximum(0.0, (m - 1.0) * hb - 1e-9), (m + 1.0) * hb + 1e-9
    h2 = (1.0 + alias) * np.exp(-cd * lo * lo)
    h1 = 2.0 * w * tau * math.exp(-2.0 * cd * R * R) * np.exp(-2.0 * cd * (np.clip(R, lo, hi) - R) ** 2)
    hmax = np.where(hi < 2.0 * R, np.minimum(h1, h2), h2)
    counts = np.bincount(np.floor((x - x.min()) / hb).astype(np.int64)).astype(np.float64)
    sums = np.convolve(counts, np.concatenate((hmax[:0:-1], hmax)), mode="full")[M:M + counts.size]
    return float(sums[counts > 0].max())


def test_gauss_truncation_against_the_whole_convolution():
    """kvfix::dscr_gauss_truncation (each occupied bin's window of bins) against the binned bound
    written with np.convolve over every bin: to float64 rounding, ranges from 1 to 3000 levels,
    tight and wide kernels, 2 to 5000 depths, sorted or not."""
    import numpy as np
    gen = np.random.default_rng(0)
    for i in range(40):
        n, span = int(gen.integers(2, 5000)), float(gen.choice([1.0, 30.0, 255.0, 3000.0]))
        d = torch.from_numpy(np.round(gen.random(n) * span * 64) / 64)
        if i % 2:
            d = torch.sort(d).values
        cd, R, step = float(gen.choice([0.05, 0.83, 3.0])), gen.uniform(0.5, 5), gen.uniform(0.2, 2)
        got = S._gauss_truncation(d, cd, R, step, 0.05)
        assert got == pytest.approx(_gauss_truncation_by_convolution(d, cd, R, step, 0.05), rel=1e-12, abs=0)


def _check_banded_output(out, x, depth, gh, gw, plan):
    """Within the plan's bound plus rounding. float32: the flash-attention rule of test_dscr (2x the
    error of the float32 reference, plus a slack below it) with the bound and the plan's float32
    rounding estimate on top (4 u32 (sum_i |wt~(i, j)| + 2) / c~_j: the kernel sums the weights
    with the diagonal 2 included and subtracts it, a cancellation where c~_j is small). 16-bit
    inputs (exact in float32, float32 arithmetic): the same plus the output's rounding, u |k_hat|
    (u = 2^-8 bfloat16, 2^-11 float16)."""
    truth = R.dscr_refine(x.double(), None, depth.double(), kvfix.patch_coords(gh, gw, dtype=torch.float64))[0]
    assert out.dtype == x.dtype and out.shape == x.shape and torch.isfinite(out).all()
    err = (out.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    xmax = x.abs().max().item()
    x32 = x.float()
    ref = R.dscr_refine(x32, None, depth.float(), kvfix.patch_coords(gh, gw))[0]
    ref_err = (ref.double() - truth).abs().max().item()
    u_out = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[x.dtype]
    tol = (plan.bound + plan.round_est) * xmax + 2 * ref_err + 1e-7 * scale + u_out * truth.abs().max().item()
    assert err <= tol, (err, ref_err, plan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", common.DEPTH_KINDS)
def test_banded_kernel_matches_dense_reference(kind, dtype):
    """Every map kind, square, non-square and one-row grids, a batch with per-item depth."""
    for gh, gw in [(24, 24), (12, 20), (1, 9), (2, 2)]:
        B, H, D = 2, 2, 32
        depth = _map_depth(kind, gh, gw, B)
        plan = kvfix.dscr_plan(gh, gw, depth, dtype=dtype, method="structured")
        assert plan.variant == "banded"
        k = torch.randn(B, H, gh * gw, D).to(dtype)
        v = torch.randn(B, H, gh * gw, D).to(dtype)
        k_hat, v_hat = kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured")
        _check_banded_output(k_hat, k, depth, gh, gw, plan)
        _check_banded_output(v_hat, v, depth, gh, gw, plan)


def test_banded_structure_moves_to_a_device_once():
    """BandedStructure.to: the CPU is the structure itself; another device gets one copy, kept
    and reused (the ops route through _plan_checked, which hands the kernels that copy; the meta
    device stands in for a GPU here)."""
    depth = _map_depth("ramp", 6, 9)
    _, st = S._plan_checked(6, 9, depth, 0.6, 0.6, 0.6, 0.8, torch.float32, "structured", "patch", "cpu")
    assert st.to("cpu") is st
    m = st.to("meta")
    assert m is st.to(torch.device("meta")) and m.gh == st.gh
    assert all(t.device.type == "meta" and t.shape == c.shape and t.dtype == c.dtype
               for t, c in zip(m.args()[:-1], st.args()[:-1]))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("method", ["auto", "dense"])
def test_grid_route_from_cpu_depth_does_not_synchronise(method):
    """kvfix.hf.DSCR's way for a CUDA cache: depth pooled on the CPU, the route planned from it
    (no device round trip), the structure and the ops' depth copied through pinned memory, then
    the op (banded for "auto" here, dense): all of it under torch's sync debug mode "error"."""
    from kvfix.ops import dscr as D
    params = D._dscr_reals(0.6, 0.6, 0.6, 0.8)
    k = torch.randn(1, 2, 24 * 24, 64, device="cuda", dtype=torch.bfloat16)
    depth = _map_depth("ramp", 24, 24)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route = D._dscr_route(k.device, k.dtype, depth, (24, 24), method, params)
        out = D._dscr_run(route, k, None, params)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert route[0] == ("banded" if method == "auto" else "dense")
    # both devices sum in float32 and round once to bfloat16: a rounding apart (2^-8 relative), 2 at most
    ref = kvfix.dscr_refine(k.cpu(), None, depth, (24, 24), method=method)[0]
    torch.testing.assert_close(out.cpu(), ref, atol=2.0 ** -8 * ref.abs().max().item(), rtol=2.0 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and a CUDA build")
def test_banded_cuda_matches_cpu(dtype):
    """The CUDA banded kernels (csrc/kernels/dscr_banded.cuh) against the CPU op on the same
    structure: out of place, and the in-place cache op over 3 layers (strided views); "auto" on
    CUDA runs banded (the CUDA rule) and the structure is copied to the device once."""
    gh, gw, B, H, D = 12, 20, 2, 4, 72
    N = gh * gw
    depth = _map_depth("surfaces-3", gh, gw, B)
    plan, st = S._plan_checked(gh, gw, depth, 0.6, 0.6, 0.6, 0.8, dtype, "auto", "patch", "cuda")
    assert plan.variant == "banded" and st.tok.is_cuda
    assert S._plan_checked(gh, gw, depth, 0.6, 0.6, 0.6, 0.8, dtype, "auto", "patch", "cuda")[1] is st
    cpu = S._plan_checked(gh, gw, depth, 0.6, 0.6, 0.6, 0.8, dtype, "auto", "patch", "cpu")[1]
    k = torch.randn(B, H, N, D).to(dtype)
    v = torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
    want = torch.ops.kvfix.dscr_refine_banded(k, v, *cpu.args())
    got = kvfix.dscr_refine(k.cuda(), v.cuda(), depth.cuda(), (gh, gw))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=0, atol=tol * max(1.0, w.abs().max().item()))
    caches = [torch.randn(B, H, N + 7, D, device="cuda").to(dtype) for _ in range(6)]
    keys, values = [c[:, :, 3:3 + N] for c in caches[:3]], [c[:, :, 3:3 + N] for c in caches[3:]]
    want = [torch.ops.kvfix.dscr_refine_banded(kk.cpu(), vv.cpu(), *cpu.args()) for kk, vv in zip(keys, values)]
    kvfix.dscr_refine_cache_(keys, values, depth.cuda(), (gh, gw))
    for (wk, wv), kk, vv in zip(want, keys, values):
        for g, w in ((kk, wk), (vv, wv)):
            torch.testing.assert_close(g.cpu().double(), w.double(), rtol=0,
                                       atol=tol * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banded_kernel_equals_its_weights(dtype):
    """Same structure, same formula: the kernel equals the structure's weights applied in float64,
    to float32 rounding; D = 40 leaves a narrow last block; v strided; broadcast depth; in place
    gives the same bits; the grid mode too."""
    for gh, gw, depth in [(6, 9, _map_depth("ramp", 6, 9)), (16, 16, 2.0 * torch.rand(1, 256)),
                          (24, 24, 40.0 * torch.rand(1, 576))]:
        N, B, H, D = gh * gw, 2, 3, 40
        plan, st = S._plan_checked(gh, gw, depth, 0.6, 0.6, 0.6, 0.8, dtype, "structured", "patch", "cpu")
        k = torch.randn(B, H, N, D).to(dtype)
        v = torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
        got_k, got_v = torch.ops.kvfix.dscr_refine_banded(k, v, *st.args())
        F = S.banded_weights(st)                                     # [N, N], F[i, j] = wt~(i, j)
        ci = st.cinv[0].double()[None, None, :, None]
        for got, x in ((got_k, k), (got_v, v)):
            want = (torch.einsum("ij,bhid->bhjd", F, x.double()) - 2 * x.double()) * ci
            tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
            torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))
        kk, vv = k.clone(), v.clone()
        torch.ops.kvfix.dscr_refine_banded_cache_([kk], [vv], *st.args())
        assert torch.equal(kk, got_k) and torch.equal(vv, got_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banded_items_with_distinct_depths_and_shared_ones(dtype):
    """One batch, two items in values mode: a ramp (every depth distinct: one token per node, which
    the float32 CPU kernel reads from K / V in node order without building M) and 3 surfaces (nodes
    shared by many tokens: M built); each item equals its weights applied in float64 and the same
    item run alone, bit for bit; D = 72 leaves a narrow last block, V strided, in place equal."""
    gh, gw, H, D = 12, 14, 2, 72
    N = gh * gw
    depth = torch.cat([_map_depth("ramp", gh, gw), _map_depth("surfaces-3", gh, gw)])
    plan, st = S._plan_checked(gh, gw, depth, 0.6, 0.6, 0.6, 0.8, dtype, "structured", "patch", "cpu")
    assert plan.variant == "banded" and plan.depth_mode == "values"
    assert st.cnt.tolist() == [1, 1]
    assert int(st.node_off[1] - st.node_off[0]) == N and int(st.node_off[2] - st.node_off[1]) < N // 4
    k = torch.randn(2, H, N, D).to(dtype)
    v = torch.randn(2, N, H, D).to(dtype).transpose(1, 2)
    got_k, got_v = torch.ops.kvfix.dscr_refine_banded(k, v, *st.args())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for b in range(2):
        F = S.banded_weights(st, b)
        ci = st.cinv[b].double()[None, :, None]
        _, st_b = S._plan_checked(gh, gw, depth[b:b + 1], 0.6, 0.6, 0.6, 0.8, dtype, "structured", "patch", "cpu")
        alone = torch.ops.kvfix.dscr_refine_banded(k[b:b + 1], v[b:b + 1], *st_b.args())
        for got, x, a in ((got_k, k, alone[0]), (got_v, v, alone[1])):
            want = (torch.einsum("ij,hid->hjd", F, x[b].double()) - 2 * x[b].double()) * ci
            torch.testing.assert_close(got[b].double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))
            assert torch.equal(got[b], a[0])
    kk, vv = k.clone(), v.clone()
    torch.ops.kvfix.dscr_refine_banded_cache_([kk], [vv], *st.args())
    assert torch.equal(kk, got_k) and torch.equal(vv, got_v)


def test_banded_single_token_and_tiny_grids():
    k = torch.randn(2, 3, 1, 16)
    assert torch.equal(kvfix.dscr_refine(k, None, torch.rand(2, 1), (1, 1), method="structured")[0], k)
    for gh, gw in [(1, 2), (2, 1), (2, 2), (1, 3)]:
        depth = 255 * torch.rand(gh * gw)
        x = torch.randn(1, 2, gh * gw, 16)
        plan = kvfix.dscr_plan(gh, gw, depth, method="structured")
        _check_banded_output(kvfix.dscr_refine(x, None, depth, (gh, gw), method="structured")[0], x,
                             depth, gh, gw, plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_banded_cache_inplace_strided_slices(dtype):
    """Cache slices (strided, inside a longer sequence), several layers, per-item depth maps: the
    in-place op equals the out-of-place one and leaves the rest of the cache alone."""
    L, B, H, T, D, s, gh, gw = 3, 2, 2, 90, 24, 5, 8, 10
    N = gh * gw
    ks = [torch.randn(B, H, T, D).to(dtype) for _ in range(L)]
    vs = [torch.randn(B, T, H, D).to(dtype).transpose(1, 2) for _ in range(L)]
    depth = _map_depth("surfaces-3", gh, gw, B)
    assert kvfix.dscr_plan(gh, gw, depth, dtype=dtype, method="structured").variant == "banded"
    expected = [kvfix.dscr_refine(k[:, :, s:s + N], v[:, :, s:s + N], depth, (gh, gw), method="structured")
                for k, v in zip(ks, vs)]
    before = [(k.clone(), v.clone()) for k, v in zip(ks, vs)]
    kvfix.dscr_refine_cache_([k[:, :, s:s + N] for k in ks], [v[:, :, s:s + N] for v in vs], depth, (gh, gw),
                             method="structured")
    for (k, v), (k0, v0), (ek, ev) in zip(zip(ks, vs), before, expected):
        assert torch.equal(k[:, :, s:s + N], ek) and torch.equal(v[:, :, s:s + N], ev)
        assert torch.equal(k[:, :, :s], k0[:, :, :s]) and torch.equal(k[:, :, s + N:], k0[:, :, s + N:])
        assert torch.equal(v[:, :, :s], v0[:, :, :s]) and torch.equal(v[:, :, s + N:], v0[:, :, s + N:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gh, kind, H, D", [(24, "ramp", 20, 200), (64, "ramp", 4, 136), (24, "surfaces-3", 40, 100)])
def test_banded_large_outputs_equal_the_in_place_op(gh, kind, H, D, dtype):
    """Out-of-place outputs from 4 MiB on are written with non-temporal stores (rows 16-byte
    aligned; D = 100 in 16-bit is not: regular stores), and every block prefetches the thread's
    next block: the result equals the in-place op's (regular stores) bit for bit, with a narrow
    last block (D % 64 != 0), in values mode (24 x 24 ramp) and with Gaussian nodes (64 x 64 ramp)."""
    N = gh * gh
    depth = _map_depth(kind, gh, gh)
    plan = kvfix.dscr_plan(gh, gh, depth, dtype=dtype, method="structured")
    assert plan.variant == "banded" and plan.depth_mode == ("gauss" if gh == 64 else "values")
    k = torch.randn(1, H, N, D).to(dtype)
    v = torch.randn(1, H, N, D).to(dtype)
    assert k.nbytes >= 4 << 20
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, (gh, gh), method="structured")
    kvfix.dscr_refine_cache_([k], [v], depth, (gh, gh), method="structured")
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v)


def test_opcheck_banded():
    depth = _map_depth("smooth", 4, 5, 2)
    _, st = S._plan_checked(4, 5, depth, 0.6, 0.6, 0.6, 0.8, torch.float32, "structured", "patch", "cpu")
    k, v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_banded.default, (k, v) + st.args())
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_banded.default, (k, None) + st.args())
    ks, vs = [torch.randn(2, 2, 20, 16) for _ in range(2)], [torch.randn(2, 2, 20, 16) for _ in range(2)]
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_banded_cache_.default, (ks, vs) + st.args())


def test_banded_op_checks_structure():
    depth = _map_depth("smooth", 4, 5)
    _, st = S._plan_checked(4, 5, depth, 0.6, 0.6, 0.6, 0.8, torch.float32, "structured", "patch", "cpu")
    k = torch.randn(1, 2, 20, 8)
    args = list(st.args())
    with pytest.raises(ValueError, match="gh=3 does not divide"):
        torch.ops.kvfix.dscr_refine_banded(k, None, *args[:-1], 3)
    bad = args.copy()
    bad[0] = st.tok + 1000
    with pytest.raises(ValueError, match="tok: token node out of range"):
        torch.ops.kvfix.dscr_refine_banded(k, None, *bad)
    bad = args.copy()
    bad[1] = st.tokw.double()
    with pytest.raises(TypeError, match="tokw must be float32"):
        torch.ops.kvfix.dscr_refine_banded(k, None, *bad)
