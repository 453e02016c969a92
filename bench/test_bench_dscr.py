"""pytest-benchmark microbenchmarks of DSCR: `pytest bench/ --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]). One benchmark group per
shape and dtype, holding the eager reference, kvfix and the two GEMM floors (bench/common.py),
so `--benchmark-group-by=group` compares them side by side. N=16384 (seconds a call) runs only
with KVFIX_BENCH_LARGE=1; its eager reference is never run (it needs several GiB).
For the one-run table with errors and memory, use `python -m bench.table`.
"""
import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import kvfix
from bench import common
from kvfix import dscr_structured as S

torch.set_num_threads(common.threads())

LARGE = os.environ.get("KVFIX_BENCH_LARGE", "") not in ("", "0")
CASES = [(shape, dt) for shape in common.FULL_SHAPES for dt in shape.dtypes
         if shape.N < 16384 or LARGE]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0].name}-{c[1]}")
def case(request):
    shape, dt = request.param
    inp = common.make_inputs(shape, common.DTYPES[dt])
    return shape, dt, common.variant_fns(inp, with_reference=shape.ref_skip is None)


@pytest.mark.parametrize("variant", ["reference", "kvfix", "floor", "mm_floor"])
def test_dscr(benchmark, case, variant):
    shape, dt, fns = case
    if variant not in fns:
        pytest.skip(f"{variant}: {shape.ref_skip}")
    benchmark.group = f"{shape.label} {dt}"
    benchmark.extra_info.update(B=shape.B, H=shape.H, N=shape.N, D=shape.D, dtype=dt,
                                threads=torch.get_num_threads())
    rounds = 3 if shape.N >= 4096 else 10
    outs = benchmark.pedantic(fns[variant], rounds=rounds, warmup_rounds=1, iterations=1)
    assert outs[0].shape == (shape.B, shape.H, shape.N, shape.D)


# --------------------------------------------------------------------------------------------
# Structured DSCR (issues 7, 13): grid form coords=(gh, gw), kvfix/dscr_structured.py
#
# At the default units (patch coordinates, depth maps pooled by kvfix.patch_depth to [0, 255]),
# on the depth maps of bench.common.depth_map. Variants per row: "structured"
# (kvfix.dscr_refine with coords=(gh, gw), method="structured": the fastest structured variant
# by the plan), "in_place" (kvfix.dscr_refine_cache_ on copies of K and V, method="structured":
# the cache path of kvfix.hf.DSCR, no fresh output pages), "auto" (method="auto": what models
# run), "dense" (kvfix.dscr_refine with tensor coords: the dense kernel), "reference" (eager,
# N x N; first map of a shape only: its cost does not depend on the map), "floor" (the bare GEMMs
# W @ K, W @ V: the work any dense implementation does) and "copy" (K.clone(), V.clone(): reading
# K and V once and writing both outputs once, the floor of any implementation). Dense variants are
# not run where they take seconds (N = 16384).

STRUCT_MAPS = ("surfaces-1", "surfaces-3", "surfaces-20", "ramp")
STRUCT_SHAPES = [
    common.Shape("LLaVA-1.5", 1, 32, 24, 24, 128, ("fp32", "bf16")),
    common.Shape("64x64", 1, 4, 64, 64, 128, ("fp32",)),
    common.Shape("128x128", 1, 4, 128, 128, 128, ("fp32",), ref_skip="dense variants take seconds", err_cols=512),
]
STRUCT_QUICK = [
    common.Shape("tiny", 1, 2, 6, 8, 16, ("fp32", "bf16")),
    common.Shape("skip-path", 1, 2, 16, 16, 16, ("fp32",), ref_skip="quick: no dense variants", err_cols=32),
]
STRUCT_VARIANTS = ("structured", "in_place", "auto", "dense", "reference", "floor", "copy")


def struct_rows(quick: bool) -> list:
    """(shape, dtype, depth map) of the section: every map at fp32; bf16 on the ramp only."""
    shapes = STRUCT_QUICK if quick else STRUCT_SHAPES
    return [(s, dt, m) for s in shapes for dt in s.dtypes for m in STRUCT_MAPS if dt == "fp32" or m == "ramp"]


def struct_inputs(shape, dt: str, depth_kind: str, floor: bool = True) -> dict:
    return common.make_inputs(shape, common.DTYPES[dt], floor=floor, depth_kind=depth_kind, depth_scale=255.0)


def structured_fns(shape, inp: dict, reference: bool = True) -> dict:
    k, v, depth = inp["k"], inp["v"], inp["depth"]
    grid = (shape.gh, shape.gw)
    kc, vc = k.clone(), v.clone()  # refined again and again by "in_place" (values stay bounded)

    def in_place():
        kvfix.dscr_refine_cache_([kc], [vc], depth, grid, method="structured", **common.PARAMS)
        return kc, vc
    fns = {"structured": lambda: kvfix.dscr_refine(k, v, depth, grid, method="structured", **common.PARAMS),
           "in_place": in_place, "auto": lambda: kvfix.dscr_refine(k, v, depth, grid, **common.PARAMS),
           "copy": lambda: (k.clone(), v.clone())}
    if shape.ref_skip is None:
        dense = common.variant_fns(inp, with_reference=reference)
        fns.update({"dense": dense["kvfix"]}, **({"floor": dense["floor"]} if "floor" in dense else {}))
        if reference:
            fns["reference"] = dense["reference"]
    return fns


