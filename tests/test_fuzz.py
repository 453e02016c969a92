"""Property-based fuzzing (hypothesis) of every public op against kvfix/reference.py (issue 15).

One property per op: small random shapes (B, heads, GQA groups, lengths, head dims off the
kernels' fast shapes too), dtypes, strides (slices of larger buffers, [B, T, H, D] storage,
misaligned starts) and parameters; the op must agree with the float64 reference.

Tolerance (the flash-attention rule of the kernel tests, from the arithmetic): the kernel's error
against the float64 reference is at most twice the error of the same reference run in the
kernel's input dtype, plus a floor:
  - 8 ulp of float32 times the output's magnitude: the kernels compute in float32 with their own
    summation order and a polynomial exp accurate to a few ulp (csrc/cpu/exp_nonpos.h), while the
    reference in float32 may, on one sample, happen to round almost exactly;
  - plus 1 ulp of a low-precision output dtype times the magnitude: the kernels round their
    float32 result to float16 / bfloat16 once (half an ulp), which the reference in that dtype can
    also happen to hit exactly.
Discrete decisions (KVSmooth's rank, SCR's top_k sources, the contrastive plausible set) are kept
away from rounding ties by construction, so they must match exactly.

Bounded for CI: a fixed number of examples per property, no deadline, derandomized (the same
examples on every run and machine), no example database. CPU only; the whole file runs in
well under a minute.
"""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfix
from kvfix import reference as R

NAN = float("nan")
EPS32 = torch.finfo(torch.float32).eps


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPE = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUT = st.sampled_from(["contiguous", "slice", "bthd", "misaligned"])
SEED = st.integers(0, 2 ** 31 - 1)


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x ([B, H, T, D] or [B, N, C]) with the same values in another layout (last dim contiguous)."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "slice":  # a window of a longer, wider buffer (a cache slice)
        big = torch.zeros(*x.shape[:-2], x.shape[-2] + 3, x.shape[-1] + 5, dtype=x.dtype)
        big[..., 2:2 + x.shape[-2], :x.shape[-1]] = x
        return big[..., 2:2 + x.shape[-2], :x.shape[-1]]
    if kind == "bthd":  # [B, T, H, D] storage
        return x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 4 else x.contiguous()
    if kind == "misaligned":  # one element into an allocation: no 16-byte aligned rows
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype)
        out = flat[1:].view(x.shape)
        out.copy_(x)
        return out
    raise ValueError(kind)


def _floor(dtype, truth: torch.Tensor, fp32_mag: float = 0.0) -> float:
    """8 float32 roundings of the largest quantity the float32 arithmetic handles (the output's
    magnitude, or fp32_mag where intermediates are larger: e.g. the logits behind an entropy), plus
    one rounding of dtype of the output's magnitude."""
    mag = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    low = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    return 8 * EPS32 * max(mag, fp32_mag) + low * mag


def _rule(got: torch.Tensor, truth: torch.Tensor, ref_lp: torch.Tensor, dtype, what: str, fp32_mag: float = 0.0):
    """got (kernel) vs truth (float64 reference) <= 2x ref_lp's error (reference in dtype) + floor."""
    assert got.shape == truth.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    if got.numel() == 0:
        return
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref_lp.double() - truth).abs().max().item()
    floor = _floor(dtype, truth, fp32_mag)
    assert err <= 2 * ref_err + floor, f"{what}: {dtype} error {err} vs the reference's {ref_err}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _key_mask(kind, B, T, g):
    if kind is None:
        return None
    keep = torch.rand(B, 1, 1, T, generator=g) > 0.3
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(B, 1, 1, T, generator=g), torch.tensor(float("-inf")))


# ---------------------------------------------------------------------------------------------
# DSCR

