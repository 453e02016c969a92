"""Patch-grid geometry for DSCR (METHODS §1 helpers): coordinates and pooled, normalised depth.

Units (METHODS §1, a revised choice). The proximity `exp(-alpha dd^2 / (2 sigma_d^2)) +
exp(-beta |ds|^2 / (2 sigma_s^2))` has no units of its own: its reach is set by the units of the
depth and the coordinates. With the defaults sigma_d = sigma_s = 0.6:

- coordinates in patch units (`unit="patch"`, default): adjacent patches are 1 apart (the
  paper's 2-D pixel coordinates divided by the patch size), so the spatial term smooths the
  neighbourhood (0.33 to a side neighbour, 0.11 diagonally, 0.01 two patches away). In raw
  pixels every pair's spatial term would be 0, which the paper's ablation of that term rules
  out; in the unit square (`unit="unit_square"`, the earlier default) the spatial term of any
  pair of a 24 x 24 grid lies between 0.13 (opposite corners) and 1: no locality left.
- depth maps pooled to the grid, min-max normalised, then scaled to [0, 255] (`scale=255.0`,
  default), the 8-bit depth image that depth-estimation pipelines emit: a difference of a few
  levels separates surfaces ("pixels with nearly identical disparity almost certainly belong to
  the same physical surface, while depth mutations correspond to actual object boundaries").
  Normalised to [0, 1] (`scale=1.0`, the earlier default) the depth term of the nearest and
  the farthest token is still 0.43: it barely separates anything.

On a 24 x 24 grid with a near object (an 8 x 8 patch square, 11% of the tokens) on a floor that
recedes to the top, a token on the object draws 99.6% of its weight from the object and ~25
tokens contribute to the median token (1 / sum_i w_ij^2); with both earlier units 13.6% and
~561 of the 575 others (`kvfix.dscr_weight_stats` computes these; docs/DSCR_UNITS.md).
"""
from __future__ import annotations

import math
import operator

import torch

__all__ = ["patch_coords", "patch_depth", "GRID_UNITS"]

GRID_UNITS = ("patch", "unit_square")


def _check_grid(gh, gw):
    for name, g in (("gh", gh), ("gw", gw)):
        if isinstance(g, (bool, torch.Tensor)) or not hasattr(g, "__index__") or operator.index(g) < 1:  # numpy ints too
            raise ValueError(f"{name} must be a positive int, got {g!r}")


def check_grid_form(coords) -> tuple[int, int]:
    """(gh, gw) of the DSCR ops' grid form `coords=(gh, gw)`: two positive ints (numpy integers too);
    a ValueError naming coords otherwise."""
    if len(coords) != 2 or any(isinstance(g, (bool, torch.Tensor)) or not hasattr(g, "__index__") for g in coords):
        raise ValueError(f"coords as a grid must be (gh, gw), two positive ints, got {tuple(coords)!r}")
    gh, gw = (operator.index(g) for g in coords)
    if gh < 1 or gw < 1:
        raise ValueError(f"coords as a grid must be (gh, gw), two positive ints, got {tuple(coords)!r}")
    return gh, gw


def check_grid_unit(unit) -> str:
    if unit not in GRID_UNITS:
        raise ValueError(f"unit must be one of {GRID_UNITS}, got {unit!r}")
    return unit


def check_depth_scale(scale, name: str = "depth_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {scale!r}")
    return float(scale)


