"""The tensor-core CMAC prefill kernel (csrc/kernels/cmac_prefill_tc.cuh) on the kvemu SIMT
emulator, against `kvfix.reference` (float64 ground truth), and the dispatch that csrc/cuda/cmac.cu
runs (module "cmac_tc": the tensor-core kernel for fp16 / bf16 prefill with D <= 128, the SIMT
kernels of cmac.cuh otherwise).

Tolerance, the flash-attention rule: the kernel's error against float64 is at most twice the error
of the reference run in the input dtype, plus the rounding of P to the input type before the P V
product (flash attention does the same): every p in [0, 1] is off by at most u / 2 relatively (u the
unit roundoff: 2^-8 bf16, 2^-11 fp16), so the output by at most u / 2 * max |v| (and the IMD term
is exact in fp32); the slack is u * max |v| (twice that bound, for the fp32 sums) plus 1e-5.
Outputs are NaN-poisoned before every launch, so an unwritten element fails. Every CUDA thread is a
fiber: shapes are small but cross the tiles (64 query rows, 32 keys): T and Tq not multiples of
them, query tiles split at the image's end, key tiles cut at the span's edges, spans on tile edges.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvemu_fixtures import (EmuError, cmac_attention_call, cmac_inputs, cmac_nonfinite_inputs, inv_freq, kvfix_reference,
                            unaligned)

R = kvfix_reference()  # kvfix/reference.py

HALF = [torch.float16, torch.bfloat16]
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(scope="module")
def tc(emu):
    return emu.module("cmac_tc")


@pytest.fixture(scope="module")
def simt(emu):
    return emu.module("cmac")


def _check(tc, q, k, v, span, **kw):
    """The tensor-core kernel (entry cmac_attention_tc) against the reference; the dispatch gives
    the same bits."""
    out = cmac_attention_call(tc, "cmac_attention_tc", q, k, v, span, **kw)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    kd = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    truth = R.cmac_attention(q.double(), k.double(), v.double(), span, **kd)
    ref = R.cmac_attention(q, k, v, span, **kw)
    err = (out.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    slack = UNIT[q.dtype] * v.double().abs().max().item() + 1e-5
    assert err <= 2 * ref_err + slack, f"{tuple(q.shape)} {span}: {q.dtype} error {err} vs the reference's {ref_err}"
    assert torch.equal(cmac_attention_call(tc, "cmac_attention", q, k, v, span, **kw), out), \
        "the dispatch did not take the tc kernel"
    return out


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("D", [16, 72, 128])
def test_tc_prefill(tc, D, dtype):
    """Prefill and chunks: T and Tq not multiples of the tiles, the image in the middle (query tiles
    split at its end), a chunk after the image (Tq < T), a chunk whose rows start inside the image,
    calibrated keys, IMD (both mu_V variants) or not, GQA, strided v; D = 72 is padded to 80."""
    B, Hq, Hkv = 1, 4, 2
    for i, (Tq, T, span) in enumerate([(70, 70, (5, 50)), (37, 100, (3, 60)), (40, 90, (20, 70))]):
        q, k, v, kc = cmac_inputs(B, Hq, Hkv, Tq, T, D, span, dtype)
        _check(tc, q, k, v, span, k_calibrated=kc, imd=True, value_mean=("scalar", "vector")[i % 2])
        if i != 1:
            _check(tc, q, k, v, span, k_calibrated=kc)
            _check(tc, q, k, v, span, imd=True, value_mean="vector")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tc_prefill_caller_mean_key(tc, dtype):
    """With the caller's mean image key (k_calibrated_mean, kvfix.cmac_key_mean) the threshold
    launch reads no image key (one chunk): the tc kernel matches the reference given the same mean
    (moved off the keys' own mean), with calibrated keys and without, IMD on both items or one."""
    B, Hq, Hkv, Tq, T, D, span = 2, 4, 2, 45, 80, 32, (6, 50)
    q = torch.randn(B, Hq, Tq, D).to(dtype)
    k = torch.randn(B, Hkv, T, D).to(dtype)
    v = torch.randn(B, Hkv, T, D).to(dtype)
    kc = R.rope_calibrate(k.float(), span, inv_freq(D), gamma=3.0).to(dtype)
    for cal, imd in ((kc, True), (None, torch.tensor([False, True]))):
        seg = k[:, :, span[0]:span[1]] if cal is None else cal  # the keys the image segment uses
        # moved off the keys' mean, so a kernel ignoring it (summing the keys) would miss the threshold
        mean = (R.cmac_key_mean(seg) + 0.5 * torch.randn(B, Hkv, D)).contiguous()
        _check(tc, q, k, v, span, k_calibrated=cal, imd=imd, k_calibrated_mean=mean)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tc_lazy_rescale(tc, dtype):
    """Keys whose norm grows along the sequence, so a row's max keeps moving by more than the lazy
    threshold (8) from tile to tile and the accumulators are rescaled many times; a shrinking norm
    (the max set by the first tile, never moved) and a row whose first keys are masked (its max set
    by a later tile) alongside."""
    B, Hq, Hkv, T, D = 2, 2, 1, 100, 16
    grow = (0.2 + torch.arange(T) / 10.0)[:, None]
    q = torch.randn(B, Hq, T, D).to(dtype)
    k = torch.randn(B, Hkv, T, D) * torch.stack([grow, grow.flip(0)])[:, None]
    k, v = k.to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    kc = R.rope_calibrate(k.float(), (10, 70), inv_freq(D), gamma=3.0).to(dtype)
    mask = (torch.arange(T) >= 40)[None, None, None, :] | (torch.arange(T) < 3)[None, None, :, None]
    for imd in (False, True):
        _check(tc, q, k, v, (10, 70), k_calibrated=kc, imd=imd, scale=1.0)
        _check(tc, q, k, v, (10, 70), k_calibrated=kc, imd=imd, mask=mask, scale=1.0)

@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tc_masks_spans_and_flags(tc, dtype):
    """Per-item device spans on the tile edges (the image ending at key 32 and query 64, or one
    past), per-item IMD flags, bool / additive (float32, bfloat16, the input type) masks of padding,
    a finite additive per-head mask without the causal mask, a custom scale."""
    B, Hq, Hkv, T, D = 3, 2, 1, 80, 32
    pad = torch.tensor([0, 1, 7])
    valid = torch.arange(T)[None] >= pad[:, None]
    spans = torch.tensor([[0, 32], [1, 65], [7, 64]])
    q = torch.randn(B, Hq, T, D).to(dtype)
    k, v = torch.randn(B, Hkv, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp(min=0)
    kc = R.rope_calibrate(k.float(), spans, inv_freq(D), gamma=3.0, positions=pos, num_tokens=64).to(dtype)
    flags = torch.tensor([True, False, True])
    _check(tc, q, k, v, spans, k_calibrated=kc, mask=valid[:, None, None, :], imd=flags)
    for mdt in (torch.float32, torch.bfloat16, dtype):
        additive = torch.where(valid, 0.0, -math.inf)[:, None, None, :].to(mdt)
        _check(tc, q, k, v, spans, k_calibrated=kc, mask=additive, imd=True, value_mean="vector")
    per_head = torch.randn(1, Hq, T, T).to(dtype)
    _check(tc, q[:, :, -20:], k, v, spans, mask=per_head[:, :, -20:], causal=False, imd=True, scale=0.4)
    _check(tc, q, k, v, spans, k_calibrated=kc, mask=None, imd=flags, value_mean="vector")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tc_strided_andunaligned(tc, dtype):
    """Strided q, k, v (head-major and token-major layouts), rows off a 16-byte boundary (element-wise
    staging) and D = 40 (not a multiple of 8: no 16-byte copies, padded to 48)."""
    B, Hq, Hkv, T = 2, 2, 2, 45
    for D in (64, 40):
        q = torch.randn(B, T, Hq, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, T, D + 8).to(dtype)[..., 8:]
        v = torch.randn(B, T, Hkv, D).to(dtype).transpose(1, 2)
        kc = R.rope_calibrate(k.float(), (4, 30), inv_freq(D), gamma=2.0).to(dtype)
        _check(tc, q, k, v, (4, 30), k_calibrated=kc, imd=True)
        _check(tc, unaligned(q.contiguous()), unaligned(k.contiguous()), v, (4, 30), k_calibrated=unaligned(kc),
               imd=True, value_mean="vector")


def test_tc_nonfinite_rule(tc):
    """The non-finite rule of the SIMT kernel and the reference: a nan query row is nan, a +inf
    logit (a key of +inf, or +inf in an additive mask as the row's only visible key) makes its row
    nan, an inf value reaches the dims of the rows that see it, a row without any key is 0."""
    B, Tq, T = 2, 20, 40
    q, k, v = cmac_nonfinite_inputs(Tq)
    mask = torch.zeros(B, 1, Tq, T)
    mask[0, :, 5] = -math.inf
    mask[0, :, 5, 10] = math.inf   # an image key, the row's only one
    mask[1, :, 3] = -math.inf      # no key at all
    for dtype in HALF:
        qd, kd, vd, md = q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype)
        for imd in (False, True):
            out = cmac_attention_call(tc, "cmac_attention_tc", qd, kd, vd, (3, 21), imd=imd, mask=md)
            want = R.cmac_attention(qd.double(), kd.double(), vd.double(), (3, 21), mask=md.double(), imd=imd)
            assert out[0, 0, 2].isnan().all() and out[0, :, 5].isnan().all()
            assert torch.equal(out[1, :, 3], torch.zeros_like(out[1, :, 3]))
            assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
            fin = torch.isfinite(want)
            torch.testing.assert_close(out.double()[fin], want[fin], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", ["float32", "D=160", "decode"])
def test_fallbacks(tc, simt, case):
    """Where the tensor-core kernel does not apply (fp32, D > 128, a single query row) it refuses
    (cudaErrorNotSupported) and the dispatch runs the SIMT kernels: the same bits as the "cmac"
    module."""
    dtype, D, Tq = {"float32": (torch.float32, 32, 30), "D=160": (torch.bfloat16, 160, 30),
                    "decode": (torch.float16, 32, 1)}[case]
    B, Hq, Hkv, T = 2, 2, 1, 40
    q = torch.randn(B, Hq, Tq, D).to(dtype)
    k, v = torch.randn(B, Hkv, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    kc = R.rope_calibrate(k.float(), (3, 21), inv_freq(D), gamma=3.0).to(dtype)
    with pytest.raises(EmuError):
        cmac_attention_call(tc, "cmac_attention_tc", q, k, v, (3, 21), k_calibrated=kc, imd=True)
    out = cmac_attention_call(tc, "cmac_attention", q, k, v, (3, 21), k_calibrated=kc, imd=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out, cmac_attention_call(simt, "cmac_attention", q, k, v, (3, 21), k_calibrated=kc, imd=True))
