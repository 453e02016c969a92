"""The four kvfix.hf methods stacked, every non-empty subset, against one independent reference loop.

`ref_generate` composes the methods from their reference semantics (docs/STACKING.md), in plain
PyTorch on the text model, item by item (its row of the padded batch) and branch by branch, in
lockstep so that each step's token is picked from all items at once:

- SCR: scores of the plain model (`test_hf_scr.ref_scores`: eager attention probabilities), the
  redistribution (`test_hf_scr.ref_redistribute`, METHODS §3 written out) applied by forward
  pre-hooks on the decoder layers 1..3 to the image rows of the prefill, in every branch;
- DSCR: a split prefill: the prompt up to the image end, the image span of the cache refined at
  layers 1..3 with `kvfix.reference.dscr_refine` (float64), then the rest of the prompt;
- CMAC: two branches with a cache each, every forward of each through an eager attention written
  here: the image keys calibrated from the positions (`test_hf_cmac._calibrated_keys`) and
  `kvfix.reference.cmac_attention` (IMD in the distorted branch), the contrast by
  `reference.contrastive_logits`; without CMAC, plain softmax attention written out;
- KVSmooth: in that attention, on every decoding step of layers 1 and 3, after the attention,
  `reference.kvsmooth_step` (float64 entropy, the branch's own queue) on the cache, in place.

kvfix.hf (one batched forward per step, the kernels, transformers' generate) must pick the same
tokens, with CMAC's forked and unforked prefill, greedy on a left-padded batch of two whose image
ends differ (CMAC's forked prefill then cuts one item's image) and seeded sampling on a prompt
whose question is longer than the image end. All 15 subsets on tiny LLaVA; four on tiny Qwen2-VL.
"""
import itertools
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

from test_hf_cmac import _calibrated_keys, _positions  # noqa: E402
from test_hf_dscr import depth_maps, text_model_inputs, token_depth  # noqa: E402
from test_hf_scr import ref_redistribute, ref_scores  # noqa: E402

