"""KVSmooth benchmarks (METHODS §2, issue 4 item 5): `pytest bench/test_bench_kvsmooth.py --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]). Two sets:

1. One decoding step of one layer at B=1, Hq=Hkv=32, D=128, T in {512, 2048, 8192}, fp32 and bf16,
   one benchmark group per (T, dtype) holding three variants:
   - "kvfix": `kvfix.kvsmooth_step_` (entropy, queue, rank, clip, in-place EMA; one pass over K);
   - "eager": the same step in plain PyTorch as one would write it (`eager_step`): logits and
     softmax probabilities materialised in fp32, entropy, queue push with torch.cat, the rank
     k / M through torch.sort + searchsorted, EMA by slicing;
   - "copy": `dst.copy_(k)` into a preallocated buffer. **Floor = half the copy time**: a copy
     moves K's bytes twice (read + write), so half of it is one read of K at copy bandwidth, the
     least any exact implementation must do.
   Every call (of every variant) starts with the cache emptied (common.CacheEvictor, untimed), as
   in decoding, where the other layers run between two steps of one layer. Without it, what a
   call found in the cache depended on the variant before it: T = 2048 measured 0.78-0.94 x the
   floor after a read of K and 1.07-1.14 x after an eviction (fp32, bf16).
2. Whole decoding with and without KVSmooth on a random-weight LLaVA whose text model has
   LLaVA-1.5's attention geometry (hidden 4096 = 32 heads x D 128, intermediate 8192, 2 layers,
   KVSmooth on both) and a ~1000-token prompt: `generate` continues from a prefilled cache (a fresh
   copy per round) for N_NEW tokens; per-token time = round time / N_NEW.

`kvsmooth_rows()` measures both sets with the variants interleaved (balanced orders: common.balanced_orders; medians), which
is what the targets are judged on (the machines are shared and noisy: compare ratios within one
run); `python -m bench.test_bench_kvsmooth` prints that table.
"""
from __future__ import annotations

import copy
import os
import sys

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import kvfix  # noqa: E402
from bench import common  # noqa: E402

B, H, D = 1, 32, 128
STEP_T = (512, 2048, 8192)
STEP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTEXT = 1000     # prompt tokens of the generate benchmark (about)
N_NEW = 8          # tokens generated per timed round
TARGET_STEP = 1.3  # kvfix <= 1.3 x floor at T = 2048 and 8192
TARGET_GEN = 1.15  # per-token time with KVSmooth <= 1.15 x plain decoding
STEP_SHARE = 0.4   # of kvsmooth_rows' budget for the step rows (the rest: the generate row)


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# one decoding step

