"""KVSmooth as a kvfix.hf method: entropy-guided EMA of the KV cache while decoding (METHODS §2)."""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from ..ops.kvsmooth import _check_lam
from . import _compat
from .core import ForwardContext, Handle, Method, check_layers, resolve_layers

__all__ = ["KVSmooth", "KVSMOOTH_PRESETS"]

# lam_ref per model family, the paper's values (CVPR 2026, arXiv 2602.04268).
KVSMOOTH_PRESETS = {"llava-1.5": 0.9, "minigpt-4": 0.5, "instructblip": 0.7}
_STEPS_OP = torch.ops.kvfix.kvsmooth_steps_.default  # kvfix.kvsmooth_steps_ without its argument conversion
# The preset a model family gets when neither lam_ref nor preset is given is its adapter's
# `kvsmooth_preset` (models.py): the paper gives no value for Qwen2-VL and the newer families,
# which take the LLaVA-1.5 value (the closest architecture the paper tuned: a LLaMA-style decoder
# over projected patch tokens). Override with lam_ref=... or preset=....


class KVSmooth(Method):
    """Entropy-guided smoothing of the KV cache during decoding (METHODS §2).

    On every decoding step (one new token per sequence) and every selected layer, after the model's
    own attention has run (SDPA or whatever the model uses; no eager attention, no
    `output_attentions`), a fused kernel (`kvfix.kvsmooth_step_`) computes the entropy of
    each query head's attention row over the layer's cache (padding excluded), pushes its mean
    over heads z onto a per-sequence, per-layer queue of the last `queue_size` values M, ranks it
    as the paper does, `rank = k / M` with `k = #{queued values <= z}` (the 1-based rank of z,
    which counts itself; still divided by M while the queue fills), turns the rank into
    `lam = clamp(rank, lam_ref - band, lam_ref + band)` (then [0, 1]) and
    smooths the newest cache position in place: `K[t] = (1 - lam) K[t] + lam K[t-1]`, same for V.
    Prefill is not smoothed. The selected layers' steps of a decoding forward run at its end, in
    one call (`kvfix.kvsmooth_steps_`): the same result as right after each layer's attention (no
    later layer reads or writes what a step reads or writes; the next token reads the smoothed
    entries) for a fraction of the host's time per token (docs/HOST.md).

    Args:
        layers: text decoder layers to smooth. None: `[3, L)` (METHODS default; the paper smooths
            3..31 of 32). Also a slice, a range or ints (negatives from L).
        lam_ref: centre of the coefficient band, in [0, 1]. None: from `preset`, else from the
            model family (LLaVA and Qwen2-VL: the LLaVA-1.5 value 0.9).
        band: half width of the band (>= 0), 0.2 in the paper.
        queue_size: entropies remembered per sequence and layer (M, 15 in the paper); also
            the divisor of the rank k / M.
        preset: "llava-1.5" (0.9), "minigpt-4" (0.5) or "instructblip" (0.7): the paper's lam_ref
            per model family. Give lam_ref or preset, not both.
        record_lam: keep every step's coefficients in `lam_history` (a list of
            `(past_len, layer, lam [B] tensor)`, reset by each generation); no host sync either.

    State: one float32 `[B, queue_size]` queue per selected layer on the model's device, created
    at the first decoding step of a generation (empty slots are NaN) and dropped when a new
    generation starts (empty cache) or decoding continues on a different cache object. Batches
    with left padding keep one queue per sequence; padded positions take no part in the entropy.
    With beam search the queues follow batch rows, not beams (they are not reordered with the
    cache). Decoding steps issue no host synchronisation: on CUDA a decoded token's steps are two
    kernel launches for all selected layers (up to 64; plus one elementwise op when the model
    hands an additive float mask, i.e. with an eager base attention).

    After each run, `steps` counts the kernel calls (decode steps x selected layers).
    """

    name = "kvsmooth"
    uses_attention = True
    attention_phases = frozenset({"decode"})  # smooths decoding steps only

    def __init__(self, layers=None, *, lam_ref: float | None = None, band: float = 0.2, queue_size: int = 15,
                 preset: str | None = None, record_lam: bool = False):
        if lam_ref is not None and preset is not None:
            raise ValueError("give lam_ref or preset, not both")
        if preset is not None and preset not in KVSMOOTH_PRESETS:
            raise ValueError(f"preset must be one of {sorted(KVSMOOTH_PRESETS)}, got {preset!r}")
        if lam_ref is not None:
            lam_ref, _ = _check_lam(lam_ref, 0.0)
        _, band = _check_lam(0.5, band)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int):
            raise TypeError(f"queue_size must be an int, got {type(queue_size).__name__}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not isinstance(record_lam, bool):
            raise TypeError(f"record_lam must be a bool, got {type(record_lam).__name__}")
        self.layers = check_layers(layers)
        self.lam_ref = lam_ref
        self.preset = preset
        self.band = band
        self.queue_size = queue_size
        self.record_lam = record_lam
        self.selected_layers: tuple[int, ...] = ()
        self.resolved_lam_ref: float | None = lam_ref
        self.lam_history: list[tuple[int, int, torch.Tensor]] = []
        self.steps = 0
        self._selected: frozenset = frozenset()
        self._warned_no_cache = False
        self._pending: list = []  # (ctx, layer, query, mask, scale) of this decoding forward's selected layers

    def __repr__(self):
        return (f"KVSmooth(layers={self.layers!r}, lam_ref={self.lam_ref!r}, band={self.band}, "
                f"queue_size={self.queue_size}, preset={self.preset!r})")

    # ---- lifecycle -------------------------------------------------------------------------

    def bind(self, handle: Handle) -> None:
        L = handle.num_layers
        self.selected_layers = resolve_layers(self.layers, L, 3)
        if not self.selected_layers:
            raise ValueError(f"KVSmooth selects no layer of the {L}-layer text model (layers={self.layers!r}; "
                             "the default is [3, L))")
        self._selected = frozenset(self.selected_layers)
        if self.lam_ref is not None:
            self.resolved_lam_ref = self.lam_ref
        else:
            preset = self.preset or handle.adapter.kvsmooth_preset
            self.resolved_lam_ref = KVSMOOTH_PRESETS[preset]

    def unbind(self, handle: Handle) -> None:
        self._pending = []

    def on_session_start(self, ctx: ForwardContext) -> None:
        self.lam_history = []
        self._pending = []

    def queues(self) -> dict[int, torch.Tensor]:
        """The per-layer queues ({layer: float32 [B, queue_size]}, oldest entry first, NaN = empty)
        of the current or latest generation: the live state tensors (empty before any decoding)."""
        handle = getattr(self, "_kvfix_handle", None)
        if handle is None or handle.session is None:
            return {}
        return dict(handle.session.state(self).get("queues", {}))

    # ---- the decoding step -----------------------------------------------------------------

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        out = call_next(query, key, value, attention_mask, **kwargs)
        if (ctx is None or ctx.phase != "decode" or ctx.pass_name != "main" or query.shape[2] != 1
                or layer_idx not in self._selected):
            return out
        if ctx.cache is None:
            if not self._warned_no_cache:
                warnings.warn("kvfix.hf.KVSmooth: the model runs without a KV cache (use_cache=False): "
                              "nothing to smooth", stacklevel=2)
                self._warned_no_cache = True
            return out
        # The step waits for the end of the forward (on_decode_end), where one op call does every
        # layer's: what it reads (this query, the layer's cache up to the new token) no later layer
        # changes, and what it writes (the new token's entry) only the next token reads. Every
        # selected layer of every decoded token passes here: on a GPU decoding waits on the host's
        # time per layer (docs/HOST.md), so only the query, mask and scale are kept.
        if self._pending:
            if self._pending[0][0] is not ctx:
                self._pending = []  # left by a forward that raised
            elif layer_idx <= self._pending[-1][1]:  # a layer again (or out of order): the steps so far first
                self._flush(ctx)
        scale = _compat.attention_scale(module, kwargs, query.shape[-1])
        self._pending.append((ctx, layer_idx, query, attention_mask, scale))
        return out

    def on_decode_end(self, ctx: ForwardContext) -> None:
        if self._pending and self._pending[0][0] is ctx:
            self._flush(ctx)

    def _queues(self, ctx: ForwardContext) -> dict:
        state = ctx.state(self)
        ref = state.get("cache")
        if ref is None or ref() is not ctx.cache:  # a new generation, or another cache: fresh queues
            state.clear()
            try:
                state["cache"] = weakref.ref(ctx.cache)
            except TypeError:
                state["cache"] = lambda cache=ctx.cache: cache
            state["queues"] = {}
        return state["queues"]

    def _flush(self, ctx) -> None:
        """The pending layers' steps (in the order their attention ran), in one op call."""
        pending, self._pending = self._pending, []
        n = ctx.past_len + 1  # cache positions holding tokens: the current one is n - 1
        queues = self._queues(ctx)
        qs, ks, vs, qus, scales, masks = [], [], [], [], [], []
        seen = (None, None)  # (the last mask given, its form for the kernel)
        for _, layer_idx, query, mask, scale in pending:
            k, v = _compat.layer_kv(ctx.cache, layer_idx, n)
            if k.shape[2] != n or v.shape[2] != n:  # a static cache holds more positions: views of the first n
                k, v = k[:, :, :n], v[:, :, :n]
            B = query.shape[0]
            queue = queues.get(layer_idx)
            if queue is None or queue.shape[0] != B or queue.device != query.device:
                queue = queues[layer_idx] = torch.full((B, self.queue_size), float("nan"), dtype=torch.float32,
                                                       device=query.device)
            if mask is not None:
                given = mask
                if given is seen[0]:  # the layers share the model's mask: converted once per token
                    mask = seen[1]
                else:
                    if mask.dim() == 4 and mask.shape[-1] != n:
                        mask = mask[..., :n]
                    if mask.dtype != torch.bool:
                        # "no attention" as -inf: the kernel treats those positions as padding (no
                        # part, no EMA across them)
                        mask = _compat.mask_minus_inf(mask)
                    seen = (given, mask)
            qs.append(query)
            ks.append(k)
            vs.append(v)
            qus.append(queue)
            scales.append(scale)
            masks.append(mask)
        # the op itself, past kvsmooth_steps_'s Python argument conversion: every argument here is
        # a tensor or a float already (lam_ref and band checked when the method was built), and
        # the op checks everything else; generate runs without autograd (no no_grad to enter)
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            lams = _STEPS_OP(qs, ks, vs, qus, scales, masks, self.resolved_lam_ref, self.band)
        self.steps += len(pending)
        if self.record_lam:
            self.lam_history.extend((ctx.past_len, p[1], lam) for p, lam in zip(pending, lams))
