"""kvfix.hf on LLaVA-NeXT and LLaVA-OneVision: tiny random-weight LlavaNextForConditionalGeneration
and LlavaOnevisionForConditionalGeneration models (CPU, float32, no download).

Each image is a 4 x 4 base grid, then a high-resolution grid (1 x 2 tiles, unpadded to the
image's aspect: 4 x 8, or 2 x 8 for a wide image; OneVision with anyres_max_1 pools the 4 x 8 grid
to 2 x 5) with a newline token after each of its rows.
DSCR and SCR act on each grid on its own (the newline tokens untouched), CMAC on the image's
whole run. All four methods, alone and stacked, are checked token for token (and logits) against
the composed reference loop of test_hf_stack (`ref_generate`: plain PyTorch on the text model,
item by item and branch by branch, its own eager attention, independent of kvfix's hooks), given
the grids' positions worked out by hand (`testing.LLAVA_NEXT_IMAGES`, `LLAVA_ONEVISION_IMAGES`):
greedy on a left-padded
batch of two whose images differ (CMAC's forked and unforked prefill), and seeded sampling.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402

from test_hf_dscr import depth_maps  # noqa: E402
from test_hf_stack import METHODS, check_subset, run, _one_thread  # noqa: E402,F401 (autouse fixture)

SIZES = [(16, 32), (8, 32)]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def next_model(request):
    return testing.tiny_llava_next(onevision=request.param == "llava_onevision")


def prompt(model, family, items, seed):
    """test_hf_stack's items (text before, text after) with the image sizes of SIZES in turn
    (the single-item prompt: the wide image, whose grid is unpadded)."""
    sizes = SIZES if len(items) > 1 else SIZES[1:]
    return testing.llava_next_prompt(model, [(a, b, hw) for (a, b), hw in zip(items, sizes)], seed=seed)


SETS = [(m,) for m in METHODS] + [METHODS]


@pytest.mark.parametrize("methods", SETS, ids=["+".join(s) for s in SETS])
def test_matches_composed_reference(methods, next_model):
    family = next_model.config.model_type
    check_subset(next_model, family, methods, prompt=prompt, order=-1 if len(methods) > 1 else 1)


def test_grids_found_in_generate_and_forward(next_model):
    """generate hands the forward encoded features only (the grids read from the newline rows);
    a direct forward carries image_sizes: both give the hand-computed grids, newlines outside."""
    inputs, images = prompt(next_model, next_model.config.model_type, [(3, 3), (2, 8)], 4)
    seen = []

    class Spans(kvfix.hf.Method):
        def on_prefill_start(self, ctx):
            seen.append([(i.batch, i.start, i.end, [(g.positions(), g.gh, g.gw) for g in i.grids])
                         for i in ctx.images])

    with kvfix.hf.enable(next_model, Spans()):
        next_model.generate(**inputs, max_new_tokens=1, do_sample=False)
        with torch.no_grad():
            next_model(**inputs)
    assert len(seen) == 2
    for got in seen:
        assert [(b, s, e) for b, s, e, _ in got] == [(b, s, e) for b, s, e, _ in images]
        for (_, _, _, g1), (_, _, _, g2) in zip(got, images):
            assert [(gh, gw) for _, gh, gw in g1] == [(gh, gw) for _, gh, gw in g2]
            assert all(torch.equal(p, q) for (p, _, _), (q, _, _) in zip(g1, g2))


def test_newline_tokens_untouched(next_model):
    """DSCR refines the grid tokens only: in the prefilled cache, the newline tokens' keys of the
    refined layers equal the plain model's, the grid tokens' do not."""
    inputs, images = prompt(next_model, next_model.config.model_type, [(3, 3), (2, 8)], 5)
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    plain = next_model.generate(**inputs, **kw).past_key_values
    with kvfix.hf.enable(next_model, kvfix.hf.DSCR()) as h, h.images(depth_maps=depth_maps(2, seed=5)):
        cache = next_model.generate(**inputs, **kw).past_key_values
    for b, s, e, grids in images:
        grid = torch.cat([p for p, _, _ in grids])
        newline = torch.tensor(sorted(set(range(s, e)) - set(grid.tolist())))
        assert len(newline) == grids[1][1]  # one per high-resolution row
        for layer in (1, 2, 3):
            k, k0 = cache.layers[layer].keys[b], plain.layers[layer].keys[b]
            assert torch.equal(k[:, newline], k0[:, newline])
            assert not torch.equal(k[:, grid], k0[:, grid])


def test_all_methods_act(next_model):
    inputs, spans = prompt(next_model, next_model.config.model_type, [(3, 3), (2, 8)], 0)
    maps = depth_maps(len(spans), seed=0)
    plain = run(next_model, inputs, ("kvsmooth",), maps)  # the first step: the plain prefill
    for m in ("dscr", "scr", "cmac"):
        out = run(next_model, inputs, (m,), maps)
        a, b = out.logits[0], plain.logits[0]
        both = torch.isfinite(a) & torch.isfinite(b)
        assert (a[both] - b[both]).abs().max() > 1e-4, m
