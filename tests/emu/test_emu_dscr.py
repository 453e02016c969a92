"""The DSCR CUDA kernel (csrc/kernels/dscr.cuh) on the kvemu SIMT emulator, against
`kvfix.reference.dscr_refine` in float64.

Tolerances are those of the real kernels (tests/test_dscr.py): float16 / bfloat16 follow the
flash-attention rule -- the kernel's max error against the float64 ground truth is at most twice
the error of the PyTorch reference run in the same low precision, plus a slack far below it
(where that reference is exact, e.g. N == 2, the kernel must be exact too); float32 has a tight absolute bound relative to the output's magnitude. Outputs are poisoned with
NaN before every launch so an unwritten element fails, and strided outputs are views into a
NaN-filled buffer so a write outside the view fails too.

Shapes are small (the emulator runs every CUDA thread as a fiber); they still cover every code
path of the kernel: the three block shapes (D <= 64, <= 128, <= 256), head-dim chunking (D > 256),
the wmma path (fp16/bf16 with D % 16 == 0) and the SIMT path (fp32, or D % 16 != 0), partial
token tiles (N not a multiple of 32 / 64), 16-byte and scalar loads and stores (aligned and
misaligned views), broadcast and per-item geometry, keys only, tokens with no weight, and
non-finite geometry (the item's outputs written nan on the device, issue 18).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvemu_fixtures import kvfix_reference

R = kvfix_reference()  # kvfix/reference.py

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEFAULT = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)


@pytest.fixture(scope="module")
def dscr(emu):
    return emu.module("dscr")


def _coefs(sigma_d, sigma_s, alpha, beta):
    """As kvfix::dscr_coefs: computed in double, rounded to float32."""
    return float(np.float32(alpha / (2.0 * sigma_d * sigma_d))), float(np.float32(beta / (2.0 * sigma_s * sigma_s)))


def _geometry(B, N, broadcast):
    bd = 1 if broadcast else B
    depth = torch.rand(bd, N) * 3.0
    coords = torch.rand(bd, N, 2) * 2.0
    return depth, coords


def _kv(B, H, N, D, dtype, layout):
    """[B, H, N, D] inputs in one of several memory layouts (last dim always contiguous)."""
    if layout == "contiguous":
        return torch.randn(B, H, N, D).to(dtype)
    if layout == "bnhd":  # HF's [B, N, H, D] storage, transposed
        return torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
    if layout == "padded":  # a slice of a larger cache, 16-byte aligned rows
        base = torch.randn(B, H + 1, N + 5, D + 8).to(dtype)
        return base[:, 1:, 3:3 + N, :D]
    if layout == "misaligned":  # starts one element in: no 16-byte accesses
        base = torch.randn(B * H * N * D + 1).to(dtype)
        return base[1:].view(B, H, N, D)
    raise ValueError(layout)


def _out(like, layout):
    """A NaN-poisoned output; for 'padded', a view into a larger NaN buffer."""
    if layout == "padded":
        B, H, N, D = like.shape
        base = torch.full((B, H + 2, N + 3, D + 8), float("nan"), dtype=like.dtype)
        return base, base[:, 2:, 1:1 + N, 4:4 + D]
    out = torch.full(like.shape, float("nan"), dtype=like.dtype)
    return out, out


def _run(dscr, k, v, depth, coords, out_layout="contiguous", **params):
    p = {**DEFAULT, **params}
    kbuf, ko = _out(k, out_layout)
    vbuf, vo = _out(v, out_layout) if v is not None else (None, None)
    dscr.dscr_refine(k, v, ko, vo, depth.contiguous(), coords.contiguous(), *_coefs(**p))
    if out_layout == "padded":  # nothing outside the views was written
        for buf, view in ((kbuf, ko), (vbuf, vo)):
            if buf is None:
                continue
            mask = torch.ones(buf.shape, dtype=torch.bool)
            mask[:, 2:, 1:1 + view.shape[2], 4:4 + view.shape[3]] = False
            assert torch.isnan(buf[mask]).all(), "the kernel wrote outside its output view"
    return ko, vo


def _check(out, x, depth, coords, *, which, **params):
    p = {**DEFAULT, **params}
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), f"{which}: unwritten (NaN-poisoned) or non-finite output"
    truth = R.dscr_refine(x.double(), None, depth.double(), coords.double(), **p)[0]
    err = (out.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    if x.dtype == torch.float32:
        assert err <= 1e-5 * scale, f"{which}: float32 error {err} (scale {scale})"
        return
    ref_lp = R.dscr_refine(x, None, depth.to(x.dtype), coords.to(x.dtype), **p)[0]
    ref_err = (ref_lp.double() - truth).abs().max().item()
    slack = 1e-5 * scale
    assert err <= 2 * ref_err + slack, f"{which}: {x.dtype} error {err} vs the reference's {ref_err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("N", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("B,H", [(1, 1), (2, 2)])
def test_dscr_matches_reference(dscr, B, H, N, D, dtype):
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords)
    _check(ko, k, depth, coords, which="k")
    _check(vo, v, depth, coords, which="v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_layout,out_layout", [("bnhd", "contiguous"), ("padded", "padded"),
                                                  ("misaligned", "padded"), ("padded", "contiguous")])
@pytest.mark.parametrize("B,H,N,D", [(2, 1, 33, 64), (1, 2, 40, 128)])
def test_dscr_strided_inputs_and_outputs(dscr, B, H, N, D, dtype, in_layout, out_layout):
    k, v = _kv(B, H, N, D, dtype, in_layout), _kv(B, H, N, D, dtype, in_layout)
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords, out_layout)
    _check(ko, k, depth, coords, which="k")
    _check(vo, v, depth, coords, which="v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [7, 64])
def test_dscr_broadcast_geometry(dscr, N, dtype):
    B, H, D = 2, 2, 64
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=True)  # [1, N], [1, N, 2]: geo_sb = 0
    ko, vo = _run(dscr, k, v, depth, coords)
    _check(ko, k, depth.expand(B, N), coords.expand(B, N, 2), which="k")
    _check(vo, v, depth.expand(B, N), coords.expand(B, N, 2), which="v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D", [(1, 2, 130, 64), (2, 1, 97, 128)])
def test_dscr_several_token_tiles(dscr, B, H, N, D, dtype):
    """N > 64: several output-token tiles per (b, h) and several source tiles per block."""
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords)
    _check(ko, k, depth, coords, which="k")
    _check(vo, v, depth, coords, which="v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dscr_keys_only(dscr, dtype):
    B, H, N, D = 2, 2, 33, 64
    k = _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, None, depth, coords)
    assert vo is None
    _check(ko, k, depth, coords, which="k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [24, 200, 272])
def test_dscr_other_head_dims(dscr, D, dtype):
    """D % 16 != 0 (SIMT path for fp16/bf16, scalar tails), the 256-column shape, and D > 256
    (two launches over head-dim chunks)."""
    B, H, N = 1, 2, 37
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords)
    _check(ko, k, depth, coords, which="k")
    _check(vo, v, depth, coords, which="v")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dscr_tokens_without_weight_are_kept_bit_exact(dscr, dtype):
    """N == 1 and underflowing weights (c_j == 0): the kernel copies the token."""
    k, v = _kv(1, 2, 1, 64, dtype, "contiguous"), _kv(1, 2, 1, 64, dtype, "contiguous")
    depth, coords = _geometry(1, 1, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords)
    assert torch.equal(ko, k) and torch.equal(vo, v)
    # far-apart tokens and tiny sigmas: every weight underflows to 0
    N = 9
    k, v = _kv(1, 1, N, 64, dtype, "contiguous"), _kv(1, 1, N, 64, dtype, "contiguous")
    depth = torch.arange(N, dtype=torch.float32).view(1, N) * 10
    coords = torch.arange(2 * N, dtype=torch.float32).view(1, N, 2) * 10
    ko, vo = _run(dscr, k, v, depth, coords, sigma_d=0.05, sigma_s=0.05)
    assert torch.equal(ko, k) and torch.equal(vo, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dscr_non_default_parameters(dscr, dtype):
    params = dict(sigma_d=0.3, sigma_s=1.7, alpha=1.3, beta=0.2)
    B, H, N, D = 1, 1, 50, 64
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    ko, vo = _run(dscr, k, v, depth, coords, **params)
    _check(ko, k, depth, coords, which="k", **params)
    _check(vo, v, depth, coords, which="v", **params)


def test_dscr_empty_problems_launch_nothing(dscr):
    for shape in [(0, 1, 4, 16), (1, 0, 4, 16), (1, 1, 0, 16), (1, 1, 4, 0)]:
        k = torch.randn(shape)
        ko = torch.full(shape, float("nan"))
        N = shape[2]
        dscr.dscr_refine(k, None, ko, None, torch.rand(1, N), torch.rand(1, N, 2), *_coefs(**DEFAULT))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("exponent,kept", [(-80.0, False), (-95.0, True), (-300.0, True)])
def test_dscr_underflow_cutoff_matches_the_reference(dscr, exponent, kept, dtype):
    """Both proximity terms exp(exponent) for a pair of tokens: above the cut-off every backend
    swaps them (N == 2), below it (-87, float32's normal range; reference.DSCR_EXP_CUTOFF) c_j == 0
    and each keeps its own -- CUDA's expf would still give denormals down to about -103."""
    cd, cs = _coefs(**DEFAULT)
    depth = torch.tensor([[0.0, (-exponent / cd) ** 0.5]])
    coords = torch.tensor([[[0.0, 0.0], [(-exponent / cs) ** 0.5, 0.0]]])
    k, v = _kv(1, 2, 2, 64, dtype, "contiguous"), _kv(1, 2, 2, 64, dtype, "contiguous")
    ko, vo = _run(dscr, k, v, depth, coords)
    assert torch.equal(ko, k if kept else k.flip(2)) and torch.equal(vo, v if kept else v.flip(2))
    truth = R.dscr_refine(k.double(), None, depth.double(), coords.double(), **DEFAULT)[0]
    assert torch.equal(truth, (k if kept else k.flip(2)).double())


# Issue 18: on CUDA the host reads nothing, so non-finite depth / coords cannot raise there (the
# CPU op still does): every block scans its item's geometry and writes nan over its output instead.
NONFINITE = [("depth", float("nan")), ("depth", -math.inf), ("coords", math.inf), ("coords", float("nan"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,bad", NONFINITE, ids=str)
def test_dscr_nonfinite_geometry_writes_the_item_nan(dscr, dtype, where, bad):
    """Per-item geometry: items 0 and 2 carry the bad value (item 0 at its last token, i.e. in the
    last token tile, and in the x coordinate; item 2 at its first token), item 1 is finite. Items 0
    and 2 come out all nan (K and V, every head), item 1 as the reference computes it. The outputs
    start finite, so the nan must come from the kernel."""
    B, H, N, D = 3, 2, 70, 64
    k, v = _kv(B, H, N, D, dtype, "contiguous"), _kv(B, H, N, D, dtype, "contiguous")
    depth, coords = _geometry(B, N, broadcast=False)
    if where == "depth":
        depth[0, N - 1] = bad
        depth[2, 0] = bad
    else:
        coords[0, N - 1, 1] = bad
        coords[2, 0, 0] = bad
    ko, vo = torch.full(k.shape, 0.5).to(dtype), torch.full(v.shape, 0.5).to(dtype)
    dscr.dscr_refine(k, v, ko, vo, depth, coords, *_coefs(**DEFAULT))
    for out in (ko, vo):
        assert out[0].isnan().all() and out[2].isnan().all()
    _check(ko[1:2], k[1:2], depth[1:2], coords[1:2], which="k (finite item)")
    _check(vo[1:2], v[1:2], depth[1:2], coords[1:2], which="v (finite item)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keys_only", [False, True])
def test_dscr_nonfinite_broadcast_geometry_in_place_view(dscr, dtype, keys_only):
    """Broadcast geometry ([1, N]) with one inf coordinate: every item is nan. Written as the CUDA
    cache op writes (a copy of the span as the source, the cache's strided view as the output),
    with D = 272 (two head-dim chunks, each a launch): the whole span is nan in K (and V), nothing
    outside the span changes, and keys only leaves V alone."""
    B, H, N, D = 2, 1, 20, 272
    caches = [torch.randn(B, H + 1, N + 5, D + 8).to(dtype) for _ in range(2)]
    before = [c.clone() for c in caches]
    spans = [c[:, 1:, 3:3 + N, :D] for c in caches]
    srcs = [s.clone() for s in spans]
    depth, coords = _geometry(B, N, broadcast=True)
    coords[0, N // 2, 0] = math.inf
    if keys_only:
        dscr.dscr_refine(srcs[0], None, spans[0], None, depth, coords, *_coefs(**DEFAULT))
    else:
        dscr.dscr_refine(srcs[0], srcs[1], spans[0], spans[1], depth, coords, *_coefs(**DEFAULT))
    for i, (c, c0, s) in enumerate(zip(caches, before, spans)):
        written = i == 0 or not keys_only
        assert s.isnan().all() if written else torch.equal(c, c0)
        mask = torch.ones(c.shape, dtype=torch.bool)
        mask[:, 1:, 3:3 + N, :D] = False
        assert torch.equal(c[mask], c0[mask]), "the kernel wrote outside the span"
