"""Python entry points of the kvfix ops: input validation, then `torch.ops.kvfix.*`.

The C++ library (`kvfix._C`) declares the ops once (`TORCH_LIBRARY(kvfix, ...)`) and registers
CPU and, when built, CUDA kernels. Bad input is a `ValueError` / `TypeError` naming the offending
argument, raised before anything is written.

Where the checks live: for `dscr_refine` / `dscr_refine_cache_` (the dense ops: tensor coords),
`row_entropy`, `kvsmooth_step_`, `scr_scores`, `scr_redistribute(_)`, `rope_calibrate`,
`cmac_attention`, `contrastive_logits` and the structured DSCR ops (`dscr_refine_factored(_cache_)`,
`dscr_refine_banded(_cache_)`) every check is stated once, in C++ (csrc/ops.cpp), and runs in the
CPU, CUDA and Meta kernels alike (the Meta kernel is what torch.compile / FakeTensor / opcheck
see); their wrappers here only convert arguments (Python / numpy ints and numbers, tuples, dtype
conversions) and refuse non-tensors. DSCR's grid form `coords=(gh, gw)`, planned on the host,
runs the same C++ checks first (the op `dscr_check_grid`), before the plan reads depth.
The in-place ops' aliasing check (targets overlapping themselves, each other or an input) runs in
C++, in the ops' CPU and CUDA registrations, before anything is written.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.kvfix.*)

__all__ = ["dscr_refine", "dscr_refine_cache_"]


# --------------------------------------------------------------------------------------------
# validation helpers

def _check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_tensors(**xs) -> None:
    """TypeError naming the first argument that is not a tensor (None allowed for mask)."""
    for name, x in xs.items():
        if not (name == "mask" and x is None):
            _check_tensor(x, name)


def _as_int(value, name: str) -> int:
    """An int or a numpy integer (anything with __index__), not a bool, not a tensor (reading a
    tensor's value would synchronise)."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _geometry(depth, coords):
    """Conversion only (dscr_check in C++ checks the result): depth [N] -> [1, N], coords [N, 2] ->
    [1, N, 2], a batch of one expanded to the other's, floating-point -> float32 contiguous."""
    _check_tensor(depth, "depth")
    _check_tensor(coords, "coords")
    depth = depth.unsqueeze(0) if depth.dim() == 1 else depth
    coords = coords.unsqueeze(0) if coords.dim() == 2 else coords
    if depth.dim() == 2 and coords.dim() == 3 and depth.shape[0] != coords.shape[0]:
        if depth.shape[0] == 1:  # one broadcast (1), the other per item (B, maybe 0): expand
            depth = depth.expand(coords.shape[0], -1)
        elif coords.shape[0] == 1:
            coords = coords.expand(depth.shape[0], -1, -1)
    return tuple(x.to(torch.float32).contiguous() if x.is_floating_point() else x for x in (depth, coords))


def _grid_depth(depth) -> torch.Tensor:
    """The grid form's depth for dscr_check_grid (conversion only): [N] -> [1, N], floating-point ->
    float32 contiguous."""
    _check_tensor(depth, "depth")
    depth = depth.unsqueeze(0) if depth.dim() == 1 else depth
    return depth.to(torch.float32).contiguous() if depth.is_floating_point() else depth


def _check_plan_depth(depth, gh: int, gw: int):
    """dscr_plan's depth: a real tensor [N] / [B, N] (N = gh * gw, not meta), or a range >= 0."""
    if isinstance(depth, torch.Tensor):
        if not depth.is_floating_point():
            raise TypeError(f"depth must be a floating-point tensor or a float range, got {depth.dtype}")
        if not ((depth.dim() == 1 and depth.shape[0] == gh * gw) or (depth.dim() == 2 and depth.shape[1] == gh * gw)):
            raise ValueError(f"depth must be [N] or [B, N] with N = gh * gw = {gh * gw}, got shape {tuple(depth.shape)}")
        if depth.device.type == "meta":
            raise ValueError("depth is a meta tensor: the plan reads the depth range on the host")
        return depth
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        raise TypeError(f"depth must be a tensor or a float range max - min, got {type(depth).__name__}")
    if not (math.isfinite(depth) and depth >= 0):
        raise ValueError(f"depth as a range max - min must be finite and >= 0, got {depth}")
    return float(depth)


def _check_built_for(x: torch.Tensor, op: str) -> None:
    """A CUDA tensor given to a kvfix built without CUDA kernels: say why, not the dispatcher's
    'could not run ... with arguments from the CUDA backend'."""
    if x.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvfix::{op}", "CUDA"):
        from . import build_info
        raise RuntimeError(f"kvfix was built without CUDA kernels ({build_info().get('cuda_reason')}); "
                           "rebuild it where nvcc matches torch's CUDA: pip install --no-build-isolation .")


def _dscr_reals(sigma_d, sigma_s, alpha, beta):
    """The dense ops' parameters as floats (TypeError otherwise); their ranges: dscr_check in C++."""
    return tuple(_as_real(x, n) for x, n in ((sigma_d, "sigma_d"), (sigma_s, "sigma_s"), (alpha, "alpha"),
                                            (beta, "beta")))


def _dscr_params(sigma_d, sigma_s, alpha, beta, op: str = "dscr_plan"):
    """The parameters checked without running DSCR (kvfix.dscr_plan, kvfix.hf.DSCR's settings): the
    C++ check of the ops (dscr_check_params); op names the caller in the message."""
    params = _dscr_reals(sigma_d, sigma_s, alpha, beta)
    torch.ops.kvfix.dscr_check_params.default(op, *params)
    return params


# --------------------------------------------------------------------------------------------
# DSCR

_DSCR_METHODS = ("auto", "dense", "structured")


def _check_grid_form(coords) -> tuple[int, int]:
    """(gh, gw) of the grid form of coords: two positive ints (numpy integers too)."""
    if len(coords) != 2:
        raise ValueError(f"coords as a grid must be (gh, gw), two positive ints, got {tuple(coords)!r}")
    try:
        gh, gw = (_as_int(g, "coords") for g in coords)
    except TypeError:
        raise ValueError(f"coords as a grid must be (gh, gw), two positive ints, got {tuple(coords)!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"coords as a grid must be (gh, gw), two positive ints, got {tuple(coords)!r}")
    return gh, gw


def _dscr_route(device, dtype, depth, coords, method: str, params, grid_unit: str = "patch"):
    """Resolve coords and method (device, dtype: k's): ("dense", depth, coords converted for the
    dense op, checked there),
    ("structured", depth [Bd, N], (lr, rr, lc, rc, coef_d, rank_d)) (the low-rank variant) or
    ("banded", depth [Bd, N], the banded structure's arguments). Nothing run yet. The grid form's
    inputs are checked by the caller first (`_check_grid`; kvfix.hf's depth is built to fit)."""
    from . import dscr_structured as P
    from .geometry import patch_coords
    if method not in _DSCR_METHODS:
        raise ValueError(f"method must be one of {_DSCR_METHODS}, got {method!r}")
    from .geometry import GRID_UNITS
    if grid_unit not in GRID_UNITS:
        raise ValueError(f"grid_unit must be one of {GRID_UNITS}, got {grid_unit!r}")
    if isinstance(coords, torch.Tensor):
        if grid_unit != "patch":
            raise ValueError(f"grid_unit={grid_unit!r} applies to the grid form (gh, gw); tensor coords are used "
                             "as given")
        if method == "structured":
            raise ValueError("method='structured' needs coords in the grid form (gh, gw), got a tensor")
        return ("dense",) + _geometry(depth, coords)
    if not isinstance(coords, (tuple, list)):
        raise TypeError(f"coords must be a tensor [N, 2] / [B, N, 2] or a grid (gh, gw), got {type(coords).__name__}")
    gh, gw = _check_grid_form(coords)
    d, c = _geometry(depth, patch_coords(gh, gw, unit=grid_unit, device=device))
    sd, ss, a, b = params
    plan, banded = P._plan_checked(gh, gw, d, sd, ss, a, b, dtype, method, grid_unit, device)
    if plan.algorithm == "dense":
        return "dense", d, c
    if plan.variant == "banded":
        return "banded", d, banded.args()
    return "structured", d, P.spatial_factors(plan, sigma_s=ss, beta=b, device=device) + P.depth_args(plan, sd, a)


def _check_grid(keys, values, cache: bool, depth, coords, params) -> None:
    """The grid form coords=(gh, gw) before planning: every check in C++ (dscr_check_grid: the
    layers, the grid's token count, the parameters, depth); nothing for tensor coords (the dense
    op checks them)."""
    if isinstance(coords, (tuple, list)):
        torch.ops.kvfix.dscr_check_grid.default(keys, values, cache, _grid_depth(depth), *_check_grid_form(coords),
                                                *params)


def _dscr_run(route, k, v, params):
    """The DSCR op on a resolved route (`_dscr_route`): [k_hat, v_hat] (v_hat only with v)."""
    if route[0] == "dense":
        _check_built_for(k, "dscr_refine")
        return torch.ops.kvfix.dscr_refine.default(k, v, route[1], route[2], *params)
    if route[0] == "banded":
        return torch.ops.kvfix.dscr_refine_banded.default(k, v, *route[2])
    _check_built_for(k, "dscr_refine_factored")
    return torch.ops.kvfix.dscr_refine_factored.default(k, v, route[1], *route[2])


def dscr_refine(k: torch.Tensor, v: torch.Tensor | None, depth: torch.Tensor, coords, *,
                sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6, beta: float = 0.8,
                method: str = "auto", grid_unit: str = "patch"):
    """Depth- and space-aware refinement of the image tokens' keys and values (METHODS §1).

    Args:
        k, v: [B, H, N, D] float32/float16/bfloat16 keys and values of the N image tokens
            (any strides with a contiguous last dim, e.g. a slice of a KV cache). `v` may be
            None (keys-only variant).
        depth: [N] or [B, N] per-token depth (e.g. `patch_depth`, [0, 255]), used as given (its
            units and sigma_d set the depth term's reach). Must be finite.
        coords: [N, 2] or [B, N, 2] patch centres (arbitrary coordinates, used as given: dense
            algorithm), or the grid form `(gh, gw)`, exactly equal to
            `patch_coords(gh, gw, unit=grid_unit)` (N = gh * gw, row-major; by default patch
            units, adjacent patches 1 apart), which allows the structured algorithm
            (kvfix/dscr_structured.py).
        sigma_d, sigma_s (> 0), alpha, beta (>= 0): proximity kernel
            `exp(-alpha (d_i - d_j)^2 / (2 sigma_d^2)) + exp(-beta |s_i - s_j|^2 / (2 sigma_s^2))`.
        method: "auto" (default: `kvfix.dscr_plan` decides; dense for tensor coords), "dense"
            (the N x N weights) or "structured" (grid form only: the banded variant, or the
            low-rank one where it is faster on the CPU or banded does not apply; ValueError where none meets the
            dtype's tolerance). With the grid form the plan reads depth on the host (one sync;
            DSCR runs once per image, not per decoded token; the plan is kept for the next
            calls with the same depth values).
        grid_unit: units of the grid form: "patch" (default) or "unit_square" (the earlier
            `[0, 1]` units); tensor coords take only the default.

    Returns:
        (k_hat, v_hat): new contiguous tensors, `k_hat[j] = sum_i w[i, j] k[i]` with `w` the
        proximity matrix with its diagonal masked and its columns normalised; v_hat is None
        when v is None. Arithmetic in float32, outputs in the input dtype.
    """
    _check_tensor(k, "k")
    if v is not None:
        _check_tensor(v, "v")
    params = _dscr_reals(sigma_d, sigma_s, alpha, beta)
    _check_grid([k], [] if v is None else [v], False, depth, coords, params)
    route = _dscr_route(k.device, k.dtype, depth, coords, method, params, grid_unit)
    outs = _dscr_run(route, k, v, params)
    return outs[0], (outs[1] if v is not None else None)


def dscr_refine_cache_(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor] | None,
                       depth: torch.Tensor, coords, *, sigma_d: float = 0.6,
                       sigma_s: float = 0.6, alpha: float = 0.6, beta: float = 0.8,
                       method: str = "auto", grid_unit: str = "patch") -> None:
    """Refine the image span of several layers' caches in place, in one call (METHODS §1).

    keys (and values, or None for keys only): sequences of [B, H, N, D] views of each layer's
    cache restricted to the image span, e.g. `cache_k[:, :, s:s + N]`; the views must not overlap
    each other, themselves (no stride-0 `expand`), depth or coords (ValueError). coords, method and
    grid_unit as in `dscr_refine` (the grid form `(gh, gw)` lets "auto"
    pick the structured algorithm, whose CPU and CUDA kernels need no copy of the sources).
    Dense: one weight matrix serves every layer and head: on the CPU it is built once per
    call (kept while it fits 64 MiB, i.e. N <= 2896 per image; beyond, once per group of layers
    whose source copies fit 64 MiB); the CUDA kernel generates weight tiles on the fly, as they
    are cheaper to recompute than to read. Every tensor is validated before any is written.
    """
    if isinstance(keys, torch.Tensor) or not isinstance(keys, (list, tuple)) or not keys:
        raise TypeError("keys must be a non-empty list or tuple of tensors")
    if values is not None and (isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple))):
        raise TypeError("values must be a list or tuple of tensors, or None (keys only)")
    if values is not None and not values:  # the op takes [] for None: say what it would mean
        raise ValueError(f"values has 0 tensors but keys has {len(keys)} (values=None: keys only)")
    values = [] if values is None else values
    for name, xs in (("keys", keys), ("values", values)):
        for i, x in enumerate(xs):
            _check_tensor(x, f"{name}[{i}]")
    keys, values, k0 = list(keys), list(values), keys[0]
    params = _dscr_reals(sigma_d, sigma_s, alpha, beta)
    _check_grid(keys, values, True, depth, coords, params)
    # The plan's tolerance follows the strictest dtype among the layers.
    strict = min((x.dtype for x in keys), key=lambda dt: torch.finfo(dt).eps)
    route = _dscr_route(k0.device, strict, depth, coords, method, params, grid_unit)
    if route[0] == "dense":
        _check_built_for(k0, "dscr_refine_cache_")
        torch.ops.kvfix.dscr_refine_cache_.default(keys, values, route[1], route[2], *params)
    elif route[0] == "banded":
        torch.ops.kvfix.dscr_refine_banded_cache_.default(keys, values, *route[2])
    else:
        _check_built_for(k0, "dscr_refine_factored_cache_")
        torch.ops.kvfix.dscr_refine_factored_cache_.default(keys, values, route[1], *route[2])


