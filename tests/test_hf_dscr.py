"""kvfix.hf.DSCR end to end on tiny random LLaVA / Qwen2-VL / Qwen2.5-VL models (CPU, float32, no download).

Model-level behaviour is checked against an independent split-prefill loop written here (METHODS §1,
"When"): the plain model on the prompt up to an image end with a DynamicCache, that image's span
refined with kvfix.reference.dscr_refine (float64), then the rest of the prompt, then decoding.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix import reference  # noqa: E402
from kvfix.hf import testing  # noqa: E402

# The kvfix run and the reference loop do the same float32 arithmetic in a different order (one
# batched forward vs per-item chunks; the float32 op vs the float64 reference refinement): values of
# size O(1) through 4 layers differ by ~1e-7 here (AVX2); the bound leaves room for other vector
# widths and BLAS orders. Refining after the whole prefill (the old timing) moves them by >= 2e-3.
ATOL = 2e-5


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def gen(model, inputs, n, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, return_dict_in_generate=True, **kw)


def depth_maps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(20, 30), (7, 5), (64, 48), (9, 9), (33, 17)]
    return [torch.rand(*sizes[i % len(sizes)], generator=g) * 10 for i in range(n)]


def token_depth(d, gh, gw, depth_scale=255.0):
    if isinstance(d, str):
        return torch.zeros(gh * gw)
    return d if d.dim() == 1 else kvfix.patch_depth(d, gh, gw, scale=depth_scale)


def text_model_inputs(model, inputs, n):
    """What the text model receives in a plain `generate` of n tokens: the prompt's embeddings
    (images included) and every forward's position ids (they do not depend on the tokens)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["inputs_embeds"].detach().clone(), kwargs.get("position_ids")))

    h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=n, do_sample=False)
    finally:
        h.remove()
    return calls[0][0], [p for _, p in calls]


def rows_of(pos, b, a=None, c=None):
    """Item b's columns [a, c) of position ids [B, T] or [S, B, T] (None stays None)."""
    if pos is None:
        return None
    pos = pos[b:b + 1] if pos.dim() == 2 else pos[:, b:b + 1]
    return pos[..., a:c]


def split_prefill(model, inputs, spans, depths, layers, n, *, keys_only=False, params=None, grid_unit="patch",
                  depth_scale=255.0):
    """The reference loop, item by item (its row of the padded batch, so that its positions and
    padding are those of the batch): for each image end e of the item in order, the plain model
    runs the prompt up to e on a DynamicCache, then that image's span of `layers` is refined in
    the cache with kvfix.reference.dscr_refine (float64; coordinates patch_coords(gh, gw,
    unit=grid_unit), depth maps patch_depth(..., scale=depth_scale)); then the rest of the
    prompt; then n - 1 greedy decoding steps. Returns per item: (first-token logits [V], greedy
    tokens [n], cache)."""
    params = params or {}
    emb, positions = text_model_inputs(model, inputs, n)
    text, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    mask = inputs["attention_mask"]
    T = emb.shape[1]
    out = []
    with torch.no_grad():
        for b in range(emb.shape[0]):
            mine = [(s, s + gh * gw, gh, gw, d) for (bb, s, gh, gw), d in zip(spans, depths) if bb == b]
            cache = transformers.DynamicCache()

            def step(x, pos, m):
                h = text(inputs_embeds=x, position_ids=pos, attention_mask=m, past_key_values=cache, use_cache=True)
                return head(h.last_hidden_state[:, -1])[0]

            a, logits = 0, None
            for c in sorted({e for _, e, _, _, _ in mine} | {T}):
                if c > a:
                    logits = step(emb[b:b + 1, a:c], rows_of(positions[0], b, a, c), mask[b:b + 1, :c])
                    a = c
                for s, e, gh, gw, d in mine:
                    if e != c:
                        continue
                    dep = token_depth(d, gh, gw, depth_scale).double()
                    co = kvfix.patch_coords(gh, gw, unit=grid_unit).double()
                    for layer in layers:
                        k, v = cache.layers[layer].keys, cache.layers[layer].values
                        rk, rv = reference.dscr_refine(k[:, :, s:e].double(), None if keys_only else v[:, :, s:e].double(),
                                                       dep, co, **params)
                        k[:, :, s:e] = rk.to(k.dtype)
                        if not keys_only:
                            v[:, :, s:e] = rv.to(v.dtype)
            first, tokens, m = logits.clone(), [int(logits.argmax())], mask[b:b + 1]
            for i in range(1, n):
                m = torch.cat([m, m.new_ones(1, 1)], dim=1)
                x = embed(torch.tensor([[tokens[-1]]]))
                logits = step(x, rows_of(positions[i], b), m)
                tokens.append(int(logits.argmax()))
            out.append((first, torch.tensor(tokens), cache))
    return out


