"""Patch-grid geometry for DSCR (SPEC §1 helpers): coordinates and pooled, normalised depth."""
from __future__ import annotations

import operator

import torch

__all__ = ["patch_coords", "patch_depth"]


def _check_grid(gh, gw):
    for name, g in (("gh", gh), ("gw", gw)):
        if isinstance(g, (bool, torch.Tensor)) or not hasattr(g, "__index__") or operator.index(g) < 1:  # numpy ints too
            raise ValueError(f"{name} must be a positive int, got {g!r}")


def patch_coords(gh: int, gw: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of a row-major gh x gw patch grid, [N, 2] with N = gh * gw.

    s = ((r + 0.5) / G, (c + 0.5) / G) with G = max(gh, gw), so both axes share one scale
    and a non-square grid keeps its aspect ratio (choice, SPEC §1).
    """
    _check_grid(gh, gw)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point dtype (coordinates are fractional), got {dtype}")
    g = float(max(gh, gw))
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


def patch_depth(depth_map: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Pool a depth map to the patch grid and min-max normalise it per image.

    depth_map: [H, W] or [B, H, W], any resolution. Returns float32 [N] or [B, N] (N = gh * gw,
    row-major): the exact area average over each patch (a pixel straddling two patches counts
    in each with the fraction of its area inside), then (x - min) / (max - min) per image; a
    constant map (up to a 1e-9 relative spread) gives all zeros (choice, SPEC §1).
    """
    _check_grid(gh, gw)
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
    out = torch.where(varies, (pooled - lo) / torch.where(varies, span, torch.ones_like(span)),
                      torch.zeros_like(pooled)).to(torch.float32)
    return out[0] if single else out
