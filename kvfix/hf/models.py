"""Model families: where the image tokens are and which patch grid each image has.

An adapter answers three questions for one forward pass of a supported model:
- does this forward carry images (pixel values or pre-encoded image features)?
- which token id marks an image placeholder?
- what is the layout of each image, in the order the model consumes them (row-major over
  (batch item, position))? A layout is `(gh, gw, prefix)`: a `gh x gw` patch grid, row-major,
  after `prefix` non-patch tokens inside the placeholder run (LLaVA's CLS with the "full"
  feature strategy).
"""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from . import _compat

__all__ = ["ImageSpan", "Layout", "adapter_for"]


@dataclass(frozen=True)
class Layout:
    gh: int
    gw: int
    prefix: int = 0

    @property
    def tokens(self) -> int:
        return self.prefix + self.gh * self.gw


@dataclass
class ImageSpan:
    """One image of one batch item, as it sits in the KV cache.

    `start` is the cache position of the first patch token, `length = gh * gw` patch tokens
    follow in row-major order. `index` numbers the images of a generation session in the order
    the model consumes them (batch item first, then position). `depth_map` is what the user
    supplied for this image (a tensor, "uniform"), or None.
    """
    index: int
    batch: int
    start: int
    gh: int
    gw: int
    prefix: int = 0
    depth_map: Any = None

    @property
    def length(self) -> int:
        return self.gh * self.gw

    @property
    def end(self) -> int:
        return self.start + self.length


def _grid_list(grid_thw, merge: int, where: str) -> list[Layout]:
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{where}: image_grid_thw must be a [num_images, 3] tensor, got "
                         f"{type(grid_thw).__name__} {tuple(getattr(grid_thw, 'shape', ()))}")
    out = []
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"{where}: image {i} has {t} temporal patches; DSCR-style grids need t == 1")
        if h % merge or w % merge or h <= 0 or w <= 0:
            raise ValueError(f"{where}: image {i} grid {h}x{w} is not a positive multiple of the merge size {merge}")
        out.append(Layout(h // merge, w // merge))
    return out


class _Adapter:
    family = ""

    def __init__(self, model):
        self.model = model
        self.image_token_id = int(model.config.image_token_id)

    def carries_images(self, inputs: dict) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values") is not None or mm.get("image") is not None

    def hooks(self, handle) -> list:
        return []

    def layouts(self, inputs: dict, n_tokens: int, explicit) -> list[Layout]:
        raise NotImplementedError


class LlavaAdapter(_Adapter):
    """LLaVA: one fixed square grid, image_size // patch_size per side (vision config)."""
    family = "llava"

    def __init__(self, model):
        super().__init__(model)
        vc = model.config.vision_config
        size, patch = vc.image_size, vc.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        self.grid = size // patch

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL models; LLaVA's grid comes from its vision config")
        strategy = inputs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        # CLIP-style towers emit CLS + grid^2 tokens; "default" drops the CLS, "full" keeps it first
        layout = Layout(self.grid, self.grid, 0 if strategy == "default" else 1)
        if n_tokens % layout.tokens:
            raise ValueError(f"LLaVA: {n_tokens} image tokens are not a multiple of {layout.tokens} tokens per image "
                             f"(grid {self.grid}x{self.grid}, strategy {strategy!r}); an image cut across forward "
                             "passes (prefill_chunk_size) is not supported")
        return [layout] * (n_tokens // layout.tokens)


class QwenVLAdapter(_Adapter):
    """Qwen2-VL / Qwen2.5-VL: one grid per image, (h // merge) x (w // merge) from image_grid_thw.

    `generate` pops `image_grid_thw` before calling `forward` and passes the vision tower's output
    as `mm_encoder_outputs["image"]`; a forward hook on the vision tower remembers which grid
    produced which output object (weakly), so the grid is recovered without touching the model.
    """
    family = "qwen2_vl"

    def __init__(self, model):
        super().__init__(model)
        self.merge = int(model.config.vision_config.spatial_merge_size)
        self._encoded = deque(maxlen=16)  # (weakref to the vision tower's output, grid_thw)

    def hooks(self, handle):
        def remember(module, args, kwargs, output):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if isinstance(grid, torch.Tensor):
                try:
                    self._encoded.append((weakref.ref(output), grid.detach().clone()))
                except TypeError:  # output not weak-referenceable: nothing to remember
                    pass
        return [_compat.vision_encoder(self.model).register_forward_hook(remember, with_kwargs=True)]

    def _lookup(self, obj):
        for ref, grid in reversed(self._encoded):
            if ref() is obj:
                return grid
        return None

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            return explicit
        grid = inputs.get("image_grid_thw")
        where = "image_grid_thw"
        if grid is None:
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
            grid = self._lookup(encoded) if encoded is not None else None
            where = "image features"
        if grid is None:
            raise ValueError("Qwen2-VL: cannot tell the image grids of this forward (pre-encoded image features "
                             "from elsewhere, or chunked prefill); pass them explicitly: "
                             "handle.images(..., image_grid_thw=inputs['image_grid_thw'])")
        return _grid_list(grid, self.merge, where)


def adapter_for(model) -> _Adapter:
    classes = _compat.model_classes()
    if isinstance(model, classes.get("llava", ())):
        return LlavaAdapter(model)
    if isinstance(model, classes.get("qwen2_vl", ())):
        return QwenVLAdapter(model)
    supported = ", ".join(c.__name__ for cs in classes.values() for c in cs)
    raise TypeError(f"kvfix.hf supports {supported}; got {type(model).__name__}")
