"""Depth maps for DSCR from transformers' depth-estimation models (METHODS §1 helpers).

`DepthEstimator` wraps any `AutoModelForDepthEstimation` model (Depth-Anything / -V2, DPT /
MiDaS, ...) and its image processor: give it images, get one float32 depth map per image at
the image's own resolution, ready for `kvfix.patch_depth`:

    est = DepthEstimator()                         # depth-anything/Depth-Anything-V2-Small-hf
    dmap = est(pil_image)[0]                       # [H, W] float32
    depth = kvfix.patch_depth(dmap, gh, gw)        # [gh * gw] in [0, 255]

Convention (read this before feeding the maps anywhere else):
- kvfix returns what the model predicts, only resized: its `predicted_depth`, upsampled to the
  input resolution (bicubic, as transformers' own `post_process_depth_estimation` does; bicubic
  can overshoot a little past the model's range at sharp edges, e.g. below 0).
- Depth-Anything (relative checkpoints, the default) and DPT / MiDaS predict *relative inverse
  depth* (disparity, up to an unknown scale and shift): larger = closer. Metric models
  (Depth-Anything "metric" checkpoints, ZoeDepth, GLPN, DepthPro, Prompt-Depth-Anything)
  predict depth in metres: larger = farther. `DepthEstimator.larger_is_closer` says which
  (None when the model type is not one of these).
- `invert=True` flips the orientation per image (`max(x) - x`): a linear flip, not a
  reciprocal. A reciprocal is not offered because relative disparity has an unknown shift and
  is ~0 on the sky, where 1/x blows up.
- `kvfix.patch_depth` then area-pools, min-max normalises per image and scales to [0, 255]
  (`scale=`; METHODS §1 units). The linear flip turns its output into exactly `255 - d`, and
  DSCR's proximity uses only `(d_i - d_j)^2`,
  so DSCR's result does not depend on `invert`; it does depend on using disparity rather than
  metric depth (or vice versa), which is a property of the model you choose.

Alignment: a map covers exactly the image it was given. Give the estimator the image the VLM's
vision tower sees (e.g. after the LLaVA processor's resize and centre crop), or crop the map the
same way, before pooling it to the patch grid.

transformers is imported only when an estimator is built, so `import kvfix` works without it.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DepthEstimator", "DEFAULT_DEPTH_MODEL", "default_processor", "estimate_depth"]

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"

# Model types whose `predicted_depth` is relative inverse depth (disparity: larger = closer)
# unless their config says "metric", and model types that predict metric depth.
_DISPARITY_TYPES = ("depth_anything", "dpt")
_METRIC_TYPES = ("prompt_depth_anything", "zoedepth", "glpn", "depth_pro")

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("kvfix.depth.DepthEstimator needs transformers: pip install 'kvfix[hf]' "
                          "(or pip install transformers)") from e
    return transformers


def _larger_is_closer(config) -> bool | None:
    """Orientation of a depth model's raw output, from its config (None: unknown)."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "depth_estimation_type", None) == "metric" or model_type in _METRIC_TYPES:
        return False
    if model_type in _DISPARITY_TYPES:
        return True
    return None


def default_processor(config):
    """An image processor for a Depth-Anything or DPT model, built from its config (no download).

    Used when a model object comes without a processor and none can be loaded from where the
    model came from (e.g. a randomly initialised model). The settings are those of the published
    checkpoints of each family: Depth-Anything(-V2): the backbone's image size (518) as target,
    aspect ratio kept, sides a multiple of the patch size (14), bicubic, ImageNet mean/std.
    DPT: a square `config.image_size` (384; DPT's neck needs a square patch grid), bicubic,
    mean = std = 0.5. Other model types: ValueError (pass a processor).
    """
    transformers = _require_transformers()
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model_type = getattr(config, "model_type", None)

    def _int(x, default):
        if isinstance(x, (list, tuple)):
            x = x[0]
        return int(x) if x else default

    if model_type in ("depth_anything", "prompt_depth_anything"):
        size = _int(getattr(getattr(config, "backbone_config", None), "image_size", None), 518)
        multiple = _int(getattr(config, "patch_size", None), 14)
        keep_aspect, mean, std = True, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    elif model_type == "dpt":
        size = _int(getattr(config, "image_size", None), 384)
        multiple, keep_aspect, mean, std = 1, False, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:
        raise ValueError(f"processor: cannot build a default image processor for model type "
                         f"{model_type!r}; pass processor= (e.g. AutoImageProcessor.from_pretrained(...))")
    # The torchvision backend is transformers' default; without torchvision use the PIL one.
    cls = None
    if importlib.util.find_spec("torchvision") is None:
        cls = getattr(transformers, "DPTImageProcessorPil", None)
    cls = cls or transformers.DPTImageProcessor
    return cls(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=keep_aspect,
               ensure_multiple_of=multiple, resample=3, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=mean, image_std=std, do_pad=False)


