"""kvfix.hf.CMAC presets (the authors' per-benchmark alpha / beta) and the CHAIR contrast gate.

The presets: their values reach the contrast (generate's logits equal an explicit alpha / beta
run, and the independent reference loop of tests/test_hf_cmac.py), explicit values override
them, bad names are refused.

The gate: `gate_ref_generate` below is an independent CMAC loop with the authors' gate, written
after their code (lijm48/IMCCD, vcd_utils/vcd_sample.py: sample() lines 314-326, greedy_search()
lines 669-681): two separate DynamicCaches, the reference attention of tests/test_hf_cmac.py
(keys calibrated from the positions there, `kvfix.reference.cmac_attention`) for the CMAC layers and plain reference
attention for the others, and, in the original branch, every layer's attention logits of the
last query over the image keys materialised in float64 (`q . k_img^T * scale`), summed over the
image keys, averaged over heads and layers; each item's history kept in a Python list, the
threshold the mean of its first / last `steps` entries, alpha 0 for the item where the value is
below it. kvfix.hf.CMAC(gate=...) (batched 2B rows, kernels, key sums by linearity, float32,
no host sync) must pick the same tokens, gate the same steps and give the same values.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix import reference as R  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: E402

import test_hf_cmac as T  # noqa: E402  (the reference attention, positions, prompts)
from test_hf_cmac import gen, model_of, prompt, ref_generate  # noqa: E402

# --------------------------------------------------------------------------------------------
# presets

# The authors' LLaVA-1.5 scripts (experiments/cd_scripts/): llava1.5_pope.bash cd_alpha=3 cd_beta=0.2,
# llava1.5_chair.bash 1 / 0.2, llava1.5_mme.bash 1 / 0.5.
AUTHORS = {"pope": (3.0, 0.2), "chair": (1.0, 0.2), "mme": (1.0, 0.5)}


def test_presets_are_the_authors_values():
    assert set(kvfix.hf.CMAC_PRESETS) == set(AUTHORS)
    for name, (alpha, beta) in AUTHORS.items():
        assert kvfix.hf.CMAC_PRESETS[name] == {"alpha": alpha, "beta": beta}
        c = kvfix.hf.CMAC(preset=name)
        assert (c.alpha, c.beta, c.preset, c.gate) == (alpha, beta, name, None)
        assert f"preset={name!r}" in repr(c)
    c = kvfix.hf.CMAC()
    assert (c.alpha, c.beta, c.preset) == (3.0, 0.2, None)


def test_explicit_values_override_the_preset():
    c = kvfix.hf.CMAC(preset="chair", alpha=2.5)
    assert (c.alpha, c.beta) == (2.5, 0.2)
    c = kvfix.hf.CMAC(preset="mme", beta=0.3)
    assert (c.alpha, c.beta) == (1.0, 0.3)
    c = kvfix.hf.CMAC(3.0, 0.2, preset="mme")  # equal to the defaults, but given: they win
    assert (c.alpha, c.beta) == (3.0, 0.2)
    c = kvfix.hf.CMAC(preset="pope", alpha=0.0, beta=1.0)
    assert (c.alpha, c.beta) == (0.0, 1.0)


@pytest.mark.parametrize("bad", ["POPE", "vqa", "", "chair ", 3, ["pope"]])
def test_unknown_preset_is_refused(bad):
    with pytest.raises(ValueError, match="preset"):
        kvfix.hf.CMAC(preset=bad)


@pytest.mark.parametrize("kw, err", [(dict(preset="chair", alpha=-1.0), "alpha"),
                                     (dict(preset="mme", beta=0.0), "beta"), (dict(preset="pope", beta=2.0), "beta")])
def test_overrides_are_checked(kw, err):
    with pytest.raises(ValueError, match=err):
        kvfix.hf.CMAC(**kw)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_preset_values_reach_the_contrast(family, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, spans = prompt(model, family, batch2=True)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    runs = {}
    for name, method in [("mme", kvfix.hf.CMAC(preset="mme")), ("explicit", kvfix.hf.CMAC(alpha=1.0, beta=0.5)),
                         ("default", kvfix.hf.CMAC()), ("override", kvfix.hf.CMAC(preset="chair", beta=0.5))]:
        with kvfix.hf.enable(model, method):
            runs[name] = gen(model, inputs, 6, **kw)
    for other in ("explicit", "override"):  # alpha 1, beta 0.5 all three: the same computation
        assert torch.equal(runs["mme"].sequences, runs[other].sequences)
        for a, b in zip(runs["mme"].logits, runs[other].logits):
            assert torch.equal(a, b)
    # and not the defaults (alpha 3, beta 0.2): the preset really changed the contrast
    assert any(not torch.equal(a, b) for a, b in zip(runs["mme"].logits, runs["default"].logits))
    # the independent reference loop with alpha 1, beta 0.5
    ref, ref_cd = ref_generate(model, family, inputs, spans, 6, alpha=1.0, beta=0.5)
    assert torch.equal(runs["mme"].sequences[:, inputs["input_ids"].shape[1]:], ref)
    for got, want in zip(runs["mme"].logits, ref_cd):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)  # beta 0.5's plausible set
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the gate: an independent loop

_G = {}


def _gate_ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference attention of tests/test_hf_cmac.py in the CMAC layers, plain reference attention
    in the others; in the original branch, this layer's gate value per item from the logits."""
    layer, Tk = module.layer_idx, key.shape[2]
    cmac_layer = _G["layers"] is None or layer in _G["layers"]
    ref = T._REF
    if not ref["imd"]:
        vals, mags = [], []
        for b in range(query.shape[0]):
            span = ref["spans"][b:b + 1]
            s, e = (int(x) for x in span[0])
            if cmac_layer:
                k_img = T._calibrated_keys(key[b:b + 1], s, e, ref["positions"][:, b], ref["inv_freq"],
                                           ref["gamma"], ref["mrope_section"])[0]
            else:
                k_img = key[b, :, s:e]
            k_img = k_img.double().repeat_interleave(query.shape[1] // key.shape[1], dim=0)  # [Hq, N, D]
            q = query[b, :, -1].double()                                                     # [Hq, D]
            logits = torch.einsum("hd,hnd->hn", q, k_img) * scaling                          # [Hq, N]
            vals.append(float(logits.sum(-1).mean()))
            mags.append(float(torch.einsum("hd,hnd->hn", q.abs(), k_img.abs()).sum(-1).mean()) * scaling)
        _G["step"][layer] = (vals, mags)
    if cmac_layer:
        return T._ref_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                **kwargs)
    outs = []
    for b in range(query.shape[0]):
        mask = None if attention_mask is None else attention_mask[b:b + 1, ..., :Tk]
        outs.append(R.cmac_attention(query[b:b + 1], key[b:b + 1], value[b:b + 1], ref["spans"][b:b + 1],
                                     k_calibrated=None, scale=scaling, mask=mask, causal=True, imd=False))
    return torch.cat(outs).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvfix_test_cmac_gate_ref", _gate_ref_attention)
