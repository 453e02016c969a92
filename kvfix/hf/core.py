"""The dispatcher: one handle per model, methods plugged into it, hooks installed once.

See the package docstring (`kvfix.hf`) for the user-facing description.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from typing import Iterable, Sequence

import torch

from . import _compat
from .images import ImageInputs, host_tokens, resolve_images
from .models import ImageSpan, adapter_for

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
    - `text_input(ctx, kwargs) -> dict | None`: the keyword arguments of a text-model forward
      (`inputs_embeds`, `attention_mask`, `position_ids`, `past_key_values`, ...); return a
      replacement dict (e.g. more rows) or None. Methods run in the enable order.
    - `text_output(ctx, module, kwargs, output) -> output | None`: the text model's output
      (`kwargs`: the inputs it ran on, after every `text_input`); return a replacement or None.
      A method may run `module(**...)` again from here (its own hooks see that nested forward).

    The rows a hook sees need not be the forward's `B x q_len` tokens: a method may run the text
    model on more rows (CMAC: `[original; distorted]`, row r showing batch item r mod B) or on a
    part of the prompt (CMAC's forked prefill runs the distorted rows on the prompt after a
    split). Such a partial pass always covers the end of the forward's tokens: `T` rows
    (`hidden_states.shape[1]`, `query.shape[2]`) sit at cache positions
    `[past_len + q_len - T, past_len + q_len)`. Slice by those positions, never by `past_len`
    alone (docs/STACKING.md).

    `ctx` is None in the text-model hooks when the text model runs outside a forward of the
    model's generation step (the hooks only see forwards of the model given to `enable`).

    `attention_innermost = True` puts a method's `attention` innermost in the chain whatever the
    enable order (a method that replaces the attention computation itself, CMAC, so that methods
    acting around the attention, KVSmooth, wrap it); among such methods the enable order holds.

    `attention_phases` names the forward phases ("prefill", "decode") in which `attention` may do
    anything; in a forward of another phase the dispatcher leaves the method out of the chain
    (when every method is left out, the model's own attention function runs directly). A decoding
    step calls the attention of every layer, so a method that only acts on the prompt (DSCR, SCR)
    costs nothing per decoded token. With `ctx` None (the text model run outside a forward of the
    model) every method's `attention` runs, whatever its phases.

    `layer_phases` does the same for `layer_input`: in a forward of another phase the method is
    left out, and where no method's `layer_input` is left the decoder layers carry no kvfix hook
    during the forward (a forward pre-hook puts every layer's call on torch's hooked path, some
    10-20 us of host time a layer and token). With `ctx` None the methods' `layer_input` runs
    where the layers carry the hook: as the latest forward left them.
    """

    name = "method"
    uses_attention = False
    attention_innermost = False
    attention_phases: frozenset = frozenset({"prefill", "decode"})
    layer_phases: frozenset = frozenset({"prefill", "decode"})

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

    def text_input(self, ctx, kwargs: dict):
        return None

    def text_output(self, ctx, module, kwargs: dict, output):
        return None

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
    (ImageSpan list of the images in this forward), host_text (in a forward that carries images:
    [batch, q_len] bool on the CPU, the tokens that are neither image placeholders nor padding,
    read with the image positions in the forward's one device-to-host copy, which a nested pass
    on the same token tensors reuses; else None), inputs
    (all forward arguments by name), output (set before the *_end hooks), session (Session).
    """

    __slots__ = ("handle", "model", "pass_name", "phase", "past_len", "q_len", "batch_size", "input_ids",
                 "attention_mask", "cache", "images", "host_text", "inputs", "output", "session", "_key", "_host")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def state(self, method: Method) -> dict:
        """Per-session scratch dict of `method`."""
        return self.session.state(method)


# --------------------------------------------------------------------------------------------
# handle

class Handle:
    """kvfix switched on for one model. Created by `enable`; `disable()` restores the model."""

    def __init__(self, model: torch.nn.Module, methods: Sequence[Method]):
        self.model = model
        self.methods: tuple[Method, ...] = tuple(methods)
        self.adapter = adapter_for(model)
        self.num_layers = self.adapter.num_layers()
        self.session: Session | None = None
        self._signature = inspect.signature(self.adapter.step_module().forward)
        self._varkw = next((p.name for p in self._signature.parameters.values()
                            if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._hooks: list = []
        self._ctx_stack: list[ForwardContext] = []
        self._images: ImageInputs | None = None
        self._pass_name = "main"
        self._suspended = 0
        self._base_attn: str | None = None
        attn = [m for m in self.methods if m.uses_attention or _overrides(m, "attention")]
        self._attn_methods = tuple(sorted(attn, key=lambda m: bool(m.attention_innermost)))  # stable
        self._attn_by_phase = {phase: tuple(m for m in self._attn_methods if phase in m.attention_phases)
                               for phase in ("prefill", "decode")}
        self._layer_methods = tuple(m for m in self.methods if _overrides(m, "layer_input"))
        self._layer_by_phase = {phase: tuple(m for m in self._layer_methods if phase in m.layer_phases)
                                for phase in ("prefill", "decode")}
        self._layer_hooks: list = []  # the decoder layers' pre-hooks while installed (_set_layer_hooks)
        self._text_in_methods = tuple(m for m in self.methods if _overrides(m, "text_input"))
        self._text_out_methods = tuple(m for m in self.methods if _overrides(m, "text_output"))
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

    def set_images(self, depth_maps=None, *, image_grid_thw=None, tiles=None) -> None:
        """Per-image inputs for the following generations, in the order the model consumes the
        images (batch item first, then position in the prompt), e.g. the processor's order.

        depth_maps: a list of [H, W] tensors (any resolution; or [N] per-token depths already
            on the patch grid), a [num_images, H, W] tensor, or "uniform" (no depth cue).
        image_grid_thw: Qwen2-VL only, needed only when the grids cannot be seen by the handle
            (features encoded outside the model, chunked prefill).
        tiles: InternVL only, one (rows, cols) per image: how the processor arranged its tiles,
            which the model's forward does not say; DSCR needs it to take each tile's depth from
            its part of the image's depth map (docs/ADAPTERS.md).
        Every new generation (empty cache) starts again from the first image. When `generate`
        repeats every batch item (num_return_sequences / num_beams > 1), per-image inputs given
        for the original items are repeated the same way.
        """
        inputs = ImageInputs(depth_maps)
        if image_grid_thw is not None and tiles is not None:
            raise ValueError("give image_grid_thw or tiles, not both")
        if image_grid_thw is not None:
            inputs.grids = self.adapter.explicit_layouts(image_grid_thw)
        if tiles is not None:
            inputs.grids = self.adapter.tile_layouts(tiles)
        self._images = inputs

    def clear_images(self) -> None:
        self._images = None

    @contextlib.contextmanager
    def images(self, depth_maps=None, *, image_grid_thw=None, tiles=None):
        """`with handle.images(depth_maps=[...]): model.generate(...)` (see `set_images`)."""
        previous = self._images
        self.set_images(depth_maps, image_grid_thw=image_grid_thw, tiles=tiles)
        inputs = self._images
        try:
            yield self
        finally:
            self._images = previous
            if isinstance(inputs.depth, list) and inputs.max_used and inputs.max_used < len(inputs.depth):
                warnings.warn(f"kvfix.hf: {len(inputs.depth)} depth maps were given but the prompt had only "
                              f"{inputs.max_used} images", stacklevel=3)

    def generate(self, inputs=None, *, depth_maps=None, **kwargs):
        """`model.generate(inputs, **kwargs)` inside `images(depth_maps)` (when given). Every
        keyword argument other than `depth_maps` goes to `generate` (`image_grid_thw` included)."""
        if inputs is not None:
            kwargs["inputs"] = inputs
        ctx = self.images(depth_maps) if depth_maps is not None else contextlib.nullcontext()
        with ctx:
            return self.model.generate(**kwargs)

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
        self._set_layer_hooks(False)
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
            step = self.adapter.step_module()
            self._hooks.append(step.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._hooks.append(step.register_forward_hook(self._post_forward, with_kwargs=True))
            self._hooks.extend(self.adapter.hooks(self))
            if self._text_in_methods or self._text_out_methods:
                text = self.adapter.text_model()
                self._hooks.append(text.register_forward_pre_hook(self._text_pre_hook, with_kwargs=True))
                self._hooks.append(text.register_forward_hook(self._text_post_hook, with_kwargs=True))
            self._set_layer_hooks(bool(self._layer_methods))
            if self._attn_methods:
                self._install_attention()
        except BaseException:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._set_layer_hooks(False)
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
        for i, layer in enumerate(self.adapter.decoder_layers()):
            for mod in self.adapter.attention_modules(layer):
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
        input_ids, embeds, cache, padding, _ = _compat.step_inputs(inputs)
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
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
                             attention_mask=padding, cache=cache, images=[],
                             inputs=inputs, output=None, session=self.session, _key=id(kwargs))
        if self.adapter.carries_images(inputs):
            ids = self.adapter.placeholder_ids(inputs)
            outer = self._ctx_stack[-1] if self._ctx_stack else None
            if outer is not None and outer._host is not None and outer._host[0] is ids and outer._host[1] is padding:
                host = outer._host[2]  # a nested pass on the same tokens (SCR's diagnostic): read already
            else:
                host = host_tokens(self.adapter, ids, padding)
            ctx._host = (ids, padding, host)
            ctx.host_text = host[1]
            ctx.images = self._resolve_images(inputs, ids, host, past_len, record=main)
        self._ctx_stack.append(ctx)
        self._set_layer_hooks(any(self._layer_by_phase[c.phase] for c in self._ctx_stack))
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
        if self._ctx_stack:  # back in an outer forward: its layers as it needs them
            self._set_layer_hooks(any(self._layer_by_phase[c.phase] for c in self._ctx_stack))
        ctx.output = output
        if ctx.cache is None:
            ctx.cache = _compat.output_cache(output)
        hook = "on_prefill_end" if ctx.phase == "prefill" else "on_decode_end"
        for m in self.methods:
            getattr(m, hook)(ctx)
        return None

    def _current_ctx(self):
        return self._ctx_stack[-1] if self._ctx_stack else None

    def _text_pre_hook(self, module, args, kwargs):
        if self._suspended or not self._text_in_methods:
            return None
        if args:
            raise TypeError("kvfix.hf: the text model was called with positional arguments")
        ctx, changed = self._current_ctx(), False
        merged = self.adapter.merge_text_inputs(kwargs)  # a text model that embeds its own images
        if merged is not None:
            kwargs, changed = merged, True
        for m in self._text_in_methods:
            new = m.text_input(ctx, kwargs)
            if new is not None:
                kwargs, changed = new, True
        return (args, kwargs) if changed else None

    def _text_post_hook(self, module, args, kwargs, output):
        if self._suspended or not self._text_out_methods:
            return None
        ctx, changed = self._current_ctx(), False
        for m in self._text_out_methods:
            new = m.text_output(ctx, module, kwargs, output)
            if new is not None:
                output, changed = new, True
        return output if changed else None

    def _set_layer_hooks(self, on: bool) -> None:
        """Put the decoder layers' pre-hooks on (every method's `layer_input`) or take them off."""
        if on and not self._layer_hooks:
            self._layer_hooks = [layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
                                 for i, layer in enumerate(self.adapter.decoder_layers())]
        elif not on and self._layer_hooks:
            for h in self._layer_hooks:
                h.remove()
            self._layer_hooks = []

    def _layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self._suspended:
                return None
            ctx = self._current_ctx()
            hidden = _compat.layer_hidden(args, kwargs)
            changed = False
            for m in self._layer_methods if ctx is None else self._layer_by_phase[ctx.phase]:
                new = m.layer_input(ctx, layer_idx, hidden)
                if new is not None:
                    hidden, changed = new, True
            return _compat.with_layer_hidden(args, kwargs, hidden) if changed else None
        return hook

    def _dispatch_attention(self, layer_idx, base_fn, module, query, key, value, attention_mask, kwargs):
        # (every layer of every decoded token comes through here: docs/HOST.md)
        ctx = self._ctx_stack[-1] if self._ctx_stack else None
        methods = self._attn_methods if ctx is None else self._attn_by_phase[ctx.phase]
        if not methods:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        call = functools.partial(base_fn, module)  # call_next(q, k, v, mask, **kw) of the innermost method
        for m in reversed(methods[1:]):
            call = _link(m, ctx, layer_idx, module, call)
        return methods[0].attention(ctx, layer_idx, module, query, key, value, attention_mask, call, **kwargs)

    # ---- images ----------------------------------------------------------------------------

    def _resolve_images(self, inputs: dict, input_ids, host, past_len: int, record: bool) -> list[ImageSpan]:
        given = self._images if record else None
        first_index = len(self.session.images) if (record and self.session is not None) else 0
        spans = resolve_images(self.adapter, inputs, input_ids, past_len, given, first_index, host)
        if record and self.session is not None:
            self.session.images.extend(spans)
        return spans


def _link(method: Method, ctx, layer_idx: int, module, call_next):
    """`call_next` of the method before `method` in the attention chain."""
    def call(q, k, v, mask, **kw):
        return method.attention(ctx, layer_idx, module, q, k, v, mask, call_next, **kw)
    return call


def _make_attention_entry(base: str):
    def kvfix_attention(module, query, key, value, attention_mask, *args, **kwargs):
        base_fn = _compat.base_attention(base)
        if args:
            kwargs = _compat.attention_kwargs(args, kwargs)
        owner = _ATTN_OWNERS.get(module)
        if owner is None or owner[0]._suspended:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        return owner[0]._dispatch_attention(owner[1], base_fn, module, query, key, value, attention_mask, kwargs)
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