def _dscr_inputs(B, H, gh, gw, D, dtype, layout, seed, values):
    g = _gen(seed)
    N = gh * gw
    k = _layout(torch.randn(B, H, N, D, generator=g).to(dtype), layout)
    v = _layout(torch.randn(B, H, N, D, generator=g).to(dtype), layout) if values else None
    depth = torch.rand(B if seed % 2 else 1, N, generator=g) * 255
    return k, v, depth.squeeze(0) if depth.shape[0] == 1 else depth


PARAMS = dict(sigma_d=st.floats(0.3, 20.0), sigma_s=st.floats(0.3, 3.0), alpha=st.floats(0.0, 2.0),
              beta=st.floats(0.0, 2.0))


@_settings(40)
@given(B=st.integers(1, 2), H=st.integers(1, 3), gh=st.integers(1, 6), gw=st.integers(1, 6),
       D=st.sampled_from([1, 8, 24, 64, 72]), dtype=DTYPE, layout=LAYOUT, values=st.booleans(),
       grid=st.booleans(), seed=SEED, **PARAMS)
def test_dscr_refine(B, H, gh, gw, D, dtype, layout, values, grid, seed, sigma_d, sigma_s, alpha, beta):
    k, v, depth = _dscr_inputs(B, H, gh, gw, D, dtype, layout, seed, values)
    coords = kvfix.patch_coords(gh, gw)
    kw = dict(sigma_d=sigma_d, sigma_s=sigma_s, alpha=alpha, beta=beta)
    kh, vh = kvfix.dscr_refine(k, v, depth, (gh, gw) if grid else coords, method="dense", **kw)
    f = lambda x: None if x is None else x.double()  # noqa: E731
    tk, tv = R.dscr_refine(k.double(), f(v), depth.double(), coords.double(), **kw)
    lk, lv = R.dscr_refine(k, v, depth.to(dtype), coords.to(dtype), **kw)
    _rule(kh, tk, lk, dtype, "k_hat")
    assert (vh is None) == (v is None)
    if v is not None:
        _rule(vh, tv, lv, dtype, "v_hat")


@_settings(30)
@given(gh=st.integers(1, 18), gw=st.integers(2, 18), kind=st.sampled_from(["uniform", "levels", "clusters"]),
       span=st.sampled_from([0.5, 30.0, 255.0]), tol=st.sampled_from([2.0 ** -27, 2.0 ** -11]),
       sigma_d=st.floats(0.3, 20.0), alpha=st.floats(0.0, 2.0), beta=st.floats(0.1, 2.0), seed=SEED)
def test_dscr_banded_plan(gh, gw, kind, span, tol, sigma_d, alpha, beta, seed):
    """The banded variant's plan (the C++ depth structure, csrc/kernels/dscr_plan.h) on random
    depths and parameters, built in float64: its weights are the reference's within the plan's
    bound per column (normalised, as k_hat uses them), and its packed 1 / c~_j are the inverse
    column sums of those weights (diagonal 2 excluded)."""
    from kvfix import dscr_structured as S
    g = _gen(seed)
    N = gh * gw
    u = torch.rand(N, generator=g, dtype=torch.float64)
    depth = {"uniform": span * u, "levels": torch.round(span * u / 4.0) * 4.0,  # a few repeated levels
             "clusters": span * torch.randint(0, 3, (N,), generator=g).double() + 2.0 * u}[kind]
    cd, cs = S._coefs(sigma_d, 0.6, alpha, beta)
    plan_st, info = S._banded(gh, gw, depth[None], cd, cs, tol, dtype=torch.float64)
    if plan_st is None or not info["bound"] <= tol:
        return  # the plan refuses banded here (a wide band or an unmet bound: another algorithm runs)
    wt = S.banded_weights(plan_st) - 2.0 * torch.eye(N, dtype=torch.float64)
    c = wt.sum(0)
    torch.testing.assert_close(plan_st.cinv[0], torch.where(c > 0, 1.0 / c, torch.zeros_like(c)), rtol=1e-11, atol=0)
    w = wt / c
    ref = R.dscr_weights(depth, kvfix.patch_coords(gh, gw, dtype=torch.float64), sigma_d=sigma_d, sigma_s=0.6,
                         alpha=alpha, beta=beta)[0]
    assert (w - ref).abs().sum(0).max().item() <= info["bound"] + N * 2.0 ** -50, (info["mode"], info["bound"])


