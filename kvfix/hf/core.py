"""The dispatcher: one handle per model, methods plugged into it, hooks installed once.

See the package docstring (`kvfix.hf`) for the user-facing description.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Callable, Iterable, Sequence

import torch

from . import _compat
from .models import ImageSpan, Layout, adapter_for

__all__ = ["Method", "ForwardContext", "Session", "Handle", "enable", "get_handle"]

_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, Handle]" = weakref.WeakKeyDictionary()
# attention module of a text decoder layer -> (handle, layer index); read by the attention entry
_ATTN_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_ATTN_PREFIX = "kvfix_"


# --------------------------------------------------------------------------------------------
# method interface

class Method:
    """Base class of a kvfix method. Override only the hooks you need; all default to no-ops.

    Lifecycle: `bind(handle)` at `enable` (validate the model, resolve defaults), `unbind` at
    `disable`. A method instance belongs to at most one handle at a time.

    Per forward pass of the model (each `generate` step is one), with `ctx` a ForwardContext:
    - `on_session_start(ctx)`: the forward starts from an empty cache (a new `generate`); reset
      per-sequence state here (or keep it in `ctx.state(self)`, which is per session).
    - `on_prefill_start(ctx)` / `on_prefill_end(ctx)`: around a forward that processes the
      prompt (more than one new token, or an empty cache). At the end the cache holds every
      layer's keys and values of the prompt; `ctx.images` lists the images of this forward.
    - `on_decode_start(ctx)` / `on_decode_end(ctx)`: around a single-token decoding forward.

    Inside the text model (installed only when some method overrides them):
    - `attention(ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs)`
      wraps the attention function of every text decoder layer (set `uses_attention = True`).
      `query [B, Hq, Tq, D]` after RoPE; `key`/`value [B, Hkv, T, D]` are the cache tensors of
      that layer, current token included. Return `call_next(query, key, value, attention_mask,
      **kwargs)` (the next method, then the model's own implementation), possibly modified, or
      your own `(out [B, Tq, Hq, D], weights or None)`. The model's own implementation (SDPA,
      flash, ...) keeps running underneath.
    - `layer_input(ctx, layer_idx, hidden_states) -> Tensor | None`: the residual stream entering
      each text decoder layer; return a replacement or None.

    The rows a hook sees need not be the forward's `B x q_len` tokens: a method may run the text
    model on more rows (CMAC: `[original; distorted]`, row r showing batch item r mod B) or on a
    part of the prompt (CMAC's forked prefill runs the distorted rows on the prompt after a
    split). Such a partial pass always covers the end of the forward's tokens: `T` rows
    (`hidden_states.shape[1]`, `query.shape[2]`) sit at cache positions
    `[past_len + q_len - T, past_len + q_len)`. Slice by those positions, never by `past_len`
    alone (docs/STACKING.md).
    - `wrap_generate(handle, generate, kwargs)`: used by `handle.generate(...)`; call
      `generate(**kwargs)` or run your own loop (two-branch decoding).

    `ctx` is None in `attention`/`layer_input` when the text model runs outside a forward of the
    top-level model (the hooks only see forwards of the model given to `enable`).

    `attention_innermost = True` puts a method's `attention` innermost in the chain whatever the
    enable order (a method that replaces the attention computation itself, CMAC, so that methods
    acting around the attention, KVSmooth, wrap it); among such methods the enable order holds.
    """

    name = "method"
    uses_attention = False
    attention_innermost = False

    def bind(self, handle: "Handle") -> None:
        pass

    def unbind(self, handle: "Handle") -> None:
        pass

    def on_session_start(self, ctx: "ForwardContext") -> None:
        pass

    def on_prefill_start(self, ctx: "ForwardContext") -> None:
        pass

    def on_prefill_end(self, ctx: "ForwardContext") -> None:
        pass

    def on_decode_start(self, ctx: "ForwardContext") -> None:
        pass

    def on_decode_end(self, ctx: "ForwardContext") -> None:
        pass

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        return call_next(query, key, value, attention_mask, **kwargs)

    def layer_input(self, ctx, layer_idx: int, hidden_states: torch.Tensor):
        return None

    def wrap_generate(self, handle: "Handle", generate: Callable, kwargs: dict):
        return generate(**kwargs)

    def __repr__(self):
        return f"{type(self).__name__}()"


def _overrides(method: Method, name: str) -> bool:
    return getattr(type(method), name) is not getattr(Method, name)


class Session:
    """State of one generation (from an empty cache to the next empty cache)."""

    def __init__(self):
        self.images: list[ImageSpan] = []   # every image seen in this session, in order
        self._state: dict[int, dict] = {}

    def state(self, method: Method) -> dict:
        return self._state.setdefault(id(method), {})


class ForwardContext:
    """What a method sees of one forward pass of the model.

    Attributes: handle, model, pass_name ("main", or the name given to
    `handle.auxiliary_pass`), phase ("prefill" or "decode"), past_len (cache length before this
    forward), q_len (new tokens), batch_size, input_ids, attention_mask (the 2-D padding mask
    given to the model, or None), cache (the Cache, or None without caching), images
    (ImageSpan list of the images in this forward), inputs (all forward arguments by name),
    output (set before the *_end hooks), session (Session).
    """

    __slots__ = ("handle", "model", "pass_name", "phase", "past_len", "q_len", "batch_size", "input_ids",
                 "attention_mask", "cache", "images", "inputs", "output", "session", "_key")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def state(self, method: Method) -> dict:
        """Per-session scratch dict of `method`."""
        return self.session.state(method)


class _ImageInputs:
    def __init__(self, depth_maps):
        if isinstance(depth_maps, str):
            if depth_maps != "uniform":
                raise ValueError(f'depth_maps must be tensors or "uniform", got {depth_maps!r}')
            self.depth = "uniform"
        elif depth_maps is None:
            self.depth = None
        elif isinstance(depth_maps, torch.Tensor):
            if depth_maps.dim() == 2:
                self.depth = [depth_maps]
            elif depth_maps.dim() == 3:
                self.depth = list(depth_maps.unbind(0))
            else:
                raise ValueError(f"depth_maps tensor must be [H, W] or [num_images, H, W], got {tuple(depth_maps.shape)}")
        elif isinstance(depth_maps, (list, tuple)):
            for i, d in enumerate(depth_maps):
                if not isinstance(d, torch.Tensor):
                    raise TypeError(f"depth_maps[{i}] must be a torch.Tensor, got {type(d).__name__}")
            self.depth = list(depth_maps)
        else:
            raise TypeError(f"depth_maps must be a tensor, a list of tensors or \"uniform\", got {type(depth_maps).__name__}")
        self.grids: list[Layout] | None = None  # resolved by the handle (needs the adapter)
        self.cursor = 0  # depth maps consumed in the current session
        self.grid_cursor = 0  # explicit grids consumed in the current session
        self.max_used = 0


# --------------------------------------------------------------------------------------------
# handle

class Handle:
    """kvfix switched on for one model. Created by `enable`; `disable()` restores the model."""

    def __init__(self, model: torch.nn.Module, methods: Sequence[Method]):
        self.model = model
        self.methods: tuple[Method, ...] = tuple(methods)
        self.adapter = adapter_for(model)
        self.num_layers = _compat.num_text_layers(model)
        self.session: Session | None = None
        self._signature = inspect.signature(model.forward)
        self._varkw = next((p.name for p in self._signature.parameters.values()
                            if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._hooks: list = []
        self._ctx_stack: list[ForwardContext] = []
        self._images: _ImageInputs | None = None
        self._pass_name = "main"
        self._suspended = 0
        self._base_attn: str | None = None
        attn = [m for m in self.methods if m.uses_attention or _overrides(m, "attention")]
        self._attn_methods = tuple(sorted(attn, key=lambda m: bool(m.attention_innermost)))  # stable
        self._layer_methods = tuple(m for m in self.methods if _overrides(m, "layer_input"))
        self._active = False

    # ---- public API ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    def method(self, name_or_type):
        """The enabled method with this `name` or of this type."""
        for m in self.methods:
            if m.name == name_or_type or (isinstance(name_or_type, type) and isinstance(m, name_or_type)):
                return m
        raise KeyError(f"no method {name_or_type!r} in {self.methods}")

    def set_images(self, depth_maps=None, *, image_grid_thw=None) -> None:
        """Per-image inputs for the following generations, in the order the model consumes the
        images (batch item first, then position in the prompt), e.g. the processor's order.

        depth_maps: a list of [H, W] tensors (any resolution; or [N] per-token depths already
            on the patch grid), a [num_images, H, W] tensor, or "uniform" (no depth cue).
        image_grid_thw: Qwen2-VL only, needed only when the grids cannot be seen by the handle
            (features encoded outside the model, chunked prefill).
        Every new generation (empty cache) starts again from the first image. When `generate`
        repeats every batch item (num_return_sequences / num_beams > 1), per-image inputs given
        for the original items are repeated the same way.
        """
        inputs = _ImageInputs(depth_maps)
        if image_grid_thw is not None:
            inputs.grids = _explicit_grids(self.adapter, image_grid_thw)
        self._images = inputs

    def clear_images(self) -> None:
        self._images = None

    @contextlib.contextmanager
    def images(self, depth_maps=None, *, image_grid_thw=None):
        """`with handle.images(depth_maps=[...]): model.generate(...)` (see `set_images`)."""
        previous = self._images
        self.set_images(depth_maps, image_grid_thw=image_grid_thw)
        inputs = self._images
        try:
            yield self
        finally:
            self._images = previous
            if isinstance(inputs.depth, list) and inputs.max_used and inputs.max_used < len(inputs.depth):
                warnings.warn(f"kvfix.hf: {len(inputs.depth)} depth maps were given but the prompt had only "
                              f"{inputs.max_used} images", stacklevel=3)

    def generate(self, inputs=None, *, depth_maps=None, **kwargs):
        """`model.generate(inputs, **kwargs)` inside `images(depth_maps)` (when given), letting
        methods that own the decoding loop (`wrap_generate`) take over. Every keyword argument
        other than `depth_maps` goes to `generate` (`image_grid_thw` included)."""
        call = self.model.generate
        if inputs is not None:
            kwargs["inputs"] = inputs
        for m in reversed(self.methods):
            if _overrides(m, "wrap_generate"):
                call = (lambda m, nxt: (lambda **kw: m.wrap_generate(self, nxt, kw)))(m, call)
        ctx = self.images(depth_maps) if depth_maps is not None else contextlib.nullcontext()
        with ctx:
            return call(**kwargs)

    @contextlib.contextmanager
    def suspended(self):
        """Run the plain model: no hook of any method fires inside this block."""
        self._suspended += 1
        try:
            yield self
        finally:
            self._suspended -= 1

    @contextlib.contextmanager
    def auxiliary_pass(self, name: str):
        """Forwards inside this block belong to the current session but carry
        `ctx.pass_name == name` (e.g. a diagnostic pass run from `on_prefill_start`); they start
        no session and methods decide whether to act on them. A forward inside the block may be
        ended early by an exception (the contexts it left are dropped on exit)."""
        if name == "main":
            raise ValueError('auxiliary pass name must not be "main"')
        previous, self._pass_name = self._pass_name, name
        depth = len(self._ctx_stack)
        try:
            yield self
        finally:
            self._pass_name = previous
            # a forward of the block that raised (e.g. stopped on purpose) left its context
            del self._ctx_stack[depth:]

    def disable(self) -> None:
        """Remove every hook, restore the attention implementation, unbind the methods."""
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._base_attn is not None:
            _compat.set_text_attn_implementation(self.model, self._base_attn)
            for mod in [m for m, (h, _) in list(_ATTN_OWNERS.items()) if h is self]:
                del _ATTN_OWNERS[mod]
            self._base_attn = None
        for m in reversed(self.methods):
            m.unbind(self)
            m._kvfix_handle = None
        _HANDLES.pop(self.model, None)
        self._ctx_stack.clear()
        self.session = None
        self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()

    def __repr__(self):
        return f"Handle({type(self.model).__name__}, methods={list(self.methods)}, active={self._active})"

    # ---- installation ----------------------------------------------------------------------

    def _attach(self) -> None:
        bound = []
        try:
            for m in self.methods:
                if getattr(m, "_kvfix_handle", None) is not None:
                    raise ValueError(f"{m!r} is already enabled on another model")
                m.bind(self)
                m._kvfix_handle = self
                bound.append(m)
            self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._hooks.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))
            self._hooks.extend(self.adapter.hooks(self))
            if self._layer_methods:
                for i, layer in enumerate(_compat.decoder_layers(self.model)):
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            if self._attn_methods:
                self._install_attention()
        except BaseException:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for mod in [m for m, (h, _) in list(_ATTN_OWNERS.items()) if h is self]:
                del _ATTN_OWNERS[mod]
            for m in reversed(bound):
                m.unbind(self)
                m._kvfix_handle = None
            raise
        _HANDLES[self.model] = self
        self._active = True

    def _install_attention(self) -> None:
        base = _compat.text_attn_implementation(self.model)
        if base.startswith(_ATTN_PREFIX):
            raise ValueError(f"the text model already uses {base!r}")
        name = _ATTN_PREFIX + base
        _compat.register_attention(name, _make_attention_entry(base), base)
        for i, layer in enumerate(_compat.decoder_layers(self.model)):
            for mod in layer.modules():
                if hasattr(mod, "layer_idx") and mod is not layer:
                    _ATTN_OWNERS[mod] = (self, i)
        _compat.set_text_attn_implementation(self.model, name)
        self._base_attn = base

    # ---- hooks -----------------------------------------------------------------------------

    def _bind(self, args, kwargs) -> dict:
        try:
            ba = self._signature.bind_partial(*args, **kwargs)
        except TypeError:
            return dict(kwargs)
        out = dict(ba.arguments)
        if self._varkw is not None:
            out.update(out.pop(self._varkw, {}) or {})
        return out

    def _pre_forward(self, module, args, kwargs):
        if self._suspended:
            return None
        inputs = self._bind(args, kwargs)
        input_ids = inputs.get("input_ids")
        embeds = inputs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        cache = inputs.get("past_key_values")
        past_len = _compat.cache_length(cache)
        q_len = int(ref.shape[1])
        main = self._pass_name == "main"
        new_session = main and (past_len == 0 or self.session is None)
        if new_session:
            # contexts left by a forward that raised (its post-hook never ran) are dropped here;
            # methods that run nested forwards do so in auxiliary_pass() or suspended()
            self._ctx_stack.clear()
            self.session = Session()
            if self._images is not None:
                self._images.cursor = self._images.grid_cursor = 0
        ctx = ForwardContext(handle=self, model=self.model, pass_name=self._pass_name,
                             phase="prefill" if (q_len > 1 or past_len == 0) else "decode",
                             past_len=past_len, q_len=q_len, batch_size=int(ref.shape[0]), input_ids=input_ids,
                             attention_mask=inputs.get("attention_mask"), cache=cache, images=[],
                             inputs=inputs, output=None, session=self.session, _key=id(kwargs))
        if self.adapter.carries_images(inputs):
            ctx.images = self._resolve_images(inputs, input_ids, past_len, record=main)
        self._ctx_stack.append(ctx)
        try:
            if new_session:
                for m in self.methods:
                    m.on_session_start(ctx)
            hook = "on_prefill_start" if ctx.phase == "prefill" else "on_decode_start"
            for m in self.methods:
                getattr(m, hook)(ctx)
        except BaseException:
            self._ctx_stack.pop()
            raise
        return None

    def _post_forward(self, module, args, kwargs, output):
        if self._suspended:
            return None
        # the context of this forward: same kwargs object as in the pre-hook; anything above it
        # on the stack is left over from a nested forward that raised
        # (another pre-hook may have replaced the kwargs: then it is the innermost one)
        if not self._ctx_stack:
            return None
        at = next((i for i in range(len(self._ctx_stack) - 1, -1, -1) if self._ctx_stack[i]._key == id(kwargs)),
                  len(self._ctx_stack) - 1)
        ctx = self._ctx_stack[at]
        del self._ctx_stack[at:]
        ctx.output = output
        if ctx.cache is None:
            ctx.cache = getattr(output, "past_key_values", None)
        hook = "on_prefill_end" if ctx.phase == "prefill" else "on_decode_end"
        for m in self.methods:
            getattr(m, hook)(ctx)
        return None

    def _current_ctx(self):
        return self._ctx_stack[-1] if self._ctx_stack else None

    def _layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self._suspended:
                return None
            ctx = self._current_ctx()
            in_args = bool(args)
            hidden = args[0] if in_args else kwargs.get("hidden_states")
            changed = False
            for m in self._layer_methods:
                new = m.layer_input(ctx, layer_idx, hidden)
                if new is not None:
                    hidden, changed = new, True
            if not changed:
                return None
            if in_args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def _dispatch_attention(self, layer_idx, base_fn, module, query, key, value, attention_mask, kwargs):
        ctx = self._current_ctx()

        def innermost(q, k, v, mask, **kw):
            return base_fn(module, q, k, v, mask, **kw)

        call = innermost
        for m in reversed(self._attn_methods):
            call = (lambda m, nxt: (lambda q, k, v, mask, **kw:
                                    m.attention(ctx, layer_idx, module, q, k, v, mask, nxt, **kw)))(m, call)
        return call(query, key, value, attention_mask, **kwargs)

    # ---- images ----------------------------------------------------------------------------

    def _resolve_images(self, inputs: dict, input_ids, past_len: int, record: bool) -> list[ImageSpan]:
        if input_ids is None:
            raise ValueError("kvfix.hf needs input_ids to locate the image tokens (got inputs_embeds only)")
        is_img = (input_ids == self.adapter.image_token_id).cpu()
        n_tokens = int(is_img.sum())
        if n_tokens == 0:
            return []
        given = self._images if record else None
        explicit = given.grids[given.grid_cursor:] if (given is not None and given.grids is not None) else None
        layouts = self.adapter.layouts(inputs, n_tokens, explicit)
        layouts, used = _match_layouts(layouts, n_tokens, explicit is not None, is_img, input_ids)

        # contiguous runs of image tokens per batch item, split into images in order
        spans, it = [], iter(layouts)
        first_index = len(self.session.images) if (record and self.session is not None) else 0
        for b in range(is_img.shape[0]):
            for s, e in _runs(is_img[b]):
                while s < e:
                    lay = next(it, None)
                    if lay is None or s + lay.tokens > e:
                        raise ValueError(f"batch item {b}: an image token run [{s}, {e}) does not split into whole "
                                         f"images of the expected grids (an image cut across forward passes?)")
                    spans.append(ImageSpan(index=first_index + len(spans), batch=b, start=past_len + s + lay.prefix,
                                           gh=lay.gh, gw=lay.gw, prefix=lay.prefix))
                    s += lay.tokens
        if given is not None:
            given.grid_cursor += used if explicit is not None else 0
            if isinstance(given.depth, list):
                left = len(given.depth) - given.cursor
                src = _source_images(left, [sum(1 for sp in spans if sp.batch == b) for b in range(is_img.shape[0])],
                                     input_ids)
                if src is None:
                    raise ValueError(f"{len(given.depth)} depth maps were given but the input has "
                                     f"{given.cursor + len(spans)} images (one depth map per image, in order)")
                for sp, i in zip(spans, src):
                    sp.depth_map = given.depth[given.cursor + i]
                given.cursor += max(src) + 1
            elif given.depth == "uniform":
                for sp in spans:
                    sp.depth_map = "uniform"
            given.max_used = max(given.max_used, given.cursor)
        if record and self.session is not None:
            self.session.images.extend(spans)
        return spans


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in a 1-D bool tensor."""
    pos = torch.nonzero(row).flatten().tolist()
    runs, i = [], 0
    while i < len(pos):
        j = i
        while j + 1 < len(pos) and pos[j + 1] == pos[j] + 1:
            j += 1
        runs.append((pos[i], pos[j] + 1))
        i = j + 1
    return runs


