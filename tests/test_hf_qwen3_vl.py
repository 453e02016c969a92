"""kvfix.hf on Qwen3-VL: a tiny random-weight Qwen3VLForConditionalGeneration (CPU, float32, no download).

Qwen2-VL's merged grids (4 x 6 here), interleaved multi-section RoPE (frequency f of the 4 is
temporal, height, width, temporal: CMAC's calibration moves each by its own section's positions),
deepstack features added to layers 0 and 1 at the image positions. All four methods, alone and
stacked, are checked token for token (and logits) against the composed reference loop of
test_hf_stack (`ref_generate`: plain PyTorch on the text model, item by item and branch by branch,
its own eager attention and calibration written out, independent of kvfix's hooks), given the
deepstack features of each prompt chunk (`deepstack`, taken from a plain run of the model):
greedy on a left-padded batch of two (CMAC's forked and unforked prefill) and seeded sampling.
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
from test_hf_stack import (  # noqa: E402,F401 (_one_thread: the autouse fixture)
    METHODS, _one_thread, check_subset, interleaved_sections, make_prompt, ref_generate, run)

FAMILY = "qwen3"


@pytest.fixture(scope="module")
def qwen3():
    return testing.tiny_qwen2_vl(version="3")


def deepstack(model):
    """inputs -> text_extra(b, a, c): the plain model's deepstack arguments for item b's prompt rows
    [a, c): its image positions there and the features of those positions (the features are the
    batch's image positions in row-major order)."""
    def make(inputs):
        got = {}

        def hook(module, args, kwargs):
            if "vpm" not in got:
                got["vpm"], got["emb"] = kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]

        h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        finally:
            h.remove()
        vpm, emb = got["vpm"], got["emb"]

        def extra(b, a, c):
            first = int(vpm[:b].sum()) + int(vpm[b, :a].sum())
            n = int(vpm[b, a:c].sum())
            if n == 0:
                return {}
            return {"visual_pos_masks": vpm[b:b + 1, a:c], "deepstack_visual_embeds": [e[first:first + n] for e in emb]}
        return extra
    return make


SETS = [(m,) for m in METHODS] + [METHODS]


@pytest.mark.parametrize("methods", SETS, ids=["+".join(s) for s in SETS])
def test_matches_composed_reference(methods, qwen3):
    check_subset(qwen3, FAMILY, methods, text_extra=deepstack(qwen3), order=-1 if len(methods) > 1 else 1)


def test_interleaved_sections_and_deepstack_matter(qwen3):
    """Not vacuous: the reference with contiguous sections, or without deepstack, differs."""
    inputs, spans = make_prompt(qwen3, FAMILY, [(3, 3), (2, 8)], 0)
    extra = deepstack(qwen3)(inputs)
    full = ref_generate(qwen3, FAMILY, inputs, spans, ("cmac",), text_extra=extra)[1][0]
    for other in (ref_generate(qwen3, FAMILY, inputs, spans, ("cmac",))[1][0],):  # no deepstack
        both = torch.isfinite(full) & torch.isfinite(other)
        assert (full[both] - other[both]).abs().max() > 1e-3
    assert interleaved_sections((2, 1, 1), 4).tolist() == [0, 1, 2, 0]


def test_cmac_interleaved_calibration_differs_from_contiguous(qwen3):
    """CMAC with the model's interleaved sections gives other logits than the same keys calibrated
    as contiguous sections would (the permutation is not a no-op here)."""
    inputs, spans = make_prompt(qwen3, FAMILY, [(3, 3), (2, 8)], 1)
    maps = depth_maps(len(spans), seed=1)
    out = run(qwen3, inputs, ("cmac",), maps)
    with kvfix.hf.enable(qwen3, kvfix.hf.CMAC(alpha=3.0, beta=0.2, gamma=3.0)) as h:
        h.method("cmac")._perm = None  # calibrate as if the sections were contiguous
        wrong = qwen3.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    a, b = out.logits[0], wrong.logits[0]
    both = torch.isfinite(a) & torch.isfinite(b)
    assert (a[both] - b[both]).abs().max() > 1e-5
