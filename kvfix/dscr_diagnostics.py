"""What DSCR's weights do on a patch grid: effective contributors per token, the share of weight
from the 8-neighbourhood (and from a region, e.g. an object), and a picture of one token's
weights over the depth map.

Both functions use the reference weights (`kvfix.reference.dscr_weights`, float64, the full
N x N matrix: O(N^2) memory, about 8 N^2 bytes a copy; meant for grids up to ~64 x 64), with
the depth and coordinates the op sees for the same inputs: a depth map [H, W] goes through
`kvfix.patch_depth(..., scale=depth_scale)` (as in `kvfix.hf.DSCR`), a per-token depth [N] is
used as given; the coordinates are `kvfix.patch_coords(gh, gw, unit=grid_unit)`, the grid form.
The units and why they matter: kvfix/geometry.py and docs/DSCR_UNITS.md.
"""
from __future__ import annotations

import dataclasses

import torch

from .dscr_structured import _check_params
from .geometry import check_depth_scale, check_grid_form, check_grid_unit, patch_coords, patch_depth

__all__ = ["DscrWeightStats", "dscr_weight_stats", "dscr_weight_map_png"]


@dataclasses.dataclass(frozen=True)
class DscrWeightStats:
    """Per-token statistics of DSCR's column-normalised weights w[i, j] (token j's new key is
    sum_i w[i, j] k[i]) on a gh x gw grid. Tensors are float64 [N], row-major.

    contributors: effective number of tokens averaged into token j, 1 / sum_i w[i, j]^2 (k if
        j draws equally from k tokens; 0 for a token that keeps its key: N == 1 or underflow).
    neighbour_share: sum of w[i, j] over the (up to 8) grid neighbours i of j.
    region_share: sum of w[i, j] over the tokens i of `region` (None without a region).
    region: the bool [N] mask given, or None.
    depth: the per-token depth used, float64 [N].
    """

    gh: int
    gw: int
    contributors: torch.Tensor
    neighbour_share: torch.Tensor
    region_share: torch.Tensor | None
    region: torch.Tensor | None
    depth: torch.Tensor

    def summary(self) -> dict:
        """Floats: median / mean / min / max of `contributors`, median / mean of
        `neighbour_share`, and with a region, `region_share_mean` (the mean over the region's
        own tokens of the weight they draw from the region) and `region_fraction` (its share of
        the N tokens)."""
        c, s = self.contributors, self.neighbour_share
        out = {"tokens": self.gh * self.gw,
               "contributors_median": float(c.median()), "contributors_mean": float(c.mean()),
               "contributors_min": float(c.min()), "contributors_max": float(c.max()),
               "neighbour_share_median": float(s.median()), "neighbour_share_mean": float(s.mean())}
        if self.region is not None:
            out["region_share_mean"] = float(self.region_share[self.region].mean())
            out["region_fraction"] = float(self.region.double().mean())
        return out


def _token_depth(depth, gh: int, gw: int, depth_scale: float) -> torch.Tensor:
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"depth must be a tensor ([N] per-token depth or an [H, W] map), got {type(depth).__name__}")
    if depth.dim() == 1:
        if depth.numel() != gh * gw:
            raise ValueError(f"depth is 1-D with {depth.numel()} values; a per-token depth needs gh * gw = {gh * gw}")
        d = depth.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(d).all()):
            raise ValueError("depth has non-finite values (nan or inf)")
        return d
    if depth.dim() != 2:
        raise ValueError(f"depth must be [N] (per token) or [H, W] (a depth map), got shape {tuple(depth.shape)}")
    return patch_depth(depth.detach().cpu(), gh, gw, scale=depth_scale).double()


def _region_mask(region, N: int) -> torch.Tensor | None:
    if region is None:
        return None
    if not isinstance(region, torch.Tensor) or region.dtype != torch.bool or region.numel() != N:
        raise ValueError(f"region must be a bool tensor of gh * gw = {N} elements ([N] or [gh, gw])")
    return region.detach().cpu().reshape(N)


def _weights(gh, gw, depth, sigma_d, sigma_s, alpha, beta, grid_unit, depth_scale):
    """(per-token depth [N], w [N, N]) in float64, exactly as the grid form of the op sees them."""
    from .reference import dscr_weights
    gh, gw = check_grid_form((gh, gw))
    check_grid_unit(grid_unit)
    depth_scale = check_depth_scale(depth_scale)
    sd, ss, a, b = _check_params(sigma_d, sigma_s, alpha, beta, op="dscr_weight_stats")
    d = _token_depth(depth, gh, gw, depth_scale)
    coords = patch_coords(gh, gw, unit=grid_unit, dtype=torch.float64)
    return d, dscr_weights(d, coords, sigma_d=sd, sigma_s=ss, alpha=a, beta=b)[0]


def _stats(gh, gw, d, w, region) -> DscrWeightStats:
    N = gh * gw
    sq = (w * w).sum(0)
    contributors = torch.where(sq > 0, 1.0 / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(sq))
    r = torch.arange(N) // gw
    c = torch.arange(N) % gw
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    near.fill_diagonal_(False)
    neighbour_share = (w * near).sum(0)
    region_share = None if region is None else (w * region[:, None]).sum(0)
    return DscrWeightStats(gh, gw, contributors, neighbour_share, region_share, region, d)