@pytest.fixture(scope="module", params=[r for r in struct_rows(False) if r[0].N < 16384 or LARGE],
                ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}")
def struct_case(request):
    shape, dt, kind = request.param
    inp = struct_inputs(shape, dt, kind, floor=shape.ref_skip is None)
    return shape, dt, structured_fns(shape, inp)


@pytest.mark.parametrize("variant", STRUCT_VARIANTS)
def test_dscr_structured(benchmark, struct_case, variant):
    shape, dt, fns = struct_case
    if variant not in fns:
        pytest.skip(f"{variant}: {shape.ref_skip}")
    benchmark.group = f"structured {shape.label} {dt}"
    rounds = 3 if shape.N >= 4096 else 10
    outs = benchmark.pedantic(fns[variant], rounds=rounds, warmup_rounds=1, iterations=1)
    assert outs[0].shape == (shape.B, shape.H, shape.N, shape.D)


def _structured_memory_worker(names: list) -> None:
    """In a fresh process (see dscr_structured_section): peak bytes of "structured" for each row."""
    shapes = {s.name: s for s in STRUCT_SHAPES + STRUCT_QUICK}
    warm = common.Shape("warm", 1, 2, 8, 8, 32, ("fp32",))
    for dt in dict.fromkeys(dt for _, dt, _ in names):
        structured_fns(warm, struct_inputs(warm, dt, "ramp"))["structured"]()
    res = {}
    for name, dt, kind in names:
        shape = shapes[name]
        fns = structured_fns(shape, struct_inputs(shape, dt, kind, floor=False), reference=False)
        res[f"{name}|{dt}|{kind}"] = common.peak_bytes_beyond(fns["structured"])[0]
    print("KVFIX_MEMORY " + json.dumps(res), flush=True)


def _structured_memory(names: list) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    code = f"from bench import test_bench_dscr as t; t._structured_memory_worker({names!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("KVFIX_MEMORY "):
            return json.loads(line[len("KVFIX_MEMORY "):])
    raise RuntimeError(f"memory worker failed (exit {r.returncode}):\n{r.stderr[-4000:]}")


# the dense variants' a-priori times: common.DSCR_SCALING (the DSCR table's measurements)
DENSE_KEYS = {"dense": "kvfix", "reference": "reference", "floor": "floor"}
PRIORITY = ("structured", "auto", "in_place", "copy", "floor", "dense", "reference")  # the order a short budget keeps


def _plan_cell(plan) -> str:
    if plan.variant == "banded":
        nodes = {"grid": "p", "gauss": "C"}.get(plan.depth_mode)
        mode = plan.depth_mode + (f" {nodes}={plan.grid_order} step={plan.grid_step:.2g}" if nodes else "")
        return f"banded (K={plan.band}, depth {mode})"
    if plan.variant == "lowrank":
        return f"lowrank ({plan.rank_depth}, {plan.rank_row}, {plan.rank_col})"
    return "dense"