AttentionMaskInterface.register("kvfix_test_cmac_gate_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def gate_ref_generate(model, family, inputs, spans, n, *, gate, steps, alpha=3.0, beta=0.2, gamma=3.0,
                      layers=None, sample=None):
    """CMAC decoding with the authors' gate, two caches, eager reference attention. Returns the
    new tokens [B, n], each step's contrasted logits, gate values [n][B], gated flags [n][B],
    thresholds [n][B] and magnitudes [n][B] (mean over layers and heads of sum |q_d k_d| scale)."""
    cfg = model.config.get_text_config(decoder=True)
    section = (cfg.rope_parameters or {}).get("mrope_section")
    B = inputs["input_ids"].shape[0]
    L = cfg.num_hidden_layers
    positions = T._positions(model, family, inputs, n)
    T._REF.update(spans=torch.tensor([[s, s + gh * gw] for (_, s, gh, gw) in sorted(spans)]), positions=positions,
                  inv_freq=model.get_decoder().rotary_emb.inv_freq.float(), gamma=gamma,
                  mrope_section=None if section is None else tuple(section), value_mean="scalar")
    _G["layers"] = None if layers is None else set(layers)
    base = cfg._attn_implementation
    model.set_attn_implementation({"text_config": "kvfix_test_cmac_gate_ref"})
    history = [[] for _ in range(B)]  # each item's gate values, as the authors' all_sums
    out = dict(tokens=[], cd=[], values=[], gated=[], means=[], mags=[])
    try:
        caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
        step_in = {k: v for k, v in inputs.items() if k != "attention_mask"}
        mask = inputs["attention_mask"]
        if sample is not None:
            torch.manual_seed(sample[0])
        for _ in range(n):
            Tm = mask.shape[1]
            pos = positions[:, :, Tm - step_in["input_ids"].shape[1]:Tm]
            logits = []
            _G["step"] = {}
            for branch in (False, True):
                T._REF["imd"] = branch
                with torch.no_grad():
                    o = model(**step_in, attention_mask=mask, past_key_values=caches[branch], use_cache=True,
                              position_ids=pos if family.startswith("qwen") else pos[0])
                logits.append(o.logits[:, -1].float())
            assert sorted(_G["step"]) == list(range(L))
            values, gated, means, mags, rows = [], [], [], [], []
            for b in range(B):
                g = sum(_G["step"][layer][0][b] for layer in range(L)) / L
                history[b].append(g)
                window = history[b][:steps] if gate == "first" else history[b][-steps:]
                mean = sum(window) / len(window)
                values.append(g)
                means.append(mean)
                gated.append(g < mean)
                mags.append(sum(_G["step"][layer][1][b] for layer in range(L)) / L)
                rows.append(R.contrastive_logits(logits[0][b:b + 1], logits[1][b:b + 1],
                                                 alpha=0.0 if g < mean else alpha, beta=beta))
            cd = torch.cat(rows)
            if sample is None:
                tok = cd.argmax(-1)
            else:
                tok = torch.multinomial(torch.softmax(cd / sample[1], dim=-1), num_samples=1)[:, 0]
            for k, v in dict(tokens=tok, cd=cd, values=values, gated=gated, means=means, mags=mags).items():
                out[k].append(v)
            step_in = {"input_ids": tok[:, None]}
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
    finally:
        model.set_attn_implementation({"text_config": base})
    out["tokens"] = torch.stack(out["tokens"], 1)
    return out