N_NEW = 5
LAYERS = (1, 2, 3)        # SCR's and DSCR's defaults on a 4-layer model
KS_LAYERS = (1, 3)
SCR_KW = dict(top_k=3, lam=1.5)
GAMMA, ALPHA = 3.0, 3.0
METHODS = ("dscr", "kvsmooth", "scr", "cmac")
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(METHODS, r)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: every op is overhead-bound, a second thread only adds synchronisation (on a
    busy machine, many times the run time). Restored after the module. The family test files
    import this fixture (autouse in each module that imports it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llava():
    return testing.tiny_llava(image_size=48)  # 6 x 6 patch grid: 16 SCR candidates, top_k matters


# --------------------------------------------------------------------------------------------
# prompts: one image per item (CMAC), text before and after it of the given lengths

def make_prompt(model, family, items, seed):
    """items: [(text before, text after)] per batch item, left padded. Returns (inputs, spans)."""
    gen = torch.Generator().manual_seed(seed)
    rows, local, thw = [], [], []
    if family == "llava":
        vc = model.config.vision_config
        g = vc.image_size // vc.patch_size
        for b, (before, after) in enumerate(items):
            r = [testing.BOS] + testing._text(before, gen)
            local.append((b, len(r), g, g))
            rows.append(r + [testing.IMAGE_TOKEN] * (g * g) + testing._text(after, gen))
        ids, mask, spans = testing._left_pad(rows, local)
        pixels = torch.randn(len(items), 3, vc.image_size, vc.image_size, generator=gen)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, spans
    h, w = 8, 12  # merged grid 4 x 6
    for b, (before, after) in enumerate(items):
        r = [testing.BOS] + testing._text(before, gen) + [testing.VISION_START]
        local.append((b, len(r), h // 2, w // 2))
        rows.append(r + [testing.IMAGE_TOKEN] * (h * w // 4) + [testing.VISION_END] + testing._text(after, gen))
        thw.append((1, h, w))
    ids, mask, spans = testing._left_pad(rows, local)
    vc = model.config.vision_config
    grid = torch.tensor(thw, dtype=torch.long)
    pixels = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == testing.IMAGE_TOKEN).int()}, spans


# --------------------------------------------------------------------------------------------
# the independent reference

_S = {}  # what the reference attention and the SCR hooks read


def _causal(mask):
    """A mask with a row per query is the model's whole mask (causality and its exceptions:
    Gemma 3's bidirectional image blocks); without one, attention is causal."""
    return mask is None or mask.shape[-2] == 1


def _plain_attention(query, key, value, mask, scale):
    g = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(g, 1)
    v = value.double().repeat_interleave(g, 1)
    Tq, T = query.shape[2], key.shape[2]
    logits = query.double() @ k.transpose(-1, -2) * scale
    if _causal(mask):
        causal = torch.arange(T)[None] <= torch.arange(T - Tq, T)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    p = torch.softmax(logits, -1).nan_to_num(0.0)  # a padded query sees no key: zeros, not NaN
    return (p @ v).to(query.dtype)


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    T, layer = key.shape[2], module.layer_idx
    mask = None if attention_mask is None else attention_mask[..., :T]
    if _S["cmac"]:
        s, e = _S["span"]
        k_cal = _calibrated_keys(key, s, e, _S["positions"], _S["inv_freq"][layer], GAMMA, _S["mrope_section"])
        out = R.cmac_attention(query, key, value, torch.tensor([[s, e]]), k_calibrated=k_cal, scale=scaling,
                               mask=mask, causal=_causal(mask), imd=_S["imd"], value_mean="scalar")
    else:
        out = _plain_attention(query, key, value, mask, scaling)
    if _S["kvsmooth"] and query.shape[2] == 1 and layer in KS_LAYERS:  # a decoding step: smooth K[T-1]
        cache = _S["cache"].layers[layer]
        queue = _S["queues"].get(layer, torch.full((1, 15), float("nan")))
        # the entropy of q . K over the cache as stored (CMAC's calibration is not in it)
        _, k2, v2, _S["queues"][layer] = R.kvsmooth_step(query, cache.keys[:, :, :T], cache.values[:, :, :T], queue,
                                                         scale=scaling, mask=mask, lam_ref=0.9, band=0.2)
        cache.keys[:, :, :T] = k2
        cache.values[:, :, :T] = v2
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("kvfix_test_stack_ref", _ref_attention)
AttentionMaskInterface.register("kvfix_test_stack_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def image_of(span):
    """(start, end, grids [(positions, gh, gw)]) of a prompt's image: `(batch, start, gh, gw)`, one
    contiguous grid, or `(batch, start, end, grids)`; a grid may carry a fourth element, the
    region (top, left, bottom, right) of the image it shows (DSCR's depth: `crop`)."""
    if isinstance(span[3], list):
        return span[1], span[2], span[3]
    _, s, gh, gw = span
    return s, s + gh * gw, [(torch.arange(s, s + gh * gw), gh, gw)]


def ref_grid_scores(model, inputs, spans, diag_layers):
    """Per image, per grid: SCR's scores (`test_hf_scr.ref_scores` per grid: eager attention
    probabilities of the text tokens after the image on the grid's tokens, summed over those
    queries, mean over heads and layers)."""
    if not any(isinstance(sp[3], list) for sp in spans):
        return [[sc] for sc in ref_scores(model, inputs, spans, diag_layers)]
    base = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(base)
    ids, pad = inputs["input_ids"], inputs["attention_mask"]
    out = []
    for sp in spans:
        b, (s, e, grids) = sp[0], image_of(sp)
        rows = [p for p in range(e, ids.shape[1]) if ids[b, p] != testing.IMAGE_TOKEN and pad[b, p]]
        out.append([torch.stack([att[layer][b][:, rows][:, :, idx].double().sum(1).mean(0) for layer in diag_layers])
                    .mean(0) if rows else None for idx, *_ in grids])
    return out


def _scr_hook(module, args, kwargs):
    """SCR on the reference's prefill chunks: the image rows of the chunk that holds the image."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if _S["scr"] is None or hidden.shape[1] == 1:
        return None
    (s, e, grids), scores, a = _S["scr"], _S["scr_scores"], _S["offset"]
    if not (a <= s and e <= a + hidden.shape[1]):
        return None
    hidden = hidden.clone()
    for (idx, gh, gw, *_), sc in zip(grids, scores):  # each grid on its own
        if sc is not None:
            hidden[0, idx - a] = ref_redistribute(hidden[0, idx - a], sc, gh, gw, exclude_border=True, **SCR_KW)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def crop(d, region=(0.0, 0.0, 1.0, 1.0)):
    """The part of a depth map [H, W] a grid shows: rows [top * H, bottom * H), columns
    [left * W, right * W) (tests give maps whose sides the tile counts divide)."""
    if isinstance(d, str) or d.dim() != 2:
        return d
    H, W = d.shape
    top, left, bottom, right = region
    return d[int(top * H):int(bottom * H), int(left * W):int(right * W)]


def set_text_attn(model, name):
    """The text model's attention implementation (the whole model's where its config is the text
    config: Chameleon)."""
    model.set_attn_implementation(name if model.config.get_text_config(decoder=True) is model.config
                                  else {"text_config": name})


def layer_inv_freq(text, cfg, layer):
    """The RoPE frequencies of one text layer: the rotary embedding's, or those of the layer's
    type where each type has its own (Gemma 3)."""
    rotary = text.rotary_emb
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq.float()
    return getattr(rotary, f"{cfg.layer_types[layer]}_inv_freq").float()


def interleaved_sections(section, n):
    """Qwen3-VL's interleaved M-RoPE written out: frequency f (of n) is height when f % 3 == 1 and
    f < 3 * section[1], width when f % 3 == 2 and f < 3 * section[2], else temporal."""
    return torch.tensor([1 if f % 3 == 1 and f < 3 * section[1] else 2 if f % 3 == 2 and f < 3 * section[2] else 0
                         for f in range(n)])


def ref_generate(model, family, inputs, spans, methods, *, maps=None, beta=0.2, sample=None, prefill_mask=None,
                 text_extra=None, embeds=None, banned=None):
    """The composed reference: new tokens [B, N_NEW] and each step's (contrasted) logits [B, V].
    sample: None (greedy) or (seed, temperature). prefill_mask(b, a, c): the text model's attention
    mask for item b's prompt rows [a, c) (default: its 2-D padding mask, the text model makes it
    causal). text_extra(b, a, c): more text-model arguments for those rows (Qwen3-VL's deepstack).
    embeds: the prompt's embeddings [B, T, d] (default: what a plain generate hands the text
    model). banned: token ids whose logits the model sets to finfo.min (Chameleon's image codes)."""
    use = {m: m in methods for m in METHODS}
    cfg = model.config.get_text_config(decoder=True)
    section = (cfg.rope_parameters or {}).get("mrope_section")
    B, T = inputs["input_ids"].shape
    emb = text_model_inputs(model, inputs, 1)[0] if embeds is None else embeds
    positions = _positions(model, family, inputs, N_NEW)                    # [S, B, T + N_NEW]
    scores = ref_grid_scores(model, inputs, spans, (0, 1)) if use["scr"] else None
    text, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    mask = inputs["attention_mask"]
    branches = (False, True) if use["cmac"] else (False,)
    states = {(b, br): {"cache": DynamicCache(config=model.config), "queues": {}} for b in range(B) for br in branches}
    _S.update(inv_freq=[layer_inv_freq(text, cfg, i) for i in range(len(text.layers))],
              mrope_section=None if section is None else (
                  interleaved_sections(section, text.rotary_emb.inv_freq.numel())
                  if cfg.rope_parameters.get("mrope_interleaved") else tuple(section)),
              cmac=use["cmac"], kvsmooth=use["kvsmooth"], scr=None)
    base = cfg._attn_implementation
    set_text_attn(model, "kvfix_test_stack_ref")
    hooks = [text.layers[i].register_forward_pre_hook(_scr_hook, with_kwargs=True) for i in LAYERS]
    tokens, all_logits = [], []
    try:
        with torch.no_grad():
            if sample is not None:
                torch.manual_seed(sample[0])
            for step in range(N_NEW):
                step_logits = []
                for b in range(B):
                    span, = [sp for sp in spans if sp[0] == b]
                    s, e, grids = image_of(span)
                    pos = positions[:, b:b + 1]
                    out = []
                    for br in branches:
                        st = states[(b, br)]
                        _S.update(span=(s, e), positions=pos[:, 0], imd=br, cache=st["cache"], queues=st["queues"])

                        def forward(x, a, c):
                            _S["offset"] = a
                            p = pos[..., a:c] if family.startswith("qwen") else pos[0, :, a:c]
                            am = prefill_mask(b, a, c) if (prefill_mask is not None and step == 0) else m[:, :c]
                            extra = text_extra(b, a, c) if (text_extra is not None and step == 0) else {}
                            h = text(inputs_embeds=x, position_ids=p, attention_mask=am,
                                     past_key_values=st["cache"], use_cache=True, **extra)
                            logits = head(h.last_hidden_state[:, -1])[0].float()
                            if banned is not None:
                                logits[banned] = torch.finfo(logits.dtype).min
                            return logits

                        if step == 0:  # the prefill: split at the image end for DSCR
                            m = mask[b:b + 1]
                            _S["scr"] = (s, e, grids) if use["scr"] else None
                            _S["scr_scores"] = scores[spans.index(span)] if use["scr"] else None
                            a = 0
                            for c in ([e, T] if use["dscr"] else [T]):
                                logits = forward(emb[b:b + 1, a:c], a, c)
                                a = c
                                if use["dscr"] and c == e:
                                    for idx, gh, gw, *region in grids:  # each grid on its own, depth from
                                        d = token_depth(crop(maps[b], *region), gh, gw).double()  # its part
                                        co = kvfix.patch_coords(gh, gw).double()
                                        for layer in LAYERS:
                                            lay = st["cache"].layers[layer]
                                            rk, rv = R.dscr_refine(lay.keys[:, :, idx].double(),
                                                                   lay.values[:, :, idx].double(), d, co)
                                            lay.keys[:, :, idx] = rk.float()
                                            lay.values[:, :, idx] = rv.float()
                            _S["scr"] = None
                        else:
                            m = torch.cat([mask[b:b + 1], mask.new_ones(1, step)], dim=1)
                            x = embed(tokens[-1][b:b + 1, None])
                            logits = forward(x, T + step - 1, T + step)
                        out.append(logits)
                    step_logits.append(R.contrastive_logits(out[0][None], out[1][None], alpha=ALPHA,
                                                            beta=beta)[0] if use["cmac"] else out[0])
                cd = torch.stack(step_logits)
                all_logits.append(cd)
                if sample is None:
                    tokens.append(cd.argmax(-1))
                else:
                    tokens.append(torch.multinomial(torch.softmax(cd / sample[1], dim=-1), num_samples=1)[:, 0])
    finally:
        for hk in hooks:
            hk.remove()
        set_text_attn(model, base)
    return torch.stack(tokens, 1), all_logits


# --------------------------------------------------------------------------------------------
# kvfix.hf

def build(methods, fork, beta, order):
    made = {"dscr": lambda: kvfix.hf.DSCR(), "kvsmooth": lambda: kvfix.hf.KVSmooth(layers=KS_LAYERS, lam_ref=0.9),
            "scr": lambda: kvfix.hf.SCR(**SCR_KW),
            "cmac": lambda: kvfix.hf.CMAC(alpha=ALPHA, beta=beta, gamma=GAMMA, fork_prefill=fork)}
    return [made[m]() for m in (methods if order == 1 else methods[::-1])]


def run(model, inputs, methods, maps, *, fork=True, beta=0.2, sample=None, order=1, images=None):
    """kvfix.hf's generate; `images`: more `handle.images` arguments with the depth maps (DSCR)."""
    kw = dict(max_new_tokens=N_NEW, return_dict_in_generate=True, output_logits=True)
    if sample is None:
        kw.update(do_sample=False)
    else:
        kw.update(do_sample=True, temperature=sample[1], top_k=0, top_p=1.0)
    objs = build(methods, fork, beta, order)
    extra = (images or {}) if "dscr" in methods else {}
    with kvfix.hf.enable(model, *objs) as h, h.images(depth_maps=maps if "dscr" in methods else None, **extra):
        if sample is not None:
            torch.manual_seed(sample[0])
        out = model.generate(**inputs, **kw)
    by = {type(o).__name__: o for o in objs}
    if "SCR" in by:  # the prefill redistributed every image at every SCR layer (the fork adds no call)
        assert by["SCR"].diagnostic_passes == 1
    if "DSCR" in by:
        assert by["DSCR"].refine_calls == inputs["input_ids"].shape[0]
    if "KVSmooth" in by:
        assert by["KVSmooth"].steps == (N_NEW - 1) * len(KS_LAYERS)
    return out


def check(out, ref, inputs):
    tokens, logits = ref
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], tokens)
    for got, want in zip(out.logits, logits):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)  # the same plausible set (CMAC)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