@_settings(25)
@given(L=st.integers(1, 3), B=st.integers(1, 2), H=st.integers(1, 2), gh=st.integers(1, 5), gw=st.integers(1, 5),
       D=st.sampled_from([8, 64, 40]), dtype=DTYPE, values=st.booleans(), seed=SEED, **PARAMS)
def test_dscr_refine_cache_(L, B, H, gh, gw, D, dtype, values, seed, sigma_d, sigma_s, alpha, beta):
    """Layers of one static cache [L, B, H, T, 2D] (k and v interleaved in the last dim), refined
    on the image span [s, s + N): every layer as the reference, nothing outside the span written."""
    g = _gen(seed)
    N, s = gh * gw, seed % 3
    cache = torch.randn(L, B, H, N + 4, 2 * D, generator=g).to(dtype)
    before = cache.clone()
    keys = [cache[i, :, :, s:s + N, :D] for i in range(L)]
    vals = [cache[i, :, :, s:s + N, D:] for i in range(L)] if values else None
    depth = torch.rand(N, generator=g) * 255
    coords = kvfix.patch_coords(gh, gw)
    kw = dict(sigma_d=sigma_d, sigma_s=sigma_s, alpha=alpha, beta=beta)
    kvfix.dscr_refine_cache_(keys, vals, depth, (gh, gw), method="dense", **kw)
    for i in range(L):
        for x, part in ((keys[i], before[i, :, :, s:s + N, :D]), (vals[i] if values else None,
                                                                  before[i, :, :, s:s + N, D:])):
            if x is None:
                assert torch.equal(cache[i, :, :, s:s + N, D:], part)
                continue
            truth = R.dscr_refine(part.double(), None, depth.double(), coords.double(), **kw)[0]
            lp = R.dscr_refine(part, None, depth.to(dtype), coords.to(dtype), **kw)[0]
            _rule(x, truth, lp, dtype, f"layer {i}")
    outside = torch.ones(N + 4, dtype=torch.bool)
    outside[s:s + N] = False
    assert torch.equal(cache[:, :, :, outside], before[:, :, :, outside])


# ---------------------------------------------------------------------------------------------
# KVSmooth

@_settings(40)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 8]), T=st.integers(1, 300),
       D=st.sampled_from([1, 16, 40, 64, 128]), dtype=DTYPE, layout=LAYOUT,
       mask=st.sampled_from([None, "bool", "additive"]), scale=st.one_of(st.none(), st.floats(0.01, 1.0)),
       seed=SEED)
def test_row_entropy(B, Hkv, group, T, D, dtype, layout, mask, scale, seed):
    g = _gen(seed)
    q = torch.randn(B, Hkv * group, 1, D, generator=g).to(dtype)
    k = _layout((2 * torch.randn(B, Hkv, T, D, generator=g)).to(dtype), layout)
    m = _key_mask(mask, B, T, g)
    got = kvfix.row_entropy(q, k, scale=scale, mask=m)
    md = None if m is None or m.dtype == torch.bool else m.double()
    truth = R.row_entropy(q.double(), k.double(), scale=scale, mask=m if md is None else md)
    lp = R.row_entropy(q, k, scale=scale, mask=m if md is None else m.to(dtype))
    assert got.dtype == torch.float32
    # The kernel's online softmax rounds the logits and shifts by their maximum (H = log l - u / l):
    # its float32 error scales with the logits, not with H (seed 1, T = 32, D = 128, scale 0.5:
    # logits ~20, H = 0.57, error 1.3e-6 against the float32 reference's lucky 1.2e-7).
    x = (D ** -0.5 if scale is None else scale) * torch.einsum(
        "bhd,bhtd->bht", q.double()[:, :, 0], k.double().repeat_interleave(group, dim=1))
    bias = torch.zeros(1) if md is None or not md.isfinite().any() else md[md.isfinite()]
    xmax = (x.abs().max().item() if x.numel() else 0.0) + bias.abs().max().item()
    _rule(got, truth, lp, torch.float32 if dtype == torch.float32 else dtype, "entropy", fp32_mag=xmax)