def patch_coords(gh: int, gw: int, *, unit: str = "patch", device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of a row-major gh x gw patch grid, [N, 2] with N = gh * gw.

    unit="patch" (default, METHODS §1): s = (r + 0.5, c + 0.5), adjacent patches 1 apart (the
    image's pixel coordinates divided by the patch size); this is what the grid form
    `coords=(gh, gw)` of `kvfix.dscr_refine` means. unit="unit_square" (the earlier default,
    kept for comparison): s = ((r + 0.5) / G, (c + 0.5) / G) with G = max(gh, gw), both axes on
    one scale so a non-square grid keeps its aspect ratio. Why patch units: module docstring.
    """
    _check_grid(gh, gw)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point dtype (coordinates are fractional), got {dtype}")
    g = 1.0 if check_grid_unit(unit) == "patch" else float(max(gh, gw))
    r = (torch.arange(gh, device=device, dtype=torch.float64) + 0.5) / g
    c = (torch.arange(gw, device=device, dtype=torch.float64) + 0.5) / g
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1).to(dtype)


def _area_weights(n_out: int, n_in: int, device) -> torch.Tensor:
    """[n_out, n_in] exact area-average weights: cell r covers [r n_in / n_out, (r + 1) n_in / n_out)
    of the input axis; pixel y contributes the length of its overlap with that interval."""
    edges = torch.arange(n_out + 1, device=device, dtype=torch.float64) * (n_in / n_out)
    y = torch.arange(n_in, device=device, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], y[None, :])
    hi = torch.minimum(edges[1:, None], y[None, :] + 1)
    return (hi - lo).clamp_min(0) * (n_out / n_in)


def patch_depth(depth_map: torch.Tensor, gh: int, gw: int, *, scale: float = 255.0) -> torch.Tensor:
    """Pool a depth map to the patch grid, min-max normalise it per image and scale it.

    depth_map: [H, W] or [B, H, W], any resolution. Returns float32 [N] or [B, N] (N = gh * gw,
    row-major): the exact area average over each patch (a pixel straddling two patches counts
    in each with the fraction of its area inside), then scale * (x - min) / (max - min) per
    image; a constant map (up to a 1e-9 relative spread) gives all zeros (choice, METHODS §1).
    scale: 255.0 (default: the levels of an 8-bit depth image, so that sigma_d = 0.6 separates
    surfaces a few levels apart; module docstring) or 1.0 for the earlier [0, 1] units; > 0.
    """
    _check_grid(gh, gw)
    scale = check_depth_scale(scale, "scale")
    if not isinstance(depth_map, torch.Tensor):
        raise TypeError(f"depth_map must be a torch.Tensor, got {type(depth_map).__name__}")
    if depth_map.dim() not in (2, 3):
        raise ValueError(f"depth_map must be [H, W] or [B, H, W], got shape {tuple(depth_map.shape)}")
    if depth_map.numel() == 0:
        raise ValueError(f"depth_map is empty (shape {tuple(depth_map.shape)})")
    if not (depth_map.is_floating_point() or depth_map.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"depth_map must be a real-valued tensor, got {depth_map.dtype}")
    if depth_map.device.type == "meta":
        raise ValueError("depth_map is a meta tensor: patch_depth normalises by the map's values")
    x = depth_map.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("depth_map has non-finite values (nan or inf)")
    return pool_depth(x, gh, gw, scale)


def pool_depth(x: torch.Tensor, gh: int, gw: int, scale: float) -> torch.Tensor:
    """`patch_depth` of a checked float64 map [H, W] or [B, H, W] (finite, not empty), on its own
    device: no value is read on the host."""
    # Pooling and min-max are invariant to a positive scale: divide by the largest |value| per
    # image first, so that maps near float64's range (+-1e308) neither overflow nor cancel.
    x = x / x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    H, W = x.shape[-2:]
    ph = _area_weights(gh, H, x.device)  # [gh, H]
    pw = _area_weights(gw, W, x.device)  # [gw, W]
    pooled = (ph @ x @ pw.T).flatten(1)  # [B, N]
    lo = pooled.amin(dim=1, keepdim=True)
    hi = pooled.amax(dim=1, keepdim=True)
    span = hi - lo
    # Pooling a constant map can leave rounding-level differences: treat those as constant.
    varies = span > 1e-9 * torch.maximum(lo.abs(), hi.abs())
    out = torch.where(varies, (pooled - lo) / torch.where(varies, span, torch.ones_like(span)) * scale,
                      torch.zeros_like(pooled)).to(torch.float32)
    return out[0] if single else out
