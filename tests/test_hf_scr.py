"""kvfix.hf.SCR end to end on tiny random LLaVA / Qwen2-VL models (CPU, float32, no download).

The kernel-backed method (sdpa attention, attention hook, scores from `kvfix.scr_scores`, an
auxiliary diagnostic pass stopped early) is compared with an independent two-pass run written
here in plain PyTorch: scores from the eager model's `output_attentions`, the redistribution of
METHODS §3 written out, applied by explicit forward pre-hooks on the decoder layers during the
prefill, then plain greedy `generate`. Tokens must be equal and logits close.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402

N_NEW = 6


@pytest.fixture(scope="module")
def llava():
    return testing.tiny_llava(image_size=48)  # 6 x 6 patch grid: 16 candidates, top_k matters


def prompt(model, family, seed=0):
    """Batch of 2, left padded; item 1 holds two images; Qwen2-VL grids are non-square."""
    if family == "llava":
        return testing.llava_prompt(model, [1, 2], seed=seed)
    return testing.qwen_prompt(model, [[(8, 12)], [(10, 8), (8, 8)]], seed=seed)  # merged 4x6, 5x4, 4x4


def gen(model, inputs, n=N_NEW):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)


def assert_same_generation(a, b, atol=2e-5):
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------
# the independent reference

def ref_scores(model, inputs, spans, diag_layers, past=None):
    """Per image [N] float64: attention mass from the text tokens after the image (eager
    attention probabilities, output_attentions), summed over queries, mean over heads and layers.
    With `past` (a cache, copied here), `inputs` are the new tokens and `spans` index them."""
    base = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    P = 0 if past is None else past.get_seq_length()
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True, use_cache=past is not None,
                        past_key_values=copy.deepcopy(past)).attentions
    finally:
        model.set_attn_implementation(base)
    ids, pad = inputs["input_ids"], inputs["attention_mask"]
    out = []
    for b, s, gh, gw in spans:
        e = s + gh * gw
        rows = [p for p in range(e, ids.shape[1]) if ids[b, p] != testing.IMAGE_TOKEN and pad[b, P + p]]
        if not rows:
            out.append(None)
            continue
        per_layer = [att[layer][b, :, rows, P + s:P + e].double().sum(1).mean(0) for layer in diag_layers]
        out.append(torch.stack(per_layer).mean(0))
    return out


def ref_redistribute(h, scores, gh, gw, top_k, lam, exclude_border):
    """METHODS §3 written out: h [N, C] -> new [N, C] (float64 arithmetic)."""
    N = gh * gw
    cand = [i for i in range(N) if not exclude_border or (0 < i // gw < gh - 1 and 0 < i % gw < gw - 1)]
    cand.sort(key=lambda i: (-float(scores[i]), i))
    sources = set(cand[:top_k])
    h64 = h.double()
    out = h64.clone()
    for s in sources:
        out[s] = h64[s] / lam
        r, c = divmod(s, gw)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr or dc) and 0 <= rr < gh and 0 <= cc < gw and rr * gw + cc not in sources:
                    out[rr * gw + cc] += (lam - 1) * h64[s]
    return out.to(h.dtype)


def ref_generate(model, inputs, spans, *, layers, diag_layers=(0, 1), top_k=32, lam=1.1, exclude_border=True,
                 n=N_NEW, scores=None):
    """Two-pass SCR without kvfix.hf: eager scores (unless given), then layer pre-hooks on the prefill."""
    if scores is None:
        scores = ref_scores(model, inputs, spans, diag_layers)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:  # decoding: untouched
            return None
        hidden = hidden.clone()
        for (b, s, gh, gw), sc in zip(spans, scores):
            if sc is not None:
                e = s + gh * gw
                hidden[b, s:e] = ref_redistribute(hidden[b, s:e], sc, gh, gw, top_k, lam, exclude_border)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    decoder = model.get_decoder().layers
    hooks = [decoder[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        return gen(model, inputs, n), scores
    finally:
        for h in hooks:
            h.remove()


def run(model, inputs, *methods, n=N_NEW):
    with kvfix.hf.enable(model, *methods):
        return gen(model, inputs, n)


def check_scores(scr, spans, want):
    got = [(img.batch, img.start, img.gh, img.gw) for img, _ in scr.last_scores]
    assert got == [sp for sp, w in zip(spans, want) if w is not None]
    for (_, s), w in zip(scr.last_scores, [w for w in want if w is not None]):
        assert s.dtype == torch.float32 and s.shape == w.shape
        torch.testing.assert_close(s.double(), w, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# model-level equality with the reference

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_equals_reference_two_pass_run(family, request):
    """Batch 2 with left padding, two images in item 1, Qwen2-VL grids non-square (4x6, 5x4)."""
    model = request.getfixturevalue(family)
    inputs, spans = prompt(model, family)
    assert inputs["attention_mask"][0, 0] == 0  # item 0 is padded
    scr = kvfix.hf.SCR(top_k=3, lam=1.5)
    out = run(model, inputs, scr)
    want, scores = ref_generate(model, inputs, spans, layers=(1, 2, 3), top_k=3, lam=1.5)
    assert scr.selected_layers == (1, 2, 3) and scr.selected_diagnostic_layers == (0, 1)
    assert scr.diagnostic_passes == 1 and scr.redistribute_calls == 3 * len(spans)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)
    plain = gen(model, inputs)
    assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-3  # it did change the prefill


def test_defaults_and_options(llava):
    inputs, spans = prompt(llava, "llava", seed=1)
    scr = kvfix.hf.SCR()
    out = run(llava, inputs, scr)
    want, scores = ref_generate(llava, inputs, spans, layers=(1, 2, 3))
    assert (scr.top_k, scr.lam, scr.exclude_border) == (32, 1.1, True)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)

    scr = kvfix.hf.SCR(layers=[0, -1], diagnostic_layers=range(3), top_k=5, lam=0.7, exclude_border=False)
    out = run(llava, inputs, scr)
    want, scores = ref_generate(llava, inputs, spans, layers=(0, 3), diag_layers=(0, 1, 2), top_k=5, lam=0.7,
                                exclude_border=False)
    assert scr.selected_layers == (0, 3) and scr.selected_diagnostic_layers == (0, 1, 2)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)


def test_qwen2_5_vl_single_image_no_padding():
    """Qwen2.5-VL, batch 1 without padding: SDPA hands no mask (is_causal path), so the scores
    use the causal mask of the chosen queries."""
    model = testing.tiny_qwen2_vl(version="2.5")
    inputs, spans = testing.qwen_prompt(model, [[(6, 10)]], seed=3)  # merged 3x5
    scr = kvfix.hf.SCR(top_k=2, lam=2.0)
    out = run(model, inputs, scr)
    want, scores = ref_generate(model, inputs, spans, layers=(1, 2, 3), top_k=2, lam=2.0)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)


def test_eager_base_attention():
    """An eager text model hands an additive float mask: same result as the reference."""
    model = testing.tiny_llava(image_size=40, attn_implementation="eager")  # 5x5 grid
    inputs, spans = testing.llava_prompt(model, [2, 1], seed=2)
    scr = kvfix.hf.SCR(top_k=4, lam=1.3)
    with kvfix.hf.enable(model, scr):
        assert model.config.get_text_config()._attn_implementation == "kvfix_eager"
        out = gen(model, inputs)
    want, scores = ref_generate(model, inputs, spans, layers=(1, 2, 3), top_k=4, lam=1.3)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)


def test_uses_sdpa_and_no_output_attentions(qwen):
    """The diagnostic pass runs the model's own attention (SDPA here), never asks for attentions."""
    inputs, _ = prompt(qwen, "qwen")
    seen = []
    text = qwen.get_decoder()
    h = text.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_attentions")), with_kwargs=True)
    try:
        with kvfix.hf.enable(qwen, kvfix.hf.SCR()):
            assert qwen.config.get_text_config()._attn_implementation == "kvfix_sdpa"
            gen(qwen, inputs, 2)
    finally:
        h.remove()
    assert len(seen) == 3 and not any(seen)  # diagnostic pass, prefill, one decode step


