"""Shared pieces of the DSCR benchmarks: shapes, inputs, the three timed variants, errors, memory.

Variants, all producing the refined keys and values of one layer:
- "reference": `kvfix.reference.dscr_refine` in the input dtype (eager PyTorch, full N x N
  weights; float32 for fp32 rows, bf16/fp16 arithmetic for those rows).
- "kvfix": `kvfix.dscr_refine` (the compiled op).
- "floor": the bare GEMMs `torch.matmul(W, K)` and `torch.matmul(W, V)` with a precomputed
  N x N matrix W in the input dtype: the work no dense implementation can skip. W holds random
  positive values of the size of the real weights (~1/N); GEMM speed does not depend on them.
- "mm_floor": the same products as one `torch.mm(W, K[b, h])` per batch item and head, into a
  preallocated [B, H, N, D] output. For bf16/fp16, `torch.matmul(W, K)` with a 2-D W and a 4-D
  K materialises W expanded over the heads (H x N^2 elements, see its peak memory) and runs a
  slower batched path, so this is the tighter floor there; for fp32 the two agree.

Errors are measured against `kvfix.reference.dscr_refine` in float64. Where the full float64
reference is too large (N = 16384), it is evaluated on a subset of output tokens from the
reference weights of those columns only (`reference_columns_f64`, checked against the full
reference by `check_reference_columns`).
"""
from __future__ import annotations

import dataclasses
import gc
import os
import re

import torch

import kvfix
import kvfix.reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# SPEC §1 defaults
PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    gh: int
    gw: int
    D: int
    dtypes: tuple
    ref_skip: str | None = None   # why the eager reference is not run (None: it is)
    err_cols: int | None = None   # float64 error on this many output tokens (None: all)

    @property
    def N(self) -> int:
        return self.gh * self.gw

    @property
    def label(self) -> str:
        return f"{self.name} B={self.B} H={self.H} N={self.N} D={self.D}"


FULL_SHAPES = [
    Shape("LLaVA-1.5", 1, 32, 24, 24, 128, ("fp32", "bf16", "fp16")),
    Shape("Qwen2-VL-7B-like", 1, 4, 32, 32, 128, ("fp32", "bf16")),
    Shape("N=4096", 1, 4, 64, 64, 128, ("fp32", "bf16")),
    Shape("N=16384", 1, 4, 128, 128, 128, ("fp32", "bf16"),
          ref_skip="eager reference materialises N x N matrices", err_cols=512),
]

QUICK_SHAPES = [
    Shape("tiny", 2, 2, 6, 8, 16, ("fp32", "bf16", "fp16")),
    Shape("small", 1, 3, 10, 10, 32, ("fp32", "bf16")),
    Shape("skip-path", 1, 2, 16, 16, 16, ("fp32", "bf16"),
          ref_skip="quick: exercises the no-reference path", err_cols=32),
]


def threads() -> int:
    """The cores this process may run on (the machine's, unless restricted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# inputs

def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0, floor: bool = True) -> dict:
    """k, v ~ N(0, 1) [B, H, N, D]; depth: a smooth random depth map pooled to the grid
    (`kvfix.patch_depth`, scaled to [0, 1]: a depth range the structured algorithm serves; at
    the default [0, 255] the plan runs dense, docs/DSCR_UNITS.md); coords: `kvfix.patch_coords`
    (patch units); W: the floor's N x N matrix."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    k = torch.randn(B, H, N, D, generator=g).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    coarse = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
    dmap = torch.nn.functional.interpolate(coarse, size=(4 * shape.gh, 4 * shape.gw), mode="bicubic",
                                           align_corners=True)[0, 0]
    dmap = dmap + 0.02 * torch.rand(dmap.shape, generator=g, dtype=torch.float64)
    depth = kvfix.patch_depth(dmap, shape.gh, shape.gw, scale=1.0)
    coords = kvfix.patch_coords(shape.gh, shape.gw)
    out = dict(k=k, v=v, depth=depth, coords=coords)
    if floor:
        out["W"] = (torch.rand(N, N, generator=g) * (2.0 / N)).to(dtype)
    return out


def variant_fns(inp: dict, with_reference: bool = True) -> dict:
    """name -> zero-argument callable returning the outputs (tuple of tensors)."""
    k, v, depth, coords = inp["k"], inp["v"], inp["depth"], inp["coords"]
    fns = {}
    if with_reference:
        dr, cr = depth.to(k.dtype), coords.to(k.dtype)
        fns["reference"] = lambda: kvfix.reference.dscr_refine(k, v, dr, cr, **PARAMS)
    fns["kvfix"] = lambda: kvfix.dscr_refine(k, v, depth, coords, **PARAMS)
    if "W" in inp:
        W = inp["W"]
        fns["floor"] = lambda: (torch.matmul(W, k), torch.matmul(W, v))

        def mm_floor():
            outs = (torch.empty_like(k, memory_format=torch.contiguous_format),
                    torch.empty_like(v, memory_format=torch.contiguous_format))
            for x, y in zip((k, v), outs):
                for b in range(x.shape[0]):
                    for h in range(x.shape[1]):
                        torch.mm(W, x[b, h], out=y[b, h])
            return outs

        fns["mm_floor"] = mm_floor
    return fns


