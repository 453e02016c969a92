"""KVSmooth (METHODS §2): the reference by hand, kernels against the reference, bad input, registration."""
import math

import pytest
import torch

import kvfix
from kvfix import reference as R

NAN = float("nan")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in kvfix.build_info()["devices"] else [])


# ---------------------------------------------------------------------------------------------
# the reference, by hand

def test_reference_entropy_hand_computed():
    # D = 1, scale 1: logits [0, ln 3] -> p = [1/4, 3/4]
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 1, 2, 1)
    h = R.row_entropy(q, k, scale=1.0)
    torch.testing.assert_close(h, torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]],
                                               dtype=torch.float64), rtol=0, atol=1e-15)
    # q = 0: uniform over the positions taking part -> log(count); masked rows: 0
    q = torch.zeros(2, 2, 1, 4, dtype=torch.float64)
    k = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])[:, None, None, :]
    torch.testing.assert_close(R.row_entropy(q, k, mask=mask),
                               torch.tensor([[math.log(5)] * 2, [math.log(3)] * 2], dtype=torch.float64))
    additive = torch.where(mask, 0.0, float("-inf")).double()
    torch.testing.assert_close(R.row_entropy(q, k, mask=additive), R.row_entropy(q, k, mask=mask))
    none = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    assert torch.equal(R.row_entropy(q, k, mask=none), torch.zeros(2, 2, dtype=torch.float64))


def test_reference_queue_hand_computed_sequence():
    # M = 3, lam = rank (lam_ref 0.5, band 0.5); oldest entry first, NaN = empty.
    # rank = k / M, k = #{entries <= z} after the push: the 1-based rank of z (z counts itself,
    # equal values count, empty slots do not), divided by the capacity M also while filling.
    queue = torch.full((1, 3), NAN)
    steps = [  # z, queue after the push, rank
        (2.0, [NAN, NAN, 2.0], 1 / 3),   # filling: only z itself
        (1.0, [NAN, 2.0, 1.0], 1 / 3),
        (3.0, [2.0, 1.0, 3.0], 3 / 3),   # z is the max
        (3.0, [1.0, 3.0, 3.0], 3 / 3),   # a tie with the max: equal values count
        (0.5, [3.0, 3.0, 0.5], 1 / 3),   # z is the min
        (3.0, [3.0, 0.5, 3.0], 3 / 3),
        (2.0, [0.5, 3.0, 2.0], 2 / 3),
        (2.0, [3.0, 2.0, 2.0], 2 / 3),   # a tie below the max
    ]
    for z, after, rank in steps:
        lam, queue = R.kvsmooth_queue(queue, torch.tensor([z]), lam_ref=0.5, band=0.5)
        torch.testing.assert_close(queue, torch.tensor([after]), equal_nan=True)
        assert lam.item() == pytest.approx(rank)


def test_reference_queue_rank_paper_sizes_and_clamps():
    """M = 15 (the paper's queue): full, filling, ties, then the band and the [0, 1] clamp."""
    full = torch.arange(1.0, 16.0)[None]                 # [1, 2, ..., 15], oldest first
    # z the max of a full queue: after the push [2, ..., 15, 99], k = 15 -> rank 15/15 = 1
    for lam_ref, band, want in [(0.5, 0.5, 1.0),         # band [0, 1]: rank 1 unclipped
                                (0.9, 0.2, 1.0),         # LLaVA-1.5: [0.7, 1.1], then [0, 1] -> 1
                                (0.7, 0.2, 0.9),         # InstructBLIP: clipped to lam_ref + band
                                (0.5, 0.2, 0.7)]:        # MiniGPT-4: clipped to lam_ref + band
        lam, new = R.kvsmooth_queue(full, torch.tensor([99.0]), lam_ref=lam_ref, band=band)
        assert lam.item() == pytest.approx(want), (lam_ref, band)
    assert new[0, 0].item() == 2.0 and new[0, -1].item() == 99.0
    # z in the middle of a full queue: [2, ..., 15, 7.5] has 6 entries below 7.5, k = 7
    lam, _ = R.kvsmooth_queue(full, torch.tensor([7.5]), lam_ref=0.5, band=0.5)
    assert lam.item() == pytest.approx(7 / 15)
    # ties: z = 7 equals the entry 7: [2, ..., 15, 7] has 2..7 and z itself, k = 7
    lam, _ = R.kvsmooth_queue(full, torch.tensor([7.0]), lam_ref=0.5, band=0.5)
    assert lam.item() == pytest.approx(7 / 15)
    # z the min of a full queue: k = 1, rank 1/15, clipped up to lam_ref - band
    lam, _ = R.kvsmooth_queue(full, torch.tensor([-1.0]), lam_ref=0.5, band=0.5)
    assert lam.item() == pytest.approx(1 / 15)
    lam, _ = R.kvsmooth_queue(full, torch.tensor([-1.0]), lam_ref=0.9, band=0.2)
    assert lam.item() == pytest.approx(0.7)
    # a filling queue: 3 values pushed in all (2 queued, then z), still divided by M = 15
    filling = torch.full((1, 15), NAN)
    filling[0, -2:] = torch.tensor([1.0, 3.0])
    for z, k in [(5.0, 3), (3.0, 3), (2.0, 2), (0.0, 1)]:   # 3.0: a tie counts
        lam, new = R.kvsmooth_queue(filling, torch.tensor([z]), lam_ref=0.5, band=0.5)
        assert lam.item() == pytest.approx(k / 15), z
        assert torch.isnan(new[0, :12]).all() and new[0, 12:].tolist() == [1.0, 3.0, z]
    lam, _ = R.kvsmooth_queue(filling, torch.tensor([5.0]), lam_ref=0.3, band=0.05)
    assert lam.item() == pytest.approx(0.25)               # 3/15 = 0.2, clipped up to 0.25
    # a fresh queue: z alone, k = 1
    lam, _ = R.kvsmooth_queue(torch.full((1, 15), NAN), torch.tensor([0.3]), lam_ref=0.5, band=0.5)
    assert lam.item() == pytest.approx(1 / 15)
    # the [0, 1] clamp after the band. With lam_ref in [0, 1] and band >= 0 (what the ops accept)
    # the band's clamp already lands in [0, 1]; the reference takes any lam_ref, so out of range:
    lam, _ = R.kvsmooth_queue(full, torch.tensor([-1.0]), lam_ref=1.3, band=0.2)
    assert lam.item() == 1.0                               # rank 1/15 -> band [1.1, 1.5] -> 1.1 -> 1
    lam, _ = R.kvsmooth_queue(full, torch.tensor([99.0]), lam_ref=-0.5, band=0.2)
    assert lam.item() == 0.0                               # rank 1 -> band [-0.7, -0.3] -> -0.3 -> 0
    # two items at once, each ranked in its own row
    lam, _ = R.kvsmooth_queue(torch.cat([full, filling]), torch.tensor([99.0, 2.0]), lam_ref=0.5, band=0.5)
    torch.testing.assert_close(lam, torch.tensor([1.0, 2 / 15]))