# --------------------------------------------------------------------------------------------
# the diagnostic pass

def test_diagnostic_pass_stops_early_and_keeps_no_cache(qwen):
    inputs, _ = prompt(qwen, "qwen")
    calls = [0] * 4
    decoder = qwen.get_decoder().layers
    hooks = [layer.register_forward_pre_hook((lambda i: lambda m, a: calls.__setitem__(i, calls[i] + 1))(i))
             for i, layer in enumerate(decoder)]
    lm_head_calls = []
    hooks.append(qwen.lm_head.register_forward_pre_hook(lambda m, a: lm_head_calls.append(a[0].shape[1])))
    scr = kvfix.hf.SCR(diagnostic_layers=[1])
    try:
        with kvfix.hf.enable(qwen, scr) as handle:
            out = gen(qwen, inputs, 4)
            assert handle._ctx_stack == []  # the stopped forward left no context behind
    finally:
        for h in hooks:
            h.remove()
    # layers 0 and 1: diagnostic pass + prefill + 3 decode steps; layers 2, 3 never in the diagnostic
    assert calls == [5, 5, 4, 4]
    # the diagnostic pass ends normally: the LM head on the one position generate asks for
    assert lm_head_calls == [1] * 5 and scr.diagnostic_passes == 1
    T = inputs["input_ids"].shape[1]
    assert out.past_key_values.get_seq_length() == T + 3
    for layer in out.past_key_values.layers:
        assert layer.keys.shape[2] == T + 3