def dscr_structured_section(quick: bool, budget: common.Budget | None = None) -> str:
    """Markdown: the structured rows (timings, ratios, errors vs float64, peak memory, the plan).

    Timing as bench/table.py (common.interleave: interleaved variants, medians, within a share of
    `budget` per row that also pays for one call of "structured" in the memory worker, at least 3
    passes (quick: 1); a dense variant whose call, estimated by common.DSCR_SCALING, would not fit
    is skipped); errors on all
    tokens, or on `err_cols` evenly spaced tokens (float64 weights of those columns only); peak
    memory of "structured" beyond inputs and outputs in a fresh process (common.peak_bytes_beyond)."""
    torch.set_num_threads(common.threads())
    budget = budget or common.Budget(None)
    max_reps = 3 if quick else 11
    # at least 3 passes (the medians of a single pass are a single sample each): the 64 x 64 rows'
    # dense and floor calls (~0.3 s each on an AVX2 EPYC) left room for only 1 within their share
    min_reps = 1 if quick else 3
    todo = struct_rows(quick)
    rows = []
    seen = set()
    for i, (shape, dt, kind) in enumerate(todo):
        row_budget = budget.share(len(todo) - i, reserve=common.WORKER_START_S)
        inp = struct_inputs(shape, dt, kind, floor=shape.ref_skip is None)
        fns = structured_fns(shape, inp, reference=(shape.name, dt) not in seen)
        seen.add((shape.name, dt))
        fns = {n: fns[n] for n in PRIORITY if n in fns}
        truth, cols = common.ground_truth(shape, inp)
        err = {}

        def on_first(name, out):
            if name in ("structured", "dense"):
                err[name] = common.max_error(out, truth, cols)

        est = {n: common.DSCR_SCALING.estimate((dt, key), common.dense_cost(shape)) for n, key in DENSE_KEYS.items()}
        tm = common.interleave(fns, row_budget, max_reps=max_reps, min_reps=min_reps, est=est, calls_needed=3,
                               reserve_pass=True,
                               on_first=on_first, required=("structured",))
        for n, key in DENSE_KEYS.items():
            if n in tm.med:
                common.DSCR_SCALING.record((dt, key), common.dense_cost(shape), tm.best[n])
        S._PLANS.clear()  # the plan's own cost, once per image (kept for the layers after the first)
        t0 = time.perf_counter()
        forced = kvfix.dscr_plan(shape.gh, shape.gw, inp["depth"], dtype=common.DTYPES[dt], method="structured",
                                 **common.PARAMS)
        plan_ms = 1e3 * (time.perf_counter() - t0)
        plan = kvfix.dscr_plan(shape.gh, shape.gw, inp["depth"], dtype=common.DTYPES[dt], **common.PARAMS)
        xmax = max(float(inp["k"].abs().max()), float(inp["v"].abs().max()))
        rows.append((shape, dt, kind, tm, err, plan, forced, xmax, plan_ms))
        del inp, fns, truth
        gc.collect()
    measured = [(s.name, dt, kind) for s, dt, kind, tm, *_ in rows if "structured" in tm.med]
    mem = _structured_memory(measured) if measured and os.path.exists("/proc/self/clear_refs") else {}

    def cell(tm, n):
        return tm.skipped[n] if n in tm.skipped else f"{tm.ms(n):.2f}" if n in tm.med else "n/a"

    def ratio(tm, a, b):
        return f"{tm.med[a] / tm.med[b]:.3f}" if a in tm.med and b in tm.med else "n/a"

    def auto_vs_best(tm):
        if "auto" not in tm.med or "structured" not in tm.med or "dense" not in tm.med:
            return "n/a"
        return f"{tm.med['auto'] / min(tm.med['structured'], tm.med['dense']):.2f}"

    def mb(key):
        return f"{mem[key] / 2**20:.1f}" if mem.get(key) is not None else "n/a"

    lines = ["### Structured DSCR (issues 7, 13): coords=(gh, gw), default units (patch coordinates, "
             "depth maps pooled to [0, 255])", "",
             f"CPU path: {common.cpu_path()}", "",
             "| shape | depth map | dtype | structured plan | plan ms | auto runs | structured ms | in place ms | auto ms "
             "| dense ms | reference ms | floor ms | copy ms | structured/floor | in place/floor | structured/copy "
             "| auto/faster | err structured | err dense | bound x max|x| | peak MB structured | reps |",
             "|" + "---|" * 22]
    for shape, dt, kind, tm, err, plan, forced, xmax, plan_ms in rows:
        key = f"{shape.name}|{dt}|{kind}"
        tok = "" if shape.err_cols is None or shape.err_cols >= shape.N else f" ({shape.err_cols} tokens)"
        err_s = f"{err['structured']:.1e}{tok}" if "structured" in err else "n/a"
        err_dense = f"{err['dense']:.1e}" if "dense" in err else "n/a"
        lines.append(
            f"| {shape.label} | {kind} | {dt} | {_plan_cell(forced)} | {plan_ms:.1f} | {_plan_cell(plan)} "
            f"| {cell(tm, 'structured')} | {cell(tm, 'in_place')} | {cell(tm, 'auto')} | {cell(tm, 'dense')} "
            f"| {cell(tm, 'reference')} | {cell(tm, 'floor')} | {cell(tm, 'copy')} | {ratio(tm, 'structured', 'floor')} "
            f"| {ratio(tm, 'in_place', 'floor')} | {ratio(tm, 'structured', 'copy')} | {auto_vs_best(tm)} "
            f"| {err_s} | {err_dense} | {forced.bound * xmax:.1e} | {mb(key)} | {tm.reps} |")
    lines += ["", "Targets (fp32): structured/floor <= 0.2 at 24x24, <= 1/30 at 64x64; structured/copy <= 3 at "
              "128x128 (copy = K.clone() + V.clone()); auto/faster <= 1.2 (auto's time over the faster of "
              "structured and dense). Depth maps (bench.common.depth_map): k fronto-parallel surfaces drawn 4x finer "
              "than the grid and pooled (boundary patches mixed; 1 surface pools to zeros), a tilted plane (ramp). "
              "Out-of-place variants (structured, auto, dense, floor, copy) write fresh outputs: whether their pages "
              "must be faulted in depends on the C allocator's state, which is why in place (the transformers cache "
              "path) is listed too. bound x max|x|: the plan's a-priori truncation bound times max|x| of the row's K "
              "and V, without float32 rounding. plan ms: building the structured plan (sorting, depth nodes, bound), "
              "once per image: the timed calls reuse it, as every layer after the first does in a model. The "
              "reference runs on a shape's first map only (its cost does not depend on the map)."]
    return "\n".join(lines)