def check_against_reference(out, ref, inputs, n, *, cache_layers=None):
    """`out` (generate with output_logits) equals the reference loop: first-token logits, greedy
    tokens, and (for the prompt positions of every layer) the cache."""
    T = inputs["input_ids"].shape[1]
    for b, (first, tokens, cache) in enumerate(ref):
        torch.testing.assert_close(out.logits[0][b], first, atol=ATOL, rtol=0)
        assert torch.equal(out.sequences[b, T:T + n], tokens), f"item {b}"
        if cache_layers is not None:
            p = int((inputs["attention_mask"][b] == 0).sum())  # left padding: not compared
            for li in cache_layers:
                for got, want in ((out.past_key_values.layers[li].keys, cache.layers[li].keys),
                                  (out.past_key_values.layers[li].values, cache.layers[li].values)):
                    torch.testing.assert_close(got[b:b + 1, :, p:T], want[:, :, p:T], atol=ATOL, rtol=0)


def image_part(cache, spans, layer):
    return [cache.layers[layer].keys[b, :, s:s + gh * gw].clone() for b, s, gh, gw in spans]


# --------------------------------------------------------------------------------------------
# the timing of METHODS §1: equal to a split prefill, token 1 included

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_first_token_and_greedy_equal_split_prefill(family, request):
    """Batch 2, left padding, two images in one item: the first generated token's logits and the
    greedy continuation equal the split-prefill loop, and differ from the plain model."""
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [2, 1])
    else:  # non-square grids, different per image
        inputs, spans = testing.qwen_prompt(model, [[(4, 6), (6, 4)], [(4, 4)]])
    n = 6
    depths = depth_maps(len(spans))
    plain = gen(model, inputs, 1, output_logits=True)
    with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            out = gen(model, inputs, n, output_logits=True)
        dscr = h.method("dscr")
        assert dscr.selected_layers == (1, 2, 3)  # [L // 4, L) with L = 4
        assert [(i.batch, i.start, i.gh, i.gw) for i in dscr.last_images] == spans
        assert dscr.refine_calls == len(spans) and dscr.kernel_calls == 3 * len(spans)  # prefill only
    ref = split_prefill(model, inputs, spans, depths, (1, 2, 3), n)
    check_against_reference(out, ref, inputs, n, cache_layers=range(4))
    # token 1 reads the refined image: its logits move well beyond the comparison's tolerance (with
    # the default units' local weights less than with the earlier near-global blur: ~1.5e-4 for
    # qwen's single 4 x 4 image, whose random depth puts every token on its own depth level)
    for b in range(2):
        assert (out.logits[0][b] - plain.logits[0][b]).abs().max() > 5 * ATOL


@pytest.mark.parametrize("impl,counts", [("eager", [2, 1]), ("eager", [1]), ("sdpa", [1])])
def test_after_image_queries_alone_equal_split_prefill(impl, counts):
    """The refined attention call covers only the queries after the first image end (their mask
    rows: eager's additive mask, SDPA's padding mask, or, without padding, SDPA's causal flag
    made an explicit mask, since SDPA aligns a shorter query block with the first keys): with
    eager attention, and single items without a padding mask, generate still equals the
    split-prefill loop."""
    model = testing.tiny_llava(attn_implementation=impl)
    inputs, spans = testing.llava_prompt(model, counts)
    n = 3
    depths = depth_maps(len(spans), seed=3)
    with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            out = gen(model, inputs, n, output_logits=True)
    assert model.config.get_text_config()._attn_implementation == impl
    ref = split_prefill(model, inputs, spans, depths, (1, 2, 3), n)
    check_against_reference(out, ref, inputs, n, cache_layers=range(4))


def test_qwen_layers_keys_only_and_params_equal_split_prefill(qwen):
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6), (6, 4)], [(4, 4), (2, 8)]])
    depths = depth_maps(len(spans), seed=1)
    params = dict(sigma_d=0.5, sigma_s=0.7, alpha=0.9, beta=0.4)
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR([0, -1], keys_only=True, **params)) as h:
        with h.images(depth_maps=depths):
            out = gen(qwen, inputs, 4, output_logits=True)
        assert h.method(kvfix.hf.DSCR).selected_layers == (0, 3)
    ref = split_prefill(qwen, inputs, spans, depths, (0, 3), 4, keys_only=True, params=params)
    check_against_reference(out, ref, inputs, 4, cache_layers=range(4))


