"""The structured-DSCR CUDA kernels (csrc/kernels/dscr_lowrank.cuh) on the kvemu SIMT emulator.

Both passes run emulated; the small steps between them (Z3 = Lr Rr^T Z1, P = sum_a P_a) are done
here in float32 torch, as csrc/cuda/dscr_lowrank.cu does them with library GEMMs. The result is
compared with `kvfix.reference.dscr_refine_lowrank` in float64 on the same factors, and, for
float32, with the dense float64 reference (`kvfix.reference.dscr_refine`) within the plan's error
bound plus rounding. Intermediates and outputs are NaN-poisoned before every launch; strided
inputs, a broadcast or per-item depth, several factor chunks (pc + rd > 16), head dims above the
block width (D > 128 threads), grid rows longer than one staged segment (gw > 64) and in-place
use are covered. Shapes are small: the emulator runs every CUDA thread as a fiber.
"""
from __future__ import annotations


import pytest
import torch

from kvemu_fixtures import kvfix_reference, kvfix_structured

R = kvfix_reference()
PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)
S = kvfix_structured()


@pytest.fixture(scope="module")
def mod(emu):
    kvfix_structured(emu)  # its plans weigh the banded variant too: the planner's C++ from the emulator
    return emu.module("dscr_lowrank")


def _factors(gh, gw, depth, dtype, **kw):
    p = {**PARAMS, **kw}
    cd, cs = S._coefs(p["sigma_d"], p["sigma_s"], p["alpha"], p["beta"])
    rng = S._depth_range(depth)
    plan = S._plan(gh, gw, rng, cd, cs, dtype, "structured")
    return plan, S.dscr_factors(plan, depth, dtype=torch.float32, **p)


def _run(mod, x, f, gh, *, inplace=False):
    B, H, N, D = x.shape
    pc, rd = f.lc.shape[1], f.u.shape[2]
    nan = float("nan")
    z1 = torch.full((B, H, gh, pc, D), nan)
    pa = torch.full((B, H, gh, rd, D), nan)
    mod.dscr_lowrank(1, x, None, gh, f.rc, f.lc, f.u, f.cinv, z1, pa, None, None)
    assert torch.isfinite(z1).all() and torch.isfinite(pa).all(), "pass 1 left intermediates unwritten"
    z3 = (f.lr @ (f.rr.T @ z1.reshape(B, H, gh, pc * D))).reshape(B, H, gh, pc, D).contiguous()
    pd = pa.sum(2).contiguous()
    out = x if inplace else torch.full(x.shape, nan, dtype=x.dtype)
    mod.dscr_lowrank(2, x, out, gh, f.rc, f.lc, f.u, f.cinv, None, None, z3, pd)
    return out


def _kv(B, H, N, D, dtype, layout):
    if layout == "contiguous":
        return torch.randn(B, H, N, D).to(dtype)
    return torch.randn(B, N, H, D).to(dtype).transpose(1, 2)  # HF's [B, N, H, D] storage


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gh,gw,B,H,D,bd,layout", [
    (3, 5, 2, 2, 8, 2, "contiguous"),      # exact column axis (pc = 5) + depth: 2 factor chunks
    (4, 6, 1, 3, 130, 1, "bnhd"),           # D > 128 threads; strided input; broadcast depth
    (2, 70, 1, 1, 4, 1, "contiguous"),      # a row longer than one staged segment (64)
])
def test_kernels_match_lowrank_reference(mod, gh, gw, B, H, D, bd, layout, dtype):
    N = gh * gw
    depth = torch.rand(bd, N)
    plan, f = _factors(gh, gw, depth, dtype)
    x = _kv(B, H, N, D, dtype, layout)
    out = _run(mod, x, f, gh)
    assert out.dtype == dtype and torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    f64 = [t.double() for t in (f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)]
    want = R.dscr_refine_lowrank(x.double(), None, *f64)[0]
    scale = max(1.0, want.abs().max().item())
    assert (out.double() - want).abs().max().item() <= TOL[dtype] * scale
    if dtype == torch.float32:  # and the dense float64 reference (patch units), within the plan's bound
        coords = torch.stack(torch.meshgrid(torch.arange(gh, dtype=torch.float64) + 0.5,
                                            torch.arange(gw, dtype=torch.float64) + 0.5,
                                            indexing="ij"), -1).reshape(N, 2)
        dense = R.dscr_refine(x.double(), None, depth.double(), coords, **PARAMS)[0]
        err = (out.double() - dense).abs().max().item()
        assert err <= plan.bound * x.abs().max().item() + 2e-6 * scale


def test_in_place_and_keep_rule(mod):
    """out == x works (each thread reads its token before writing it); cinv == 0 keeps x exactly."""
    gh, gw, B, H, D = 3, 4, 1, 2, 16
    depth = torch.rand(1, gh * gw)
    _, f = _factors(gh, gw, depth, torch.float32)
    f.cinv[0, 5] = 0.0  # as for a token whose column sum is 0
    x = torch.randn(B, H, gh * gw, D)
    want = R.dscr_refine_lowrank(x.double(), None, *(t.double() for t in (f.lr, f.rr, f.lc, f.rc, f.u, f.cinv)))[0]
    x0 = x.clone()
    out = _run(mod, x, f, gh, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x[:, :, 5], x0[:, :, 5])
    torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-5)
