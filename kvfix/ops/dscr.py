"""DSCR (METHODS §1): `dscr_refine`, `dscr_refine_cache_`, routed to the dense op or, for the grid
form `coords=(gh, gw)`, to what `kvfix.dscr_plan` picks (kvfix/dscr_structured.py: the banded or
the low-rank structured op).

Every check is stated once, in C++ (csrc/ops/dscr.cpp), and runs in the CPU, CUDA and Meta kernels
of each op; the grid form runs the same checks first (the op `dscr_check_grid`), before the plan
reads depth on the host. The wrappers here only convert arguments."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import dscr_structured as P
from ..geometry import GRID_UNITS, check_grid_form, patch_coords
from ._common import _as_real, _check_built_for, _check_tensor

__all__ = ["dscr_refine", "dscr_refine_cache_"]

_DSCR_METHODS = ("auto", "dense", "structured")


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


def _dscr_reals(sigma_d, sigma_s, alpha, beta):
    """The dense ops' parameters as floats (TypeError otherwise); their ranges: dscr_check in C++."""
    return tuple(_as_real(x, n) for x, n in ((sigma_d, "sigma_d"), (sigma_s, "sigma_s"), (alpha, "alpha"),
                                            (beta, "beta")))


def _dscr_route(device, dtype, depth, coords, method: str, params, grid_unit: str = "patch"):
    """Resolve coords and method (device, dtype: k's): ("dense", depth, coords converted for the
    dense op, checked there),
    ("structured", depth [Bd, N], (lr, rr, lc, rc, coef_d, rank_d)) (the low-rank variant) or
    ("banded", depth [Bd, N], the banded structure's arguments). Nothing run yet. The grid form's
    inputs are checked by the caller first (`_check_grid`; kvfix.hf's depth is built to fit)."""
    if method not in _DSCR_METHODS:
        raise ValueError(f"method must be one of {_DSCR_METHODS}, got {method!r}")
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
    gh, gw = check_grid_form(coords)
    d = _grid_depth(depth)
    sd, ss, a, b = params
    # The plan reads the depth values on the host: from depth where the caller holds it (a CPU
    # depth, as kvfix.hf passes, needs no device round trip), then the ops get their copy on k's
    # device (kvfix.hf: through pinned memory, no host synchronisation either).
    plan, banded = P._plan_checked(gh, gw, d, sd, ss, a, b, dtype, method, grid_unit, device)
    d = P.to_device_async(d, torch.device(device))
    if plan.algorithm == "dense":  # the grid's coordinates built only for the dense op (~0.2 ms at 64 x 64)
        return ("dense",) + _geometry(d, patch_coords(gh, gw, unit=grid_unit, device=device))
    if plan.variant == "banded":
        return "banded", d, banded.args()
    return "structured", d, P.spatial_factors(plan, sigma_s=ss, beta=b, device=device) + P.depth_args(plan, sd, a)


def _check_grid(keys, values, cache: bool, depth, coords, params) -> None:
    """The grid form coords=(gh, gw) before planning: every check in C++ (dscr_check_grid: the
    layers, the grid's token count, the parameters, depth); nothing for tensor coords (the dense
    op checks them)."""
    if isinstance(coords, (tuple, list)):
        torch.ops.kvfix.dscr_check_grid.default(keys, values, cache, _grid_depth(depth), *check_grid_form(coords),
                                                *params)


def _dscr_run(route, k, v, params):
    """The DSCR op on a resolved route (`_dscr_route`): [k_hat, v_hat] (v_hat only with v)."""
    if route[0] == "dense":
        _check_built_for(k, "dscr_refine")
        return torch.ops.kvfix.dscr_refine.default(k, v, route[1], route[2], *params)
    if route[0] == "banded":
        _check_built_for(k, "dscr_refine_banded")
        return torch.ops.kvfix.dscr_refine_banded.default(k, v, *route[2])
    _check_built_for(k, "dscr_refine_lowrank")
    return torch.ops.kvfix.dscr_refine_lowrank.default(k, v, route[1], *route[2])


def dscr_refine(k: torch.Tensor, v: torch.Tensor | None, depth: torch.Tensor, coords, *,
                sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6, beta: float = 0.8,
                method: str = "auto", grid_unit: str = "patch"):
    """Depth- and space-aware refinement of the image tokens' keys and values (METHODS §1).

    Args:
        k, v: [B, H, N, D] float32/float16/bfloat16 keys and values of the N image tokens
            (any strides with a contiguous last dim, e.g. a slice of a KV cache). `v` may be
            None (keys-only variant).
        depth: [N] or [B, N] per-token depth (e.g. `patch_depth`, [0, 255]), used as given (its
            units and sigma_d set the depth term's reach). Must be finite, as must coords:
            ValueError on the CPU (and for the grid form, whose plan reads depth on the host); the
            dense op on CUDA reads nothing on the host and writes nan over every output of an
            item whose depth or coords hold nan / inf (no device -> host sync per image).
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
    Non-finite depth / coords: as in `dscr_refine` (dense on CUDA: the item's span in every layer
    is written nan).
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
        _check_built_for(k0, "dscr_refine_banded_cache_")
        torch.ops.kvfix.dscr_refine_banded_cache_.default(keys, values, *route[2])
    else:
        _check_built_for(k0, "dscr_refine_lowrank_cache_")
        torch.ops.kvfix.dscr_refine_lowrank_cache_.default(keys, values, route[1], *route[2])
