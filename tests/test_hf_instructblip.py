"""kvfix.hf on InstructBLIP: a tiny random-weight InstructBlipForConditionalGeneration (CPU, float32,
no download).

Its images are Q-Former query tokens with no patch grid: DSCR and SCR refuse the model with a clear
error; KVSmooth and CMAC run, alone and stacked. They are checked token for token (and logits)
against the composed reference loop of test_hf_stack (`ref_generate`: plain PyTorch on the text
model, item by item and branch by branch, its own eager attention, independent of kvfix's hooks):
greedy on a left-padded batch of two whose image ends differ (CMAC's forked and unforked prefill),
and seeded sampling. The model's `generate` runs its language model's `generate` on embeddings:
the positions of the query tokens come from the prompt's ids, as kvfix's adapter finds them.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402

from test_hf_stack import N_NEW, check_subset, run, _one_thread  # noqa: E402,F401 (autouse fixture)

FAMILY = "instructblip"


@pytest.fixture(scope="module")
def blip():
    return testing.tiny_instructblip()


def prompt(model, family, items, seed):
    return testing.instructblip_prompt(model, items, seed=seed)


@pytest.mark.parametrize("methods", [("kvsmooth",), ("cmac",), ("cmac", "kvsmooth")],
                         ids=["kvsmooth", "cmac", "cmac+kvsmooth"])
def test_matches_composed_reference(methods, blip):
    check_subset(blip, FAMILY, methods, prompt=prompt, order=-1 if len(methods) > 1 else 1)


def test_the_methods_act(blip):
    """Not vacuous: each method changes the tokens or logits of the plain model on this batch."""
    inputs, spans = prompt(blip, FAMILY, [(3, 3), (2, 8)], 0)
    kw = dict(max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain = blip.generate(**inputs, **kw)
    for methods in (("kvsmooth",), ("cmac",)):
        out = run(blip, inputs, methods, None)
        step = -1 if methods == ("kvsmooth",) else 0  # KVSmooth acts from the second step on
        a, b = out.logits[step], plain.logits[step]
        both = torch.isfinite(a) & torch.isfinite(b)
        assert not torch.equal(out.sequences, plain.sequences) or (a[both] - b[both]).abs().max() > 1e-3, methods


def test_query_tokens_are_the_image_span(blip):
    inputs, spans = prompt(blip, FAMILY, [(3, 3), (2, 8)], 1)
    seen = []

    class Spans(kvfix.hf.Method):
        def on_prefill_start(self, ctx):
            seen.extend((i.batch, i.start, i.end, len(i.grids)) for i in ctx.images)

    with kvfix.hf.enable(blip, Spans()):
        blip.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert seen == [(b, s, s + n, 0) for b, s, _, n in spans]


@pytest.mark.parametrize("method", [kvfix.hf.DSCR, kvfix.hf.SCR])
def test_dscr_and_scr_refused(method, blip):
    with pytest.raises(ValueError, match="no patch grid"):
        kvfix.hf.enable(blip, method())
    with pytest.raises(ValueError, match="no patch grid"):
        kvfix.hf.enable(blip, kvfix.hf.KVSmooth(), method())
    assert kvfix.hf.get_handle(blip) is None
    assert blip.config.get_text_config()._attn_implementation == "sdpa"  # nothing left installed


def test_kvsmooth_takes_the_instructblip_preset(blip):
    with kvfix.hf.enable(blip, kvfix.hf.KVSmooth()) as h:
        assert h.method("kvsmooth").resolved_lam_ref == kvfix.hf.KVSMOOTH_PRESETS["instructblip"]