@_settings(40)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), T=st.integers(1, 200),
       D=st.sampled_from([8, 64, 128, 48]), dtype=DTYPE, layout=LAYOUT, mask=st.sampled_from([None, "bool"]),
       M=st.integers(1, 16), lam_ref=st.floats(0.0, 1.0), band=st.floats(0.0, 0.5), seed=SEED)
def test_kvsmooth_step_(B, Hkv, group, T, D, dtype, layout, mask, M, lam_ref, band, seed):
    """lam must equal the reference's exactly: the queue's entries stay >= 0.05 away from z (the
    kernels' z is within float32 rounding of the float64 one); position T - 1 is the float32 EMA
    rounded once (one ulp of the dtype); everything else bit for bit."""
    g = _gen(seed)
    q = torch.randn(B, Hkv * group, 1, D, generator=g).to(dtype)
    k = _layout(torch.randn(B, Hkv, T, D, generator=g).to(dtype), layout)
    v = _layout(torch.randn(B, Hkv, T, D, generator=g).to(dtype), layout)
    m = _key_mask(mask, B, T, g)
    z = R.row_entropy(q.double(), k.double(), mask=m).mean(1)
    off = torch.rand(B, M, generator=g) * 2 - 1
    off = torch.where(off.abs() < 0.05, torch.full_like(off, 0.3), off)
    queue = (z[:, None] + off).float()
    fill = torch.randint(0, M + 1, (B,), generator=g)
    for b in range(B):
        queue[b, :M - int(fill[b])] = NAN
    lam_want, _ = R.kvsmooth_queue(queue, z, lam_ref=lam_ref, band=band)
    if T >= 2:
        lam_want = torch.where(R.key_mask(m, B, T, torch.float32)[1][:, T - 2], lam_want, torch.zeros_like(lam_want))
    else:
        lam_want = torch.zeros_like(lam_want)
    kk, vv, qq = k.clone(), v.clone(), queue.clone()
    lam = kvfix.kvsmooth_step_(q, kk, vv, qq, mask=m, lam_ref=lam_ref, band=band)
    torch.testing.assert_close(lam, lam_want, rtol=0, atol=0)
    for got, x in ((kk, k), (vv, v)):
        assert torch.equal(got[:, :, :-1], x[:, :, :-1])
        want = R.kvsmooth_ema(x, lam_want)[:, :, -1].float()
        ulp = torch.finfo(dtype).eps * max(1.0, x.abs().max().item())
        torch.testing.assert_close(got[:, :, -1].float(), want, rtol=0, atol=ulp)
    torch.testing.assert_close(qq[:, :-1], queue[:, 1:], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(qq[:, -1].double(), z, rtol=0, atol=1e-5 * max(1.0, z.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# SCR

@_settings(40)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), Tq=st.integers(1, 40),
       extra=st.integers(0, 60), span=st.tuples(st.floats(0, 1), st.floats(0, 1)),
       D=st.sampled_from([1, 16, 64, 96]), dtype=DTYPE, layout=LAYOUT,
       mask=st.sampled_from([None, "bool", "additive"]), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.05, 1.0)), seed=SEED)
