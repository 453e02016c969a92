"""The SCR CUDA kernels (csrc/kernels/scr.cuh) on the kvemu SIMT emulator, against `kvfix.reference`.

scr_scores follows the flash-attention rule against the reference run in float32 (all kernel
arithmetic is float32); scr_redistribute matches the float64 reference within float32 rounding for
float32 and the same rule for float16 / bfloat16, and rows METHODS §3 leaves alone are bit-identical.
Outputs, the scores workspace (NaN) and the source flags (0xab) are poisoned before every launch.

Shapes are small (every CUDA thread is a fiber) but cover the code paths: several row tiles (Tq >
16), key tiles (T > 32) and head-dim chunks (D > 64), image spans that start and end inside a key
tile, causal blocks that skip row tiles, GQA, every mask dtype and broadcast, strided k; grids
1x1 .. 32x40 with top_k 0, 1, 32 and more than the candidates, ties, in place and out of place.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvemu_fixtures import kvfix_reference

R = kvfix_reference()  # kvfix/reference.py
NAN = float("nan")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def scr(emu):
    return emu.module("scr")


def _check_rule(got, truth, same, what):
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN-poisoned) output"
    err = (got.double() - truth).abs().max().item()
    ref_err = (same.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * max(1.0, truth.abs().max().item()), f"{what}: error {err} vs reference {ref_err}"


def _scores(scr, q, k, span, *, mask=None, scale=None, causal=False):
    D = q.shape[-1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.full((q.shape[0], span[1] - span[0]), NAN)
    m4 = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    scr.scr_scores(q, k, m4, out, span[0], scale, int(causal))
    truth = R.scr_scores(q.double(), k.double(), span, scale=scale, mask=mask, causal=causal)
    ref32 = R.scr_scores(q.float(), k.float(), span, scale=scale, mask=mask, causal=causal)
    _check_rule(out, truth, ref32, "scr_scores")
    return out


def _qk(B, Hq, Hkv, Tq, T, D, dtype, layout="contiguous"):
    q = torch.randn(B, Tq, Hq, D).to(dtype).transpose(1, 2)
    if layout == "contiguous":
        k = (1.5 * torch.randn(B, Hkv, T, D)).to(dtype)
    else:  # [B, T, H, D] storage
        k = (1.5 * torch.randn(B, T, Hkv, D)).to(dtype).transpose(1, 2)
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv,Tq,T,D,span", [
    (2, 2, 5, 40, 8, (3, 37)),       # one row tile, two key tiles
    (4, 2, 20, 70, 70, (10, 45)),    # two row tiles, three key tiles, two head-dim chunks
    (2, 1, 1, 33, 16, (0, 33)),      # a single query row
])
def test_scr_scores_matches_reference(scr, Hq, Hkv, Tq, T, D, span, dtype):
    q, k = _qk(2, Hq, Hkv, Tq, T, D, dtype)
    _scores(scr, q, k, span)
    _scores(scr, q, k, span, causal=True, scale=0.2)


@pytest.mark.parametrize("kind", ["bool", "additive_f16", "per_head_bf16", "broadcast"])
def test_scr_scores_masks_and_strided_k(scr, kind):
    B, Hq, Tq, T = 2, 4, 18, 50
    q, k = _qk(B, Hq, 2, Tq, T, 16, torch.float32, layout="bthd")
    keep = torch.rand(B, 1, Tq, T) > 0.2
    keep[1, :, 4, :] = False  # a fully masked row
    if kind == "bool":
        mask = keep
    elif kind == "additive_f16":
        mask = torch.where(keep, torch.randn(B, 1, Tq, T), float("-inf")).half()
    elif kind == "per_head_bf16":
        mask = torch.where(keep.expand(B, Hq, Tq, T), 0.0, float("-inf")).bfloat16()
        mask[:, 2, :, :7] = float("-inf")
    else:
        mask = keep[:1, :, :1].expand(B, 1, 1, T)
    _scores(scr, q, k, (5, 47), mask=mask)
    _scores(scr, q, k, (5, 47), mask=mask, causal=True)


def _redis(scr, hidden, scores, grid, *, top_k, lam, exclude_border=True):
    truth = R.scr_redistribute(hidden.double(), scores.double(), grid, top_k=top_k, lam=lam,
                               exclude_border=exclude_border)
    same = R.scr_redistribute(hidden, scores, grid, top_k=top_k, lam=lam, exclude_border=exclude_border)
    out = torch.full(hidden.shape, NAN).to(hidden.dtype)
    scr.scr_redistribute(hidden, out, scores, grid[0], grid[1], top_k, lam, int(exclude_border), 0)
    if hidden.dtype == torch.float32:
        assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
        torch.testing.assert_close(out.double(), truth, rtol=2e-6, atol=2e-6)
    else:
        _check_rule(out, truth, same, "scr_redistribute")
    same_rows = (truth == hidden.double()).all(-1)
    assert torch.equal(out[same_rows], hidden[same_rows])
    inplace = hidden.clone()
    scr.scr_redistribute(inplace, inplace, scores, grid[0], grid[1], top_k, lam, int(exclude_border), 1)
    assert torch.equal(inplace, out)
    return out


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 5), (24, 24), (32, 40)])
@pytest.mark.parametrize("top_k", [0, 1, 32, 10_000])
def test_scr_redistribute_grids(scr, grid, top_k):
    B, N = 2, grid[0] * grid[1]
    scores = torch.rand(B, N)
    scores[:, 2::5] = scores[:, :1]  # ties
    C = 8 if N > 100 else 130        # C > 128: the strided channel loop
    _redis(scr, torch.randn(B, N, C), scores, grid, top_k=top_k, lam=1.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scr_redistribute_dtypes_strides_options(scr, dtype):
    B, grid = 2, (6, 7)
    N = 42
    full = torch.randn(B, N + 5, 20).to(dtype)
    hidden = full[:, 3:3 + N, :17]  # the image span of a longer stream, C sliced
    scores = torch.rand(B, N)
    _redis(scr, hidden, scores, grid, top_k=6, lam=1.1)
    _redis(scr, hidden.contiguous(), scores, grid, top_k=9, lam=0.7, exclude_border=False)


def _width(scr, hidden, out=None):
    w = torch.zeros(1, dtype=torch.int64)
    scr.scr_redistribute_width(hidden, hidden if out is None else out, w)
    return int(w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scr_redistribute_vector_width(scr, dtype):
    """16-byte accesses only where both tensors' bases, C and the strides in use allow them."""
    V = 128 // torch.finfo(dtype).bits  # elements in 16 bytes
    full = torch.zeros(2, 12, 3 * V, dtype=dtype)
    assert _width(scr, full) == V
    assert _width(scr, full[:, :, :2 * V]) == V                 # row stride 3 V: a multiple
    assert _width(scr, full[:, :, 1:1 + 2 * V]) == 1            # base one element in
    assert _width(scr, full[:, :, :V + 1]) == 1                 # C not a multiple
    assert _width(scr, full, torch.zeros_like(full)) == V                # a separate aligned out
    assert _width(scr, full, torch.zeros(2 * 12 * 3 * V + 1, dtype=dtype)[1:].view(2, 12, 3 * V)) == 1  # out
    odd = torch.zeros(2, 12 * (2 * V + 1), dtype=dtype).view(2, 12, 2 * V + 1)[:, :, :2 * V]
    assert _width(scr, odd) == 1                                 # row stride 2 V + 1
    assert _width(scr, odd[:1, :1]) == V                         # ... unused with one row of one item


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["vectors", "one_in"])
def test_scr_redistribute_vector_path(scr, dtype, layout):
    """C = V (2 * 128 + 3): each thread's two accesses per iteration, then a tail where only three
    threads have one; out of place and in place, against the reference (and the scalar path: the
    same tensor one element in)."""
    V = 128 // torch.finfo(dtype).bits  # elements in 16 bytes
    B, grid, C = 2, (5, 6), V * (2 * 128 + 3)
    full = torch.randn(B, 30, C + 1).to(dtype)
    hidden = full[:, :, :C] if layout == "vectors" else full[:, :, 1:]
    hidden = hidden.contiguous() if layout == "vectors" else hidden
    assert _width(scr, hidden, torch.empty(B, 30, C, dtype=dtype)) == (V if layout == "vectors" else 1)
    _redis(scr, hidden, torch.rand(B, 30), grid, top_k=6, lam=1.2)


