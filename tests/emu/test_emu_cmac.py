"""The CMAC CUDA kernels (csrc/kernels/cmac.cuh) on the kvemu SIMT emulator, against
`kvfix.reference` (float64 ground truth).

Tolerances: the flash-attention rule of tests/test_cmac.py (kernel error vs float64 <= 2x the
error of the reference run in the input dtype, plus a small slack); outputs are NaN-poisoned
before every launch, so an unwritten element fails. Shapes are small (every CUDA thread is a
fiber) but cover every code path: both tile configurations (D <= 128 and D up to 256), query tiles
split at the image's end, key tiles cut at the span's edges, GQA, causal with a cache offset
(prefill, a chunk, single-token decode), per-item spans from a device tensor, bool / additive masks
with broadcast strides, per-item IMD flags, both mu_V variants, multi-section RoPE positions; the
decode path (one query row: keys split across blocks and key groups, then merged) with several
split counts, T not a multiple of the groups or splits, 16-byte and element-wise loads; a
caller-held mean image key (k_calibrated_mean: the threshold from the queries and the mean; decode
launches no threshold kernel and forms mu_P in the blocks whose keys overlap the image).
"""
from __future__ import annotations

import math

import pytest
import torch

from kvemu_fixtures import cmac_attention_call, cmac_inputs, cmac_nonfinite_inputs, inv_freq, kvfix_reference, unaligned

R = kvfix_reference()  # kvfix/reference.py

NAN = float("nan")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cm(emu):
    return emu.module("cmac")


def _rule(out, truth, ref_lp, which):
    assert torch.isfinite(out).all(), f"{which}: unwritten or non-finite output"
    err = (out.double() - truth).abs().max().item()
    ref_err = (ref_lp.double() - truth).abs().max().item()
    slack = (2e-6 if out.dtype == torch.float32 else 2e-3) * max(1.0, truth.abs().max().item())
    assert err <= 2 * ref_err + slack, f"{which}: {out.dtype} error {err} vs the reference's {ref_err}"


def _rope(cm, k, span, inv, gamma, positions=None, sections=None, n=None):
    B, H, T, D = k.shape
    spans = span if isinstance(span, torch.Tensor) else None
    s, e = (0, 0) if spans is not None else span
    n = n if n is not None else e - s
    out = torch.full((B, H, n, D), NAN, dtype=k.dtype)
    pos = None if positions is None else (positions[None] if positions.dim() == 2 else positions).contiguous()
    sec = None if sections is None else torch.tensor(sections, dtype=torch.int64)
    cm.rope_calibrate(k, out, spans, s, e, inv, pos, sec, 1.0 - 1.0 / gamma)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_calibrate(cm, dtype):
    B, H, T, D = 2, 2, 14, 16
    inv = inv_freq(D)
    k = torch.randn(B, H, T + 3, D).to(dtype)[:, :, 3:]
    for span, gamma, pos, sec in [((2, 9), 3.0, None, None), ((0, 14), 2.0, torch.randint(0, 30, (B, T)), None),
                                  ((5, 12), 3.0, torch.randint(0, 30, (3, B, T)), [2, 3, 3]),
                                  ((4, 10), 1.0, None, None)]:
        out = _rope(cm, k, span, inv, gamma, pos, sec)
        truth = R.rope_calibrate(k.double(), span, inv, gamma=gamma, positions=pos, mrope_section=sec)
        ref = R.rope_calibrate(k, span, inv, gamma=gamma, positions=pos, mrope_section=sec)
        _rule(out, truth, ref, f"rope {span}")
    spans = torch.tensor([[1, 7], [8, 14]])  # the second ends the sequence: anchor one past its end
    out = _rope(cm, k, spans, inv, 3.0, n=6)
    for b in range(B):
        s = int(spans[b, 0])
        want = R.rope_calibrate(k[b:b + 1].double(), (s, s + 6), inv, gamma=3.0)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [72, 264])