def test_scr_scores(B, Hkv, group, Tq, extra, span, D, dtype, layout, mask, causal, scale, seed):
    g = _gen(seed)
    T = Tq + extra
    s, e = sorted(int(round(f * T)) for f in span)
    q = _layout(torch.randn(B, Hkv * group, Tq, D, generator=g).to(dtype), layout)
    k = _layout(torch.randn(B, Hkv, T, D, generator=g).to(dtype), layout)
    m = None
    if mask is not None:
        keep = torch.rand(B, 1, Tq, T, generator=g) > 0.3
        m = keep if mask == "bool" else torch.where(keep, torch.randn(B, 1, Tq, T, generator=g),
                                                    torch.tensor(float("-inf")))
    got = kvfix.scr_scores(q, k, (s, e), scale=scale, mask=m, causal=causal)
    md = None if m is None else (m if m.dtype == torch.bool else m.double())
    truth = R.scr_scores(q.double(), k.double(), (s, e), scale=scale, mask=md, causal=causal)
    lp = R.scr_scores(q, k, (s, e), scale=scale, mask=None if m is None else (m if m.dtype == torch.bool
                                                                            else m.to(dtype)), causal=causal)
    assert got.dtype == torch.float32
    # The scores sum up to Tq probabilities: the float32 floor scales with them (magnitude <= Tq).
    _rule(got, truth, lp, torch.float32 if dtype == torch.float32 else dtype, "scores")


def _scr_case(B, gh, gw, C, dtype, seed):
    g = _gen(seed)
    N = gh * gw
    hidden = torch.randn(B, N, C, generator=g).to(dtype)
    scores = torch.randperm(B * N, generator=g).float().view(B, N) / (B * N)  # distinct: no ties
    return hidden, scores


@_settings(40)
@given(B=st.integers(1, 2), gh=st.integers(1, 7), gw=st.integers(1, 7), C=st.sampled_from([1, 4, 33]),
       dtype=DTYPE, layout=st.sampled_from(["contiguous", "slice", "misaligned"]), top_k=st.integers(0, 12),
       lam=st.floats(0.5, 3.0), exclude_border=st.booleans(), seed=SEED)
def test_scr_redistribute(B, gh, gw, C, dtype, layout, top_k, lam, exclude_border, seed):
    hidden, scores = _scr_case(B, gh, gw, C, dtype, seed)
    h = _layout(hidden, layout)
    kw = dict(top_k=top_k, lam=lam, exclude_border=exclude_border)
    got = kvfix.scr_redistribute(h, scores, (gh, gw), **kw)
    truth = R.scr_redistribute(hidden.double(), scores.double(), (gh, gw), **kw)
    lp = R.scr_redistribute(hidden, scores, (gh, gw), **kw)
    _rule(got, truth, lp, dtype, "out-of-place")
    assert torch.equal(h, hidden)


@_settings(30)
@given(B=st.integers(1, 2), gh=st.integers(1, 6), gw=st.integers(1, 6), C=st.sampled_from([1, 4, 33]),
       dtype=DTYPE, top_k=st.integers(0, 12), lam=st.floats(0.5, 3.0), exclude_border=st.booleans(),
       s=st.integers(0, 3), seed=SEED)
def test_scr_redistribute_(B, gh, gw, C, dtype, top_k, lam, exclude_border, s, seed):
    """In place on the image span of a [B, T, C] residual stream: equal to the out-of-place op (bit
    for bit: the same float32 arithmetic, rounded once), nothing outside the span written."""
    hidden, scores = _scr_case(B, gh, gw, C, dtype, seed)
    N = gh * gw
    stream = torch.randn(B, N + 5, C, generator=_gen(seed + 1)).to(dtype)
    stream[:, s:s + N] = hidden
    before = stream.clone()
    kw = dict(top_k=top_k, lam=lam, exclude_border=exclude_border)
    out = kvfix.scr_redistribute_(stream[:, s:s + N], scores, (gh, gw), **kw)
    assert out.data_ptr() == stream[:, s:s + N].data_ptr()
    assert torch.equal(stream[:, s:s + N], kvfix.scr_redistribute(hidden, scores, (gh, gw), **kw))
    outside = torch.ones(N + 5, dtype=torch.bool)
    outside[s:s + N] = False
    assert torch.equal(stream[:, outside], before[:, outside])