@pytest.mark.parametrize("top_k", [1, 5, 17])
def test_scr_redistribute_ties_at_the_cut(scr, top_k):
    """Scores from {0, 1, 2, 3}: the top_k cut falls inside a group of equal scores, where only
    'lower index first' decides (per item: different scores per batch item)."""
    B, grid = 3, (9, 11)
    scores = torch.randint(0, 4, (B, 99)).float()
    _redis(scr, torch.randn(B, 99, 12), scores, grid, top_k=top_k, lam=1.2)


@pytest.mark.parametrize("D,scale", [(48, None), (64, 0.3)])
def test_scr_scores_large_finite_logits(scr, D, scale):
    """Keys ~1e10 (issue 15 item 4): the softmax must be shifted by the row max in both passes;
    logits this large overflow any unshifted exp. The CPU's exp helper had returned nan here."""
    q, k = _qk(2, 4, 2, 7, 40, D, torch.float32)
    _scores(scr, q, 1e10 * k, (2, 10), scale=scale)


def test_scr_scores_nonfinite_rule(scr):
    """Issue 15: a nan or +inf logit of a key that takes part makes its row's softmax nan, hence
    the item's scores (the reference's rule); a row whose keys are all masked out contributes 0."""
    B, Hq, Tq, T, D = 3, 2, 5, 40, 16
    q, k = _qk(B, Hq, 2, Tq, T, D, torch.float32)
    k[1, 0, 33, :] = math.inf  # item 1: +inf logits (q has both signs: some rows +inf, some -inf)
    q[1, :, :, :] = q[1, :, :, :].abs()  # ... make every logit of key 33 +inf
    mask = torch.zeros(B, 1, Tq, T)
    mask[0, :, 2, :] = NAN  # item 0: a row of nan logits
    mask[2, :, 3, :] = -math.inf  # item 2: a row without keys
    out = torch.full((B, 20), NAN)
    scr.scr_scores(q, k, mask, out, 5, 0.25, 0)
    want = R.scr_scores(q.double(), k.double(), (5, 25), scale=0.25, mask=mask.double())
    assert out[:2].isnan().all() and want[:2].isnan().all()
    torch.testing.assert_close(out[2].double(), want[2], atol=1e-6, rtol=1e-5)