def test_reference_step_hand_computed_sequence():
    """q = 0 makes every row uniform: z = log T. With M = 3, lam_ref 0.5, band 0.3 (lam = rank
    clipped to [0.2, 0.8]) and K[t] = t, V[t] = -t (D = 1) as each token arrives, the smoothed
    caches follow by hand (rank = #{entries <= z} / 3, z included):
      T=1: queue [-, -, 0]         lam 0 (one position: nothing to smooth)     K = [0]
      T=2: queue [-, 0, ln2]       rank 2/3   K[1] = 1/3 * 1 + 2/3 * 0         = 1/3
      T=3: queue [0, ln2, ln3]     rank 1 -> 0.8   K[2] = 0.2 * 2 + 0.8 * 1/3  = 2/3
      T=4: queue [ln2, ln3, ln4]   rank 1 -> 0.8   K[3] = 0.2 * 3 + 0.8 * 2/3  = 17/15
      T=5: queue [ln3, ln4, ln5]   rank 1 -> 0.8   K[4] = 0.2 * 4 + 0.8 * 17/15 = 128/75
    """
    q = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    queue = torch.full((1, 3), NAN)
    k = torch.zeros(1, 1, 0, 1, dtype=torch.float64)
    v = -k
    expected_lam = [0.0, 2 / 3, 0.8, 0.8, 0.8]
    expected_k = [0.0, 1 / 3, 2 / 3, 17 / 15, 128 / 75]
    for step, lam_want in enumerate(expected_lam):
        k = torch.cat([k, torch.full((1, 1, 1, 1), float(step), dtype=torch.float64)], dim=2)
        v = torch.cat([v, torch.full((1, 1, 1, 1), -float(step), dtype=torch.float64)], dim=2)
        lam, k, v, queue = R.kvsmooth_step(q, k, v, queue, lam_ref=0.5, band=0.3)
        assert lam.item() == pytest.approx(lam_want), step
        torch.testing.assert_close(k.flatten(), torch.tensor(expected_k[:step + 1], dtype=torch.float64))
        torch.testing.assert_close(v.flatten(), -torch.tensor(expected_k[:step + 1], dtype=torch.float64))
    torch.testing.assert_close(queue, torch.tensor([[math.log(3), math.log(4), math.log(5)]]))


def test_reference_step_skips_masked_previous_position():
    q = torch.randn(2, 2, 1, 4, dtype=torch.float64)
    k, v = torch.randn(2, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    queue = torch.tensor([[9e9, 9e9], [9e9, 9e9]])  # after the push [9e9, z]: only z <= z, rank 1/2
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4] = False  # item 1: position T - 2 is a hole
    lam, k2, v2, _ = R.kvsmooth_step(q, k, v, queue, mask=mask, lam_ref=0.5, band=0.5)
    assert lam[0].item() == 0.5 and lam[1].item() == 0.0
    assert torch.equal(k2[1], k[1]) and torch.equal(v2[1], v[1])
    torch.testing.assert_close(k2[0, :, -1], 0.5 * (k[0, :, -1] + k[0, :, -2]))
    torch.testing.assert_close(v2[0, :, -1], 0.5 * (v[0, :, -1] + v[0, :, -2]))
    assert torch.equal(k2[0, :, :-1], k[0, :, :-1])


def test_reference_step_at_a_position_is_the_step_on_the_first_positions():
    """A static cache of capacity 6 holding 4 tokens: the step at position 3 is the step on the
    views [:, :, :4] (the mask cut likewise); positions 4 and 5 are returned as they were."""
    q = torch.randn(2, 2, 1, 4, dtype=torch.float64)
    k, v = torch.randn(2, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    queue = torch.tensor([[0.5, 9e9], [NAN, -9e9]])
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 0] = False
    lam, k2, v2, qu = R.kvsmooth_step(q, k, v, queue, mask=mask, position=torch.tensor([3]))
    want = R.kvsmooth_step(q, k[:, :, :4], v[:, :, :4], queue, mask=mask[..., :4])
    assert torch.equal(lam, want[0]) and torch.equal(qu, want[3])
    assert torch.equal(k2[:, :, :4], want[1]) and torch.equal(v2[:, :, :4], want[2])
    assert torch.equal(k2[:, :, 4:], k[:, :, 4:]) and torch.equal(v2[:, :, 4:], v[:, :, 4:])
    assert (lam > 0).all()
    torch.testing.assert_close(k2[:, :, 3], (1 - lam[:, None, None]) * k[:, :, 3] + lam[:, None, None] * k[:, :, 2])
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="outside the cache"):
            R.kvsmooth_step(q, k, v, queue, position=bad)


# ---------------------------------------------------------------------------------------------
# kernels vs reference

def _decode_inputs(B, Hq, Hkv, T, D, dtype, device="cpu", *, layout="contiguous"):
    q = torch.randn(B, 1, Hq, D, device=device).to(dtype).transpose(1, 2)  # [B, Hq, 1, D] as transformers has it
    if layout == "contiguous":
        k = (2 * torch.randn(B, Hkv, T, D, device=device)).to(dtype)
        v = torch.randn(B, Hkv, T, D, device=device).to(dtype)
    elif layout == "static":  # a slice of a longer static cache
        k = (2 * torch.randn(B, Hkv, T + 7, D, device=device)).to(dtype)[:, :, :T]
        v = torch.randn(B, Hkv, T + 7, D, device=device).to(dtype)[:, :, :T]
    else:  # [B, T, H, D] storage
        k = (2 * torch.randn(B, T, Hkv, D, device=device)).to(dtype).transpose(1, 2)
        v = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def _padding_mask(B, T, kind, device="cpu"):
    """Left padding: item b has min(b * 3, T - 1) masked positions at the front (the last one
    always takes part)."""
    keep = torch.ones(B, T, dtype=torch.bool, device=device)
    for b in range(B):
        keep[b, :min(3 * b, T - 1)] = False
    if kind == "none":
        return None
    if kind == "bool":
        return keep[:, None, None, :]
    if kind == "additive":
        return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
    if kind == "additive_bias":  # finite values take part as biases
        bias = torch.randn(B, T, device=device)
        return torch.where(keep, bias, float("-inf"))[:, None, None, :]
    raise ValueError(kind)