def eager_step(q, k, v, queue, *, scale, lam_ref=0.9, band=0.2):
    """KVSmooth's step in plain PyTorch (materialised softmax, sort-based rank), in place; lam [B]."""
    Bq, Hq, _, Dq = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    qf = q.float().reshape(Bq, Hkv, Hq // Hkv, Dq)
    p = torch.softmax(torch.matmul(qf, k.float().transpose(-1, -2)) * scale, dim=-1)  # [B, Hkv, g, T]
    ent = -(p * torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
    z = ent.mean(dim=(1, 2))
    new = torch.cat([queue[:, 1:], z[:, None]], dim=1)
    queue.copy_(new)
    srt = torch.sort(torch.nan_to_num(new, nan=float("inf")), dim=1).values
    rank = torch.searchsorted(srt, z[:, None].contiguous(), right=True).squeeze(1).float() / new.shape[1]  # #{<= z}
    lam = rank.clamp(lam_ref - band, lam_ref + band).clamp(0.0, 1.0)
    if T >= 2:
        lw = lam.view(Bq, 1, 1)
        for x in (k, v):
            x[:, :, -1] = ((1 - lw) * x[:, :, -1].float() + lw * x[:, :, -2].float()).to(x.dtype)
    return lam


def step_inputs(T: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    v = torch.randn(B, H, T, D, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, dst=torch.empty_like(k), queue=torch.full((B, 15), float("nan")),
                queue_eager=torch.full((B, 15), float("nan")), scale=D ** -0.5)


def step_fns(inp: dict) -> dict:
    q, k, v = inp["q"], inp["k"], inp["v"]
    return {
        "eager": lambda: eager_step(q, k, v, inp["queue_eager"], scale=inp["scale"]),
        "kvfix": lambda: kvfix.kvsmooth_step_(q, k, v, inp["queue"], scale=inp["scale"]),
        "copy": lambda: inp["dst"].copy_(k),
    }


def check_step_agreement(T: int = 300) -> float:
    """max |lam_eager - lam_kvfix| over a few steps on fresh caches (the benchmark's eager variant
    computes the same thing)."""
    inp = step_inputs(T, torch.float32, seed=1)
    k2, v2 = inp["k"].clone(), inp["v"].clone()
    err = 0.0
    for _ in range(4):
        a = kvfix.kvsmooth_step_(inp["q"], inp["k"], inp["v"], inp["queue"], scale=inp["scale"])
        b = eager_step(inp["q"], k2, v2, inp["queue_eager"], scale=inp["scale"])
        err = max(err, float((a - b).abs().max()))
    return err


# --------------------------------------------------------------------------------------------
# whole decoding

def llava_geometry_model(num_layers: int = 2):
    """Random-weight LLaVA whose text model has LLaVA-1.5's attention geometry."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kvfix.hf import testing
    return testing.tiny_llava(num_layers=num_layers, hidden=H * D, heads=H, kv_heads=H)


def prefilled(model, context: int = CONTEXT):
    """(input_ids with the next token appended, attention mask, the prompt's cache)."""
    from kvfix.hf import testing
    inputs, _ = testing.llava_prompt(model, [1], text_len=max(1, (context - 20) // 2))
    with torch.no_grad():
        out = model(**inputs)
    ids = torch.cat([inputs["input_ids"], out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    return ids, mask, out.past_key_values


def decode_round(model, ids, mask, cache, n_new: int = N_NEW):
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False)


# --------------------------------------------------------------------------------------------
# interleaved measurement (the figures the targets are judged on)

def kvsmooth_rows(step_reps: int = 31, gen_reps: int = 5, quick: bool = False, threads: int | None = None,
                  generate: bool = True, budget: common.Budget | None = None) -> list[dict]:
    """Rows of the KVSmooth table: step (per T and dtype) and generate. quick: small shapes only;
    threads: torch threads (default: the cores available); step_reps, gen_reps: at most (3 quick);
    budget: the time all rows may take (common.interleave; STEP_SHARE of it for the step rows, the
    rest for the generate row, model set-up included; at least one repeat each; None: exactly the
    reps)."""
    torch.set_num_threads(threads or _threads())
    budget = budget or common.Budget(None)
    steps = common.Budget(None if budget.seconds is None else budget.left() * (1 if quick or not generate
                                                                               else STEP_SHARE))
    todo = [(dt, dtype, T) for dt, dtype in STEP_DTYPES.items() for T in ((64, 256) if quick else STEP_T)]
    rows = []
    evict = common.CacheEvictor()
    for i, (dt, dtype, T) in enumerate(todo):
        inp = step_inputs(T, dtype)
        tm = common.interleave(step_fns(inp), steps.share(len(todo) - i), max_reps=3 if quick else step_reps,
                               required=("kvfix", "copy"), before=evict)
        floor = tm.med.get("copy", float("nan")) / 2
        rows.append(dict(kind="step", T=T, dtype=dt, eager_ms=tm.ms("eager"), kvfix_ms=tm.ms("kvfix"),
                         floor_ms=floor * 1e3, ratio=tm.ms("kvfix") / (floor * 1e3),
                         speedup=tm.ms("eager") / tm.ms("kvfix"), reps=tm.reps, skipped=tm.skipped,
                         threads=torch.get_num_threads()))
    if quick or not generate:
        return rows
    from kvfix import hf
    model = llava_geometry_model()
    ids, mask, cache = prefilled(model)
    handle = hf.enable(model, hf.KVSmooth(layers=range(2)))
    try:
        def plain(past_key_values):
            with handle.suspended():
                decode_round(model, ids, mask, past_key_values)

        def smoothed(past_key_values):
            decode_round(model, ids, mask, past_key_values)

        tm = common.interleave({"plain": plain, "kvsmooth": smoothed}, budget, max_reps=gen_reps,
                               setup=lambda n: {"past_key_values": copy.deepcopy(cache)}, required=("plain",))
    finally:
        handle.disable()
    rows.append(dict(kind="generate", T=ids.shape[1], dtype="fp32", plain_ms=tm.ms("plain") / N_NEW,
                     kvsmooth_ms=tm.ms("kvsmooth") / N_NEW, ratio=tm.ms("kvsmooth") / tm.ms("plain"), reps=tm.reps,
                     skipped=tm.skipped, threads=torch.get_num_threads()))
    return rows


def render(rows: list[dict]) -> str:
    out = ["| op | shape | dtype | threads | eager ms | kvfix ms | speedup (eager/kvfix) | floor ms (copy/2) | "
           "kvfix/floor | reps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "step":
            out.append(f"| kvsmooth_step_ | B={B} H={H} T={r['T']} D={D} | {r['dtype']} | {r['threads']} | "
                       f"{common.cell(r, 'eager')} | {common.cell(r, 'kvfix')} | {common.num(r['speedup'], '.2f', 'x')} | {r['floor_ms']:.3g} | "
                       f"{common.num(r['ratio'])} | {r['reps']} |")
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        out += ["", "| generate (per token) | context | dtype | threads | plain ms | KVSmooth ms | KVSmooth/plain | reps |",
                "|---|---|---|---|---|---|---|---|"]
        for r in gen:
            out.append(f"| LLaVA-1.5 attention geometry, 2 layers, KVSmooth on both | {r['T']} | {r['dtype']} | "
                       f"{r['threads']} | {common.cell(r, 'plain')} | {common.cell(r, 'kvsmooth')} | {common.num(r['ratio'], '.3f')} | "
                       f"{r['reps']} |")
    verdicts = []
    for r in rows:
        if r["kind"] == "step" and r["T"] in (2048, 8192):
            ok = common.verdict(r["ratio"], TARGET_STEP)
            verdicts.append(f"- {r['dtype']} T={r['T']} ({r['threads']} threads): kvfix/floor = {r['ratio']:.2f} "
                            f"(target <= {TARGET_STEP}): {ok}; speedup over eager {common.num(r['speedup'], '.1f', 'x')}")
        if r["kind"] == "generate":
            ok = common.verdict(r["ratio"], TARGET_GEN)
            verdicts.append(f"- decode with KVSmooth ({r['threads']} threads): {common.num(r['ratio'], '.3f')} x plain per token "
                            f"(target <= {TARGET_GEN}): {ok}")
    if verdicts:
        out += ["", "Targets (issue 4, CPU):", ""] + verdicts
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# pytest-benchmark

STEP_CASES = [(T, dt) for dt in STEP_DTYPES for T in STEP_T]


@pytest.fixture(scope="module", params=STEP_CASES, ids=lambda c: f"T{c[0]}-{c[1]}")
def step_case(request):
    torch.set_num_threads(_threads())
    T, dt = request.param
    inp = step_inputs(T, STEP_DTYPES[dt])
    return T, dt, step_fns(inp), common.CacheEvictor()


@pytest.mark.parametrize("variant", ["eager", "kvfix", "copy"])
def test_kvsmooth_step(benchmark, step_case, variant):
    T, dt, fns, evict = step_case
    benchmark.group = f"kvsmooth_step B={B} H={H} T={T} D={D} {dt} (floor = copy / 2)"
    benchmark.extra_info.update(B=B, H=H, T=T, D=D, dtype=dt, threads=torch.get_num_threads())
    benchmark.pedantic(fns[variant], setup=evict, rounds=30 if T <= 2048 else 10, warmup_rounds=2, iterations=1)


def test_eager_variant_agrees():
    assert check_step_agreement() < 1e-6


@pytest.fixture(scope="module")
def decode_setup():
    torch.set_num_threads(_threads())
    model = llava_geometry_model()
    return model, *prefilled(model)


@pytest.mark.parametrize("variant", ["plain", "kvsmooth"])
def test_generate_per_token(benchmark, decode_setup, variant):
    from kvfix import hf
    model, ids, mask, cache = decode_setup
    benchmark.group = f"generate {N_NEW} tokens after a {ids.shape[1]}-token prompt, LLaVA-1.5 attention geometry"
    benchmark.extra_info.update(context=ids.shape[1], new_tokens=N_NEW, layers=2, hidden=H * D)
    handle = hf.enable(model, hf.KVSmooth(layers=range(2))) if variant == "kvsmooth" else None
    try:
        benchmark.pedantic(lambda past_key_values: decode_round(model, ids, mask, past_key_values),
                           setup=lambda: ((), {"past_key_values": copy.deepcopy(cache)}), rounds=3, warmup_rounds=1)
    finally:
        if handle is not None:
            handle.disable()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="KVSmooth benchmark table (interleaved medians)")
    ap.add_argument("--quick", action="store_true", help="small shapes, no generate: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--reps", type=int, default=31, help="interleaved repeats per step row")
    ap.add_argument("--no-generate", action="store_true", help="step rows only")
    args = ap.parse_args()
    print(f"eager vs kvfix max |lam| difference: {check_step_agreement():.1e}")
    print(render(kvsmooth_rows(step_reps=args.reps, quick=args.quick, threads=args.threads,
                               generate=not args.no_generate)))