# --------------------------------------------------------------------------------------------
# KVSmooth (METHODS §2)
#
# Every check of these two ops is stated once, in C++ (kvsmooth_check and friends in
# csrc/ops.cpp), and runs in the CPU, CUDA and Meta kernels alike (the Meta kernel serves
# torch.compile / FakeTensor / opcheck): shapes, dtypes, devices and numbers only, no tensor value
# read on the host (no .item(), no sync), so the ops stay usable inside CUDA graphs. The wrappers
# below only convert arguments.

__all__ += ["row_entropy", "kvsmooth_step_"]

def _check_scale(scale):
    """scale as the ops take it (float or None): a TypeError for anything else (bool included);
    its value (finite) is checked in C++."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return float(scale)


def _as_real(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _check_lam(lam_ref, band):
    """kvfix.hf.KVSmooth validates its settings when it is built, before any op runs: the ops
    themselves check lam_ref and band in C++ (kvsmooth_check_lam)."""
    lam_ref, band = _as_real(lam_ref, "lam_ref"), _as_real(band, "band")
    if not (math.isfinite(lam_ref) and 0.0 <= lam_ref <= 1.0):
        raise ValueError(f"lam_ref must be in [0, 1], got {lam_ref}")
    if not (math.isfinite(band) and band >= 0.0):
        raise ValueError(f"band must be finite and >= 0, got {band}")
    return lam_ref, band


def row_entropy(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each query head's attention row for a single-token query (METHODS §2 step 1).

    Args:
        q: [B, Hq, 1, D] query (after RoPE), float32/float16/bfloat16, contiguous last dim.
        k: [B, Hkv, T, D] keys, same dtype (any strides with a contiguous last dim, e.g. a
            layer of a DynamicCache or a slice of a static cache); Hq must be a multiple of Hkv
            (query head h reads kv head h // (Hq // Hkv)).
        scale: logit scale, default 1 / sqrt(D).
        mask: bool (True = attend) or additive float, broadcastable to [B, 1, 1, T]; positions
            with False or -inf take no part. A row without any position has entropy 0.

    Returns:
        [B, Hq] float32: `H = -sum p log p` of `p = softmax(q . k^T * scale + mask)`, computed in
        one streaming pass over k (online softmax, fp32 accumulation, nothing materialised).

    Non-finite input follows softmax, as the reference and SDPA (reference, CPU and CUDA alike): a
    nan or +inf logit of a position taking part (nan / inf in q or k, nan or +inf in an additive
    mask) gives that head a nan entropy, also where it is the only position; a -inf logit takes
    no part, as a masked position; a masked position takes no part whatever k holds there.
    """
    _check_tensors(q=q, k=k, mask=mask)
    return torch.ops.kvfix.row_entropy.default(q, k, _check_scale(scale), mask)


