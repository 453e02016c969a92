"""Every point where kvfix.hf touches the transformers library, in one file.

Keep this surface small: when a transformers release moves something, this is the only file
that should need a change. What differs per model family (config fields, where the images and
their grids are, the RoPE kind) is the adapters' (models.py), which reach the model through
the functions here. What we rely on, and why:

Public API
- `PreTrainedModel.get_decoder()` -> the text model, whose `.layers` are the decoder layers;
  `get_encoder(modality="image")` -> the vision tower (forward hooks only, never modified).
- `PretrainedConfig.get_text_config(decoder=True)`: layer count, attention implementation;
  `config.model_type`: the adapter registry's key.
- `AttentionInterface` / `AttentionMaskInterface` (`register`), `ALL_ATTENTION_FUNCTIONS`,
  `ALL_MASK_ATTENTION_FUNCTIONS`, and `model.set_attn_implementation({"text_config": name})`,
  so that only the text model goes through the kvfix attention function (the whole model's
  where its config is the text config: Chameleon).
- `Cache.get_seq_length()` and `Cache.layers[i].keys / .values` (`[B, H, T, D]` tensors of the
  dynamic and static cache layers; transformers >= 4.56 exposes them on each layer).
- `DynamicCache(ddp_cache_data=[(keys, values), ...])`: a cache prefilled per layer (SCR's
  diagnostic pass over a continued prompt runs on such a copy);
  `DynamicCache(config=...)` + `update` to fork a prefix, and assigning a dynamic layer's
  `.keys / .values` to append batch rows (CMAC's prefill).
- The text model's rotary embedding buffer `get_decoder().rotary_emb.inv_freq` ([D/2], the
  frequencies in use, scaling variants included; `<layer type>_inv_freq` with
  `config.layer_types` where each layer type has its RoPE, Gemma 3) and
  `rope_parameters["mrope_section"]` of the text config (multi-section RoPE), for CMAC.

Argument and output names (documented, but not a formal API)
- A model's forward: `input_ids`, `inputs_embeds`, `attention_mask` (2-D padding),
  `past_key_values`, `use_cache`, `labels`, `pixel_values`, `mm_encoder_outputs`,
  `output_attentions`, `output_hidden_states`; its output's `.logits`, `.past_key_values`,
  `.hidden_states`, `.attentions` (`step_inputs`, `output_*`, `diagnostic_inputs`).
- The text model's forward: `inputs_embeds` / `input_ids` (Chameleon's also `pixel_values` /
  `mm_encoder_outputs`, merged by `get_image_features(...).pooler_output` scattered into the
  placeholders as its forward does: `merge_image_embeddings`), `attention_mask` (a tensor or a
  dict per layer type), `position_ids` (`[B, t]` or `[S, B, t]`), `past_key_values`,
  `use_cache`, Qwen3-VL's `visual_pos_masks` ([B, t] bool) and `deepstack_visual_embeds`
  (per layer, the features of the True positions in row-major order); its output's
  `.last_hidden_state` (`text_inputs_*`, `text_hidden`).
- A decoder layer's first argument or `hidden_states` (`layer_hidden`); an attention function's
  `(module, query, key, value, attention_mask, scaling=..., dropout=...)`, the module's
  `scaling` and `layer_idx` (`attention_kwargs`, `attention_scale`, `attention_modules`);
  additive masks use `finfo.min` for "no attention" (`mask_minus_inf`, `mask_keep`).

Behaviour we depend on
- Attention modules call `past_key_values.update(k, v, layer_idx)` and then the attention
  function with the full cached K/V; cache position `p` holds input position `p` for dynamic
  and static (non-sliding) layers, left padding included.
- A text model's forward iterates over `self.layers` (`first_layers`: SCR's diagnostic pass
  runs the first layers only).
- Vision-language models mark image placeholders with an image token id in `input_ids`.
- `generate` encodes images before the prefill and hands the encoder output to `forward` as
  `mm_encoder_outputs["image"]` (transformers >= 5); for Qwen2-VL that object is the vision
  tower's own output, which is how we recover `image_grid_thw` (popped by `generate`).
"""
from __future__ import annotations

import contextlib
import math

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("kvfix.hf needs transformers >= 5.0: pip install 'kvfix[hf]'") from e