def test_scr_scores_inf_only_visible_key(scr):
    """Issue 15: a +inf logit (here from an additive mask) that is its row's only visible key:
    softmax has no value there, so the row is nan in every column and the item's scores are nan
    (the reference's rule); before, only that key's own column turned nan. Item 0: the key is an
    image column (causal: after the row, which then has no key); item 1: it lies before the
    image, in a row that sees no image column when causal (a row the mass pass skips); item 2:
    finite."""
    B, Hq, Tq, T, D = 3, 2, 40, 70, 16
    q, k = _qk(B, Hq, 1, Tq, T, D, torch.float32)
    mask = torch.zeros(B, 1, Tq, T)
    mask[0, :, 2] = -math.inf
    mask[0, :, 2, 55] = math.inf
    mask[1, :, 0] = -math.inf
    mask[1, :, 0, 3] = math.inf
    for causal in (False, True):
        out = torch.full((B, 20), 0.0)
        scr.scr_scores(q, k, mask, out, 50, 0.25, int(causal))
        want = R.scr_scores(q.double(), k.double(), (50, 70), scale=0.25, mask=mask.double(), causal=causal)
        assert want[1].isnan().all() and want[0].isnan().all() == (not causal)  # causal: row 2 sees no key
        assert torch.equal(out.isnan(), want.isnan()), out
        fin = ~want.isnan()
        torch.testing.assert_close(out.double()[fin], want[fin], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_scr_redistribute_nonfinite_scores_item_nan(scr, dtype, bad):
    """Issue 18: the CUDA op reads nothing on the host, so non-finite scores cannot raise there:
    the kernels write nan over every row of that item (out of place and in place) and leave the
    other items as the reference computes them. Items 0 and 2 carry the bad value (at the last
    patch: in the second tile of scores), item 1 is finite."""
    B, grid = 3, (12, 13)
    N = grid[0] * grid[1]
    hidden = torch.randn(B, N, 9).to(dtype)
    scores = torch.rand(B, N)
    scores[0, N - 1] = bad
    scores[2, 0] = bad
    out = torch.full(hidden.shape, 0.5).to(dtype)  # finite poison: the nan must come from the kernel
    scr.scr_redistribute(hidden, out, scores, grid[0], grid[1], 8, 1.3, 1, 0)
    assert out[0].isnan().all() and out[2].isnan().all()
    truth = R.scr_redistribute(hidden[1:2].double(), scores[1:2].double(), grid, top_k=8, lam=1.3)
    same = R.scr_redistribute(hidden[1:2], scores[1:2], grid, top_k=8, lam=1.3)
    _check_rule(out[1:2], truth, same, "scr_redistribute (finite item)")
    inplace = hidden.clone()
    scr.scr_redistribute(inplace, inplace, scores, grid[0], grid[1], 8, 1.3, 1, 1)
    assert torch.equal(inplace.isnan(), out.isnan()) and torch.equal(inplace[1], out[1])