@pytest.mark.parametrize("method,units", [
    ("dense", {}),                                              # the default units
    ("structured", dict(depth_scale=1.0)),                      # patch units, a depth range of 1
    ("structured", dict(grid_unit="unit_square", depth_scale=1.0)),  # the earlier units
])
def test_qwen_structured_and_dense_equal_split_prefill(qwen, method, units):
    """Forced structured / dense both match the dense float64 reference at the units chosen; auto
    picks dense for these tiny grids (cheaper by the plan's cost model) and records it."""
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6), (6, 4)], [(4, 4), (2, 8)]])
    depths = depth_maps(len(spans), seed=2)
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR(method=method, **units)) as h:
        with h.images(depth_maps=depths):
            out = gen(qwen, inputs, 3, output_logits=True)
        assert h.method("dscr").last_algorithms == [method] * len(spans)
    check_against_reference(out, split_prefill(qwen, inputs, spans, depths, (1, 2, 3), 3, **units), inputs, 3,
                            cache_layers=range(4))
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR(**units)) as h:
        with h.images(depth_maps=depths):
            gen(qwen, inputs, 1)
        assert h.method("dscr").last_algorithms == ["dense"] * len(spans)


def test_qwen_default_depth_maps_force_structured(qwen):
    """At the default units ([0, 255] depth maps) the banded structured variant meets its bound
    (kvfix/dscr_structured.py): forced, it matches the dense float64 reference."""
    inputs, spans = testing.qwen_prompt(qwen, [[(4, 6)]])
    depths = depth_maps(len(spans))
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR(method="structured")) as h:
        with h.images(depth_maps=depths):
            out = gen(qwen, inputs, 3, output_logits=True)
        assert h.method("dscr").last_algorithms == ["structured"] * len(spans)
    check_against_reference(out, split_prefill(qwen, inputs, spans, depths, (1, 2, 3), 3), inputs, 3,
                            cache_layers=range(4))


def test_units_change_the_result_and_the_earlier_units_stay_reachable(llava):
    """DSCR(grid_unit=..., depth_scale=...) reach the op: the earlier units give the earlier
    result (the reference loop at those units), different from the default units'."""
    inputs, spans = testing.llava_prompt(llava, [1], seed=5)
    depths = depth_maps(1, seed=5)
    old = dict(grid_unit="unit_square", depth_scale=1.0)
    outs = {}
    for name, units in (("new", {}), ("old", old)):
        with kvfix.hf.enable(llava, kvfix.hf.DSCR(**units)) as h:
            with h.images(depth_maps=depths):
                outs[name] = gen(llava, inputs, 2, output_logits=True)
    check_against_reference(outs["old"], split_prefill(llava, inputs, spans, depths, (1, 2, 3), 2, **old), inputs, 2,
                            cache_layers=range(4))
    assert (outs["old"].logits[0] - outs["new"].logits[0]).abs().max() > 1e-4


def test_llava_full_strategy_skips_cls():
    model = testing.tiny_llava(strategy="full", num_layers=2)
    inputs, spans = testing.llava_prompt(model, [1, 2])
    assert all(s > 0 and inputs["input_ids"][b, s - 1] == testing.IMAGE_TOKEN for b, s, _, _ in spans)  # CLS first
    per_token = [torch.rand(16) for _ in spans]  # [N] depths are used as given
    with kvfix.hf.enable(model, kvfix.hf.DSCR(layers=[0, 1])) as h:
        with h.images(depth_maps=per_token):
            out = gen(model, inputs, 3, output_logits=True)
    check_against_reference(out, split_prefill(model, inputs, spans, per_token, (0, 1), 3), inputs, 3,
                            cache_layers=range(2))
    with kvfix.hf.enable(model, kvfix.hf.DSCR(layers=[0, 1], depth_scale=1.0)) as h:  # not rescaled
        with h.images(depth_maps=per_token):
            same = gen(model, inputs, 3, output_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, same.logits))


def test_image_at_prompt_end_changes_decoding_only(llava):
    """Nothing follows the image in the prompt: token 1 is the plain model's (computed by the
    image's own last token), the tokens after it read the refined image."""
    inputs, spans = testing.llava_prompt(llava, [1], seed=4, text_len=0)
    assert inputs["input_ids"][0, -1] == testing.IMAGE_TOKEN
    depths = depth_maps(1, seed=4)
    plain = gen(llava, inputs, 1, output_logits=True)
    with kvfix.hf.enable(llava, kvfix.hf.DSCR(layers=range(4))) as h, h.images(depth_maps=depths):
        out = gen(llava, inputs, 5, output_logits=True)
    assert torch.equal(out.logits[0], plain.logits[0])
    check_against_reference(out, split_prefill(llava, inputs, spans, depths, range(4), 5), inputs, 5,
                            cache_layers=range(4))