try:  # quantized layers keep most of the cache outside `.keys`: they are refused
    from transformers.cache_utils import BaseQuantizedLayer as _QuantizedLayer
except ImportError:  # pragma: no cover
    _QuantizedLayer = ()

TRANSFORMERS_VERSION = transformers.__version__


# --------------------------------------------------------------------------------------------
# model structure

def text_config(model):
    return model.config.get_text_config(decoder=True)


def decoder_layers(text, owner: str = ""):
    """The decoder layers (an nn.ModuleList) of a text model."""
    layers = getattr(text, "layers", None)
    if layers is None:
        raise TypeError(f"{owner or type(text).__name__}: cannot find the text decoder layers (get_decoder().layers)")
    return layers


def attention_modules(layer) -> list:
    """The attention modules of a decoder layer: the submodules carrying a `layer_idx` (transformers'
    attention classes do; the attention function is called with them as `module`)."""
    return [mod for mod in layer.modules() if mod is not layer and hasattr(mod, "layer_idx")]


def named_parameter(model, name: str):
    """The parameter of `model` whose qualified name ends with `name` (e.g. LLaVA-NeXT's
    `image_newline`), or None."""
    for full, p in model.named_parameters():
        if full == name or full.endswith("." + name):
            return p
    return None


def encoded_features(encoded) -> list | None:
    """The per-image feature tensors of an image encoder output `generate` handed over (its
    `pooler_output`: a list of [tokens, C], or one [images, tokens, C] tensor), or None."""
    feats = getattr(encoded, "pooler_output", None)
    if isinstance(feats, torch.Tensor):
        return list(feats.unbind(0)) if feats.dim() == 3 else None
    return list(feats) if isinstance(feats, (list, tuple)) else None


def anyres_unpadded_grid(image_size, grid_pinpoints, tile: int, side: int) -> tuple[int, int]:
    """LLaVA-NeXT's high-resolution grid (rows, cols) for an image of `image_size` (h, w): the
    tiles of its best pinpoint resolution, `side` patches per tile side, unpadded to the image's
    aspect (transformers' `get_anyres_image_grid_shape` and `unpad_image`)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    th, tw = get_anyres_image_grid_shape(image_size, grid_pinpoints, tile)
    shape = unpad_image(torch.empty(0, th * side, tw * side, device="meta"), torch.as_tensor(image_size)).shape
    return int(shape[1]), int(shape[2])


def input_embeddings(model):
    """The token embedding module of a model (`get_input_embeddings()`)."""
    return model.get_input_embeddings()


def vision_encoder(model):
    return model.get_encoder(modality="image")


def text_model(model):
    """The text decoder module (a forward hook there sees inputs_embeds, the 2-D padding mask and
    the RoPE position ids of every forward)."""
    return model.get_decoder()


def forward_carries_images(inputs: dict) -> bool:
    """Does a forward of a transformers VLM bring images: `pixel_values`, or the encoder output
    `generate` hands over as `mm_encoder_outputs["image"]`?"""
    return inputs.get("pixel_values") is not None or encoded_images(inputs) is not None


def encoded_images(inputs: dict):
    """The image encoder's output handed to a forward by `generate` (`mm_encoder_outputs["image"]`)."""
    return (inputs.get("mm_encoder_outputs") or {}).get("image")


