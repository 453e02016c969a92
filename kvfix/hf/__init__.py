"""kvfix for transformers vision-language models: one line switches a method on.

    import kvfix, kvfix.hf
    handle = kvfix.hf.enable(model, kvfix.hf.DSCR())          # LLaVA(-NeXT/-OneVision), Qwen-VL 2/2.5/3, Gemma 3
    with handle.images(depth_maps=[depth0, depth1]):          # one map per image, any resolution
        out = model.generate(**inputs, max_new_tokens=64)     # greedy or sampling, batch, padding
    handle.disable()                                          # the plain model again

`handle.generate(**inputs, depth_maps=[...], max_new_tokens=64)` is the same in one call, and
`with kvfix.hf.enable(...) as handle:` disables on exit. Without depth maps DSCR raises a
ValueError before the forward runs; `depth_maps="uniform"` (or `DSCR(missing_depth="uniform")`)
runs it without a depth cue on purpose.

Layout (how methods plug in, and how they stack)
------------------------------------------------
What a stack of methods computes, and in which order they compose: docs/STACKING.md.
- `Method` (core.py): a plugin with optional hooks: `bind/unbind`, `on_session_start`,
  `on_prefill_start/end`, `on_decode_start/end` (per forward pass of the model, with a
  `ForwardContext`: phase, cache, input ids, padding mask, image spans, per-session state),
  `attention(...)` (wraps the text model's attention function: sees q after RoPE and the
  layer's cache K/V; KVSmooth, SCR's diagnostic scores, CMAC's calibrated attention),
  `layer_input(...)` (replaces the residual stream entering a decoder layer: SCR), and
  `text_input(...)` / `text_output(...)` (the text model's keyword arguments and output: CMAC
  runs its two branches as 2B rows of each forward, and its forked prefill from there). Only
  the hooks some method overrides are installed.
- `Handle` (core.py): the single dispatcher per model. It installs, once for all methods:
  a forward pre-hook and hook on the adapter's step module, the model itself for most families
  (session / prefill / decode bookkeeping, image spans: images.py), the adapter's hooks (a
  forward hook on Qwen2-VL's vision tower for its grids; the tower itself is untouched),
  a forward pre-hook and hook on the text model (only for `text_input` / `text_output`),
  decoder-layer pre-hooks (only for `layer_input`), and one registered attention function
  `kvfix_<base>` set on the text model only (`set_attn_implementation({"text_config": ...})`,
  only for `attention`), which chains the methods' `attention` around the model's own
  implementation (SDPA, flash, ...). `handle.auxiliary_pass(name)` runs extra forwards inside a
  session (SCR's diagnostic pass); `handle.suspended()` runs the plain model.
- Model adapters (models.py): one `ModelAdapter` per family, looked up by `config.model_type`
  in a registry (`register_adapter`; docs/ADAPTERS.md): where the text model, its layers and
  their attention modules are, where the image tokens are (`config.image_token_id`, contiguous
  runs per batch item, left padding included), each image's patch grids (LLaVA
  `image_size // patch_size` per side, CLS dropped by the "default" feature strategy, skipped
  inside the span with "full"; Qwen2-VL / Qwen2.5-VL `(h // merge, w // merge)` from
  `image_grid_thw`), and the RoPE kind and position layout. Methods never look at a model class.
- Every use of the transformers library (its classes, interfaces, argument and output names,
  the cache, what `generate` does) is in `_compat.py` (see its docstring); what differs per
  family (config fields, where the images and grids are, the RoPE kind) is in the adapters.

DSCR (dscr.py): the timing of a split prefill (METHODS §1): every token after an image attends to
its refined keys/values at the selected layers, the image and what precedes it to the plain
ones. In the forward that carries the images, the attention hook of each selected layer refines
each grid of each image (its `gh x gw` tokens; several grids per image for LLaVA-NeXT) with
the DSCR op and runs the layer's attention once per
refinement level, each query keeping its own level's output; the refined spans are written into
the cache at the end of the forward, so decoding reads them and never refines again (decoding
forwards carry no images).
"""
from .core import ForwardContext, Handle, Method, Session, enable, get_handle
from .dscr import DSCR
from .models import Grid, GridSpan, ImageSpan, Layout, ModelAdapter, register_adapter

__all__ = ["DSCR", "ForwardContext", "Grid", "GridSpan", "Handle", "ImageSpan", "Layout", "Method", "ModelAdapter",
           "Session", "enable", "get_handle", "register_adapter"]

# KVSmooth (kvsmooth.py): while decoding, inside the attention hook of every selected layer (after
# the model's own attention has run), one fused kernel call computes the attention rows' entropy,
# updates a per-sequence queue and smooths the newest cache position in place:
#     kvfix.hf.enable(model, kvfix.hf.KVSmooth())                    # lam_ref per model family
#     kvfix.hf.enable(model, kvfix.hf.DSCR(), kvfix.hf.KVSmooth())   # stacked with DSCR
from .kvsmooth import KVSMOOTH_PRESETS, KVSmooth  # noqa: E402

__all__ += ["KVSmooth", "KVSMOOTH_PRESETS"]

# SCR (scr.py): at the prefill of a prompt with images, a diagnostic pass (the prompt once more,
# stopped after the diagnostic layers) scores each image's patches by the attention of the text
# after it; the real prefill then redistributes the image tokens' hidden states entering layers
# 1..4 around the top-scoring patches (kvfix.scr_redistribute_). See docs/SCR_HF.md.
#     kvfix.hf.enable(model, kvfix.hf.SCR())                              # two passes per prompt
#     kvfix.hf.enable(model, kvfix.hf.SCR(), kvfix.hf.DSCR(), kvfix.hf.KVSmooth())  # stacked
from .scr import SCR  # noqa: E402

__all__ += ["SCR"]
# CMAC (cmac.py): two decoding branches in one batched forward (rows [original; distorted], one
# cache of 2B rows), the text model's attention replaced by kvfix.cmac_attention with calibrated
# image keys (CMPC; IMD on the distorted rows), the model's logits by kvfix.contrastive_logits:
#     kvfix.hf.enable(model, kvfix.hf.CMAC())                       # then model.generate(...)
#     kvfix.hf.enable(model, kvfix.hf.DSCR(), kvfix.hf.CMAC(), kvfix.hf.KVSmooth())   # stacked
from .cmac import CMAC, CMAC_PRESETS  # noqa: E402

__all__ += ["CMAC", "CMAC_PRESETS"]