def _is_pil(x) -> bool:
    mod = type(x).__module__ or ""
    if not mod.startswith("PIL."):
        return False
    from PIL import Image
    return isinstance(x, Image.Image)


def _as_hwc(img, name: str):
    """One image -> (HxWx3 numpy array, is_float_in_0_1, (H, W))."""
    if _is_pil(img):
        arr = np.asarray(img.convert("RGB"))
        return arr, False, arr.shape[:2]
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"{name} must be an HxWx3 array, got shape {img.shape}")
        if img.dtype == np.uint8:
            arr, is_float = img, False
        elif np.issubdtype(img.dtype, np.floating):
            arr, is_float = img.astype(np.float32), True
        else:
            raise TypeError(f"{name} must be uint8 (0..255) or float (0..1), got dtype {img.dtype}")
    elif isinstance(img, torch.Tensor):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"{name} must be a [3, H, W] tensor, got shape {tuple(img.shape)}")
        t = img.detach().to("cpu")
        if t.dtype == torch.uint8:
            arr, is_float = t.permute(1, 2, 0).numpy(), False
        elif t.is_floating_point():
            arr, is_float = t.to(torch.float32).permute(1, 2, 0).numpy(), True
        else:
            raise TypeError(f"{name} must be a float (0..1) or uint8 tensor, got {t.dtype}")
    else:
        raise TypeError(f"{name} must be a PIL image, an HxWx3 numpy array or a [3, H, W] tensor, "
                        f"got {type(img).__name__}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (size {arr.shape[0]}x{arr.shape[1]})")
    if is_float:
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has non-finite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return np.ascontiguousarray(arr), is_float, arr.shape[:2]


