"""Tiny random-weight VLMs and prompts for tests, demos and benchmarks (no download).

    model = tiny_llava()                       # CLIP vision (4x4 patch grid) + Llama text, 4 layers
    inputs, spans = llava_prompt(model, [2, 1])  # batch 2, left padded: 2 images, then 1
    model.generate(**inputs, max_new_tokens=8)

`spans` lists `(batch, start, gh, gw)` of every image's patch tokens in the order the model
consumes the images: where they are by construction, independent of kvfix's own span finding.
Token ids: 0 pad, 1 bos, 2 eos (generation never stops early: `generation_config.eos_token_id`
is None), text tokens in [3, 90), image 100, video 101, vision start/end 102/103 (Qwen2-VL).
"""
from __future__ import annotations

import torch

__all__ = ["tiny_llava", "tiny_qwen2_vl", "tiny_instructblip", "tiny_gemma3", "tiny_llava_next", "llava_prompt",
           "qwen_prompt", "llava_next_prompt", "LLAVA_NEXT_IMAGES", "LLAVA_ONEVISION_IMAGES",
           "instructblip_prompt", "gemma3_prompt", "tiny_internvl", "internvl_prompt", "tiny_chameleon", "chameleon_prompt", "IMAGE_TOKEN", "PAD"]

PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 100, 101, 102, 103
_VOCAB = 128


def _finish(model):
    model.eval()
    for m in (model, getattr(model, "language_model", None)):  # InstructBLIP generates with its language model
        if getattr(m, "generation_config", None) is not None:
            m.generation_config.eos_token_id = None
            m.generation_config.pad_token_id = PAD
    return model


