"""kvfix.hf on Gemma 3: a tiny random-weight Gemma3ForConditionalGeneration (CPU, float32, no download).

Each image is a 4 x 4 pooled grid between begin / end-of-image markers; in the prefill the model
lets an image's tokens attend to each other both ways (its mask from `token_type_ids`); sliding
and full-attention layers alternate, each type with its own RoPE base. All four methods, alone
and stacked, are checked token for token (and logits) against the composed reference loop of
test_hf_stack (`ref_generate`: plain PyTorch on the text model, item by item and branch by
branch, its own eager attention, independent of kvfix's hooks), given here the bidirectional
prefill mask written out from the image positions (`prefill_mask`): greedy on a left-padded batch
of two whose image ends differ (CMAC's forked and unforked prefill) and seeded sampling.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402

from test_hf_stack import METHODS, check_subset, run, _one_thread  # noqa: E402,F401 (autouse fixture)
from test_hf_dscr import depth_maps  # noqa: E402

FAMILY = "gemma3"


@pytest.fixture(scope="module")
def gemma():
    return testing.tiny_gemma3()


def prompt(model, family, items, seed):
    return testing.gemma3_prompt(model, items, seed=seed)


def prefill_mask(inputs):
    """Gemma 3's prefill mask written out: query p sees key k when k is a real token and k <= p, or
    p and k are tokens of the same image (one contiguous run of image tokens); the sliding window
    (512) is wider than the prompt, so both layer types get the same mask."""
    ids, pad = inputs["input_ids"], inputs["attention_mask"].bool()
    img = ids == testing.IMAGE_TOKEN
    start = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
    block = torch.where(img, start.long().cumsum(1), 0)  # 0: text; k > 0: the k-th image of the row

    def mask(b, a, c):
        q = torch.arange(a, c)[:, None]
        k = torch.arange(c)[None]
        same = (block[b, a:c, None] > 0) & (block[b, a:c, None] == block[b, None, :c])
        m = pad[b, None, :c] & ((k <= q) | same)
        return {"full_attention": m[None, None], "sliding_attention": m[None, None]}
    return mask


SETS = [(m,) for m in METHODS] + [METHODS]


@pytest.mark.parametrize("methods", SETS, ids=["+".join(s) for s in SETS])
def test_matches_composed_reference(methods, gemma):
    check_subset(gemma, FAMILY, methods, prompt=prompt, prefill_mask=prefill_mask,
                 order=-1 if len(methods) > 1 else 1)


def test_the_image_mask_is_bidirectional_and_respected(gemma):
    """The reference is not vacuous: a causal-only prefill mask gives other logits (CMAC, whose
    attention replaces the model's, must keep the bidirectional block)."""
    inputs, spans = prompt(gemma, FAMILY, [(3, 3), (2, 8)], 0)
    from test_hf_stack import ref_generate
    causal = ref_generate(gemma, FAMILY, inputs, spans, ("cmac",))
    bidir = ref_generate(gemma, FAMILY, inputs, spans, ("cmac",), prefill_mask=prefill_mask(inputs))
    a, b = causal[1][0], bidir[1][0]
    both = torch.isfinite(a) & torch.isfinite(b)
    assert (a[both] - b[both]).abs().max() > 1e-3


def test_grids_and_per_layer_rope(gemma):
    inputs, spans = prompt(gemma, FAMILY, [(3, 3), (2, 8)], 2)
    maps = depth_maps(len(spans), seed=2)
    with kvfix.hf.enable(gemma, kvfix.hf.DSCR(), kvfix.hf.CMAC()) as h, h.images(depth_maps=maps):
        gemma.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert [(i.batch, i.start, i.gh, i.gw) for i in h.method("dscr").last_images] == spans
        freqs = [h.adapter.rope_frequencies(layer)[0] for layer in range(4)]
    assert torch.equal(freqs[0], freqs[2]) and torch.equal(freqs[1], freqs[3])
    assert not torch.equal(freqs[0], freqs[1])  # sliding and full attention: two RoPE bases


def test_all_methods_act(gemma):
    """Each method changes the plain model's tokens or logits on this batch."""
    inputs, spans = prompt(gemma, FAMILY, [(3, 3), (2, 8)], 0)
    maps = depth_maps(len(spans), seed=0)
    plain = run(gemma, inputs, ("kvsmooth",), maps)  # (a KVSmooth run: compared at the first step only)
    for m in ("dscr", "scr", "cmac"):
        out = run(gemma, inputs, (m,), maps)
        a, b = out.logits[0], plain.logits[0]
        both = torch.isfinite(a) & torch.isfinite(b)
        assert (a[both] - b[both]).abs().max() > 1e-4, m