def kvsmooth_step_(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, queue: torch.Tensor, *,
                   scale: float | None = None, mask: torch.Tensor | None = None, lam_ref: float = 0.9,
                   band: float = 0.2) -> torch.Tensor:
    """One KVSmooth decoding step of one layer (METHODS §2), in place; returns lam [B] float32.

    Fused: entropy of every query head's row (as `row_entropy`), z = mean over query heads;
    push z onto each item's queue (FIFO, oldest first, drops the oldest; NaN = empty slot);
    rank = k / M with k = #{entries <= z} (the 1-based rank of z, which counts itself; equal
    values count, empty slots never do; M = queue capacity, also while the queue fills: the
    paper's k / M);
    lam = clamp(clamp(rank, lam_ref - band, lam_ref + band), 0, 1); then, in place,
    `k_cache[:, :, T-1] = (1 - lam) k_cache[:, :, T-1] + lam k_cache[:, :, T-2]` and the same for
    v_cache, all kv heads, per batch item (fp32 arithmetic, rounded once).

    Args:
        q: [B, Hq, 1, D] the step's query (after RoPE).
        k_cache, v_cache: [B, Hkv, T, D] the layer's cache with the current token at T - 1 (any
            strides with a contiguous last dim); modified in place. They must not share memory
            with themselves (no stride-0 `expand`), each other, queue, q or mask (ValueError).
        queue: float32 [B, M] per-item state, modified in place; start from
            `torch.full((B, 15), float("nan"))`.
        scale, mask: as in `row_entropy`. With T == 1, or where the mask excludes position
            T - 2, nothing is smoothed and lam is 0 for that item (z is still pushed).
        lam_ref: centre of the allowed band, in [0, 1] (paper: 0.9 LLaVA-1.5, 0.5 MiniGPT-4,
            0.7 InstructBLIP); band: half width, >= 0.

    Non-finite input: the entropies follow `row_entropy`'s rule; a nan z (a nan entropy in any
    query head) is pushed (an empty slot from then on) and has no rank, so lam = nan and the EMA
    writes nan into position T - 1 of that item's k_cache and v_cache (the step's attention is
    nan anyway); non-finite values at positions T - 2 / T - 1 go through the EMA's arithmetic
    (inf * 0 = nan at lam = 1); lam = 0 (T == 1, T - 2 masked) writes nothing.

    No host synchronisation: inputs are validated from their metadata only, so bad input raises
    a ValueError / TypeError naming the argument before anything is written. On CUDA the step is
    two kernel launches on the current stream (split-T streaming pass, then combine + queue +
    EMA) with a small workspace from the caching allocator, and all state is in `queue`; so it
    can be captured in a CUDA graph:

        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):                   # warm up once on a side stream first
            lam = kvfix.kvsmooth_step_(q, k_view, v_view, queue, mask=mask)
        ...                                         # write the next q / k / v / mask in place
        g.replay()                                  # lam, the caches and queue update in place

    A replay reuses the captured pointers, shapes and scalars: it smooths position T - 1 of the
    captured views. A decoder whose cache length grows per step therefore needs one graph per
    length (what torch.compile's CUDA-graph trees do per shape), or a fixed-length view whose
    last position is the current token.
    """
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, queue=queue, mask=mask)
    return torch.ops.kvfix.kvsmooth_step_.default(q, k_cache, v_cache, queue, _check_scale(scale), mask,
                                                  _as_real(lam_ref, "lam_ref"), _as_real(band, "band"))


