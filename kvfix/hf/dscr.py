"""DSCR as a kvfix.hf method: refine the image spans of the KV cache once, right after prefill."""
from __future__ import annotations

import warnings

import torch

from .. import ops
from ..dscr_structured import dscr_plan
from ..geometry import patch_depth
from . import _compat
from .core import ForwardContext, Handle, Method, check_layers, resolve_layers
from .models import ImageSpan

__all__ = ["DSCR"]

_MISSING = ("error", "uniform")


class DSCR(Method):
    """Depth- and space-aware KV refinement (SPEC §1) after the prefill of every image.

    Args:
        layers: text decoder layers whose cache is refined. None: `[L // 4, L)` (SPEC default;
            the paper refines 10..39 of 40). Also a slice, a range or ints (negatives from L).
        sigma_d, sigma_s (> 0), alpha, beta (>= 0): the proximity kernel of `kvfix.dscr_refine`.
        keys_only: refine keys only, values untouched.
        missing_depth: what to do for an image without a depth map: "error" (default: a
            ValueError before the forward runs) or "uniform" (all depths equal, so only the
            spatial term distinguishes tokens).
        method: the algorithm of `kvfix.dscr_refine_cache_`: "auto" (default: structured on the
            image's patch grid where `kvfix.dscr_plan` finds it cheaper within the dtype's
            tolerance, dense otherwise), "structured" or "dense". Images are always passed in
            the grid form `(gh, gw)` (= `patch_coords(gh, gw)`).

    Depth maps come from `handle.images(depth_maps=[...])` / `handle.set_images(...)`, one per
    image, each [H, W] at any resolution (area-pooled to the patch grid and min-max normalised
    by `kvfix.patch_depth`), or [N] already on the grid (used as given), or "uniform".

    After each run, `last_images` lists the ImageSpans refined in the latest generation,
    `last_algorithms` the algorithm used for each ("structured" or "dense"), and `refine_calls`
    counts the calls into the kernel (one per image, all layers at once).
    """

    name = "dscr"

    def __init__(self, layers=None, *, sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6,
                 beta: float = 0.8, keys_only: bool = False, missing_depth: str = "error", method: str = "auto"):
        self.sigma_d, self.sigma_s, self.alpha, self.beta = ops._dscr_params(sigma_d, sigma_s, alpha, beta)
        if missing_depth not in _MISSING:
            raise ValueError(f"missing_depth must be one of {_MISSING}, got {missing_depth!r}")
        if not isinstance(keys_only, bool):
            raise TypeError(f"keys_only must be a bool, got {type(keys_only).__name__}")
        if method not in ops._DSCR_METHODS:
            raise ValueError(f"method must be one of {ops._DSCR_METHODS}, got {method!r}")
        self.method = method
        self.layers = check_layers(layers)
        self.keys_only = keys_only
        self.missing_depth = missing_depth
        self.selected_layers: tuple[int, ...] = ()
        self.last_images: list[ImageSpan] = []
        self.last_algorithms: list[str] = []
        self.refine_calls = 0
        self._warned_no_cache = False

    def __repr__(self):
        return (f"DSCR(layers={self.layers!r}, sigma_d={self.sigma_d}, sigma_s={self.sigma_s}, alpha={self.alpha}, "
                f"beta={self.beta}, keys_only={self.keys_only}, missing_depth={self.missing_depth!r}, method={self.method!r})")

    def bind(self, handle: Handle) -> None:
        L = handle.num_layers
        self.selected_layers = resolve_layers(self.layers, L, L // 4)
        if not self.selected_layers:
            raise ValueError(f"DSCR selects no layer of the {L}-layer text model (layers={self.layers!r})")

    def on_session_start(self, ctx: ForwardContext) -> None:
        self.last_images = []
        self.last_algorithms = []

    def on_prefill_start(self, ctx: ForwardContext) -> None:
        if ctx.pass_name != "main":
            return
        for img in ctx.images:  # fail before the forward runs, not after
            self._check_depth(img)

    def on_prefill_end(self, ctx: ForwardContext) -> None:
        if ctx.pass_name != "main" or not ctx.images:
            return
        if ctx.cache is None:
            if not self._warned_no_cache:
                warnings.warn("kvfix.hf.DSCR: the model ran without a KV cache (use_cache=False): nothing to refine",
                              stacklevel=2)
                self._warned_no_cache = True
            return
        needed = ctx.past_len + ctx.q_len
        kv = [_compat.layer_kv(ctx.cache, layer, needed) for layer in self.selected_layers]
        device = kv[0][0].device
        with torch.no_grad():
            for img in ctx.images:
                depth = self._token_depth(img).to(device)
                b, s, e = img.batch, img.start, img.end
                keys = [k[b:b + 1, :, s:e] for k, _ in kv]
                values = None if self.keys_only else [v[b:b + 1, :, s:e] for _, v in kv]
                params = dict(sigma_d=self.sigma_d, sigma_s=self.sigma_s, alpha=self.alpha, beta=self.beta)
                strict = min((k.dtype for k in keys), key=lambda dt: torch.finfo(dt).eps)
                plan = dscr_plan(img.gh, img.gw, depth, dtype=strict, method=self.method, **params)
                ops.dscr_refine_cache_(keys, values, depth, (img.gh, img.gw), method=plan.algorithm, **params)
                self.last_algorithms.append(plan.algorithm)
                self.refine_calls += 1
        self.last_images.extend(ctx.images)

    # ---- depth -----------------------------------------------------------------------------

    def _check_depth(self, img: ImageSpan) -> None:
        d = img.depth_map
        if d is None:
            if self.missing_depth == "error":
                raise ValueError(
                    f"DSCR needs a depth map for image {img.index} (batch item {img.batch}): use "
                    "`with handle.images(depth_maps=[...]): model.generate(...)`, one map per image, or "
                    "depth_maps=\"uniform\" / DSCR(missing_depth=\"uniform\") to run without depth")
            return
        if isinstance(d, str):
            return
        if d.dim() == 1:
            if d.numel() != img.length:
                raise ValueError(f"depth map of image {img.index} is 1-D with {d.numel()} values; a per-token "
                                 f"depth needs gh * gw = {img.length}")
        elif d.dim() != 2:
            raise ValueError(f"depth map of image {img.index} must be [H, W] or [N], got {tuple(d.shape)}")
        if d.numel() == 0 or not bool(torch.isfinite(d.float()).all()):
            raise ValueError(f"depth map of image {img.index} is empty or has non-finite values")

    def _token_depth(self, img: ImageSpan) -> torch.Tensor:
        self._check_depth(img)
        d = img.depth_map
        if d is None or isinstance(d, str):
            return torch.zeros(img.length, dtype=torch.float32)
        if d.dim() == 1:
            return d.to(torch.float32)
        return patch_depth(d, img.gh, img.gw)
