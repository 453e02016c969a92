"""Model adapters: everything kvfix.hf knows about a model family, in one place.

An adapter is looked up by `model.config.model_type` in a registry (`register_adapter`), never by
the model's class; the methods (DSCR, KVSmooth, SCR, CMAC) and the dispatcher only ask the
adapter. For one forward pass of the model it answers:

- where the text model is and how to reach its decoder layers and their attention modules
  (`text_model`, `decoder_layers`, `attention_modules`), and which module's forward is one
  generation step (`step_module`: the model itself, or its language model when the model's own
  `generate` hands the prompt to it);
- whether the forward carries images (`carries_images`), which token id marks an image
  placeholder (`image_token_id`), and the layout of each image in the order the model consumes
  them (row-major over (batch item, position)): a `Layout` is the image's number of placeholder
  tokens and its patch grids (`Grid`: offset inside the placeholder run, `gh x gw` tokens
  row-major, and the region of the image it covers, where DSCR takes its depth from). An image
  may have several grids (multi-crop models) or none (query-token models: DSCR and SCR refuse
  those); placeholder tokens outside every grid (a CLS token, separators) are left alone; a
  text model that embeds its own images (Chameleon) has them merged into `inputs_embeds` first
  (`merge_text_inputs`);
- the RoPE of the text model (`rope`): `"1d"` (one position per token), `"mrope"` (multi-section
  RoPE, sections contiguous in the frequency axis: Qwen2-VL / Qwen2.5-VL) or
  `"mrope_interleaved"` (frequency f uses section f mod 3 while f < 3 * section size: Qwen3-VL),
  the frequencies in use and the sections (`rope_frequencies`), and how the text model's
  `position_ids` hold the positions (`rope_positions`: `[S, B, t]`).

docs/ADAPTERS.md shows how to add a family without touching kvfix.
"""
from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _compat

__all__ = ["Grid", "GridSpan", "ImageSpan", "Layout", "ModelAdapter", "adapter_for", "register_adapter",
           "registered_model_types"]

_ROPE_KINDS = ("1d", "mrope", "mrope_interleaved")


# --------------------------------------------------------------------------------------------
# what an adapter says about one image

@dataclass(frozen=True)
class Grid:
    """One patch grid of an image: `gh x gw` tokens in row-major order, starting `offset` tokens
    into the image's placeholder run, rows `row_stride` tokens apart (0: `gw`, the rows follow
    each other; `gw + 1` for a row-end token after every row, LLaVA-NeXT's newline, which is not
    part of the grid). `region = (top, left, bottom, right)` is the part of the image the grid
    shows, as fractions of its height and width (a tile of a multi-crop image); the whole image
    by default; None when the model's inputs do not say (DSCR then refuses a depth map)."""
    offset: int
    gh: int
    gw: int
    region: tuple = (0.0, 0.0, 1.0, 1.0)
    row_stride: int = 0

    @property
    def stride(self) -> int:
        return self.row_stride or self.gw

    @property
    def extent(self) -> int:
        """Tokens from the grid's first to its last, row-end tokens inside included."""
        return (self.gh - 1) * self.stride + self.gw


@dataclass(frozen=True)
class Layout:
    """One image as the model lays it out: `tokens` placeholder tokens, its `grids` inside them."""
    tokens: int
    grids: tuple = ()

    @classmethod
    def single(cls, gh: int, gw: int, prefix: int = 0) -> "Layout":
        """One `gh x gw` grid after `prefix` non-grid tokens (LLaVA's CLS with the "full" strategy)."""
        return cls(prefix + gh * gw, (Grid(prefix, gh, gw),))

    def check(self, where: str) -> "Layout":
        """The layout, after checking that its grids lie inside its tokens and do not overlap."""
        taken = set()
        for g in self.grids:
            if g.gh <= 0 or g.gw <= 0 or g.offset < 0 or g.offset + g.extent > self.tokens or g.stride < g.gw:
                raise ValueError(f"{where}: grid {g} does not fit an image of {self.tokens} tokens")
            cells = {g.offset + r * g.stride + c for r in range(g.gh) for c in range(g.gw)}
            if cells & taken:
                raise ValueError(f"{where}: the grids of an image overlap")
            taken |= cells
        return self


