"""The KVSmooth CUDA kernels (csrc/kernels/kvsmooth.cuh) on the kvemu SIMT emulator, against
`kvfix.reference` (row_entropy in float64; the queue, lam and EMA of kvsmooth_step).

Tolerances are those of the CPU kernel (tests/test_kvsmooth.py): the entropy follows the
flash-attention rule against the reference run in float32 (all kernel arithmetic is float32,
whatever the input dtype); lam must match exactly (the queues keep a margin around z so the rank
does not depend on rounding); the smoothed last position is within one rounding of the input
dtype; everything else in the caches must be bit-identical. Outputs (entropy, lam) and the
kernels' workspace are NaN-poisoned before every launch, so an unwritten value fails.

Shapes are small (every CUDA thread is a fiber) but cover every code path: the five row-group
shapes (8 / 16 / 32 lanes per key row, 1 / 2 / 4 chunks per lane), 16-byte and element-wise loads
(misaligned views, D not a multiple of the vector width), several position splits per (b, kv head)
including empty ones, more than 8 query heads per kv head (several passes), every mask dtype and
broadcast, strided queues, T == 1 and a masked position T - 2 (no EMA), and the rank k / M
(z counted, ties counted, a filling queue divided by its capacity M).
"""
from __future__ import annotations

import math

import pytest
import torch

import kvemu_build
from kvemu_fixtures import kvfix_reference

R = kvfix_reference()  # kvfix/reference.py
# Under AddressSanitizer (about 12x slower) the T = 1000 grid cases are left to the plain runs:
# bounds are exercised by every smaller case, multi-split blocks by test_kvsmooth_splits_*.
ASAN = kvemu_build.asan_requested()

NAN = float("nan")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.fixture(scope="module")
def kvs(emu):
    return emu.module("kvsmooth")


def _inputs(B, Hq, Hkv, T, D, dtype, layout="contiguous"):
    q = torch.randn(B, 1, Hq, D).to(dtype).transpose(1, 2)  # [B, Hq, 1, D], strided heads
    if layout == "contiguous":
        k = (2 * torch.randn(B, Hkv, T, D)).to(dtype)
        v = torch.randn(B, Hkv, T, D).to(dtype)
    elif layout == "bthd":  # [B, T, H, D] storage
        k = (2 * torch.randn(B, T, Hkv, D)).to(dtype).transpose(1, 2)
        v = torch.randn(B, T, Hkv, D).to(dtype).transpose(1, 2)
    elif layout == "misaligned":  # one element in: no 16-byte loads
        k = (2 * torch.randn(B * Hkv * T * D + 1)).to(dtype)[1:].view(B, Hkv, T, D)
        v = torch.randn(B * Hkv * T * D + 1).to(dtype)[1:].view(B, Hkv, T, D)
    else:
        raise ValueError(layout)
    return q, k, v


def _mask(B, T, kind, dtype=torch.float32):
    """Left padding (item b: min(2b, T-1) masked positions) as a [B, 1, 1, T] view."""
    keep = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        keep[b, :min(2 * b, T - 1)] = False
    if kind == "none":
        return None
    if kind == "bool":
        return keep[:, None, None, :]
    if kind == "additive":
        return torch.where(keep, torch.randn(B, T) * 0.5, float("-inf")).to(dtype)[:, None, None, :]
    if kind == "broadcast":  # [1, 1, 1, T] expanded: batch stride 0
        return keep[:1, None, None, :].expand(B, 1, 1, T)
    raise ValueError(kind)


def _entropy(kvs, q, k, mask, scale, splits):
    out = torch.full((q.shape[0], q.shape[1]), NAN)
    kvs.row_entropy(q, k, mask, out, scale, splits)
    return out


def _check_entropy(got, q, k, mask, scale):
    truth = R.row_entropy(q.double(), k.double(), scale=scale, mask=mask)
    ref32 = R.row_entropy(q.float(), k.float(), scale=scale, mask=mask)
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) entropy"
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref32.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * max(1.0, truth.abs().max().item()), f"error {err} vs float32 reference {ref_err}"
    return truth


