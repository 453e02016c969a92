"""kvfix.hf's adapter registry: families are found by config.model_type, a user adapter plugs in
without touching kvfix (docs/ADAPTERS.md), layouts are checked."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import Grid, Layout, ModelAdapter, testing  # noqa: E402
from kvfix.hf.models import LlavaAdapter, registered_model_types  # noqa: E402


def test_builtin_families_by_model_type():
    types = registered_model_types()
    for t in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision", "gemma3",
              "instructblip", "internvl", "chameleon"):
        assert issubclass(types[t], ModelAdapter)


def test_unknown_model_type_refused_with_the_way_out():
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(TypeError, match="register_adapter"):
        kvfix.hf.enable(model, kvfix.hf.KVSmooth())


def test_registration_checks():
    with pytest.raises(TypeError, match="ModelAdapter"):
        kvfix.hf.register_adapter(object, "x")
    with pytest.raises(ValueError, match="at least one"):
        kvfix.hf.register_adapter(LlavaAdapter)
    with pytest.raises(ValueError, match="replace=True"):
        kvfix.hf.register_adapter(type("Other", (LlavaAdapter,), {}), "llava")

    class BadRope(ModelAdapter):
        rope = "spiral"
    with pytest.raises(ValueError, match="rope"):
        kvfix.hf.register_adapter(BadRope, "spiral_vlm")


class CroppedLlava(LlavaAdapter):
    """A user adapter: LLaVA whose images count only the centre 2 x 2 patches as the grid (the
    other placeholder tokens left alone), registered over the built-in one."""
    calls = 0

    def layouts(self, inputs, n_tokens, explicit):
        CroppedLlava.calls += 1
        g = self.grid
        return [Layout(g * g, (Grid(g + 1, 2, 2, row_stride=g),))] * (n_tokens // (g * g))


def test_user_adapter_replaces_a_family():
    model = testing.tiny_llava()
    inputs, spans = testing.llava_prompt(model, [1])
    try:
        kvfix.hf.register_adapter(CroppedLlava, "llava", replace=True)
        with kvfix.hf.enable(model, kvfix.hf.DSCR(missing_depth="uniform")) as h:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            img = h.method("dscr").last_images[0]
        assert CroppedLlava.calls == 1
        (_, s, g, _), = spans
        grid, = img.grids
        assert (grid.gh, grid.gw) == (2, 2)
        assert grid.positions().tolist() == [s + g + 1, s + g + 2, s + 2 * g + 1, s + 2 * g + 2]
    finally:
        kvfix.hf.register_adapter(LlavaAdapter, "llava", replace=True)


def test_layouts_are_checked():
    with pytest.raises(ValueError, match="does not fit"):
        Layout(4, (Grid(1, 2, 2),)).check("here")
    with pytest.raises(ValueError, match="overlap"):
        Layout(8, (Grid(0, 2, 2), Grid(2, 1, 2))).check("here")
    Layout(5, (Grid(0, 2, 2, row_stride=3),)).check("here")  # a row-end token between the rows