@dataclass
class GridSpan:
    """One grid of one image, as it sits in the KV cache: `gh * gw` tokens row-major, row r at
    cache positions `[start + r * stride, start + r * stride + gw)`. `image` is the ImageSpan it
    belongs to (its `index`, `batch` and `depth_map` are the image's)."""
    image: "ImageSpan"
    grid: int           # its number among the image's grids
    start: int
    gh: int
    gw: int
    region: tuple = (0.0, 0.0, 1.0, 1.0)
    stride: int = 0     # 0: gw

    def __post_init__(self):
        self.stride = self.stride or self.gw

    @property
    def index(self) -> int:
        return self.image.index

    @property
    def batch(self) -> int:
        return self.image.batch

    @property
    def depth_map(self):
        return self.image.depth_map

    @property
    def length(self) -> int:
        return self.gh * self.gw

    @property
    def end(self) -> int:
        """One past the grid's last token."""
        return self.start + (self.gh - 1) * self.stride + self.gw

    @property
    def contiguous(self) -> bool:
        return self.stride == self.gw

    def positions(self, device=None) -> torch.Tensor:
        """The grid's cache positions in row-major order, int64 [gh * gw]."""
        rows = torch.arange(self.gh, device=device)[:, None] * self.stride
        return (self.start + rows + torch.arange(self.gw, device=device)[None]).flatten()

    def cols(self, offset: int = 0, device=None):
        """Its tokens along a sequence axis that starts at cache position `offset`: a slice when
        the grid is contiguous, else the positions."""
        if self.contiguous:
            return slice(self.start - offset, self.end - offset)
        return self.positions(device) - offset


@dataclass
class ImageSpan:
    """One image of one batch item, as it sits in the KV cache.

    `[start, end)` are the cache positions of its tokens (from the first grid's first token to
    the end of its placeholder run; the whole run when the image has no grid). `grids` lists its
    patch grids (`GridSpan`), `index` numbers the images of a generation session in the order
    the model consumes them (batch item first, then position). `depth_map` is what the user
    supplied for this image (a tensor, "uniform"), or None. For an image with one grid, `gh`
    and `gw` are that grid's.
    """
    index: int
    batch: int
    start: int
    end: int
    prefix: int = 0
    depth_map: Any = None
    grids: tuple = field(default=(), repr=False)

    @property
    def length(self) -> int:
        return self.end - self.start

    def _single(self) -> GridSpan:
        if len(self.grids) != 1:
            raise ValueError(f"image {self.index} has {len(self.grids)} grids; use .grids")
        return self.grids[0]

    @property
    def gh(self) -> int:
        return self._single().gh

    @property
    def gw(self) -> int:
        return self._single().gw


def place(layout: Layout, index: int, batch: int, run_start: int) -> ImageSpan:
    """The ImageSpan of an image whose placeholder run starts at cache position `run_start`."""
    first = min((g.offset for g in layout.grids), default=0)
    img = ImageSpan(index=index, batch=batch, start=run_start + first, end=run_start + layout.tokens, prefix=first)
    img.grids = tuple(GridSpan(img, i, run_start + g.offset, g.gh, g.gw, g.region, g.stride)
                      for i, g in enumerate(layout.grids))
    return img


# --------------------------------------------------------------------------------------------
# the adapter interface