def rope_frequencies(text, cfg, layer: int, owner: str = ""):
    """(inv_freq [D/2] float32 tensor, mrope_section tuple or None) of the RoPE of one decoder
    layer: `rotary_emb.inv_freq`, or, for a RoPE per layer type, `rotary_emb.<type>_inv_freq` of
    `cfg.layer_types[layer]`."""
    rotary = getattr(text, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    types = getattr(cfg, "layer_types", None)
    if inv_freq is None and types:
        inv_freq = getattr(rotary, f"{types[layer]}_inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise TypeError(f"{owner or type(text).__name__}: cannot find the rotary frequencies of text layer {layer} "
                        "(get_decoder().rotary_emb.inv_freq or .<layer type>_inv_freq)")
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if section is not None:
        section = tuple(int(x) for x in section)
    return inv_freq.detach().float(), section


def rope_positions(position_ids, sections: int):
    """The RoPE positions of a text-model forward as [S, B, t] (S = 1, or 3 for multi-section
    RoPE), from the `position_ids` the text model receives: [B, t], [3, B, t], or Qwen2-VL's
    [4, B, t] (row 0: text positions for the mask, rows 1..3: the RoPE sections). None when the
    model is left to infer them (cache index)."""
    if position_ids is None:
        return None
    if position_ids.dim() == 2:
        return position_ids[None]
    if position_ids.dim() == 3:
        if sections > 1 and position_ids.shape[0] == sections + 1:
            return position_ids[1:]
        return position_ids
    raise ValueError(f"unexpected position_ids shape {tuple(position_ids.shape)}")


# --------------------------------------------------------------------------------------------
# forward arguments and outputs (the names transformers uses)

def step_inputs(inputs: dict):
    """(input_ids, inputs_embeds, cache, padding mask, use_cache) of a forward of a model's
    generation step, from its arguments by name."""
    return (inputs.get("input_ids"), inputs.get("inputs_embeds"), inputs.get("past_key_values"),
            inputs.get("attention_mask"), inputs.get("use_cache"))


def output_cache(output):
    """The cache a forward returned (`past_key_values`), or None."""
    return getattr(output, "past_key_values", None)


def output_logits(output):
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError("kvfix.hf needs the model's output with `.logits` (return_dict=True)")
    return logits


def set_output_logits(output, logits) -> None:
    output.logits = logits


def output_row_fields(output) -> tuple:
    """The names of the per-row tuples of tensors an output may carry besides the logits."""
    return tuple(n for n in ("hidden_states", "attentions") if isinstance(getattr(output, n, None), tuple))


def has_labels(inputs: dict) -> bool:
    return inputs.get("labels") is not None


def diagnostic_inputs(inputs: dict, cache=None) -> dict:
    """The arguments of a forward re-run for its attention only (no labels, no extra outputs):
    on `cache` when given (a copied prefix), else without a cache."""
    out = {k: v for k, v in inputs.items() if k != "labels"}
    out.update(output_attentions=False, output_hidden_states=False, past_key_values=cache, use_cache=cache is not None)
    return out


@contextlib.contextmanager
def first_layers(text, n: int):
    """Run only the first `n` decoder layers of a text model inside this block: its `layers`
    list is swapped for the first `n` of the same modules and restored on exit (the text
    model's forward iterates over `self.layers`). The output's hidden states are then those of
    layer n - 1 (through the final norm)."""
    layers = text.layers
    text.layers = torch.nn.ModuleList(list(layers)[:n])
    try:
        yield
    finally:
        text.layers = layers


def text_tokens(kwargs: dict):
    """`inputs_embeds` (else `input_ids`) of a text-model forward: [rows, t, ...], or None."""
    ref = kwargs.get("inputs_embeds")
    return kwargs.get("input_ids") if ref is None else ref


def writes_cache(kwargs: dict) -> bool:
    return kwargs.get("past_key_values") is not None and kwargs.get("use_cache") is not False


def merge_image_embeddings(text, kwargs: dict, image_token_id: int):
    """For a text model that takes token ids and images (Chameleon): its arguments with
    `inputs_embeds` = the token embeddings with the images' features (`pixel_values` encoded by
    the text model's `get_image_features`, or the `pooler_output` of `mm_encoder_outputs["image"]`)
    scattered into the image placeholders, the ids and images dropped; None when the forward
    brings no images (or embeddings already)."""
    ids = kwargs.get("input_ids")
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    pixels = kwargs.get("pixel_values")
    if ids is None or kwargs.get("inputs_embeds") is not None or (encoded is None and pixels is None):
        return None
    if encoded is None:
        encoded = text.get_image_features(pixels, return_dict=True)
    embeds = text.get_input_embeddings()(ids)
    mask = (ids == image_token_id)[..., None].to(embeds.device)
    out = {k: v for k, v in kwargs.items() if k not in ("input_ids", "pixel_values", "mm_encoder_outputs")}
    out["inputs_embeds"] = embeds.masked_scatter(mask, encoded.pooler_output)
    return out


def text_inputs_doubled(kwargs: dict) -> dict:
    """The text model's arguments with every batch row given twice (rows [x; x]): tokens or
    embeddings, the attention mask (a tensor or a per-layer-type dict) and the position ids."""
    out = dict(kwargs)
    for name in ("inputs_embeds", "input_ids"):
        if out.get(name) is not None:
            out[name] = torch.cat([out[name], out[name]])
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = torch.cat([mask, mask])
    elif isinstance(mask, dict):
        out["attention_mask"] = {k: (torch.cat([m, m]) if isinstance(m, torch.Tensor) else m) for k, m in mask.items()}
    pos = out.get("position_ids")
    if pos is not None:
        out["position_ids"] = torch.cat([pos, pos], dim=0 if pos.dim() == 2 else 1)
    visual = out.get("visual_pos_masks")
    if isinstance(visual, torch.Tensor):  # deepstack (Qwen3-VL): features of the image positions, row-major
        out["visual_pos_masks"] = torch.cat([visual, visual])
        if out.get("deepstack_visual_embeds") is not None:
            out["deepstack_visual_embeds"] = [torch.cat([e, e]) for e in out["deepstack_visual_embeds"]]
    return out


def text_inputs_after(kwargs: dict, c: int, cache) -> dict:
    """The text model's arguments for its tokens from `c` on, continuing `cache` (which holds
    the first c positions): tokens, position ids and the query rows of 4-D masks cut."""
    out = dict(kwargs)
    for name in ("inputs_embeds", "input_ids"):
        if out.get(name) is not None:
            out[name] = out[name][:, c:]
    pos = out.get("position_ids")
    if pos is not None:
        out["position_ids"] = pos[..., c:]
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        out["attention_mask"] = mask[:, :, c:]
    elif isinstance(mask, dict):
        out["attention_mask"] = {k: (m[:, :, c:] if isinstance(m, torch.Tensor) and m.dim() == 4 else m)
                                 for k, m in mask.items()}
    visual = out.get("visual_pos_masks")
    if isinstance(visual, torch.Tensor):  # deepstack (Qwen3-VL): the features of the image positions kept
        keep = torch.nonzero(visual)[:, 1] >= c  # row-major, as the features are
        out["visual_pos_masks"] = visual[:, c:]
        if out.get("deepstack_visual_embeds") is not None:
            out["deepstack_visual_embeds"] = [e[keep.to(e.device)] for e in out["deepstack_visual_embeds"]]
    out["past_key_values"] = cache
    return out


def text_hidden(output):
    return output.last_hidden_state


def set_text_hidden(output, hidden) -> None:
    output.last_hidden_state = hidden


def layer_hidden(args: tuple, kwargs: dict):
    """The residual stream a decoder layer is called with (first argument or `hidden_states`)."""
    return args[0] if args else kwargs.get("hidden_states")


def with_layer_hidden(args: tuple, kwargs: dict, hidden):
    """(args, kwargs) of a decoder-layer call with the residual stream replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# --------------------------------------------------------------------------------------------
# attention function arguments

def attention_kwargs(args: tuple, kwargs: dict) -> dict:
    """The keyword arguments of an attention-function call after (module, q, k, v, mask):
    transformers passes `scaling` and `dropout` by keyword; the positional form is accepted too."""
    if not args:
        return kwargs
    return {**kwargs, **dict(zip(("scaling", "dropout"), args))}


def attention_scale(module, kwargs: dict, head_dim: int) -> float:
    """The softmax scale of an attention call: `scaling` given to the attention function, else
    the module's `scaling`, else 1 / sqrt(head_dim)."""
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def mask_minus_inf(mask: torch.Tensor) -> torch.Tensor:
    """An additive float mask with transformers' "no attention" value (finfo.min) made -inf."""
    return mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))