# q and k come out of two float32 computations of the model that differ by rounding (2B batched
# rows with the kernels vs one branch at a time with the reference), held to 1e-4 relative by the
# logits tests of tests/test_hf_cmac.py; the gate value is a sum of q_d k_d products, so its
# error is at most that relative error times the sum of their magnitudes.
REL = 1e-4


def check_gate(method, ref, B, n):
    hist = method.gate_history
    assert len(hist) == n
    decided = []
    for t in range(n):
        g, gated = hist[t]
        assert g.dtype == torch.float32 and gated.dtype == torch.bool and g.shape == gated.shape == (B,)
        for b in range(B):
            tol = REL * ref["mags"][t][b]
            assert abs(float(g[b]) - ref["values"][t][b]) <= tol, (t, b)
            # the threshold (a mean of such values) is as close: the flag is decided by the
            # arithmetic wherever the value is farther than both tolerances from it (a near tie
            # may go either way; the token comparison of the caller covers what follows)
            margin = abs(ref["values"][t][b] - ref["means"][t][b])
            window = max(REL * m[b] for m in ref["mags"][:t + 1])
            if t > 0 and margin <= tol + window:
                continue
            assert bool(gated[b]) == ref["gated"][t][b], (t, b)
            decided.append(ref["gated"][t][b])
    assert not any(ref["gated"][0]) and not hist[0][1].any()  # the first forward is never gated
    assert any(decided) and not all(decided)  # both paths taken, decided by the arithmetic