def test_without_cache_every_forward_refines(llava):
    """use_cache=False: each step is a full forward with the images, refined again in it: the same
    greedy tokens as the split prefill with cached decoding."""
    inputs, spans = testing.llava_prompt(llava, [2, 1])
    depths = depth_maps(len(spans), seed=8)
    with kvfix.hf.enable(llava, kvfix.hf.DSCR()) as h, h.images(depth_maps=depths):
        out = gen(llava, inputs, 4, use_cache=False, output_logits=True)
        assert h.method("dscr").refine_calls == 4 * len(spans)
    check_against_reference(out, split_prefill(llava, inputs, spans, depths, (1, 2, 3), 4), inputs, 4)


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
        assert dscr.kernel_calls == 5 * 4 * len(spans)
    T = inputs["input_ids"].shape[1]
    for out in (greedy, sampled):
        assert out.sequences.shape == (2, T + 6)
        assert torch.equal(out.sequences[:, :T], inputs["input_ids"])
        # the image spans after 6 steps are those right after the prompt: decoding did not refine again
        for layer in range(4):
            for a, b in zip(image_part(out.past_key_values, spans, layer), image_part(first.past_key_values, spans, layer)):
                assert torch.equal(a, b)
    assert torch.equal(greedy.sequences, greedy2.sequences)
    assert torch.equal(sampled.sequences, sampled2.sequences)


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
    assert model.config.get_text_config()._attn_implementation == "kvfix_sdpa"  # DSCR acts in the attention
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


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_stacked_with_transparent_cmac_and_scr_equal_split_prefill(family, request):
    """CMAC without calibration or contrast (gamma 1, imd off: its attention is plain attention,
    run innermost, once per DSCR level) and SCR with lam 1 (no redistribution) leave DSCR's
    result as the split prefill gives it, in either enable order."""
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 1])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4)]])
    depths = depth_maps(len(spans), seed=9)
    ref = split_prefill(model, inputs, spans, depths, (1, 2, 3), 4)
    for methods in ((kvfix.hf.DSCR(), kvfix.hf.CMAC(gamma=1.0, imd=False)),
                    (kvfix.hf.CMAC(gamma=1.0, imd=False), kvfix.hf.SCR(lam=1.0), kvfix.hf.DSCR())):
        with kvfix.hf.enable(model, *methods) as h, h.images(depth_maps=depths):
            out = gen(model, inputs, 4, output_logits=True)
        check_against_reference(out, ref, inputs, 4, cache_layers=range(4))


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_stacked_with_cmac_forked_and_batched_prefill_agree(family, request):
    """CMAC's forked prefill (the distorted rows run after the original rows, on a copy of their
    prefix) and its batched prefill (2B rows at once) give the same generation with DSCR, and
    DSCR changes CMAC's first token."""
    model = request.getfixturevalue(family)
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 1])
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4)]])
    depths = depth_maps(len(spans), seed=10)
    with kvfix.hf.enable(model, kvfix.hf.CMAC()):
        alone = gen(model, inputs, 5, output_logits=True)
    outs = []
    for fork in (True, False):
        with kvfix.hf.enable(model, kvfix.hf.DSCR(), kvfix.hf.CMAC(fork_prefill=fork)) as h, h.images(depth_maps=depths):
            outs.append(gen(model, inputs, 5, output_logits=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0)  # contrast (alpha 3) of ATOL-close logits
    a, b = outs[0].logits[0], alone.logits[0]  # token 1: the plausible sets or the contrasted logits differ
    both = torch.isfinite(a) & torch.isfinite(b)
    assert not torch.equal(torch.isfinite(a), torch.isfinite(b)) or (a[both] - b[both]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# depth handling, direct forward calls, explicit grids

def test_depth_maps_read_back_once_per_prompt(llava):
    """The prompt's depth maps are pooled where they lie and read back together: one `.cpu()` in
    kvfix/hf/dscr.py for three images (on a GPU, one synchronisation per prompt, not per image),
    the per-token depths those of `kvfix.patch_depth` (mixed with a per-token depth and a map
    holding an integer dtype), and a non-finite map still named by its image."""
    from host_reads import CpuCalls

    inputs, spans = testing.llava_prompt(llava, [2, 1])
    gh, gw = spans[0][2], spans[0][3]
    maps = [depth_maps(1)[0], torch.rand(gh * gw, generator=torch.Generator().manual_seed(1)) * 255.0,
            (depth_maps(3, seed=2)[2] * 20).to(torch.int32)]
    dscr = kvfix.hf.DSCR()
    seen = []
    orig = dscr._token_depths
    dscr._token_depths = lambda images, m: seen.append(orig(images, m)) or seen[-1]
    copies = CpuCalls("hf/dscr.py")
    with kvfix.hf.enable(llava, dscr) as h, h.images(depth_maps=maps), copies:
        gen(llava, inputs, 1)
    assert copies.n == 1 and len(seen) == 1
    want = [kvfix.patch_depth(maps[0], gh, gw), maps[1], kvfix.patch_depth(maps[2], gh, gw)]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in seen[0])
    assert all(torch.equal(a, b) for a, b in zip(seen[0], want))
    bad = [maps[0], maps[1], torch.full((4, 4), float("inf"))]
    with kvfix.hf.enable(llava, kvfix.hf.DSCR()) as h, h.images(depth_maps=bad):
        with pytest.raises(ValueError, match="depth map of image 2 is empty or has non-finite values"):
            gen(llava, inputs, 1)


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
    ref = split_prefill(qwen, inputs, spans, depths, (1, 2, 3), 1)
    T = inputs["input_ids"].shape[1]
    with kvfix.hf.enable(qwen, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths), torch.no_grad():
            on = qwen(**inputs)  # a plain forward call (image_grid_thw in the arguments)
            for b, (first, _, cache) in enumerate(ref):
                torch.testing.assert_close(on.logits[b, -1], first, atol=ATOL, rtol=0)
                p = int((inputs["attention_mask"][b] == 0).sum())
                for li in range(4):
                    torch.testing.assert_close(on.past_key_values.layers[li].keys[b:b + 1, :, p:T],
                                               cache.layers[li].keys[:, :, p:T], atol=ATOL, rtol=0)
            refined = [image_part(on.past_key_values, spans, li) for li in range(4)]
            # continue decoding from that cache: no refinement, the image spans stay as they are
            ids = torch.cat([inputs["input_ids"], on.logits[:, -1].argmax(-1, keepdim=True)], 1)
            cont = qwen.generate(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], ids[:, -1:] * 0 + 1], 1),
                                 mm_token_type_ids=(ids == testing.IMAGE_TOKEN).int(), past_key_values=on.past_key_values,
                                 max_new_tokens=3, do_sample=False)
            assert cont.shape == (2, ids.shape[1] + 3)
            for li in range(4):
                for x, y in zip(image_part(on.past_key_values, spans, li), refined[li]):
                    assert torch.equal(x, y)
        assert h.method("dscr").refine_calls == len(spans)
        # handle.generate; grids given explicitly to the handle give the same result
        implicit = h.generate(**inputs, depth_maps=depths, max_new_tokens=3, do_sample=False)
        with h.images(depth_maps=depths, image_grid_thw=inputs["image_grid_thw"]):
            explicit = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(implicit, explicit)
        with pytest.raises(ValueError, match="grids account for"):
            with h.images(depth_maps=depths, image_grid_thw=inputs["image_grid_thw"][:2]):
                qwen.generate(**inputs, max_new_tokens=1)