def logit_rounding_bound(q, k, mask, scale=None):
    """[B, Hq]: how far the entropy of a row can move when its float32 logits are rounded, from the
    arithmetic. A dot product of D terms summed in any order is within gamma_D sum_d |q_d k_d| of the
    exact one (gamma_D = D u / (1 - D u), u = 2^-24), and scaling it and adding the mask's bias round
    at most twice more: each logit is off by at most delta_t = scale gamma_D A_t + 2 u (|x_t| +
    scale A_t), A_t = sum_d |q_d k_td|. H's gradient is -p_t (x_t - xbar); along the segment to the
    rounded logits each p_t moves by a factor within e^(+-2 delta) and each |x_t - xbar| by at most
    2 delta, so |dH| <= delta e^(2 delta) (S + 2 delta), S = sum_t p_t |x_t - xbar| at the exact logits
    (delta = max_t delta_t). Large logits (nearly one-hot rows) make this the dominant error of any
    float32 implementation, in an order that depends on the summation order: there the reference's
    own error says nothing about the kernel's."""
    B, Hq, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    u = 2.0 ** -24
    gamma = D * u / (1 - D * u)
    qd, kd = q.double()[:, :, 0, :], k.double().repeat_interleave(Hq // Hkv, dim=1)
    bias, valid = R.key_mask(mask, B, T, torch.float64, q.device)
    x = torch.einsum("bhd,bhtd->bht", qd, kd) * scale + bias[:, None, :]
    a = torch.einsum("bhd,bhtd->bht", qd.abs(), kd.abs()) * scale
    v = valid[:, None, :].expand_as(x)
    delta = torch.where(v, gamma * a + 2 * u * (x.abs() + a), 0.0).amax(dim=-1)
    p = torch.softmax(torch.where(v, x, -math.inf), dim=-1).nan_to_num(0.0)
    xbar = (p * torch.where(v, x, 0.0)).sum(-1, keepdim=True)
    S = (p * (torch.where(v, x, 0.0) - xbar).abs()).sum(-1)
    return delta * torch.exp(2 * delta) * (S + 2 * delta)


def assert_entropy_close(got, q, k, mask, scale=None):
    """Flash-attention rule: the kernel's error against float64 is at most 2x the error of the
    reference run in float32 (all kvfix arithmetic is float32 whatever the input dtype), plus a
    slack far below that error, plus what rounding the logits alone may cost
    (`logit_rounding_bound`: rows with large logits)."""
    assert got.dtype == torch.float32 and got.shape == q.shape[:2]
    truth = R.row_entropy(q.double(), k.double(), scale=scale, mask=mask)
    ref32 = R.row_entropy(q.float(), k.float(), scale=scale, mask=mask)
    err = (got.double() - truth).abs()
    ref_err = (ref32.double() - truth).abs().max().item()
    slack = 1e-6 * max(1.0, truth.abs().max().item())
    allowed = 2 * ref_err + slack + logit_rounding_bound(q, k, mask, scale)
    assert (err <= allowed).all(), f"error {err.max().item()} vs the float32 reference's {ref_err}"
    return truth


def _queue_far_from(z, M, fill, gen_seed=0):
    """A [B, M] float32 queue whose first M - fill slots are empty and whose entries keep a margin
    from z (so the rank does not depend on rounding); entries below and above z."""
    g = torch.Generator().manual_seed(gen_seed)
    B = z.shape[0]
    offsets = (torch.rand(B, M, generator=g) * 2 - 1)  # (-1, 1)
    offsets = torch.where(offsets.abs() < 0.05, torch.full_like(offsets, 0.3), offsets)
    queue = (z.float()[:, None].cpu() + offsets).to(torch.float32)
    queue[:, :M - fill] = NAN
    return queue.to(z.device)


def ulp_atol(dtype):
    return {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]


def check_step(q, k, v, queue, *, mask=None, scale=None, lam_ref=0.9, band=0.2, z=None):
    """Run kvsmooth_step_ on copies and compare with kvfix.reference.kvsmooth_step (float64).
    `z`: the float64 mean entropy when already known (the reference's steps 2-4 then run on it)."""
    if z is None:
        lam_want, k_want, v_want, q_want = R.kvsmooth_step(q, k, v, queue, scale=scale, mask=mask,
                                                           lam_ref=lam_ref, band=band)
    else:
        lam_want, q_want = R.kvsmooth_queue(queue, z, lam_ref=lam_ref, band=band)
        T = k.shape[2]
        ok = R.key_mask(mask, k.shape[0], T, torch.float32, k.device)[1][:, T - 2] if T >= 2 else None
        lam_want = torch.where(ok, lam_want, torch.zeros_like(lam_want)) if T >= 2 else torch.zeros_like(lam_want)
        k_want, v_want = R.kvsmooth_ema(k, lam_want), R.kvsmooth_ema(v, lam_want)
    kk, vv, qq = k.clone(), v.clone(), queue.clone()
    lam = kvfix.kvsmooth_step_(q, kk, vv, qq, scale=scale, mask=mask, lam_ref=lam_ref, band=band)
    assert lam.dtype == torch.float32 and lam.shape == (q.shape[0],)
    torch.testing.assert_close(lam, lam_want.to(lam.device), rtol=0, atol=1e-7)
    T = k.shape[2]
    # everything but the last position is untouched, bit for bit
    assert torch.equal(kk[:, :, :T - 1], k[:, :, :T - 1]) and torch.equal(vv[:, :, :T - 1], v[:, :, :T - 1])
    atol = ulp_atol(k.dtype) * max(1.0, k.abs().max().item())
    torch.testing.assert_close(kk[:, :, -1].float(), k_want[:, :, -1].float(), rtol=0, atol=atol)
    torch.testing.assert_close(vv[:, :, -1].float(), v_want[:, :, -1].float(), rtol=0, atol=atol)
    # the queue: shifted exactly, z at the end
    torch.testing.assert_close(qq[:, :-1], q_want[:, :-1].to(qq.device), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(qq[:, -1], q_want[:, -1].to(qq.device), rtol=0, atol=2e-6 * max(1.0, q_want[:, -1].abs().max().item()))
    return lam


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (32, 32)])
@pytest.mark.parametrize("T", [1, 2, 17, 1000])
def test_kernels_match_reference(T, Hq, Hkv, D, dtype, device):
    B = 2 if T * Hq > 10000 else 3
    case = (T + Hq + D + DTYPES.index(dtype)) % 4  # vary mask kind and queue fill across the grid
    mask_kind = ["bool", "additive", "none", "additive_bias"][case]
    mask = _padding_mask(B, T, mask_kind, device)
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dtype, device)
    truth = assert_entropy_close(kvfix.row_entropy(q, k, mask=mask), q, k, mask)
    z = truth.mean(dim=1)
    for fill in (0, 6, 15):  # fresh, partly filled, full
        queue = _queue_far_from(z, 15, fill, gen_seed=fill)
        check_step(q, k, v, queue, mask=mask, z=z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["static", "bthd"])