class ModelAdapter:
    """What kvfix.hf knows about one model family. Subclass it, override what differs, and
    register it for the family's `config.model_type` values with `register_adapter`.

    Class attributes: `family` (a short name, in messages and KVSmooth's preset choice),
    `kvsmooth_preset` (the paper's lam_ref preset KVSmooth uses by default), `rope` (`"1d"`,
    `"mrope"` or `"mrope_interleaved"`), `grid_support` (False: the images have no patch grid;
    DSCR and SCR refuse the model with `grid_refusal` as the reason).
    """

    family = ""
    kvsmooth_preset = "llava-1.5"
    rope = "1d"
    grid_support = True
    grid_refusal = ""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # ---- structure -------------------------------------------------------------------------

    def step_module(self):
        """The module whose forward is one generation step (prefill or decode) and returns the
        logits; kvfix's session hooks sit on it."""
        return self.model

    def text_model(self):
        """The text decoder (a module with `.layers`; a hook on it sees `inputs_embeds`, the
        attention mask and the RoPE position ids of every forward)."""
        return _compat.text_model(self.model)

    def text_config(self):
        return _compat.text_config(self.model)

    def num_layers(self) -> int:
        return int(self.text_config().num_hidden_layers)

    def decoder_layers(self):
        return _compat.decoder_layers(self.text_model(), type(self.model).__name__)

    def attention_modules(self, layer) -> list:
        """The attention modules of one decoder layer (those the attention function is called with)."""
        return _compat.attention_modules(layer)

    def vision_encoder(self):
        return _compat.vision_encoder(self.model)

    # ---- images ----------------------------------------------------------------------------

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def carries_images(self, inputs: dict) -> bool:
        """Does this forward of `step_module` bring images (pixel values or encoded features)?"""
        return _compat.forward_carries_images(inputs)

    def placeholder_ids(self, inputs: dict):
        """The token ids of a forward that carries images, image placeholders included ([B, t])."""
        return _compat.step_inputs(inputs)[0]

    def hooks(self, handle) -> list:
        """Extra hooks the adapter needs (removable handles), installed with the handle's."""
        return []

    def merge_text_inputs(self, kwargs: dict):
        """The text model's arguments with its images merged into `inputs_embeds`, for a text
        model that embeds its own images (Chameleon: token ids and images go in, so rows cannot
        be doubled or cut without them); None (the default): the text model gets embeddings."""
        return None

    def layouts(self, inputs: dict, n_tokens: int, explicit) -> list[Layout]:
        """The layouts of this forward's images in order (`n_tokens` placeholder tokens in all;
        `explicit`: layouts the user gave with `handle.images(image_grid_thw=...)`, or None)."""
        raise NotImplementedError

    def explicit_layouts(self, image_grid_thw) -> list[Layout]:
        """Layouts from a user-given `image_grid_thw` (models whose grids vary per image)."""
        raise ValueError(f"image_grid_thw applies to Qwen2-VL / Qwen2.5-VL models; {self.family}'s image layout "
                         "comes from its config")

    def tile_layouts(self, tiles) -> list[Layout]:
        """Layouts from user-given tile arrangements (`handle.images(tiles=...)`: multi-crop
        models whose forward does not say how an image's tiles are arranged)."""
        raise ValueError(f"tiles applies to InternVL models; {self.family}'s image layout does not need it")

    # ---- RoPE ------------------------------------------------------------------------------

    def rope_frequencies(self, layer: int = 0):
        """(inv_freq [D/2] float32, sections or None): the frequencies of the RoPE of text decoder
        layer `layer` (models with a RoPE per layer type, Gemma 3, differ per layer) and, for
        multi-section RoPE, the number of frequencies per section."""
        inv_freq, section = _compat.rope_frequencies(self.text_model(), self.text_config(), layer,
                                                     type(self.model).__name__)
        if self.rope == "1d":
            return inv_freq, None
        if section is None:
            raise ValueError(f"{self.family}: multi-section RoPE without mrope_section in the text config")
        if self.rope == "mrope" and sum(section) != inv_freq.numel():
            raise ValueError(f"mrope_section {section} does not cover the {inv_freq.numel()} rotary frequencies")
        return inv_freq, section

    def rope_positions(self, position_ids):
        """The RoPE positions of a text-model forward as [S, B, t] (S = 1, or the number of
        sections), from the `position_ids` the text model receives; None when the text model is
        left to infer them (from the cache length)."""
        return _compat.rope_positions(position_ids, 1 if self.rope == "1d" else 3)


# --------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type] = {}


def register_adapter(adapter_cls: type, *model_types: str, replace: bool = False) -> type:
    """Register `adapter_cls` (a ModelAdapter subclass) for these `config.model_type` values.

    `replace=True` overrides a registered adapter (kvfix's own included). Returns the class, so
    it can be used as `register_adapter(MyAdapter, "my_vlm")` or in a decorator's body.
    """
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, ModelAdapter)):
        raise TypeError(f"adapter_cls must be a ModelAdapter subclass, got {adapter_cls!r}")
    if not model_types:
        raise ValueError("register_adapter needs at least one config.model_type")
    if adapter_cls.rope not in _ROPE_KINDS:
        raise ValueError(f"{adapter_cls.__name__}.rope must be one of {_ROPE_KINDS}, got {adapter_cls.rope!r}")
    for t in model_types:
        if not isinstance(t, str) or not t:
            raise TypeError(f"model types must be non-empty strings, got {t!r}")
        if t in _REGISTRY and _REGISTRY[t] is not adapter_cls and not replace:
            raise ValueError(f"an adapter is registered for {t!r} ({_REGISTRY[t].__name__}); pass replace=True")
    for t in model_types:
        _REGISTRY[t] = adapter_cls
    return adapter_cls


