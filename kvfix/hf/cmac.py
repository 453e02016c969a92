"""CMAC as a kvfix.hf method: calibrated cross-modal attention with contrastive decoding (METHODS §4)."""
from __future__ import annotations

import contextlib
import math

import torch

from .. import ops
from ..ops._common import _check_built_for
from ..ops.cmac import _VALUE_MEANS as _OP_VALUE_MEANS
from . import _compat
from .core import ForwardContext, Handle, Method, check_layers, resolve_layers
from .models import frequency_sections

__all__ = ["CMAC", "CMAC_PRESETS"]

_VALUE_MEANS = ("scalar", "vector")
_ATTN_OP = torch.ops.kvfix.cmac_attention.default  # kvfix.cmac_attention without its argument conversion
_GATES = ("first", "last")

# alpha and beta per benchmark, as the authors' LLaVA-1.5 scripts run them (github.com/lijm48/IMCCD,
# experiments/cd_scripts/: llava1.5_pope.bash and llava1.5_pope_all.bash (also qwenvl_pope.bash),
# llava1.5_chair.bash, llava1.5_mme.bash and llava1.5_mme_full.bash; see docs/CMAC_HF.md).
CMAC_PRESETS = {"pope": {"alpha": 3.0, "beta": 0.2},
                "chair": {"alpha": 1.0, "beta": 0.2},
                "mme": {"alpha": 1.0, "beta": 0.5}}


class _PresetOr:
    """Default of CMAC's alpha and beta: the preset's value, else `value` (the paper's)."""

    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = value

    def __repr__(self):
        return f"<preset's, else {self.value}>"


_ALPHA, _BETA = _PresetOr(3.0), _PresetOr(0.2)