def test_strided_caches(layout, dtype, device):
    B, Hq, Hkv, T, D = 2, 8, 2, 300, 64
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dtype, device, layout=layout)
    q = torch.randn(B, Hq, 1, D + 8, device=device).to(dtype)[..., 8:]  # strided query rows too
    assert not k.is_contiguous() and not v.is_contiguous() and not q.is_contiguous()
    mask = _padding_mask(B, T, "bool", device)
    truth = assert_entropy_close(kvfix.row_entropy(q, k, mask=mask), q, k, mask)
    check_step(q, k, v, _queue_far_from(truth.mean(1), 5, 3), mask=mask, lam_ref=0.5, band=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive_bias", "broadcast", "last_dim_1"])
def test_step_at_a_device_position(mask_kind, dtype, device):
    """A static cache of capacity 300 (kv heads of a [B, T, H, D] store): the step with the
    current position p from a device tensor matches the reference on the first p + 1 positions
    (p = 0: nothing to smooth; p = T - 1: the whole cache), positions after p unread and unwritten
    (nan there changes nothing)."""
    B, Hq, Hkv, T, D = 3, 8, 2, 300, 64
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dtype, device, layout="bthd")
    masks = {"none": None, "bool": _padding_mask(B, T, "bool", device),
             "additive_bias": _padding_mask(B, T, "additive_bias", device),
             "broadcast": _padding_mask(1, T, "bool", device).expand(B, 1, 1, T),
             "last_dim_1": torch.tensor([True, False, True], device=device)[:, None, None, None]}
    mask = masks[mask_kind]
    for p in (0, 1, 2, 150, T - 1):
        kk, vv = k.clone(), v.clone()
        kk[:, :, p + 1:], vv[:, :, p + 1:] = NAN, NAN  # not yet written: must take no part
        m = mask if mask is None or mask.shape[-1] == 1 else mask[..., :p + 1]
        z = R.row_entropy(q.double(), kk[:, :, :p + 1].double(), mask=m).mean(1)
        queue = _queue_far_from(z, 15, 9, gen_seed=p)
        lam_want, k_want, v_want, q_want = R.kvsmooth_step(q, kk, vv, queue, mask=mask, position=p)
        k0, v0, qq = kk.clone(), vv.clone(), queue.clone()
        lam = kvfix.kvsmooth_step_(q, kk, vv, qq, mask=mask, position=torch.tensor([p], device=device))
        torch.testing.assert_close(lam, lam_want, rtol=0, atol=1e-7)
        assert (lam[0] > 0).item() == (p > 0)
        keep = [t for t in range(T) if t != p]  # every other position bit for bit (nan included)
        assert torch.equal(kk[:, :, keep].nan_to_num(7.0), k0[:, :, keep].nan_to_num(7.0))
        assert torch.equal(vv[:, :, keep].nan_to_num(7.0), v0[:, :, keep].nan_to_num(7.0))
        atol = ulp_atol(dtype) * max(1.0, k.abs().max().item())
        torch.testing.assert_close(kk[:, :, p].float(), k_want[:, :, p].float(), rtol=0, atol=atol)
        torch.testing.assert_close(vv[:, :, p].float(), v_want[:, :, p].float(), rtol=0, atol=atol)
        torch.testing.assert_close(qq[:, :-1], q_want[:, :-1], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(qq[:, -1], q_want[:, -1], rtol=0, atol=2e-6 * max(1.0, z.abs().max().item()))


def test_static_cache_decoding_with_the_position_in_place():
    """A 12-step decode into a static cache whose position tensor is written in place before each
    step (what a CUDA-graph replay does) equals the same decode on a cache that grows by
    concatenation, bit for bit (the CPU kernel runs on the same first p + 1 positions)."""
    B, Hq, Hkv, D, T0, cap = 2, 8, 2, 64, 20, 40
    for dtype in DTYPES:
        _, k, v = _decode_inputs(B, Hq, Hkv, T0, D, dtype)
        ks, vs = torch.zeros(B, Hkv, cap, D, dtype=dtype), torch.zeros(B, Hkv, cap, D, dtype=dtype)
        ks[:, :, :T0], vs[:, :, :T0] = k, v
        pos = torch.zeros(1, dtype=torch.long)
        queue, queue_s = torch.full((B, 5), NAN), torch.full((B, 5), NAN)
        mask_full = _padding_mask(B, cap, "bool")
        for step in range(12):
            q, k_new, v_new = _decode_inputs(B, Hq, Hkv, 1, D, dtype)
            k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
            n = k.shape[2]
            pos.fill_(n - 1)
            ks[:, :, n - 1:n], vs[:, :, n - 1:n] = k_new, v_new
            lam = kvfix.kvsmooth_step_(q, k, v, queue, mask=mask_full[..., :n])
            lam_s = kvfix.kvsmooth_step_(q, ks, vs, queue_s, mask=mask_full, position=pos)
            assert torch.equal(lam, lam_s) and (lam > 0).all()
            assert torch.equal(ks[:, :, :n], k) and torch.equal(vs[:, :, :n], v)
            torch.testing.assert_close(queue, queue_s, rtol=0, atol=0, equal_nan=True)
        assert not ks[:, :, n:].any() and not vs[:, :, n:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_steps_of_several_layers_equal_one_call_per_layer(device):
    """kvsmooth_steps_ over layers of different shapes, dtypes, layouts, masks and scales: the same
    lam, caches and queues as kvsmooth_step_ layer by layer, bit for bit (and the reference's)."""
    specs = [  # B, Hq, Hkv, T, D, dtype, layout, mask kind, scale
        (2, 8, 2, 300, 64, torch.bfloat16, "contiguous", "bool", None),
        (2, 4, 4, 1, 16, torch.float32, "bthd", "none", 0.3),
        (2, 32, 32, 17, 128, torch.float16, "static", "additive_bias", None),
        (2, 6, 3, 90, 80, torch.float32, "contiguous", "additive", 0.125),
    ]
    layers = []
    for i, (B, Hq, Hkv, T, D, dt, layout, mk, sc) in enumerate(specs):
        q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dt, device, layout=layout)
        mask = _padding_mask(B, T, mk, device)
        z = R.row_entropy(q.double(), k.double(), scale=sc, mask=mask).mean(1)
        layers.append((q, k, v, _queue_far_from(z, 7, 2 * i + 1, gen_seed=i), mask, sc))
    one = [(k.clone(), v.clone(), qu.clone()) for _, k, v, qu, _, _ in layers]
    lam_one = [kvfix.kvsmooth_step_(q, k, v, qu, scale=sc, mask=m, lam_ref=0.6, band=0.3)
               for (q, _, _, _, m, sc), (k, v, qu) in zip(layers, one)]
    many = [(k.clone(), v.clone(), qu.clone()) for _, k, v, qu, _, _ in layers]
    lam_many = kvfix.kvsmooth_steps_([x[0] for x in layers], [x[0] for x in many], [x[1] for x in many],
                                     [x[2] for x in many], scales=[x[5] for x in layers],
                                     masks=[x[4] for x in layers], lam_ref=0.6, band=0.3)
    assert len(lam_many) == len(specs)
    for (q, k, v, qu, m, sc), a, b, la, lb in zip(layers, one, many, lam_one, lam_many):
        assert torch.equal(la, lb) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.testing.assert_close(a[2], b[2], rtol=0, atol=0, equal_nan=True)
        lam_want = R.kvsmooth_step(q, k, v, qu, scale=sc, mask=m, lam_ref=0.6, band=0.3)[0]
        torch.testing.assert_close(lb, lam_want.to(lb.device), rtol=0, atol=1e-7)
    assert lam_many.shape == (len(specs), 2) and (lam_many > 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_steps_of_layers_of_one_shape_and_mask_equal_one_call_per_layer(device):
    """What kvfix.hf.KVSmooth hands kvsmooth_steps_ per decoded token: layers of one shape sharing
    the model's mask (on CUDA the layers of one launch pair, 64 at most: 70 layers take two): the
    same lam, caches and queues as kvsmooth_step_ layer by layer, bit for bit."""
    B, Hq, Hkv, T, D, L = 2, 8, 2, 150, 64, 70
    mask = _padding_mask(B, T, "bool", device)
    layers = []
    for i in range(L):
        q, k, v = _decode_inputs(B, Hq, Hkv, T, D, torch.bfloat16, device)
        z = R.row_entropy(q.double(), k.double(), mask=mask).mean(1)
        layers.append((q, k, v, _queue_far_from(z, 7, i % 8, gen_seed=i)))
    one = [(k.clone(), v.clone(), qu.clone()) for _, k, v, qu in layers]
    lam_one = torch.stack([kvfix.kvsmooth_step_(q, k, v, qu, mask=mask)
                           for (q, _, _, _), (k, v, qu) in zip(layers, one)])
    many = [(k.clone(), v.clone(), qu.clone()) for _, k, v, qu in layers]
    lam_many = kvfix.kvsmooth_steps_([x[0] for x in layers], [x[0] for x in many], [x[1] for x in many],
                                     [x[2] for x in many], masks=[mask] * L)
    assert torch.equal(lam_one, lam_many) and (lam_many > 0).all()
    for a, b in zip(one, many):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.testing.assert_close(a[2], b[2], rtol=0, atol=0, equal_nan=True)


def test_steps_bad_input_names_the_layer_and_writes_nothing():
    layers = [_decode_inputs(2, 4, 2, 6, 16, torch.float32) for _ in range(3)]
    qs = [q for q, _, _ in layers]
    ks, vs = [k for _, k, _ in layers], [v for _, _, v in layers]
    qus = [torch.zeros(2, 4) for _ in range(3)]
    keep = [t.clone() for t in ks + vs + qus]

    def call(**change):
        args = dict(qs=qs, k_caches=ks, v_caches=vs, queues=qus)
        kw = {n: change.pop(n) for n in ("scales", "masks", "lam_ref") if n in change}
        args.update(change)
        return kvfix.kvsmooth_steps_(args["qs"], args["k_caches"], args["v_caches"], args["queues"], **kw)

    with pytest.raises(ValueError, match="one entry per layer, got 3, 3, 2, 3"):
        call(v_caches=vs[:2])
    with pytest.raises(ValueError, match="one entry per layer"):
        call(scales=[0.5])
    with pytest.raises(ValueError, match="one entry per layer"):
        call(masks=[None, None])
    with pytest.raises(TypeError, match=r"k_caches\[1\] must be a torch.Tensor"):
        call(k_caches=[ks[0], None, ks[2]])
    with pytest.raises(ValueError, match="layer 2: kvsmooth_step_: v_cache shape"):
        call(v_caches=[vs[0], vs[1], vs[2][:, :, :5]])
    with pytest.raises(TypeError, match="layer 1: kvsmooth_step_: queue must be float32"):
        call(queues=[qus[0], qus[1].double(), qus[2]])
    with pytest.raises(ValueError, match="layer 1: .*mask must be broadcastable"):
        call(masks=[None, torch.ones(2, 1, 1, 5, dtype=torch.bool), None])
    with pytest.raises(ValueError, match="layer 0: scale must be finite"):
        call(scales=[float("inf"), None, None])
    with pytest.raises(ValueError, match="lam_ref must be in"):
        call(lam_ref=2.0)
    with pytest.raises(ValueError, match="at least one layer"):
        kvfix.kvsmooth_steps_([], [], [], [])
    with pytest.raises(ValueError, match="layer 1: q is on meta but layer 0's is on cpu"):
        call(qs=[qs[0], qs[1].to("meta"), qs[2]], k_caches=[ks[0], ks[1].to("meta"), ks[2]],
             v_caches=[vs[0], vs[1].to("meta"), vs[2]], queues=[qus[0], qus[1].to("meta"), qus[2]])
    q3, k3, v3 = _decode_inputs(3, 4, 2, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="layer 1: q has batch size 3 but layer 0's has 2"):
        call(qs=[qs[0], q3, qs[2]], k_caches=[ks[0], k3, ks[2]], v_caches=[vs[0], v3, vs[2]],
             queues=[qus[0], torch.zeros(3, 4), qus[2]])
    with pytest.raises(ValueError, match=r"k_cache\[2\]"):  # two layers on one cache
        call(k_caches=[ks[0], ks[1], ks[0]])
    with pytest.raises(ValueError, match=r"queue\[1\]"):
        call(queues=[qus[0], qus[0], qus[2]])
    for t, want in zip(ks + vs + qus, keep):
        assert torch.equal(t, want)


@pytest.mark.parametrize("D", [1, 16, 80, 96, 256])
def test_other_head_dims_and_scale(D):
    B, Hq, Hkv, T = 2, 6, 3, 150
    for dtype in DTYPES:
        q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dtype)
        for scale in (None, 0.3):
            truth = assert_entropy_close(kvfix.row_entropy(q, k, scale=scale), q, k, None, scale=scale)
            check_step(q, k, v, _queue_far_from(truth.mean(1), 7, 7), scale=scale)


@pytest.mark.parametrize("shape", ["T", "1111", "B111", "11T", "1T"])
def test_mask_broadcasting(shape):
    B, Hq, Hkv, T, D = 2, 4, 2, 40, 16
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, torch.float32)
    keep = torch.rand(B, T) > 0.3
    keep[:, -2:] = True
    m = {"T": keep[0], "1111": keep[:1, :1][:, None, None, :], "B111": keep[:, :1, None, None],
         "11T": keep[:1][None], "1T": keep[:1]}[shape]
    truth = assert_entropy_close(kvfix.row_entropy(q, k, mask=m), q, k, m)
    check_step(q, k, v, _queue_far_from(truth.mean(1), 4, 4), mask=m)