# ---------------------------------------------------------------------------------------------
# CMAC

def _inv_freq(D):
    return 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


@_settings(40)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 80), span=st.tuples(st.floats(0, 1), st.floats(0, 1)),
       D=st.sampled_from([2, 16, 64, 128, 40]), dtype=DTYPE, layout=LAYOUT, gamma=st.floats(0.5, 8.0),
       pos=st.sampled_from(["index", "1d", "mrope"]), per_item=st.booleans(), seed=SEED)
def test_rope_calibrate(B, H, T, span, D, dtype, layout, gamma, pos, per_item, seed):
    g = _gen(seed)
    s, e = sorted(int(round(f * T)) for f in span)
    k = _layout(torch.randn(B, H, T, D, generator=g).to(dtype), layout)
    inv = _inv_freq(D)
    half = D // 2
    sections, positions = None, None
    if pos == "mrope" and half >= 3:
        a = int(torch.randint(0, half + 1, (1,), generator=g))
        b = int(torch.randint(0, half - a + 1, (1,), generator=g))
        sections = [a, b, half - a - b]
        positions = torch.randint(0, 3 * T + 1, (3, B, T), generator=g)
    elif pos != "index":
        positions = torch.randint(0, 3 * T + 1, (B, T), generator=g)
    kw = dict(gamma=gamma, positions=positions, mrope_section=sections)
    if per_item and B > 1:  # item b's span shifted by b (left padding), one length
        n = e - s
        starts = [min(s + b, T - n) for b in range(B)]
        spans = torch.tensor([[a, a + n] for a in starts])
        got = kvfix.rope_calibrate(k, spans, inv, num_tokens=n, **kw)
        for b in range(B):
            pb = None if positions is None else positions[..., b:b + 1, :]
            kb = dict(kw, positions=pb)
            truth = R.rope_calibrate(k[b:b + 1].double(), (starts[b], starts[b] + n), inv, **kb)
            lp = R.rope_calibrate(k[b:b + 1], (starts[b], starts[b] + n), inv, **kb)
            _rule(got[b:b + 1], truth, lp, dtype, f"item {b}")
        return
    got = kvfix.rope_calibrate(k, (s, e), inv, **kw)
    truth = R.rope_calibrate(k.double(), (s, e), inv, **kw)
    lp = R.rope_calibrate(k, (s, e), inv, **kw)
    _rule(got, truth, lp, dtype, "calibrated keys")


@_settings(40)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), T=st.integers(1, 70),
       tq=st.floats(0, 1), span=st.tuples(st.floats(0, 1), st.floats(0, 1)), D=st.sampled_from([8, 32, 64, 80]),
       dtype=DTYPE, layout=LAYOUT, calibrated=st.booleans(), imd=st.sampled_from([False, True, "items"]),
       value_mean=st.sampled_from(["scalar", "vector"]), causal=st.booleans(),
       mask=st.sampled_from([None, "bool", "additive"]), scale=st.one_of(st.none(), st.floats(0.05, 1.0)),
       seed=SEED)