def settings(methods):
    return (True, False) if "cmac" in methods else (True,)  # CMAC's fork_prefill


def check_subset(model, family, methods, *, order=1, seed=0, prompt=make_prompt, prefill_mask=None, text_extra=None,
                 image_kw=None, ref_kw=None):
    """prefill_mask(inputs), text_extra(inputs) -> the reference's prefill_mask, text_extra for that
    prompt (see ref_generate); image_kw(spans) -> more `handle.images` arguments for it (run);
    ref_kw(inputs) -> more ref_generate arguments (embeds, banned)."""
    pm = (lambda inputs: None) if prefill_mask is None else prefill_mask
    te = (lambda inputs: None) if text_extra is None else text_extra
    ik = (lambda spans: None) if image_kw is None else image_kw
    rk = (lambda inputs: {}) if ref_kw is None else ref_kw
    # greedy, batch 2 left padded, image ends 5 apart: CMAC's forked prefill cuts item 0's image
    inputs, spans = prompt(model, family, [(3, 3), (2, 8)], seed)
    assert (inputs["attention_mask"] == 0).any()
    maps = depth_maps(len(spans), seed=seed)
    ref = ref_generate(model, family, inputs, spans, methods, maps=maps, prefill_mask=pm(inputs),
                       text_extra=te(inputs), **rk(inputs))
    for fork in settings(methods):
        check(run(model, inputs, methods, maps, fork=fork, order=order, images=ik(spans)), ref, inputs)
    # seeded sampling, one item whose question (45 tokens) is longer than the prompt up to the image end
    inputs, spans = prompt(model, family, [(3, 45)], seed + 1)
    end = image_of(spans[0])[1]
    assert inputs["input_ids"].shape[1] - end > end
    maps = depth_maps(1, seed=seed + 1)
    ref = ref_generate(model, family, inputs, spans, methods, maps=maps, beta=0.05, sample=(seed + 7, 1.5),
                       prefill_mask=pm(inputs), text_extra=te(inputs), **rk(inputs))
    for fork in settings(methods):
        check(run(model, inputs, methods, maps, fork=fork, beta=0.05, sample=(seed + 7, 1.5), order=order,
                  images=ik(spans)), ref, inputs)
    return ref


