"""SCR as a kvfix.hf method: spatial credit redistribution, two passes per prompt (METHODS §3)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import ops
from ..dscr_structured import to_device_async
from . import _compat
from .core import ForwardContext, Handle, Method, check_layers, resolve_layers
from .models import GridSpan

__all__ = ["SCR"]

_PASS = "scr_diagnostic"


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class SCR(Method):
    """Spatial credit redistribution (METHODS §3): re-weight the image tokens' residual stream
    around the patches the prompt's text attends to most.

    When a generation's prefill carries images, two passes run instead of one:

    1. diagnostic pass (`handle.auxiliary_pass("scr_diagnostic")`): the prompt runs once without
       a cache, through the model's own attention (SDPA, eager, ...; no `output_attentions`).
       In each diagnostic layer the attention hook hands the post-RoPE query and the keys to
       `kvfix.scr_scores`: per image, the queries are the text tokens after the image span
       (image tokens of later images and padding excluded), the keys are all positions, with
       the model's scale and its causal / padding mask. The scores (attention mass per patch,
       summed over those queries, averaged over query heads) are averaged over the diagnostic
       layers. Only the layers up to the last diagnostic one run (the text model's layer
       list is cut to them for the pass, and restored after); its output and cache are dropped.
    2. the real prefill: the hidden states of each image's tokens entering every
       redistribution layer go through `kvfix.scr_redistribute_` on the image's patch grid
       (LLaVA: the square patch grid; Qwen2-VL / Qwen2.5-VL: the merged grid of
       `image_grid_thw`, non-square included). Decoding then runs on that cache; decode steps
       are untouched. Every row showing an image is redistributed (with CMAC, row r shows batch
       item r mod B), and the image is sliced by the positions of the rows in the forward: a
       partial pass (CMAC's forked prefill: the distorted rows on the prompt after the first
       image end of the batch) redistributes only the image tokens it holds, never its text
       tokens; for an image cut by its start it takes the full pass's redistributed rows (the
       tokens up to the image end are the same; the sources before the cut are not in the
       pass). To that end the redistributed image rows of each layer are kept until the
       prefill ends (one copy of each image's hidden states per redistribution layer).

    Args:
        layers: decoder layers whose input is redistributed. None: layers 1..4 (METHODS default,
            inclusive; those that exist). Also a slice, a range or ints (negatives from L).
        diagnostic_layers: layers whose attention gives the scores. None: the first two
            (METHODS choice; `(0,)` for a one-layer model). Same forms as `layers`.
        top_k: sources per image (>= 1; capped at the candidate patches).
        lam: source scaling (> 0; sources are divided by lam, their 8-neighbours receive
            `(lam - 1) * h[source]`); 1.0 leaves the hidden states unchanged.
        exclude_border: border patches are never sources.

    Semantic choices: an image with no text token after it (nothing asked about it yet) is
    left unchanged. A prompt with images that continues a cache (a second turn) works the same
    way: its diagnostic pass runs on a copy of the diagnostic layers' cached prefix (the cache
    itself is never written by it; DynamicCache-style layers). Without a KV cache
    (`use_cache=False`) every full forward is a prefill and runs both passes. Stacked with the
    other methods, the scores are the plain model's and the redistributed prefill is the model
    DSCR, CMAC's two branches and KVSmooth act on (docs/STACKING.md).

    After each run: `last_scores` lists `(ImageSpan, scores [N] float32)` of the latest
    prefill's images, `diagnostic_passes` counts diagnostic passes and `redistribute_calls`
    the `scr_redistribute_` calls (images x redistribution layers).
    """

    name = "scr"
    uses_attention = True
    attention_phases = frozenset({"prefill"})  # scores in its diagnostic pass over the prompt only
    layer_phases = frozenset({"prefill"})  # redistributes in prompt forwards only: decoding layers carry no hook

    def __init__(self, layers=None, *, diagnostic_layers=None, top_k: int = 32, lam: float = 1.1,
                 exclude_border: bool = True):
        self.top_k = _check_int(top_k, "top_k", 1)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be finite and > 0, got {lam}")
        if not isinstance(exclude_border, bool):
            raise TypeError(f"exclude_border must be a bool, got {type(exclude_border).__name__}")
        self.lam = float(lam)
        self.exclude_border = exclude_border
        self.layers = check_layers(layers)
        self.diagnostic_layers = check_layers(diagnostic_layers)
        self.selected_layers: tuple[int, ...] = ()
        self.selected_diagnostic_layers: tuple[int, ...] = ()
        self.last_scores: list[tuple[GridSpan, torch.Tensor]] = []
        self.diagnostic_passes = 0
        self.redistribute_calls = 0
        self._redistribute: frozenset = frozenset()
        self._diagnostic: frozenset = frozenset()
        self._pending = None   # (ctx of the real prefill, [(ImageSpan, scores [1, N])], kept spans)
        self._diag = None      # state of the running diagnostic pass

    def __repr__(self):
        return (f"SCR(layers={self.layers!r}, diagnostic_layers={self.diagnostic_layers!r}, top_k={self.top_k}, "
                f"lam={self.lam}, exclude_border={self.exclude_border})")

    # ---- lifecycle -------------------------------------------------------------------------

    def bind(self, handle: Handle) -> None:
        if not handle.adapter.grid_support:
            raise ValueError(f"kvfix.hf.SCR needs images on a patch grid: {handle.adapter.grid_refusal}")
        L = handle.num_layers
        self.selected_layers = (tuple(range(1, min(5, L))) if self.layers is None
                                else resolve_layers(self.layers, L, 1))
        if not self.selected_layers:
            raise ValueError(f"SCR selects no layer of the {L}-layer text model (layers={self.layers!r}; "
                             "the default is 1..4)")
        self.selected_diagnostic_layers = (tuple(range(min(2, L))) if self.diagnostic_layers is None
                                           else resolve_layers(self.diagnostic_layers, L, 0))
        if not self.selected_diagnostic_layers:
            raise ValueError(f"SCR selects no diagnostic layer of the {L}-layer text model "
                             f"(diagnostic_layers={self.diagnostic_layers!r})")
        self._redistribute = frozenset(self.selected_layers)
        self._diagnostic = frozenset(self.selected_diagnostic_layers)
        self._pending = self._diag = None

    def unbind(self, handle: Handle) -> None:
        self._pending = self._diag = None

    def on_session_start(self, ctx: ForwardContext) -> None:
        self.last_scores = []

    # ---- pass 1: diagnostic ----------------------------------------------------------------

    def on_prefill_start(self, ctx: ForwardContext) -> None:
        if ctx.pass_name != "main" or not ctx.images:
            return
        self._pending = None
        grids = [g for img in ctx.images for g in img.grids]
        queries = self._query_positions(ctx, grids)
        scores = [None] * len(grids)
        if any(q is not None for q in queries):
            scores = self._diagnose(ctx, grids, queries)
        entries = [(g, s) for g, s in zip(grids, scores) if s is not None]
        self.last_scores = [(img, s[0]) for img, s in entries]
        # the redistributed spans per (layer, image) of this prefill, for a later partial pass
        self._pending = (ctx, entries, {})

    def on_prefill_end(self, ctx: ForwardContext) -> None:
        if self._pending is not None and self._pending[0] is ctx:
            self._pending = None

    def _query_positions(self, ctx: ForwardContext, grids: list) -> list:
        """Per grid, a long tensor on the model's device of its query positions (text tokens
        after its image, padding excluded; indices into this forward's tokens, cache position -
        past_len), or None. Found on the host from `ctx.host_text` (numpy: no device op, no
        synchronisation per image) and sent through pinned memory."""
        text = ctx.host_text.numpy()
        device = ctx.input_ids.device
        out = []
        for g in grids:
            first = g.image.end - ctx.past_len
            pos = np.flatnonzero(text[g.batch, first:]) + first
            out.append(to_device_async(torch.from_numpy(pos), device) if pos.size else None)
        return out

    def _diagnose(self, ctx: ForwardContext, grids: list, queries: list) -> list:
        last = max(self.selected_diagnostic_layers)
        # a continued prompt runs on a copy of the diagnostic layers' cached prefix
        prefix = _compat.prefix_cache(ctx.cache, last + 1, ctx.past_len) if ctx.past_len else None
        kwargs = _compat.diagnostic_inputs(ctx.inputs, prefix)
        self._diag = {"grids": grids, "queries": queries, "sums": [None] * len(grids), "seen": set(),
                      "offset": ctx.past_len}
        adapter = ctx.handle.adapter
        try:
            # only the layers up to the last diagnostic one run; the pass's output is dropped
            with (torch.no_grad(), ctx.handle.auxiliary_pass(_PASS),
                  _compat.first_layers(adapter.text_model(), last + 1)):
                adapter.step_module()(**kwargs)
            sums, seen = self._diag["sums"], self._diag["seen"]
        finally:
            self._diag = None
        if seen != self._diagnostic:
            raise RuntimeError(f"kvfix.hf.SCR: the diagnostic pass ran the attention of layers {sorted(seen)}, "
                               f"expected {sorted(self._diagnostic)}")
        self.diagnostic_passes += 1
        n = len(self.selected_diagnostic_layers)
        return [None if s is None else s / n for s in sums]

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        diag = self._diag
        if diag is None or ctx is None or ctx.pass_name != _PASS or layer_idx not in self._diagnostic:
            return call_next(query, key, value, attention_mask, **kwargs)
        scale = _compat.attention_scale(module, kwargs, query.shape[-1])
        with torch.no_grad():
            for i, (img, pos) in enumerate(zip(diag["grids"], diag["queries"])):
                if pos is None:
                    continue
                b = img.batch
                pos = pos.to(query.device)
                mask = _query_mask(attention_mask, b, pos, diag["offset"], key.shape[-2])
                s = ops.scr_scores(query[b:b + 1, :, pos], key[b:b + 1], (img.start, img.end),
                                   scale=scale, mask=mask)
                if not img.contiguous:  # the grid's tokens among those of its extent (full softmax rows)
                    s = s[:, img.cols(img.start, s.device)]
                diag["sums"][i] = s if diag["sums"][i] is None else diag["sums"][i] + s
        diag["seen"].add(layer_idx)
        return call_next(query, key, value, attention_mask, **kwargs)

    # ---- pass 2: redistribution ------------------------------------------------------------

    def layer_input(self, ctx, layer_idx: int, hidden_states: torch.Tensor):
        pending = self._pending
        if pending is None or pending[0] is not ctx or layer_idx not in self._redistribute or not pending[1]:
            return None
        R, T = hidden_states.shape[:2]
        B = ctx.batch_size
        if R % B:
            raise ValueError(f"kvfix.hf.SCR: layer {layer_idx} got {R} rows for a batch of {B}")
        # the rows in this forward: a suffix of the prompt (a method's partial pass, CMAC's forked
        # distorted rows, runs the prompt after its split), cache positions [off, off + T)
        off = ctx.past_len + ctx.q_len - T
        kept = pending[2]
        out = None
        with torch.no_grad():
            for i, (img, scores) in enumerate(pending[1]):
                a, e = max(img.start, off), min(img.end, off + T)
                if a >= e:  # no token of this image in the forward (it lies in the copied prefix)
                    continue
                if out is None:
                    out = hidden_states.clone()  # not in place: the input may be referenced (output_hidden_states)
                rows = slice(img.batch, R, B)  # every row showing the item (CMAC: [original; distorted])
                if a == img.start and e == img.end:
                    cols = img.cols(off, out.device)
                    seg = out[rows, cols]  # a view (contiguous grid), else a copy written back below
                    for r in range(seg.shape[0]):
                        ops.scr_redistribute_(seg[r:r + 1], scores, (img.gh, img.gw), top_k=self.top_k,
                                              lam=self.lam, exclude_border=self.exclude_border)
                    if not img.contiguous:
                        out[rows, cols] = seg
                    kept[(layer_idx, i)] = seg[0].clone()
                    self.redistribute_calls += 1
                    continue
                # the image cut by the start of a partial pass: its redistribution needs source
                # rows before the cut, which this pass does not hold. The tokens up to the image
                # end are those of the full pass (same prefix, same model there): take its result.
                full = kept.get((layer_idx, i))
                if full is None:
                    raise RuntimeError(f"kvfix.hf.SCR: layer {layer_idx} sees image {img.index} from position {a} "
                                       f"on, without a forward over its whole span [{img.start}, {img.end}) first")
                pos = img.positions(out.device)
                present = (pos >= off) & (pos < off + T)
                out[rows, pos[present] - off] = full[present]
        return out


def _query_mask(attention_mask, b: int, pos: torch.Tensor, offset: int, T: int) -> torch.Tensor:
    """The mask rows of the chosen queries (`pos`: indices into this forward's tokens, at cache
    positions offset + pos), [1, 1 or H, Tq, T]: the model's own 4-D mask (bool or additive float;
    causality included), or, when the model hands none (SDPA's is_causal path, no padding), the
    causal mask of those queries. A 2-D padding mask is combined with causality."""
    keys = torch.arange(T, device=pos.device)
    causal = keys[None, :] <= pos[:, None] + offset
    if attention_mask is None:
        return causal[None, None]
    if attention_mask.dim() == 2:
        return (causal & attention_mask[b, :T].to(torch.bool)[None, :])[None, None]
    m = attention_mask[b:b + 1][..., :T]
    if m.shape[-2] == 1:  # one row for every query: padding only, add causality
        return _compat.mask_keep(m) & causal
    return m.index_select(-2, pos)
