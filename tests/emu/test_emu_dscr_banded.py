"""The banded structured-DSCR CUDA kernels (csrc/kernels/dscr_banded.cuh) on the kvemu SIMT emulator.

The structure comes from the plan's own builder (kvfix/dscr_structured.py, `_banded`), in the
"values" depth mode (a node per distinct depth) and, forced per item, the "grid" mode (Lagrange
weights of p nodes), with the spatial band at the default units. The emulated call (prep kernel,
then one launch per group of tensors: `dscr_banded_run`, as csrc/cuda/dscr_banded.cu runs it) is
compared with
  - the same structure's weights applied in float64 (`banded_weights`): the kernel's arithmetic
    alone, within float32 rounding plus one rounding of the output dtype;
  - for float32, the dense float64 reference (`kvfix.reference.dscr_refine`, patch coordinates)
    within the plan's a-priori bound plus rounding;
  - the CPU banded op (`torch.ops.kvfix.dscr_refine_banded`, when the extension is built).
Covered: float32 / float16 / bfloat16 (16-bit inputs: float32 sums, bit for bit), strided
([B, N, H, D] storage) inputs, head dims that leave a partial column chunk, B > 1 with a
different depth (and mode) per item, a depth broadcast over the batch, 1 x N grids, a single
depth node, a node without tokens, N = 1, several layers (more tensors than one launch takes),
in place against out of place (bit-identical), the scratch in shared memory against the global
scratch with blocks looping over items, random fiber orders, and a structure with an
out-of-range index (NaN for that item, nothing read out of bounds). Outputs are NaN-poisoned
before every launch. Shapes are small: the emulator runs every CUDA thread as a fiber.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvemu_fixtures import kvfix_reference, kvfix_structured

R = kvfix_reference()
PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)
MAX_TENSORS = 16  # kDscrBandedMaxTensors


S = kvfix_structured()
CD, CS = S._coefs(PARAMS["sigma_d"], PARAMS["sigma_s"], PARAMS["alpha"], PARAMS["beta"])


@pytest.fixture(scope="module")
def mod(emu):
    kvfix_structured(emu)  # the planner's C++ (the depth structure) from the emulator's build
    return emu.module("dscr_banded")


def _structure(gh, gw, depth, dtype, grid_order=0):
    """(BandedStructure, info) of the banded variant for depth [Bd, N]; grid_order > 0 forces the
    "grid" depth mode of that order, "gauss" the Gaussian-node mode (several weights per token, T
    diagonal), on the items whose depths are all distinct (the others keep the plan's choice:
    "values" for the depths used here)."""
    orig = S._depth_structure

    def forced(d, cd, budget, spatial):
        if grid_order and torch.unique(d).numel() == d.numel():
            got = orig(d, cd, budget, spatial, mode=grid_order)
            assert got is not None
            return got
        return orig(d, cd, budget, spatial)

    S._depth_structure = forced
    try:
        st, info = S._banded(gh, gw, depth.double(), CD, CS, S._TOL[dtype])
    finally:
        S._depth_structure = orig
    assert st is not None, info
    return st, info


def _call(mod, st, pairs, *, smem_limit=1 << 30, max_blocks=0, seed=None):
    args = list(st.args()) + [smem_limit, max_blocks]
    for x, out in pairs:
        args += [x, out]
    kw = {} if seed is None else {"seed": seed}
    mod.dscr_banded(*args, **kw)


def _poisoned(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype)


def _kv(B, H, N, D, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(B, H, N, D, generator=g).to(dtype)
    return torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)  # HF's [B, N, H, D] storage


def _weights_ref(st, x):
    """(wt~^T x - 2 x) * cinv per item in float64 (cinv == 0: x), from the structure's weights."""
    B, N = x.shape[0], x.shape[2]
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(B):
        bd = 0 if st.tok.shape[0] == 1 else b
        W = S.banded_weights(st, bd)                        # [N, N], W[i, j]
        ci = st.cinv[bd].double()
        xb = x[b].double()                                  # [H, N, D]
        y = (torch.einsum("ij,hid->hjd", W, xb) - 2.0 * xb) * ci[None, :, None]
        out[b] = torch.where((ci == 0)[None, :, None], xb, y)
    return out


def _amp(st):
    """max_j (sum_i |wt~(i, j)| + 2) |cinv_j| over the items: the float32 sums' magnitude relative
    to the result's scale (the structure's rounding amplification)."""
    a = 1.0
    for bd in range(st.tok.shape[0]):
        W = S.banded_weights(st, bd)
        a = max(a, float(((W.abs().sum(0) + 2.0) * st.cinv[bd].double().abs()).max()))
    return a


# one rounding of the output (half an ulp at max|x|, doubled for safety), relative to max|x|
OUT_ROUND = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _tol(st, dtype, x):
    """Float32 arithmetic (at most ~2 sqrt(terms) ulps of the largest partial sum: 64 u32 amp,
    generous) plus one rounding of the output, times max|x|."""
    return (64 * 2.0 ** -24 * _amp(st) + OUT_ROUND[dtype]) * max(1.0, x.abs().max().item())