# --------------------------------------------------------------------------------------------
# SCR (METHODS §3)
#
# Every check of the SCR ops is stated once, in C++ (scr_scores_check / scr_redistribute_check in
# csrc/ops.cpp), run by the CPU, CUDA and Meta kernels; the wrappers below convert arguments.

__all__ += ["scr_scores", "scr_redistribute", "scr_redistribute_"]


def _check_pair(value, name: str) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of ints, got {value!r}")
    return _as_int(value[0], f"{name}[0]"), _as_int(value[1], f"{name}[1]")


def scr_scores(q: torch.Tensor, k: torch.Tensor, image_span, *, scale: float | None = None,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """SCR diagnostic scores (METHODS §3): attention mass each image key receives, [B, N] float32.

    Args:
        q: [B, Hq, Tq, D] queries (after RoPE), float32/float16/bfloat16, contiguous last dim
            (e.g. the text tokens after the image).
        k: [B, Hkv, T, D] keys, same dtype, any strides with a contiguous last dim (a cache
            slice); Hq must be a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        image_span: (start, end) ints, 0 <= start <= end <= T: the image's key columns, N = end - start.
        scale: logit scale, default 1 / sqrt(D).
        mask: None, bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, T] (the
            4-D mask transformers' SDPA receives); False / -inf keys take no part.
        causal: query i sits at position T - Tq + i (bottom-right aligned, a cached prefix before
            it) and sees keys <= its position; needs Tq <= T.

    Returns:
        scores[b, j] = mean over query heads of sum over the Tq rows of p[b, h, i, start + j], with
        p = softmax(q k^T * scale + mask) over ALL T keys of the row (choice: the sum over queries,
        the "attention mass"; divide by Tq for a mean). Rows without any key contribute 0.
        Computed in float32 without materialising a [Tq, T] matrix per head.

    Non-finite input follows softmax (the reference, CPU and CUDA alike): a nan or +inf logit of
    a key that takes part (nan / inf in q or k, nan or +inf in an additive mask) makes its row's
    probabilities nan in every column, also where it is the row's only key and when the row sees
    no image column (causal), hence that item's scores; a -inf logit takes no part, as a masked key.
    """
    _check_tensors(q=q, k=k, mask=mask)
    start, end = _check_pair(image_span, "image_span")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_built_for(q, "scr_scores")
    return torch.ops.kvfix.scr_scores.default(q, k, start, end, _check_scale(scale), mask, causal)


def _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border):
    """Argument conversion only (scores to float32 contiguous, Python ints and numbers); every
    check of the values is scr_redistribute_check in csrc/ops.cpp."""
    _check_tensors(hidden=hidden, scores=scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    gh, gw = _check_pair(grid_hw, "grid_hw")
    if not isinstance(exclude_border, bool):
        raise TypeError(f"exclude_border must be a bool, got {type(exclude_border).__name__}")
    return scores.to(torch.float32).contiguous(), gh, gw, _as_int(top_k, "top_k"), _as_real(lam, "lam")


def scr_redistribute(hidden: torch.Tensor, scores: torch.Tensor, grid_hw, *, top_k: int = 32, lam: float = 1.1,
                     exclude_border: bool = True) -> torch.Tensor:
    """SCR redistribution (METHODS §3) of the visual tokens' hidden states; returns a new contiguous tensor.

    Args:
        hidden: [B, N, C] float32/float16/bfloat16, any strides with a contiguous last dim.
        scores: [B, N] floating point (used as float32), finite: NaN and +-inf raise a ValueError
            (one host read; SCR runs once per image, not per decoded token).
        grid_hw: (gh, gw) with gh * gw == N, tokens in row-major order over the patch grid.
        top_k (>= 0): number of sources, capped at the candidates; 0 leaves hidden unchanged.
        lam: redistribution strength, a normal float32 number > 0 (in [1.2e-38, 3.4e38]).
        exclude_border: sources only among patches off the first/last row and column (grids with
            fewer than 3 rows or columns then have none).

    Sources: the top_k highest scores among the candidates (ties: lower index first). Neighbours:
    the 8-connected grid neighbours of any source that are not sources. h'[s] = h[s] / lam;
    h'[n] = h[n] + (lam - 1) * sum of the ORIGINAL h[s] over the sources adjacent to n (fp32,
    rounded once); every other row unchanged. Deterministic.
    """
    s, gh, gw, top_k, lam = _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border)
    _check_built_for(hidden, "scr_redistribute")
    return torch.ops.kvfix.scr_redistribute.default(hidden, s, gh, gw, top_k, lam, exclude_border)