def test_cmac_attention(B, Hkv, group, T, tq, span, D, dtype, layout, calibrated, imd, value_mean, causal, mask,
                        scale, seed):
    g = _gen(seed)
    Tq = max(1, int(round(tq * T)))
    s, e = sorted(int(round(f * T)) for f in span)
    Hq = Hkv * group
    q = _layout(torch.randn(B, Hq, Tq, D, generator=g).to(dtype), layout)
    k = _layout(torch.randn(B, Hkv, T, D, generator=g).to(dtype), layout)
    v = _layout(torch.randn(B, Hkv, T, D, generator=g).to(dtype), layout)
    kc = R.rope_calibrate(k, (s, e), _inv_freq(D), gamma=3.0) if calibrated else None
    m = None
    if mask is not None:
        keep = torch.rand(B, 1, Tq, T, generator=g) > 0.2
        m = keep if mask == "bool" else torch.where(keep, torch.randn(B, 1, Tq, T, generator=g),
                                                    torch.tensor(float("-inf")))
    flags = torch.rand(B, generator=g) > 0.5 if imd == "items" else imd
    kw = dict(scale=scale, causal=causal, imd=flags, value_mean=value_mean)
    got = kvfix.cmac_attention(q, k, v, (s, e), k_calibrated=kc, mask=m, **kw)
    f = lambda x: None if x is None else (x if x.dtype == torch.bool else x.double())  # noqa: E731
    truth = R.cmac_attention(q.double(), k.double(), v.double(), (s, e), k_calibrated=f(kc), mask=f(m), **kw)
    m_lp = None if m is None else (m if m.dtype == torch.bool else m.to(dtype))
    lp = R.cmac_attention(q, k, v, (s, e), k_calibrated=kc, mask=m_lp, **kw)
    # IMD's threshold mu_P is a mean of logits, so a logit within rounding of it can switch sides
    # between float64 and the kernel's float32: such rows are left out (a tie, not an error).
    if imd is not False:
        near = _imd_ties(q, k, kc, (s, e), scale, flags)
        got, truth, lp = got[~near], truth[~near], lp[~near]
    _rule(got, truth, lp, dtype, "attention")


def _imd_ties(q, k, kc, span, scale, flags):
    """Rows [B, Hq, Tq] with a calibrated-segment logit within 1e-3 of mu_P (IMD's threshold)."""
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    s, e = span
    near = torch.zeros(B, Hq, Tq, dtype=torch.bool)
    if e == s:
        return near
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    seg = kc if kc is not None else k[:, :, s:e]                                      # the segment's keys
    kk = seg.double().repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * sc                  # [B, Hq, Tq, N]
    after = (torch.arange(Tq) + T - Tq) >= e                                          # [Tq]
    if not after.any():
        return near
    mu = logits[:, :, after].mean(dim=(1, 2, 3))                                      # [B]
    close = ((logits - mu[:, None, None, None]).abs() < 1e-3 * max(1.0, logits.abs().max().item())).any(-1)
    return close & after[None, None, :]


@_settings(40)
@given(shape=st.sampled_from([(7,), (2, 50), (3, 1, 33), (1, 300)]), dtype=DTYPE, alpha=st.floats(0.0, 5.0),
       beta=st.one_of(st.floats(0.01, 0.9), st.just(1.0)), layout=st.sampled_from(["contiguous", "transposed"]), seed=SEED)
def test_contrastive_logits(shape, dtype, alpha, beta, layout, seed):
    """The plausible set must match exactly: tokens within rounding of the threshold
    (l - max l = log beta) are moved away from it first."""
    g = _gen(seed)
    l = (3 * torch.randn(*shape, generator=g)).to(dtype).double()
    gap = l - l.max(dim=-1, keepdim=True).values - math.log(beta)
    l = torch.where((gap.abs() < 0.05) & (gap < -math.log(beta)), l - 0.2, l).to(dtype)  # the max stays
    lt = (3 * torch.randn(*shape, generator=g)).to(dtype)
    if layout == "transposed" and len(shape) >= 2:
        l, lt = l.transpose(0, -1).contiguous().transpose(0, -1), lt.transpose(0, -1).contiguous().transpose(0, -1)
    got = kvfix.contrastive_logits(l, lt, alpha=alpha, beta=beta)
    truth = R.contrastive_logits(l.double(), lt.double(), alpha=alpha, beta=beta)
    lp = R.contrastive_logits(l, lt, alpha=alpha, beta=beta)
    assert torch.equal(got.isinf(), truth.isinf())
    fin = ~truth.isinf()
    _rule(got[fin], truth[fin], lp[fin], dtype, "contrastive")
