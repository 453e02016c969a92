"""DSCR as a kvfix.hf method: every token after an image attends to that image's refined keys
and values at the selected layers (METHODS §1, "When"), computed in the forward that carries the image."""
from __future__ import annotations

import torch

from ..dscr_structured import _check_params
from ..geometry import check_depth_scale, check_grid_unit, pool_depth
from ..ops import dscr as dscr_ops
from . import _compat
from .core import ForwardContext, Handle, Method, check_layers, resolve_layers
from .models import ImageSpan

__all__ = ["DSCR"]

_MISSING = ("error", "uniform")


class DSCR(Method):
    """Depth- and space-aware KV refinement (METHODS §1), with the timing of a split prefill.

    Semantics (METHODS §1, "When"): every token after an image, from the question to the last
    generated token, attends to that image's refined keys/values at the selected layers; the
    image's own tokens and everything before it are computed by the unmodified model. This is
    exactly running the prompt up to the image end, refining that span of the cache
    (`kvfix.dscr_refine_cache_`), and continuing; with several images each is refined at its
    own end (a later image, and everything after it, sees the earlier ones refined). So the
    first answer token, computed by the prefill, already reads the refined image.

    How (one forward, no split): inside the attention of each selected layer, in the forward
    that carries the images, the image span of that layer's keys (and values) is refined with
    the DSCR op, and the layer's attention (the model's own implementation, or the methods
    inside DSCR's in the chain, e.g. CMAC) runs once per refinement level: level j = the
    first j images of each batch item refined, on a copy of the keys/values. Each query keeps
    the output of its own level (the number of its item's images that end at or before its
    cache position), so a query before its item's first image end gets exactly the plain
    attention. The keys a layer sees for tokens after an image were computed from hidden
    states that already read refined images below: the result is that of the split prefill.
    At the end of the forward the refined spans are written into the cache, so decoding reads
    them; decoding forwards carry no image and refine nothing. Without a cache
    (`use_cache=False`) every forward is a full forward with the images and refines again.
    The cost is the refinement itself plus one more attention call per selected layer and
    image level, each over the queries from the level's first image end (in any item) on, the
    last queries of the block, which is what every attention function and CMAC expect (a single
    image per item: the plain call over all queries, the refined one over the question and
    answer tokens). That holds with the eager and SDPA implementations (their masks lose the
    rows before; SDPA's causal flag, which would align a shorter query block with the first
    keys, becomes an explicit mask); with others (flash, flex) each call covers the whole query
    block. The refined spans of the selected layers are held until the forward ends (one copy
    of the image spans).

    Args:
        layers: text decoder layers whose image keys/values are refined. None: `[L // 4, L)`
            (METHODS default; the paper refines 10..39 of 40). Also a slice, a range or ints
            (negatives from L).
        sigma_d, sigma_s (> 0), alpha, beta (>= 0): the proximity kernel of `kvfix.dscr_refine`.
        keys_only: refine keys only, values untouched.
        missing_depth: what to do for an image without a depth map: "error" (default: a
            ValueError before the forward runs) or "uniform" (all depths equal, so only the
            spatial term distinguishes tokens).
        method: the algorithm of the DSCR op: "auto" (default: structured on the image's patch
            grid where `kvfix.dscr_plan` finds it cheaper within the dtype's tolerance, dense
            otherwise; at the default units a depth map with more than one level runs dense),
            "structured" or "dense". Images are always passed in the grid form `(gh, gw)`.
        grid_unit: the coordinates of the grid form, `patch_coords(gh, gw, unit=grid_unit)`:
            "patch" (default: adjacent patches 1 apart, so the spatial term smooths neighbouring
            patches) or "unit_square" (the earlier units; kvfix/geometry.py explains).
        depth_scale: depth maps are min-max normalised to [0, depth_scale] per image: 255.0
            (default: the levels of an 8-bit depth image, so sigma_d = 0.6 separates surfaces a
            few levels apart) or 1.0 (the earlier units). Per-token depths [N] are used as given.

    Depth maps come from `handle.images(depth_maps=[...])` / `handle.set_images(...)`, one per
    image, each [H, W] at any resolution (area-pooled to the patch grid, min-max normalised and
    scaled to [0, depth_scale] by `kvfix.patch_depth`), or [N] already on the grid (used as
    given), or "uniform".

    The weights of an image are planned once per forward (`kvfix.dscr_plan`) on the host from
    the pooled depth and serve every selected layer; the op is called once per image and layer
    (on all batch rows showing the image). Depth maps on the CPU (as depth-estimation pipelines
    return them) cost no host synchronisation on a GPU model: pooling and planning run on the CPU
    and the structure goes to the GPU through pinned memory. Maps on the GPU are pooled there and
    the pooled depths of all the prompt's images read back together (one synchronisation per
    prompt, not per image).

    Stacking: KVSmooth (decoding only) and SCR (its diagnostic pass is an auxiliary pass, which
    DSCR leaves alone: SCR scores the unrefined model; its redistribution acts on the hidden
    states of the real prefill, in which DSCR acts as above) need nothing special. CMAC's
    attention is innermost, so it runs once per level with the level's keys and values (its
    calibration then rotates the refined image keys for the after-image queries). With CMAC's
    batch of [original; distorted] rows, row r shows the images of item r mod B; in its forked
    prefill the distorted rows' pass is refined for its own queries, and the cache receives the
    spans refined in the original rows' pass (CMAC copies the prefix up to the image end into
    the distorted rows before decoding).

    After each run, `last_images` lists the ImageSpans refined in the latest generation,
    `last_algorithms` the algorithm used for each grid ("structured" or "dense"; one per image
    for single-grid models), `refine_calls` counts images refined (one per image and forward
    that carries it) and `kernel_calls` the calls into the DSCR op (one per grid, selected layer
    and attention pass). Each grid of an image is refined on its own (its `gh x gw` tokens; a
    row stride skips row-end tokens, which stay as they are), with the part of the image's depth
    map the grid shows (`Grid.region`, docs/ADAPTERS.md).
    """

    name = "dscr"
    uses_attention = True
    attention_phases = frozenset({"prefill"})  # refines prompt forwards only (on_prefill_start)

    def __init__(self, layers=None, *, sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6,
                 beta: float = 0.8, keys_only: bool = False, missing_depth: str = "error", method: str = "auto",
                 grid_unit: str = "patch", depth_scale: float = 255.0):
        self.sigma_d, self.sigma_s, self.alpha, self.beta = _check_params(sigma_d, sigma_s, alpha, beta, op="DSCR")
        self.grid_unit = check_grid_unit(grid_unit)
        self.depth_scale = check_depth_scale(depth_scale)
        if missing_depth not in _MISSING:
            raise ValueError(f"missing_depth must be one of {_MISSING}, got {missing_depth!r}")
        if not isinstance(keys_only, bool):
            raise TypeError(f"keys_only must be a bool, got {type(keys_only).__name__}")
        if method not in dscr_ops._DSCR_METHODS:
            raise ValueError(f"method must be one of {dscr_ops._DSCR_METHODS}, got {method!r}")
        self.method = method
        self.layers = check_layers(layers)
        self.keys_only = keys_only
        self.missing_depth = missing_depth
        self.selected_layers: tuple[int, ...] = ()
        self._selected: frozenset = frozenset()
        self.last_images: list[ImageSpan] = []
        self.last_algorithms: list[str] = []
        self.refine_calls = 0
        self.kernel_calls = 0
        self._fw: _Forward | None = None

    def __repr__(self):
        return (f"DSCR(layers={self.layers!r}, sigma_d={self.sigma_d}, sigma_s={self.sigma_s}, alpha={self.alpha}, "
                f"beta={self.beta}, keys_only={self.keys_only}, missing_depth={self.missing_depth!r}, "
                f"method={self.method!r}, grid_unit={self.grid_unit!r}, depth_scale={self.depth_scale})")

    @property
    def _params(self):
        return self.sigma_d, self.sigma_s, self.alpha, self.beta

    def bind(self, handle: Handle) -> None:
        if not handle.adapter.grid_support:
            raise ValueError(f"kvfix.hf.DSCR needs images on a patch grid: {handle.adapter.grid_refusal}")
        L = handle.num_layers
        self.selected_layers = resolve_layers(self.layers, L, L // 4)
        if not self.selected_layers:
            raise ValueError(f"DSCR selects no layer of the {L}-layer text model (layers={self.layers!r})")
        self._selected = frozenset(self.selected_layers)
        self._fw = None

    def unbind(self, handle: Handle) -> None:
        self._fw = None

    def on_session_start(self, ctx: ForwardContext) -> None:
        self.last_images = []
        self.last_algorithms = []

    def on_prefill_start(self, ctx: ForwardContext) -> None:
        if ctx.pass_name != "main":
            return
        self._fw = None
        if not ctx.images:
            return
        maps = [self._check_depth(img) for img in ctx.images]  # fail before the forward runs, not after
        depths = self._token_depths(ctx.images, maps)
        self._fw = _Forward(ctx, depths, store=_compat.step_inputs(ctx.inputs)[4] is not False)

    def on_prefill_end(self, ctx: ForwardContext) -> None:
        fw = self._fw
        if fw is None or fw.ctx is not ctx:
            return
        self._fw = None
        if not fw.routes:  # no selected layer's attention ran
            return
        if ctx.cache is not None and fw.pending:
            needed = ctx.past_len + ctx.q_len
            with torch.no_grad():
                for layer, entries in fw.pending.items():
                    keys, values = _compat.layer_kv(ctx.cache, layer, needed)
                    for g, rows, k_hat, v_hat in entries:
                        cols = g.cols(0, keys.device)
                        keys[rows, :, cols] = k_hat
                        if v_hat is not None:
                            values[rows, :, cols] = v_hat
        routes = next(iter(fw.routes.values()))
        self.last_images.extend(ctx.images)
        self.last_algorithms.extend("dense" if r[0] == "dense" else "structured" for r in routes)
        self.refine_calls += len(ctx.images)

    # ---- the attention of a selected layer ---------------------------------------------------

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        fw = self._fw
        if fw is None or ctx is None or fw.ctx is not ctx or layer_idx not in self._selected:
            return call_next(query, key, value, attention_mask, **kwargs)
        R, Tq, T = query.shape[0], query.shape[2], key.shape[2]
        B = ctx.batch_size
        if R % B:
            raise ValueError(f"kvfix.hf.DSCR: the attention of layer {layer_idx} got {R} rows for a batch of {B}")
        if T < ctx.past_len + ctx.q_len:
            raise ValueError(f"kvfix.hf.DSCR: layer {layer_idx} holds {T} positions but {ctx.past_len + ctx.q_len} "
                             "are needed (a sliding-window layer past its window cannot be refined)")
        offset = ctx.past_len + ctx.q_len - Tq
        level, lo, hi, firsts = fw.levels(R, Tq, offset, query.device)
        store = fw.store and layer_idx not in fw.pending  # the first pass of the layer fills the cache
        if hi == 0 and not store:
            return call_next(query, key, value, attention_mask, **kwargs)
        with torch.no_grad():
            refined = self._refine(fw, key, None if self.keys_only else value, R, B)
        if store:
            fw.pending[layer_idx] = [(g, rows, k_hat, v_hat) for (g, _, rows, k_hat, v_hat) in refined]
        out = call_next(query, key, value, attention_mask, **kwargs) if lo == 0 else None
        if hi == 0:
            return out
        k_lvl = key.clone()
        v_lvl = value if self.keys_only else value.clone()
        for j in range(1, hi + 1):
            for g, order, rows, k_hat, v_hat in refined:
                if order == j:
                    cols = g.cols(0, k_lvl.device)
                    k_lvl[rows, :, cols] = k_hat
                    if v_hat is not None:
                        v_lvl[rows, :, cols] = v_hat
            if j < lo:
                continue
            # the level's call for the queries from the first one past the j-th image end on (the
            # last ones, as every attention function and CMAC's expect), where the mask can say so
            a = firsts[j - 1] if out is not None else 0
            mask = fw.suffix_mask(self._base_attention(), attention_mask, a, Tq, T, offset, query.device)
            if mask is _NO_SUFFIX:
                a, mask = 0, attention_mask
            res = call_next(query[:, :, a:], k_lvl, v_lvl, mask, **kwargs)
            out = res if out is None else _select(*fw.selection(R, Tq, offset, query.device, j, a), res, out, a)
        return out

    def _base_attention(self) -> str | None:
        """The text model's own attention implementation under kvfix's (e.g. "sdpa"), if known."""
        return getattr(getattr(self, "_kvfix_handle", None), "_base_attn", None)

    def _refine(self, fw: "_Forward", key, value, R: int, B: int) -> list:
        """[(grid, its image's order in its item, rows, k_hat, v_hat)] for this layer's keys/values."""
        routes = fw.route(self, key.device, key.dtype)
        out = []
        for g, order, route in zip(fw.grids, fw.order, routes):
            rows = slice(g.batch, R, B)
            cols = g.cols(0, key.device)  # a row stride (row-end tokens between the rows): gathered
            k = key[rows, :, cols]
            v = None if value is None else value[rows, :, cols]
            out.append((g, order, rows) + _apply(route, k, v, self._params))
            self.kernel_calls += 1
        return out

    # ---- depth -----------------------------------------------------------------------------

    def _check_depth(self, img: ImageSpan):
        """The image's depth map, its form checked (its values are read in `_token_depths`), or
        "uniform", or None (no map: uniform, or an error as missing_depth says)."""
        d = img.depth_map
        if d is None:
            if self.missing_depth == "error":
                raise ValueError(
                    f"DSCR needs a depth map for image {img.index} (batch item {img.batch}): use "
                    "`with handle.images(depth_maps=[...]): model.generate(...)`, one map per image, or "
                    "depth_maps=\"uniform\" / DSCR(missing_depth=\"uniform\") to run without depth")
            return None
        if isinstance(d, str):
            return d
        if d.dtype == torch.bool or d.is_complex():
            raise TypeError(f"depth map of image {img.index} must be real-valued, got {d.dtype}")
        if d.dim() == 1:
            if len(img.grids) != 1 or d.numel() != img.grids[0].length:
                raise ValueError(f"depth map of image {img.index} is 1-D with {d.numel()} values; a per-token "
                                 f"depth needs gh * gw = {img.grids[0].length if img.grids else 0} values of the "
                                 f"image's one grid (it has {len(img.grids)})")
        elif d.dim() != 2:
            raise ValueError(f"depth map of image {img.index} must be [H, W] or [N], got {tuple(d.shape)}")
        elif any(g.region is None for g in img.grids):
            raise ValueError(f"image {img.index} (batch item {img.batch}) is cut into tiles whose arrangement the "
                             "model's inputs do not say, so the part of its depth map each tile shows is unknown: "
                             "pass it with handle.images(depth_maps=..., tiles=[(rows, cols), ...]), one per image "
                             "(docs/ADAPTERS.md), or depth_maps=\"uniform\"")
        if d.numel() == 0 or d.device.type == "meta":
            raise ValueError(f"depth map of image {img.index} is empty or has non-finite values"
                             + (" (a meta tensor has no values)" if d.device.type == "meta" else ""))
        return d.detach()

    def _token_depths(self, images: list, maps: list) -> list:
        """Per grid of the images, in order, its per-token depth (float32 [N] on the CPU, where the
        plan reads it): the part of its image's depth map the grid shows (`g.region`) area-pooled
        to the grid where the map lies (`pool_depth`; a 1-D map as given), read back together with
        whether each map is finite: one copy per device the maps lie on, whatever the number of
        images (maps on a GPU: one synchronisation per prompt)."""
        pooled, finite = [], []  # per grid: tensor or None (no map); per map: its flag or None
        for img, d in zip(images, maps):
            tensor = isinstance(d, torch.Tensor)
            finite.append(torch.isfinite(d.float()).all() if tensor else None)
            for g in img.grids:
                if not tensor:
                    pooled.append(None)
                elif d.dim() == 1:
                    pooled.append(d.to(torch.float32))
                else:
                    pooled.append(pool_depth(_crop(d, g.region).to(torch.float64), g.gh, g.gw, self.depth_scale))
        host: dict = {}  # device -> the values of everything on it, in order, on the host
        parts: dict = {}
        for t in [t for t in pooled if t is not None] + [f for f in finite if f is not None]:
            parts.setdefault(t.device, []).append(t.reshape(-1).to(torch.float32))
        for dev, ts in parts.items():
            host[dev] = iter(torch.cat(ts).cpu().split([t.numel() for t in ts]))
        pooled = [None if t is None else next(host[t.device]) for t in pooled]
        for img, f in zip(images, finite):
            if f is not None and not bool(next(host[f.device])):
                raise ValueError(f"depth map of image {img.index} is empty or has non-finite values")
        return [torch.zeros(g.length, dtype=torch.float32) if t is None else t
                for t, g in zip(pooled, [g for img in images for g in img.grids])]


class _Forward:
    """DSCR's state during one main forward that carries images."""

    def __init__(self, ctx: ForwardContext, depths: list, store: bool):
        self.ctx = ctx
        self.grids = [g for img in ctx.images for g in img.grids]
        self.depths = depths        # per grid: float32 [N]
        self.store = store          # keep the refined spans for the cache (not with use_cache=False)
        self.pending: dict = {}     # layer -> [(grid, rows, k_hat, v_hat)], written into the cache at the end
        self.routes: dict = {}      # (device, dtype) -> per grid: what the op runs (dscr_ops._dscr_route)
        self._levels: dict = {}     # (R, Tq, offset, device) -> (level [R, Tq], min, max, firsts)
        self._level_host: dict = {}  # the same key -> level on the host
        self._selections: dict = {}  # (levels' key, j, a) -> (level[:, a:] == j on the device, all of it)
        self._masks: dict = {}      # (base, mask, a, Tq, T, offset, device) -> (mask, its queries [a, Tq))
        ends: dict[int, list] = {}
        for img in ctx.images:
            ends.setdefault(img.batch, []).append(img.end)
        self.ends = {b: sorted(e) for b, e in ends.items()}
        # per grid: the 1-based rank of its image's end among its item's images (the split prefill
        # refines every grid of an image at the image's end)
        self.order = [self.ends[g.batch].index(g.image.end) + 1 for g in self.grids]

    def route(self, dscr: DSCR, device, dtype) -> list:
        key = (device, dtype)
        routes = self.routes.get(key)
        if routes is None:
            routes = self.routes[key] = [
                dscr_ops._dscr_route(device, dtype, d, (g.gh, g.gw), dscr.method, dscr._params,
                                dscr.grid_unit)
                for g, d in zip(self.grids, self.depths)]
        return routes

    def levels(self, R: int, Tq: int, offset: int, device):
        """(level, min, max, firsts): level[r, i] is how many images of row r's item end at or before
        cache position offset + i; firsts[j - 1] the first query index i with level[r, i] >= j in
        any row (host ints: no synchronisation)."""
        key = (R, Tq, offset, device)
        got = self._levels.get(key)
        if got is None:
            B = self.ctx.batch_size
            m = max((len(e) for e in self.ends.values()), default=0)
            ends = torch.full((R, max(m, 1)), offset + Tq + 1, dtype=torch.int64)
            for r in range(R):
                e = self.ends.get(r % B, [])
                ends[r, :len(e)] = torch.tensor(e, dtype=torch.int64)
            pos = torch.arange(offset, offset + Tq, dtype=torch.int64)
            level = (ends[:, None, :] <= pos[None, :, None]).sum(-1)
            hi = int(level.max())
            firsts = [int((level >= j).any(0).nonzero()[0, 0]) for j in range(1, hi + 1)]
            got = self._levels[key] = (level.to(device), int(level.min()), hi, firsts)
            self._level_host[key] = level
        return got

    def selection(self, R: int, Tq: int, offset: int, device, j: int, a: int):
        """(level[:, a:] == j on `device`, whether that holds for every query): the queries of
        [a, Tq) that the j-th level's call answers; each layer of the forward asks the same (host
        work: no synchronisation)."""
        key = (R, Tq, offset, device, j, a)
        got = self._selections.get(key)
        if got is None:
            sel = self._level_host[(R, Tq, offset, device)][:, a:] == j
            got = self._selections[key] = (sel.to(device), bool(sel.all()))
        return got

    def suffix_mask(self, base, mask, a: int, Tq: int, T: int, offset: int, device):
        """`_query_suffix_mask`, made once per forward for the mask its layers share."""
        key = (base, id(mask), a, Tq, T, offset, device)
        got = self._masks.get(key)
        if got is None or got[0] is not mask:
            got = self._masks[key] = (mask, _query_suffix_mask(base, mask, a, Tq, T, offset, device))
        return got[1]


def _crop(d: torch.Tensor, region) -> torch.Tensor:
    """The part `region = (top, left, bottom, right)` (fractions) of a depth map [H, W]."""
    if tuple(region) == (0.0, 0.0, 1.0, 1.0):
        return d
    H, W = d.shape
    top, left, bottom, right = region
    y0, x0 = int(round(top * H)), int(round(left * W))
    y1, x1 = max(int(round(bottom * H)), y0 + 1), max(int(round(right * W)), x0 + 1)
    return d[y0:y1, x0:x1]


def _apply(route, k, v, params):
    """(k_hat, v_hat) of one image span: the DSCR op on a planned route (`dscr_ops._dscr_route`)."""
    outs = dscr_ops._dscr_run(route, k, v, params)
    return outs[0], (outs[1] if v is not None else None)


_NO_SUFFIX = object()


def _query_suffix_mask(base, mask, a: int, Tq: int, T: int, offset: int, device):
    """The attention mask for queries [a, Tq) of a call whose queries [0, Tq) sit at cache
    positions offset + i, or _NO_SUFFIX where the call must keep every query. A 4-D mask (eager,
    SDPA with padding) loses its first a rows; SDPA's None (its causal flag, which aligns the
    queries with the first keys) becomes the explicit causal mask; eager's None (no masking)
    stays. Other implementations and masks (flash attention's, flex attention's) keep the whole
    call."""
    if a == 0:
        return mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and base in ("sdpa", "eager"):
        return mask if mask.shape[-2] == 1 else mask[:, :, a:]
    if mask is None and base == "eager":
        return None
    if mask is None and base == "sdpa":
        pos = torch.arange(offset + a, offset + Tq, device=device)
        return (torch.arange(T, device=device)[None, :] <= pos[:, None])[None, None]
    return _NO_SUFFIX


def _select(mask, whole: bool, new, old, a: int = 0):
    """The attention result `old` with its queries [a, Tq) replaced by `new` (the call on those
    queries) where mask [R, Tq - a] (outputs [R, Tq, Hq, D], weights [R, Hq, Tq, T] or None);
    `whole`: the mask holds everywhere (one image per row: the new result as it is)."""
    w_new, w_old = new[1], old[1]
    if whole:
        out, weights = new[0], (None if w_new is None or w_old is None else w_new)
    else:
        out = torch.where(mask[:, :, None, None], new[0], old[0][:, a:])
        weights = None if w_new is None or w_old is None else torch.where(mask[:, None, :, None], w_new,
                                                                          w_old[:, :, a:])
    if a:
        out = torch.cat([old[0][:, :a], out], 1)
        weights = None if weights is None else torch.cat([w_old[:, :, :a], weights], 2)
    return out, weights