def scr_redistribute_(hidden: torch.Tensor, scores: torch.Tensor, grid_hw, *, top_k: int = 32, lam: float = 1.1,
                      exclude_border: bool = True) -> torch.Tensor:
    """In-place `scr_redistribute`: writes only the changed rows of hidden (which may be a view,
    e.g. the image span of a [B, T, C] residual stream) and returns hidden. Neighbours read the
    original source rows (copied aside first), so the result equals the out-of-place op's. hidden's
    elements must be distinct memory (no stride-0 `expand`) and must not share memory with scores
    (ValueError)."""
    s, gh, gw, top_k, lam = _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border)
    _check_built_for(hidden, "scr_redistribute_")
    torch.ops.kvfix.scr_redistribute_.default(hidden, s, gh, gw, top_k, lam, exclude_border)
    return hidden


# --------------------------------------------------------------------------------------------
# CMAC (METHODS §4): calibrated image keys (CMPC), attention with IMD, contrastive logits.
#
# Image spans travel to the kernels as two ints (one span for the batch) or an int64 tensor
# [B, 2] read on the device (per-item spans; no host read). Every check of rope_calibrate,
# cmac_attention and contrastive_logits is stated once, in C++ (cmac_check_rope,
# cmac_check_attention, cmac_check_contrastive in csrc/ops.cpp), run by the CPU, CUDA and Meta
# kernels; the wrappers below convert arguments. The one host read here: rope_calibrate's token
# count N from a tensor image_span without num_tokens (the output's size, which the op takes).

