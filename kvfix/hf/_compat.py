"""Every point where kvfix.hf touches transformers, in one file.

Keep this surface small: when a transformers release moves something, this is the only file
that should need a change. What we rely on, and why:

Public API
- `PreTrainedModel.get_decoder()` -> the text model, whose `.layers` are the decoder layers;
  `get_encoder(modality="image")` -> the vision tower (forward hooks only, never modified).
- `PretrainedConfig.get_text_config(decoder=True)`: layer count, attention implementation.
- `AttentionInterface` / `AttentionMaskInterface` (`register`), `ALL_ATTENTION_FUNCTIONS`,
  `ALL_MASK_ATTENTION_FUNCTIONS`, and `model.set_attn_implementation({"text_config": name})`,
  so that only the text model goes through the kvfix attention function.
- `Cache.get_seq_length()` and `Cache.layers[i].keys / .values` (`[B, H, T, D]` tensors of the
  dynamic and static cache layers; transformers >= 4.56 exposes them on each layer).
- `DynamicCache(ddp_cache_data=[(keys, values), ...])`: a cache prefilled per layer (SCR's
  diagnostic pass over a continued prompt runs on such a copy);
  `DynamicCache(config=...)` + `update` to fork a prefix, and assigning a dynamic layer's
  `.keys / .values` to append batch rows (CMAC's prefill).

- The text model's rotary embedding buffer `get_decoder().rotary_emb.inv_freq` ([D/2], the
  frequencies in use, scaling variants included) and `rope_parameters["mrope_section"]` of the
  text config (multi-section RoPE of Qwen2-VL / Qwen2.5-VL, rotate_half layout), for CMAC.

Behaviour we depend on (documented, but not a formal API)
- Attention modules call `past_key_values.update(k, v, layer_idx)` and then the attention
  function with the full cached K/V; cache position `p` holds input position `p` for dynamic
  and static (non-sliding) layers, left padding included.
- Vision-language models mark image placeholders with `config.image_token_id` in `input_ids`.
- `generate` encodes images before the prefill and hands the encoder output to `forward` as
  `mm_encoder_outputs["image"]` (transformers >= 5); for Qwen2-VL that object is the vision
  tower's own output, which is how we recover `image_grid_thw` (popped by `generate`).
"""
from __future__ import annotations

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


def num_text_layers(model) -> int:
    return int(text_config(model).num_hidden_layers)


def decoder_layers(model):
    """The text decoder's layers (an nn.ModuleList)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: cannot find the text decoder layers (get_decoder().layers)")
    return layers


def vision_encoder(model):
    return model.get_encoder(modality="image")


def model_classes():
    """The model classes kvfix.hf supports, by family (missing classes are left out)."""
    out = {}
    for family, names in (("llava", ("LlavaForConditionalGeneration",)),
                          ("qwen2_vl", ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"))):
        classes = tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))
        if classes:
            out[family] = classes
    return out


def text_model(model):
    """The text decoder module (a forward hook there sees inputs_embeds, the 2-D padding mask and
    the RoPE position ids of every forward)."""
    return model.get_decoder()


def rope_frequencies(model):
    """(inv_freq [D/2] float32 tensor, mrope_section tuple or None) of the text model's RoPE."""
    rotary = getattr(text_model(model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise TypeError(f"{type(model).__name__}: cannot find the text model's rotary frequencies "
                        "(get_decoder().rotary_emb.inv_freq)")
    cfg = text_config(model)
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if section is not None:
        section = tuple(int(x) for x in section)
        if sum(section) != inv_freq.numel():
            raise ValueError(f"mrope_section {section} does not cover the {inv_freq.numel()} rotary frequencies")
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


def position_batch_dim(position_ids) -> int:
    """The batch dimension of the text model's `position_ids` ([B, t] or [S, B, t])."""
    return 0 if position_ids.dim() == 2 else 1


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
    """Switch the text model only; the vision tower keeps its implementation."""
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
