"""Prefill cost of kvfix.hf.DSCR: `pytest bench/test_bench_hf_dscr.py --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]).

What is timed: `model.generate(..., max_new_tokens=1)` (vision tower, prefill, first token) on
the random-weight LLaVA of bench/test_bench_hf_scr.py (LLaVA-1.5's image span: a 24 x 24 grid,
576 image tokens, then TEXT_AFTER text tokens; text model of L layers, hidden 1024, 16 heads),
with and without `kvfix.hf.DSCR(depth_maps="uniform")` (default layers [L/4, L)); and the
refinement itself: the DSCR op on one layer's image keys and values ([1, 16, 576, 64], grid
form, method "auto"), times the number of selected layers.

Analytic cost: besides the refinement, DSCR runs each selected layer's attention a second time
for the T_a queries after the image end (the plain call covers all T queries with the plain image
keys; the second one only the T_a with the refined ones, over all T keys), clones that layer's
keys and values and merges the two outputs. The attention of all T queries is ~T / (6 C) of a
layer's work (T tokens, hidden C; the projections and MLP are ~24 T C^2), that of T_a queries
~T_a / (6 C), so prefill with DSCR costs about 1 + (S / L) T_a / (6 C) of plain prefill plus the
refinement (S selected layers): ~1.01 at this benchmark's C = 1024 and T_a = TEXT_AFTER, ~1.001
for LLaVA-1.5-7B (C = 4096) with a 40-token question.

`dscr_hf_rows()` measures both variants interleaved (balanced orders: common.balanced_orders; medians) and the
refinement alone, as bench/table.py reports; `python -m bench.test_bench_hf_dscr` prints that
table.
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
from bench.test_bench_hf_scr import LAYERS, PATCH, QUICK, TEXT_AFTER, _threads, prefill, setup_model  # noqa: E402

BUDGET = 1.15  # prefill with DSCR <= BUDGET x plain prefill + the refinement itself


def _refine_fn(model, n_layers: int):
    """The refinement alone: the DSCR op on one layer's image K and V, n_layers times."""
    import kvfix
    tc = model.config.text_config
    g = model.config.vision_config.image_size // PATCH
    H, D = tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, H, g * g, D, generator=gen) for _ in range(2))
    depth = torch.zeros(g * g)  # "uniform", as timed

    def run():
        for _ in range(n_layers):
            kvfix.dscr_refine(k, v, depth, (g, g))
    return run


def dscr_hf_rows(quick: bool = False, reps: int = 9, threads: int | None = None,
                 budget: common.Budget | None = None) -> list[dict]:
    """One row: prefill ms with and without DSCR, the refinement's ms, and
    (DSCR - refinement) / plain against the BUDGET. reps: at most (3 quick); budget: the time the
    whole row may take, model set-up included (common.interleave: at least one repeat; None:
    exactly reps)."""
    budget = budget or common.Budget(None)
    from kvfix import hf
    torch.set_num_threads(threads or _threads())
    cfg = QUICK if quick else {}
    model, inputs = setup_model(**cfg)
    dscr = hf.DSCR(missing_depth="uniform")
    handle = hf.enable(model, dscr)
    try:
        def plain():
            with handle.suspended():
                prefill(model, inputs)

        refine = _refine_fn(model, len(dscr.selected_layers))
        tm = common.interleave({"plain": plain, "dscr": lambda: prefill(model, inputs), "refine": refine}, budget,
                               max_reps=3 if quick else reps, required=("plain",), relative={"dscr": BUDGET})
    finally:
        handle.disable()
    tc = model.config.text_config
    ids = inputs["input_ids"][0]
    T = int(ids.shape[0])
    Ta = T - (int((ids == model.config.image_token_id).nonzero().max()) + 1)  # queries after the image end
    S, L, C = len(dscr.selected_layers), tc.num_hidden_layers, tc.hidden_size
    return [dict(L=L, S=S, grid=model.config.vision_config.image_size // PATCH, T=T, hidden=C,
                 plain_ms=tm.ms("plain"), dscr_ms=tm.ms("dscr"), refine_ms=tm.ms("refine"),
                 ratio=(tm.ms("dscr") - tm.ms("refine")) / tm.ms("plain"), analytic=1 + (S / L) * Ta / (6 * C),
                 reps=tm.reps, skipped=tm.skipped, threads=torch.get_num_threads())]


def render(rows: list[dict]) -> str:
    out = ["| prefill (generate, 1 token) | prompt tokens | threads | plain ms | DSCR ms | refinement ms "
           f"| (DSCR - refinement) / plain | ~ 1 + (S/L) T_a/(6C) | budget | reps |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| LLaVA, {r['grid']}x{r['grid']} image, hidden {r['hidden']}, L={r['L']}, S={r['S']} | {r['T']} | "
                   f"{r['threads']} | {common.cell(r, 'plain', '.4g')} | {common.cell(r, 'dscr', '.4g')} | "
                   f"{common.cell(r, 'refine', '.4g')} | "
                   f"{common.num(r['ratio'], '.3f')} | {r['analytic']:.3f} | {BUDGET} | {r['reps']} |")
    return "\n".join(out)


def dscr_hf_section(quick: bool, budget: common.Budget | None = None) -> str:
    """The DSCR prefill-cost table (markdown) for bench/table.py, within `budget`."""
    rows = dscr_hf_rows(quick=quick, budget=budget)
    return ("## DSCR in transformers: prefill cost\n\n" + render(rows) + "\n\nDSCR refines each image inside the "
            "prefill (the tokens after the image read it refined, METHODS §1): each selected layer's attention runs "
            "a second time for the T_a queries after the image end (with the refined image keys; eager and SDPA "
            "attention; other implementations: for all queries) besides the refinement, about (S / L) T_a / (6 C) "
            "more than plain prefill (LLaVA-1.5-7B, C = 4096, a 40-token question: ~0.1%). Random-weight LLaVA, "
            "fp32, interleaved medians (bench/test_bench_hf_dscr.py).")


# --------------------------------------------------------------------------------------------
# pytest-benchmark

@pytest.fixture(scope="module")
def model_inputs():
    torch.set_num_threads(_threads())
    return setup_model()


@pytest.mark.parametrize("variant", ["plain", "dscr"])
def test_prefill(benchmark, model_inputs, variant):
    from kvfix import hf
    model, inputs = model_inputs
    benchmark.group = f"prefill, LLaVA {model.config.vision_config.image_size // PATCH}^2 image + {TEXT_AFTER} text tokens, L={LAYERS}"
    benchmark.extra_info.update(layers=LAYERS, tokens=int(inputs["input_ids"].shape[1]))
    handle = hf.enable(model, hf.DSCR(missing_depth="uniform")) if variant == "dscr" else None
    try:
        benchmark.pedantic(lambda: prefill(model, inputs), rounds=5, warmup_rounds=1)
    finally:
        if handle is not None:
            handle.disable()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="DSCR prefill cost (interleaved medians)")
    ap.add_argument("--quick", action="store_true", help="a small model: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repeats")
    args = ap.parse_args()
    print(render(dscr_hf_rows(quick=args.quick, reps=args.reps, threads=args.threads)))