def test_large_logits_and_fully_masked_rows():
    B, Hq, Hkv, T, D = 2, 4, 4, 513, 64
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, torch.float32)
    for scale in (5.0, 50.0):  # nearly one-hot rows: entropy close to 0
        assert_entropy_close(kvfix.row_entropy(q, k, scale=scale), q, k, None, scale=scale)
    none = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    none[0] = True
    h = kvfix.row_entropy(q, k, mask=none)
    assert torch.equal(h[1], torch.zeros(Hq)) and torch.isfinite(h).all()
    # transformers-style finite padding values act like masked positions
    keep = _padding_mask(B, T, "bool")
    fmin = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(kvfix.row_entropy(q, k, mask=fmin), kvfix.row_entropy(q, k, mask=keep), rtol=0, atol=2e-6)


def test_step_t1_and_masked_previous_position():
    B, Hq, Hkv, D = 2, 4, 2, 32
    q, k, v = _decode_inputs(B, Hq, Hkv, 1, D, torch.float32)
    queue = torch.full((B, 15), NAN)
    kk, vv = k.clone(), v.clone()
    lam = kvfix.kvsmooth_step_(q, kk, vv, queue)
    assert torch.equal(lam, torch.zeros(B)) and torch.equal(kk, k) and torch.equal(vv, v)
    assert torch.isnan(queue[:, :-1]).all() and torch.allclose(queue[:, -1], torch.zeros(B))  # one position: H = 0
    q, k, v = _decode_inputs(B, Hq, Hkv, 9, D, torch.float32)
    mask = torch.ones(B, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 7] = False
    lam = check_step(q, k, v, torch.full((B, 3), 9e9), mask=mask)  # [9e9, 9e9, z]: rank 1/3, clamped up to 0.7
    assert lam[0].item() == 0.0 and lam[1].item() == pytest.approx(0.7)
    lam = check_step(q, k, v, torch.zeros(B, 3), mask=mask)  # z > 0: [0, 0, z], rank 3/3 = 1 (band [0.7, 1.1])
    assert lam[0].item() == 0.0 and lam[1].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_rank_counts_z_and_ties(dtype, device):
    """The kernels' rank is the paper's k / M, k = #{entries <= z} with z itself counted. The step
    is deterministic, so a second run on the same inputs gives the same float32 z bit for bit: the
    queues below hold that exact z (ties) and values 1 apart around it (no rounding question)."""
    B, Hq, Hkv, T, D, M = 3, 4, 2, 9, 32, 15
    q, k, v = _decode_inputs(B, Hq, Hkv, T, D, dtype, device)
    fresh = torch.full((B, M), NAN, device=device)
    lam = kvfix.kvsmooth_step_(q, k.clone(), v.clone(), fresh, lam_ref=0.5, band=0.5)
    torch.testing.assert_close(lam.cpu(), torch.full((B,), 1 / 15), rtol=0, atol=1e-7)  # z alone: k = 1
    z = fresh[:, -1].cpu()
    assert torch.isnan(fresh[:, :-1]).all() and torch.isfinite(z).all()
    queue = torch.full((B, M), NAN)
    queue[0] = z[0] - torch.arange(15.0, 0.0, -1.0)            # full, every entry below z: z is the max
    queue[1, :] = z[1] + 1.0                                   # full, every entry above z: z is the min
    queue[1, 5:9] = z[1]                                       # ... but for 4 ties
    queue[2, 9:] = torch.tensor([z[2], z[2] + 1, z[2], z[2] - 1, z[2] + 2, z[2]])  # filling: 6 queued
    # after the push (slot 0 dropped): item 0: 14 below + z -> k = 15; item 1: 4 ties + z -> k = 5;
    # item 2: 3 ties, one below, z -> k = 5 of M = 15 (not of the 7 filled slots)
    for lam_ref, band, want in [(0.5, 0.5, [1.0, 5 / 15, 5 / 15]),
                                (0.9, 0.2, [1.0, 0.7, 0.7]),
                                (0.7, 0.2, [0.9, 0.5, 0.5]),
                                (0.3, 0.2, [0.5, 1 / 3, 1 / 3])]:
        qq = queue.to(device)
        lam = check_step(q, k, v, qq, lam_ref=lam_ref, band=band, z=z.double())
        torch.testing.assert_close(lam.cpu(), torch.tensor(want), rtol=0, atol=1e-7)


