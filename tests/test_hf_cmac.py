"""kvfix.hf.CMAC end to end on tiny random LLaVA / Qwen2-VL models (CPU, float32, no download).

`ref_generate` is an independent implementation of CMAC decoding in plain PyTorch: two separate
DynamicCaches (one per branch, each advanced by its own forward), the text model's attention
replaced by an eager function: the image keys calibrated here from the positions (compressed
toward the image end, written out independently of kvfix) and `kvfix.reference.cmac_attention`,
one call per batch item; positions computed here from the padding mask (and Qwen2-VL's
`get_rope_index`), the contrast and cut by `reference.contrastive_logits`, then argmax or
temperature sampling. kvfix.hf.CMAC (one batched forward of 2B rows per step, the kernels, the
transformers generate loop) must pick the same tokens.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix import reference as R  # noqa: E402
from kvfix.hf import testing  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: E402


def model_of(family, llava, qwen):
    if family == "llava-eager":  # additive float masks from the eager mask function
        return testing.tiny_llava(attn_implementation="eager")
    if family == "qwen2.5":
        return testing.tiny_qwen2_vl(version="2.5")
    return llava if family == "llava" else qwen


def prompt(model, family, batch2=False):
    """One item, or two left-padded items (Qwen2-VL: different grids, so different span lengths);
    fresh random text and pixels per test (seeded from the test's id by conftest)."""
    seed = int(torch.randint(0, 2 ** 31 - 1, ()))
    if family.startswith("llava"):
        return testing.llava_prompt(model, [1, 1] if batch2 else [1], seed=seed)
    return testing.qwen_prompt(model, [[(4, 6)], [(4, 4)]] if batch2 else [[(4, 6)]], seed=seed)


# --------------------------------------------------------------------------------------------
# the independent reference

_REF = {}


def _calibrated_keys(key, s, e, pos, inv_freq, gamma, sections):
    """CMPC written out from the positions, independently of kvfix: the image keys [1, H, N, D]
    of key [1, H, T, D] moved from RoPE position p to a - (a - p) / gamma, a the position of the
    first token after the image (per section: frequency f of section i uses position row i), by
    a rotation of (calibrated - p) * inv_freq in float64, rotate_half convention."""
    half = key.shape[-1] // 2
    if isinstance(sections, torch.Tensor):  # each frequency's section, given (interleaved M-RoPE)
        row = sections.clamp(max=pos.shape[0] - 1)
    else:
        sizes = [half] if sections is None else list(sections)
        row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).clamp(max=pos.shape[0] - 1)
    p = pos[row][:, s:e].double()                          # [D/2, N]: each frequency's positions
    a = pos[row][:, e:e + 1].double()                      # the token after the image, per frequency
    ang = ((a - (a - p) / gamma) - p).T * inv_freq.double()  # [N, D/2]
    x = key[:, :, s:e].double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1).to(key.dtype)


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    T = key.shape[2]
    outs = []
    for b in range(query.shape[0]):
        span = _REF["spans"][b:b + 1]
        s, e = int(span[0, 0]), int(span[0, 1])
        pos = _REF["positions"][:, b]                      # every position of the run (prompt + new tokens)
        k_cal = _calibrated_keys(key[b:b + 1], s, e, pos, _REF["inv_freq"], _REF["gamma"], _REF["mrope_section"])
        mask = None if attention_mask is None else attention_mask[b:b + 1, ..., :T]
        outs.append(R.cmac_attention(query[b:b + 1], key[b:b + 1], value[b:b + 1], span, k_calibrated=k_cal,
                                     scale=scaling, mask=mask, causal=True, imd=_REF["imd"],
                                     value_mean=_REF["value_mean"]))
    return torch.cat(outs).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvfix_test_cmac_ref", _ref_attention)