def test_rope_calibrate_head_dims_and_warps(cm, dtype, D):
    """One warp per token: 15 tokens (the last block's fourth warp has none); D = 72: a lane's
    second pair only for some lanes; D = 264: 132 pairs, a second round of pairs for lanes 0-3."""
    B, H, T = 1, 3, 9
    inv = inv_freq(D)
    k = torch.randn(B, H, T, D).to(dtype)
    for span, pos, sec in [((2, 7), None, None),
                           ((3, 8), torch.randint(0, 40, (3, B, T)), [D // 8, D // 8, D // 2 - D // 4])]:
        out = _rope(cm, k, span, inv, 3.0, pos, sec)
        truth = R.rope_calibrate(k.double(), span, inv, gamma=3.0, positions=pos, mrope_section=sec)
        ref = R.rope_calibrate(k, span, inv, gamma=3.0, positions=pos, mrope_section=sec)
        _rule(out, truth, ref, f"rope D={D} {span}")


def _attention(cm, q, k, v, span, **kw):
    return cmac_attention_call(cm, "cmac_attention", q, k, v, span, **kw)


def _check(cm, q, k, v, span, splits=3, **kw):
    out = _attention(cm, q, k, v, span, splits=splits, **kw)
    kd = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    truth = R.cmac_attention(q.double(), k.double(), v.double(), span, **kd)
    ref = R.cmac_attention(q, k, v, span, **kw)
    _rule(out, truth, ref, f"attention {tuple(q.shape)} {span}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 160])
def test_attention(cm, D, dtype):
    B, Hq, Hkv = 2, 4, 2
    # prefill with the image in the middle (query tiles split at 21), a chunk, decode
    for i, (Tq, T, span) in enumerate([(24, 24, (3, 21)), (5, 40, (0, 35)), (1, 45, (6, 40))]):
        q, k, v, kc = cmac_inputs(B, Hq, Hkv, Tq, T, D, span, dtype, gamma=(1.0, 2.0, 3.0)[i])
        _check(cm, q, k, v, span, k_calibrated=kc, imd=True, value_mean=("scalar", "vector")[i % 2])
        if i == 0:
            _check(cm, q, k, v, span, k_calibrated=kc)
            _check(cm, q, unaligned(k), v, span, k_calibrated=kc, imd=True)  # element-wise tile loads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 160])
def test_attention_key_mean(cm, D, dtype):
    """k_calibrated_mean, prefill / chunk (the threshold kernel with one chunk, keys unread) and
    decode (no threshold kernel: mu_P from q and the mean in the blocks overlapping the image;
    split counts with blocks before, inside and after the image, and more splits than keys),
    against the reference given the same mean; the mean of the keys' own and a different one
    (which moves the threshold); per-item spans and flags."""
    B, Hq, Hkv = 2, 4, 2
    for Tq, T, span, splits in [(24, 24, (3, 21), 1), (5, 40, (0, 35), 1), (1, 45, (6, 40), 1), (1, 45, (6, 40), 5),
                                (1, 70, (30, 50), 7), (1, 29, (3, 20), 64)]:
        q, k, v, kc = cmac_inputs(B, Hq, Hkv, Tq, T, D, span, dtype)
        own = R.cmac_key_mean(kc.float())
        _check(cm, q, k, v, span, splits=splits, k_calibrated=kc, imd=True, k_calibrated_mean=own)
        _check(cm, q, unaligned(k), v, span, splits=splits, k_calibrated=kc, imd=torch.tensor([True, False]),
               value_mean="vector", k_calibrated_mean=own + 0.5 * torch.randn_like(own))
        _check(cm, q, k, v, span, splits=splits, imd=True,
               k_calibrated_mean=R.cmac_key_mean(k[:, :, span[0]:span[1]].float()))
    B, Hq, Hkv, T, D, N = 3, 2, 1, 50, 16, 16
    pad = torch.tensor([0, 3, 9])
    spans = torch.stack([pad + 4, pad + 4 + N], 1)
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    kc = R.rope_calibrate(k, spans, inv_freq(D), gamma=2.0, num_tokens=N)
    valid = (torch.arange(T)[None] >= pad[:, None])[:, None, None, :]
    for splits in (1, 4):
        _check(cm, q, k, v, spans, splits=splits, k_calibrated=kc, mask=valid, imd=torch.tensor([True, False, True]),
               k_calibrated_mean=R.cmac_key_mean(kc))


def test_attention_padding_per_item_spans_and_flags(cm):
    B, Hq, Hkv, T, D, N = 3, 2, 1, 26, 16, 8
    pad = torch.tensor([0, 2, 5])
    valid = torch.arange(T)[None] >= pad[:, None]
    spans = torch.stack([pad + 3, pad + 3 + N], 1)
    q = torch.randn(B, Hq, T, D)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp(min=0)
    kc = R.rope_calibrate(k, spans, inv_freq(D), gamma=3.0, positions=pos, num_tokens=N)
    flags = torch.tensor([True, False, True])
    _check(cm, q, k, v, spans, k_calibrated=kc, mask=valid[:, None, None, :], imd=flags)
    additive = torch.where(valid, 0.0, -math.inf)[:, None, None, :].to(torch.bfloat16)
    _check(cm, q, k, v, spans, k_calibrated=kc, mask=additive, imd=True, value_mean="vector")
    per_head = torch.randn(1, Hq, T, T)  # finite additive mask, no causal mask
    _check(cm, q[:, :, -3:], k, v, spans, mask=per_head[:, :, -3:], causal=False, imd=True, scale=0.4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contrastive(cm, dtype):
    for rows, V in [(1, 7), (3, 300)]:
        l, lt = (3 * torch.randn(rows, V)).to(dtype), (3 * torch.randn(rows, V)).to(dtype)
        for alpha, beta in [(3.0, 0.2), (0.5, 1.0)]:
            out = torch.full((rows, V), NAN, dtype=dtype)
            cm.contrastive_logits(l, lt, out, alpha, beta)
            want = R.contrastive_logits(l.double(), lt.double(), alpha=alpha, beta=beta)
            assert torch.equal(torch.isinf(out), torch.isinf(want))
            keep = ~torch.isinf(want)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out.double()[keep], want[keep].to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [5000, 5003])
def test_contrastive_chunks(cm, dtype, V):
    """Rows of three 2048-logit chunks (the last one partial): each row's maximum lies in a later
    chunk than its first (so the beta cut depends on the chunks' maxima being combined); row 1 holds
    a nan in its last chunk, row 2 a +inf in its second (whole rows nan). V = 5000: 16-byte accesses
    (unless the view is one element in); 5003: one element per access."""
    for offset in (0, 1):  # 1: l contiguous, its base one element into its storage
        l = (3 * torch.randn(4 * V + 1)).to(dtype)[offset:offset + 4 * V].view(4, V)
        lt = (3 * torch.randn(4, V)).to(dtype)
        l[0, 4999] = 40.0
        l[3, 2100] = 40.0
        l[1, V - 2] = NAN
        l[2, 3000] = math.inf
        out = torch.full((4, V), NAN, dtype=dtype)
        width = torch.zeros(1, dtype=torch.int64)
        cm.contrastive_width(l, lt, out, width)
        vec = 128 // torch.finfo(dtype).bits
        assert int(width) == (vec if V % vec == 0 and offset == 0 else 1)
        cm.contrastive_logits(l, lt, out, 3.0, 0.2)
        want = R.contrastive_logits(l.double(), lt.double(), alpha=3.0, beta=0.2)
        assert out[1:3].isnan().all() and want[1:3].isnan().all()
        rows = [0, 3]
        assert torch.equal(torch.isinf(out[rows]), torch.isinf(want[rows]))
        assert torch.isinf(out[rows]).float().mean() > 0.9  # the cut came from the later chunk's maximum
        keep = ~torch.isinf(want[rows])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[rows].double()[keep], want[rows][keep].to(dtype).double(), rtol=tol, atol=tol)


def test_contrastive_nonfinite_rule_and_large_alpha(cm):
    """Issue 15: a row whose logits hold nan or +inf comes out all nan (softmax's rule, as the
    reference); l + alpha (l - l~) keeps a huge alpha from cancelling (l~ == l gives l)."""
    l, lt = 3 * torch.randn(4, 300), 3 * torch.randn(4, 300)
    l[0, 17] = NAN
    l[1, 299] = math.inf
    out = torch.full((4, 300), 0.0)
    cm.contrastive_logits(l, lt, out, 3.0, 0.2)
    want = R.contrastive_logits(l.double(), lt.double(), alpha=3.0, beta=0.2)
    assert out[:2].isnan().all() and want[:2].isnan().all()
    assert not out[2:].isnan().any()
    keep = ~torch.isinf(want[2:])
    torch.testing.assert_close(out[2:].double()[keep], want[2:][keep], rtol=1e-5, atol=1e-5)
    same = torch.full((1, 300), 0.0)
    cm.contrastive_logits(l[2:3], l[2:3].clone(), same, 1e30, 0.2)
    keep = ~torch.isinf(same)
    assert torch.equal(same[keep], l[2:3][keep])


def test_attention_nonfinite_rule(cm):
    """Issue 15: a nan query row (all its logits nan) comes out nan, as the reference (it came
    out 0: the row max skipped nan and the row looked empty); +inf logits give nan rows."""
    q, k, v = cmac_nonfinite_inputs(4)
    for imd in (False, True):
        out = _attention(cm, q, k, v, (3, 21), imd=imd)
        want = R.cmac_attention(q.double(), k.double(), v.double(), (3, 21), imd=imd)
        assert out[0, 0, 2].isnan().all()
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
        fin = torch.isfinite(want)
        torch.testing.assert_close(out.double()[fin], want[fin], atol=1e-5, rtol=1e-5)


def test_attention_inf_only_visible_key(cm):
    """Issue 15: a +inf logit (from an additive mask) that is its row's only visible key: softmax
    has no value, so the row is nan (the reference's rule), in and before the image, with and
    without IMD; the other rows are untouched."""
    B, Hq, Hkv, Tq, T, D = 2, 2, 1, 4, 40, 16
    q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    mask = torch.zeros(B, 1, Tq, T)
    mask[0, :, 1] = -math.inf
    mask[0, :, 1, 10] = math.inf   # an image key
    mask[1, :, 3] = -math.inf
    mask[1, :, 3, 1] = math.inf    # a key before the image
    for imd in (False, True):
        out = _attention(cm, q, k, v, (3, 21), mask=mask, imd=imd)
        want = R.cmac_attention(q.double(), k.double(), v.double(), (3, 21), mask=mask.double(), imd=imd)
        assert want[0, :, 1].isnan().all() and want[1, :, 3].isnan().all()
        assert torch.equal(out.isnan(), want.isnan())
        fin = torch.isfinite(want)
        torch.testing.assert_close(out.double()[fin], want[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 160])
def test_attention_decode_splits(cm, D, dtype):
    """Decode (one query row): the keys split across blocks (1, several, more splits than keys per
    split allow: empty splits) and across the 8 key groups of a block, T not a multiple of either,
    merged; calibrated image keys, IMD (both mu_V variants), GQA, strided v, 16-byte and
    element-wise loads."""
    B, Hq, Hkv = 2, 4, 2
    for T, span, splits in [(45, (6, 40), 1), (45, (6, 40), 3), (37, (0, 29), 7), (29, (3, 20), 64), (9, (2, 7), 5)]:
        q, k, v, kc = cmac_inputs(B, Hq, Hkv, 1, T, D, span, dtype)
        for i, vm in enumerate(("scalar", "vector")):
            kk = k if i == 0 else unaligned(k)
            _check(cm, q, kk, v, span, splits=splits, k_calibrated=kc, imd=True, value_mean=vm)
        _check(cm, q, k, v, span, splits=splits, k_calibrated=kc)
        _check(cm, q, k, v, span, splits=splits, imd=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_decode_masks_spans_and_flags(cm, dtype):
    """Decode with bool / additive masks (float32, float16, bfloat16; per item, per head), per-item
    device spans and IMD flags, an image ending the sequence (the query inside it: no IMD, no
    calibration) and a non-causal call."""
    B, Hq, Hkv, T, D, N = 3, 4, 1, 50, 32, 16
    pad = torch.tensor([0, 3, 9])
    valid = torch.arange(T)[None] >= pad[:, None]
    spans = torch.stack([pad + 4, pad + 4 + N], 1)
    q = torch.randn(B, Hq, 1, D).to(dtype)
    k, v = torch.randn(B, Hkv, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp(min=0)
    kc = R.rope_calibrate(k.float(), spans, inv_freq(D), gamma=2.0, positions=pos, num_tokens=N).to(dtype)
    flags = torch.tensor([True, False, True])
    for splits in (1, 4):
        _check(cm, q, k, v, spans, splits=splits, k_calibrated=kc, mask=valid[:, None, None, :], imd=flags)
        for mdt in (torch.float32, torch.float16, torch.bfloat16):
            additive = torch.where(valid, 0.0, -math.inf)[:, None, None, :].to(mdt)
            _check(cm, q, k, v, spans, splits=splits, k_calibrated=kc, mask=additive, imd=True, value_mean="vector")
        per_head = torch.randn(1, Hq, 1, T).to(dtype)  # finite additive mask, broadcast over items
        _check(cm, q, k, v, spans, splits=splits, mask=per_head, causal=False, imd=True, scale=0.4)
        _check(cm, q, k, v, (30, T), splits=splits, k_calibrated=kc[:, :, :T - 30].contiguous(), imd=True)


def test_attention_decode_nonfinite_rule(cm):
    """Decode, the non-finite rule across splits and key groups: a nan query row is nan, a +inf
    logit (a key of +inf, or +inf in an additive mask) makes its row nan, whichever split holds it;
    an inf value reaches the dims of the rows that see it; a fully masked row is 0."""
    B, Hq, Hkv, T, D = 3, 2, 1, 40, 16
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    q[0, 0] = NAN
    k[1, 0, 30] = 0.0
    k[1, 0, 30, 0] = math.inf
    v[0, 0, 1, 3] = math.inf  # before the image
    mask = torch.zeros(B, 1, 1, T)
    mask[2, :, :, 12] = math.inf
    for splits in (1, 3, 8):
        for imd in (False, True):
            out = _attention(cm, q, k, v, (3, 21), imd=imd, mask=mask, splits=splits)
            want = R.cmac_attention(q.double(), k.double(), v.double(), (3, 21), imd=imd, mask=mask.double())
            assert out[0, 0].isnan().all() and out[2].isnan().all()
            assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
            fin = torch.isfinite(want)
            torch.testing.assert_close(out.double()[fin], want[fin], atol=1e-5, rtol=1e-5)
    none = torch.zeros(1, 1, 1, T, dtype=torch.bool)
    out = _attention(cm, q[1:2], k[1:2], v[1:2], (3, 21), mask=none, imd=True, splits=4)
    assert torch.equal(out, torch.zeros_like(out))