# --------------------------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("methods", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_llava_subset_equals_composed_reference(methods, llava):
    check_subset(llava, "llava", methods, order=1 if len(methods) % 2 else -1)


@pytest.mark.parametrize("methods", [("scr", "cmac"), ("dscr", "scr", "cmac"), ("dscr", "kvsmooth", "scr"),
                                     METHODS], ids=["scr+cmac", "dscr+scr+cmac", "dscr+kvsmooth+scr", "all"])
def test_qwen_subset_equals_composed_reference(methods, qwen):
    check_subset(qwen, "qwen", methods, order=-1 if methods == METHODS else 1)


def test_the_methods_change_each_other(llava):
    """The composition is not vacuous: on the batch above, adding each method to the other three
    changes the tokens or the first step's logits."""
    inputs, spans = make_prompt(llava, "llava", [(3, 3), (2, 8)], 0)
    maps = depth_maps(len(spans), seed=0)
    full = run(llava, inputs, METHODS, maps)
    for m in METHODS:
        rest = tuple(x for x in METHODS if x != m)
        out = run(llava, inputs, rest, maps)
        a, b = full.logits[0], out.logits[0]
        both = torch.isfinite(a) & torch.isfinite(b)
        if m == "kvsmooth":  # decoding only: a later step's logits
            a, b = full.logits[-1], out.logits[-1]
            both = torch.isfinite(a) & torch.isfinite(b)
        assert (not torch.equal(full.sequences, out.sequences) or not torch.equal(torch.isfinite(a), torch.isfinite(b))
                or (a[both] - b[both]).abs().max() > 1e-3), m


