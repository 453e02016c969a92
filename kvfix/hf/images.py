"""Image bookkeeping of the adapter layer: the per-image inputs the user gives (`handle.images`:
depth maps, explicit grids or tile arrangements) and the ImageSpans of one forward, found from the placeholder tokens
and the adapter's layouts (models.py). The dispatcher (core.py) calls `resolve_images` once per
forward that carries images."""
from __future__ import annotations

import torch

from .models import ImageSpan, Layout, place

__all__ = ["ImageInputs", "host_tokens", "resolve_images"]


class ImageInputs:
    """What the user gave for the images of the following generations (`handle.images(...)`)."""

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
        self.grids: list[Layout] | None = None  # explicit layouts (from image_grid_thw or tiles)
        self.cursor = 0  # depth maps consumed in the current session
        self.grid_cursor = 0  # explicit grids consumed in the current session
        self.max_used = 0


def host_tokens(adapter, input_ids, padding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_img, text) [B, t] bool on the host: the forward's image placeholders, and its tokens
    that are neither placeholders nor padding (`padding`: the forward's 2-D padding mask, or
    None). One device-to-host copy: the forward's only host synchronisation for its images."""
    if input_ids is None:
        raise ValueError("kvfix.hf needs input_ids to locate the image tokens (got inputs_embeds only)")
    is_img = input_ids == adapter.image_token_id
    B, t = is_img.shape
    if (isinstance(padding, torch.Tensor) and padding.dim() == 2 and padding.shape[0] == B
            and padding.shape[1] >= t):
        is_img, keep = torch.stack((is_img, padding[:, -t:].to(device=is_img.device, dtype=torch.bool))).cpu()
        return is_img, ~is_img & keep
    is_img = is_img.cpu()
    return is_img, ~is_img


def resolve_images(adapter, inputs: dict, input_ids, past_len: int, given: ImageInputs | None,
                   first_index: int, host: tuple[torch.Tensor, torch.Tensor]) -> list[ImageSpan]:
    """The images of one forward, in the order the model consumes them (batch item, then
    position), numbered from `first_index`; `given` (the user's inputs of a main pass, or None)
    supplies explicit layouts and depth maps, its cursors advanced; `host`: `host_tokens` of the
    forward."""
    is_img = host[0]
    n_tokens = int(is_img.sum())
    if n_tokens == 0:
        return []
    explicit = given.grids[given.grid_cursor:] if (given is not None and given.grids is not None) else None
    layouts = adapter.layouts(inputs, n_tokens, explicit)
    layouts, used = _match_layouts(layouts, n_tokens, explicit is not None, is_img, input_ids)
    for lay in {id(lay): lay for lay in layouts}.values():
        lay.check(f"{type(adapter).__name__}.layouts")

    # contiguous runs of image tokens per batch item, split into images in order
    spans, it = [], iter(layouts)
    for b in range(is_img.shape[0]):
        for s, e in _runs(is_img[b]):
            while s < e:
                lay = next(it, None)
                if lay is None or s + lay.tokens > e:
                    raise ValueError(f"batch item {b}: an image token run [{s}, {e}) does not split into whole "
                                     f"images of the expected grids (an image cut across forward passes?)")
                spans.append(place(lay, first_index + len(spans), b, past_len + s))
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