__all__ += ["rope_calibrate", "cmac_attention", "contrastive_logits"]

_VALUE_MEANS = {"scalar": 0, "vector": 1}


def _span_arg(image_span):
    """-> (start, end, spans tensor or None): (start, end) ints, or a tensor [B, 2] as int64
    (int32 converted) contiguous. Shapes, dtype, device and ranges: cmac_check_spans in C++ (the
    values of a CPU tensor there too; a CUDA tensor's are read by the kernels only, clamped to
    [0, T])."""
    if isinstance(image_span, torch.Tensor):
        sp = image_span.to(torch.int64) if image_span.dtype == torch.int32 else image_span
        return 0, 0, sp.contiguous()
    if not isinstance(image_span, (tuple, list)) or len(image_span) != 2:
        raise TypeError(f"image_span must be (start, end) ints or an int64 tensor [B, 2], got {image_span!r}")
    s, e = (_as_int(x, "image_span") for x in image_span)
    return s, e, None


def rope_calibrate(k: torch.Tensor, image_span, inv_freq: torch.Tensor, *, gamma: float = 3.0,
                   positions: torch.Tensor | None = None, mrope_section=None,
                   num_tokens: int | None = None) -> torch.Tensor:
    """CMPC: the image keys re-rotated to calibrated positions (METHODS §4). Returns [B, Hkv, N, D].

    Args:
        k: [B, Hkv, T, D] post-RoPE keys (e.g. a layer's cache; any strides with a contiguous
            last dim), float32/float16/bfloat16; D even.
        image_span: (start, end) cache indices shared by the batch (N = end - start), or an
            int64 tensor [B, 2] of per-item spans of one length N on k's device (left padding
            shifts spans per item). A CUDA tensor is read on the device only; its spans must be
            in range (the kernel clamps reads to [0, T); out-of-range tokens come out as 0).
        inv_freq: [D/2] float32, the model's rotary inverse frequencies (e.g.
            `model.language_model.rotary_emb.inv_freq`), on k's device.
        gamma: calibration strength, > 0 (1: keys unchanged up to rounding; the authors use 3);
            ValueError where (1 - 1/gamma) T overflows float32 (gamma below ~T / 3.4e38).
        positions: None (RoPE position = cache index), [B, T] (1-D RoPE) or [S, B, T]
            (multi-section RoPE, S = len(mrope_section)) integer RoPE positions of the keys.
        mrope_section: section sizes of the D/2 frequencies (Qwen2-VL: [16, 24, 24] -> t, h, w),
            summing to D/2. None: 1-D RoPE.
        num_tokens: N for a tensor image_span; None reads it from the tensor (one host read).

    CMPC compresses the image toward its end, next to the text, as the authors' code does: for
    key t with RoPE position p and a the position of the first token after the span (index
    end; per section for multi-section RoPE, i.e. that section's position of the token after
    the image; where the span ends at T, one past the span's last position), the calibrated
    position is a - (a - p) / gamma, so the key is rotated by delta = (1 - 1 / gamma) (a - p)
    radians times inv_freq[f] for each frequency f, and an after-image query at q sees image key
    p at distance (q - a) + (a - p) / gamma. rotate_half convention of Llama / Qwen2-VL:
    frequency f pairs dims f and f + D/2, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). fp32
    arithmetic, output in k's dtype, a new contiguous tensor.
    """
    _check_tensors(k=k, inv_freq=inv_freq)
    start, end, spans = _span_arg(image_span)
    if spans is None:
        n = end - start
    elif num_tokens is not None:
        n = _as_int(num_tokens, "num_tokens")
    elif spans.dim() == 2 and spans.shape[0] >= 1 and spans.shape[1] == 2:
        n = int(spans[0, 1] - spans[0, 0])  # one host read: N is the output's size
    else:
        n = 0  # a wrongly shaped image_span: C++ says so
    sections = None
    if mrope_section is not None:
        if isinstance(mrope_section, torch.Tensor) or not isinstance(mrope_section, (list, tuple)):
            raise TypeError(f"mrope_section must be a list of ints, got {mrope_section!r}")
        sections = [_as_int(x, f"mrope_section[{i}]") for i, x in enumerate(mrope_section)]
    if positions is not None:
        _check_tensor(positions, "positions")
        if positions.dtype == torch.int32:
            positions = positions.to(torch.int64)
        if positions.dim() == 2:  # [B, T]: one row
            positions = positions.unsqueeze(0)
        positions = positions.contiguous()
    _check_built_for(k, "rope_calibrate")
    return torch.ops.kvfix.rope_calibrate.default(k, start, end, spans, n, inv_freq, _as_real(gamma, "gamma"),
                                                  positions, sections)


