"""Patch-grid geometry for DSCR (SPEC §1 helpers): coordinates and pooled, normalised depth."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_coords", "patch_depth"]


def _check_grid(gh, gw):
    for name, g in (("gh", gh), ("gw", gw)):
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"{name} must be a positive int, got {g!r}")


def patch_coords(gh: int, gw: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of a row-major gh x gw patch grid, [N, 2] with N = gh * gw.

    s = ((r + 0.5) / G, (c + 0.5) / G) with G = max(gh, gw), so both axes share one scale
    and a non-square grid keeps its aspect ratio (choice, SPEC §1).
    """
    _check_grid(gh, gw)
    g = float(max(gh, gw))
    r = (torch.arange(gh, device=device, dtype=torch.float64) + 0.5) / g
    c = (torch.arange(gw, device=device, dtype=torch.float64) + 0.5) / g
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1).to(dtype)


def patch_depth(depth_map: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Pool a depth map to the patch grid and min-max normalise it per image.

    depth_map: [H, W] or [B, H, W], any resolution. Returns float32 [N] or [B, N]: the
    area average over each patch (adaptive average pooling), then (x - min) / (max - min)
    per image; a constant map gives all zeros (choice, SPEC §1).
    """
    _check_grid(gh, gw)
    if not isinstance(depth_map, torch.Tensor):
        raise TypeError(f"depth_map must be a torch.Tensor, got {type(depth_map).__name__}")
    if depth_map.dim() not in (2, 3):
        raise ValueError(f"depth_map must be [H, W] or [B, H, W], got shape {tuple(depth_map.shape)}")
    if depth_map.numel() == 0:
        raise ValueError(f"depth_map is empty (shape {tuple(depth_map.shape)})")
    if not depth_map.is_floating_point():
        depth_map = depth_map.float()
    if not bool(torch.isfinite(depth_map).all()):
        raise ValueError("depth_map has non-finite values (nan or inf)")
    single = depth_map.dim() == 2
    x = depth_map.unsqueeze(0) if single else depth_map
    pooled = F.adaptive_avg_pool2d(x.unsqueeze(1).to(torch.float64), (gh, gw)).flatten(1)  # [B, N]
    lo = pooled.amin(dim=1, keepdim=True)
    hi = pooled.amax(dim=1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (pooled - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(pooled)).to(torch.float32)
    return out[0] if single else out