# --------------------------------------------------------------------------------------------
# float64 ground truth

def reference_columns_f64(k, v, depth, coords, cols: torch.Tensor, *, sigma_d=0.6, sigma_s=0.6,
                          alpha=0.6, beta=0.8):
    """SPEC §1 in float64 for the output tokens `cols` only: (k_hat[..., cols, :], v_hat[..., cols, :]).

    Column j of the weights needs only wt[:, j] and its sum c_j, so an N x |cols| block is
    enough. depth [N] and coords [N, 2] (shared by the batch), as the benchmarks use them.
    """
    d = depth.to(torch.float64)
    s = coords.to(torch.float64)
    dd = (d[:, None] - d[None, cols]) ** 2                                  # [N, J]
    ss = ((s[:, None, :] - s[None, cols, :]) ** 2).sum(-1)                 # [N, J]
    wt = torch.exp(-alpha * dd / (2 * sigma_d ** 2)) + torch.exp(-beta * ss / (2 * sigma_s ** 2))
    wt[cols, torch.arange(cols.numel())] = 0.0                             # diagonal mask
    c = wt.sum(dim=0)                                                      # [J]
    keep = c == 0
    w = wt / torch.where(keep, torch.ones_like(c), c)

    def apply(x):
        x64 = x.to(torch.float64)
        y = torch.einsum("ij,bhid->bhjd", w, x64)
        return torch.where(keep[None, None, :, None], x64[:, :, cols], y)

    return apply(k), apply(v)


def check_reference_columns(seed: int = 1) -> float:
    """Max |reference_columns_f64 - kvfix.reference.dscr_refine (float64)| on a small case."""
    shape = Shape("check", 2, 3, 9, 11, 8, ("fp32",))
    inp = make_inputs(shape, torch.float64, seed=seed, floor=False)
    full_k, full_v = kvfix.reference.dscr_refine(inp["k"], inp["v"], inp["depth"].double(),
                                                 inp["coords"].double(), **PARAMS)
    cols = torch.tensor([0, 5, 17, 50, 98])
    ck, cv = reference_columns_f64(inp["k"], inp["v"], inp["depth"], inp["coords"], cols, **PARAMS)
    return max(float((ck - full_k[:, :, cols]).abs().max()), float((cv - full_v[:, :, cols]).abs().max()))


def error_columns(shape: Shape):
    """The output tokens the float64 error is taken on: None (all), or evenly spaced indices."""
    if shape.err_cols is None or shape.err_cols >= shape.N:
        return None
    return torch.linspace(0, shape.N - 1, shape.err_cols).round().long().unique()


def ground_truth(shape: Shape, inp: dict):
    """(k_hat, v_hat) in float64 on the error columns (all tokens when `error_columns` is None)."""
    cols = error_columns(shape)
    if cols is None:
        return kvfix.reference.dscr_refine(inp["k"].double(), inp["v"].double(), inp["depth"].double(),
                                           inp["coords"].double(), **PARAMS), None
    return reference_columns_f64(inp["k"], inp["v"], inp["depth"], inp["coords"], cols, **PARAMS), cols


def max_error(outs, truth, cols) -> float:
    err = 0.0
    for o, t in zip(outs, truth):
        o = o.to(torch.float64)
        if cols is not None:
            o = o[:, :, cols]
        err = max(err, float((o - t).abs().max()))
    return err


# --------------------------------------------------------------------------------------------
# peak memory (Linux): resident-set high-water mark around one call

_STATUS_RE = {key: re.compile(rf"^{key}:\s+(\d+) kB", re.M) for key in ("VmRSS", "VmHWM")}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(_STATUS_RE[key].search(f.read()).group(1))


def peak_bytes_beyond(fn) -> tuple[int, tuple]:
    """Bytes the process's resident set grew to during `fn()`, beyond what it held before and
    beyond `fn`'s outputs. Resets the kernel's high-water mark (VmHWM) by writing "5" to
    /proc/self/clear_refs (Linux >= 4.0), calls fn, reads VmHWM. Sees every allocation that is
    touched (ATen, BLAS/oneDNN scratch, std::vector), not only ATen's. Meant to run in a fresh
    process started with MALLOC_MMAP_THRESHOLD_ fixed (see bench.table), so that freed large
    blocks go back to the OS and are not silently reused."""
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    outs = fn()
    hwm = _status_kb("VmHWM")
    out_bytes = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    return max(0, (hwm - before) * 1024 - out_bytes), outs