def _repeat_factor(total: int, n_src: int, input_ids) -> int | None:
    """k when the batch is each of B / k items repeated k times in a row (what generate does for
    num_return_sequences / num_beams > 1) and `total == k * n_src`; else None."""
    if n_src <= 0 or total % n_src or total == n_src:
        return None
    k = total // n_src
    B = input_ids.shape[0]
    if B % k:
        return None
    blocks = input_ids.reshape(B // k, k, -1)
    return k if bool((blocks == blocks[:, :1]).all()) else None


def _source_images(n_src: int, per_row: list[int], input_ids) -> list[int] | None:
    """For each image of the batch (row-major), the index of its per-image input among `n_src`:
    one each in order, or, when generate repeated every item k times, item i's inputs k times."""
    total = sum(per_row)
    if n_src >= total:
        return list(range(total))
    k = _repeat_factor(total, n_src, input_ids)
    if k is None:
        return None
    src, p = [], 0
    for i in range(0, len(per_row), k):
        src += list(range(p, p + per_row[i])) * k
        p += per_row[i]
    return src


def _match_layouts(layouts, n_tokens: int, explicit: bool, is_img, input_ids):
    """The layouts of this forward's images in order, and how many of `layouts` were used."""
    total, count = 0, 0
    while count < len(layouts) and total < n_tokens:
        total += layouts[count].tokens
        count += 1
    if total == n_tokens and (explicit or count == len(layouts)):
        return layouts[:count], count
    have = sum(lay.tokens for lay in layouts)
    k = _repeat_factor(n_tokens, have, input_ids)
    if k is not None:  # items repeated by generate: each copy of item i takes item i's grids
        out, p = [], 0
        for i in range(0, is_img.shape[0], k):
            t, start = int(is_img[i].sum()), p
            while t > 0 and p < len(layouts):
                t -= layouts[p].tokens
                p += 1
            if t != 0:
                break
            out += layouts[start:p] * k
        else:
            if p == len(layouts):
                return out, p
    raise ValueError(f"the image grids account for {have} tokens but the input has {n_tokens} image tokens")


def _explicit_grids(adapter, image_grid_thw) -> list[Layout]:
    from .models import QwenVLAdapter, _grid_list
    if not isinstance(adapter, QwenVLAdapter):
        raise ValueError("image_grid_thw applies to Qwen2-VL models; LLaVA's grid comes from its vision config")
    return _grid_list(image_grid_thw, adapter.merge, "image_grid_thw")


def _make_attention_entry(base: str):
    def kvfix_attention(module, query, key, value, attention_mask, *args, **kwargs):
        base_fn = _compat.base_attention(base)
        if args:  # transformers passes these by keyword; accept the positional form too
            kwargs.update(zip(("scaling", "dropout"), args))
        owner = _ATTN_OWNERS.get(module)
        if owner is None or owner[0]._suspended:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        handle, layer_idx = owner
        return handle._dispatch_attention(layer_idx, base_fn, module, query, key, value, attention_mask, kwargs)
    kvfix_attention.__name__ = f"kvfix_attention_{base}"
    return kvfix_attention


# --------------------------------------------------------------------------------------------
# entry points

def enable(model: torch.nn.Module, *methods: Method) -> Handle:
    """Switch kvfix methods on for a supported transformers VLM; returns the Handle.

    `handle = kvfix.hf.enable(model, kvfix.hf.DSCR(...), ...)`. Methods run in the order given
    (hooks of the first method run first; its `attention` is the outermost wrapper). One handle
    per model: `handle.disable()` before enabling again.
    """
    if not methods:
        raise ValueError("enable needs at least one method, e.g. kvfix.hf.DSCR()")
    for i, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(f"methods[{i}] must be a kvfix.hf.Method instance, got {type(m).__name__}")
    if len({id(m) for m in methods}) != len(methods):
        raise ValueError("the same method instance was given twice")
    existing = _HANDLES.get(model)
    if existing is not None and existing.active:
        raise ValueError(f"kvfix.hf is already enabled on this model ({existing!r}); call .disable() first or "
                         "pass every method to one enable() call")
    handle = Handle(model, methods)
    handle._attach()
    return handle


def get_handle(model: torch.nn.Module) -> Handle | None:
    """The active handle of `model`, or None."""
    h = _HANDLES.get(model)
    return h if h is not None and h.active else None


def check_layers(layers):
    """A method's `layers` argument, checked at construction: None, a slice, or an iterable of
    ints (returned as a tuple); range checks happen at bind, when L is known."""
    if layers is None or isinstance(layers, slice):
        return layers
    if isinstance(layers, (bool, int)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be None, a slice or an iterable of ints, got {layers!r}")
    layers = tuple(layers)
    resolve_layers(layers, 1 << 30, 0)  # type errors now
    return layers


def resolve_layers(layers, num_layers: int, default_start: int) -> tuple[int, ...]:
    """None -> [default_start, L); a slice/range/iterable of ints (negatives count from L)."""
    if layers is None:
        return tuple(range(default_start, num_layers))
    if isinstance(layers, slice):
        return tuple(range(num_layers)[layers])
    if isinstance(layers, (bool, int)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be None, a slice or an iterable of ints, got {layers!r}")
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"layers must contain ints, got {x!r}")
        y = x + num_layers if x < 0 else x
        if not 0 <= y < num_layers:
            raise ValueError(f"layer {x} is out of range for a text model with {num_layers} layers")
        out.append(y)
    return tuple(sorted(set(out)))
