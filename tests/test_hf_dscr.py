"""kvfix.hf end to end on tiny random LLaVA / Qwen2-VL / Qwen2.5-VL models (CPU, float32, no download)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix import reference  # noqa: E402
from kvfix.hf import testing  # noqa: E402

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def gen(model, inputs, n, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, return_dict_in_generate=True, **kw)


def depth_maps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(20, 30), (7, 5), (64, 48), (9, 9), (33, 17)]
    return [torch.rand(*sizes[i % len(sizes)], generator=g) * 10 for i in range(n)]


def expected_cache(cache_off, spans, depths, layers, *, keys_only=False, params=None):
    """The unrefined cache with kvfix.reference.dscr_refine (float64) applied to the image spans
    of `layers`; every other layer and position as it was."""
    params = params or {}
    out = []
    for li, layer in enumerate(cache_off.layers):
        k, v = layer.keys.clone(), layer.values.clone()
        if li in layers:
            for (b, s, gh, gw), d in zip(spans, depths):
                e = s + gh * gw
                dep = d if (isinstance(d, torch.Tensor) and d.dim() == 1) else (
                    torch.zeros(gh * gw) if isinstance(d, str) else kvfix.patch_depth(d, gh, gw))
                co = kvfix.patch_coords(gh, gw)
                rk, rv = reference.dscr_refine(k[b:b + 1, :, s:e].double(), None if keys_only else v[b:b + 1, :, s:e].double(),
                                               dep.double(), co.double(), **params)
                k[b:b + 1, :, s:e] = rk.to(k.dtype)
                if not keys_only:
                    v[b:b + 1, :, s:e] = rv.to(v.dtype)
        out.append((k, v))
    return out


def assert_cache(cache, expected, refined_layers):
    assert len(cache.layers) == len(expected)
    for li, (layer, (k, v)) in enumerate(zip(cache.layers, expected)):
        if li in refined_layers:
            torch.testing.assert_close(layer.keys, k, atol=ATOL, rtol=0)
            torch.testing.assert_close(layer.values, v, atol=ATOL, rtol=0)
        else:
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v), f"layer {li} changed"


def image_part(cache, spans, layer):
    return [cache.layers[layer].keys[b, :, s:s + gh * gw].clone() for b, s, gh, gw in spans]


# --------------------------------------------------------------------------------------------
# the refined cache equals the reference applied to the unrefined one

def test_llava_refined_cache_matches_reference(llava):
    inputs, spans = testing.llava_prompt(llava, [2, 1])  # batch 2, left padding, 2 images in item 0
    off = gen(llava, inputs, 1)
    depths = depth_maps(len(spans))
    with kvfix.hf.enable(llava, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            on = gen(llava, inputs, 1)
        dscr = h.method("dscr")
        assert dscr.selected_layers == (1, 2, 3)  # [L // 4, L) with L = 4
        assert [(i.batch, i.start, i.gh, i.gw) for i in dscr.last_images] == spans
        assert dscr.refine_calls == len(spans)
    assert torch.equal(on.sequences, off.sequences)  # prefill itself is unchanged
    assert_cache(on.past_key_values, expected_cache(off.past_key_values, spans, depths, (1, 2, 3)), (1, 2, 3))
    # and the refinement did change the selected layers' image spans
    assert not torch.equal(on.past_key_values.layers[1].keys, off.past_key_values.layers[1].keys)


@pytest.mark.parametrize("layers,keys_only", [(None, False), ([0, -1], True)])
def test_qwen_refined_cache_matches_reference(qwen, layers, keys_only):
    # non-square grids, different per image, 2 images per prompt, left padding
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6), (6, 4)], [(4, 4), (2, 8)]])
    off = gen(qwen, inputs, 1)
    depths = depth_maps(len(spans), seed=1)
    params = dict(sigma_d=0.5, sigma_s=0.7, alpha=0.9, beta=0.4)
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR(layers, keys_only=keys_only, **params)) as h:
        with h.images(depth_maps=depths):
            on = gen(qwen, inputs, 1)
        sel = h.method(kvfix.hf.DSCR).selected_layers
        assert [(i.batch, i.start, i.gh, i.gw) for i in h.method("dscr").last_images] == spans
    assert sel == ((1, 2, 3) if layers is None else (0, 3))
    exp = expected_cache(off.past_key_values, spans, depths, sel, keys_only=keys_only, params=params)
    assert_cache(on.past_key_values, exp, sel)


@pytest.mark.parametrize("method", ["structured", "dense"])
def test_qwen_structured_and_dense_match_reference(qwen, method):
    """The grid form lets the plan pick: forced structured / dense both match the dense float64
    reference; auto picks dense for these tiny grids (cheaper) and records it."""
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6), (6, 4)], [(4, 4), (2, 8)]])
    off = gen(qwen, inputs, 1)
    depths = depth_maps(len(spans), seed=2)
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR(method=method)) as h:
        with h.images(depth_maps=depths):
            on = gen(qwen, inputs, 1)
        assert h.method("dscr").last_algorithms == [method] * len(spans)
    assert_cache(on.past_key_values, expected_cache(off.past_key_values, spans, depths, (1, 2, 3)), (1, 2, 3))
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            gen(qwen, inputs, 1)
        assert h.method("dscr").last_algorithms == ["dense"] * len(spans)


def test_llava_full_strategy_skips_cls():
    model = testing.tiny_llava(strategy="full", num_layers=2)
    inputs, spans = testing.llava_prompt(model, [1, 2])
    assert all(s > 0 and inputs["input_ids"][b, s - 1] == testing.IMAGE_TOKEN for b, s, _, _ in spans)  # CLS first
    off = gen(model, inputs, 1)
    per_token = [torch.rand(16) for _ in spans]  # [N] depths are used as given
    with kvfix.hf.enable(model, kvfix.hf.DSCR(layers=[0, 1])) as h:
        with h.images(depth_maps=per_token):
            on = gen(model, inputs, 1)
    assert_cache(on.past_key_values, expected_cache(off.past_key_values, spans, per_token, (0, 1)), (0, 1))


# --------------------------------------------------------------------------------------------
# generation: greedy, sampling, no refinement while decoding

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_generate_greedy_and_sampling_refine_once(family, request):
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 2])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 4)], [(4, 6), (2, 4)]])
    depths = depth_maps(len(spans), seed=2)
    plain = gen(model, inputs, 6)
    with kvfix.hf.enable(model, kvfix.hf.DSCR(layers=range(4))) as h:
        dscr = h.method("dscr")
        with h.images(depth_maps=depths):
            first = gen(model, inputs, 1)
            greedy = gen(model, inputs, 6)
            greedy2 = gen(model, inputs, 6)
            torch.manual_seed(123)
            sampled = gen(model, inputs, 6, do_sample=True, top_k=20)
            torch.manual_seed(123)
            sampled2 = gen(model, inputs, 6, do_sample=True, top_k=20)
        assert dscr.refine_calls == 5 * len(spans)  # once per image and generate, never while decoding
    T = inputs["input_ids"].shape[1]
    for out in (greedy, sampled):
        assert out.sequences.shape == (2, T + 6)
        assert torch.equal(out.sequences[:, :T], inputs["input_ids"])
        # the image spans after 6 steps are those right after prefill: decoding did not refine again
        for layer in range(4):
            for a, b in zip(image_part(out.past_key_values, spans, layer), image_part(first.past_key_values, spans, layer)):
                assert torch.equal(a, b)
    assert torch.equal(greedy.sequences, greedy2.sequences)
    assert torch.equal(sampled.sequences, sampled2.sequences)
    assert torch.equal(greedy.sequences[:, T], plain.sequences[:, T])  # first token comes from the plain prefill


# --------------------------------------------------------------------------------------------
# off / disabled / passthrough equal plain transformers exactly

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_disabled_and_text_only_equal_plain(family, request):
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [2, 1])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4), (6, 4)]])
    vision = model.get_encoder(modality="image")
    hooks = (len(model._forward_hooks), len(model._forward_pre_hooks), len(vision._forward_hooks))
    plain = gen(model, inputs, 5, output_scores=True)
    h = kvfix.hf.enable(model, kvfix.hf.DSCR())
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # DSCR needs no attention hook
    text_only = {"input_ids": torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}
    with h.suspended():
        text_plain = gen(model, text_only, 4)
    assert torch.equal(gen(model, text_only, 4).sequences, text_plain.sequences)  # no image: nothing to refine
    h.disable()
    assert (len(model._forward_hooks), len(model._forward_pre_hooks), len(vision._forward_hooks)) == hooks
    assert kvfix.hf.get_handle(model) is None
    after = gen(model, inputs, 5, output_scores=True)
    assert torch.equal(after.sequences, plain.sequences)
    for a, b in zip(after.scores, plain.scores):
        assert torch.equal(a, b)
    h.disable()  # idempotent


class Recorder(kvfix.hf.Method):
    """Passes everything through and records what the dispatcher calls."""
    name = "recorder"
    uses_attention = True

    def __init__(self, aux=False):
        self.events, self.attn_calls, self.layer_calls, self.aux = [], 0, 0, aux
        self.shapes = set()

    def on_session_start(self, ctx):
        self.events.append("session")

    def on_prefill_start(self, ctx):
        self.events.append(f"prefill_start:{ctx.pass_name}")
        if self.aux and ctx.pass_name == "main":
            with ctx.handle.auxiliary_pass("diagnostic"):
                ctx.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask,
                          **{k: ctx.inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids",
                                                          "mm_encoder_outputs") if ctx.inputs.get(k) is not None})

    def on_prefill_end(self, ctx):
        self.events.append(f"prefill_end:{ctx.pass_name}:{len(ctx.images)}")

    def on_decode_start(self, ctx):
        self.events.append("decode_start")

    def on_decode_end(self, ctx):
        self.events.append("decode_end")

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        self.attn_calls += 1
        self.shapes.add((ctx.phase, query.shape[2]))
        return call_next(query, key, value, attention_mask, **kwargs)

    def layer_input(self, ctx, layer_idx, hidden_states):
        self.layer_calls += 1
        return None


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_dispatcher_passthrough_equals_plain(family, request):
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 1])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 4)], [(2, 4)]])
    plain = gen(model, inputs, 4, output_scores=True)
    torch.manual_seed(7)
    plain_s = gen(model, inputs, 4, do_sample=True)
    rec = Recorder()
    vision_impl = model.config.vision_config._attn_implementation
    with kvfix.hf.enable(model, rec):
        assert model.config.get_text_config()._attn_implementation == "kvfix_sdpa"
        assert model.config.vision_config._attn_implementation == vision_impl  # vision tower untouched
        out = gen(model, inputs, 4, output_scores=True)
        torch.manual_seed(7)
        out_s = gen(model, inputs, 4, do_sample=True)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert torch.equal(out.sequences, plain.sequences) and torch.equal(out_s.sequences, plain_s.sequences)
    for a, b in zip(out.scores, plain.scores):
        assert torch.equal(a, b)
    assert rec.attn_calls == rec.layer_calls == 2 * 4 * 4  # 2 generates x 4 forwards x 4 layers
    assert rec.shapes == {("prefill", inputs["input_ids"].shape[1]), ("decode", 1)}
    assert rec.events[:6] == ["session", "prefill_start:main", "prefill_end:main:2", "decode_start", "decode_end",
                              "decode_start"]
    assert rec.events.count("session") == 2 and rec.events.count("decode_end") == 6


class ShortGenerate(kvfix.hf.Method):
    """Owns the generate call (as CMAC will): here it only caps max_new_tokens."""
    name = "short"

    def wrap_generate(self, handle, generate, kwargs):
        return generate(**{**kwargs, "max_new_tokens": 2})


def test_stacking_and_auxiliary_pass(llava):
    inputs, spans = testing.llava_prompt(llava, [2, 1])
    depths = depth_maps(len(spans), seed=3)
    with kvfix.hf.enable(llava, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            alone = gen(llava, inputs, 4)
    rec = Recorder(aux=True)
    with kvfix.hf.enable(llava, rec, kvfix.hf.DSCR()) as h:
        out = h.generate(**inputs, depth_maps=depths, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert h.method("dscr").refine_calls == len(spans)  # the auxiliary pass refined nothing
    assert rec.events[:4] == ["session", "prefill_start:main", "prefill_start:diagnostic", "prefill_end:diagnostic:3"]
    assert rec.events.count("session") == 1
    assert torch.equal(out.sequences, alone.sequences)
    for la, lb in zip(out.past_key_values.layers, alone.past_key_values.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    with kvfix.hf.enable(llava, ShortGenerate(), kvfix.hf.DSCR()) as h:
        short = h.generate(**inputs, depth_maps=depths, max_new_tokens=4, do_sample=False)
    assert torch.equal(short, alone.sequences[:, :-2])


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_repeated_items_num_return_sequences(family, request):
    """generate repeats every item (num_return_sequences): per-image inputs follow their item."""
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 2])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4), (2, 4)]])
    d = depth_maps(3, seed=6)
    expanded = [d[0], d[0], d[1], d[2], d[1], d[2]]
    outs = []
    for maps in (d, expanded):
        with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h, h.images(depth_maps=maps):
            torch.manual_seed(11)
            outs.append(gen(model, inputs, 3, do_sample=True, num_return_sequences=2))
            imgs = h.method("dscr").last_images
        assert [(i.batch, i.gh * i.gw) for i in imgs] == [(0, spans[0][2] * spans[0][3]), (1, spans[0][2] * spans[0][3]),
                                                          (2, spans[1][2] * spans[1][3]), (2, spans[2][2] * spans[2][3]),
                                                          (3, spans[1][2] * spans[1][3]), (3, spans[2][2] * spans[2][3])]
        assert len(imgs) == len(expanded) and all(i.depth_map is m for i, m in zip(imgs, expanded))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for la, lb in zip(outs[0].past_key_values.layers, outs[1].past_key_values.layers):
        assert torch.equal(la.keys, lb.keys)


# --------------------------------------------------------------------------------------------
# depth handling, direct forward calls, explicit grids

def test_missing_or_wrong_depth_raises_before_forward(llava):
    inputs, spans = testing.llava_prompt(llava, [2, 1])
    with kvfix.hf.enable(llava, kvfix.hf.DSCR()) as h:
        with pytest.raises(ValueError, match="depth map"):
            gen(llava, inputs, 2)
        with pytest.raises(ValueError, match="2 depth maps were given but the input has 3 images"):
            with h.images(depth_maps=depth_maps(2)):
                gen(llava, inputs, 2)
        with pytest.raises(ValueError, match="per-token depth needs gh"):
            with h.images(depth_maps=[torch.rand(5)] * 3):
                gen(llava, inputs, 2)
        with pytest.raises(ValueError, match="non-finite"):
            with h.images(depth_maps=[torch.full((4, 4), float("nan"))] * 3):
                gen(llava, inputs, 2)
        assert h.method("dscr").refine_calls == 0
        with pytest.warns(UserWarning, match="4 depth maps were given"):
            with h.images(depth_maps=depth_maps(4)):
                gen(llava, inputs, 1)
        with h.images(depth_maps="uniform"):
            uni = gen(llava, inputs, 3)
    with kvfix.hf.enable(llava, kvfix.hf.DSCR(missing_depth="uniform")) as h:
        default_uni = gen(llava, inputs, 3)
        with h.images(depth_maps=[torch.zeros(16)] * 3):
            zeros = gen(llava, inputs, 3)
    for a, b in ((uni, default_uni), (uni, zeros)):
        assert torch.equal(a.sequences, b.sequences)
        for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
            assert torch.equal(la.keys, lb.keys)


def test_qwen_direct_forward_and_explicit_grids(qwen):
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6), (4, 4)], [(6, 4)]])
    depths = depth_maps(len(spans), seed=4)
    with torch.no_grad():
        off = qwen(**inputs)
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths), torch.no_grad():
            on = qwen(**inputs)  # a plain forward call (image_grid_thw in the arguments)
            exp = expected_cache(off.past_key_values, spans, depths, (1, 2, 3))
            assert_cache(on.past_key_values, exp, (1, 2, 3))
            # continue decoding from that cache: no refinement, the image spans stay as they are
            ids = torch.cat([inputs["input_ids"], on.logits[:, -1].argmax(-1, keepdim=True)], 1)
            cont = qwen.generate(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], ids[:, -1:] * 0 + 1], 1),
                                 mm_token_type_ids=(ids == testing.IMAGE_TOKEN).int(), past_key_values=on.past_key_values,
                                 max_new_tokens=3, do_sample=False)
            assert cont.shape == (2, ids.shape[1] + 3)
            for layer in range(4):
                for (b, s, gh, gw) in spans:
                    torch.testing.assert_close(on.past_key_values.layers[layer].keys[b:b + 1, :, s:s + gh * gw],
                                               exp[layer][0][b:b + 1, :, s:s + gh * gw], atol=ATOL, rtol=0)
        assert h.method("dscr").refine_calls == len(spans)
        # handle.generate; grids given explicitly to the handle give the same result
        implicit = h.generate(**inputs, depth_maps=depths, max_new_tokens=3, do_sample=False)
        with h.images(depth_maps=depths, image_grid_thw=inputs["image_grid_thw"]):
            explicit = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(implicit, explicit)
        with pytest.raises(ValueError, match="grids account for"):
            with h.images(depth_maps=depths, image_grid_thw=inputs["image_grid_thw"][:2]):
                qwen.generate(**inputs, max_new_tokens=1)


def test_qwen2_5_vl_builds_and_runs():
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip("Qwen2.5-VL is not in this transformers")
    model = testing.tiny_qwen2_vl(version="2.5")
    inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4), (2, 4)]])
    off = gen(model, inputs, 1)
    depths = depth_maps(len(spans), seed=5)
    with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            on = gen(model, inputs, 1)
            out = gen(model, inputs, 4, do_sample=True)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert_cache(on.past_key_values, expected_cache(off.past_key_values, spans, depths, (1, 2, 3)), (1, 2, 3))


# --------------------------------------------------------------------------------------------
# API errors

def test_api_errors(llava):
    with pytest.raises(ValueError, match="sigma_d"):
        kvfix.hf.DSCR(sigma_d=0)
    with pytest.raises(ValueError, match="missing_depth"):
        kvfix.hf.DSCR(missing_depth="zeros")
    with pytest.raises(ValueError, match="method must be one of"):
        kvfix.hf.DSCR(method="fast")
    with pytest.raises(TypeError, match="layers"):
        kvfix.hf.DSCR(layers=3)
    with pytest.raises(ValueError, match="out of range"):
        kvfix.hf.enable(llava, kvfix.hf.DSCR(layers=[4]))
    assert kvfix.hf.get_handle(llava) is None
    with pytest.raises(TypeError, match="Method"):
        kvfix.hf.enable(llava, "dscr")
    with pytest.raises(ValueError, match="at least one method"):
        kvfix.hf.enable(llava)
    assert kvfix.hf.DSCR(layers=slice(-2, None)).layers == slice(-2, None)
    d = kvfix.hf.DSCR(layers=slice(-2, None))
    with kvfix.hf.enable(llava, d) as h:
        assert d.selected_layers == (2, 3)
        with pytest.raises(ValueError, match="already enabled"):
            kvfix.hf.enable(llava, kvfix.hf.DSCR())
        with pytest.raises(ValueError, match="Qwen2-VL"):
            h.set_images("uniform", image_grid_thw=torch.tensor([[1, 4, 4]]))
    text_model = transformers.LlamaForCausalLM(llava.config.text_config)
    with pytest.raises(TypeError, match="supports"):
        kvfix.hf.enable(text_model, kvfix.hf.DSCR())
