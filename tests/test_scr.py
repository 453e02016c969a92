"""SCR (METHODS §3): the reference by hand, kernels against the reference, bad input, registration."""
import math

import pytest
import torch

import kvfix
from kvfix import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in kvfix.build_info()["devices"] else [])


# ---------------------------------------------------------------------------------------------
# the reference, by hand

def _grid(rows):
    """Hand-drawn grid: a list of strings, 'S' = source expected; returns the flat bool mask."""
    return torch.tensor([[ch == "S" for ch in row] for row in rows]).flatten()


def test_reference_sources_4x4_ties_border_and_cap():
    # interior of 4x4: 5, 6, 9, 10; the border holds the largest scores and must be ignored
    s = torch.tensor([[9., 9, 9, 9,
                       9, 1, 3, 9,
                       9, 3, 2, 9,
                       9, 9, 9, 9]])
    assert torch.equal(R.scr_sources(s, (4, 4), top_k=1)[0], _grid(["....", "..S.", "....", "...."]))
    # 6 and 9 tie at 3: the lower index wins
    assert torch.equal(R.scr_sources(s, (4, 4), top_k=2)[0], _grid(["....", "..S.", ".S..", "...."]))
    assert torch.equal(R.scr_sources(s, (4, 4), top_k=3)[0], _grid(["....", "..S.", ".SS.", "...."]))
    # top_k above the 4 candidates: capped
    assert torch.equal(R.scr_sources(s, (4, 4), top_k=50)[0], _grid(["....", ".SS.", ".SS.", "...."]))
    assert not R.scr_sources(s, (4, 4), top_k=0).any()
    # without border exclusion the border's 9s come first, in index order
    assert torch.equal(R.scr_sources(s, (4, 4), top_k=5, exclude_border=False)[0],
                       _grid(["SSSS", "S...", "....", "...."]))
    # grids thinner than 3 have no interior
    assert not R.scr_sources(torch.randn(2, 4), (2, 2), top_k=4).any()
    assert not R.scr_sources(torch.randn(1, 1), (1, 1), top_k=4).any()


def test_reference_redistribute_4x4_adjacent_sources():
    """Sources 5 and 6 (adjacent: neither is the other's neighbour), lam = 2, h[i] = i (C = 1):
        0  1  2  3        0+5   1+11  2+11  3+6
        4  5  6  7   ->   4+5   5/2   6/2   7+6
        8  9 10 11        8+5   9+11 10+11 11+6
       12 13 14 15       12    13    14    15
    (each neighbour gains (lam - 1) * the sum of its adjacent sources: 5, 6 or 5 + 6 = 11)."""
    h = torch.arange(16, dtype=torch.float64).view(1, 16, 1)
    s = torch.zeros(1, 16, dtype=torch.float64)
    s[0, 5], s[0, 6] = 2.0, 1.0
    out = R.scr_redistribute(h, s, (4, 4), top_k=2, lam=2.0)
    want = torch.tensor([5, 12, 13, 9,
                         9, 2.5, 3, 13,
                         13, 20, 21, 17,
                         12, 13, 14, 15], dtype=torch.float64)
    assert torch.equal(out.flatten(), want)


def test_reference_redistribute_5x3_overlapping_neighbourhoods():
    """5 x 3 grid, candidates 4, 7, 10 (the middle column); sources 4 and 10 (top_k = 2), whose
    neighbourhoods overlap on the whole middle row 6, 7, 8. lam = 1.5 (weight 0.5), C = 2 with
    h[i] = (i, -2 i):
        row 0: 0 1 2       + 0.5 * 4
        row 1: 3 [4] 5     3, 5: + 0.5 * 4; source 4 -> 4 / 1.5
        row 2: 6 7 8       + 0.5 * (4 + 10)
        row 3: 9 [10] 11   9, 11: + 0.5 * 10; source 10 -> 10 / 1.5
        row 4: 12 13 14    + 0.5 * 10"""
    h = torch.arange(15, dtype=torch.float64)
    h = torch.stack([h, -2 * h], dim=-1)[None]
    s = torch.tensor([[0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 4, 0, 0, 0, 0]], dtype=torch.float64)
    out = R.scr_redistribute(h, s, (5, 3), top_k=2, lam=1.5)
    add = torch.tensor([2, 2, 2, 2, 0, 2, 7, 7, 7, 5, 0, 5, 5, 5, 5], dtype=torch.float64)
    want0 = torch.arange(15, dtype=torch.float64) + add
    want0[4], want0[10] = 4 / 1.5, 10 / 1.5
    torch.testing.assert_close(out[0, :, 0], want0, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, :, 1], -2 * want0, rtol=0, atol=1e-12)
    # top_k = 3: 7 becomes a source too; 7 stays a source (no gain), the middle row's sides
    # now gain from all three
    out3 = R.scr_redistribute(h, s, (5, 3), top_k=3, lam=1.5)
    assert out3[0, 7, 0].item() == pytest.approx(7 / 1.5)
    assert out3[0, 6, 0].item() == pytest.approx(6 + 0.5 * (4 + 7 + 10))
    assert out3[0, 3, 0].item() == pytest.approx(3 + 0.5 * (4 + 7))
    assert out3[0, 1, 0].item() == pytest.approx(1 + 0.5 * 4)


