"""Prefill cost of kvfix.hf.SCR: `pytest bench/test_bench_hf_scr.py --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]).

What is timed: `model.generate(..., max_new_tokens=1)` (vision tower, prefill, first token) on a
random-weight LLaVA whose image span is LLaVA-1.5's (336 px, patch 14: a 24 x 24 grid, 576
image tokens) followed by TEXT_AFTER text tokens, text model of L layers (hidden 1024, 16 heads),
with and without `kvfix.hf.SCR()` (defaults: diagnostic layers 0 and 1, redistribution 1..4).
`generate` encodes the image once; SCR adds the diagnostic pass (the prompt through layers 0 and
the attention of layer 1, no cache kept), the scoring (`kvfix.scr_scores` on the text queries
only) and the redistribution of 576 hidden states in 4 layers.

Analytic cost: the diagnostic pass runs d of the L layers (d = 2 diagnostic layers, the last
one up to its attention scores) plus the embedding of the prompt, so prefill time grows by
about d / L: 1 + 2/8 = 1.25 for the benchmark's 8 layers, 1 + 2/32 = 1.06 for LLaVA-1.5-7B's
32, 1 + 2/40 = 1.05 for 13B. Scoring and redistribution are O(T_text * T * heads) and O(N * C):
negligible next to a layer's O(T * C^2) projections. Decoding is untouched. Measured figures:
bench/RESULTS.md and docs/SCR_HF.md.

`scr_hf_rows()` measures both variants interleaved (balanced orders: common.balanced_orders; medians), as bench/table.py
reports; `python -m bench.test_bench_hf_scr` prints that table.
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

LAYERS = 8
HIDDEN, HEADS = 1024, 16
IMAGE_SIZE, PATCH = 336, 14   # LLaVA-1.5's grid: 24 x 24
TEXT_AFTER = 48               # text tokens after the image (the diagnostic queries)
QUICK = dict(layers=4, hidden=128, heads=4, image_size=112)  # 8 x 8 grid: a smoke run


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def setup_model(layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS, image_size: int = IMAGE_SIZE):
    """(model, inputs) for the timed prefill."""
    from kvfix.hf import testing
    model = testing.tiny_llava(num_layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
                               image_size=image_size, patch_size=PATCH)
    inputs, _ = testing.llava_prompt(model, [1], text_len=TEXT_AFTER)
    return model, inputs


def prefill(model, inputs):
    return model.generate(**inputs, max_new_tokens=1, do_sample=False)


def scr_hf_rows(quick: bool = False, reps: int = 9, threads: int | None = None,
                budget: common.Budget | None = None) -> list[dict]:
    """One row: prefill ms with and without SCR, their ratio and the analytic bound 1 + d / L.
    reps: at most (3 quick); budget: the time the whole row may take, model set-up included
    (common.interleave: at least one repeat; None: exactly reps)."""
    budget = budget or common.Budget(None)
    from kvfix import hf
    torch.set_num_threads(threads or _threads())
    cfg = QUICK if quick else {}
    model, inputs = setup_model(**cfg)
    scr = hf.SCR()
    handle = hf.enable(model, scr)
    try:
        def plain():
            with handle.suspended():
                prefill(model, inputs)

        L = model.config.text_config.num_hidden_layers
        d = len(scr.selected_diagnostic_layers)
        tm = common.interleave({"plain": plain, "scr": lambda: prefill(model, inputs)}, budget,
                               max_reps=3 if quick else reps, required=("plain",), relative={"scr": 1 + d / L})
    finally:
        handle.disable()
    g = model.config.vision_config.image_size // PATCH
    return [dict(L=L, d=d, grid=g, T=int(inputs["input_ids"].shape[1]), hidden=model.config.text_config.hidden_size,
                 plain_ms=tm.ms("plain"), scr_ms=tm.ms("scr"), ratio=tm.ms("scr") / tm.ms("plain"),
                 bound=1 + d / L, reps=tm.reps, skipped=tm.skipped, threads=torch.get_num_threads())]


def render(rows: list[dict]) -> str:
    out = ["| prefill (generate, 1 token) | prompt tokens | threads | plain ms | SCR ms | SCR/plain | ~ 1 + d/L "
           "| reps |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| LLaVA, {r['grid']}x{r['grid']} image, hidden {r['hidden']}, L={r['L']}, d={r['d']} | {r['T']} | "
                   f"{r['threads']} | {common.cell(r, 'plain', '.4g')} | {common.cell(r, 'scr', '.4g')} | {common.num(r['ratio'], '.3f')} | "
                   f"{r['bound']:.3f} | "
                   f"{r['reps']} |")
    return "\n".join(out)


def scr_hf_section(quick: bool, budget: common.Budget | None = None) -> str:
    """The SCR prefill-cost table (markdown) for bench/table.py, within `budget`."""
    rows = scr_hf_rows(quick=quick, budget=budget)
    return ("## SCR in transformers: prefill cost\n\n" + render(rows) + "\n\nSCR runs a diagnostic pass through the "
            "first d = 2 of the L layers before the real prefill: prefill time grows by about d / L (LLaVA-1.5-7B, "
            "L = 32: ~6%); decoding is untouched. Random-weight LLaVA, fp32, interleaved medians "
            "(bench/test_bench_hf_scr.py).")


# --------------------------------------------------------------------------------------------
# pytest-benchmark

@pytest.fixture(scope="module")
def model_inputs():
    torch.set_num_threads(_threads())
    return setup_model()


@pytest.mark.parametrize("variant", ["plain", "scr"])
def test_prefill(benchmark, model_inputs, variant):
    from kvfix import hf
    model, inputs = model_inputs
    benchmark.group = f"prefill, LLaVA {IMAGE_SIZE // PATCH}^2 image + {TEXT_AFTER} text tokens, L={LAYERS}"
    benchmark.extra_info.update(layers=LAYERS, hidden=HIDDEN, tokens=int(inputs["input_ids"].shape[1]))
    handle = hf.enable(model, hf.SCR()) if variant == "scr" else None
    try:
        benchmark.pedantic(lambda: prefill(model, inputs), rounds=5, warmup_rounds=1)
    finally:
        if handle is not None:
            handle.disable()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="SCR prefill cost (interleaved medians)")
    ap.add_argument("--quick", action="store_true", help="a small model: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repeats")
    args = ap.parse_args()
    print(render(scr_hf_rows(quick=args.quick, reps=args.reps, threads=args.threads)))
