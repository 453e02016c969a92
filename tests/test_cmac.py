"""CMAC (METHODS §4): the reference by hand, kernels against the reference, bad input, registration."""
import math

import pytest
import torch
import torch.nn.functional as F

import kvfix
from kvfix import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in kvfix.build_info()["devices"] else [])


def _inv_freq(D, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


# ---------------------------------------------------------------------------------------------
# the reference, by hand: 2 heads, 3 image tokens then 2 text tokens

def test_reference_calibrated_keys_hand_computed():
    # D = 2 (one frequency, inv_freq 1): key (1, 0) at position p rotated by delta is (cos, sin)(delta).
    k = torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(1, 2, 5, 1)   # [1, 2, 5, 2]
    inv = torch.ones(1)
    kc = R.rope_calibrate(k, (0, 3), inv, gamma=2.0)
    # compressed toward the end: anchor a = 3 (the first text token), calibrated position
    # 3 - (3 - p) / 2, delta = (3 - p) / 2 for p = 0, 1, 2
    want = torch.tensor([[math.cos(1.5), math.sin(1.5)], [math.cos(1.0), math.sin(1.0)],
                         [math.cos(0.5), math.sin(0.5)]], dtype=torch.float64)
    torch.testing.assert_close(kc, want.expand(1, 2, 3, 2))
    # span (1, 4) with explicit positions 10..14: anchor = position of index 4 = 14,
    # delta = (14 - p) * (1 - 1/4) for p = 11, 12, 13
    pos = torch.arange(10, 15)[None]
    kc = R.rope_calibrate(k, (1, 4), inv, gamma=4.0, positions=pos)
    d = [(14 - p) * 0.75 for p in (11, 12, 13)]
    want = torch.tensor([[math.cos(x), math.sin(x)] for x in d], dtype=torch.float64)
    torch.testing.assert_close(kc, want.expand(1, 2, 3, 2))
    # a span that ends the sequence: anchor = last image position + 1 (= 15 here)
    kc = R.rope_calibrate(k, (2, 5), inv, gamma=4.0, positions=pos)
    d = [(15 - p) * 0.75 for p in (12, 13, 14)]
    want = torch.tensor([[math.cos(x), math.sin(x)] for x in d], dtype=torch.float64)
    torch.testing.assert_close(kc, want.expand(1, 2, 3, 2))
    # multi-section: each section's anchor is its own position of the first token after the
    # image; positions (t, h) = (7, 7, 8) and (0, 1, 5) for indices 0..2, span (0, 2), D = 4
    k4 = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).repeat(1, 1, 3, 1)
    pos2 = torch.tensor([[[7, 7, 8]], [[0, 1, 5]]])
    kc = R.rope_calibrate(k4, (0, 2), torch.ones(2), gamma=2.0, positions=pos2, mrope_section=[1, 1])
    for n, (dt, dh) in enumerate([((8 - 7) / 2, (5 - 0) / 2), ((8 - 7) / 2, (5 - 1) / 2)]):
        want = torch.tensor([math.cos(dt), math.cos(dh), math.sin(dt), math.sin(dh)], dtype=torch.float64)
        torch.testing.assert_close(kc[0, 0, n], want)


def test_reference_angle_is_float32_for_16_bit_keys():
    """A bf16 key at position ~600 gets its angle in float32: only the output's rounding is left
    (a bf16 angle, (a - p) (1 - 1/gamma) rounded to 8 bits, was off by up to ~0.35 rad)."""
    D, T = 16, 700
    k = torch.randn(1, 2, T, D)
    inv = _inv_freq(D)
    truth = R.rope_calibrate(k.double(), (5, 600), inv, gamma=3.0)
    for dt in (torch.bfloat16, torch.float16):
        got = R.rope_calibrate(k.to(dt), (5, 600), inv, gamma=3.0)
        # x1 cos - x2 sin with cos, sin, both products and the sum rounded: < 4 ulp of |x|
        ulp = 2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -11
        assert (got.double() - truth).abs().max().item() <= 4 * ulp * k.abs().max().item()