def _nonfinite_case(dtype, device="cpu"):
    """The rule's cases (kvfix/reference.py, KVSmooth): item 0 a nan query head; item 1 an inf key
    that head 0 sees as +inf (nan entropy) and head 1 as -inf (no part: finite); item 2 a nan
    additive mask value; item 3 a +inf one at its only visible position (T - 2 masked: lam 0);
    item 4 a nan key at a masked position (no part) and inf values at T - 2 (the EMA carries
    them); item 5 a nan query with T - 2 masked (lam 0: nothing written)."""
    B, Hq, Hkv, T, D = 6, 4, 2, 600, 64
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
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), mask)]


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rule(dtype, device):
    """Issue 15's rule, as softmax and SDPA: a nan / +inf logit of a position taking part gives
    that head a nan entropy, a -inf one takes no part, a masked position takes no part whatever k
    holds; the step pushes the nan z and smooths with lam = nan (position T - 1 of that item turns
    nan), except where lam is 0 (nothing written)."""
    q, k, v, mask = _nonfinite_case(dtype, device)
    B, Hq = q.shape[0], q.shape[1]
    nan_heads = torch.zeros(B, Hq, dtype=torch.bool)
    nan_heads[0, 1] = nan_heads[1, 0] = nan_heads[5, 2] = True
    nan_heads[2:4] = True
    truth = R.row_entropy(q.double().cpu(), k.double().cpu(), scale=0.2, mask=mask.double().cpu())
    got = kvfix.row_entropy(q, k, scale=0.2, mask=mask).cpu()
    assert torch.equal(truth.isnan(), nan_heads) and torch.equal(got.isnan(), nan_heads), got
    torch.testing.assert_close(got.double()[~nan_heads], truth[~nan_heads], rtol=1e-4, atol=1e-4)
    queue = torch.full((B, 5), NAN, device=device)
    queue[:, 2:] = torch.tensor([0.5, 1.0, 9.0])
    lam_want, kw, vw, qw = R.kvsmooth_step(q.cpu(), k.cpu(), v.cpu(), queue.cpu(), scale=0.2, mask=mask.cpu())
    assert lam_want[:3].isnan().all() and lam_want[3] == lam_want[5] == 0 and lam_want[4] > 0
    kk, vv, qq = k.clone(), v.clone(), queue.clone()
    lam = kvfix.kvsmooth_step_(q, kk, vv, qq, scale=0.2, mask=mask).cpu()
    torch.testing.assert_close(lam, lam_want, rtol=0, atol=1e-7, equal_nan=True)
    kk, vv, qq = kk.cpu(), vv.cpu(), qq.cpu()
    assert _same(kk[:, :, :-1], k[:, :, :-1].cpu()) and _same(vv[:, :, :-1], v[:, :, :-1].cpu())
    assert _same(kk[3::2], k[3::2].cpu()) and _same(vv[3::2], v[3::2].cpu())  # lam 0: nothing written
    for got_c, want_c in ((kk, kw), (vv, vw)):
        torch.testing.assert_close(got_c[:, :, -1].float(), want_c[:, :, -1].float(), rtol=0, atol=0.02,
                                   equal_nan=True)
    assert kk[:3, :, -1].isnan().all() and vv[4, :, -1, :4].isinf().all()
    torch.testing.assert_close(qq, qw, rtol=0, atol=2e-6 * 10, equal_nan=True)


def test_reference_nonfinite_hand_computed():
    """The reference's rule on hand-sized rows: [0, +inf] and [0, nan] have no softmax (nan);
    [0, -inf] is the one-position row (entropy 0); [0, 0] is log 2; lam = 0 adds nothing."""
    q = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([[0.0, math.inf], [0.0, NAN], [0.0, -math.inf], [0.0, 0.0]], dtype=torch.float64)
    h = R.row_entropy(q, k.view(4, 1, 2, 1), scale=1.0)
    assert h[0].isnan().all() and h[1].isnan().all()
    torch.testing.assert_close(h[2:, 0], torch.tensor([0.0, math.log(2)], dtype=torch.float64))
    x = torch.tensor([math.inf, 1.0]).view(1, 1, 2, 1)  # position T - 2 holds inf
    assert torch.equal(R.kvsmooth_ema(x, torch.zeros(1)), x)
    assert R.kvsmooth_ema(x, torch.full((1,), 0.5))[0, 0, 1, 0] == math.inf
    lam, _ = R.kvsmooth_queue(torch.zeros(1, 3), torch.tensor([NAN]))
    assert lam.isnan().all()