class _Calls(kvfix.hf.Method):
    """Records (phase, layer, position in the chain) of every call of its attention."""
    uses_attention = True

    def __init__(self, name, phases, log):
        self.name, self.log = name, log
        if phases is not None:
            self.attention_phases = frozenset(phases)

    def attention(self, ctx, layer_idx, module, query, key, value, attention_mask, call_next, **kwargs):
        self.log.append((self.name, ctx.phase, layer_idx))
        return call_next(query, key, value, attention_mask, **kwargs)


class _Layers(kvfix.hf.Method):
    """Records (phase, layer) of every call of its layer_input, and how many forward pre-hooks
    each decoder layer carries when a forward starts."""

    def __init__(self, name, phases, log, hooks=None):
        self.name, self.log, self.hooks = name, log, hooks
        if phases is not None:
            self.layer_phases = frozenset(phases)

    def _count(self, ctx):
        if self.hooks is not None:
            layers = ctx.handle.adapter.decoder_layers()
            self.hooks.append((ctx.phase, [len(layer._forward_pre_hooks) for layer in layers]))

    on_prefill_start = on_decode_start = _count

    def layer_input(self, ctx, layer_idx, hidden_states):
        self.log.append((self.name, ctx.phase, layer_idx))
        return None


def test_layer_phases_leave_methods_out_and_decoding_layers_unhooked(llava):
    """A method whose `layer_phases` lacks a forward's phase gets no `layer_input` call in that
    forward; where no method is left, the decoder layers carry no hook during it (SCR: decoding
    steps run the plain layers), and the next prompt puts the hooks back. Tokens as plain."""
    assert kvfix.hf.SCR.layer_phases == {"prefill"} and kvfix.hf.Method.layer_phases == {"prefill", "decode"}
    inputs, _ = make_prompt(llava, "llava", [(3, 3)], 0)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    plain = llava.generate(**inputs, **kw)
    L = llava.config.text_config.num_hidden_layers
    steps = ["prefill", "decode", "decode"]
    log, hooks = [], []
    methods = (_Layers("both", None, log), _Layers("prefill", ["prefill"], log),
               _Layers("decode", ["decode"], log, hooks))
    with kvfix.hf.enable(llava, *methods):
        assert torch.equal(llava.generate(**inputs, **kw), plain)
    chain = {"prefill": ["both", "prefill"], "decode": ["both", "decode"]}
    assert log == [(name, phase, layer) for phase in steps for layer in range(L) for name in chain[phase]]
    assert hooks == [(phase, [1] * L) for phase in steps]  # one kvfix hook a layer, throughout
    log.clear()
    hooks.clear()
    with kvfix.hf.enable(llava, _Layers("prefill", ["prefill"], log, hooks)) as handle:
        for _ in range(2):  # a second prompt: hooked again for its prefill
            assert torch.equal(llava.generate(**inputs, **kw), plain)
        llava.generate(**inputs, max_new_tokens=1)  # a prompt alone leaves its hooks on
        assert all(len(layer._forward_pre_hooks) == 1 for layer in handle.adapter.decoder_layers())
    assert log == [("prefill", "prefill", layer) for _ in range(3) for layer in range(L)]
    assert hooks == [(phase, [1 if phase == "prefill" else 0] * L) for phase in steps * 2 + ["prefill"]]
    assert all(len(layer._forward_pre_hooks) == 0 for layer in llava.get_decoder().layers)  # disable removes them