def mask_keep(mask: torch.Tensor) -> torch.Tensor:
    """A bool "attend" mask from a bool or additive float attention mask."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


# --------------------------------------------------------------------------------------------
# cache

def cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def layer_kv(cache, layer_idx: int, needed_len: int):
    """(keys, values) of one layer, [B, H, T, D], where cache position p is input position p.

    Raises TypeError for cache types whose tensors are not plain per-position storage
    (quantized caches) and ValueError when the layer does not hold `needed_len` positions
    (sliding-window layers past their window).
    """
    if not isinstance(cache, Cache) or not hasattr(cache, "layers"):
        raise TypeError(f"unsupported cache type {type(cache).__name__}: kvfix.hf needs a transformers Cache "
                        "(DynamicCache or StaticCache)")
    if layer_idx >= len(cache.layers):
        raise ValueError(f"the cache has {len(cache.layers)} layers, layer {layer_idx} was requested")
    layer = cache.layers[layer_idx]
    if (_QuantizedLayer and isinstance(layer, _QuantizedLayer)) or not isinstance(layer, (DynamicLayer, StaticLayer)):
        raise TypeError(f"cache layer {layer_idx} is a {type(layer).__name__}; kvfix.hf supports dynamic and "
                        "static (non-quantized) cache layers")
    keys, values = layer.keys, layer.values
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) or keys.dim() != 4:
        raise ValueError(f"cache layer {layer_idx} holds no [B, H, T, D] tensors")
    if keys.shape[-2] < needed_len:
        raise ValueError(f"cache layer {layer_idx} holds {keys.shape[-2]} positions but {needed_len} are needed "
                         "(a sliding-window layer past its window cannot be refined)")
    return keys, values


def prefix_cache(cache, num_layers: int, length: int):
    """A new DynamicCache holding copies of the first `length` positions of layers [0, num_layers)
    of `cache`: a forward that must not write into `cache` (a diagnostic pass over the first
    layers of a continued prompt) runs on it."""
    data = []
    for i in range(num_layers):
        k, v = layer_kv(cache, i, length)
        data.append((k[:, :, :length], v[:, :, :length]))
    return DynamicCache(ddp_cache_data=data)


def fork_cache(model, cache, length: int):
    """A new DynamicCache for `model` holding copies of the first `length` positions of every
    layer of `cache` (dynamic layers only)."""
    fork = DynamicCache(config=model.config)
    for i in range(len(cache.layers)):
        keys, values = layer_kv(cache, i, length)
        if not isinstance(cache.layers[i], DynamicLayer) or keys.shape[-2] != cache_length(cache):
            raise ValueError(f"cache layer {i} is not a plain dynamic layer: cannot fork it")
        fork.update(keys[:, :, :length], values[:, :, :length], i)  # update concatenates: a copy
    return fork


def stack_cache_rows(cache, other) -> None:
    """Append the batch rows of `other` to `cache`, layer by layer (same positions)."""
    for i, (a, b) in enumerate(zip(cache.layers, other.layers)):
        if a.keys.shape[-2] != b.keys.shape[-2]:
            raise ValueError(f"cache layer {i}: {a.keys.shape[-2]} and {b.keys.shape[-2]} positions differ")
        a.keys = torch.cat([a.keys, b.keys])
        a.values = torch.cat([a.values, b.values])


# --------------------------------------------------------------------------------------------
# attention interface

def text_attn_implementation(model) -> str:
    return text_config(model)._attn_implementation or "eager"


def set_text_attn_implementation(model, name: str) -> None:
    """Switch the text model only; the vision tower keeps its implementation. A model whose
    config is its text config (Chameleon: its VQ-VAE does not use the attention interface) is
    switched whole."""
    if text_config(model) is model.config:
        model.set_attn_implementation(name)
    else:
        model.set_attn_implementation({"text_config": name})


def register_attention(name: str, fn, base: str) -> None:
    """Register `fn` as attention `name`, with the mask function of `base` (without a mask
    function the model would hand `attention_mask=None` to `fn`, padding lost)."""
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"no attention mask function for base implementation {base!r}")
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def base_attention(base: str):
    """The attention function a kvfix method wraps: the registered one, or a generic eager one."""
    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    if base == "eager":
        return eager_attention
    raise ValueError(f"unknown attention implementation {base!r}")


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention with the transformers attention-function contract.

    query [B, Hq, Tq, D], key/value [B, Hkv, T, D] (GQA not expanded), attention_mask additive
    float or boolean (True = attend), broadcastable to [B, 1, Tq, T]. Returns
    (out [B, Tq, Hq, D], weights [B, Hq, Tq, T]).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights
