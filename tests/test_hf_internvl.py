"""kvfix.hf on InternVL: a tiny random-weight InternVLForConditionalGeneration (CPU, float32, no download).

Each image is its tiles (row-major over the rows x cols arrangement), then, with more than one
tile, its thumbnail; every tile a 4 x 4 grid (the 8 x 8 patch grid pixel-shuffled by 0.5), the
image's tokens one run between markers. DSCR and SCR act on each tile's grid on its own (DSCR
with the tile's part of the image's depth map, the thumbnail and a one-tile image with the whole
map), CMAC on the image's whole run. All four methods, alone and stacked, are checked token for
token (and logits) against the composed reference loop of test_hf_stack (`ref_generate`: plain
PyTorch on the text model, item by item and branch by branch, its own eager attention,
independent of kvfix's hooks), given the tiles' positions and regions worked out by hand
(`testing.internvl_prompt`): greedy on a left-padded batch of two (a 2 x 3-tile image and a
one-tile image; CMAC's forked and unforked prefill) and seeded sampling (a 1 x 2-tile image).
The tile arrangement reaches kvfix through `handle.images(tiles=...)` (the model's forward only
sees a tile count); without it DSCR refuses a depth map, the other methods run.
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

FAMILY = "internvl"
TILES = [(2, 3), (1, 1)]  # the batch's images; the single-item prompt's: (1, 2)


@pytest.fixture(scope="module")
def internvl():
    return testing.tiny_internvl()


def prompt(model, family, items, seed):
    """test_hf_stack's items (text before, text after) with the tile arrangements of TILES; the
    single-item prompt: a 1 x 2-tile image (48 tokens), its question lengthened by 45 tokens so
    that it stays longer than the prompt up to the image end."""
    if len(items) == 1:
        (before, after), = items
        return testing.internvl_prompt(model, [(before, after + 45, (1, 2))], seed=seed)
    return testing.internvl_prompt(model, [(a, b, t) for (a, b), t in zip(items, TILES)], seed=seed)


def tiles_of(spans):
    """The (rows, cols) of each image, read back from its first grid's region."""
    out = []
    for _, _, _, grids in spans:
        top, left, bottom, right = grids[0][3]
        out.append((round(1 / (bottom - top)), round(1 / (right - left))))
    return out


SETS = [(m,) for m in METHODS] + [METHODS]


@pytest.mark.parametrize("methods", SETS, ids=["+".join(s) for s in SETS])
def test_matches_composed_reference(methods, internvl):
    check_subset(internvl, FAMILY, methods, prompt=prompt, image_kw=lambda spans: {"tiles": tiles_of(spans)},
                 order=-1 if len(methods) > 1 else 1)


def test_pixel_shuffle_is_row_major(internvl):
    """transformers' pixel shuffle turns an 8 x 8 patch grid into a 4 x 4 grid whose token
    r * 4 + c holds patches (2r + i, 2c + j), i, j in {0, 1}: the tile's tokens are row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)  # [8, 8, 2]
    out = internvl.model.pixel_shuffle(coords[None], scale_factor=0.5).reshape(16, 4, 2)
    for t in range(16):
        r, c = divmod(t, 4)
        got = {tuple(x) for x in out[t].long().tolist()}
        assert got == {(2 * r + i, 2 * c + j) for i in (0, 1) for j in (0, 1)}


def test_tiles_found_in_generate(internvl):
    """Without `tiles` each run of placeholders is one image of run / 16 tiles, the last one the
    thumbnail (whole image), the others of unknown region; with `tiles` the regions are the
    hand-computed ones."""
    inputs, images = prompt(internvl, FAMILY, [(3, 3), (2, 8)], 4)
    seen = []

    class Spans(kvfix.hf.Method):
        def on_prefill_start(self, ctx):
            seen.append([(i.batch, i.start, i.end, [(g.positions(), g.gh, g.gw, g.region) for g in i.grids])
                         for i in ctx.images])

    with kvfix.hf.enable(internvl, Spans()) as h:
        internvl.generate(**inputs, max_new_tokens=1, do_sample=False)
        with h.images(tiles=TILES):
            internvl.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert len(seen) == 2
    for k, got in enumerate(seen):
        assert [(b, s, e) for b, s, e, _ in got] == [(b, s, e) for b, s, e, _ in images]
        for (_, _, _, g1), (_, _, _, g2) in zip(got, images):
            assert len(g1) == len(g2)
            for i, ((p, gh, gw, reg), (q, hh, ww, want)) in enumerate(zip(g1, g2)):
                assert torch.equal(p, q) and (gh, gw) == (hh, ww) == (4, 4)
                whole = len(g1) == 1 or i == len(g1) - 1
                if k == 0 and not whole:
                    assert reg is None
                else:
                    assert reg == pytest.approx(want)


def test_dscr_needs_the_tile_arrangement_for_a_depth_map(internvl):
    inputs, spans = prompt(internvl, FAMILY, [(3, 3), (2, 8)], 0)
    with kvfix.hf.enable(internvl, kvfix.hf.DSCR()) as h:
        with pytest.raises(ValueError, match="tiles="), h.images(depth_maps=depth_maps(2)):
            internvl.generate(**inputs, max_new_tokens=1, do_sample=False)
        with h.images(depth_maps="uniform"):  # no depth cue: no region needed
            internvl.generate(**inputs, max_new_tokens=1, do_sample=False)
        with pytest.raises(ValueError, match="account for"), h.images(depth_maps=depth_maps(2),
                                                                     tiles=[(1, 2), (1, 1)]):
            internvl.generate(**inputs, max_new_tokens=1, do_sample=False)  # 64 tokens of tiles, 128 in the prompt
        with pytest.raises(ValueError, match="rows, cols"):
            h.set_images(tiles=[(2, 0)])


def test_all_methods_act(internvl):
    inputs, spans = prompt(internvl, FAMILY, [(3, 3), (2, 8)], 0)
    maps = depth_maps(len(spans), seed=0)
    plain = run(internvl, inputs, ("kvsmooth",), maps)  # the first step: the plain prefill
    for m in ("dscr", "scr", "cmac"):
        out = run(internvl, inputs, (m,), maps, images={"tiles": TILES})
        a, b = out.logits[0], plain.logits[0]
        both = torch.isfinite(a) & torch.isfinite(b)
        assert (a[both] - b[both]).abs().max() > 1e-4, m