def _hand_attention_inputs():
    # D = 1, scale 1, positions 0..4: image keys at 0, 1, 2 (span (0, 3)), text at 3, 4.
    k = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, 6.0, 10.0, 20.0], [0.0, 3.0, 3.0, -1.0, -2.0]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.5, 1.0, 1.0], [2.0, 2.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    return q.view(1, 2, 5, 1), k.view(1, 2, 5, 1), v.view(1, 2, 5, 1)


def _softmax_out(logits, values):
    e = [math.exp(x) for x in logits]
    return sum(a * b for a, b in zip(e, values)) / sum(e)


def test_reference_attention_and_imd_hand_computed():
    q, k, v = _hand_attention_inputs()
    out = R.cmac_attention(q, k, v, (0, 3), scale=1.0)
    imd = R.cmac_attention(q, k, v, (0, 3), scale=1.0, imd=True)
    # Plain causal attention everywhere without IMD.
    for h in range(2):
        for i in range(5):
            logits = [q[0, h, i, 0].item() * k[0, h, j, 0].item() for j in range(i + 1)]
            want = _softmax_out(logits, v[0, h, :i + 1, 0].tolist())
            assert out[0, h, i, 0].item() == pytest.approx(want, rel=1e-12)
    # Segment logits (queries 3, 4 x image keys): head 0 [1, 2, 3], head 1 [0, 0, 3] for both
    # queries: mu_P = (2 * 6 + 2 * 3) / 12 = 1.5; hits: head 0 keys 1, 2; head 1 key 2.
    # mu_V (scalar): head 0 mean(1, 2, 6) = 3, head 1 mean(0, 3, 3) = 2.
    for i in (3, 4):
        keys = list(range(i + 1))
        l0 = [k[0, 0, j, 0].item() for j in keys]
        v0 = [1.0, 3.0, 3.0, 10.0, 20.0][:i + 1]
        assert imd[0, 0, i, 0].item() == pytest.approx(_softmax_out(l0, v0), rel=1e-12)
        l1 = [k[0, 1, j, 0].item() for j in keys]
        v1 = [0.0, 3.0, 2.0, -1.0, -2.0][:i + 1]
        assert imd[0, 1, i, 0].item() == pytest.approx(_softmax_out(l1, v1), rel=1e-12)
    # Queries up to the image's end are untouched by IMD.
    torch.testing.assert_close(imd[:, :, :3], out[:, :, :3], rtol=0, atol=0)


def test_reference_imd_vector_mean_and_calibrated_segment_hand_computed():
    q, k, v = _hand_attention_inputs()
    v2 = torch.cat([v, -2 * v], dim=-1)  # D = 2 values; q, k padded with a zero dim
    q2, k2 = torch.cat([q, torch.zeros_like(q)], -1), torch.cat([k, torch.zeros_like(k)], -1)
    vec = R.cmac_attention(q2, k2, v2, (0, 3), scale=1.0, imd=True, value_mean="vector")
    sca = R.cmac_attention(q2, k2, v2, (0, 3), scale=1.0, imd=True, value_mean="scalar")
    # head 0, query 4: hits keys 1, 2; mu_V vector (3, -6), scalar mean(3, -6) = -1.5
    logits = [1.0, 2.0, 3.0, 0.0, 0.0]
    assert vec[0, 0, 4, 1].item() == pytest.approx(_softmax_out(logits, [-2.0, -6.0, -6.0, -20.0, -40.0]))
    assert sca[0, 0, 4, 1].item() == pytest.approx(_softmax_out(logits, [-2.0, -1.5, -1.5, -20.0, -40.0]))
    # k_calibrated replaces the image keys for the after-image queries only.
    kc = torch.full((1, 2, 3, 1), 0.0, dtype=torch.float64)
    out = R.cmac_attention(q, k, v, (0, 3), scale=1.0, k_calibrated=kc)
    assert out[0, 0, 4, 0].item() == pytest.approx(_softmax_out([0.0] * 5, [1.0, 2.0, 6.0, 10.0, 20.0]))
    torch.testing.assert_close(out[:, :, :3], R.cmac_attention(q, k, v, (0, 3), scale=1.0)[:, :, :3])


def test_reference_key_mean_threshold_hand_computed():
    """k_calibrated_mean: mu_P = scale * sum over heads and after-image queries of q . mean key /
    (Hq * rows). With the true mean (head 0 keys 1, 2, 3 -> 2; head 1 0, 0, 3 -> 1) it is the
    logit mean of test_reference_attention_and_imd_hand_computed, 1.5: the same output. A caller's
    mean of (1, 4) instead: mu_P = (2 * 1 + 2 * 4) / 4 = 2.5, so only head 0's key 2 (logit 3)
    and head 1's key 2 (logit 3) are hits."""
    q, k, v = _hand_attention_inputs()
    mean = R.cmac_key_mean(k[:, :, 0:3])
    torch.testing.assert_close(mean, torch.tensor([[[2.0], [1.0]]], dtype=torch.float64))
    torch.testing.assert_close(R.cmac_attention(q, k, v, (0, 3), scale=1.0, imd=True, k_calibrated_mean=mean),
                               R.cmac_attention(q, k, v, (0, 3), scale=1.0, imd=True), rtol=0, atol=0)
    other = torch.tensor([[[1.0], [4.0]]], dtype=torch.float64)
    out = R.cmac_attention(q, k, v, (0, 3), scale=1.0, imd=True, k_calibrated_mean=other)
    for i in (3, 4):
        keys = list(range(i + 1))
        l0 = [k[0, 0, j, 0].item() for j in keys]
        v0 = [1.0, 2.0, 3.0, 10.0, 20.0][:i + 1]   # mu_V head 0: 3, key 2 only
        assert out[0, 0, i, 0].item() == pytest.approx(_softmax_out(l0, v0), rel=1e-12)
        l1 = [k[0, 1, j, 0].item() for j in keys]
        v1 = [0.0, 3.0, 2.0, -1.0, -2.0][:i + 1]   # mu_V head 1: 2, key 2 only
        assert out[0, 1, i, 0].item() == pytest.approx(_softmax_out(l1, v1), rel=1e-12)
    torch.testing.assert_close(out[:, :, :3], R.cmac_attention(q, k, v, (0, 3), scale=1.0)[:, :, :3])
    assert R.cmac_key_mean(k[:, :, :0]).shape == (1, 2, 1) and not R.cmac_key_mean(k[:, :, :0]).any()


def test_reference_contrastive_hand_computed():
    l = torch.tensor([[2.0, 1.5, 1.0, 1.9]], dtype=torch.float64)
    lt = torch.tensor([[1.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    out = R.contrastive_logits(l, lt, alpha=1.0, beta=0.5)  # keep l - 2 >= ln 0.5 = -0.693
    torch.testing.assert_close(out, torch.tensor([[3.0, 3.0, -math.inf, -0.2]], dtype=torch.float64))
    out = R.contrastive_logits(l, lt, alpha=3.0, beta=1.0)  # only the argmax
    assert out[0, 0].item() == pytest.approx(5.0) and torch.isinf(out[0, 1:]).all()


# ---------------------------------------------------------------------------------------------
# RoPE convention: calibrating post-RoPE keys == applying RoPE at the calibrated positions

def _rope(x, pos, inv_freq, sections=None):
    """transformers' convention: cos/sin = cat(freqs, freqs), x cos + rotate_half(x) sin;
    multi-section (Qwen2-VL): section i of the (doubled) frequencies takes position row i % S."""
    pos = pos.double()
    if pos.dim() == 2:
        pos = pos[None]
    freqs = pos[..., None] * inv_freq.double()                     # [S, B, T, D/2]
    emb = torch.cat([freqs, freqs], -1)                            # [S, B, T, D]
    if sections is None:
        emb = emb[0]
    else:
        parts = emb.split(list(sections) * 2, dim=-1)
        emb = torch.cat([m[i % len(sections)] for i, m in enumerate(parts)], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("kind", ["cache", "positions", "mrope"])
def test_calibration_equals_rope_at_calibrated_positions(kind, gamma):
    B, H, T, D, s, e = 2, 3, 20, 16, 4, 13
    inv = _inv_freq(D)
    raw = torch.randn(B, H, T, D, dtype=torch.float64)
    sections = None
    if kind == "cache":
        pos, positions = torch.arange(T).expand(B, T), None
    elif kind == "positions":
        pos = torch.arange(T)[None] + torch.tensor([[0], [7]])
        positions = pos
    else:
        sections = [2, 3, 3]
        pos = torch.stack([torch.arange(T), torch.arange(T) // 3, torch.arange(T) % 5])[:, None].expand(3, B, T) + 2
        positions = pos
    k = _rope(raw, pos, inv, sections)
    rows = pos if pos.dim() == 3 else pos[None]
    anchor = rows[..., e:e + 1].double()   # each section's position of the first token after the image
    cal = anchor - (anchor - rows.double()) / gamma
    want = _rope(raw, cal if sections else cal[0], inv, sections)[:, :, s:e]
    got_ref = R.rope_calibrate(k, (s, e), inv, gamma=gamma, positions=positions, mrope_section=sections)
    torch.testing.assert_close(got_ref, want, rtol=0, atol=1e-12)
    got = kvfix.rope_calibrate(k.float(), (s, e), inv, gamma=gamma, positions=positions, mrope_section=sections)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


def _authors_positions(pos, s_pos, e_pos, gamma):
    """The authors' construction of CMPC (lijm48/IMCCD, linearly scaled rotary embedding): every
    position scaled by gamma, the image advancing by 1 a token, the text after it pulled back
    by n (1 - 1/gamma); used with inv_freq / gamma."""
    pos = pos.double()
    n = e_pos - s_pos
    return torch.where(pos < s_pos, gamma * pos,
                       torch.where(pos < e_pos, gamma * s_pos + (pos - s_pos), gamma * s_pos + n + gamma * (pos - e_pos)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [2.0, 3.0])
@pytest.mark.parametrize("offset", [0, 5])
def test_calibration_equals_the_authors_construction(offset, gamma, device):
    """After-image queries x image keys: the logits of kvfix's calibrated keys equal those of the
    authors' scaled-position construction; attention that takes that block from the authors'
    logits and every other pair from the plain model equals cmac_attention, prefill and decode."""
    B, H, T, D, s, e = 2, 2, 24, 16, 3, 15
    inv = _inv_freq(D)
    qr, kr, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(T)[None].expand(B, T) + offset                    # e.g. positions shifted by padding
    q, k = _rope(qr, pos, inv), _rope(kr, pos, inv)
    kc = R.rope_calibrate(k, (s, e), inv, gamma=gamma, positions=pos)
    pa = _authors_positions(pos, s + offset, e + offset, gamma)
    qa, ka = _rope(qr, pa, inv.double() / gamma), _rope(kr, pa, inv.double() / gamma)
    want = qa[:, :, e:] @ ka[:, :, s:e].transpose(-1, -2)                 # [B, H, T - e, N]
    torch.testing.assert_close(q[:, :, e:] @ kc.transpose(-1, -2), want, rtol=0, atol=1e-10)
    got = kvfix.rope_calibrate(k.float().to(device), (s, e), inv.to(device), gamma=gamma, positions=pos.to(device))
    torch.testing.assert_close(got.cpu().double(), kc, rtol=0, atol=2e-5)
    # attention: the authors replace only the (after-image query, image key) block of the logits
    scale = 1 / math.sqrt(D)
    logits = q @ k.transpose(-1, -2)
    logits[:, :, e:, s:e] = want
    logits = logits * scale + torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    ref = torch.softmax(logits, -1) @ v
    for Tq in (T, 1):
        out = kvfix.cmac_attention(q[:, :, T - Tq:].float().to(device), k.float().to(device), v.float().to(device),
                                   (s, e), k_calibrated=got)
        torch.testing.assert_close(out.cpu().double(), ref[:, :, T - Tq:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# kernels against the reference

def _low_precision_rule(out, truth, ref_lp, *, which):
    """flash-attention rule: kernel error vs float64 <= 2x the error of the reference run in the
    same dtype, plus a slack far below that error."""
    assert torch.isfinite(out).all(), f"{which}: unwritten or non-finite output"
    err = (out.double() - truth).abs().max().item()
    ref_err = (ref_lp.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    slack = (2e-6 if out.dtype == torch.float32 else 2e-3) * scale
    assert err <= 2 * ref_err + slack, f"{which}: {out.dtype} error {err} vs the reference's {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H", [(1, 1), (2, 3)])
def test_rope_calibrate_matches_reference(B, H, dtype, device):
    D, T = 32, 30
    inv = _inv_freq(D).to(device)
    k = torch.randn(B, H, T + 5, D, device=device).to(dtype)[:, :, 5:]   # strided cache view
    for span, gamma, positions, sections in [((0, 10), 3.0, None, None), ((12, 30), 2.0, None, None),
                                             ((4, 20), 1.0, None, None),
                                             ((3, 19), 3.0, torch.randint(0, 50, (B, T)), None),
                                             ((3, 19), 2.0, torch.randint(0, 50, (3, B, T)), [4, 6, 6])]:
        positions = None if positions is None else positions.to(device)
        out = kvfix.rope_calibrate(k, span, inv, gamma=gamma, positions=positions, mrope_section=sections)
        truth = R.rope_calibrate(k.double(), span, inv, gamma=gamma, positions=positions, mrope_section=sections)
        ref_lp = R.rope_calibrate(k, span, inv, gamma=gamma, positions=positions, mrope_section=sections)
        assert out.dtype == dtype and out.shape == (B, H, span[1] - span[0], D) and out.is_contiguous()
        _low_precision_rule(out, truth, ref_lp, which=f"span {span} gamma {gamma}")
        if gamma == 1.0:
            torch.testing.assert_close(out, k[:, :, span[0]:span[1]], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_calibrate_per_item_spans(device):
    B, H, T, D, N = 3, 2, 24, 16, 9
    inv = _inv_freq(D).to(device)
    k = torch.randn(B, H, T, D, device=device)
    spans = torch.tensor([[0, N], [5, 5 + N], [T - N, T]], device=device)
    pos = (torch.arange(T)[None] - torch.tensor([[0], [5], [2]])).clamp(min=0).to(device)
    out = kvfix.rope_calibrate(k, spans, inv, gamma=3.0, positions=pos)
    assert out.shape == (B, H, N, D)
    for b in range(B):
        s = int(spans[b, 0])
        want = R.rope_calibrate(k[b:b + 1].double(), (s, s + N), inv, gamma=3.0, positions=pos[b:b + 1])
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(kvfix.rope_calibrate(k, spans, inv, positions=pos, num_tokens=N), out, rtol=0, atol=0)


def _attention_inputs(B, Hq, Hkv, Tq, T, D, dtype, device, *, layout="contiguous"):
    q = torch.randn(B, Hq, Tq, D, device=device).to(dtype)
    if layout == "contiguous":
        k = torch.randn(B, Hkv, T, D, device=device).to(dtype)
        v = torch.randn(B, Hkv, T, D, device=device).to(dtype)
    else:  # a slice of a longer [B, H, Tmax, D] cache, and a [B, T, H, D] layout
        k = torch.randn(B, Hkv, T + 7, D, device=device).to(dtype)[:, :, :T]
        v = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2)
        q = torch.randn(B, Tq, Hq, D, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def _check_attention(q, k, v, span, **kw):
    out = kvfix.cmac_attention(q, k, v, span, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    kd = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    truth = R.cmac_attention(q.double(), k.double(), v.double(), span, **kd)
    ref_lp = R.cmac_attention(q, k, v, span, **kw)
    _low_precision_rule(out, truth, ref_lp, which=f"span {span} {kw.get('imd')}")
    return out


# (Tq, T, span): prefill with the image at the start, middle, end; a chunk; single-token decode.
SHAPES = [(37, 37, (0, 16)), (37, 37, (5, 21)), (37, 37, (21, 37)), (3, 40, (6, 30)), (1, 40, (6, 30)),
          (1, 200, (2, 190)), (70, 200, (10, 150))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1), (6, 2)])
def test_attention_matches_reference(Hq, Hkv, dtype, device):
    D = 32
    inv = _inv_freq(D).to(device)
    for i, (Tq, T, span) in enumerate(SHAPES):
        q, k, v = _attention_inputs(2, Hq, Hkv, Tq, T, D, dtype, device, layout="strided" if i % 2 else "contiguous")
        kc = kvfix.rope_calibrate(k, span, inv, gamma=(1.0, 2.0, 3.0)[i % 3])
        _check_attention(q, k, v, span, k_calibrated=kc)
        _check_attention(q, k, v, span, k_calibrated=kc, imd=True, value_mean=("scalar", "vector")[i % 2])
        _check_attention(q, k, v, span, imd=torch.tensor([True, False], device=device), causal=i % 3 != 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2)])
def test_attention_with_key_mean_matches_reference(Hq, Hkv, dtype, device):
    """k_calibrated_mean (cmac_key_mean of the calibrated keys, or of k's image keys without them):
    the kernel against the reference given the same mean, prefill, chunk and decode, IMD on every
    item and per item; and the op's own mean (the argument absent) against the caller's: the
    same result up to the order of the fp32 sums (compared with the rule against the truth)."""
    D = 32
    inv = _inv_freq(D).to(device)
    for i, (Tq, T, span) in enumerate(SHAPES):
        q, k, v = _attention_inputs(2, Hq, Hkv, Tq, T, D, dtype, device, layout="strided" if i % 2 else "contiguous")
        kc = kvfix.rope_calibrate(k, span, inv, gamma=(2.0, 3.0)[i % 2])
        km = kvfix.cmac_key_mean(kc)
        assert km.dtype == torch.float32 and km.shape == (2, Hkv, D) and km.is_contiguous()
        torch.testing.assert_close(km.double(), R.cmac_key_mean(kc.double()), rtol=1e-5, atol=1e-6)
        _check_attention(q, k, v, span, k_calibrated=kc, imd=True, value_mean=("scalar", "vector")[i % 2],
                         k_calibrated_mean=km)
        _check_attention(q, k, v, span, k_calibrated=kc, imd=torch.tensor([False, True], device=device),
                         k_calibrated_mean=km)
        plain = kvfix.cmac_key_mean(k[:, :, span[0]:span[1]])
        _check_attention(q, k, v, span, imd=True, k_calibrated_mean=plain, causal=i % 3 != 1)
        # without IMD the mean is not used
        torch.testing.assert_close(kvfix.cmac_attention(q, k, v, span, k_calibrated=kc, k_calibrated_mean=km * 7),
                                   kvfix.cmac_attention(q, k, v, span, k_calibrated=kc), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_key_mean_moves_the_threshold(device):
    """A caller's mean other than the keys' own moves mu_P, as the reference says: a mean of
    zeros makes every positive segment logit a hit; the kernel follows the reference."""
    B, Hq, Hkv, T, D = 2, 4, 2, 30, 16
    q, k, v = _attention_inputs(B, Hq, Hkv, T, T, D, torch.float32, device)
    for Tq in (T, 1):
        qq = q[:, :, T - Tq:]
        for km in (torch.zeros(B, Hkv, D, device=device), 3 * torch.randn(B, Hkv, D, device=device)):
            out = _check_attention(qq, k, v, (4, 20), imd=True, k_calibrated_mean=km)
            assert not torch.allclose(out, kvfix.cmac_attention(qq, k, v, (4, 20), imd=True))
        # a non-contiguous mean (the wrapper makes it contiguous)
        km = torch.randn(B, D, Hkv, device=device).transpose(1, 2)
        _check_attention(qq, k, v, (4, 20), imd=True, k_calibrated_mean=km)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gamma_one_equals_sdpa(dtype, device):
    B, Hq, Hkv, D = 2, 4, 2, 64
    inv = _inv_freq(D).to(device)
    for Tq, T, span in SHAPES:
        q, k, v = _attention_inputs(B, Hq, Hkv, Tq, T, D, dtype, device)
        kc = kvfix.rope_calibrate(k, span, inv, gamma=1.0)
        out = kvfix.cmac_attention(q, k, v, span, k_calibrated=kc)
        attn = torch.ones(Tq, T, dtype=torch.bool, device=device).tril(T - Tq)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, enable_gqa=True)
        _low_precision_rule(out, want, ref, which=f"sdpa {Tq} {T}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive", "finfo"])
def test_left_padding_per_item_spans(kind, dtype, device):
    """Left padding shifts the image per item: spans as a [B, 2] tensor, a padding mask as SDPA gets it."""
    B, Hq, Hkv, T, D, N = 3, 4, 2, 40, 32, 12
    pad = torch.tensor([0, 3, 7])
    valid = torch.arange(T)[None] >= pad[:, None]                           # [B, T]
    spans = torch.stack([pad + 4, pad + 4 + N], 1).to(device)
    if kind == "bool":
        mask = valid[:, None, None, :]
    elif kind == "additive":
        mask = torch.where(valid, 0.0, -math.inf)[:, None, None, :].to(dtype)
    else:  # transformers' additive padding: finfo.min, causal folded in, [B, 1, Tq, T]
        full = valid[:, None, :] & torch.ones(T, T, dtype=torch.bool).tril()[None]
        mask = torch.where(full, 0.0, torch.finfo(dtype).min)[:, None].to(dtype)
    mask = mask.to(device)
    inv = _inv_freq(D).to(device)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp(min=0).to(device)
    for Tq in (T, 1):
        q, k, v = _attention_inputs(B, Hq, Hkv, Tq, T, D, dtype, device)
        m = mask if mask.shape[2] == 1 else mask[:, :, T - Tq:]
        kc = kvfix.rope_calibrate(k, spans, inv, gamma=3.0, positions=pos, num_tokens=N)
        out = _check_attention(q, k, v, spans, k_calibrated=kc, mask=m, imd=True)
        _check_attention(q, k, v, spans, k_calibrated=kc, mask=m, imd=True, k_calibrated_mean=kvfix.cmac_key_mean(kc))
        if Tq == T:  # padded query rows see no key (bool / -inf masks): zeros
            if kind != "finfo":
                assert (out[1, :, :3] == 0).all() and (out[2, :, :7] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_per_head_mask_and_scale(device):
    B, Hq, Hkv, Tq, T, D = 2, 4, 2, 9, 25, 16
    q, k, v = _attention_inputs(B, Hq, Hkv, Tq, T, D, torch.float32, device)
    mask = torch.rand(B, Hq, Tq, T, device=device) > 0.3
    _check_attention(q, k, v, (3, 12), mask=mask, scale=0.3, imd=True)
    _check_attention(q, k, v, (3, 12), mask=torch.randn(1, Hq, 1, T, device=device), causal=False, imd=True)


@pytest.mark.parametrize("device", DEVICES)
def test_imd_per_item_equals_separate_calls(device):
    B, Hq, Hkv, T, D = 2, 4, 4, 30, 32
    q, k, v = _attention_inputs(B, Hq, Hkv, T, T, D, torch.float32, device)
    both = kvfix.cmac_attention(q, k, v, (4, 20), imd=torch.tensor([False, True], device=device))
    torch.testing.assert_close(both[:1], kvfix.cmac_attention(q[:1], k[:1], v[:1], (4, 20)), rtol=0, atol=0)
    torch.testing.assert_close(both[1:], kvfix.cmac_attention(q[1:], k[1:], v[1:], (4, 20), imd=True), rtol=0, atol=0)
    assert not torch.allclose(both[1:], kvfix.cmac_attention(q[1:], k[1:], v[1:], (4, 20)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contrastive_matches_reference(dtype, device):
    for shape in [(1, 7), (3, 1000), (2, 2, 513)]:
        l = (3 * torch.randn(*shape, device=device)).to(dtype)
        lt = (3 * torch.randn(*shape, device=device)).to(dtype)
        for alpha, beta in [(3.0, 0.2), (0.0, 1.0), (1.5, 1e-4)]:
            out = kvfix.contrastive_logits(l, lt, alpha=alpha, beta=beta)
            want = R.contrastive_logits(l.double(), lt.double(), alpha=alpha, beta=beta)
            assert out.dtype == dtype and out.shape == l.shape
            assert torch.equal(torch.isinf(out), torch.isinf(want))
            keep = ~torch.isinf(want)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out.double()[keep], want[keep].to(dtype).double(), rtol=tol, atol=tol)
    # strided input (a slice of the vocabulary axis)
    big = torch.randn(4, 100, device=device)
    out = kvfix.contrastive_logits(big[:, ::2], big[:, 1::2])
    assert torch.equal(torch.isinf(out), torch.isinf(R.contrastive_logits(big[:, ::2], big[:, 1::2])))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument

def _ok(device="cpu"):
    q, k, v = _attention_inputs(2, 4, 2, 5, 12, 8, torch.float32, device)
    return q, k, v


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (3, 13)), ValueError, "image_span .* out of range"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (-1, 3)), ValueError, "image_span .* out of range"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (5, 3)), ValueError, "image_span .* out of range"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, torch.tensor([[0, 4], [9, 14]])), ValueError, "out of range"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, torch.tensor([[0, 4], [2, 5]]), k_calibrated=k[:, :, :4]),
     ValueError, "image span length of item 1 is 3, expected N = 4"),
    (lambda q, k, v: kvfix.rope_calibrate(k, torch.tensor([[0, 4], [2, 5]]), _inv_freq(8)), ValueError,
     "image span length of item 1"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (2.0, 5)), TypeError, "image_span"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, torch.tensor([[0.0, 4.0]] * 2)), TypeError, "image_span"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), k_calibrated=k[:, :, :3]), ValueError, "k_calibrated"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), k_calibrated=k[:, :, :4].half()), TypeError,
     "k_calibrated"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), k_calibrated_mean=torch.zeros(2, 2, 7)), ValueError,
     r"k_calibrated_mean must be \[B, Hkv, D\] = \[2, 2, 8\]"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), k_calibrated_mean=torch.zeros(2, 2, 8).half()), TypeError,
     "k_calibrated_mean must be float32"),
    (lambda q, k, v: kvfix.cmac_attention(q, k.half(), v, (0, 4)), TypeError, "k dtype"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v[:, :, :5], (0, 4)), ValueError, "v shape"),
    (lambda q, k, v: kvfix.cmac_attention(q[:, :3], k, v, (0, 4)), ValueError, "multiple of the kv heads"),
    (lambda q, k, v: kvfix.cmac_attention(torch.randn(2, 4, 13, 8), k, v, (0, 4)), ValueError, "Tq=13"),
    (lambda q, k, v: kvfix.cmac_attention(q[:, :, :0], k, v, (0, 4)), ValueError, "q is empty"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), mask=torch.ones(3, 12, dtype=torch.bool)), ValueError,
     "mask must be broadcastable"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), mask=torch.ones(12, dtype=torch.int32)), TypeError, "mask"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), imd=torch.ones(3, dtype=torch.bool)), ValueError, "imd"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), imd=1), TypeError, "imd"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), value_mean="median"), ValueError, "value_mean"),
    (lambda q, k, v: kvfix.cmac_attention(q, k, v, (0, 4), scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: kvfix.cmac_attention(q.double(), k, v, (0, 4)), TypeError, "q must be float32"),
    (lambda q, k, v: kvfix.cmac_attention(q.transpose(2, 3), k, v, (0, 4)), ValueError, "q needs a contiguous"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), gamma=0.0), ValueError, "gamma must be > 0"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), gamma=-1), ValueError, "gamma must be > 0"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), gamma=math.inf), ValueError, "gamma"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 40), _inv_freq(8)), ValueError, "image_span .* out of range"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(6)), ValueError, "inv_freq must be"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8).double()), TypeError, "inv_freq must be float32"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8) * math.nan), ValueError, "inv_freq has non-finite"),
    (lambda q, k, v: kvfix.rope_calibrate(k[..., :7], (0, 4), _inv_freq(8)), ValueError, "even"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), positions=torch.zeros(2, 11, dtype=torch.long)),
     ValueError, "positions must be"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), positions=torch.zeros(2, 12)), TypeError,
     "positions must be an integer"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), mrope_section=[1, 1, 1]), ValueError,
     "mrope_section .* must sum"),
    (lambda q, k, v: kvfix.rope_calibrate(k, (0, 4), _inv_freq(8), positions=torch.zeros(3, 2, 12, dtype=torch.long)),
     ValueError, "positions must be"),
    (lambda q, k, v: kvfix.contrastive_logits(q, k), ValueError, "logits_distorted shape"),
    (lambda q, k, v: kvfix.contrastive_logits(q, q, beta=0.0), ValueError, r"beta must be in \(0, 1\]"),
    (lambda q, k, v: kvfix.contrastive_logits(q, q, beta=1.5), ValueError, r"beta must be in \(0, 1\]"),
    (lambda q, k, v: kvfix.contrastive_logits(q, q, alpha=-0.1), ValueError, "alpha must be >= 0"),
    (lambda q, k, v: kvfix.contrastive_logits(q, q.half()), TypeError, "logits_distorted dtype"),
    (lambda q, k, v: kvfix.contrastive_logits(q[..., :0], q[..., :0]), ValueError, "logits must be a non-empty"),
])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    q, k, v = _ok()
    with pytest.raises(exc, match=match):
        call(q, k, v)