CASES = [
    # gh, gw, B, H, D, Bd, layout, depth kind, grid order
    (4, 5, 2, 2, 20, 2, "bnhd", "mixed", 6),        # item 0 grid (p = 6), item 1 values; D: 16 + 4 columns
    (3, 6, 1, 3, 16, 1, "contiguous", "levels", 0),  # values mode, a few surfaces
    (1, 12, 2, 1, 8, 1, "bnhd", "continuous", 8),   # a 1 x N grid; broadcast depth, grid p = 8
    (3, 4, 2, 2, 12, 1, "contiguous", "constant", 0),  # a single depth node
    (4, 6, 2, 2, 16, 2, "bnhd", "continuous", "gauss"),  # Gaussian depth nodes per item, T diagonal
]


def _depth(kind, Bd, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "levels":
        return torch.randint(0, 4, (Bd, N), generator=g).double() * 60.0
    if kind == "constant":
        return torch.full((Bd, N), 17.0, dtype=torch.float64)
    if kind == "continuous":
        return torch.rand(Bd, N, generator=g).double() * 255.0
    assert kind == "mixed" and Bd == 2
    return torch.stack([torch.rand(N, generator=g).double() * 255.0,
                        torch.randint(0, 3, (N,), generator=g).double() * 90.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gh,gw,B,H,D,Bd,layout,kind,order", CASES)
def test_matches_structure_and_dense_reference(mod, gh, gw, B, H, D, Bd, layout, kind, order, dtype):
    N = gh * gw
    depth = _depth(kind, Bd, N)
    st, info = _structure(gh, gw, depth, dtype, order)
    if kind == "mixed":
        assert st.cnt.tolist() == [order, 1]
    if order == "gauss":
        assert all(c > 1 for c in st.cnt.tolist()) and bool((st.row_ptr.diff() == 1).all())
    if kind == "constant":
        assert int(st.node_off[-1]) == 1
    x = _kv(B, H, N, D, dtype, layout)
    out = _poisoned(x)
    _call(mod, st, [(x, out)])
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    want = _weights_ref(st, x)
    err = (out.double() - want).abs().max().item()
    assert err <= _tol(st, dtype, x), (err, _tol(st, dtype, x))
    if dtype == torch.float32:  # the dense float64 reference, within the plan's bound
        coords = torch.stack(torch.meshgrid(torch.arange(gh, dtype=torch.float64) + 0.5,
                                            torch.arange(gw, dtype=torch.float64) + 0.5,
                                            indexing="ij"), -1).reshape(N, 2)
        dense = R.dscr_refine(x.double(), None, depth if Bd == B else depth.expand(B, N), coords, **PARAMS)[0]
        derr = (out.double() - dense).abs().max().item()
        assert derr <= info["bound"] * x.abs().max().item() + _tol(st, dtype, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs_accumulate_in_float32(mod, dtype):
    """float16 / bfloat16 inputs are converted to float32 and every sum stays in float32 until the
    one rounding of the output: bit for bit the float32 kernel on the same (exactly widened)
    values, rounded to the dtype."""
    gh, gw, B, H, D = 4, 5, 2, 2, 20
    depth = _depth("mixed", 2, gh * gw, seed=9)
    st, _ = _structure(gh, gw, depth, dtype, 6)
    x = _kv(B, H, gh * gw, D, dtype, "bnhd", seed=9) * 3.0
    out, out32 = _poisoned(x), torch.full(x.shape, float("nan"))
    _call(mod, st, [(x, out), (x.float(), out32)])
    assert torch.equal(out, out32.to(dtype))


def _cpu_op():
    try:
        import kvfix  # noqa: F401  (registers the ops)
        return torch.ops.kvfix.dscr_refine_banded.default
    except (ImportError, AttributeError, RuntimeError):
        return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_cpu_op(mod, dtype):
    op = _cpu_op()
    if op is None:
        pytest.skip("kvfix's extension is not built")
    gh, gw, B, H, D = 4, 5, 2, 2, 20
    depth = _depth("mixed", 2, gh * gw, seed=3)
    st, _ = _structure(gh, gw, depth, dtype, 6)
    k = _kv(B, H, gh * gw, D, dtype, "bnhd", seed=4)
    v = _kv(B, H, gh * gw, D, dtype, "contiguous", seed=5)
    ko, vo = _poisoned(k), _poisoned(v)
    _call(mod, st, [(k, ko), (v, vo)])
    kc, vc = op(k, v, *st.args())
    tol = (64 * 2.0 ** -24 * _amp(st) + 2 * OUT_ROUND[dtype])  # two float32 orders, each rounded once
    for got, cpu, x in ((ko, kc, k), (vo, vc, v)):
        assert (got.double() - cpu.double()).abs().max().item() <= tol * max(1.0, x.abs().max().item())


def test_layers_in_place_and_scratch_paths(mod):
    """A cache call: 9 layers of K and V (18 tensors: two launches), float32 and bfloat16 layers
    mixed (one launch per dtype run), strided and contiguous; refined in place equals out of
    place bit for bit, in shared-memory scratch and in global scratch with 3 blocks looping over
    the items."""
    gh, gw, B, H, D = 3, 4, 2, 2, 18
    N = gh * gw
    depth = _depth("mixed", 2, N, seed=7)
    st, _ = _structure(gh, gw, depth, torch.float32, 6)
    layers = []
    for l in range(9):
        dt = torch.bfloat16 if l in (3, 4) else torch.float32
        layers.append((_kv(B, H, N, D, dt, "bnhd" if l % 2 else "contiguous", seed=10 + 2 * l),
                       _kv(B, H, N, D, dt, "contiguous", seed=11 + 2 * l)))
    xs = [t for kv in layers for t in kv]
    assert len(xs) > MAX_TENSORS
    outs = [_poisoned(x) for x in xs]
    _call(mod, st, list(zip(xs, outs)))
    for x, o in zip(xs, outs):
        want = _weights_ref(st, x)
        assert (o.double() - want).abs().max().item() <= _tol(st, x.dtype, x)
    for kw in ({}, {"smem_limit": 0, "max_blocks": 3}):
        inplace = [x.clone() for x in xs]
        _call(mod, st, [(x, x) for x in inplace], **kw)
        for o, y in zip(outs, inplace):
            assert torch.equal(o, y), kw
    glob = [_poisoned(x) for x in xs]
    _call(mod, st, list(zip(xs, glob)), smem_limit=0, max_blocks=2)
    for o, y in zip(outs, glob):
        assert torch.equal(o, y)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_fiber_orders(mod, seed):
    """Random thread orders at every synchronisation point (barriers in the main kernel, warp
    syncs in the prep kernel's placement): the same bits as thread order, in place."""
    gh, gw, B, H, D = 3, 5, 2, 1, 20
    depth = _depth("mixed", 2, gh * gw, seed=seed)
    st, _ = _structure(gh, gw, depth, torch.float32, 8)
    x = _kv(B, H, gh * gw, D, torch.float32, "bnhd", seed=seed)
    ref = _poisoned(x)
    _call(mod, st, [(x, ref)], seed=0)
    y = x.clone()
    _call(mod, st, [(y, y)], smem_limit=0, max_blocks=2, seed=seed)
    assert torch.equal(y, ref)


def test_single_token_keeps_its_key(mod):
    """N = 1 (cinv = 0): the token keeps its key exactly (METHODS §1), any dtype."""
    st = S.BandedStructure(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1, 1), torch.ones(1, dtype=torch.int32),
                           torch.tensor([0, 1]), torch.zeros(1, dtype=torch.int32), torch.ones(1),
                           torch.tensor([0, 1]), torch.zeros(1, 1), torch.ones(1), 1)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = _kv(2, 3, 1, 5, dt, "bnhd")
        out = _poisoned(x)
        _call(mod, st, [(x, out)])
        assert torch.equal(out, x)


def test_node_without_tokens(mod):
    """A hand-made "values" structure whose middle node has no token (the plan never builds one:
    a node per present depth value): its node sum is 0, not left over scratch."""
    st = S.BandedStructure(torch.tensor([[0, 0, 2, 2, 0, 2]], dtype=torch.int32), torch.ones(1, 6, 1),
                           torch.ones(1, dtype=torch.int32), torch.tensor([0, 3, 6, 9]),
                           torch.zeros(3, dtype=torch.int32),
                           torch.tensor([1.0, 0.5, 0.2, 0.5, 1.0, 0.5, 0.2, 0.5, 1.0]), torch.tensor([0, 3]),
                           torch.full((1, 6), 0.25), torch.tensor([1.0, 0.3]), 2)
    x = _kv(1, 2, 6, 20, torch.float32, "bnhd")
    out = _poisoned(x)
    _call(mod, st, [(x, out)])
    assert (out.double() - _weights_ref(st, x)).abs().max().item() <= _tol(st, torch.float32, x)


def test_out_of_range_structure_gives_nan_for_its_item(mod):
    """An index out of range (a token's node past its item's nodes) is caught on the device:
    that item's outputs are NaN, the other item's are refined, nothing is read out of bounds
    (the ASan run)."""
    gh, gw, B, H, D = 2, 3, 2, 1, 4
    N = gh * gw
    st, _ = _structure(gh, gw, _depth("levels", 2, N, seed=2), torch.float32)
    x = _kv(B, H, N, D, torch.float32, "contiguous")
    good = _poisoned(x)
    _call(mod, st, [(x, good)])
    g1 = int(st.node_off[2] - st.node_off[1])
    for field, value in (("tok", g1), ("row_lo", g1), ("cnt", 2)):
        bad = S.BandedStructure(*[t.clone() if isinstance(t, torch.Tensor) else t for t in st.args()])
        t = getattr(bad, field)
        if field == "tok":
            t[1, 0] = value
        elif field == "row_lo":
            t[int(st.node_off[1])] = value
        else:
            t[1] = value
        out = _poisoned(x)
        _call(mod, bad, [(x, out)])
        assert torch.equal(out[0], good[0]), field
        assert torch.isnan(out[1]).all(), field