def cmac_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_span, *,
                   k_calibrated: torch.Tensor | None = None, scale: float | None = None,
                   mask: torch.Tensor | None = None, causal: bool = True, imd=False,
                   value_mean: str = "scalar") -> torch.Tensor:
    """Attention with CMAC's calibrated image keys and, optionally, IMD (METHODS §4). [B, Hq, Tq, D].

    Args:
        q: [B, Hq, Tq, D] queries (after RoPE); k, v: [B, Hkv, T, D] keys and values (GQA: query
            head h reads kv head h // (Hq // Hkv)); float32/float16/bfloat16, any strides with a
            contiguous last dim (a layer of a cache works without a copy). Queries are
            bottom-right aligned: query i sits at cache position T - Tq + i (prefill: Tq = T;
            decode: Tq = 1).
        image_span: (start, end) cache indices, or an int64 tensor [B, 2] of per-item spans
            (read on the device). Query i is "after the image" when T - Tq + i >= end.
        k_calibrated: [B, Hkv, N, D] image keys at calibrated positions (`rope_calibrate`);
            pairs (after-image query, image key) use them instead of k. None: plain keys.
        scale: logit scale, default 1 / sqrt(D).
        mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, T] (what SDPA
            gets, e.g. padding). False / -inf removes a pair; a row without any key returns 0.
        causal: mask keys after the query's position.
        imd: bool, or bool tensor [B] (per item: one batched call can run the original and the
            distorted branch). On an item, mu_P = the mean of the calibrated segment's logits
            (scale * q . k_cal, before masking) over query heads, this call's after-image
            queries and image keys; pairs of the segment with logit > mu_P take the value mu_V
            instead of v. Softmax normalisation is unchanged.
        value_mean: mu_V = mean of the kv head's image values over tokens and head dim
            ("scalar", the authors' code) or over tokens only ("vector", the paper).

    One streaming pass per query block (online softmax, fp32 accumulation; the [Tq, T] matrix is
    never stored). Output in q's dtype, a new contiguous tensor. No host synchronisation.

    Non-finite input follows softmax(P) @ V, as the reference and SDPA's math path (reference, CPU
    and CUDA alike): a nan or +inf logit of a key the row sees (nan / inf in q, k, k_calibrated, or
    nan in an additive mask) makes the whole output row nan; a -inf logit takes no part, as a
    masked key; a nan / inf value of a key the row sees reaches the dims it touches. Whether a
    non-finite value of a key the row cannot see (masked, causal) reaches it is not specified.
    """
    _check_tensors(q=q, k=k, v=v, mask=mask)
    if k_calibrated is not None:
        _check_tensor(k_calibrated, "k_calibrated")
    start, end, spans = _span_arg(image_span)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    imd_items = None
    if isinstance(imd, torch.Tensor):
        imd_items, imd = imd.contiguous(), True
    elif not isinstance(imd, bool):
        raise TypeError(f"imd must be a bool or a bool tensor [B], got {type(imd).__name__}")
    if value_mean not in _VALUE_MEANS:
        raise ValueError(f"value_mean must be 'scalar' or 'vector', got {value_mean!r}")
    _check_built_for(q, "cmac_attention")
    return torch.ops.kvfix.cmac_attention.default(q, k, v, start, end, spans, k_calibrated, _check_scale(scale),
                                                  mask, causal, imd, imd_items, _VALUE_MEANS[value_mean])