def test_step_sequence_matches_reference_over_decoding():
    """A 12-step decode: the cache grows by one token per step, the queue carries over, the smoothed
    positions feed later steps (K[t-1] already smoothed), compared step by step. The reference keeps
    its caches in the input dtype (rounding once per EMA, as the kernels do), entropy in float64."""
    B, Hq, Hkv, D, T0 = 2, 8, 2, 64, 20
    for dtype in DTYPES:
        q0, k, v = _decode_inputs(B, Hq, Hkv, T0, D, dtype)
        k_ref, v_ref = k.clone(), v.clone()
        queue, queue_ref = torch.full((B, 5), NAN), torch.full((B, 5), NAN)
        mask_full = _padding_mask(B, T0 + 12, "bool")
        for step in range(12):
            q, k_new, v_new = _decode_inputs(B, Hq, Hkv, 1, D, dtype)
            k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
            k_ref, v_ref = torch.cat([k_ref, k_new], 2), torch.cat([v_ref, v_new], 2)
            mask = mask_full[..., :k.shape[2]]
            lam = kvfix.kvsmooth_step_(q, k, v, queue, mask=mask)
            lam_ref, k_ref, v_ref, queue_ref = R.kvsmooth_step(q, k_ref, v_ref, queue_ref, mask=mask)
            torch.testing.assert_close(lam, lam_ref, rtol=0, atol=1e-7)
            atol = ulp_atol(dtype) * 4
            torch.testing.assert_close(k.float(), k_ref.float(), rtol=0, atol=atol)
            torch.testing.assert_close(v.float(), v_ref.float(), rtol=0, atol=atol)
            torch.testing.assert_close(queue, queue_ref, rtol=0, atol=1e-5, equal_nan=True)
        assert (lam > 0).all()


def test_deterministic():
    q, k, v = _decode_inputs(2, 8, 2, 3000, 128, torch.bfloat16)
    a = kvfix.row_entropy(q, k)
    for _ in range(3):
        assert torch.equal(kvfix.row_entropy(q, k), a)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written

def _ok_step():
    q, k, v = _decode_inputs(2, 4, 2, 6, 16, torch.float32)
    return dict(q=q, k_cache=k, v_cache=v, queue=torch.zeros(2, 4))


@pytest.mark.parametrize("change,exc,match", [
    (dict(q=torch.randn(2, 4, 16)), ValueError, "q must be"),
    (dict(q=torch.randn(2, 4, 2, 16)), ValueError, "single-token"),
    (dict(q=torch.randn(2, 4, 1, 16, dtype=torch.float64)), TypeError, "q must be float32"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 4, 16, 2).transpose(-1, -2)[..., :1, :]), ValueError, "q needs a contiguous"),
    (dict(q=torch.randn(2, 3, 1, 16)), ValueError, "multiple of the kv heads"),
    (dict(q=torch.randn(3, 4, 1, 16)), ValueError, "k_cache shape"),
    (dict(q=torch.randn(2, 4, 1, 8)), ValueError, "k_cache shape"),
    (dict(k_cache=torch.randn(2, 2, 6, 16, dtype=torch.float16)), TypeError, "k_cache dtype"),
    (dict(k_cache=torch.randn(2, 2, 16, 6).transpose(-1, -2)), ValueError, "k_cache needs a contiguous"),
    (dict(k_cache=torch.randn(2, 2, 0, 16)), ValueError, "at least one position"),
    (dict(k_cache=torch.randn(2, 2, 6, 16, device="meta")), ValueError, "k_cache is on meta"),
    (dict(v_cache=torch.randn(2, 2, 5, 16)), ValueError, "v_cache shape"),
    (dict(v_cache=torch.randn(2, 2, 6, 16, dtype=torch.bfloat16)), TypeError, "v_cache dtype"),
    (dict(v_cache=None), TypeError, "v_cache must be a torch.Tensor"),
    (dict(queue=torch.zeros(3, 4)), ValueError, "queue must be"),
    (dict(queue=torch.zeros(2, 0)), ValueError, "queue must be"),
    (dict(queue=torch.zeros(2)), ValueError, "queue must be"),
    (dict(queue=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "queue must be float32"),
    (dict(mask=torch.ones(2, 6)), ValueError, "mask must be broadcastable"),
    (dict(mask=torch.ones(2, 1, 1, 5, dtype=torch.bool)), ValueError, "mask must be broadcastable"),
    (dict(mask=torch.ones(1, 2, 1, 6, dtype=torch.bool)), ValueError, "mask must be broadcastable"),
    (dict(mask=torch.ones(2, 1, 1, 6, dtype=torch.long)), TypeError, "mask must be bool"),
    (dict(mask=torch.ones(6, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale="1"), TypeError, "scale must be a real"),
    (dict(lam_ref=1.5), ValueError, "lam_ref must be in"),
    (dict(lam_ref=float("nan")), ValueError, "lam_ref must be in"),
    (dict(band=-0.1), ValueError, "band must be"),
    (dict(band=True), TypeError, "band must be a real"),
    (dict(position=3), TypeError, "position must be a torch.Tensor"),
    (dict(position=torch.tensor([3], dtype=torch.int32)), TypeError, "position must be int64"),
    (dict(position=torch.tensor([3, 4])), ValueError, "position must hold one value"),
    (dict(position=torch.tensor([3], device="meta")), ValueError, "position is on meta"),
    (dict(position=torch.tensor([6])), ValueError, "position 6 is outside the cache's positions \\[0, 6\\)"),
    (dict(position=torch.tensor(-1)), ValueError, "position -1 is outside"),
])
def test_bad_input_raises_naming_the_argument_and_writes_nothing(change, exc, match):
    args = _ok_step()
    args.update(change)
    kw = {n: args.pop(n) for n in ("mask", "scale", "lam_ref", "band", "position") if n in args}
    keep = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    with pytest.raises(exc, match=match):
        kvfix.kvsmooth_step_(args["q"], args["k_cache"], args["v_cache"], args["queue"], **kw)
    for n, t in keep.items():
        assert torch.equal(args[n], t), f"{n} was modified"