def test_prefill_reads_nothing_back_per_image(qwen):
    """SCR's own code issues no device-to-host read (aten._local_scalar_dense: .item(), bool(t),
    int(t), .tolist()) and no data-dependent-shape op (nonzero): each would synchronise a GPU
    model once per image. Its query positions come from `ctx.host_text`, which the dispatcher
    reads with the image positions (one copy per forward, `.cpu()` in kvfix/hf/images.py: one for
    the prompt, the diagnostic pass on the same tokens reusing it) and which is checked here
    against the tokens and padding mask of the prompt."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from host_reads import CpuCalls

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.item.default)

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads:  # the innermost frame of kvfix or transformers that issued it
                frames = [f.filename for f in traceback.extract_stack()
                          if f"{os.sep}kvfix{os.sep}" in f.filename or f"{os.sep}transformers{os.sep}" in f.filename]
                self.where.append(frames[-1] if frames else "?")
            return func(*args, **(kwargs or {}))

    class Text(kvfix.hf.Method):
        name = "text"

        def __init__(self):
            self.seen = []

        def on_prefill_start(self, ctx):
            self.seen.append((ctx.pass_name, ctx.host_text))

    inputs, _ = prompt(qwen, "qwen")  # 3 images, left padding
    scr, text = kvfix.hf.SCR(), Text()
    reads_seen, copies = Reads(), CpuCalls("hf/images.py")
    with kvfix.hf.enable(qwen, scr, text), reads_seen, copies:
        gen(qwen, inputs, 1)
    assert copies.n == 1
    assert scr.diagnostic_passes == 1 and scr.redistribute_calls == 3 * len(scr.selected_layers)
    assert reads_seen.where and not [w for w in reads_seen.where if w.endswith(os.path.join("hf", "scr.py"))]
    want = (inputs["input_ids"] != testing.IMAGE_TOKEN) & inputs["attention_mask"].bool()
    assert [p for p, _ in text.seen] == ["scr_diagnostic", "main"]
    for _, host in text.seen:
        assert host.device.type == "cpu" and torch.equal(host, want)


def test_image_without_text_after_it_is_left_unchanged(llava):
    """Item 0's image is the last thing in its prompt: no query, no redistribution for it."""
    inputs, spans = testing.llava_prompt(llava, [1], seed=4, text_len=0)
    assert inputs["input_ids"][0, -1] == testing.IMAGE_TOKEN
    scr = kvfix.hf.SCR(top_k=3)
    out = run(llava, inputs, scr)
    assert scr.last_scores == [] and scr.redistribute_calls == 0 and scr.diagnostic_passes == 0
    assert_same_generation(out, gen(llava, inputs), atol=0)


# --------------------------------------------------------------------------------------------
# stacking, disabling, sessions

def test_stacks_with_dscr_and_kvsmooth(llava):
    inputs, spans = prompt(llava, "llava", seed=5)
    scr = kvfix.hf.SCR(top_k=3, lam=1.5)
    dscr, ks = kvfix.hf.DSCR(missing_depth="uniform"), kvfix.hf.KVSmooth(layers=range(4))
    out = run(llava, inputs, scr, dscr, ks)
    assert dscr.refine_calls == len(spans) and ks.steps == (N_NEW - 1) * 4
    scores = ref_scores(llava, inputs, spans, (0, 1))
    with kvfix.hf.enable(llava, kvfix.hf.DSCR(missing_depth="uniform"), kvfix.hf.KVSmooth(layers=range(4))):
        want, _ = ref_generate(llava, inputs, spans, layers=(1, 2, 3), top_k=3, lam=1.5, scores=scores)
    check_scores(scr, spans, scores)
    assert_same_generation(out, want)
    # KVSmooth first in the chain, SCR innermost: same generation
    scr2 = kvfix.hf.SCR(top_k=3, lam=1.5)
    out2 = run(llava, inputs, kvfix.hf.KVSmooth(layers=range(4)), kvfix.hf.DSCR(missing_depth="uniform"), scr2)
    assert_same_generation(out2, want)


def test_disabled_handle_and_lam_one_equal_plain(llava, qwen):
    for model, family in ((llava, "llava"), (qwen, "qwen")):
        inputs, _ = prompt(model, family, seed=6)
        plain = gen(model, inputs)
        handle = kvfix.hf.enable(model, kvfix.hf.SCR(top_k=3, lam=2.0))
        changed = gen(model, inputs)
        handle.disable()
        assert_same_generation(gen(model, inputs), plain, atol=0)
        assert (changed.logits[0] - plain.logits[0]).abs().max() > 1e-3
        same = run(model, inputs, kvfix.hf.SCR(lam=1.0))  # lam = 1: sources and neighbours unchanged
        assert_same_generation(same, plain, atol=1e-6)


