"""DSCR (METHODS §1): reference on hand-computed cases, kernels against the reference, bad input."""
import math

import pytest
import torch

import kvfix
from kvfix import reference as R

LN2 = math.log(2.0)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in kvfix.build_info()["devices"] else [])


# ---------------------------------------------------------------------------------------------
# the reference, by hand

def _hand_case_expected():
    # wt = 1 + 2^-(dd^2) for tokens at distance 0, 1, 2 along one axis:
    # pairs (0,1) and (1,2): 1.5, pair (0,2): 1.0625.
    return torch.tensor([(1.5 * 2 + 1.0625 * 4) / 2.5625, 0.5 * 1 + 0.5 * 4, (1.0625 * 1 + 1.5 * 2) / 2.5625],
                        dtype=torch.float64)


def test_reference_hand_computed_depth_term():
    k = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 3, 1)
    depth = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    coords = torch.zeros(3, 2, dtype=torch.float64)  # beta=0 makes the spatial term 1 anyway
    k_hat, v_hat = R.dscr_refine(k, None, depth, coords, sigma_d=1.0, alpha=2 * LN2, sigma_s=1.0, beta=0.0)
    assert v_hat is None
    torch.testing.assert_close(k_hat.flatten(), _hand_case_expected(), rtol=0, atol=1e-12)


def test_reference_hand_computed_space_term():
    k = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 3, 1)
    v = -k
    depth = torch.zeros(3, dtype=torch.float64)  # depth term exp(0) = 1
    coords = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    k_hat, v_hat = R.dscr_refine(k, v, depth, coords, sigma_s=1.0, beta=2 * LN2, sigma_d=0.6, alpha=0.6)
    torch.testing.assert_close(k_hat.flatten(), _hand_case_expected(), rtol=0, atol=1e-12)
    torch.testing.assert_close(v_hat.flatten(), -_hand_case_expected(), rtol=0, atol=1e-12)