def test_qwen2_5_vl_equals_split_prefill():
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip("Qwen2.5-VL is not in this transformers")
    model = testing.tiny_qwen2_vl(version="2.5")
    inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(4, 4), (2, 4)]])
    depths = depth_maps(len(spans), seed=5)
    with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h:
        with h.images(depth_maps=depths):
            on = gen(model, inputs, 4, output_logits=True)
            out = gen(model, inputs, 4, do_sample=True)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    check_against_reference(on, split_prefill(model, inputs, spans, depths, (1, 2, 3), 4), inputs, 4,
                            cache_layers=range(4))


# --------------------------------------------------------------------------------------------
# API errors

def test_api_errors(llava):
    with pytest.raises(ValueError, match="sigma_d"):
        kvfix.hf.DSCR(sigma_d=0)
    with pytest.raises(ValueError, match="missing_depth"):
        kvfix.hf.DSCR(missing_depth="zeros")
    with pytest.raises(ValueError, match="method must be one of"):
        kvfix.hf.DSCR(method="fast")
    with pytest.raises(ValueError, match="unit must be one of"):
        kvfix.hf.DSCR(grid_unit="pixel")
    with pytest.raises(ValueError, match="depth_scale"):
        kvfix.hf.DSCR(depth_scale=0)
    assert "grid_unit='patch', depth_scale=255.0" in repr(kvfix.hf.DSCR())
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