def test_repeated_generations_and_plain_forward(qwen):
    inputs, _ = prompt(qwen, "qwen", seed=7)
    scr = kvfix.hf.SCR(top_k=3, lam=1.5)
    with kvfix.hf.enable(qwen, scr):
        first = gen(qwen, inputs)
        other, _ = testing.qwen_prompt(qwen, [[(4, 4)]], seed=8)
        gen(qwen, other, 2)
        second = gen(qwen, inputs)
        assert scr.diagnostic_passes == 3
        with torch.no_grad():  # a plain forward with images (no generate) runs both passes as well
            logits = qwen(**inputs).logits
    assert_same_generation(first, second, atol=0)
    torch.testing.assert_close(logits[:, -1], first.logits[0], rtol=0, atol=1e-5)


def test_items_repeated_by_generate(qwen):
    """num_beams / num_return_sequences repeat every item before the prefill: each copy gets
    the scores of its original item."""
    inputs, spans = prompt(qwen, "qwen", seed=10)
    scr = kvfix.hf.SCR(top_k=3)
    with kvfix.hf.enable(qwen, scr):
        gen(qwen, inputs, 2)
        single = [s for _, s in scr.last_scores]
        qwen.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    got = [(img.batch, img.gh, img.gw) for img, _ in scr.last_scores]
    assert got == [(0, 4, 6), (1, 4, 6), (2, 5, 4), (2, 4, 4), (3, 5, 4), (3, 4, 4)]
    for (_, s), i in zip(scr.last_scores, [0, 0, 1, 2, 1, 2]):
        torch.testing.assert_close(s, single[i], rtol=0, atol=1e-6)


def test_second_turn_with_a_new_image(llava):
    """generate continues a cache (turn 1) with new text and one new image per item: the
    diagnostic pass sees the cached prefix (copied, the cache is not written by it) and the new
    tokens; the redistribution hits the new image only."""
    inputs, _ = prompt(llava, "llava", seed=9)
    with kvfix.hf.enable(llava, kvfix.hf.SCR(top_k=3, lam=1.5)):
        turn1 = gen(llava, inputs, 3)
    cache = turn1.past_key_values
    P, T1 = cache.get_seq_length(), inputs["input_ids"].shape[1]
    g = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
    new = torch.cat([torch.randint(3, 90, (2, 2)), torch.full((2, g * g), testing.IMAGE_TOKEN),
                     torch.randint(3, 90, (2, 4))], 1)
    ids = torch.cat([turn1.sequences, new], 1)
    turn2 = {"input_ids": ids, "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, T1:])], 1),
             "pixel_values": torch.randn(2, 3, 48, 48)}
    spans = [(b, 3, g, g) for b in range(2)]  # in the uncached tokens: last token of turn 1, 2 text, image
    scr = kvfix.hf.SCR(top_k=3, lam=1.5)
    with kvfix.hf.enable(llava, scr):
        out = llava.generate(**turn2, past_key_values=copy.deepcopy(cache), max_new_tokens=N_NEW, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    assert [(img.batch, img.start) for img, _ in scr.last_scores] == [(0, P + 3), (1, P + 3)]
    scores = ref_scores(llava, {"input_ids": ids[:, P:], "attention_mask": turn2["attention_mask"],
                                "pixel_values": turn2["pixel_values"]}, spans, (0, 1), past=cache)
    check_scores(scr, [(b, P + s, gh, gw) for b, s, gh, gw in spans], scores)
    want, _ = ref_generate(llava, {**turn2, "past_key_values": copy.deepcopy(cache)}, spans, layers=(1, 2, 3),
                           top_k=3, lam=1.5, scores=scores)
    assert_same_generation(out, want)


# --------------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize("kwargs, exc, match", [
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": 2.0}, TypeError, "top_k"),
    ({"top_k": True}, TypeError, "top_k"),
    ({"lam": 0.0}, ValueError, "lam"),
    ({"lam": float("nan")}, ValueError, "lam"),
    ({"lam": "1.1"}, TypeError, "lam"),
    ({"exclude_border": 1}, TypeError, "exclude_border"),
    ({"layers": 3}, TypeError, "layers"),
    ({"diagnostic_layers": ["0"]}, TypeError, "layers must contain ints"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kvfix.hf.SCR(**kwargs)


def test_bad_layers_at_enable(llava):
    for kw, match in (({"layers": [4]}, "out of range"), ({"diagnostic_layers": [-5]}, "out of range"),
                      ({"layers": []}, "selects no layer"), ({"diagnostic_layers": slice(4, None)},
                                                             "no diagnostic layer")):
        with pytest.raises(ValueError, match=match):
            kvfix.hf.enable(llava, kvfix.hf.SCR(**kw))
        assert kvfix.hf.get_handle(llava) is None