def test_reference_hand_computed_default_units():
    """The default units (METHODS §1): patch coordinates 1 apart, depth levels in [0, 255]. Tokens 0
    and 1 share a surface (depth 0), token 2 is 255 levels away: its depth term exp(-cd 255^2)
    is below the cut-off (0), so only the spatial term links it. cs = 0.8 / 0.72 = 10 / 9."""
    e1, e4 = math.exp(-10 / 9), math.exp(-40 / 9)
    depth = torch.tensor([0.0, 0.0, 255.0], dtype=torch.float64)
    coords = kvfix.patch_coords(1, 3, dtype=torch.float64)  # (0.5, 0.5), (0.5, 1.5), (0.5, 2.5)
    w = R.dscr_weights(depth, coords)[0]
    expected = torch.tensor([[0, (1 + e1) / (1 + 2 * e1), e4 / (e4 + e1)],
                             [(1 + e1) / (1 + e1 + e4), 0, e1 / (e4 + e1)],
                             [e4 / (1 + e1 + e4), e1 / (1 + 2 * e1), 0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)
    # token 0 draws 99.1% of its weight from its own surface (token 1); with [0, 1] depth in the
    # unit square (the earlier units) the same scene is nearly flat: every weight within [0.3, 0.7].
    assert float(w[1, 0]) == pytest.approx(0.9912, abs=1e-4)
    old = R.dscr_weights(depth / 255, kvfix.patch_coords(1, 3, unit="unit_square", dtype=torch.float64))[0]
    off = old[~torch.eye(3, dtype=torch.bool)]
    assert float(off.min()) > 0.3 and float(off.max()) < 0.7


def test_reference_weights_columns_sum_to_one_and_diagonal_zero():
    w = R.dscr_weights(torch.rand(9, dtype=torch.float64), torch.rand(9, 2, dtype=torch.float64))
    torch.testing.assert_close(w.sum(dim=1), torch.ones(1, 9, dtype=torch.float64))
    assert torch.all(torch.diagonal(w, dim1=1, dim2=2) == 0)


# ---------------------------------------------------------------------------------------------
# kernels vs reference

def _inputs(B, H, N, D, dtype, device="cpu", *, broadcast=False):
    k = torch.randn(B, H, N, D, device=device).to(dtype)
    v = torch.randn(B, H, N, D, device=device).to(dtype)
    if broadcast:
        depth, coords = torch.rand(N, device=device), torch.rand(N, 2, device=device)
    else:
        depth, coords = torch.rand(B, N, device=device), torch.rand(B, N, 2, device=device)
    return k, v, depth, coords


def _ground_truth(k, v, depth, coords, **kw):
    f = lambda x: None if x is None else x.double()  # noqa: E731
    return R.dscr_refine(f(k), f(v), depth.double(), coords.double(), **kw)


def assert_close_to_reference(out, x, truth, depth, coords, *, which, **kw):
    """flash-attention rule: the kernel's error vs float64 is at most 2x the error of the
    PyTorch reference run in the same precision (plus a slack far below that error)."""
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = (out.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    ref_lp = R.dscr_refine(x, None, depth.to(x.dtype), coords.to(x.dtype), **kw)[0]
    ref_err = (ref_lp.double() - truth).abs().max().item()
    slack = (1e-7 if x.dtype == torch.float32 else 1e-5) * scale
    assert err <= 2 * ref_err + slack, f"{which}: {x.dtype} error {err} vs the reference's {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("N", [1, 2, 7, 64, 577])
@pytest.mark.parametrize("B,H", [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_kernel_matches_reference(B, H, N, D, dtype, device):
    k, v, depth, coords = _inputs(B, H, N, D, dtype, device)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords)
    tk, tv = _ground_truth(k, v, depth, coords)
    assert_close_to_reference(k_hat, k, tk, depth, coords, which="k")
    assert_close_to_reference(v_hat, v, tv, depth, coords, which="v")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gh,gw,broadcast", [(24, 24, True), (7, 9, False)])
def test_kernel_matches_reference_at_default_units(gh, gw, broadcast, dtype, device):
    """The default units make most depth terms underflow (a few levels apart: exponent below
    -87) and the spatial term local: the dense kernel still equals the reference. Depth levels
    are whole numbers (an 8-bit depth image), exact in every dtype, so the low-precision
    reference in the tolerance rule sees the same geometry."""
    B, H, N, D = 2, 2, gh * gw, 32
    g = torch.Generator().manual_seed(gh)
    maps = torch.rand(B, 2 * gh, 3 * gw, generator=g).cumsum(1)  # depth grows down the image, noisy
    depth = kvfix.patch_depth(maps, gh, gw).round().to(device)
    depth = depth[0] if broadcast else depth
    coords = kvfix.patch_coords(gh, gw, device=device)
    k = torch.randn(B, H, N, D, device=device).to(dtype)
    v = torch.randn(B, H, N, D, device=device).to(dtype)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords)
    tk, tv = _ground_truth(k, v, depth, coords)
    assert_close_to_reference(k_hat, k, tk, depth, coords, which="k")
    assert_close_to_reference(v_hat, v, tv, depth, coords, which="v")
    # grid form: the same coords (method="dense": "auto" runs the banded structured variant here)
    assert torch.equal(kvfix.dscr_refine(k, v, depth, (gh, gw), method="dense")[0], k_hat)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cache_slices_with_strides(dtype, device):
    B, H, T, D, s, N = 2, 3, 50, 64, 9, 24
    cache_k = torch.randn(B, H, T, D, device=device).to(dtype)  # [B, H, T, D] cache: slice of T
    cache_v = torch.randn(B, T, H, D, device=device).to(dtype).transpose(1, 2)  # [B, T, H, D] layout
    k, v = cache_k[:, :, s:s + N], cache_v[:, :, s:s + N]
    assert not k.is_contiguous() and not v.is_contiguous()
    depth, coords = torch.rand(B, N, device=device), torch.rand(B, N, 2, device=device)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords)
    tk, tv = _ground_truth(k, v, depth, coords)
    assert_close_to_reference(k_hat, k, tk, depth, coords, which="k")
    assert_close_to_reference(v_hat, v, tv, depth, coords, which="v")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth_b,coords_b", [(False, False), (True, False), (False, True)])
def test_broadcast_depth_coords(depth_b, coords_b, device):
    B, H, N, D = 3, 2, 33, 16
    k, v, _, _ = _inputs(B, H, N, D, torch.float32, device)
    depth = torch.rand(B, N, device=device) if depth_b else torch.rand(N, device=device)
    coords = torch.rand(B, N, 2, device=device) if coords_b else torch.rand(N, 2, device=device)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords)
    tk, tv = _ground_truth(k, v, depth, coords)
    torch.testing.assert_close(k_hat.double(), tk, rtol=0, atol=2e-5)
    torch.testing.assert_close(v_hat.double(), tv, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_only(dtype, device):
    k, _, depth, coords = _inputs(2, 4, 40, 64, dtype, device)
    k_hat, v_hat = kvfix.dscr_refine(k, None, depth, coords)
    assert v_hat is None
    assert_close_to_reference(k_hat, k, _ground_truth(k, None, depth, coords)[0], depth, coords, which="k")


@pytest.mark.parametrize("params", [dict(sigma_d=0.1, sigma_s=2.0, alpha=1.0, beta=0.0),
                                    dict(sigma_d=3.0, sigma_s=0.05, alpha=0.0, beta=2.0)])
def test_non_default_parameters(params):
    k, v, depth, coords = _inputs(1, 2, 50, 16, torch.float32)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords, **params)
    tk, tv = _ground_truth(k, v, depth, coords, **params)
    torch.testing.assert_close(k_hat.double(), tk, rtol=0, atol=2e-5)
    torch.testing.assert_close(v_hat.double(), tv, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_single_token_keeps_the_token(device):
    k, v, _, _ = _inputs(1, 2, 1, 16, torch.float32, device)
    k_hat, v_hat = kvfix.dscr_refine(k, v, torch.rand(1, device=device), torch.rand(1, 2, device=device))
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("exponent,kept", [(-80.0, False), (-95.0, True), (-300.0, True), (-1e5, True)])
def test_underflow_cutoff_is_the_same_everywhere(exponent, kept, dtype, device):
    """Two tokens whose both proximity terms are exp(exponent): above the shared cut-off
    (reference.DSCR_EXP_CUTOFF = -87) each takes the other's key (N == 2, normalised weight 1);
    below it c_j == 0 and each keeps its own -- in the float64 reference and every kernel."""
    cd, cs = 0.6 / (2 * 0.6 ** 2), 0.8 / (2 * 0.6 ** 2)  # default coefficients
    depth = torch.tensor([0.0, math.sqrt(-exponent / cd)], device=device)
    coords = torch.tensor([[0.0, 0.0], [math.sqrt(-exponent / cs), 0.0]], device=device)
    k, v, _, _ = _inputs(1, 2, 2, 16, dtype, device)
    expected_k = k if kept else k.flip(2)
    k_hat, v_hat = kvfix.dscr_refine(k, v, depth, coords)
    torch.testing.assert_close(k_hat, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_hat, v if kept else v.flip(2), rtol=0, atol=0)
    tk, _ = _ground_truth(k, v, depth, coords)
    torch.testing.assert_close(tk, expected_k.double(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for shape in [(1, 2, 0, 16), (0, 2, 5, 16), (1, 0, 5, 16)]:
        k = torch.randn(shape, device=device)
        N = shape[2]
        k_hat, v_hat = kvfix.dscr_refine(k, k.clone(), torch.rand(N, device=device), torch.rand(N, 2, device=device))
        assert k_hat.shape == k.shape and v_hat.shape == k.shape


def test_does_not_modify_inputs():
    k, v, depth, coords = _inputs(2, 2, 20, 16, torch.float32)
    copies = [t.clone() for t in (k, v, depth, coords)]
    kvfix.dscr_refine(k, v, depth, coords)
    for a, b in zip((k, v, depth, coords), copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the multi-layer in-place entry point

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keys_only", [False, True])
def test_cache_inplace_matches_out_of_place(keys_only, device):
    L, B, H, T, D, s, N = 3, 2, 2, 40, 32, 5, 30
    ks = [torch.randn(B, H, T, D, device=device) for _ in range(L)]
    vs = [torch.randn(B, H, T, D, device=device) for _ in range(L)]
    depth, coords = torch.rand(B, N, device=device), torch.rand(B, N, 2, device=device)
    expected = [kvfix.dscr_refine(k[:, :, s:s + N], v[:, :, s:s + N], depth, coords) for k, v in zip(ks, vs)]
    before = [(k.clone(), v.clone()) for k, v in zip(ks, vs)]
    kvfix.dscr_refine_cache_([k[:, :, s:s + N] for k in ks], None if keys_only else [v[:, :, s:s + N] for v in vs],
                             depth, coords)
    for (k, v), (k0, v0), (ek, ev) in zip(zip(ks, vs), before, expected):
        torch.testing.assert_close(k[:, :, s:s + N], ek, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[:, :, s:s + N], v0[:, :, s:s + N] if keys_only else ev, rtol=0, atol=1e-6)
        # Outside the image span nothing changes.
        assert torch.equal(k[:, :, :s], k0[:, :, :s]) and torch.equal(k[:, :, s + N:], k0[:, :, s + N:])
        assert torch.equal(v[:, :, :s], v0[:, :, :s]) and torch.equal(v[:, :, s + N:], v0[:, :, s + N:])


def test_cache_inplace_several_groups():
    # 4 layers of K and V at the LLaVA-1.5 shape are 75 MB: more than one 64 MiB source group.
    L, B, H, N, D = 4, 1, 32, 576, 128
    ks = [torch.randn(B, H, N, D) for _ in range(L)]
    vs = [torch.randn(B, H, N, D) for _ in range(L)]
    depth, coords = torch.rand(N), kvfix.patch_coords(24, 24)
    expected = [kvfix.dscr_refine(k, v, depth, coords) for k, v in zip(ks, vs)]
    kvfix.dscr_refine_cache_(ks, vs, depth, coords)
    for k, v, (ek, ev) in zip(ks, vs, expected):
        torch.testing.assert_close(k, ek, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, ev, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written

def _ok():
    k, v, depth, coords = _inputs(2, 2, 6, 16, torch.float32)
    return dict(k=k, v=v, depth=depth, coords=coords)


@pytest.mark.parametrize("change,exc,match", [
    (dict(k=torch.randn(2, 6, 16)), ValueError, "k must be"),
    (dict(k=torch.randn(2, 2, 6, 16, dtype=torch.float64)), TypeError, "k must be float32"),
    (dict(k=torch.randint(0, 3, (2, 2, 6, 16))), TypeError, "k must be float32"),
    (dict(k=[1.0]), TypeError, "k must be a torch.Tensor"),
    (dict(v=torch.randn(2, 2, 5, 16)), ValueError, "v shape"),
    (dict(v=torch.randn(2, 2, 6, 16, dtype=torch.float16)), TypeError, "v dtype"),
    (dict(v=torch.randn(2, 2, 6, 16, device="meta")), ValueError, "v is on meta"),
    (dict(v=torch.randn(2, 2, 16, 6).transpose(-1, -2)), ValueError, "v needs a contiguous last"),
    (dict(depth=torch.rand(5)), ValueError, "depth must be"),
    (dict(depth=torch.rand(3, 6)), ValueError, "depth must be"),
    (dict(depth=torch.randint(0, 3, (6,))), TypeError, "depth must be a floating"),
    (dict(depth=torch.rand(6, device="meta")), ValueError, "depth is on meta"),
    (dict(coords=torch.rand(6, 3)), ValueError, "coords must be"),
    (dict(depth=torch.tensor([0.1, 0.2, float("nan"), 0.3, 0.4, 0.5])), ValueError, "depth has non-finite"),
    (dict(coords=torch.full((6, 2), float("inf"))), ValueError, "coords has non-finite"),
    (dict(sigma_d=0.0), ValueError, "sigma_d must be"),
    (dict(sigma_s=-1.0), ValueError, "sigma_s must be"),
    (dict(sigma_d=float("nan")), ValueError, "sigma_d must be"),
    (dict(sigma_d=1e-20), ValueError, "sigma_d=1e-20 is too small"),
    (dict(sigma_s=1e-200, beta=0.0), ValueError, "sigma_s=1e-200 is too small"),
    (dict(alpha=-0.1), ValueError, "alpha must be"),
    (dict(beta="0.8"), TypeError, "beta must be a real"),
])
def test_bad_input_raises_naming_the_argument(change, exc, match):
    args = _ok()
    args.update(change)
    kw = {n: args.pop(n) for n in ("sigma_d", "sigma_s", "alpha", "beta") if n in args}
    with pytest.raises(exc, match=match):
        kvfix.dscr_refine(args["k"], args["v"], args["depth"], args["coords"], **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["depth", "coords", "sigma", "layer_shape", "values_len", "values_empty",
                                 "values_dtype"])
def test_cache_bad_input_writes_nothing(bad, device):
    ks = [torch.randn(1, 2, 6, 16, device=device) for _ in range(3)]
    vs = [torch.randn(1, 2, 6, 16, device=device) for _ in range(3)]
    depth, coords, kw = torch.rand(6, device=device), torch.rand(6, 2, device=device), {}
    if bad == "depth":
        depth[3] = float("nan")
    elif bad == "coords":
        coords[0, 1] = float("-inf")
    elif bad == "sigma":
        kw = dict(sigma_s=0.0)
    elif bad == "layer_shape":
        ks[2] = torch.randn(1, 2, 5, 16)
    elif bad == "values_len":
        vs = vs[:2]
    elif bad == "values_dtype":
        vs[1] = vs[1].half()
    if device == "cuda" and bad in ("depth", "coords"):
        pytest.skip("CUDA reads nothing on the host: it writes the item nan (test_cuda_nonfinite_geometry_...)")
    before = [t.clone() for t in ks + vs]
    match = {"values_len": "values has 2 tensors", "values_empty": "values has 0 tensors",
             "values_dtype": r"values\[1\] .* does not match keys\[1\]"}.get(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        kvfix.dscr_refine_cache_(ks, [] if bad == "values_empty" else vs, depth, coords, **kw)
    for a, b in zip(ks + vs, before):
        assert torch.equal(a, b)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and kvfix's CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,bad", [("depth", float("nan")), ("depth", -math.inf), ("coords", math.inf)], ids=str)
@pytest.mark.parametrize("broadcast", [False, True])
def test_cuda_nonfinite_geometry_writes_the_item_nan(broadcast, where, bad, dtype):
    """Issue 18: the CUDA ops read nothing on the host (no sync per image), so non-finite depth or
    coords cannot raise there (the CPU op does: test_bad_input_raises_naming_the_argument). The
    kernel writes nan over every output of an item whose geometry is not finite (K and V, every
    head; in place: the item's span in every layer) and refines the other items as usual, bit for
    bit as with finite geometry. Broadcast geometry: every item is nan."""
    B, H, N, D, L, s, T = 3, 2, 70, 64, 2, 5, 80
    ks = [torch.randn(B, H, T, D, device="cuda").to(dtype) for _ in range(L)]
    vs = [torch.randn(B, H, T, D, device="cuda").to(dtype) for _ in range(L)]
    _, _, depth, coords = _inputs(B, H, N, D, dtype, "cuda", broadcast=broadcast)
    bad_depth, bad_coords = depth.clone(), coords.clone()
    if where == "depth":
        bad_depth[..., N - 1] = bad
    else:
        bad_coords[..., 0, 1] = bad
    if not broadcast:  # item 1 keeps finite geometry
        bad_depth[1], bad_coords[1] = depth[1], coords[1]
    nan_items = list(range(B)) if broadcast else [0, 2]
    ok_items = [] if broadcast else [1]
    span = slice(s, s + N)
    want = [kvfix.dscr_refine(k[:, :, span], v[:, :, span], depth, coords) for k, v in zip(ks, vs)]
    got = [kvfix.dscr_refine(k[:, :, span], v[:, :, span], bad_depth, bad_coords) for k, v in zip(ks, vs)]
    for (gk, gv), (wk, wv) in zip(got, want):
        for out, ref in ((gk, wk), (gv, wv)):
            assert out[nan_items].isnan().all()
            assert torch.equal(out[ok_items], ref[ok_items])
    for keys_only in (False, True):
        kc, vc = [k.clone() for k in ks], [v.clone() for v in vs]
        kvfix.dscr_refine_cache_([k[:, :, span] for k in kc], None if keys_only else [v[:, :, span] for v in vc],
                                 bad_depth, bad_coords)
        for k0, v0, k, v, (wk, wv) in zip(ks, vs, kc, vc, want):
            assert torch.equal(k[:, :, :s], k0[:, :, :s]) and torch.equal(k[:, :, s + N:], k0[:, :, s + N:])
            assert k[nan_items][:, :, span].isnan().all()
            assert torch.equal(k[ok_items][:, :, span], wk[ok_items])
            if keys_only:
                assert torch.equal(v, v0)
            else:
                assert torch.equal(v[:, :, :s], v0[:, :, :s]) and torch.equal(v[:, :, s + N:], v0[:, :, s + N:])
                assert v[nan_items][:, :, span].isnan().all()
                assert torch.equal(v[ok_items][:, :, span], wv[ok_items])


# ---------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile

def test_opcheck():
    k, v, depth, coords = _inputs(2, 2, 9, 16, torch.float32)
    d, c = depth.contiguous(), coords.contiguous()
    torch.library.opcheck(torch.ops.kvfix.dscr_refine.default, (k, v, d, c, 0.6, 0.6, 0.6, 0.8))
    torch.library.opcheck(torch.ops.kvfix.dscr_refine.default, (k, None, d[:1], c[:1], 0.5, 0.7, 0.6, 0.8))
    ks = [torch.randn(2, 2, 9, 16) for _ in range(2)]
    vs = [torch.randn(2, 2, 9, 16) for _ in range(2)]
    torch.library.opcheck(torch.ops.kvfix.dscr_refine_cache_.default, (ks, vs, d, c, 0.6, 0.6, 0.6, 0.8))


def test_cpp_checks_are_the_checks():
    """The dense ops' checks are the C++ ones (the wrappers only convert arguments): direct
    torch.ops calls and meta tensors (the Meta kernels) get the same errors."""
    k, v, depth, coords = _inputs(2, 2, 9, 16, torch.float32)
    d, c = depth.contiguous(), coords.contiguous()
    op, cache_op = torch.ops.kvfix.dscr_refine.default, torch.ops.kvfix.dscr_refine_cache_.default
    for dev in ("cpu", "meta"):
        kd, vd, dd, cd = (x.to(dev) for x in (k, v, d, c))
        with pytest.raises(ValueError, match="dscr_refine: v shape"):
            op(kd, vd[:, :1], dd, cd, 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(TypeError, match="k must be float32"):
            op(kd.double(), None, dd, cd, 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(TypeError, match="depth must be a floating"):
            op(kd, None, dd.double(), cd, 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(ValueError, match="coords must be"):
            op(kd, None, dd, cd[:, :, :1].contiguous(), 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(ValueError, match="sigma_d=1e-20 is too small"):
            op(kd, None, dd, cd, 1e-20, 0.6, 0.6, 0.8)
        with pytest.raises(ValueError, match="keys must be a non-empty"):
            cache_op([], [], dd, cd, 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(ValueError, match=r"keys\[1\] has shape"):
            cache_op([kd, kd[:, :, :4].clone()], [], dd, cd, 0.6, 0.6, 0.6, 0.8)
        with pytest.raises(ValueError, match="values has 1 tensors but keys has 2"):
            cache_op([kd, kd.clone()], [vd], dd, cd, 0.6, 0.6, 0.6, 0.8)
    # the Meta kernel: outputs of the right shape, nothing read
    outs = op(k.to("meta"), v.to("meta"), d.to("meta"), c.to("meta"), 0.6, 0.6, 0.6, 0.8)
    assert [tuple(o.shape) for o in outs] == [tuple(k.shape), tuple(v.shape)] and outs[0].device.type == "meta"
    # non-finite depth: the CPU kernel reads it once (no check on meta tensors, nothing to read)
    with pytest.raises(ValueError, match="dscr_refine: depth has non-finite"):
        op(k, None, d.clone().fill_(float("nan")), c, 0.6, 0.6, 0.6, 0.8)


def test_torch_compile_fullgraph():
    k, v, depth, coords = _inputs(1, 2, 12, 16, torch.float32)

    def f(k, v, depth, coords):
        k_hat, v_hat = kvfix.dscr_refine(k * 2, v, depth, coords, sigma_d=0.5)
        return k_hat + 1, v_hat

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got_k, got_v = compiled(k, v, depth, coords)
    exp_k, exp_v = f(k, v, depth, coords)
    torch.testing.assert_close(got_k, exp_k)
    torch.testing.assert_close(got_v, exp_v)


def test_build_info():
    info = kvfix.build_info()
    assert "cpu" in info["devices"]
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_available"], bool)
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("kvfix::dscr_refine", "CUDA")
    assert has_cuda_kernel == ("cuda" in info["devices"])
    if has_cuda_kernel:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    with open(kvfix._C.__file__, "rb") as f:
        lib = f.read()
    if b"arch_x86_64_v3" in lib:  # a build with x86-64 target clones (GCC): the AVX-512 one as reported
        assert ("x86-64-v4" in info["cpu_clones"]) == (b"arch_x86_64_v4" in lib)
