"""kvfix.hf.KVSmooth end to end on tiny random LLaVA / Qwen2-VL models (CPU, float32, no download).

The kernel-backed method is compared step by step with `RefKVSmooth`, the same method written in
plain PyTorch on top of `kvfix.reference` (float64 entropy): same coefficients at every step and
layer, same smoothed cache positions, same tokens.
"""
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix import reference as R  # noqa: E402
from kvfix.hf import testing  # noqa: E402

NAN = float("nan")


def gen(model, inputs, n, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, return_dict_in_generate=True, **kw)


def prompt(model, family):
    """Batch of 2, left padded, different images per item."""
    if family == "llava":
        return testing.llava_prompt(model, [1, 2])[0]
    return testing.qwen_prompt(model, [[(4, 6)], [(4, 4), (2, 4)]])[0]


class RefKVSmooth(kvfix.hf.Method):
    """KVSmooth in plain PyTorch, driven by kvfix.reference: per decode step and layer, after the
    model's attention, `reference.kvsmooth_step` (float64 entropy) on the layer's cache, written
    back in place. Every coefficient it smooths with is checked against the paper's rule written
    out here: lam = clamp(clamp(k / M, lam_ref - band, lam_ref + band), 0, 1), k = the number of
    queued values (z included, empty slots not) that are <= z, M = queue_size."""
    name = "ref_kvsmooth"
    uses_attention = True

    def __init__(self, layers, lam_ref=0.9, band=0.2, queue_size=15, use_mask=True):
        self.layers, self.lam_ref, self.band, self.M = set(layers), lam_ref, band, queue_size
        self.use_mask = use_mask
        self.queues, self.history = {}, []

    def on_session_start(self, ctx):
        self.queues, self.history = {}, []

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        out = call_next(query, key, value, attention_mask, **kwargs)
        if ctx is None or ctx.phase != "decode" or layer_idx not in self.layers:
            return out
        n = ctx.past_len + 1
        layer = ctx.cache.layers[layer_idx]
        k, v = layer.keys[:, :, :n], layer.values[:, :, :n]
        queue = self.queues.get(layer_idx)
        if queue is None:
            queue = torch.full((query.shape[0], self.M), NAN)
        mask = None if (attention_mask is None or not self.use_mask) else attention_mask[..., :n]
        lam, k2, v2, queue = R.kvsmooth_step(query, k, v, queue, scale=module.scaling, mask=mask,
                                             lam_ref=self.lam_ref, band=self.band)
        for b, row in enumerate(queue.tolist()):  # lam == 0: position n - 2 is padding, not smoothed
            if lam[b].item() != 0.0:
                z = row[-1]
                rank = sum(1 for x in row if not math.isnan(x) and x <= z) / self.M
                want = min(max(min(max(rank, self.lam_ref - self.band), self.lam_ref + self.band), 0.0), 1.0)
                assert lam[b].item() == pytest.approx(want, abs=1e-6), (layer_idx, b, row)
        k.copy_(k2)
        v.copy_(v2)
        self.queues[layer_idx] = queue
        self.history.append((ctx.past_len, layer_idx, lam))
        return out


class LastPositions(kvfix.hf.Method):
    """Enabled after the smoother: at the end of every decoding forward (after the smoother's own
    end of forward), records the newest cache position (K and V) of every layer."""
    name = "last_positions"

    def __init__(self):
        self.rows = []

    def on_session_start(self, ctx):
        self.rows = []

    def on_decode_end(self, ctx):
        n = ctx.past_len + 1
        for layer_idx, layer in enumerate(ctx.cache.layers):
            self.rows.append((ctx.past_len, layer_idx, layer.keys[:, :, n - 1].clone(), layer.values[:, :, n - 1].clone()))


def run(model, inputs, n, *methods):
    with kvfix.hf.enable(model, *methods):
        return gen(model, inputs, n)