AttentionMaskInterface.register("kvfix_test_cmac_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _positions(model, family, inputs, n_new):
    """RoPE positions [S, B, T_prompt + n_new] as generate builds them (padding-aware)."""
    mask = inputs["attention_mask"]
    B, T = mask.shape
    full = torch.cat([mask, torch.ones(B, n_new, dtype=mask.dtype)], dim=1)
    text = (full.long().cumsum(-1) - 1).clamp(min=0)
    if not family.startswith("qwen"):  # 1-D RoPE: positions count the real tokens
        return text[None]
    pos3, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    return torch.cat([pos3, (text[:, T:] + deltas).expand(3, B, n_new)], dim=-1)


def ref_generate(model, family, inputs, spans, n, *, alpha=3.0, beta=0.2, gamma=3.0, value_mean="scalar",
                 sample=None):
    """CMAC decoding, two caches, eager reference attention. sample: None (greedy) or
    (seed, temperature). Returns the new tokens [B, n] and each step's contrasted logits."""
    cfg = model.config.get_text_config(decoder=True)
    section = (cfg.rope_parameters or {}).get("mrope_section")
    B, T0 = inputs["input_ids"].shape
    positions = _positions(model, family, inputs, n)
    _REF.update(spans=torch.tensor([[s, s + gh * gw] for (_, s, gh, gw) in sorted(spans)]), positions=positions,
                inv_freq=model.get_decoder().rotary_emb.inv_freq.float(), gamma=gamma,
                mrope_section=None if section is None else tuple(section), value_mean=value_mean)
    base = cfg._attn_implementation
    model.set_attn_implementation({"text_config": "kvfix_test_cmac_ref"})
    try:
        caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
        step_in = {k: v for k, v in inputs.items() if k != "attention_mask"}
        mask = inputs["attention_mask"]
        tokens, all_cd = [], []
        if sample is not None:
            torch.manual_seed(sample[0])
        for i in range(n):
            T = mask.shape[1]
            pos = positions[:, :, T - step_in["input_ids"].shape[1]:T]
            logits = []
            for branch in (False, True):
                _REF["imd"] = branch
                with torch.no_grad():
                    out = model(**step_in, attention_mask=mask, past_key_values=caches[branch], use_cache=True,
                                position_ids=pos if family.startswith("qwen") else pos[0])
                logits.append(out.logits[:, -1].float())
            cd = R.contrastive_logits(logits[0], logits[1], alpha=alpha, beta=beta)
            all_cd.append(cd)
            if sample is None:
                tok = cd.argmax(-1)
            else:
                tok = torch.multinomial(torch.softmax(cd / sample[1], dim=-1), num_samples=1)[:, 0]
            tokens.append(tok)
            step_in = {"input_ids": tok[:, None]}
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
    finally:
        model.set_attn_implementation({"text_config": base})
    return torch.stack(tokens, 1), all_cd


def gen(model, inputs, n, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, **kw)


# --------------------------------------------------------------------------------------------
# model-level equality with the reference

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_greedy_matches_reference(family, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, spans = prompt(model, family)
    ref, _ = ref_generate(model, family, inputs, spans, 20)
    with kvfix.hf.enable(model, kvfix.hf.CMAC()):
        out = gen(model, inputs, 20)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], ref)
    # and CMAC changes something on these random models (else the test above proves little)
    assert not torch.equal(gen(model, inputs, 20)[:, -20:], ref)


@pytest.mark.parametrize("family", ["llava", "qwen", "llava-eager", "qwen2.5"])
def test_batch_left_padding_matches_reference(family, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, spans = prompt(model, family, batch2=True)
    assert (inputs["attention_mask"] == 0).any()  # really padded
    ref, ref_cd = ref_generate(model, family, inputs, spans, 8, value_mean="vector")
    for fork in (True, False):  # the distorted prefill forked from the original's prefix, or all 2B rows
        with kvfix.hf.enable(model, kvfix.hf.CMAC(value_mean="vector", fork_prefill=fork)):
            out = gen(model, inputs, 8, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref)
        for step in (0, 7):
            got, want = out.logits[step], ref_cd[step]
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), finite)  # the same plausible set
            torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


def test_sampling_matches_reference(llava):
    inputs, spans = prompt(llava, "llava")
    ref, _ = ref_generate(llava, "llava", inputs, spans, 12, beta=0.05, sample=(1234, 1.5))
    with kvfix.hf.enable(llava, kvfix.hf.CMAC(beta=0.05)):
        torch.manual_seed(1234)
        out = gen(llava, inputs, 12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    assert torch.equal(out[:, -12:], ref)
    greedy, _ = ref_generate(llava, "llava", inputs, spans, 12, beta=0.05)
    assert not torch.equal(ref, greedy)  # sampling really sampled


# --------------------------------------------------------------------------------------------
# special cases of the options

@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_alpha0_without_calibration_is_plain_generation(family, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, _ = prompt(model, family, batch2=True)
    plain = gen(model, inputs, 10)
    with kvfix.hf.enable(model, kvfix.hf.CMAC(alpha=0.0, gamma=1.0)):
        assert torch.equal(gen(model, inputs, 10), plain)


def test_alpha0_is_cmpc_only(llava):
    inputs, _ = prompt(llava, "llava", batch2=True)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC(imd=False)):
        cmpc = gen(llava, inputs, 10, **kw)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC(alpha=0.0, beta=0.5)):
        cut = gen(llava, inputs, 10, **kw)
    assert torch.equal(cut.sequences, cmpc.sequences)
    for a, b in zip(cut.logits, cmpc.logits):  # the original branch's logits, cut
        keep = b - b.amax(-1, keepdim=True) >= torch.log(torch.tensor(0.5))
        assert torch.equal(torch.isfinite(a), keep)
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    plain = gen(llava, inputs, 10, **kw)
    assert not torch.allclose(plain.logits[0], cmpc.logits[0])  # calibration changed the logits