def test_reference_scores_by_hand():
    # D = 1, scale 1, one head, T = 3 keys with logits [0, ln 2, ln 5] for q = 1 -> p = [1/8, 2/8, 5/8]
    k = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=torch.float64).view(1, 1, 3, 1)
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(R.scr_scores(q, k, (1, 3), scale=1.0),
                               torch.tensor([[2 / 8, 5 / 8]], dtype=torch.float64))
    # two query rows: q = 0 (uniform 1/3 each) and q = 1: the mass is the sum over the rows
    q2 = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 2, 1)
    torch.testing.assert_close(R.scr_scores(q2, k, (0, 3), scale=1.0),
                               torch.tensor([[1 / 3 + 1 / 8, 1 / 3 + 2 / 8, 1 / 3 + 5 / 8]], dtype=torch.float64))
    # causal: row 0 sits at position 1 (sees keys 0, 1: p = [1/2, 1/2]), row 1 at position 2
    torch.testing.assert_close(R.scr_scores(q2, k, (0, 3), scale=1.0, causal=True),
                               torch.tensor([[1 / 2 + 1 / 8, 1 / 2 + 2 / 8, 5 / 8]], dtype=torch.float64))
    # a fully masked row contributes 0; heads are averaged
    mask = torch.tensor([[False] * 3, [True, True, False]]).view(1, 1, 2, 3)
    torch.testing.assert_close(R.scr_scores(q2, k, (0, 3), scale=1.0, mask=mask),
                               torch.tensor([[1 / 3, 2 / 3, 0.0]], dtype=torch.float64))
    q3 = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)  # 2 heads on one kv head
    torch.testing.assert_close(R.scr_scores(q3, k, (2, 3), scale=1.0),
                               torch.tensor([[(1 / 3 + 5 / 8) / 2]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# kernels vs reference: scr_redistribute

GRIDS = [(1, 1), (2, 2), (3, 5), (24, 24), (32, 40)]


def _check_lowp(got, truth, ref_same_dtype, what=""):
    """The flash-attention rule: error vs float64 <= 2x the reference's in the same dtype + slack."""
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref_same_dtype.double() - truth).abs().max().item()
    slack = 1e-6 * max(1.0, truth.abs().max().item())
    assert err <= 2 * ref_err + slack, f"{what}: error {err} vs the same-dtype reference's {ref_err}"


def _hidden(B, N, C, dtype, device, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(B, N, C, device=device).to(dtype)
    # the image span of a [B, T, C] residual stream, with room after C too
    full = torch.randn(B, N + 9, C + 3, device=device).to(dtype)
    return full[:, 4:4 + N, :C]


def _scores(B, N, device):
    s = torch.rand(B, N, device=device)
    if N > 4:
        s[:, 1::3] = s[:, 0:1]  # ties within each item, different per item
    return s


def check_redistribute(hidden, scores, grid, **kw):
    truth = R.scr_redistribute(hidden.double().cpu(), scores.double().cpu(), grid, **kw)
    same = R.scr_redistribute(hidden.cpu(), scores.cpu(), grid, **kw)
    out = kvfix.scr_redistribute(hidden, scores, grid, **kw)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape and out.is_contiguous()
    if hidden.dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), truth, rtol=2e-6, atol=2e-6)
    else:
        _check_lowp(out.cpu(), truth, same, "out of place")
    # in place: same values; rows that do not change keep their bits, the view's surroundings too
    base = hidden._base if hidden._base is not None else hidden
    before, orig = base.clone(), hidden.clone()
    ret = kvfix.scr_redistribute_(hidden, scores, grid, **kw)
    assert ret is hidden
    assert torch.equal(hidden, out)
    src = R.scr_sources(scores.cpu(), grid, top_k=kw.get("top_k", 32), exclude_border=kw.get("exclude_border", True))
    same = (truth == orig.cpu().double()).all(-1)  # rows METHODS §3 leaves unchanged: bit for bit
    assert torch.equal(hidden.cpu()[same], orig.cpu()[same])
    if base is not hidden:
        mask = torch.ones_like(base, dtype=torch.bool)
        off = hidden.storage_offset() - base.storage_offset()
        mask.view(-1)[off:].as_strided(hidden.shape, hidden.stride()).fill_(False)
        assert torch.equal(base[mask], before[mask])
    return out, src


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("top_k", [0, 1, 32, 10_000])
@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_matches_reference_fp32(grid, top_k, device):
    B, N = 3, grid[0] * grid[1]
    hidden = _hidden(B, N, 24, torch.float32, device)
    out, src = check_redistribute(hidden, _scores(B, N, device), grid, top_k=top_k, lam=1.3)
    if top_k == 0 or min(grid) < 3:
        assert not src.any()


@pytest.mark.parametrize("grid", [(3, 5), (24, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "span"])
@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_dtypes_and_strides(grid, dtype, layout, device):
    B, N = 2, grid[0] * grid[1]
    hidden = _hidden(B, N, 40, dtype, device, layout)
    check_redistribute(hidden, _scores(B, N, device), grid, top_k=7, lam=1.1)


@pytest.mark.parametrize("C", [1, 21, 300])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_channel_tails_and_chunks(C, dtype, device):
    """C not a multiple of the vector widths, and over one 256-wide fp32 chunk."""
    hidden = _hidden(2, 30, C, dtype, device, "span")
    check_redistribute(hidden, _scores(2, 30, device), (5, 6), top_k=4, lam=1.4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_every_neighbour_count(dtype, device):
    """Non-source rows with 1 to 8 source neighbours (the CPU kernel has a loop per count)."""
    gh, gw = 16, 16
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, gh * gw, generator=g).to(device)
    _, src = check_redistribute(_hidden(2, gh * gw, 40, dtype, device), scores, (gh, gw), top_k=150, lam=1.2,
                                exclude_border=False)
    s = src.view(2, 1, gh, gw).float()
    count = torch.nn.functional.conv2d(s, torch.ones(1, 1, 3, 3), padding=1) - s  # source neighbours
    seen = set(count[s == 0].long().tolist())
    assert set(range(1, 9)) <= seen, seen


@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_options(device):
    B, grid = 2, (5, 6)
    N = 30
    hidden = _hidden(B, N, 300, torch.float32, device)  # C over one 256-wide accumulator chunk
    scores = _scores(B, N, device)
    for kw in (dict(exclude_border=False, top_k=5, lam=0.5), dict(top_k=3, lam=1.0), dict(top_k=12, lam=3.0)):
        check_redistribute(hidden.clone(), scores, grid, **kw)
    # scores of another dtype are used as float32
    check_redistribute(hidden.clone(), scores.double(), grid, top_k=4)


@pytest.mark.parametrize("top_k", [1, 5, 17])
@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_ties_at_the_cut(top_k, device):
    """Scores from {0, 1, 2, 3}: the top_k cut falls inside a group of equal scores."""
    scores = torch.randint(0, 4, (3, 99), device=device).float()
    _, src = check_redistribute(_hidden(3, 99, 12, torch.float32, device), scores, (9, 11), top_k=top_k, lam=1.2)
    for b in range(3):  # the sources are the first top_k candidates in (score desc, index asc) order
        cand = [i for i in range(99) if 0 < i // 11 < 8 and 0 < i % 11 < 10]
        order = sorted(cand, key=lambda i: (-scores[b, i].item(), i))
        assert set(src[b].nonzero().flatten().tolist()) == set(order[:top_k])


@pytest.mark.parametrize("device", DEVICES)
def test_redistribute_batch_items_use_their_own_scores(device):
    h = torch.randn(1, 25, 8, device=device).expand(2, 25, 8).contiguous()
    s = torch.rand(2, 25, device=device)
    out = kvfix.scr_redistribute(h, s, (5, 5), top_k=2)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], kvfix.scr_redistribute(h[b:b + 1], s[b:b + 1], (5, 5), top_k=2))
    assert not torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# kernels vs reference: scr_scores

def _qk(B, Hq, Hkv, Tq, T, D, dtype, device="cpu", layout="contiguous"):
    q = torch.randn(B, Tq, Hq, D, device=device).to(dtype).transpose(1, 2)  # transformers' layout
    if layout == "contiguous":
        k = (1.5 * torch.randn(B, Hkv, T, D, device=device)).to(dtype)
    elif layout == "static":  # a slice of a longer cache
        k = (1.5 * torch.randn(B, Hkv, T + 5, D, device=device)).to(dtype)[:, :, :T]
    else:  # [B, T, H, D] storage
        k = (1.5 * torch.randn(B, T, Hkv, D, device=device)).to(dtype).transpose(1, 2)
    return q, k


def check_scores(q, k, span, **kw):
    got = kvfix.scr_scores(q, k, span, **kw)
    assert got.dtype == torch.float32 and got.shape == (q.shape[0], span[1] - span[0])
    mask = kw.get("mask")
    kw64 = dict(kw, mask=None if mask is None else mask.cpu())
    truth = R.scr_scores(q.double().cpu(), k.double().cpu(), span, **kw64)
    ref32 = R.scr_scores(q.float().cpu(), k.float().cpu(), span, **kw64)
    _check_lowp(got.cpu(), truth, ref32, "scr_scores")
    return got, truth


@pytest.mark.parametrize("Hq,Hkv,Tq,T,D", [(4, 4, 5, 40, 16), (8, 2, 7, 33, 64), (6, 3, 1, 20, 8),
                                           (2, 1, 70, 90, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scores_match_reference(Hq, Hkv, Tq, T, D, dtype, device):
    q, k = _qk(2, Hq, Hkv, Tq, T, D, dtype, device)
    check_scores(q, k, (3, T - 4))
    check_scores(q, k, (0, T), causal=Tq <= T)


@pytest.mark.parametrize("layout", ["static", "bthd"])
@pytest.mark.parametrize("device", DEVICES)
def test_scores_strided_k_and_scale(layout, device):
    q, k = _qk(2, 4, 2, 6, 25, 16, torch.float32, device, layout)
    check_scores(q, k, (5, 21), scale=0.3)
    check_scores(q[:, :, 2:], k, (0, 25), causal=True)


@pytest.mark.parametrize("kind", ["bool", "additive", "finfo_min", "per_head"])
@pytest.mark.parametrize("device", DEVICES)
def test_scores_masks(kind, device):
    B, Hq, Tq, T = 3, 4, 6, 30
    q, k = _qk(B, Hq, 2, Tq, T, 16, torch.float32, device)
    keep = torch.ones(B, 1, Tq, T, dtype=torch.bool, device=device)
    keep[1, ..., :4] = False           # left padding
    keep[2, :, 3, :] = False           # a fully masked row
    keep[0, :, :, 10:12] = False       # holes inside the image span
    if kind == "bool":
        mask = keep
    elif kind == "additive":
        mask = torch.where(keep, torch.randn(B, 1, Tq, T, device=device), float("-inf"))
    elif kind == "finfo_min":  # transformers' padding value: counts as a (tiny) logit, not as excluded
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min).to(device)
        mask[2, :, 3, :] = float("-inf")
    else:
        mask = keep.expand(B, Hq, Tq, T).clone()
        mask[:, 1, :, 7] = False
    got, truth = check_scores(q, k, (2, 26), mask=mask)
    check_scores(q, k, (2, 26), mask=mask, causal=True)
    if kind != "finfo_min":  # broadcast [B, 1, 1, T] / [T] shapes too
        check_scores(q, k, (2, 26), mask=mask[:, :1, :1] if kind != "per_head" else mask[:, :, :1])
        check_scores(q, k, (2, 26), mask=mask[0, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_scores_empty_span_and_long_rows(device):
    q, k = _qk(1, 2, 1, 3, 300_000, 8, torch.float32, device)  # the row block shrinks for long rows
    check_scores(q, k, (1000, 1576))
    assert kvfix.scr_scores(q, k, (7, 7)).shape == (1, 0)


def test_scores_deterministic():
    q, k = _qk(2, 8, 2, 40, 100, 32, torch.float32)
    a = kvfix.scr_scores(q, k, (10, 90), causal=True)
    assert all(torch.equal(a, kvfix.scr_scores(q, k, (10, 90), causal=True)) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, nothing written

def _ok_redistribute():
    return dict(hidden=torch.randn(2, 12, 8), scores=torch.rand(2, 12), grid_hw=(3, 4), top_k=2, lam=1.1)


@pytest.mark.parametrize("change,exc,match", [
    (dict(grid_hw=(4, 4)), ValueError, "grid_hw"),
    (dict(grid_hw=(12, 0)), ValueError, "grid_hw"),
    (dict(grid_hw=(3.0, 4)), TypeError, "grid_hw"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(lam=0.0), ValueError, "lam"),
    (dict(lam=-1.0), ValueError, "lam"),
    (dict(lam=float("inf")), ValueError, "lam"),
    (dict(scores=torch.rand(2, 11)), ValueError, "scores"),
    (dict(scores=torch.randint(0, 3, (2, 12))), TypeError, "scores"),
    (dict(hidden=torch.randn(12, 8)), ValueError, "hidden"),
    (dict(hidden=torch.randn(2, 12, 8).double()), TypeError, "hidden"),
    (dict(hidden=torch.randn(2, 12, 16)[..., ::2]), ValueError, "hidden"),
    (dict(hidden=torch.randn(2, 12, 0)), ValueError, "hidden"),
    (dict(hidden=[1.0]), TypeError, "hidden"),
    (dict(exclude_border=1), TypeError, "exclude_border"),
])
def test_redistribute_bad_input(change, exc, match):
    kw = _ok_redistribute()
    kw.update(change)
    hidden, scores, grid = kw.pop("hidden"), kw.pop("scores"), kw.pop("grid_hw")
    before = hidden.clone() if isinstance(hidden, torch.Tensor) else None
    for fn in (kvfix.scr_redistribute, kvfix.scr_redistribute_):
        with pytest.raises(exc, match=match):
            fn(hidden, scores, grid, **kw)
    if before is not None:
        assert torch.equal(hidden, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_redistribute_non_finite_scores_rejected(bad):
    kw = _ok_redistribute()
    kw["scores"][1, 5] = bad
    before = kw["hidden"].clone()
    for fn in (kvfix.scr_redistribute, kvfix.scr_redistribute_):
        with pytest.raises(ValueError, match="scores has non-finite"):
            fn(kw["hidden"], kw["scores"], kw["grid_hw"], top_k=2)
    assert torch.equal(kw["hidden"], before)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA build and a GPU")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_redistribute_non_finite_scores_cuda_nan_item(bad):
    """CUDA reads nothing on the host (issue 18): the item with a non-finite score is all nan,
    the other item equals the CPU op's result."""
    kw = _ok_redistribute()
    kw["scores"][1, 5] = bad
    hidden, scores = kw["hidden"].cuda(), kw["scores"].cuda()
    want = kvfix.scr_redistribute(kw["hidden"][:1], kw["scores"][:1], kw["grid_hw"], top_k=2)
    out = kvfix.scr_redistribute(hidden, scores, kw["grid_hw"], top_k=2)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[:1].cpu(), want)  # fp32 defaults: the kernels may fuse h + (lam - 1) acc
    kvfix.scr_redistribute_(hidden, scores, kw["grid_hw"], top_k=2)
    assert torch.equal(hidden.isnan(), out.isnan()) and torch.equal(hidden[:1], out[:1])


@pytest.mark.parametrize("change,exc,match", [
    (dict(image_span=(5, 3)), ValueError, "image_span"),
    (dict(image_span=(0, 21)), ValueError, "image_span"),
    (dict(image_span=(-1, 3)), ValueError, "image_span"),
    (dict(image_span=3), TypeError, "image_span"),
    (dict(q=torch.randn(2, 4, 3, 8).double()), TypeError, "q"),
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q"),
    (dict(q=torch.randn(2, 3, 3, 8)), ValueError, "multiple"),
    (dict(q=torch.randn(2, 4, 0, 8)), ValueError, "q must not be empty"),
    (dict(q=torch.randn(2, 4, 3, 16)[..., ::2]), ValueError, "q needs"),
    (dict(k=torch.randn(2, 2, 20, 8).half()), TypeError, "k dtype"),
    (dict(k=torch.randn(3, 2, 20, 8)), ValueError, "k shape"),
    (dict(mask=torch.ones(2, 1, 1, 19, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(2, 1, 1, 20, dtype=torch.int32)), TypeError, "mask"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(causal=True, q=torch.randn(2, 4, 21, 8), k=torch.randn(2, 2, 20, 8)), ValueError, "causal"),
])
def test_scores_bad_input(change, exc, match):
    kw = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 20, 8), image_span=(2, 10))
    kw.update(change)
    with pytest.raises(exc, match=match):
        kvfix.scr_scores(kw.pop("q"), kw.pop("k"), kw.pop("image_span"), **kw)


def test_cpp_checks_behind_the_wrappers():
    """The checks are the C++ ones (the wrappers only convert arguments): direct torch.ops calls
    get the same errors."""
    h, s = torch.randn(1, 6, 4), torch.rand(1, 6)
    with pytest.raises(ValueError, match="grid_hw"):
        torch.ops.kvfix.scr_redistribute(h, s, 2, 2, 1, 1.1, True)
    with pytest.raises(ValueError, match="lam"):
        torch.ops.kvfix.scr_redistribute_(h, s, 2, 3, 1, 0.0, True)
    with pytest.raises(TypeError, match="scores must be float32"):
        torch.ops.kvfix.scr_redistribute(h, s.double(), 2, 3, 1, 1.1, True)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="image_span"):
        torch.ops.kvfix.scr_scores(q, k, 2, 6, None, None, False)
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        torch.ops.kvfix.scr_scores(q, k, 0, 5, None, torch.ones(1, 3, 1, 5, dtype=torch.bool), False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_scores_inf_only_visible_key(causal, device):
    """Issue 15: a +inf logit (from an additive mask) that is its row's only visible key has no
    softmax: the row is nan in every column, so the item's scores are nan, as the reference (the
    CUDA kernel had turned only that key's column nan). Item 0: an image key (causal: after the
    row, which then has no key: finite); item 1: a key before the image, in a row that sees no
    image column when causal; item 2: finite."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Tq, T, D = 3, 2, 40, 70, 16
    q, k = torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, 1, T, D, generator=g)
    mask = torch.zeros(B, 1, Tq, T)
    mask[0, :, 2] = -math.inf
    mask[0, :, 2, 55] = math.inf
    mask[1, :, 0] = -math.inf
    mask[1, :, 0, 3] = math.inf
    got = kvfix.scr_scores(q.to(device), k.to(device), (50, 70), scale=0.25, mask=mask.to(device), causal=causal).cpu()
    want = R.scr_scores(q.double(), k.double(), (50, 70), scale=0.25, mask=mask.double(), causal=causal)
    assert want[1].isnan().all() and want[0].isnan().all() == (not causal)
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    torch.testing.assert_close(got.double()[fin], want[fin], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile

def test_opcheck():
    q, k = _qk(2, 4, 2, 5, 12, 8, torch.float32)
    mask = torch.rand(2, 1, 5, 12) > 0.2
    torch.library.opcheck(torch.ops.kvfix.scr_scores.default, (q, k, 2, 9, None, None, False))
    torch.library.opcheck(torch.ops.kvfix.scr_scores.default, (q.bfloat16(), k.bfloat16(), 0, 12, 0.5, mask, True))
    h, s = torch.randn(2, 20, 6), torch.rand(2, 20)
    torch.library.opcheck(torch.ops.kvfix.scr_redistribute.default, (h, s, 4, 5, 3, 1.2, True))
    torch.library.opcheck(torch.ops.kvfix.scr_redistribute_.default, (h.clone(), s, 4, 5, 3, 1.2, False))


def test_torch_compile_fullgraph():
    q, k = _qk(1, 4, 2, 6, 30, 16, torch.float32)
    h = torch.randn(1, 25, 8)

    def f(q, k, h):
        s = kvfix.scr_scores(q * 1.0, k, (3, 28), causal=True)
        out = kvfix.scr_redistribute(h, s, (5, 5), top_k=3)
        kvfix.scr_redistribute_(h, s, (5, 5), top_k=3)
        return s + 0, out * 1

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    h1, h2 = h.clone(), h.clone()
    got, want = compiled(q, k, h1), f(q, k, h2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(h1, h2) and not torch.equal(h1, h)