def tiny_llava(*, num_layers: int = 4, seed: int = 0, strategy: str = "default", image_size: int = 32,
               patch_size: int = 8, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
               attn_implementation: str | None = None):
    """LlavaForConditionalGeneration: CLIP vision tower (grid image_size // patch_size) + Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=image_size, patch_size=patch_size, projection_dim=32)
    tc = LlamaConfig(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                     pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                      vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return _finish(model)


def tiny_qwen2_vl(*, num_layers: int = 4, seed: int = 0, version: str = "2", hidden: int = 32, heads: int = 4,
                  kv_heads: int = 2):
    """Qwen2VLForConditionalGeneration (version "2"), Qwen2_5_VLForConditionalGeneration ("2.5") or
    Qwen3VLForConditionalGeneration ("3": interleaved multi-section RoPE, deepstack features into
    layers 0 and 1): patch 4, merge 2, temporal patch 2 (pixel rows of 96 values)."""
    import transformers
    tc = dict(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vc = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
    if version == "2":
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vc.update(out_hidden_size=hidden, intermediate_size=64, window_size=8, fullatt_block_indexes=[1])
    elif version == "3":
        cfg_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
        tc.update(head_dim=hidden // heads)
        tc["rope_parameters"] = dict(tc["rope_parameters"], mrope_interleaved=True)
        vc = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=hidden, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    else:
        raise ValueError(f'version must be "2", "2.5" or "3", got {version!r}')
    cfg = cfg_cls(text_config=tc, vision_config=vc, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                  vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(cfg)
    return _finish(model)


def tiny_instructblip(*, num_layers: int = 4, seed: int = 0, queries: int = 4, hidden: int = 32, heads: int = 4,
                      kv_heads: int = 2):
    """InstructBlipForConditionalGeneration: BLIP vision (16 x 16 images, 2 x 2 patches), a one-layer
    Q-Former with `queries` query tokens, Llama text model (1-D RoPE)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig
    from transformers.models.instructblip.configuration_instructblip import (InstructBlipQFormerConfig,
                                                                              InstructBlipVisionConfig)
    vc = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=8)
    qc = InstructBlipQFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD)
    tc = LlamaConfig(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                     pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = InstructBlipConfig(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                             num_query_tokens=queries, image_token_index=IMAGE_TOKEN)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InstructBlipForConditionalGeneration(cfg)
    return _finish(model)


def tiny_gemma3(*, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2):
    """Gemma3ForConditionalGeneration: SigLIP vision (32 x 32 images, 4 x 4 patches: an 8 x 8 patch
    grid, pooled to 4 x 4 = 16 tokens per image), Gemma 3 text model with 4 layers, sliding and
    full attention alternating (each type its own RoPE base; the window, 512, wider than the
    prompts), images between markers 102 / 103."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=4)
    tc = Gemma3TextConfig(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                          query_pre_attn_scalar=hidden // heads, max_position_embeddings=512, sliding_window=512,
                          layer_types=["sliding_attention", "full_attention"] * 2,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=16,
                       image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(cfg)
    return _finish(model)


def _text(n, gen):
    return torch.randint(3, 90, (n,), generator=gen).tolist()


def _left_pad(rows, spans_local):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    spans = []
    for b, r in enumerate(rows):
        off = width - len(r)
        ids[b, off:] = torch.tensor(r)
        mask[b, off:] = 1
        spans += [(b, off + s, gh, gw) for (bb, s, gh, gw) in spans_local if bb == b]
    return ids, mask, spans


def llava_prompt(model, images_per_item, *, seed: int = 0, text_len: int = 3):
    """Left-padded LLaVA batch: item b holds images_per_item[b] images separated by text.
    Returns (inputs dict, spans [(batch, start, gh, gw)])."""
    gen = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    g = vc.image_size // vc.patch_size
    cls = 0 if model.config.vision_feature_select_strategy == "default" else 1
    rows, local = [], []
    for b, n in enumerate(images_per_item):
        r = [BOS] + _text(text_len + b, gen)
        for _ in range(n):
            local.append((b, len(r) + cls, g, g))
            r += [IMAGE_TOKEN] * (g * g + cls) + _text(text_len, gen)
        rows.append(r)
    ids, mask, spans = _left_pad(rows, local)
    pixel_values = torch.randn(sum(images_per_item), 3, vc.image_size, vc.image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}, spans


def qwen_prompt(model, grids_per_item, *, seed: int = 0, text_len: int = 3):
    """Left-padded Qwen2-VL batch: grids_per_item[b] is a list of (h, w) patch grids (before the
    2x2 merge, so even numbers) of item b's images. Returns (inputs dict, spans)."""
    gen = torch.Generator().manual_seed(seed)
    merge = model.config.vision_config.spatial_merge_size
    rows, local, thw = [], [], []
    for b, grids in enumerate(grids_per_item):
        r = [BOS] + _text(text_len + b, gen)
        for h, w in grids:
            gh, gw = h // merge, w // merge
            r.append(VISION_START)
            local.append((b, len(r), gh, gw))
            r += [IMAGE_TOKEN] * (gh * gw) + [VISION_END] + _text(text_len, gen)
            thw.append((1, h, w))
        rows.append(r)
    ids, mask, spans = _left_pad(rows, local)
    vc = model.config.vision_config
    row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    grid_thw = torch.tensor(thw, dtype=torch.long)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), row, generator=gen)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grid_thw,
              "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    return inputs, spans


def instructblip_prompt(model, items, *, seed: int = 0):
    """Left-padded InstructBLIP batch, one image per item: items[b] = (text before, text after) the
    image's query tokens. Returns (inputs dict, spans [(batch, start, 1, queries)]): the query
    tokens as a 1 x queries row (they have no grid)."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.num_query_tokens
    rows, local = [], []
    for b, (before, after) in enumerate(items):
        r = [BOS] + _text(before, gen)
        local.append((b, len(r), 1, n))
        rows.append(r + [IMAGE_TOKEN] * n + _text(after, gen))
    ids, mask, spans = _left_pad(rows, local)
    vc = model.config.vision_config
    pixel_values = torch.randn(len(items), 3, vc.image_size, vc.image_size, generator=gen)
    qformer_ids = torch.randint(3, model.config.qformer_config.vocab_size, (len(items), 5), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "qformer_input_ids": qformer_ids}
    return inputs, spans


def gemma3_prompt(model, items, *, seed: int = 0):
    """Left-padded Gemma 3 batch, one image per item: items[b] = (text before, text after) the image
    (its tokens between the begin / end-of-image markers). Returns (inputs dict, spans
    [(batch, start, side, side)]); `token_type_ids` marks the image tokens (the model's
    bidirectional image mask)."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.mm_tokens_per_image
    side = int(round(n ** 0.5))
    rows, local = [], []
    for b, (before, after) in enumerate(items):
        r = [BOS] + _text(before, gen) + [VISION_START]
        local.append((b, len(r), side, side))
        rows.append(r + [IMAGE_TOKEN] * n + [VISION_END] + _text(after, gen))
    ids, mask, spans = _left_pad(rows, local)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(len(items), 3, size, size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "token_type_ids": (ids == IMAGE_TOKEN).long()}, spans