class DepthEstimator:
    """Per-image depth maps from a transformers depth-estimation model.

    Args:
        model: a model name on the Hugging Face Hub (default
            "depth-anything/Depth-Anything-V2-Small-hf"), a local directory written by
            `save_pretrained`, or a model object (e.g. `DepthAnythingForDepthEstimation`) whose
            output has `predicted_depth` [B, h, w].
        processor: the image processor, or a name/path to load one from. Default: loaded from
            the same name/path as the model; for a model object, loaded from
            `model.config._name_or_path` when that is set, else built from the model's config
            (`default_processor`: Depth-Anything and DPT families).
        device: where the model runs. Default: "cuda" when available for a model loaded by
            name or path; a model object stays where it is. The maps are returned there.
        dtype: the model's dtype (e.g. torch.float16 on a GPU). Default: as loaded / as given.
            The returned maps are float32 whatever this is. A model object given with a
            device or dtype is moved / cast in place (`nn.Module.to`) and set to eval mode.
        invert: flip the orientation of every returned map (`max(x) - x` per image). See the
            module docstring: DSCR's output does not depend on it.
        batch_size: images per forward pass (images whose processed sizes match are batched).
        interpolation: how `predicted_depth` is resized to the input resolution: "bicubic"
            (default, as transformers' post-processing), "bilinear", "nearest" or "area".
        model_kwargs, processor_kwargs: extra keyword arguments for `from_pretrained`
            (e.g. `revision`, `local_files_only`, `cache_dir`).

    Calling it on one image or a sequence of images -- PIL images, HxWx3 numpy arrays (uint8
    0..255, or float 0..1), [3, H, W] tensors (float 0..1, or uint8), or a [B, 3, H, W]
    tensor -- returns a list with one float32 [H, W] tensor per image.

    `larger_is_closer`: True when the model's raw output is disparity (Depth-Anything relative,
    DPT/MiDaS), False for metric depth, None when unknown. The returned maps have that
    orientation, or the opposite one with `invert=True`.
    """

    def __init__(self, model: Any = DEFAULT_DEPTH_MODEL, processor: Any = None, *, device=None,
                 dtype: torch.dtype | None = None, invert: bool = False, batch_size: int = 8,
                 interpolation: str = "bicubic", model_kwargs: dict | None = None,
                 processor_kwargs: dict | None = None):
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if not isinstance(invert, bool):
            raise TypeError(f"invert must be a bool, got {type(invert).__name__}")
        model_kwargs = dict(model_kwargs or {})
        processor_kwargs = dict(processor_kwargs or {})

        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            _require_transformers()
            from transformers import AutoModelForDepthEstimation
            source = model.decode() if isinstance(model, bytes) else str(model)
            if dtype is not None:
                model_kwargs.setdefault("dtype", dtype)
            model = AutoModelForDepthEstimation.from_pretrained(source, **model_kwargs)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if processor is None:
                processor = source
        elif isinstance(model, torch.nn.Module):
            if model_kwargs:
                raise ValueError("model_kwargs apply to loading by name or path, not to a model object")
            if processor is None:
                processor = self._processor_for(model, processor_kwargs)
        else:
            raise TypeError(f"model must be a model name, a local path or a torch.nn.Module, "
                            f"got {type(model).__name__}")

        if isinstance(processor, (str, bytes)) or hasattr(processor, "__fspath__"):
            _require_transformers()
            from transformers import AutoImageProcessor
            processor = AutoImageProcessor.from_pretrained(
                processor.decode() if isinstance(processor, bytes) else str(processor), **processor_kwargs)
        if not callable(processor):
            raise TypeError(f"processor must be an image processor (callable), got {type(processor).__name__}")

        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.processor = processor
        self.invert = invert
        self.batch_size = batch_size
        self.interpolation = interpolation
        self.larger_is_closer = _larger_is_closer(getattr(model, "config", None))

    @staticmethod
    def _processor_for(model, processor_kwargs):
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("processor: the model has no config to build one from; pass processor=")
        source = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if source:
            _require_transformers()
            from transformers import AutoImageProcessor
            try:
                return AutoImageProcessor.from_pretrained(source, **processor_kwargs)
            except (OSError, ValueError) as e:  # nothing saved there: the family's settings
                warnings.warn(f"no image processor could be loaded from {source!r} ({e}); using "
                              f"kvfix.depth.default_processor(model.config) instead", stacklevel=3)
        return default_processor(config)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def __repr__(self):
        name = getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__
        return (f"DepthEstimator({name!r}, device={self.device}, dtype={self.dtype}, "
                f"invert={self.invert}, larger_is_closer={self.larger_is_closer})")

    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return list(images.unbind(0))
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("images is empty")
            return list(images)
        return [images]

    def _preprocess(self, arr: np.ndarray, is_float: bool, name: str) -> torch.Tensor:
        kwargs = {"return_tensors": "pt", "input_data_format": "channels_last"}
        if is_float:
            kwargs["do_rescale"] = False  # already in [0, 1]
        out = self.processor(images=arr, **kwargs)
        pv = out["pixel_values"] if isinstance(out, dict) or hasattr(out, "keys") else out
        if not isinstance(pv, torch.Tensor):
            pv = torch.as_tensor(np.asarray(pv))
        if pv.dim() == 3:
            pv = pv.unsqueeze(0)
        if pv.dim() != 4 or pv.shape[0] != 1:
            raise ValueError(f"{name}: the processor returned pixel_values of shape {tuple(pv.shape)}, "
                             f"expected [1, C, h, w]")
        return pv

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype))
        pred = out["predicted_depth"] if isinstance(out, dict) else getattr(out, "predicted_depth", None)
        if pred is None:
            raise TypeError(f"model: its output ({type(out).__name__}) has no predicted_depth")
        if pred.dim() == 4 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.dim() != 3 or pred.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"model: predicted_depth has shape {tuple(pred.shape)}, expected [B, h, w] "
                             f"with B={pixel_values.shape[0]}")
        return pred

    def _resize(self, pred: torch.Tensor, size) -> torch.Tensor:
        x = pred.to(torch.float32)[None, None]
        if tuple(x.shape[-2:]) != tuple(size):
            align = False if self.interpolation in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=tuple(int(s) for s in size), mode=self.interpolation, align_corners=align)
        return x[0, 0].contiguous()

    @torch.inference_mode()
    def __call__(self, images, *, invert: bool | None = None) -> list[torch.Tensor]:
        """Depth maps for one image or a sequence of images: a list of float32 [H, W] tensors.

        `invert` overrides the estimator's setting for this call.
        """
        invert = self.invert if invert is None else invert
        items = self._as_list(images)
        many = len(items) > 1 or isinstance(images, (list, tuple)) or (
            isinstance(images, torch.Tensor) and images.dim() == 4)
        sizes, groups = [], {}
        for i, img in enumerate(items):
            name = f"images[{i}]" if many else "images"
            arr, is_float, hw = _as_hwc(img, name)
            pv = self._preprocess(arr, is_float, name)
            sizes.append(hw)
            groups.setdefault(tuple(pv.shape[1:]), []).append((i, pv))
        results: list[torch.Tensor | None] = [None] * len(items)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                pred = self._forward(torch.cat([pv for _, pv in chunk], dim=0))
                for (i, _), p in zip(chunk, pred):
                    m = self._resize(p, sizes[i])
                    if invert:
                        m = m.amax() - m
                    results[i] = m
        return results  # type: ignore[return-value]


def estimate_depth(images, model: Any = DEFAULT_DEPTH_MODEL, **kwargs) -> list[torch.Tensor]:
    """One-off convenience: `DepthEstimator(model, **kwargs)(images)`."""
    return DepthEstimator(model, **kwargs)(images)