def _queue(z, M, fill, seed=0):
    """[B, M] entries around z with a margin; the first M - fill slots of each row empty (fill: an
    int, or one per row)."""
    g = torch.Generator().manual_seed(seed)
    off = torch.rand(z.shape[0], M, generator=g) * 2 - 1
    off = torch.where(off.abs() < 0.05, torch.full_like(off, 0.3), off)
    queue = (z.float()[:, None] + off).float()
    fills = [fill] * z.shape[0] if isinstance(fill, int) else fill
    for b, f in enumerate(fills):
        queue[b, :M - f] = NAN
    return queue


def _step(kvs, q, k, v, queue, mask, *, scale, lam_ref=0.9, band=0.2, splits=1, z=None):
    """Run the emulated step on copies; compare with the reference (z: known float64 mean entropy)."""
    B, T = k.shape[0], k.shape[2]
    if z is None:
        z = R.row_entropy(q.double(), k.double(), scale=scale, mask=mask).mean(1)
    lam_want, queue_want = R.kvsmooth_queue(queue, z, lam_ref=lam_ref, band=band)
    if T >= 2:
        ok = R.key_mask(mask, B, T, torch.float32)[1][:, T - 2]
        lam_want = torch.where(ok, lam_want, torch.zeros_like(lam_want))
    else:
        lam_want = torch.zeros_like(lam_want)
    kk, vv, qq = k.clone(), v.clone(), queue.clone()
    lam = torch.full((B,), NAN)
    kvs.kvsmooth_step(q, kk, vv, mask, qq, lam, scale, lam_ref - band, lam_ref + band, splits, None)
    torch.testing.assert_close(lam, lam_want, rtol=0, atol=1e-7)
    assert torch.equal(kk[:, :, :-1], k[:, :, :-1]) and torch.equal(vv[:, :, :-1], v[:, :, :-1])
    for got, x in ((kk, k), (vv, v)):
        want = R.kvsmooth_ema(x, lam_want)
        torch.testing.assert_close(got[:, :, -1].float(), want[:, :, -1].float(), rtol=0,
                                   atol=ULP[x.dtype] * max(1.0, x.abs().max().item()))
    torch.testing.assert_close(qq[:, :-1], queue_want[:, :-1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(qq[:, -1], queue_want[:, -1], rtol=0, atol=2e-6 * max(1.0, z.abs().max().item()))
    return lam


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (32, 32)])
@pytest.mark.parametrize("T", [1, 2, 17, 1000])
def test_kvsmooth_matches_reference(kvs, T, Hq, Hkv, D, dtype):
    if ASAN and T == 1000:
        pytest.skip("T = 1000 runs without ASan (the seed 0/1/2 runs)")
    # queue rows fresh / partly filled / full: one row each with B = 3, cycled over the grid for
    # the large cases (B = 1 keeps the emulated work small)
    big = Hkv * T > 4000
    B = 1 if big else 3
    fills = [[0, 7, 15][(Hq + D + DTYPES.index(dtype)) % 3]] if big else [0, 7, 15]
    kind = ["bool", "additive", "none"][(T + Hq + D) % 3]
    mask = _mask(B, T, kind)
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
    scale = 1.0 / math.sqrt(D)
    splits = 1 if T < 64 else 3
    truth = _check_entropy(_entropy(kvs, q, k, mask, scale, splits), q, k, mask, scale)
    z = truth.mean(1)
    _step(kvs, q, k, v, _queue(z, 15, fills), mask, scale=scale, splits=splits, z=z)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 40, 256, 512])