def tiny_llava_next(*, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2, onevision: bool = False):
    """LlavaNextForConditionalGeneration: CLIP vision (16 x 16 tiles, 4 x 4 patches per tile),
    anyres pinpoints (16, 32), (32, 16), (32, 32), Llama text model with 4 layers. `onevision`:
    LlavaOnevisionForConditionalGeneration instead: SigLIP vision (same tiles, "full" strategy),
    Qwen2 text model, `vision_aspect_ratio="anyres_max_1"` (a high-resolution grid above one
    tile's worth of patches is pooled)."""
    import transformers
    tc = dict(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)
    common = dict(image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                  image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    if onevision:
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**vc).to_dict(),
            text_config=transformers.Qwen2Config(**tc).to_dict(), vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1", video_token_index=VIDEO_TOKEN, **common)
        cls = transformers.LlavaOnevisionForConditionalGeneration
    else:
        cfg = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(projection_dim=32, **vc).to_dict(),
            text_config=transformers.LlamaConfig(**tc).to_dict(), vision_feature_select_strategy="default", **common)
        cls = transformers.LlavaNextForConditionalGeneration
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg)
    return _finish(model)


# the images llava_next_prompt uses, by (height, width): the best pinpoint (16, 32) is 1 x 2 tiles, a
# 4 x 8 patch grid, unpadded to the image's aspect (worked out by hand from LLaVA-NeXT's rules):
# (16, 32) keeps 4 x 8; (8, 32) keeps rows 1..2 (scale 8/32: 2 rows, padding 1): 2 x 8.
# LLaVA-OneVision with anyres_max_1 then pools a grid of more than 16 patches by
# ratio = sqrt(rows * cols / 16): 4 x 8 by 1.414 (> 1.1) to (4 // 1.414, 8 // 1.414) = 2 x 5; 2 x 8
# (ratio 1) stays.
LLAVA_NEXT_IMAGES = {(16, 32): (4, 8), (8, 32): (2, 8)}
LLAVA_ONEVISION_IMAGES = {(16, 32): (2, 5), (8, 32): (2, 8)}