def dscr_weight_stats(gh: int, gw: int, depth: torch.Tensor, *, sigma_d: float = 0.6, sigma_s: float = 0.6,
                      alpha: float = 0.6, beta: float = 0.8, grid_unit: str = "patch", depth_scale: float = 255.0,
                      region: torch.Tensor | None = None) -> DscrWeightStats:
    """How local DSCR's weights are for one image: `DscrWeightStats` (per token: effective
    contributors 1 / sum_i w_ij^2, 8-neighbourhood share, share from `region`; `.summary()`).

    depth: an [H, W] depth map (pooled, min-max normalised and scaled to [0, depth_scale] by
    `kvfix.patch_depth`, as `kvfix.hf.DSCR` does) or a per-token depth [N] (used as given).
    grid_unit, depth_scale: the units (defaults "patch" and 255.0; "unit_square" and 1.0 are
    the earlier ones). region: optional bool mask [N] or [gh, gw] (e.g. the tokens of an
    object). sigma_d, sigma_s, alpha, beta: as in `kvfix.dscr_refine`.
    """
    d, w = _weights(gh, gw, depth, sigma_d, sigma_s, alpha, beta, grid_unit, depth_scale)
    return _stats(gh, gw, d, w, _region_mask(region, gh * gw))


def _describe(settings: dict) -> str:
    unit = settings.get("grid_unit", "patch")
    scale = float(settings.get("depth_scale", 255.0))
    text = f"{'patch units' if unit == 'patch' else 'unit square'}, depth [0, {scale:g}]"
    extra = ", ".join(f"{k}={v:g}" for k, v in settings.items() if k not in ("grid_unit", "depth_scale"))
    return text + (f", {extra}" if extra else "")


def dscr_weight_map_png(path, gh: int, gw: int, depth: torch.Tensor, tokens, *, settings=({},),
                        region: torch.Tensor | None = None, dpi: int = 100) -> str:
    """Write a PNG of DSCR's weights w[:, j] of each token j in `tokens` over the depth map.

    One panel per (setting, token): rows are `settings` (dicts of `dscr_weight_stats` keyword
    arguments: sigma_d, sigma_s, alpha, beta, grid_unit, depth_scale; `{}` = the defaults),
    columns are `tokens` (an index, a (row, col) pair, or a list of either; indices row-major).
    Each panel shows the depth
    (the map itself when an [H, W] map is given, else the per-token depth; grey, lighter =
    larger value), the weights as a heat overlay (opaque where w[i, j] is the column's maximum,
    transparent where it is 0), the token as a cyan cross, and in its title the effective
    number of contributors, the 8-neighbourhood share and, with `region`, the region share.
    Needs matplotlib (`pip install "kvfix[viz]"`). Returns str(path).
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('kvfix.dscr_weight_map_png needs matplotlib: pip install "kvfix[viz]" '
                          "(or pip install matplotlib)") from e
    gh, gw = check_grid_form((gh, gw))
    N = gh * gw
    if isinstance(tokens, int) or (isinstance(tokens, tuple) and len(tokens) == 2 and
                                   all(isinstance(t, int) for t in tokens)):
        tokens = [tokens]
    idx = []
    for t in tokens:
        j = t[0] * gw + t[1] if isinstance(t, tuple) and len(t) == 2 else t
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < N:
            raise ValueError(f"tokens must be indices in [0, {N}) or (row, col) pairs on the {gh} x {gw} grid, "
                             f"got {t!r}")
        idx.append(j)
    if not idx:
        raise ValueError("tokens is empty")
    settings = list(settings)
    keys = {"sigma_d", "sigma_s", "alpha", "beta", "grid_unit", "depth_scale"}
    if not settings or not all(isinstance(kw, dict) and set(kw) <= keys for kw in settings):
        raise ValueError(f"settings must be a non-empty sequence of dicts with keys among {sorted(keys)}")
    mask = _region_mask(region, N)
    fig = Figure(figsize=(3.2 * len(idx), 3.3 * len(settings)), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(settings), len(idx), squeeze=False)
    for row, kw in enumerate(settings):
        d, w = _weights(gh, gw, depth, kw.get("sigma_d", 0.6), kw.get("sigma_s", 0.6), kw.get("alpha", 0.6),
                        kw.get("beta", 0.8), kw.get("grid_unit", "patch"), kw.get("depth_scale", 255.0))
        st = _stats(gh, gw, d, w, mask)
        under = depth.detach().cpu().double() if depth.dim() == 2 else d.reshape(gh, gw)
        for col, j in enumerate(idx):
            ax = axes[row][col]
            ax.imshow(under.numpy(), cmap="gray", extent=(0, gw, gh, 0), interpolation="nearest")
            wj = w[:, j].reshape(gh, gw)
            top = float(wj.max())
            rel = (wj / top if top > 0 else wj).clamp(0, 1).numpy()
            heat = matplotlib.colormaps["inferno"](rel)
            heat[..., 3] = 0.9 * rel
            ax.imshow(heat, extent=(0, gw, gh, 0), interpolation="nearest")
            ax.plot([j % gw + 0.5], [j // gw + 0.5], marker="x", color="cyan", markersize=7, mew=2)
            title = (f"token ({j // gw}, {j % gw}): {float(st.contributors[j]):.1f} contributors\n"
                     f"8-neighbours {100 * float(st.neighbour_share[j]):.0f}%")
            if mask is not None:
                title += f", region {100 * float(st.region_share[j]):.0f}%"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(_describe(kw), fontsize=8)
    fig.suptitle("DSCR weights w[i, j] of the marked token j (heat: w / max w) over the depth (grey: lighter = larger)",
                 fontsize=8)
    fig.savefig(path)
    return str(path)