def test_kvsmooth_row_group_shapes_and_tails(kvs, D, dtype):
    """8-lane groups (D <= 8 chunks), D not a multiple of the 16-byte width (element loads),
    2 and 4 chunks per lane (D = 256, 512)."""
    B, Hq, Hkv, T = 2, 4, 2, 37
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
    mask = _mask(B, T, "bool")
    truth = _check_entropy(_entropy(kvs, q, k, mask, 0.2, 2), q, k, mask, 0.2)
    _step(kvs, q, k, v, _queue(truth.mean(1), 6, 4), mask, scale=0.2, splits=2, z=truth.mean(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bthd", "misaligned"])
def test_kvsmooth_strided_and_misaligned(kvs, layout, dtype):
    B, Hq, Hkv, T, D = 2, 8, 2, 50, 64
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype, layout)
    mask = _mask(B, T, "additive")
    truth = _check_entropy(_entropy(kvs, q, k, mask, 0.125, 2), q, k, mask, 0.125)
    base = torch.full((B, 12), 123.0)
    queue = base[:, ::2]  # a strided queue view [B, 6]
    queue.copy_(_queue(truth.mean(1), 6, 6))
    _step(kvs, q, k, v, queue, mask, scale=0.125, splits=2, z=truth.mean(1))
    assert (base[:, 1::2] == 123.0).all()


@pytest.mark.parametrize("splits", [1, 2, 7, 20])
def test_kvsmooth_splits_including_empty_ones(kvs, splits):
    """T = 17 over 20 splits: most splits hold one position or none (empty partial states)."""
    B, Hq, Hkv, T, D = 2, 4, 2, 17, 64
    for dtype in DTYPES:
        q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
        mask = _mask(B, T, "bool")
        truth = _check_entropy(_entropy(kvs, q, k, mask, 0.125, splits), q, k, mask, 0.125)
        _step(kvs, q, k, v, _queue(truth.mean(1), 4, 2), mask, scale=0.125, splits=splits, z=truth.mean(1))


def test_kvsmooth_many_query_heads_per_kv_head(kvs):
    """g = 20 query heads per kv head: three passes of at most 8 heads over the rows."""
    B, Hq, Hkv, T, D = 1, 40, 2, 70, 64
    for dtype in DTYPES:
        q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
        truth = _check_entropy(_entropy(kvs, q, k, None, 0.125, 2), q, k, None, 0.125)
        _step(kvs, q, k, v, _queue(truth.mean(1), 5, 5), None, scale=0.125, splits=2, z=truth.mean(1))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kvsmooth_mask_dtypes_and_broadcast(kvs, mask_dtype):
    B, Hq, Hkv, T, D = 3, 4, 4, 30, 64
    q, k, v = _inputs(B, Hq, Hkv, T, D, torch.float32)
    for mask in (_mask(B, T, "additive", mask_dtype), _mask(B, T, "broadcast")):
        truth = _check_entropy(_entropy(kvs, q, k, mask, 0.125, 1), q, k, mask, 0.125)
        _step(kvs, q, k, v, _queue(truth.mean(1), 5, 3), mask, scale=0.125, z=truth.mean(1))


def test_kvsmooth_no_ema_cases(kvs):
    B, Hq, Hkv, D = 2, 4, 2, 64
    # T == 1: one position, H = 0, nothing to smooth
    q, k, v = _inputs(B, Hq, Hkv, 1, D, torch.bfloat16)
    lam = _step(kvs, q, k, v, torch.full((B, 15), NAN), None, scale=0.125)
    assert torch.equal(lam, torch.zeros(B))
    # position T - 2 masked for item 0: lam 0 there, smoothed for item 1 (queue [9e9, 9e9, z]:
    # rank 1/3 -> 0.7; queue [0, 0, z] with z > 0: rank 3/3 -> 1)
    q, k, v = _inputs(B, Hq, Hkv, 9, D, torch.float16)
    mask = torch.ones(B, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 7] = False
    lam = _step(kvs, q, k, v, torch.full((B, 3), 9e9), mask, scale=0.125)
    assert lam[0].item() == 0.0 and lam[1].item() == pytest.approx(0.7)
    lam = _step(kvs, q, k, v, torch.zeros(B, 3), mask, scale=0.125)
    assert lam[0].item() == 0.0 and lam[1].item() == 1.0
    # every position masked: entropy 0 (and the EMA still needs position T - 2: masked, lam 0)
    none = torch.zeros(B, 1, 1, 9, dtype=torch.bool)
    assert torch.equal(_entropy(kvs, q, k, none, 0.125, 2), torch.zeros(B, Hq))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvsmooth_rank_counts_z_and_ties(kvs, dtype):
    """rank = k / M, k = #{entries <= z} with z itself counted (the paper's k / M). The emulated
    step is deterministic, so a second run on the same inputs gives the same float32 z bit for
    bit: the queues hold that exact z (ties) and values 1 apart around it."""
    B, Hq, Hkv, T, D, M = 3, 4, 2, 9, 32, 15
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype)
    fresh, lam = torch.full((B, M), NAN), torch.full((B,), NAN)
    kvs.kvsmooth_step(q, k.clone(), v.clone(), None, fresh, lam, 0.125, 0.0, 1.0, 2, None)
    torch.testing.assert_close(lam, torch.full((B,), 1 / 15), rtol=0, atol=1e-7)  # z alone: k = 1
    z = fresh[:, -1].clone()
    assert torch.isnan(fresh[:, :-1]).all() and torch.isfinite(z).all()
    queue = torch.full((B, M), NAN)
    queue[0] = z[0] - torch.arange(15.0, 0.0, -1.0)            # full, every entry below z: z is the max
    queue[1, :] = z[1] + 1.0                                   # full, every entry above z ...
    queue[1, 5:9] = z[1]                                       # ... but for 4 ties
    queue[2, 9:] = torch.tensor([z[2], z[2] + 1, z[2], z[2] - 1, z[2] + 2, z[2]])  # filling: 6 queued
    # after the push: item 0: k = 15; item 1: 4 ties + z, k = 5; item 2: 3 ties, one below, z: k = 5
    # of M = 15 (not of the 7 filled slots)
    for lam_ref, band, want in [(0.5, 0.5, [1.0, 5 / 15, 5 / 15]),
                                (0.9, 0.2, [1.0, 0.7, 0.7]),
                                (0.7, 0.2, [0.9, 0.5, 0.5]),
                                (0.3, 0.2, [0.5, 1 / 3, 1 / 3])]:
        lam = _step(kvs, q, k, v, queue, None, scale=0.125, lam_ref=lam_ref, band=band, splits=2, z=z.double())
        torch.testing.assert_close(lam, torch.tensor(want), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvsmooth_position_from_device_memory(kvs, dtype):
    """A static cache of capacity 40 over 7 splits (6 positions each): the step at a position p
    read by the kernels (0, inside the first split, at a split edge, in the middle, the last)
    matches the reference on the first p + 1 positions; later positions are nan (not yet written)
    and must take no part; only position p changes."""
    B, Hq, Hkv, T, D = 3, 8, 2, 40, 64
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype, "bthd")
    k[:, :, 30:], v[:, :, 30:] = NAN, NAN
    for mask in (_mask(B, T, "bool"), _mask(B, T, "additive"), None):
        for p in (0, 3, 5, 6, 17, 29):
            m = None if mask is None else mask[..., :p + 1]
            z = R.row_entropy(q.double(), k[:, :, :p + 1].double(), scale=0.125, mask=m).mean(1)
            queue = _queue(z, 6, 4, seed=p)
            lam_want, k_want, v_want, q_want = R.kvsmooth_step(q, k, v, queue, scale=0.125, mask=mask,
                                                               position=p, lam_ref=0.5, band=0.5)
            kk, vv, qq, lam = k.clone(), v.clone(), queue.clone(), torch.full((B,), NAN)
            kvs.kvsmooth_step(q, kk, vv, mask, qq, lam, 0.125, 0.0, 1.0, 7, torch.tensor([p]))
            torch.testing.assert_close(lam, lam_want, rtol=0, atol=1e-7)
            assert (lam > 0).any() == (p > 0)
            rest = [t for t in range(T) if t != p]
            assert torch.equal(kk[:, :, rest].nan_to_num(7.0), k[:, :, rest].nan_to_num(7.0))
            assert torch.equal(vv[:, :, rest].nan_to_num(7.0), v[:, :, rest].nan_to_num(7.0))
            for got, want in ((kk, k_want), (vv, v_want)):
                torch.testing.assert_close(got[:, :, p].float(), want[:, :, p].float(), rtol=0,
                                           atol=ULP[dtype] * max(1.0, k[:, :, :30].abs().max().item()))
            torch.testing.assert_close(qq[:, :-1], q_want[:, :-1], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(qq[:, -1], q_want[:, -1], rtol=0, atol=2e-6 * max(1.0, z.abs().max().item()))


def test_kvsmooth_position_outside_the_cache(kvs):
    """A device position outside [0, T) (no host read to refuse it): lam nan, nan pushed, no
    cache position read or written."""
    B, Hq, Hkv, T, D = 2, 4, 2, 12, 64
    q, k, v = _inputs(B, Hq, Hkv, T, D, torch.float32)
    for p in (-1, T, 1 << 40):
        kk, vv, qq, lam = k.clone(), v.clone(), torch.zeros(B, 4), torch.zeros(B)
        kvs.kvsmooth_step(q, kk, vv, None, qq, lam, 0.125, 0.7, 1.1, 3, torch.tensor(p))
        assert torch.isnan(lam).all() and torch.isnan(qq[:, -1]).all() and (qq[:, :-1] == 0).all()
        assert torch.equal(kk, k) and torch.equal(vv, v)


def test_kvsmooth_bad_arguments_fail_before_launching(kvs):
    from kvemu_build import EmuError
    q, k, v = _inputs(1, 3, 2, 8, 64, torch.float32)  # Hq not a multiple of Hkv
    with pytest.raises(EmuError):
        kvs.row_entropy(q, k, None, torch.zeros(1, 3), 0.1, 1)
    q, k, v = _inputs(1, 4, 2, 8, 640, torch.float32)  # D above the kernel's maximum
    with pytest.raises(EmuError):
        kvs.row_entropy(q, k, None, torch.zeros(1, 4), 0.1, 1)


def _nonfinite_case(dtype):
    """Issue 15's rule (kvfix/reference.py, KVSmooth): item 0 a nan query head; item 1 an inf key
    that head 0 sees as +inf (nan entropy) and head 1 as -inf (no part: finite); item 2 a nan
    additive mask value; item 3 a +inf one at its only visible position (T - 2 masked: lam 0);
    item 4 a nan key at a masked position (no part) and inf values at T - 2 (the EMA carries
    them); item 5 a nan query with T - 2 masked (lam 0: nothing written)."""
    B, Hq, Hkv, T, D = 6, 4, 2, 40, 32
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = 2 * torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    mask = torch.zeros(B, 1, 1, T)
    q[0, 1, 0, 5] = NAN
    k[1, 0, 30, 3] = math.inf  # not its row group's first key (a -inf logit then meets a state)
    q[1, 0, 0, 3], q[1, 1, 0, 3] = 1.0, -1.0
    mask[2, ..., 5] = NAN
    mask[3] = -math.inf
    mask[3, ..., 5] = math.inf
    mask[4, ..., 3] = -math.inf
    k[4, 1, 3, 0] = NAN
    v[4, :, T - 2, :4] = math.inf
    q[5, 2, 0, 0] = NAN
    mask[5, ..., T - 2] = -math.inf
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvsmooth_nonfinite_rule(kvs, dtype):
    q, k, v, mask = _nonfinite_case(dtype)
    B, Hq, T = q.shape[0], q.shape[1], k.shape[2]
    truth = R.row_entropy(q.double(), k.double(), scale=0.2, mask=mask.double())
    nan_heads = torch.zeros(B, Hq, dtype=torch.bool)
    nan_heads[0, 1] = nan_heads[1, 0] = nan_heads[5, 2] = True
    nan_heads[2:4] = True
    assert torch.equal(truth.isnan(), nan_heads)
    for splits in (1, 3):
        got = _entropy(kvs, q, k, mask, 0.2, splits)
        assert torch.equal(got.isnan(), nan_heads), f"splits={splits}: {got}"
        torch.testing.assert_close(got.double()[~nan_heads], truth[~nan_heads], rtol=1e-4, atol=1e-4)
    queue = torch.full((B, 5), NAN)
    queue[:, 2:] = torch.tensor([0.5, 1.0, 9.0])
    lam_want, kw, vw, qw = R.kvsmooth_step(q, k, v, queue, scale=0.2, mask=mask)
    assert lam_want[:3].isnan().all() and lam_want[3] == lam_want[5] == 0 and lam_want[4] > 0
    kk, vv, qq, lam = k.clone(), v.clone(), queue.clone(), torch.full((B,), 7.0)
    kvs.kvsmooth_step(q, kk, vv, mask, qq, lam, 0.2, 0.7, 1.1, 3, None)
    torch.testing.assert_close(lam, lam_want, rtol=0, atol=1e-7, equal_nan=True)
    same = lambda a, b: torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())  # noqa: E731
    assert same(kk[:, :, :-1], k[:, :, :-1]) and same(vv[:, :, :-1], v[:, :, :-1])
    assert same(kk[3::2], k[3::2]) and same(vv[3::2], v[3::2])  # lam 0: not even 0 * a nan query's lam added
    for got, want in ((kk, kw), (vv, vw)):
        torch.testing.assert_close(got[:, :, -1].float(), want[:, :, -1].float(), rtol=0, atol=0.02, equal_nan=True)
    assert vv[4, :, -1, :4].isinf().all()
    torch.testing.assert_close(qq[:, :-1], qw[:, :-1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(qq[:, -1].isnan(), qw[:, -1].isnan())


def _layer(dtype, B, Hq, Hkv, T, D, *, mask, scale=0.125, splits=2, layout="contiguous", M=6, fill=4, seed=0):
    """One layer's step arguments (q, k, v, mask, queue, scale, splits), the queue around the true z."""
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype, layout)
    z = R.row_entropy(q.double(), k.double(), scale=scale, mask=mask).mean(1)
    return [q, k, v, mask, _queue(z, M, fill, seed), scale, splits]


def _steps_vs_one_by_one(kvs, layers, lam_lo=0.7, lam_hi=1.1):
    """kvsmooth_steps over `layers` against one kvsmooth_step per layer (on clones): lam, both caches and
    the queues bit for bit. Returns the number of grids kvsmooth_steps launched."""
    B = layers[0][0].shape[0]
    one = [[x.clone() if torch.is_tensor(x) and i in (1, 2, 4) else x for i, x in enumerate(l)] for l in layers]
    want = torch.full((len(layers), B), NAN)
    for i, (q, k, v, mask, queue, scale, splits) in enumerate(one):
        kvs.kvsmooth_step(q, k, v, mask, queue, want[i], scale, lam_lo, lam_hi, splits, None)
    lam = torch.full((len(layers), B), NAN)
    before = kvs.grids_run
    kvs.kvsmooth_steps(*[x for l in layers for x in l], lam, lam_lo, lam_hi)
    grids = kvs.grids_run - before
    assert torch.equal(lam, want) and not lam.isnan().any()
    for got, ref in zip(layers, one):
        for i in (1, 2, 4):  # k, v, queue
            assert torch.equal(got[i].nan_to_num(7.0), ref[i].nan_to_num(7.0))
    return grids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvsmooth_steps_launch_groups_layers_of_one_shape(kvs, dtype):
    """kvsmooth_steps_launch (kvfix.kvsmooth_steps_ on CUDA): consecutive layers of one shape share a
    launch pair, the layer the grid's y index, with the results of one launch pair per layer bit
    for bit. Here runs of 4, 2, 1, 1, 1, 2, 1 layers, each run differing from the one before in one
    thing only: the length, the mask (another tensor), k's alignment (no 16-byte loads), the scale,
    the splits; then the second run's shape again (runs are of consecutive layers)."""
    B, Hq, Hkv, D = 2, 8, 2, 64
    shared = _mask(B, 37, "bool")
    short = _mask(B, 20, "bool")
    other = short.clone()  # the same kind and strides, another tensor (and other values)
    other[1, ..., 7] = False
    layers = [_layer(dtype, B, Hq, Hkv, 37, D, mask=shared, seed=i) for i in range(4)]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=short, seed=i) for i in range(2)]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=other)]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=other, layout="misaligned")]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=other, layout="misaligned", scale=0.25)]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=other, layout="misaligned", scale=0.25, splits=3, seed=i)
               for i in range(2)]
    layers += [_layer(dtype, B, Hq, Hkv, 20, D, mask=short)]
    assert _steps_vs_one_by_one(kvs, layers) == 2 * 7