def contrastive_logits(logits: torch.Tensor, logits_distorted: torch.Tensor, *, alpha: float = 3.0,
                       beta: float = 0.2) -> torch.Tensor:
    """Contrastive decoding logits (METHODS §4): `(1 + alpha) l - alpha l~` on the plausible set
    `{y : log p(y) >= log beta + max log p}` (p = softmax of the ORIGINAL branch's logits l,
    so the test is `l_y - max l >= log beta`), -inf elsewhere.

    logits, logits_distorted: [..., V] float32/float16/bfloat16, same shape, dtype and device
    (any layout). alpha in [0, 3.4e38] (finite in float32), beta in (0, 1]. One fused pass per
    row (row max, then the combination, computed as `l + alpha (l - l~)`: no cancellation of two
    terms of size alpha |l|), fp32 arithmetic, output [..., V] in the input dtype; a value past
    the dtype's range is +-inf. Non-finite input (the rule of softmax, which this op thresholds):
    a row whose `logits` hold nan or +inf has no softmax and comes out all nan; -inf logits are
    never plausible; a nan or inf in `logits_distorted` propagates to its own token where that
    token is plausible.
    """
    _check_tensors(logits=logits, logits_distorted=logits_distorted)
    alpha, beta = _as_real(alpha, "alpha"), _as_real(beta, "beta")  # their ranges: checked in C++
    _check_built_for(logits, "contrastive_logits")
    return torch.ops.kvfix.contrastive_logits.default(logits, logits_distorted, alpha, beta)
