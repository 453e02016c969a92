"""kvfix.hf on Chameleon: a tiny random-weight ChameleonForConditionalGeneration (CPU, float32, no download).

Each image is the VQ-VAE's 8 x 8 code grid (row-major), embedded as tokens, between markers; the
text model takes the token ids and the images and merges them itself (kvfix merges them first,
the model's own way, so that CMAC can double and cut the rows); the model's logits of the image
code tokens are finfo.min. All four methods, alone and stacked, are checked token for token (and
logits) against the composed reference loop of test_hf_stack (`ref_generate`: plain PyTorch on
the text model, item by item and branch by branch, its own eager attention, independent of
kvfix's hooks), given the prompt's embeddings as the first decoder layer receives them in a
plain run and the banned code tokens: greedy on a left-padded batch of two whose image ends
differ (CMAC's forked and unforked prefill) and seeded sampling.
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

FAMILY = "chameleon"
CODES = torch.arange(104, 120)  # testing.tiny_chameleon's 16 code tokens


@pytest.fixture(scope="module")
def chameleon():
    return testing.tiny_chameleon()


def prompt(model, family, items, seed):
    """test_hf_stack's items; the single-item prompt's question lengthened by 45 tokens (the
    image is 64 tokens) so that it stays longer than the prompt up to the image end."""
    if len(items) == 1:
        items = [(a, b + 45) for a, b in items]
    return testing.chameleon_prompt(model, items, seed=seed)


def prompt_embeddings(model, inputs):
    """The prompt's embeddings as the first decoder layer receives them in a plain generate."""
    got = []

    def hook(module, args, kwargs):
        if not got:
            got.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    h = model.get_decoder().layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        h.remove()
    return got[0]


def ref_kw(model):
    return lambda inputs: {"embeds": prompt_embeddings(model, inputs), "banned": CODES}


SETS = [(m,) for m in METHODS] + [METHODS]


@pytest.mark.parametrize("methods", SETS, ids=["+".join(s) for s in SETS])
def test_matches_composed_reference(methods, chameleon):
    check_subset(chameleon, FAMILY, methods, prompt=prompt, ref_kw=ref_kw(chameleon),
                 order=-1 if len(methods) > 1 else 1)


def test_grids_and_merged_inputs(chameleon):
    """The images are found as 8 x 8 grids; the embeddings kvfix merges for the text model are
    the model's own (the plain model's prefill logits unchanged with a text-model method on)."""
    inputs, spans = prompt(chameleon, FAMILY, [(3, 3), (2, 8)], 2)
    maps = depth_maps(len(spans), seed=2)
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain = chameleon.generate(**inputs, **kw).logits[0]
    with kvfix.hf.enable(chameleon, kvfix.hf.DSCR(), kvfix.hf.CMAC()) as h, \
            h.images(depth_maps=maps):
        chameleon.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert [(i.batch, i.start, i.gh, i.gw) for i in h.method("dscr").last_images] == spans

    class Merged(kvfix.hf.Method):
        def text_input(self, ctx, kwargs):
            assert kwargs.get("inputs_embeds") is not None and kwargs.get("input_ids") is None
            return None

    with kvfix.hf.enable(chameleon, Merged()):
        merged = chameleon.generate(**inputs, **kw).logits[0]
    assert torch.equal(merged, plain)


def test_all_methods_act(chameleon):
    inputs, spans = prompt(chameleon, FAMILY, [(3, 3), (2, 8)], 0)
    maps = depth_maps(len(spans), seed=0)
    plain = run(chameleon, inputs, ("kvsmooth",), maps)  # the first step: the plain prefill
    for m in ("dscr", "scr", "cmac"):
        out = run(chameleon, inputs, (m,), maps)
        a, b = out.logits[0], plain.logits[0]
        both = torch.isfinite(a) & torch.isfinite(b)
        assert (a[both] - b[both]).abs().max() > 1e-4, m