def llava_next_prompt(model, items, *, seed: int = 0):
    """Left-padded LLaVA-NeXT (or LLaVA-OneVision) batch, one image per item: items[b] = (text
    before, text after, (height, width)) with a size from LLAVA_NEXT_IMAGES. Returns (inputs dict, images
    [(batch, start, end, grids)]): the image's tokens [start, end) and its grids
    `(positions [gh * gw] int64, gh, gw)`: the 4 x 4 base grid, then the high-resolution grid,
    whose rows are each followed by a newline token."""
    gen = torch.Generator().manual_seed(seed)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, local = [], []
    table = LLAVA_ONEVISION_IMAGES if model.config.model_type == "llava_onevision" else LLAVA_NEXT_IMAGES
    for b, (before, after, hw) in enumerate(items):
        gh, gw = table[tuple(hw)]
        n = g * g + gh * (gw + 1)
        r = [BOS] + _text(before, gen)
        local.append((b, len(r), n, gh, gw))
        rows.append(r + [IMAGE_TOKEN] * n + _text(after, gen))
    ids, mask, _ = _left_pad(rows, [])
    images = []
    for b, s0, n, gh, gw in local:
        s = s0 + (ids.shape[1] - len(rows[b]))
        base = torch.arange(s, s + g * g)
        hires = (s + g * g + torch.arange(gh)[:, None] * (gw + 1) + torch.arange(gw)[None]).flatten()
        images.append((b, s, s + n, [(base, g, g), (hires, gh, gw)]))
    tile = model.config.vision_config.image_size
    pixel_values = torch.randn(len(items), 3, 3, tile, tile, generator=gen)  # base + 2 tiles each
    sizes = torch.tensor([list(hw) for _, _, hw in items], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": sizes}, images


def tiny_internvl(*, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2):
    """InternVLForConditionalGeneration: InternViT-style vision (32 x 32 tiles, 4 x 4 patches: an
    8 x 8 patch grid, its CLS dropped, pixel-shuffled by 0.5 to a 4 x 4 grid of 16 tokens per
    tile), Qwen2 text model with 4 layers (1-D RoPE)."""
    import transformers
    vc = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=4)
    tc = transformers.Qwen2Config(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = transformers.InternVLConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=IMAGE_TOKEN,
                                      image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.InternVLForConditionalGeneration(cfg)
    return _finish(model)


def internvl_prompt(model, items, *, seed: int = 0):
    """Left-padded InternVL batch, one image per item: items[b] = (text before, text after,
    (rows, cols)) with the image cut into rows x cols tiles (row-major), then, when there is more
    than one tile, its thumbnail; each tile a side x side grid of tokens (the pixel-shuffled
    patch grid), the image's tokens between markers 102 / 103. Returns (inputs dict, images
    [(batch, start, end, grids)]): the image's tokens [start, end) and its grids
    `(positions [side * side] int64, side, side, region)`, region = (top, left, bottom, right)
    fractions of the image (the thumbnail: the whole image)."""
    gen = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    side = int(vc.image_size[0] // vc.patch_size[0] * model.config.downsample_ratio)
    rows, local = [], []
    for b, (before, after, (tr, tc)) in enumerate(items):
        n_tiles = tr * tc + (1 if tr * tc > 1 else 0)
        r = [BOS] + _text(before, gen) + [VISION_START]
        local.append((b, len(r), n_tiles, tr, tc))
        rows.append(r + [IMAGE_TOKEN] * (n_tiles * side * side) + [VISION_END] + _text(after, gen))
    ids, mask, _ = _left_pad(rows, [])
    images = []
    for b, s0, n_tiles, tr, tc in local:
        s = s0 + (ids.shape[1] - len(rows[b]))
        regions = [(i // tc / tr, i % tc / tc, (i // tc + 1) / tr, (i % tc + 1) / tc) for i in range(tr * tc)]
        if n_tiles > 1:
            regions.append((0.0, 0.0, 1.0, 1.0))
        grids = [(torch.arange(s + t * side * side, s + (t + 1) * side * side), side, side, reg)
                 for t, reg in enumerate(regions)]
        images.append((b, s, s + n_tiles * side * side, grids))
    pixel_values = torch.randn(sum(n for _, _, n, _, _ in local), 3, vc.image_size[0], vc.image_size[1],
                               generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}, images


def tiny_chameleon(*, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2, codes: int = 16):
    """ChameleonForConditionalGeneration: a VQ-VAE of three levels (32 x 32 images to an 8 x 8 code
    grid, `codes` codes, embedded as tokens 104, 105, ...), Chameleon text model with 4 layers
    (per-head query / key norms, 1-D RoPE); image placeholder 100 (`<image>`)."""
    import transformers
    vmap = {"<image>": IMAGE_TOKEN, "<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for i in range(codes):  # code i is the token named IMGIMG<i, digits as letters A..J>Z
        vmap["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"] = 104 + i
    vq = dict(embed_dim=8, num_embeddings=codes, latent_channels=32, resolution=32, in_channels=3, base_channels=32,
              channel_multiplier=[1, 1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(vocab_size=_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                       max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
                                       eos_token_id=EOS, vq_config=vq, vocabulary_map=vmap)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.ChameleonForConditionalGeneration(cfg)
    return _finish(model)


def chameleon_prompt(model, items, *, seed: int = 0):
    """Left-padded Chameleon batch, one image per item: items[b] = (text before, text after) the
    image (its side x side placeholders between markers 102 / 103). Returns (inputs dict, spans
    [(batch, start, side, side)])."""
    gen = torch.Generator().manual_seed(seed)
    vq = model.config.vq_config
    side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
    rows, local = [], []
    for b, (before, after) in enumerate(items):
        r = [BOS] + _text(before, gen) + [VISION_START]
        local.append((b, len(r), side, side))
        rows.append(r + [IMAGE_TOKEN] * (side * side) + [VISION_END] + _text(after, gen))
    ids, mask, spans = _left_pad(rows, local)
    pixel_values = torch.randn(len(items), 3, vq.resolution, vq.resolution, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}, spans