def test_ops_check_their_input_too():
    """torch.ops.kvfix.* called directly (no wrapper) still refuses bad input."""
    q, k, v = _ok()
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.kvfix.cmac_attention.default(q, k, v, 0, 13, None, None, None, None, True, False, None, 0)
    with pytest.raises(ValueError, match="gamma must be"):
        torch.ops.kvfix.rope_calibrate.default(k, 0, 4, None, 4, _inv_freq(8), 0.0, None, None)
    with pytest.raises(ValueError, match="beta must be in"):
        torch.ops.kvfix.contrastive_logits.default(q, q, 3.0, 2.0)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        torch.ops.kvfix.cmac_attention.default(q[:, :3], k, v, 0, 4, None, None, None, None, True, False, None, 0)
    with pytest.raises(ValueError, match="k_calibrated_mean must be contiguous"):
        torch.ops.kvfix.cmac_attention.default(q, k, v, 0, 4, None, None, None, None, True, True, None, 0,
                                               torch.zeros(2, 8, 2).transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# no host synchronisation, registration: opcheck, torch.compile, meta tensors

def test_no_host_reads_in_the_decode_path():
    q, k, v = _attention_inputs(2, 4, 2, 1, 30, 16, torch.float32, "cpu")
    kc = torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    meta = [t.to("meta") for t in (q, k, v, kc, mask)]
    assert kvfix.cmac_attention(*meta[:3], (3, 13), k_calibrated=meta[3], mask=meta[4], imd=True).shape == q.shape
    assert kvfix.contrastive_logits(meta[0], meta[0]).shape == q.shape
    assert kvfix.rope_calibrate(meta[1], (3, 13), _inv_freq(16).to("meta")).shape == (2, 2, 10, 16)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Calls.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    imd = torch.tensor([True, False])
    km = kvfix.cmac_key_mean(kc)
    assert kvfix.cmac_attention(*meta[:3], (3, 13), k_calibrated=meta[3], imd=True,
                                k_calibrated_mean=km.to("meta")).shape == q.shape
    with Calls():
        kvfix.cmac_attention(q, k, v, (3, 13), k_calibrated=kc, mask=mask, imd=imd)
        kvfix.cmac_attention(q, k, v, (3, 13), k_calibrated=kc, mask=mask, imd=imd, k_calibrated_mean=km)
        kvfix.contrastive_logits(q, q)
    assert Calls.calls == ["kvfix.cmac_attention.default"] * 2 + ["kvfix.contrastive_logits.default"], Calls.calls


def test_opcheck():
    q, k, v = _attention_inputs(2, 4, 2, 5, 12, 8, torch.float32, "cpu")
    kc = torch.randn(2, 2, 4, 8)
    spans = torch.tensor([[1, 5], [3, 7]])
    mask = torch.rand(2, 1, 5, 12) > 0.2
    imd = torch.tensor([True, False])
    op = torch.ops.kvfix.cmac_attention.default
    torch.library.opcheck(op, (q, k, v, 1, 5, None, kc, None, None, True, False, None, 0))
    torch.library.opcheck(op, (q, k, v, 0, 0, spans, kc, 0.5, mask, True, True, imd, 1))
    torch.library.opcheck(op, (q.bfloat16(), k.bfloat16(), v.bfloat16(), 2, 6, None, None, None, None, False, True,
                               None, 0))
    torch.library.opcheck(op, (q, k, v, 0, 0, spans, kc, None, mask, True, True, imd, 0, kc.mean(2)))
    inv = _inv_freq(8)
    torch.library.opcheck(torch.ops.kvfix.rope_calibrate.default, (k, 1, 5, None, 4, inv, 3.0, None, None))
    pos = torch.randint(0, 20, (3, 2, 12))
    torch.library.opcheck(torch.ops.kvfix.rope_calibrate.default, (k, 0, 0, spans, 4, inv, 2.0, pos, [1, 1, 2]))
    torch.library.opcheck(torch.ops.kvfix.contrastive_logits.default, (q, torch.randn_like(q), 3.0, 0.2))


def test_torch_compile_fullgraph():
    q, k, v = _attention_inputs(2, 4, 2, 6, 20, 16, torch.float32, "cpu")
    inv = _inv_freq(16)

    def f(q, k, v, logits):
        kc = kvfix.rope_calibrate(k * 1.0, (2, 10), inv, gamma=3.0)
        out = kvfix.cmac_attention(q, k, v, (2, 10), k_calibrated=kc, imd=True)
        out2 = kvfix.cmac_attention(q, k, v, (2, 10), k_calibrated=kc, imd=True,
                                    k_calibrated_mean=kvfix.cmac_key_mean(kc))
        return out * 2 + out2, kvfix.contrastive_logits(logits, logits.flip(-1))

    logits = torch.randn(2, 50)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    for a, b in zip(compiled(q, k, v, logits), f(q, k, v, logits)):
        torch.testing.assert_close(a, b)