def _number(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _attention_mask(mask, T: int):
    """The mask the model's base implementation was given, as cmac_attention takes it: None, bool
    (True = attend) or additive float broadcastable to [B, Hq, Tq, T]."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"kvfix.hf.CMAC: unsupported attention mask type {type(mask).__name__} (use the eager, "
                        "sdpa or flash attention implementation)")
    if mask.dim() == 2:  # a padding mask [B, T] (flash attention's mask function): 1 = attend
        return mask[:, None, None, :T].bool()
    if mask.shape[-1] != T:
        mask = mask[..., :T]
    if mask.dtype != torch.bool:
        mask = _compat.mask_minus_inf(mask)
    return mask


class _State:
    """One generation's CMAC state (rows: [original; distorted] when the batch is doubled)."""

    def __init__(self, batch: int, spans: torch.Tensor, doubled: bool):
        self.batch = batch                    # B, the caller's batch
        self.doubled = doubled                # the text model runs 2B rows
        rows = 2 * batch if doubled else batch
        self.spans = torch.cat([spans, spans]) if doubled else spans   # int64 [rows, 2], cache positions
        self.lengths = (self.spans[:, 1] - self.spans[:, 0]).tolist()   # image tokens per row
        self.equal = len(set(self.lengths)) == 1   # one op call for all rows, else one per row
        self.imd_rows = torch.arange(rows) >= batch   # the distorted rows (all False when not doubled)
        self.positions: torch.Tensor | None = None   # RoPE positions of every cached token [S, rows, T]
        self.k_cal: dict = {}                 # layer -> calibrated image keys (valid until the keys change)
        self.k_mean: dict = {}                # layer -> their mean per row and kv head (IMD's threshold), same life
        self.forked = False                   # distorted prefix copied from the original after prefill
        self.device = None
        # (ctx, the model's mask, T, mode, op arguments) of the last selected layer: the layers of
        # one forward share them (CMAC.attention)
        self.call: tuple | None = None
        # which rows the text model runs now: "both" (2B rows, or B when not doubled), or, in a
        # forked prefill, "orig" (the original rows on the whole prompt) then "dist" (the
        # distorted rows on the prompt after `split`, on a copy of the original's prefix)
        self.mode = "both"
        self.split = 0
        self.pending: dict | None = None      # the text model's B-row inputs, for the "dist" pass
        self.min_end = int(spans[:, 1].min()) if spans.numel() else 0
        # the gate (CMAC(gate=...)); spans on the host: the original rows' [s, e) cache positions
        self.span_list = spans.tolist()
        self.k_sum: dict = {}                 # layer -> sum of the original rows' image keys [B, Hkv, D]
        self.gate_terms: dict = {}            # layer -> this forward's gate term [B] (float32)
        self.gate_step = 0                    # forwards contrasted so far (host counter)
        self.gate_acc: torch.Tensor | None = None    # "first": sum of the first gate_steps values [B]
        self.gate_ring: torch.Tensor | None = None   # "last": the last gate_steps values [gate_steps, B]

    def rows(self):
        """(spans, imd, lengths) of the rows the text model runs now."""
        B = self.batch
        if self.mode == "orig":
            return self.spans[:B], False, self.lengths[:B]
        if self.mode == "dist":
            return self.spans[B:], True, self.lengths[B:]
        return self.spans, self.imd_rows, self.lengths


class CMAC(Method):
    """Cross-modal attention calibration with contrastive decoding (CVPR 2026; METHODS §4).

    `kvfix.hf.enable(model, kvfix.hf.CMAC())`, then the usual `model.generate(**inputs, ...)`
    (or `handle.generate(...)`): greedy or sampling, logits processors and warpers, eos,
    max_new_tokens, batches with left padding, return_dict_in_generate / output_scores all
    behave as in plain `generate`; only the logits the model returns change.

    How it runs: every forward of the model runs its text model on the batch doubled, rows
    `[original; distorted]`, each row with its own cache rows (one cache object, 2B rows: two
    branches that share nothing after the image; the prefill forks the distorted rows from the
    original's prefix, see fork_prefill). The attention of the selected text decoder
    layers is replaced (innermost: other methods' attention hooks wrap it) by
    `kvfix.cmac_attention` with the image keys re-rotated by `kvfix.rope_calibrate` (CMPC, both
    branches) and IMD on the distorted rows only. The model's logits become
    `kvfix.contrastive_logits(l, l_distorted, alpha, beta)`, `[B, ...]` as usual, so
    generate's own greedy / sampling path, processors and warpers see the contrasted logits.
    After the prefill, on the first decoding step, the distorted rows' cache up to the image end
    is overwritten with the original rows' (the prefix is identical by construction; this also
    carries over what a method like DSCR refined in the original rows only).

    Args:
        alpha: contrast strength (>= 0). Default: the preset's, else 3 (the paper). 0: the
            original branch's logits with the plausibility cut (greedy decoding then equals plain
            greedy with CMPC).
        beta: plausibility cut in (0, 1]: tokens with p < beta * max p of the original branch get
            -inf. Default: the preset's, else 0.2.
        gamma: position compression of the image keys (> 0; 3 as the authors' code, the paper
            says 2). 1 turns CMPC off.
        imd: True (default): the distorted branch and the contrast. False: one branch, CMPC only,
            logits unchanged (no contrast: alpha and beta unused, gate refused).
        value_mean: IMD's replacement value, "scalar" (mean over image tokens and head dim, as
            the authors' code) or "vector" (per dimension, as the paper).
        layers: text decoder layers with CMPC / IMD (None: all, as the paper).
        fork_prefill: True (default): the prefill runs the original rows on the whole prompt,
            then the distorted rows only on the prompt after the first image end of the batch,
            on a copy of the original rows' cache up to there (identical by construction), and
            appends their cache rows; False: the prefill runs all 2B rows on the whole prompt.
            Same results either way; the fork saves most of the second branch's prefill.
        preset: None, "pope" (alpha 3, beta 0.2), "chair" (1, 0.2) or "mme" (1, 0.5): the values
            of the authors' evaluation scripts (`CMAC_PRESETS`). alpha or beta given explicitly
            override the preset's. A preset sets alpha and beta only (not `gate`).
        gate: None (default: alpha on every step), "first" or "last": the contrast gate of the
            authors' CHAIR runs. On every forward, each batch item's gate value `g` is the mean,
            over all text decoder layers and query heads, of the sum over the item's image keys
            of the attention logit (`scale * q . k`, the image keys at calibrated positions in
            the CMPC layers) of the forward's last query in the original branch. The forward's
            alpha is 0 for that item (its logits: the original branch's, cut) when `g` is below
            the mean of the generation's first `gate_steps` values ("first", the authors'
            sampling path; while fewer have been seen: all so far, this one included) or of the
            last `gate_steps` values, this one included ("last", their greedy path). The first
            forward (the prefill) is never gated. Float32 arithmetic; no host sync.
        gate_steps: the gate's window (>= 1; 30 in the authors' code).

    With a gate, `gate_history` holds one `(g, gated)` pair per forward of the current or latest
    generation (float32 [B] and bool [B] tensors on the model's device; reset by each generation).

    Requirements: one image per batch item (items may differ in grid: their spans are then run
    one op call per row), a dynamic (non-static, non-sliding) cache or none, greedy or sampling
    (not beam search: the cache has 2B rows). Forwards without images, auxiliary passes and
    `handle.suspended()` run the plain model.
    """

    name = "cmac"
    uses_attention = True
    attention_innermost = True

    def __init__(self, alpha: float = _ALPHA, beta: float = _BETA, gamma: float = 3.0, imd: bool = True,
                 value_mean: str = "scalar", *, layers=None, fork_prefill: bool = True, preset: str | None = None,
                 gate: str | None = None, gate_steps: int = 30):
        if preset is not None and (not isinstance(preset, str) or preset not in CMAC_PRESETS):
            raise ValueError(f"preset must be None or one of {sorted(CMAC_PRESETS)}, got {preset!r}")
        if alpha is _ALPHA:
            alpha = CMAC_PRESETS[preset]["alpha"] if preset is not None else _ALPHA.value
        if beta is _BETA:
            beta = CMAC_PRESETS[preset]["beta"] if preset is not None else _BETA.value
        alpha, beta, gamma = _number("alpha", alpha), _number("beta", beta), _number("gamma", gamma)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not isinstance(imd, bool):
            raise TypeError(f"imd must be a bool, got {type(imd).__name__}")
        if not isinstance(fork_prefill, bool):
            raise TypeError(f"fork_prefill must be a bool, got {type(fork_prefill).__name__}")
        if value_mean not in _VALUE_MEANS:
            raise ValueError(f"value_mean must be one of {_VALUE_MEANS}, got {value_mean!r}")
        if gate is not None and gate not in _GATES:
            raise ValueError(f"gate must be None, 'first' or 'last', got {gate!r}")
        if gate is not None and not imd:
            raise ValueError("gate needs imd=True (it gates the contrast, which imd=False does not run)")
        if isinstance(gate_steps, bool) or not isinstance(gate_steps, int):
            raise TypeError(f"gate_steps must be an int, got {type(gate_steps).__name__}")
        if gate_steps < 1:
            raise ValueError(f"gate_steps must be >= 1, got {gate_steps}")
        self.alpha, self.beta, self.gamma, self.imd, self.value_mean = alpha, beta, gamma, imd, value_mean
        self._value_mean_code = _OP_VALUE_MEANS[value_mean]  # the op's encoding
        self.preset, self.gate, self.gate_steps = preset, gate, gate_steps
        self.layers = check_layers(layers)
        self.fork_prefill = fork_prefill
        self.gate_history: list = []
        self.selected_layers: tuple[int, ...] = ()
        self._selected: frozenset = frozenset()
        self._handle: Handle | None = None
        self._inv_freq: dict = {}   # layer -> the RoPE frequencies of that layer [D/2] float32
        self._mrope_section = None
        self._perm = None           # interleaved RoPE sections: (frequency order, key columns, inverse)

    def __repr__(self):
        return (f"CMAC(alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, imd={self.imd}, "
                f"value_mean={self.value_mean!r}, layers={self.layers!r}, fork_prefill={self.fork_prefill}, "
                f"preset={self.preset!r}, gate={self.gate!r}, gate_steps={self.gate_steps})")

    # ---- lifecycle -------------------------------------------------------------------------

    def bind(self, handle: Handle) -> None:
        L = handle.num_layers
        self.selected_layers = resolve_layers(self.layers, L, 0)
        if not self.selected_layers:
            raise ValueError(f"CMAC selects no layer of the {L}-layer text model (layers={self.layers!r})")
        self._selected = frozenset(self.selected_layers)
        freqs = [handle.adapter.rope_frequencies(layer) for layer in range(L)]
        self._inv_freq = {layer: f for layer, (f, _) in enumerate(freqs)}
        self._mrope_section = freqs[0][1]
        self._perm = None
        if handle.adapter.rope == "mrope_interleaved":
            # kvfix.rope_calibrate takes contiguous sections: group the frequencies by section (a
            # permutation of the rotary pairs (f, f + D/2), which CMPC rotates independently)
            n = freqs[0][0].numel()
            owner = frequency_sections(handle.adapter.rope, self._mrope_section, n)
            perm = torch.sort(owner, stable=True).indices
            self._perm = (perm, torch.cat([perm, perm + n]), torch.argsort(torch.cat([perm, perm + n])))
            self._mrope_section = tuple(int((owner == s).sum()) for s in range(len(self._mrope_section)))
        self._handle = handle

    def unbind(self, handle: Handle) -> None:
        self._handle = None

    def _state(self, ctx) -> _State | None:
        if ctx is None or ctx.pass_name != "main" or ctx.session is None:
            return None
        return ctx.state(self).get("st")

    def on_session_start(self, ctx: ForwardContext) -> None:
        ctx.state(self).pop("st", None)
        self.gate_history = []

    def on_prefill_start(self, ctx: ForwardContext) -> None:
        if ctx.pass_name != "main":
            return
        if _compat.has_labels(ctx.inputs):
            raise ValueError("kvfix.hf.CMAC changes the logits for decoding; forwards with labels (a loss) are "
                             "not supported: disable the handle or use handle.suspended()")
        if not ctx.images:
            return
        store = ctx.state(self)
        if "st" in store:
            raise ValueError("kvfix.hf.CMAC: images arrived after the first prefill of a generation; CMAC "
                             "takes one image per batch item, all in the first forward")
        per_item: dict[int, list] = {}
        for img in ctx.images:
            per_item.setdefault(img.batch, []).append(img)
        for b in range(ctx.batch_size):
            n = len(per_item.get(b, ()))
            if n != 1:
                raise ValueError(f"kvfix.hf.CMAC needs exactly one image per batch item; batch item {b} has {n}")
        spans = torch.tensor([[per_item[b][0].start, per_item[b][0].end] for b in range(ctx.batch_size)],
                             dtype=torch.int64)
        store["st"] = _State(ctx.batch_size, spans, doubled=self.imd)

    def on_prefill_end(self, ctx: ForwardContext) -> None:
        st = self._state(ctx)
        if st is None:
            return
        st.k_cal.clear()  # the image keys may change now (DSCR): calibrate again when decoding
        st.k_mean.clear()
        st.k_sum.clear()
        self._contrast(ctx, st)

    def on_decode_start(self, ctx: ForwardContext) -> None:
        st = self._state(ctx)
        if st is None or not st.doubled or ctx.cache is None:
            return
        B = st.batch
        rows = _compat.layer_kv(ctx.cache, 0, 0)[0].shape[0]
        if rows != 2 * B:  # generate reordered or cut the batch (beam search): the branches are lost
            raise ValueError(f"kvfix.hf.CMAC: the cache holds {rows} rows, expected {2 * B} ([original; distorted] "
                             "rows of the batch); beam search is not supported, use greedy or sampling")
        if st.forked:
            return
        st.forked = True
        T = ctx.past_len
        prefix = None
        with torch.no_grad():
            for layer in range(self._handle.num_layers):
                keys, values = _compat.layer_kv(ctx.cache, layer, T)
                if prefix is None:  # [B, 1, T, 1]: positions before each item's image end
                    ends = st.spans[:B, 1].to(keys.device)
                    prefix = (torch.arange(T, device=keys.device)[None] < ends[:, None])[:, None, :, None]
                for t in (keys, values):
                    t[B:, :, :T] = torch.where(prefix, t[:B, :, :T], t[B:, :, :T])

    def on_decode_end(self, ctx: ForwardContext) -> None:
        st = self._state(ctx)
        if st is not None:
            self._contrast(ctx, st)

    # ---- the text model's inputs: [original; distorted] rows ---------------------------------

    def text_input(self, ctx, kwargs):
        st = self._state(ctx)
        if st is None:
            return None
        ref = _compat.text_tokens(kwargs)
        if ref is None or st.mode == "dist":  # "dist": the pass started by text_output, as given
            return None
        kwargs = dict(kwargs)
        t = ref.shape[1]
        rows = ref.shape[0]
        if st.doubled:
            if ref.shape[0] != st.batch:
                raise ValueError(f"kvfix.hf.CMAC: the text model got {ref.shape[0]} rows, the generation has "
                                 f"{st.batch} (a batch that changes size during generation is not supported)")
            if self.fork_prefill and ctx.past_len == 0 and _compat.writes_cache(kwargs) and t >= 2:
                # forked prefill: the original rows now, the distorted rows after the split in
                # text_output (their prefix up to the first image end is the original's)
                st.mode, st.split, st.pending = "orig", min(max(st.min_end, 1), t - 1), dict(kwargs)
            else:
                rows = 2 * st.batch
                kwargs = _compat.text_inputs_doubled(kwargs)
        pos = ctx.handle.adapter.rope_positions(kwargs.get("position_ids"))
        if pos is None:
            pos = torch.arange(ctx.past_len, ctx.past_len + t, device=ref.device).expand(1, rows, t)
        pos = pos.to(torch.int64)
        if st.positions is None or ctx.past_len == 0:
            st.positions = pos
        else:
            prev = st.positions
            S = max(prev.shape[0], pos.shape[0])
            st.positions = torch.cat([prev.expand(S, -1, -1), pos.expand(S, -1, -1)], dim=-1)
        return kwargs

    def text_output(self, ctx, module, kwargs, output):
        """End of the original rows' prefill pass (forked prefill): run the distorted rows on the
        prompt after the split, on a copy of the original's cache up to there, then append their
        cache rows and hidden states: from here on the text model holds 2B rows."""
        st = self._state(ctx)
        if st is None or st.mode != "orig":
            return None
        c, sub = st.split, st.pending
        st.pending = None
        cache = sub["past_key_values"]
        fork = _compat.fork_cache(ctx.handle.model, cache, c)
        sub = _compat.text_inputs_after(sub, c, fork)
        st.mode = "dist"
        try:
            out_d = module(**sub)
        finally:
            st.mode = "both"
        _compat.stack_cache_rows(cache, fork)
        h = _compat.text_hidden(output)
        h_d = torch.cat([h[:, :c], _compat.text_hidden(out_d)], dim=1)
        _compat.set_text_hidden(output, torch.cat([h, h_d]))
        st.positions = torch.cat([st.positions, st.positions], dim=1)
        return output

    # ---- attention -------------------------------------------------------------------------

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        st = self._state(ctx)
        if st is None:
            return call_next(query, key, value, attention_mask, **kwargs)
        scale = _compat.attention_scale(module, kwargs, query.shape[-1])
        if layer_idx not in self._selected:
            if self.gate is not None and st.mode != "dist":
                self._gate_term(st, layer_idx, query, key, None, scale, ctx.phase == "decode")
            return call_next(query, key, value, attention_mask, **kwargs)
        R, T = query.shape[0], key.shape[2]
        if st.positions is None or st.positions.shape[-1] != T or (ctx.cache is not None and
                                                                    T != ctx.past_len + ctx.q_len):
            raise ValueError("kvfix.hf.CMAC needs a dynamic cache holding every position (no static or "
                             f"sliding-window layers): layer {layer_idx} has {T} keys for "
                             f"{ctx.past_len + ctx.q_len} positions")
        # Every selected layer of every decoded token passes here (on a GPU decoding waits on the
        # host's time per layer: docs/HOST.md): what the layers of a forward share (the rows'
        # spans and IMD flags, the model's mask in the op's form, causality) is prepared by the
        # first of them.
        call = st.call
        if (call is None or call[0] is not ctx or call[1] is not attention_mask or call[2] != T
                or call[3] != st.mode):
            call = st.call = (ctx, attention_mask, T, st.mode, self._call_args(st, query, attention_mask, T))
        spans, imd, lengths, mask, causal, imd_flag, imd_items = call[4]
        if R != spans.shape[0]:
            raise ValueError(f"kvfix.hf.CMAC: attention got {R} rows, expected {spans.shape[0]}")
        decode = ctx.phase == "decode"
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            k_cal = self._calibrated(st, layer_idx, key, spans, lengths, decode)
            k_mean = self._key_mean(st, layer_idx, key, k_cal, imd, decode)
            if self.gate is not None and st.mode != "dist":
                self._gate_term(st, layer_idx, query, key, k_cal, scale, decode)
            if st.equal:  # the op itself: _call_args checked and converted what kvfix.cmac_attention would
                out = _ATTN_OP(query, key, value, 0, 0, spans, k_cal, scale, mask, causal, imd_flag, imd_items,
                               self._value_mean_code, k_mean)
            else:
                out = torch.cat([
                    ops.cmac_attention(query[r:r + 1], key[r:r + 1], value[r:r + 1], spans[r:r + 1],
                                       k_calibrated=None if k_cal is None else k_cal[r], scale=scale,
                                       mask=None if mask is None else mask[r:r + 1] if mask.shape[0] > 1 else mask,
                                       causal=causal, imd=imd if isinstance(imd, bool) else imd[r:r + 1],
                                       value_mean=self.value_mean,
                                       k_calibrated_mean=None if k_mean is None else k_mean[r])
                    for r in range(R)])
        return out.transpose(1, 2).contiguous(), None

    def _call_args(self, st: _State, query: torch.Tensor, attention_mask, T: int) -> tuple:
        """(spans, imd, lengths, mask, causal, imd flag, imd items) of the rows the text model runs
        now: the rows' spans and IMD as `st.rows()` gives them, on the query's device; the model's
        mask as cmac_attention takes it; and the op's own form of imd (a bool, and the per-row bool
        tensor or None), as `kvfix.cmac_attention` would pass them."""
        if st.device != query.device:
            st.spans, st.imd_rows = st.spans.to(query.device), st.imd_rows.to(query.device)
            st.device = query.device
        spans, imd, lengths = st.rows()
        spans = spans.contiguous()
        mask = _attention_mask(attention_mask, T)
        # the model's mask with a row per query holds its causality (and exceptions to it: Gemma 3's
        # bidirectional image blocks); without one (SDPA's causal path, a padding row), causal
        causal = mask is None or mask.shape[-2] == 1
        if isinstance(imd, torch.Tensor):
            imd_flag, imd_items = True, imd.contiguous()
        else:
            imd_flag, imd_items = bool(imd), None
        _check_built_for(query, "cmac_attention")
        return spans, imd, lengths, mask, causal, imd_flag, imd_items

    def _calibrated(self, st: _State, layer_idx: int, key: torch.Tensor, spans, lengths, keep: bool):
        """The image keys at calibrated positions ([R, Hkv, N, D], or a list of per-row tensors
        when the rows' spans differ in length); kept per layer while decoding (the image keys do
        not change there), computed afresh in every prefill pass."""
        if self.gamma == 1.0:
            return None
        k_cal = st.k_cal.get(layer_idx)
        if k_cal is not None:
            return k_cal
        inv_freq = self._inv_freq[layer_idx].to(key.device)
        pos = st.positions.to(key.device)
        pos = pos[0] if pos.shape[0] == 1 else pos
        if self._perm is not None:  # interleaved sections: calibrate with the frequencies grouped by section
            freq_perm, cols, back = (t.to(key.device) for t in self._perm)
            key, inv_freq = key[..., cols], inv_freq[freq_perm]
        if st.equal:
            k_cal = ops.rope_calibrate(key, spans, inv_freq, gamma=self.gamma, positions=pos,
                                       mrope_section=self._mrope_section, num_tokens=lengths[0])
        else:
            k_cal = [ops.rope_calibrate(key[r:r + 1], spans[r:r + 1], inv_freq, gamma=self.gamma,
                                        positions=pos[..., r:r + 1, :], mrope_section=self._mrope_section,
                                        num_tokens=lengths[r])
                     for r in range(key.shape[0])]
        if self._perm is not None:
            k_cal = k_cal[..., back] if st.equal else [k[..., back] for k in k_cal]
        if keep:
            st.k_cal[layer_idx] = k_cal
        return k_cal

    def _key_mean(self, st: _State, layer_idx: int, key: torch.Tensor, k_cal, imd, keep: bool):
        """The mean image key of each row and kv head that IMD's threshold needs
        (`kvfix.cmac_key_mean` of the calibrated keys, or of the plain image keys at gamma 1):
        [R, Hkv, D] float32, or a list of per-row [1, Hkv, D] when the rows' spans differ in length;
        None where no row runs IMD. Kept per layer while decoding, like the calibrated keys, so that
        no decoding step re-reads the image keys for the threshold."""
        if not self.imd or imd is False:
            return None
        k_mean = st.k_mean.get(layer_idx)
        if k_mean is not None:
            return k_mean
        if k_cal is None:  # gamma 1: the plain image keys (host spans of the rows run now)
            spans = st.span_list + st.span_list if st.doubled and st.mode == "both" else st.span_list
            rows = [ops.cmac_key_mean(key[r:r + 1, :, s:e]) for r, (s, e) in enumerate(spans)]
            k_mean = torch.cat(rows) if st.equal else rows
        elif isinstance(k_cal, list):
            k_mean = [ops.cmac_key_mean(k) for k in k_cal]
        else:
            k_mean = ops.cmac_key_mean(k_cal)
        if keep:
            st.k_mean[layer_idx] = k_mean
        return k_mean

    def _gate_term(self, st: _State, layer_idx: int, query, key, k_cal, scale: float, keep: bool) -> None:
        """This layer's part of the gate value: per original row, the mean over query heads of
        the sum over the image keys of the last query's logit, `scale * q . sum_k k` (the sum of
        the logits, by linearity; the key sum is kept per layer while decoding, like k_cal)."""
        B = st.batch
        with torch.no_grad():
            k_sum = st.k_sum.get(layer_idx)
            if k_sum is None:
                if k_cal is None:  # plain keys: a layer without CMPC, or gamma 1
                    k_sum = torch.stack([key[b, :, s:e].float().sum(1) for b, (s, e) in enumerate(st.span_list)])
                elif isinstance(k_cal, list):  # rows with spans of different lengths
                    k_sum = torch.stack([k_cal[b][0].float().sum(1) for b in range(B)])
                else:
                    k_sum = k_cal[:B].float().sum(2)
                if keep:
                    st.k_sum[layer_idx] = k_sum
            q = query[:B, :, -1].float()                                         # [B, Hq, D]
            k_sum = k_sum.repeat_interleave(q.shape[1] // k_sum.shape[1], dim=1)  # [B, Hq, D]
            st.gate_terms[layer_idx] = (q * k_sum).sum(-1).mean(-1) * scale

    def _gated(self, st: _State) -> torch.Tensor:
        """The gate of this forward: bool [B], True where alpha is 0 (see the class docstring)."""
        L = self._handle.num_layers
        terms, st.gate_terms = st.gate_terms, {}
        if len(terms) != L:
            raise RuntimeError(f"kvfix.hf.CMAC(gate=...): {len(terms)} of the {L} text decoder layers ran "
                               "through kvfix's attention hook in this forward")
        g = torch.stack([terms[layer] for layer in range(L)]).mean(0)            # [B] float32
        t, n = st.gate_step, self.gate_steps
        st.gate_step += 1
        if self.gate == "first":
            if t < n:
                st.gate_acc = g if t == 0 else st.gate_acc + g
            mean = st.gate_acc / min(t + 1, n)
        else:
            if st.gate_ring is None:
                st.gate_ring = g.new_zeros(n, g.shape[0])
            st.gate_ring[t % n] = g
            mean = st.gate_ring.sum(0) / min(t + 1, n)
        gated = g < mean
        self.gate_history.append((g, gated))
        return gated

    # ---- logits ----------------------------------------------------------------------------

    def _contrast(self, ctx: ForwardContext, st: _State) -> None:
        if not st.doubled:
            return
        out = ctx.output
        logits = _compat.output_logits(out)
        B = st.batch
        if logits.shape[0] != 2 * B:
            raise ValueError(f"kvfix.hf.CMAC: the model returned {logits.shape[0]} rows of logits, expected {2 * B}")
        V = logits.shape[-1]
        with torch.no_grad():
            cd = ops.contrastive_logits(logits[:B].reshape(-1, V), logits[B:].reshape(-1, V), alpha=self.alpha,
                                        beta=self.beta).reshape(logits[:B].shape)
            if self.gate is not None:  # the gated rows take alpha 0: the original branch's logits, cut
                cut = ops.contrastive_logits(logits[:B].reshape(-1, V), logits[B:].reshape(-1, V), alpha=0.0,
                                             beta=self.beta).reshape(logits[:B].shape)
                gated = self._gated(st).to(cd.device).view(B, *([1] * (cd.dim() - 1)))
                cd = torch.where(gated, cut, cd)
        _compat.set_output_logits(out, cd)
        for name in _compat.output_row_fields(out):
            setattr(out, name, tuple(x[:B] if isinstance(x, torch.Tensor) and x.shape[0] == 2 * B else x
                                     for x in getattr(out, name)))