# --------------------------------------------------------------------------------------------
# step by step against the reference

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_greedy_30_tokens_step_by_step_equals_reference(family, request):
    model = request.getfixturevalue(family)
    inputs = prompt(model, family)
    layers = range(4)  # every layer of the tiny model (the default [3, L) is tested below)
    rec_k, rec_r = LastPositions(), LastPositions()
    ks = kvfix.hf.KVSmooth(layers=layers, record_lam=True)
    ref = RefKVSmooth(layers)
    with kvfix.hf.enable(model, ks, rec_k):
        out = gen(model, inputs, 30)
        assert sorted(ks.queues()) == [0, 1, 2, 3]
    want = run(model, inputs, 30, ref, rec_r)
    plain = gen(model, inputs, 30)

    assert torch.equal(out.sequences, want.sequences)
    assert ks.resolved_lam_ref == 0.9 and ks.steps == 29 * 4  # 29 decode forwards x 4 layers
    assert len(ks.lam_history) == len(ref.history) == 29 * 4
    for (p1, l1, a), (p2, l2, b) in zip(ks.lam_history, ref.history):
        assert (p1, l1) == (p2, l2)
        assert torch.equal(a, b), f"lam at past_len {p1}, layer {l1}: {a} vs {b}"
    # the smoothed newest position of every step and layer
    assert len(rec_k.rows) == len(rec_r.rows) == 29 * 4
    for (p1, l1, k1, v1), (p2, l2, k2, v2) in zip(rec_k.rows, rec_r.rows):
        assert (p1, l1) == (p2, l2)
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-6)
    for la, lb in zip(out.past_key_values.layers, want.past_key_values.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(la.values, lb.values, rtol=0, atol=1e-6)
    for layer, q in ks.queues().items():  # every step's z, as the reference computed it in float64
        torch.testing.assert_close(q, ref.queues[layer], rtol=0, atol=1e-5, equal_nan=True)
    # it did smooth: coefficients in the band, the cache differs from plain decoding
    lams = torch.stack([lam for _, _, lam in ks.lam_history])
    assert ((lams >= 0.7 - 1e-6) & (lams <= 1.0)).all()
    assert not torch.equal(out.past_key_values.layers[0].keys, plain.past_key_values.layers[0].keys)
    # prefill positions are never smoothed
    T0 = inputs["input_ids"].shape[1]
    for la, lp in zip(out.past_key_values.layers, plain.past_key_values.layers):
        assert torch.equal(la.keys[:, :, :T0], lp.keys[:, :, :T0])


def test_per_sequence_state_with_left_padding(llava):
    """Queues are per sequence and padding takes no part in the entropy: the queues (the z of every
    step) match the reference with the padding mask; against a reference that ignores the mask,
    the unpadded item's queue is the same (batch rows are independent) and the padded item's is not."""
    inputs = prompt(llava, "llava")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()  # item 0 is padded
    ks = kvfix.hf.KVSmooth(layers=[1, 3], queue_size=8)
    ref, no_mask = RefKVSmooth([1, 3], queue_size=8), RefKVSmooth([1, 3], queue_size=8, use_mask=False)
    with kvfix.hf.enable(llava, ks):
        gen(llava, inputs, 7)
        queues = ks.queues()
    run(llava, inputs, 7, ref)
    run(llava, inputs, 7, no_mask)
    assert sorted(queues) == [1, 3]
    for layer in (1, 3):
        q = queues[layer]
        assert q.shape == (2, 8) and q.dtype == torch.float32
        assert torch.isnan(q[:, :2]).all() and torch.isfinite(q[:, 2:]).all()  # 6 decode steps so far
        torch.testing.assert_close(q, ref.queues[layer], rtol=0, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(q[1], no_mask.queues[layer][1], rtol=0, atol=1e-5, equal_nan=True)
        assert (q[0, 2:] - no_mask.queues[layer][0, 2:]).abs().min() > 1e-3


def test_default_layers_and_presets(llava, qwen):
    for model in (llava, qwen):
        ks = kvfix.hf.KVSmooth()
        with kvfix.hf.enable(model, ks):
            assert ks.selected_layers == (3,)  # [3, L), L = 4
            assert ks.resolved_lam_ref == 0.9  # LLaVA-1.5's value for both families
            assert model.config.get_text_config()._attn_implementation == "kvfix_sdpa"  # SDPA underneath
    for preset, value in kvfix.hf.KVSMOOTH_PRESETS.items():
        ks = kvfix.hf.KVSmooth(preset=preset)
        with kvfix.hf.enable(llava, ks):
            assert ks.resolved_lam_ref == value
    ks = kvfix.hf.KVSmooth(lam_ref=0.3, band=0.1, queue_size=4, layers=slice(-2, None), record_lam=True)
    inputs = prompt(llava, "llava")
    ref = RefKVSmooth((2, 3), lam_ref=0.3, band=0.1, queue_size=4)
    out = run(llava, inputs, 8, ks)
    want = run(llava, inputs, 8, ref)
    assert ks.selected_layers == (2, 3)
    assert torch.equal(out.sequences, want.sequences)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(ks.lam_history, ref.history))
    lams = torch.stack([lam for _, _, lam in ks.lam_history])
    assert ((lams >= 0.2 - 1e-6) & (lams <= 0.4 + 1e-6)).all()


def test_state_resets_between_generate_calls(qwen):
    inputs = prompt(qwen, "qwen")
    ks = kvfix.hf.KVSmooth(layers=range(4), record_lam=True)
    with kvfix.hf.enable(qwen, ks):
        first = gen(qwen, inputs, 8)
        h1 = [lam.clone() for _, _, lam in ks.lam_history]
        other = testing.qwen_prompt(qwen, [[(2, 2)]])[0]
        gen(qwen, other, 5)  # a different batch size and prompt in between
        second = gen(qwen, inputs, 8)
        h2 = [lam.clone() for _, _, lam in ks.lam_history]
    assert torch.equal(first.sequences, second.sequences)
    assert len(h1) == len(h2) == 7 * 4 and all(torch.equal(a, b) for a, b in zip(h1, h2))
    for la, lb in zip(first.past_key_values.layers, second.past_key_values.layers):
        assert torch.equal(la.keys, lb.keys)


def test_decoding_from_a_prefilled_cache(llava):
    """generate on a cache filled elsewhere: each new cache object starts with fresh queues, even
    inside one session of the dispatcher."""
    inputs = prompt(llava, "llava")
    with torch.no_grad():
        pre = llava(**inputs)
    ids = torch.cat([inputs["input_ids"], pre.logits[:, -1].argmax(-1, keepdim=True)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    ks = kvfix.hf.KVSmooth(layers=range(4), record_lam=True)
    outs, hists = [], []
    with kvfix.hf.enable(llava, ks):
        for _ in range(2):
            before = len(ks.lam_history)
            outs.append(llava.generate(input_ids=ids, attention_mask=mask, past_key_values=copy.deepcopy(pre.past_key_values),
                                       max_new_tokens=5, do_sample=False))
            hists.append([lam for _, _, lam in ks.lam_history[before:]])
    assert torch.equal(outs[0], outs[1])
    assert len(hists[0]) == len(hists[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*hists))


def test_stacks_with_dscr(llava):
    inputs = prompt(llava, "llava")
    ks = kvfix.hf.KVSmooth(layers=range(4), record_lam=True)
    dscr = kvfix.hf.DSCR(missing_depth="uniform")
    out = run(llava, inputs, 10, dscr, ks)
    assert dscr.refine_calls == 3  # one per image, at prefill
    ref_dscr = kvfix.hf.DSCR(missing_depth="uniform")
    ref = RefKVSmooth(range(4))
    want = run(llava, inputs, 10, ref_dscr, ref)
    only_dscr = run(llava, inputs, 10, kvfix.hf.DSCR(missing_depth="uniform"))
    assert torch.equal(out.sequences, want.sequences)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(ks.lam_history, ref.history))
    for la, lb, lc in zip(out.past_key_values.layers, want.past_key_values.layers, only_dscr.past_key_values.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-6)
        T0 = inputs["input_ids"].shape[1]
        assert torch.equal(la.keys[:, :, :T0], lc.keys[:, :, :T0])  # the DSCR-refined prefill is untouched


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_no_host_sync_in_decode_steps(llava, base):
    """During decoding forwards, KVSmooth issues no aten._local_scalar_dense (.item(), bool(t),
    .tolist(): a device-to-host sync on CUDA) and no data-dependent-shape op (nonzero); and no op
    it does not need (SDPA's bool mask as it is; eager's additive mask made -inf once per forward,
    not once per layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.on, self.hits, self.ops = False, [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on:
                self.ops += 1
                if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                            torch.ops.aten.item.default):
                    self.hits.append(str(func))
            return func(*args, **(kwargs or {}))

    class Window(kvfix.hf.Method):  # counts only inside decoding forwards (enabled last: its end runs last)
        name = "window"

        def __init__(self, counter):
            self.c = counter

        def on_decode_start(self, ctx):
            self.c.on = True

        def on_decode_end(self, ctx):
            self.c.on = False

    class Through(kvfix.hf.Method):  # the same attention entry as KVSmooth's, doing nothing
        name = "through"
        uses_attention = True

    inputs = prompt(llava, "llava")
    counts = {}
    was = llava.config.get_text_config()._attn_implementation
    llava.set_attn_implementation(base)
    try:
        for label, methods in (("plain", (Through(),)), ("kvsmooth", (kvfix.hf.KVSmooth(layers=range(4)),))):
            c = Count()
            with kvfix.hf.enable(llava, *methods, Window(c)), c:
                gen(llava, inputs, 4)
            counts[label] = (c.hits, c.ops)
    finally:
        llava.set_attn_implementation(was)
    # transformers' own sdpa_mask reads one value per forward; KVSmooth adds nothing to that
    assert counts["kvsmooth"][0] == counts["plain"][0]
    assert len(counts["plain"][0]) <= 3  # one per decoding forward (3 of them)
    # the host's time per decoded token is what a GPU waits on (docs/HOST.md): on a dynamic cache
    # KVSmooth dispatches one op per decoding forward for its 4 layers (eager: and the mask's two
    # ops, once) and nothing else (no view of the cache), plus each layer's queue at the first step
    per_forward = {"sdpa": 1, "eager": 3}[base]
    assert counts["kvsmooth"][1] - counts["plain"][1] == 3 * per_forward + 4


def test_static_cache_equals_dynamic_cache(llava):
    """generate(cache_implementation="static"): the step runs on the cache's first past_len + 1
    positions (the views a static cache needs), with the same coefficients, tokens and smoothed
    cache as on a dynamic cache; the positions after them stay empty. (The model itself rounds
    differently over the longer static cache, a few float32 ulps in its keys: the caches are
    compared to that, the coefficients, ranks of entropies ~1e-2 apart, exactly.)"""
    inputs = prompt(llava, "llava")
    runs = []
    for impl in (None, "static"):
        ks = kvfix.hf.KVSmooth(layers=range(4), record_lam=True)
        kw = {} if impl is None else {"cache_implementation": impl}
        with kvfix.hf.enable(llava, ks):
            out = gen(llava, inputs, 8, **kw)
        runs.append((out, [lam for _, _, lam in ks.lam_history]))
    (dyn, lam_d), (sta, lam_s) = runs
    assert type(sta.past_key_values).__name__ == "StaticCache" and len(lam_s) == len(lam_d) == 7 * 4
    assert torch.equal(sta.sequences, dyn.sequences)
    assert all(torch.equal(a, b) for a, b in zip(lam_d, lam_s)) and any((lam > 0).any() for lam in lam_s)
    n = dyn.past_key_values.layers[0].keys.shape[2]
    for ld, ls in zip(dyn.past_key_values.layers, sta.past_key_values.layers):
        torch.testing.assert_close(ls.keys[:, :, :n], ld.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(ls.values[:, :, :n], ld.values, rtol=0, atol=1e-6)
        assert not ls.keys[:, :, n:].any() and not ls.values[:, :, n:].any()


def test_decode_forward_with_autograd_on(llava):
    """A decoding forward outside no_grad (generate runs without autograd): the step still runs
    without autograd, and the cache is smoothed as under no_grad."""
    inputs = prompt(llava, "llava")
    outs = []
    for grad in (False, True):
        ks = kvfix.hf.KVSmooth(layers=range(4), record_lam=True)
        with kvfix.hf.enable(llava, ks), torch.no_grad():
            pre = llava(**inputs)
        nxt = pre.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        with kvfix.hf.enable(llava, ks), torch.set_grad_enabled(grad):
            out = llava(input_ids=nxt, attention_mask=mask, past_key_values=pre.past_key_values)
        assert ks.steps == 4 and out.logits.requires_grad == grad
        outs.append([(layer.keys.detach(), layer.values.detach()) for layer in out.past_key_values.layers])
    for (ka, va), (kb, vb) in zip(*outs):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_api_errors(llava):
    with pytest.raises(ValueError, match="lam_ref or preset"):
        kvfix.hf.KVSmooth(lam_ref=0.5, preset="llava-1.5")
    with pytest.raises(ValueError, match="preset must be one of"):
        kvfix.hf.KVSmooth(preset="llava")
    with pytest.raises(ValueError, match="lam_ref must be in"):
        kvfix.hf.KVSmooth(lam_ref=1.2)
    with pytest.raises(ValueError, match="band must be"):
        kvfix.hf.KVSmooth(band=-1)
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        kvfix.hf.KVSmooth(queue_size=0)
    with pytest.raises(TypeError, match="queue_size must be an int"):
        kvfix.hf.KVSmooth(queue_size=2.5)
    with pytest.raises(TypeError, match="layers"):
        kvfix.hf.KVSmooth(layers=3)
    with pytest.raises(ValueError, match="out of range"):
        kvfix.hf.enable(llava, kvfix.hf.KVSmooth(layers=[7]))
    small = testing.tiny_llava(num_layers=2)
    with pytest.raises(ValueError, match="selects no layer"):
        kvfix.hf.enable(small, kvfix.hf.KVSmooth())
    assert kvfix.hf.get_handle(small) is None and kvfix.hf.get_handle(llava) is None