def registered_model_types() -> dict[str, type]:
    return dict(_REGISTRY)


def adapter_for(model) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise TypeError(f"kvfix.hf has no adapter for config.model_type {model_type!r} ({type(model).__name__}); "
                        f"kvfix.hf supports {', '.join(sorted(_REGISTRY))}; kvfix.hf.register_adapter adds one "
                        "(docs/ADAPTERS.md)")
    return cls(model)


# --------------------------------------------------------------------------------------------
# the families

def _side(x) -> int:
    return int(x if isinstance(x, int) else x[0])


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: one fixed square grid, image_size // patch_size per side (vision config)."""
    family = "llava"

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.grid = _side(vc.image_size) // _side(vc.patch_size)

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL models; LLaVA's grid comes from its vision config")
        strategy = inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        # CLIP-style towers emit CLS + grid^2 tokens; "default" drops the CLS, "full" keeps it first
        layout = Layout.single(self.grid, self.grid, 0 if strategy == "default" else 1)
        if n_tokens % layout.tokens:
            raise ValueError(f"LLaVA: {n_tokens} image tokens are not a multiple of {layout.tokens} tokens per image "
                             f"(grid {self.grid}x{self.grid}, strategy {strategy!r}); an image cut across forward "
                             "passes (prefill_chunk_size) is not supported")
        return [layout] * (n_tokens // layout.tokens)


def grid_list(grid_thw, merge: int, where: str) -> list[Layout]:
    """Qwen-VL layouts from `image_grid_thw` ([num_images, 3]: t, h, w patches before the merge)."""
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{where}: image_grid_thw must be a [num_images, 3] tensor, got "
                         f"{type(grid_thw).__name__} {tuple(getattr(grid_thw, 'shape', ()))}")
    out = []
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"{where}: image {i} has {t} temporal patches; DSCR-style grids need t == 1")
        if h % merge or w % merge or h <= 0 or w <= 0:
            raise ValueError(f"{where}: image {i} grid {h}x{w} is not a positive multiple of the merge size {merge}")
        out.append(Layout.single(h // merge, w // merge))
    return out


class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: one grid per image, (h // merge) x (w // merge) from image_grid_thw;
    multi-section RoPE (temporal, height, width sections contiguous in the frequencies).

    `generate` pops `image_grid_thw` before calling `forward` and passes the vision tower's output
    as `mm_encoder_outputs["image"]`; a forward hook on the vision tower remembers which grid
    produced which output object (weakly), so the grid is recovered without touching the model.
    """
    family = "qwen2_vl"
    rope = "mrope"

    def __init__(self, model):
        super().__init__(model)
        self.merge = int(self.config.vision_config.spatial_merge_size)
        self._encoded = deque(maxlen=16)  # (weakref to the vision tower's output, grid_thw)

    def hooks(self, handle):
        def remember(module, args, kwargs, output):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if isinstance(grid, torch.Tensor):
                try:
                    self._encoded.append((weakref.ref(output), grid.detach().clone()))
                except TypeError:  # output not weak-referenceable: nothing to remember
                    pass
        return [self.vision_encoder().register_forward_hook(remember, with_kwargs=True)]

    def _lookup(self, obj):
        for ref, grid in reversed(self._encoded):
            if ref() is obj:
                return grid
        return None

    def explicit_layouts(self, image_grid_thw):
        return grid_list(image_grid_thw, self.merge, "image_grid_thw")

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            return explicit
        grid = inputs.get("image_grid_thw")
        where = "image_grid_thw"
        if grid is None:
            encoded = _compat.encoded_images(inputs)
            grid = self._lookup(encoded) if encoded is not None else None
            where = "image features"
        if grid is None:
            raise ValueError("Qwen2-VL: cannot tell the image grids of this forward (pre-encoded image features "
                             "from elsewhere, or chunked prefill); pass them explicitly: "
                             "handle.images(..., image_grid_thw=inputs['image_grid_thw'])")
        return grid_list(grid, self.merge, where)


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT (LLaVA-1.6): each image is its base grid (the image resized to one tile,
    `image_size // patch_size` per side), then its high-resolution grid (the anyres tiles'
    patches, unpadded to the image's aspect), a newline token after each of its rows; an image
    of one tile is its base grid and one newline. Two grids per image, refined / redistributed
    each on its own; the newline tokens belong to neither. The high-resolution grid comes from
    `image_sizes` in a forward that carries them, else (generate passes the encoded features
    only) from the encoded features: the newline rows are the model's `image_newline` vector.
    The "default" feature strategy (CLS dropped) only."""
    family = "llava_next"
    strategies = ("default",)

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.tile = _side(vc.image_size)
        self.side = self.tile // _side(vc.patch_size)
        self.newline = _compat.named_parameter(model, "image_newline")

    def _layout(self, rows: int, cols: int) -> Layout:
        base = Grid(0, self.side, self.side)
        n = self.side * self.side
        if rows == 0:
            return Layout(n + 1, (base,))
        return Layout(n + rows * (cols + 1), (base, Grid(n, rows, cols, row_stride=cols + 1)))

    def _hires(self, hw, inputs) -> tuple[int, int]:
        """The high-resolution grid (rows, cols) of an image of size `hw`."""
        return _compat.anyres_unpadded_grid(hw, self.config.image_grid_pinpoints, self.tile, self.side)

    def _from_features(self, feats) -> Layout:
        n = self.side * self.side
        if self.newline is None:
            raise ValueError("LLaVA-NeXT: the model has no image_newline parameter to read the grids from")
        hi = feats[n:]
        nl = torch.nonzero((hi == self.newline.to(hi.dtype)).all(-1)).flatten().tolist()
        if len(hi) == 1 and nl == [0]:
            return self._layout(0, 0)
        cols = (nl[0] if nl else -1)
        rows = len(nl)
        if cols <= 0 or len(hi) != rows * (cols + 1) or nl != list(range(cols, len(hi), cols + 1)):
            raise ValueError(f"LLaVA-NeXT: cannot read the high-resolution grid of an image of {len(feats)} "
                             "feature tokens from its newline rows")
        return self._layout(rows, cols)

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL / Qwen2.5-VL models; LLaVA-NeXT's grids come from "
                             "image_sizes")
        strategy = inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        if strategy not in self.strategies:
            raise ValueError(f"{self.family}: vision_feature_select_strategy {strategy!r} is not supported "
                             f"({', '.join(self.strategies)})")
        sizes = inputs.get("image_sizes")
        if sizes is not None and inputs.get("pixel_values") is not None:
            return [self._layout(*self._hires(hw, inputs)) for hw in sizes.tolist()]
        feats = _compat.encoded_features(_compat.encoded_images(inputs))
        if feats is None:
            raise ValueError("LLaVA-NeXT: cannot tell the image grids of this forward (no image_sizes with the "
                             "pixel values, no encoded features)")
        return [self._from_features(f) for f in feats]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's layout (base grid, then the high-resolution grid with a
    newline per row), the high-resolution grid pooled (bilinear) when it holds more than
    `anyres_max_N` tiles' worth of patches (`vision_aspect_ratio`); SigLIP towers (no CLS, the
    "full" strategy). Images only (video tokens are another token)."""
    family = "llava_onevision"
    strategies = ("default", "full")

    def _hires(self, hw, inputs):
        rows, cols = super()._hires(hw, inputs)
        ratio_name = inputs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        limit = int(ratio_name.strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (limit * self.side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols


class Gemma3Adapter(ModelAdapter):
    """Gemma 3: each image is `mm_tokens_per_image` tokens (between begin / end-of-image markers),
    the vision tower's patch grid average-pooled to a square grid of sqrt(mm_tokens_per_image)
    per side. The model's mask lets an image's tokens attend to each other both ways (prefill);
    the methods keep the mask the model hands to the attention (CMAC's attention included). The
    layers' RoPE differs per layer type (sliding / full attention): `rope_frequencies(layer)`."""
    family = "gemma3"

    def __init__(self, model):
        super().__init__(model)
        n = int(self.config.mm_tokens_per_image)
        self.side = math.isqrt(n)
        if self.side * self.side != n:
            raise ValueError(f"Gemma 3: mm_tokens_per_image {n} is not a square grid")

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL / Qwen2.5-VL models; Gemma 3's grid comes from "
                             "mm_tokens_per_image")
        layout = Layout.single(self.side, self.side)
        if n_tokens % layout.tokens:
            raise ValueError(f"Gemma 3: {n_tokens} image tokens are not a multiple of {layout.tokens} per image")
        return [layout] * (n_tokens // layout.tokens)


class InstructBlipAdapter(ModelAdapter):
    """InstructBLIP (decoder-only language model): each image is `num_query_tokens` Q-Former
    query outputs, with no spatial layout: DSCR and SCR refuse the model, KVSmooth and CMAC run.

    The model's `generate` embeds the prompt (image placeholders included) with the language
    model's input embeddings, writes the query outputs into the placeholders and calls its
    language model's `generate` with the embeddings only: the language model is the step module,
    and a forward hook on the input embeddings keeps the latest token ids that hold placeholders,
    which give the image positions of the next prefill of the same shape.
    """
    family = "instructblip"
    kvsmooth_preset = "instructblip"
    grid_support = False
    grid_refusal = ("InstructBLIP's image is a set of Q-Former query tokens with no patch grid "
                    "(KVSmooth and CMAC support it)")

    def __init__(self, model):
        super().__init__(model)
        if not getattr(self.config, "use_decoder_only_language_model", True):
            raise TypeError("kvfix.hf supports InstructBLIP with a decoder-only language model (Vicuna), not "
                            "an encoder-decoder one (Flan-T5)")
        self.queries = int(self.config.num_query_tokens)
        self._ids = None  # the latest embedded token ids holding image placeholders

    def step_module(self):
        return self.model.language_model

    def hooks(self, handle):
        def remember(module, args, kwargs, output):
            ids = args[0] if args else kwargs.get("input")
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and bool((ids == self.image_token_id).any()):
                self._ids = ids.detach()
        return [_compat.input_embeddings(self.model).register_forward_hook(remember, with_kwargs=True)]

    def _pending(self, inputs):
        ids = _compat.step_inputs(inputs)[0]
        if ids is not None:
            return ids
        embeds = _compat.step_inputs(inputs)[1]
        if self._ids is not None and embeds is not None and tuple(self._ids.shape) == tuple(embeds.shape[:2]):
            return self._ids
        return None

    def carries_images(self, inputs):
        ids = self._pending(inputs)
        return ids is not None and _compat.cache_length(_compat.step_inputs(inputs)[2]) == 0 and \
            bool((ids == self.image_token_id).any())

    def placeholder_ids(self, inputs):
        ids = self._pending(inputs)
        self._ids = None  # used once: a later forward of the same shape is not this prompt
        return ids

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL / Qwen2.5-VL models; InstructBLIP's images are "
                             "query tokens")
        if n_tokens % self.queries:
            raise ValueError(f"InstructBLIP: {n_tokens} image tokens are not a multiple of the {self.queries} query "
                             "tokens per image")
        return [Layout(self.queries)] * (n_tokens // self.queries)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's grids (merged, from image_grid_thw); interleaved multi-section RoPE
    (`frequency_sections`); deepstack visual features added to the hidden states of the first
    layers at the image positions (the text model's `visual_pos_masks` / `deepstack_visual_embeds`,
    carried along when CMAC changes the text model's rows)."""
    family = "qwen3_vl"
    rope = "mrope_interleaved"


class InternVLAdapter(ModelAdapter):
    """InternVL (InternVL2 / 2.5 / 3): each image is its tiles (row-major over the tile
    arrangement), then, when it has more than one tile, its thumbnail (the whole image resized to
    one tile); the image's tokens are one placeholder run (between its <img> / </img> markers),
    `side x side` tokens per tile: the vision tower's patch grid (CLS dropped), pixel-shuffled by
    `downsample_ratio` (token (r, c) merges patch rows 2r, 2r + 1 and columns 2c, 2c + 1:
    row-major, like the tile's patches). Each tile is one grid, refined (DSCR) / redistributed
    (SCR) on its own.

    The model's forward sees a tile count per image (its run of placeholder tokens), never how
    the tiles are arranged (rows x cols), so a tile's `region` is unknown (None): SCR, KVSmooth
    and CMAC do not need it, DSCR with a depth map does, from `handle.images(tiles=[(rows,
    cols), ...])`, one per image (the processor's choice: docs/ADAPTERS.md). A one-tile image
    and the thumbnail show the whole image. Each placeholder run is one image."""
    family = "internvl"

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        ratio = float(self.config.downsample_ratio)
        patches = _side(vc.image_size) // _side(vc.patch_size)
        self.side = int(patches * ratio)
        if self.side <= 0 or self.side != patches * ratio:
            raise ValueError(f"InternVL: a {patches} x {patches} patch grid does not pixel-shuffle by {ratio}")
        self.tile = self.side * self.side

    def _layout(self, n_tiles: int, arrangement=None) -> Layout:
        grids = []
        for t in range(n_tiles):
            if n_tiles == 1 or t == n_tiles - 1:  # the one tile, or the thumbnail: the whole image
                region = (0.0, 0.0, 1.0, 1.0)
            elif arrangement is None:
                region = None
            else:
                rows, cols = arrangement
                r, c = divmod(t, cols)
                region = (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols)
            grids.append(Grid(t * self.tile, self.side, self.side, region))
        return Layout(n_tiles * self.tile, tuple(grids))

    def tile_layouts(self, tiles) -> list[Layout]:
        out = []
        for i, t in enumerate(tiles):
            if not (isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, int) and x > 0 for x in t)):
                raise ValueError(f"tiles[{i}] must be (rows, cols) of positive ints, got {t!r}")
            n = t[0] * t[1]
            out.append(self._layout(n + 1 if n > 1 else 1, tuple(t)))
        return out

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            return explicit
        strategy = inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"InternVL: vision_feature_select_strategy {strategy!r} is not supported (\"default\")")
        ids = self.placeholder_ids(inputs)
        out = []
        for row in (ids == self.image_token_id).cpu():
            pos = torch.nonzero(row).flatten()
            if not len(pos):
                continue
            starts = torch.cat([pos[:1], pos[1:][pos[1:] != pos[:-1] + 1]])
            ends = torch.cat([pos[:-1][pos[1:] != pos[:-1] + 1], pos[-1:]]) + 1
            for n in (ends - starts).tolist():
                if n % self.tile:
                    raise ValueError(f"InternVL: an image of {n} placeholder tokens is not a whole number of tiles "
                                     f"({self.tile} tokens each); an image cut across forward passes is not supported")
                out.append(self._layout(n // self.tile))
        return out


class ChameleonAdapter(ModelAdapter):
    """Chameleon: each image is the VQ-VAE's `side x side` code grid (row-major), embedded as
    tokens (`resolution / 2^(levels - 1)` per side: 32 x 32 for the released models), its
    placeholders between begin / end-of-image markers. The text model itself encodes the images
    and writes their embeddings into the placeholders: `merge_text_inputs` does that merge first
    (the model's own steps: the token embeddings, the images' code embeddings scattered into the
    placeholders), so the methods see `inputs_embeds` as for the other families."""
    family = "chameleon"

    def __init__(self, model):
        super().__init__(model)
        vq = self.config.vq_config
        self.side = int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)

    def layouts(self, inputs, n_tokens, explicit):
        if explicit is not None:
            raise ValueError("image_grid_thw applies to Qwen2-VL / Qwen2.5-VL models; Chameleon's grid comes from "
                             "its VQ-VAE config")
        layout = Layout.single(self.side, self.side)
        if n_tokens % layout.tokens:
            raise ValueError(f"Chameleon: {n_tokens} image tokens are not a multiple of {layout.tokens} per image")
        return [layout] * (n_tokens // layout.tokens)

    def merge_text_inputs(self, kwargs):
        return _compat.merge_image_embeddings(self.text_model(), kwargs, self.image_token_id)


def frequency_sections(rope: str, section, n: int) -> torch.Tensor:
    """The RoPE section (0: temporal, 1: height, 2: width) of each of the `n` rotary frequencies,
    int64 [n]: contiguous blocks of `section[i]` for "mrope"; for "mrope_interleaved" (Qwen3-VL)
    frequency f is height when f % 3 == 1 and f < 3 * section[1], width when f % 3 == 2 and
    f < 3 * section[2], else temporal."""
    if rope == "mrope":
        return torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
    f = torch.arange(n)
    out = torch.zeros(n, dtype=torch.int64)
    for dim in (1, 2):
        out[(f % 3 == dim) & (f < 3 * section[dim])] = dim
    return out


register_adapter(LlavaAdapter, "llava")
register_adapter(QwenVLAdapter, "qwen2_vl", "qwen2_5_vl")
register_adapter(InstructBlipAdapter, "instructblip")
register_adapter(Gemma3Adapter, "gemma3")
register_adapter(LlavaNextAdapter, "llava_next")
register_adapter(LlavaOnevisionAdapter, "llava_onevision")
register_adapter(Qwen3VLAdapter, "qwen3_vl")
register_adapter(InternVLAdapter, "internvl")
register_adapter(ChameleonAdapter, "chameleon")