def test_disabled_handle_is_plain_transformers(llava):
    inputs, _ = prompt(llava, "llava", batch2=True)
    plain = gen(llava, inputs, 10, return_dict_in_generate=True, output_scores=True)
    handle = kvfix.hf.enable(llava, kvfix.hf.CMAC())
    cmac = gen(llava, inputs, 10)
    with handle.suspended():
        assert torch.equal(gen(llava, inputs, 10), plain.sequences)
    handle.disable()
    again = gen(llava, inputs, 10, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(again.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, plain.scores))
    assert not torch.equal(cmac, plain.sequences)


def test_generate_outputs_and_handle_generate(qwen):
    inputs, _ = prompt(qwen, "qwen", batch2=True)
    with kvfix.hf.enable(qwen, kvfix.hf.CMAC(beta=0.9)) as handle:
        out = gen(qwen, inputs, 6, return_dict_in_generate=True, output_scores=True, output_logits=True)
        assert torch.equal(handle.generate(**inputs, max_new_tokens=6, do_sample=False), out.sequences)
    assert isinstance(out, transformers.generation.utils.GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert len(out.scores) == 6 and out.scores[0].shape == (2, qwen.config.get_text_config().vocab_size)
    for s, lg, tok in zip(out.scores, out.logits, out.sequences[:, -6:].T):
        assert torch.equal(s.argmax(-1), tok)
        assert torch.isinf(lg).any(-1).all()  # the cut removed tokens in every row
        assert torch.equal(torch.isinf(s), torch.isinf(lg))


def test_eos_stops_rows_and_pads(llava):
    inputs, _ = prompt(llava, "llava", batch2=True)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        free = gen(llava, inputs, 10)
        new = free[:, inputs["input_ids"].shape[1]:]
        eos = int(new[0, 2])
        stopped = gen(llava, inputs, 10, eos_token_id=eos)
    row = stopped[0, inputs["input_ids"].shape[1]:]
    cut = int((new[0] == eos).nonzero()[0]) + 1
    assert torch.equal(row[:cut], new[0, :cut])
    assert (row[cut:] == testing.PAD).all()


def test_use_cache_false_runs(llava):
    # every forward is then a prefill of the whole sequence: IMD's threshold pools the after-image
    # queries of the forward, so the tokens may differ from cached decoding (docs/CMAC_HF.md)
    inputs, _ = prompt(llava, "llava", batch2=True)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        out = gen(llava, inputs, 3, use_cache=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_decoding_attention_dispatches_the_op_and_little_else(base, llava):
    """Every selected layer of every decoded token goes through CMAC's attention (on a GPU,
    decoding waits on the host's time per layer: docs/HOST.md). Once the calibrated keys and their
    means are kept (the first decoding forward), a layer dispatches `kvfix.cmac_attention` and the
    output's transpose, nothing else; the model's mask, which the layers share, is put in the op's
    form once per forward (eager: made -inf), not once per layer."""
    import collections
    from torch.utils._python_dispatch import TorchDispatchMode

    model = llava if base == "sdpa" else model_of("llava-eager", llava, None)
    cmac = kvfix.hf.CMAC()

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.at, self.ops = None, collections.defaultdict(list)  # (past_len, layer) -> ops

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.at is not None:
                self.ops[self.at].append(func)
            return func(*args, **(kwargs or {}))

    counter = Count()

    class Window(kvfix.hf.Method):  # outside CMAC's attention (CMAC is innermost): counts what it dispatches
        name, uses_attention = "window", True

        def attention(self, ctx, layer_idx, module, q, k, v, mask, call_next, **kw):
            if ctx is not None and ctx.phase == "decode" and layer_idx in cmac._selected:
                counter.at = (ctx.past_len, layer_idx)
            try:
                return call_next(q, k, v, mask, **kw)
            finally:
                counter.at = None

    inputs, _ = prompt(model, "llava", batch2=True)  # left padding: the model hands a mask
    with kvfix.hf.enable(model, cmac, Window()), counter:
        gen(model, inputs, 5)
    first = min(p for p, _ in counter.ops)
    layers = sorted(cmac._selected)
    per_forward = {"sdpa": 0, "eager": 2}[base]  # eager's additive mask: le, masked_fill (-inf)
    aten = torch.ops.aten
    for past in range(first + 1, first + 4):
        for i, layer in enumerate(layers):
            ops = collections.Counter(counter.ops[(past, layer)])
            want = {torch.ops.kvfix.cmac_attention.default: 1, aten.transpose.int: 1}
            if i == 0 and per_forward:
                want.update({aten.le.Scalar: 1, aten.masked_fill.Scalar: 1})
            assert ops == collections.Counter(want), (past, layer, ops)


# --------------------------------------------------------------------------------------------
# stacking

def test_attention_is_innermost_whatever_the_order(llava):
    cmac, smooth = kvfix.hf.CMAC(), kvfix.hf.KVSmooth()
    with kvfix.hf.enable(llava, cmac, smooth) as handle:
        assert handle._attn_methods == (smooth, cmac)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_stacked_with_dscr_and_kvsmooth(family, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, spans = prompt(model, family, batch2=True)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    with kvfix.hf.enable(model, kvfix.hf.CMAC()):
        alone = gen(model, inputs, 8, **kw)
    dscr, cmac, smooth = kvfix.hf.DSCR(missing_depth="uniform"), kvfix.hf.CMAC(), kvfix.hf.KVSmooth(layers=[1, 3])
    seen = {}

    class Probe(kvfix.hf.Method):  # after the first decoding step: the cache rows
        def on_decode_end(self, ctx):
            if "k" not in seen:
                seen["k"] = ctx.cache.layers[2].keys.clone()

    with kvfix.hf.enable(model, cmac, dscr, smooth, Probe()):
        out = gen(model, inputs, 8, **kw)
    assert dscr.refine_calls == 2 and smooth.steps == 7 * 2
    assert out.sequences.shape == alone.sequences.shape
    assert not torch.allclose(out.logits[1], alone.logits[1])  # DSCR acted (KVSmooth too, later)
    k = seen["k"]
    assert k.shape[0] == 4  # [original; distorted]
    for b, s, gh, gw in spans:  # the refined image span is shared by both branches
        torch.testing.assert_close(k[b + 2, :, s:s + gh * gw], k[b, :, s:s + gh * gw], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("kw, err", [
    (dict(alpha=-0.1), "alpha"), (dict(beta=0.0), "beta"), (dict(beta=1.5), "beta"), (dict(gamma=0.0), "gamma"),
    (dict(gamma=-2.0), "gamma"), (dict(alpha=float("nan")), "alpha"), (dict(value_mean="mean"), "value_mean"),
    (dict(layers=[7]), "layer 7"),
])
def test_bad_options(kw, err, llava):
    with pytest.raises(ValueError, match=err):
        kvfix.hf.enable(llava, kvfix.hf.CMAC(**kw))
    assert kvfix.hf.get_handle(llava) is None


@pytest.mark.parametrize("kw", [dict(imd=1), dict(alpha="3"), dict(beta=None), dict(fork_prefill="yes")])
def test_bad_option_types(kw):
    with pytest.raises(TypeError, match=next(iter(kw))):
        kvfix.hf.CMAC(**kw)


def test_two_images_in_one_item_is_refused(llava):
    inputs, _ = testing.llava_prompt(llava, [2])
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        with pytest.raises(ValueError, match="exactly one image per batch item; batch item 0 has 2"):
            gen(llava, inputs, 2)


def test_labels_are_refused(llava):
    inputs, _ = prompt(llava, "llava")
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        with pytest.raises(ValueError, match="labels"):
            llava(**inputs, labels=inputs["input_ids"])


def test_text_only_prompt_runs_the_plain_model(llava):
    ids = torch.randint(3, 90, (1, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain = gen(llava, inputs, 6)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        assert torch.equal(gen(llava, inputs, 6), plain)


def test_beam_search_is_refused_and_num_return_sequences_runs(llava):
    inputs, _ = prompt(llava, "llava", batch2=True)
    with kvfix.hf.enable(llava, kvfix.hf.CMAC()):
        with pytest.raises(ValueError, match="beam search is not supported"):
            gen(llava, inputs, 3, num_beams=2)
        out = gen(llava, inputs, 3, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)


def test_second_turn_continues_both_branches(qwen):
    inputs, _ = prompt(qwen, "qwen")
    with kvfix.hf.enable(qwen, kvfix.hf.CMAC()):
        first = gen(qwen, inputs, 4, return_dict_in_generate=True)
        assert first.past_key_values.layers[0].keys.shape[0] == 2  # [original; distorted]
        ids = torch.cat([first.sequences, torch.randint(3, 90, (1, 3))], dim=1)
        second = gen(qwen, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 3,
                     past_key_values=first.past_key_values)
    assert second.shape == (1, ids.shape[1] + 3) and torch.equal(second[:, :ids.shape[1]], ids)