def test_kvsmooth_steps_launch_more_layers_than_one_pair_takes(kvs):
    """70 layers of one shape: kKvsMaxLayers (64) in the first launch pair, 6 in the second."""
    B, Hq, Hkv, T, D = 2, 2, 1, 9, 16
    shared = _mask(B, T, "additive")
    layers = [_layer(torch.bfloat16, B, Hq, Hkv, T, D, mask=shared, splits=1, seed=i) for i in range(70)]
    assert _steps_vs_one_by_one(kvs, layers) == 2 * 2


def test_kvsmooth_steps_launch_refuses_a_bad_layer_before_launching(kvs):
    from kvemu_build import EmuError
    B, Hq, Hkv, T, D = 1, 4, 2, 8, 64
    good = _layer(torch.float32, B, Hq, Hkv, T, D, mask=None)
    bad = _layer(torch.float32, B, Hq, Hkv, T, D, mask=None)
    bad[0] = bad[0][:, :3]  # Hq not a multiple of Hkv
    k0 = good[1].clone()
    before = kvs.grids_run
    with pytest.raises(EmuError):
        kvs.kvsmooth_steps(*good, *bad, torch.zeros(2, B), 0.7, 1.1, quiet=True)
    assert kvs.grids_run == before and torch.equal(good[1], k0)