def test_row_entropy_bad_input():
    q, k, _ = _decode_inputs(2, 4, 2, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        kvfix.row_entropy(q, k[0])
    with pytest.raises(TypeError, match="k dtype"):
        kvfix.row_entropy(q, k.half())
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        kvfix.row_entropy(q, k, mask=torch.ones(3, 1, 1, 6, dtype=torch.bool))
    # the checks are the C++ ones (the wrappers only convert arguments): direct calls get them too
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        torch.ops.kvfix.row_entropy.default(q[:, :3], k, None, None)
    with pytest.raises(ValueError, match="lam_ref must be in"):
        torch.ops.kvfix.kvsmooth_step_.default(q, k.clone(), k.clone(), torch.zeros(2, 3), None, None, 2.0, 0.2)


# ---------------------------------------------------------------------------------------------
# no host synchronisation, registration: opcheck, torch.compile, meta tensors

def test_no_host_reads_in_the_op_path():
    """The wrappers read metadata only: they run on meta tensors (where any value read would
    raise), and a real call issues no aten._local_scalar_dense (.item(), bool(t), .tolist())."""
    q, k, v = _decode_inputs(2, 8, 2, 50, 64, torch.float32)
    mask = _padding_mask(2, 50, "bool")
    meta = [t.to("meta") for t in (q, k, v, torch.zeros(2, 15), mask)]
    assert kvfix.kvsmooth_step_(*meta[:4], mask=meta[4]).shape == (2,)
    assert kvfix.kvsmooth_step_(*meta[:4], position=torch.tensor([7], device="meta")).shape == (2,)
    lams = kvfix.kvsmooth_steps_([meta[0]] * 2, [meta[1], meta[1].clone()], [meta[2], meta[2].clone()],
                                 [meta[3], meta[3].clone()], masks=[meta[4], None])
    assert [lam.shape for lam in lams] == [(2,), (2,)]
    assert kvfix.row_entropy(meta[0], meta[1], mask=meta[4]).shape == (2, 8)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Scalars(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Scalars.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    queue = torch.zeros(2, 15)
    with Scalars():
        kvfix.kvsmooth_step_(q, k, v, queue, mask=mask)
        kvfix.row_entropy(q, k, mask=mask)
    assert Scalars.calls == ["kvfix.kvsmooth_step_.default", "kvfix.row_entropy.default"], Scalars.calls


def test_opcheck():
    q, k, v = _decode_inputs(2, 8, 2, 9, 16, torch.float32)
    mask = _padding_mask(2, 9, "bool")
    torch.library.opcheck(torch.ops.kvfix.row_entropy.default, (q, k, None, None))
    torch.library.opcheck(torch.ops.kvfix.row_entropy.default, (q, k, 0.5, mask))
    torch.library.opcheck(torch.ops.kvfix.kvsmooth_step_.default, (q, k, v, torch.zeros(2, 4), None, mask, 0.9, 0.2))
    torch.library.opcheck(torch.ops.kvfix.kvsmooth_step_.default,
                          (q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.full((2, 3), NAN), 0.3, None, 0.5, 0.1))
    torch.library.opcheck(torch.ops.kvfix.kvsmooth_step_.default,
                          (q, k, v, torch.zeros(2, 4), None, mask, 0.9, 0.2, torch.tensor([5])))
    q2, k2, v2 = _decode_inputs(2, 4, 4, 5, 32, torch.bfloat16)
    torch.library.opcheck(torch.ops.kvfix.kvsmooth_steps_.default,
                          ([q, q2], [k, k2], [v, v2], [torch.zeros(2, 4), torch.full((2, 3), NAN)], [0.25, 0.5],
                           [mask, None], 0.9, 0.2))


def test_torch_compile_fullgraph():
    q, k, v = _decode_inputs(2, 8, 2, 33, 32, torch.float32)
    mask = _padding_mask(2, 33, "additive")

    def f(q, k, v, queue, mask):
        h = kvfix.row_entropy(q * 1.0, k, mask=mask)
        lam = kvfix.kvsmooth_step_(q, k, v, queue, mask=mask, lam_ref=0.7)
        return h.mean(1) + 0, lam * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    k1, v1, qu1 = k.clone(), v.clone(), torch.zeros(2, 6)
    k2, v2, qu2 = k.clone(), v.clone(), torch.zeros(2, 6)
    got = compiled(q, k1, v1, qu1, mask)
    want = f(q, k2, v2, qu2, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(qu1, qu2)  # mutations kept
    assert not torch.equal(k1, k)


# ---------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU): no synchronisation, CUDA-graph capture

cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA build")


@cuda
def test_cuda_step_issues_no_sync():
    q, k, v = _decode_inputs(2, 8, 2, 3000, 128, torch.bfloat16, "cuda")
    mask = _padding_mask(2, 3000, "bool", "cuda")
    queue = torch.full((2, 15), NAN, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for _ in range(3):
            kvfix.kvsmooth_step_(q, k, v, queue, mask=mask)
            kvfix.row_entropy(q, k, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _captured(step, k, v, queue):
    """`step(k, v, queue)` captured in a CUDA graph, after a warm-up call on copies on a side
    stream: (graph, the captured call's output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(k.clone(), v.clone(), queue.clone())
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(k, v, queue)
    return g, out


@cuda
def test_cuda_graph_capture_and_replay():
    q, k, v = _decode_inputs(2, 8, 2, 700, 64, torch.float16, "cuda")
    mask = _padding_mask(2, 700, "bool", "cuda")
    k_eager, v_eager, queue_eager = k.clone(), v.clone(), torch.zeros(2, 6, device="cuda")
    queue = queue_eager.clone()
    g, lam = _captured(lambda k, v, qu: kvfix.kvsmooth_step_(q, k, v, qu, mask=mask), k, v, queue)
    for _ in range(3):  # replays keep smoothing the same position and pushing onto the queue
        g.replay()
        want = kvfix.kvsmooth_step_(q, k_eager, v_eager, queue_eager, mask=mask)
        torch.cuda.synchronize()
        assert torch.equal(lam, want) and torch.equal(k, k_eager) and torch.equal(v, v_eager)
        assert torch.equal(queue, queue_eager)


@cuda
def test_cuda_graph_replays_over_a_static_cache_with_the_position_in_device_memory():
    """One graph captured at the first position serves every later step: before each replay the
    step's q, the new K / V row and the position are written in place; the replays equal eager
    steps on a growing cache."""
    B, Hq, Hkv, D, T0, cap = 2, 8, 2, 64, 300, 320
    q0, k, v = _decode_inputs(B, Hq, Hkv, T0, D, torch.bfloat16, "cuda")
    ks = torch.zeros(B, Hkv, cap, D, dtype=torch.bfloat16, device="cuda")
    vs = torch.zeros_like(ks)
    ks[:, :, :T0], vs[:, :, :T0] = k, v
    q, pos = q0.clone(), torch.tensor([T0 - 1], device="cuda")
    queue, queue_eager = torch.full((B, 15), NAN, device="cuda"), torch.full((B, 15), NAN, device="cuda")
    g, lam = _captured(lambda k, v, qu: kvfix.kvsmooth_step_(q, k, v, qu, position=pos), ks, vs, queue)
    for step in range(15):
        q_new, k_new, v_new = _decode_inputs(B, Hq, Hkv, 1, D, torch.bfloat16, "cuda")
        k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
        n = k.shape[2]
        q.copy_(q_new)
        ks[:, :, n - 1:n], vs[:, :, n - 1:n] = k_new, v_new
        pos.fill_(n - 1)
        g.replay()
        want = kvfix.kvsmooth_step_(q_new, k, v, queue_eager)
        torch.cuda.synchronize()
        torch.testing.assert_close(lam, want, rtol=0, atol=1e-7)
        torch.testing.assert_close(ks[:, :, :n].float(), k.float(), rtol=0, atol=2 ** -7 * 8)
        torch.testing.assert_close(queue, queue_eager, rtol=0, atol=1e-5, equal_nan=True)


@cuda
def test_cuda_steps_of_several_layers_issue_no_sync():
    layers = [_decode_inputs(2, 8, 2, 3000, 128, torch.bfloat16, "cuda") for _ in range(4)]
    queues = [torch.full((2, 15), NAN, device="cuda") for _ in layers]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kvfix.kvsmooth_steps_([q for q, _, _ in layers], [k for _, k, _ in layers], [v for _, _, v in layers], queues)
    finally:
        torch.cuda.set_sync_debug_mode("default")