def test_attention_phases_leave_methods_out_of_the_chain(llava):
    """A method whose `attention_phases` lacks a forward's phase is not called in that forward
    (the others still are, in their order); with none left the model's own attention runs, and
    the tokens are those of the plain model. The built-in methods declare theirs."""
    assert kvfix.hf.DSCR.attention_phases == kvfix.hf.SCR.attention_phases == {"prefill"}
    assert kvfix.hf.KVSmooth.attention_phases == {"decode"}
    assert kvfix.hf.CMAC.attention_phases == {"prefill", "decode"}
    inputs, _ = make_prompt(llava, "llava", [(3, 3)], 0)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    plain = llava.generate(**inputs, **kw)
    log = []
    methods = (_Calls("both", None, log), _Calls("prefill", ["prefill"], log), _Calls("decode", ["decode"], log))
    with kvfix.hf.enable(llava, *methods):
        out = llava.generate(**inputs, **kw)
    assert torch.equal(out, plain)
    L = llava.config.text_config.num_hidden_layers
    chain = {"prefill": ["both", "prefill"], "decode": ["both", "decode"]}
    steps = ["prefill", "decode", "decode"]  # 3 new tokens: the prompt, then two decoding forwards
    assert log == [(name, phase, layer) for phase in steps for layer in range(L) for name in chain[phase]]
    log.clear()
    with kvfix.hf.enable(llava, _Calls("prefill", ["prefill"], log)):
        out = llava.generate(**inputs, **kw)
    assert torch.equal(out, plain)
    assert log == [("prefill", "prefill", layer) for layer in range(L)]
