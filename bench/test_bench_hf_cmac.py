"""CMAC in `generate` (METHODS §4, issue 6 item 3): `pytest bench/test_bench_hf_cmac.py --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]). Whole `model.generate` cost per
new token, with and without `kvfix.hf.CMAC()`, on a small random-weight LLaVA (CLIP tower, Llama
text model: hidden 512, 8 heads, D 64, 4 layers; a 12 x 12 patch grid, so 144 image tokens in a
~170-token prompt), greedy, N_NEW tokens (min_new_tokens = max_new_tokens), fp32:

- "plain": `model.generate` with the handle suspended (the model's own attention, SDPA);
- "cmac": the same call with CMAC on (both branches in one batched forward of 2 rows, the CMAC
  attention op in every layer, the contrast in the logits);
- "cmpc": CMAC(imd=False): one branch, calibrated attention only (what the attention op and the
  calibration cost without the second branch).

Per-token time = the median whole-generate time (prefill included) / N_NEW; variants
interleaved in balanced orders (common.balanced_orders) (the machines are shared and noisy: compare ratios within one
run). Target: cmac <= 2.2 x plain per token. `python -m bench.test_bench_hf_cmac` prints the table.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.test_bench_kvsmooth import _threads  # noqa: E402

N_NEW = 32          # tokens per generate call
TARGET = 2.2        # CMAC per token <= 2.2 x plain greedy
GEOMETRY = dict(num_layers=4, hidden=512, heads=8, kv_heads=8, image_size=96, patch_size=8)
QUICK_GEOMETRY = dict(num_layers=2, hidden=64, heads=4, kv_heads=2, image_size=32, patch_size=8)


def setup(quick: bool = False):
    """(model, inputs): the random LLaVA and a one-image prompt."""
    from kvfix.hf import testing
    model = testing.tiny_llava(**(QUICK_GEOMETRY if quick else GEOMETRY))
    inputs, _ = testing.llava_prompt(model, [1], text_len=8)
    return model, inputs


def generate(model, inputs, n_new: int):
    return model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)


def variant_fns(model, inputs, n_new: int) -> dict:
    """name -> zero-argument callable: one whole generate call of the variant (CMAC variants enable
    their handle around the call: a few hooks, well under a millisecond next to the generate)."""
    from kvfix import hf

    def run(method):
        def fn():
            if method is None:
                return generate(model, inputs, n_new)
            with hf.enable(model, method):
                return generate(model, inputs, n_new)
        return fn

    return {"plain": run(None), "cmac": run(hf.CMAC()), "cmpc": run(hf.CMAC(imd=False))}


def cmac_hf_rows(quick: bool = False, reps: int = 7, threads: int | None = None,
                 budget: common.Budget | None = None) -> list[dict]:
    """reps: at most (2 quick); budget: the time the row may take, model set-up included
    (common.interleave: at least one repeat; None: exactly reps)."""
    torch.set_num_threads(threads or _threads())
    budget = budget or common.Budget(None)
    model, inputs = setup(quick)
    n_new = 4 if quick else N_NEW
    fns = variant_fns(model, inputs, n_new)
    with torch.no_grad():
        tm = common.interleave(fns, budget, max_reps=2 if quick else reps, required=("plain",),
                               relative={"cmac": TARGET, "cmpc": 1.0})
    cfg = model.config.get_text_config()
    return [dict(prompt=inputs["input_ids"].shape[1], n_new=n_new, layers=cfg.num_hidden_layers,
                 hidden=cfg.hidden_size, threads=torch.get_num_threads(), reps=tm.reps, skipped=tm.skipped,
                 **{f"{k}_ms": tm.ms(k) / n_new for k in fns}, ratio=tm.ms("cmac") / tm.ms("plain"),
                 ratio_cmpc=tm.ms("cmpc") / tm.ms("plain"))]


def render(rows: list[dict]) -> str:
    out = ["| generate (per token) | prompt | new tokens | threads | plain ms | CMAC ms | CMAC/plain | "
           "CMPC only ms | CMPC/plain | reps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| random LLaVA, {r['layers']} layers, hidden {r['hidden']}, fp32, greedy | {r['prompt']} | "
                   f"{r['n_new']} | {r['threads']} | {common.cell(r, 'plain')} | {common.cell(r, 'cmac')} | {common.num(r['ratio'])} | "
                   f"{common.cell(r, 'cmpc')} | {common.num(r['ratio_cmpc'])} | {r['reps']} |")
    for r in rows:
        ok = common.verdict(r["ratio"], TARGET)
        out += ["", f"Target (issue 6): CMAC per token {common.num(r['ratio'])} x plain greedy (<= {TARGET}): {ok}"]
    return "\n".join(out)


def cmac_hf_section(quick: bool, budget: common.Budget | None = None) -> str:
    """The CMAC generate table (markdown) for bench/table.py; quick: a tiny model, 4 tokens;
    budget: the time it may take."""
    return ("## CMAC in generate (issue 6)\n\n" + render(cmac_hf_rows(quick=quick, budget=budget)) + "\n\nWhole `model.generate` "
            "time (prefill included) / new tokens, interleaved medians; CMAC runs both branches in one batched "
            "forward (method: the docstring of bench/test_bench_hf_cmac.py).")


# --------------------------------------------------------------------------------------------
# pytest-benchmark

@pytest.fixture(scope="module")
def bench_setup():
    torch.set_num_threads(_threads())
    return setup()


@pytest.mark.parametrize("variant", ["plain", "cmac", "cmpc"])
def test_generate_per_token(benchmark, bench_setup, variant):
    model, inputs = bench_setup
    benchmark.group = (f"generate {N_NEW} tokens, random LLaVA hidden {GEOMETRY['hidden']}, "
                       f"{GEOMETRY['num_layers']} layers")
    benchmark.extra_info.update(prompt=inputs["input_ids"].shape[1], new_tokens=N_NEW, **GEOMETRY)
    fn = variant_fns(model, inputs, N_NEW)[variant]
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="CMAC generate benchmark (interleaved medians)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 tokens: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repeats")
    args = ap.parse_args()
    print(render(cmac_hf_rows(quick=args.quick, reps=args.reps, threads=args.threads)))