def check_logits(got, want_all):
    for got_t, want in zip(got, want_all):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got_t), finite)
        torch.testing.assert_close(got_t[finite], want[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, gate, batch2", [("llava", "first", False), ("llava", "last", False),
                                                   ("qwen", "first", True), ("qwen", "last", True),
                                                   ("llava", "last", True)])
def test_gate_matches_reference(family, gate, batch2, llava, qwen):
    model = model_of(family, llava, qwen)
    inputs, spans = prompt(model, family, batch2=batch2)
    B, n, steps = inputs["input_ids"].shape[0], 12, 4  # past the window: both phases of the rule
    ref = gate_ref_generate(model, family, inputs, spans, n, gate=gate, steps=steps)
    method = kvfix.hf.CMAC(gate=gate, gate_steps=steps)
    with kvfix.hf.enable(model, method):
        out = gen(model, inputs, n, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref["tokens"])
    check_logits(out.logits, ref["cd"])
    check_gate(method, ref, B, n)
    # the gate changed something (else the equality above proves little about it)
    with kvfix.hf.enable(model, kvfix.hf.CMAC()):
        plain_cmac = gen(model, inputs, n, return_dict_in_generate=True, output_logits=True)
    assert any(not torch.equal(a, b) for a, b in zip(out.logits, plain_cmac.logits))


@pytest.mark.parametrize("kw", [dict(gamma=1.0), dict(layers=[0, 2]), dict(fork_prefill=False)])
def test_gate_plain_keys_layers_and_unforked_prefill(kw, llava):
    """gamma 1 and layers outside `layers`: the plain image keys; fork_prefill False: all 2B rows."""
    inputs, spans = prompt(llava, "llava", batch2=True)
    n, steps = 10, 3
    ref = gate_ref_generate(llava, "llava", inputs, spans, n, gate="last", steps=steps,
                            gamma=kw.get("gamma", 3.0), layers=kw.get("layers"))
    method = kvfix.hf.CMAC(gate="last", gate_steps=steps, **kw)
    with kvfix.hf.enable(llava, method):
        out = gen(llava, inputs, n, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref["tokens"])
    check_logits(out.logits, ref["cd"])
    check_gate(method, ref, 2, n)


def test_gate_with_chair_preset_and_sampling(llava):
    """The authors' CHAIR setting: alpha 1, beta 0.2, sampling, the first 30 steps' mean."""
    inputs, spans = prompt(llava, "llava")
    n = 12
    ref = gate_ref_generate(llava, "llava", inputs, spans, n, gate="first", steps=30, alpha=1.0, beta=0.2,
                            sample=(4321, 1.5))
    method = kvfix.hf.CMAC(preset="chair", gate="first")
    assert method.gate_steps == 30
    with kvfix.hf.enable(llava, method):
        torch.manual_seed(4321)
        out = gen(llava, inputs, n, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    assert torch.equal(out[:, -n:], ref["tokens"])
    check_gate(method, ref, 1, n)


def test_gate_history_is_reset_by_each_generation(llava):
    inputs, _ = prompt(llava, "llava")
    method = kvfix.hf.CMAC(gate="first")
    with kvfix.hf.enable(llava, method):
        gen(llava, inputs, 5)
        first = [g.clone() for g, _ in method.gate_history]
        gen(llava, inputs, 3)
    assert len(first) == 5 and len(method.gate_history) == 3
    for (g, _), g0 in zip(method.gate_history, first):  # the same prompt: the same values again
        assert torch.equal(g, g0)


@pytest.mark.parametrize("kw, exc, err", [
    (dict(gate="sample"), ValueError, "gate"), (dict(gate=True), ValueError, "gate"),
    (dict(gate="first", imd=False), ValueError, "gate"), (dict(gate_steps=0), ValueError, "gate_steps"),
    (dict(gate_steps=2.5), TypeError, "gate_steps"), (dict(gate_steps=True), TypeError, "gate_steps"),
])
def test_bad_gate_options(kw, exc, err):
    with pytest.raises(exc, match=err):
        kvfix.hf.CMAC(**kw)
