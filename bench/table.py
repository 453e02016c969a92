"""The DSCR benchmark table: `python -m bench.table` (writes bench/RESULTS.md, or --out), `--quick` for CI.

For every shape and dtype it times the eager reference, kvfix and the GEMM floor (see
bench/common.py), measures kvfix's and the reference's error against float64 and the peak
memory of each variant beyond its inputs and outputs, prints a markdown table and (without
--quick) writes bench/RESULTS.md. RESULTS.md is generated, never edited by hand.

Method:
- time budget: the whole run gets --budget-s seconds (default 300; --quick: none). The DSCR
  table and each section (SECTIONS) get what is left x their weight / the weights of the parts
  not run yet, and each row an equal share of what is left of its part (what a part or row leaves
  goes to the next). Before a row runs, one call of each variant is estimated (DSCR: from the
  largest row measured before, by the B H N^2 D scaling of the dense variants; none for the
  smallest row of a dtype, whose warm-up calls are the measurement;
  the transformers-level methods: by their known ratio to plain generate): a row whose required
  variant (kvfix) does not fit, or a variant that does not fit beside those kept, is skipped and
  the table says so ("skipped: one call ~X s > Y s left for it (row budget Z s) on this machine").
  Repeats stop when the next pass would overrun the row's share (at least 1, 3 in the structured
  DSCR section; the reps column).
  The header gives the run's wall time, each section's, and the CPU path that ran.
- timing: one process, torch threads = the cores available; each variant runs once to warm up,
  then the variants run interleaved for R repeats (common.interleave; in balanced orders, so each
  variant follows each other one about equally often): every variant of a row has the same R,
  over the same passes; the table shows medians. R: at most 11
  (quick 9), fewer when the row's share of the budget is spent. At warm-up, kvfix runs first and
  the other variants (PRIORITY order) only while the measured pass fits the row's share.
- memory: a fresh subprocess (started with MALLOC_MMAP_THRESHOLD_=65536, so that large blocks
  are mmapped and returned to the OS on free, not silently reused) first runs every variant on
  a small shape in each dtype (thread pool, code pages, one-time library state), then for each
  row and variant resets the kernel's resident-set high-water mark (/proc/self/clear_refs),
  runs the variant once and reads VmHWM: peak = HWM - RSS before - bytes of the outputs.
  This sees every touched allocation (ATen, BLAS/oneDNN scratch, plain malloc), not only
  ATen's, and is deterministic up to page granularity; shape-specific one-time state (e.g. a
  GEMM primitive created for that shape) is counted. A calibration line (a 64 MiB temporary)
  is printed with the table.
- error: max |out - reference(float64)| over K and V outputs; on N=16384 over 512 evenly spaced
  output tokens (reference weights of those columns only).
- accuracy check (exit status 1 on failure): kvfix error <= max(2 x the eager reference's
  error in the same dtype, tol(dtype) x max|exact output|), tol = 1e-5 fp32, 2e-3 fp16,
  1.6e-2 bf16.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

T_START = time.perf_counter()  # the run's wall time counts from here (imports included)

if __package__ in (None, ""):  # run as `python bench/table.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kvfix  # noqa: E402
from bench import common, test_bench_cmac, test_bench_dscr, test_bench_hf_cmac, test_bench_hf_dscr, test_bench_hf_scr, test_bench_scr  # noqa: E402,E501
from bench.common import DTYPES, FULL_SHAPES, QUICK_SHAPES  # noqa: E402

T_IMPORTS = time.perf_counter() - T_START  # what a memory worker's start costs, about

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
VARIANTS = ("reference", "kvfix", "floor", "mm_floor")
PRIORITY = ("kvfix", "floor", "mm_floor", "reference")  # the order a short budget keeps them in
WARM_SHAPE = common.Shape("warm-up", 1, 2, 8, 8, 32, ())
CALIB_BYTES = 64 << 20
BUDGET_S = 300.0  # whole run (--budget-s); --quick: unlimited unless given


# --------------------------------------------------------------------------------------------
# memory worker (runs in a subprocess)

def _memory_worker(payload: str) -> None:
    spec = json.loads(payload)
    torch.set_num_threads(spec["threads"])
    shapes = {s.name: s for s in (FULL_SHAPES + QUICK_SHAPES)}
    results = {}
    # calibration: a known temporary
    calib = lambda: (torch.ones(CALIB_BYTES // 4).sum(),)  # noqa: E731
    calib()
    results["calibration"] = common.peak_bytes_beyond(calib)[0]
    for dt in dict.fromkeys(dt for _, dt, _ in spec["rows"]):  # one-time state, off the record
        for fn in common.variant_fns(common.make_inputs(WARM_SHAPE, DTYPES[dt])).values():
            fn()
    for name, dt, variants in spec["rows"]:
        shape = shapes[name]
        inp = common.make_inputs(shape, DTYPES[dt])
        fns = common.variant_fns(inp, with_reference=shape.ref_skip is None)
        for vname in variants:
            peak, out = common.peak_bytes_beyond(fns[vname])
            del out
            results[f"{name}|{dt}|{vname}"] = peak
        del inp, fns
        gc.collect()
    print("KVFIX_MEMORY " + json.dumps(results), flush=True)


def measure_memory(rows, n_threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(n_threads))
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(kvfix.__file__))), os.path.dirname(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    payload = json.dumps({"threads": n_threads, "rows": rows})
    r = subprocess.run([sys.executable, "-m", "bench.table", "--memory-worker", payload], cwd=os.path.dirname(HERE),
                       env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("KVFIX_MEMORY "):
            return json.loads(line[len("KVFIX_MEMORY "):])
    raise RuntimeError(f"memory worker failed (exit {r.returncode}):\n{r.stderr[-4000:]}")


# --------------------------------------------------------------------------------------------
# timing and errors (this process)

def time_row(shape, dt: str, budget: common.Budget, min_reps: int, max_reps: int) -> dict:
    """Errors and interleaved medians of one row within `budget` (which also pays for the row's
    float64 ground truth and, later, one call of each variant in the memory worker): with the
    ground truth's and the variants' calls estimated by common.DSCR_SCALING (from the rows measured
    before; a dtype's first row, the smallest, has no estimate: its warm-up is the measurement),
    the row is skipped if kvfix's warm-up, one repeat and memory call do not fit, then
    common.interleave keeps the other variants that fit (PRIORITY order)."""
    row = {"shape": shape, "dtype": dt, "err": {}, "ms": {}, "skipped": {}, "reps": 0}
    names = [n for n in VARIANTS if n != "reference" or shape.ref_skip is None]
    est = {n: common.DSCR_SCALING.estimate((dt, n), common.dense_cost(shape)) for n in names}
    truth_cost = common.dense_cost(shape) * (1 if shape.err_cols is None else min(1.0, shape.err_cols / shape.N))
    est_truth = ((common.DSCR_SCALING.estimate(("fp64", "truth"), truth_cost) or 0.0)
                 + (common.DSCR_SCALING.estimate(("inputs", dt), float(shape.N ** 2)) or 0.0))
    limit = (budget.left() - est_truth) / 3
    if est["kvfix"] is not None and est["kvfix"] > limit:
        row["skip"] = common.skip_reason(est["kvfix"], limit, budget.left()) + (
            f" (inputs and float64 ground truth ~{common.fmt_s(est_truth)} s)" if est_truth >= 0.1 else "")
        return row
    t0 = time.perf_counter()
    inp = common.make_inputs(shape, DTYPES[dt])
    common.DSCR_SCALING.record(("inputs", dt), float(shape.N ** 2), time.perf_counter() - t0)  # mostly the N x N W
    fns = common.variant_fns(inp, with_reference=shape.ref_skip is None)
    fns = {n: fns[n] for n in PRIORITY if n in fns}  # what the budget keeps first: the targets' floors
    t0 = time.perf_counter()
    truth, cols = common.ground_truth(shape, inp)
    common.DSCR_SCALING.record(("fp64", "truth"), truth_cost, time.perf_counter() - t0)

    def on_first(name, out):  # the warm-up call's outputs: the errors
        if name in ("reference", "kvfix"):
            row["err"][name] = common.max_error(out, truth, cols)

    tm = common.interleave(fns, budget, max_reps=max_reps, min_reps=min_reps, est=est, calls_needed=3,
                           reserve_pass=True, on_first=on_first, required=("kvfix",))
    if "kvfix" in tm.skipped:
        row["skip"] = tm.skipped["kvfix"]
        return row
    row["scale"] = max(float(t.abs().max()) for t in truth)
    row["err_tokens"] = shape.N if cols is None else int(cols.numel())
    row["ms"] = {n: 1e3 * t for n, t in tm.med.items()}
    row["skipped"] = tm.skipped
    row["reps"] = tm.reps
    for n, t in tm.best.items():
        common.DSCR_SCALING.record((dt, n), common.dense_cost(shape), t)
    del inp, fns, truth
    gc.collect()
    return row


# --------------------------------------------------------------------------------------------
# report

def _ms(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _mb(b):
    if b is None:
        return "n/a"
    mb = b / 2**20
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 1 else f"{mb:.2f}"


def _size(b):
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable": common.threads(), "mem": mem}


def ref_skip_text(row, rows) -> str:
    """'n/a (reason)', with a memory estimate from the N^2 scaling of the largest measured row."""
    shape = row["shape"]
    text = shape.ref_skip
    measured = [r for r in rows if r["dtype"] == row["dtype"] and r["shape"].ref_skip is None
                and r.get("mem", {}).get("reference") is not None]
    if measured:
        big = max(measured, key=lambda r: r["shape"].N)
        scale = (shape.N / big["shape"].N) ** 2 * shape.B / big["shape"].B
        est = big["mem"]["reference"] * scale
        text += f"; ~{_size(est)} by N^2 scaling of the N={big['shape'].N} row"
    return f"n/a ({text})"


def render(rows, calib, info, cmd, started, loads, timing) -> tuple[str, list]:
    head = ("| op | shape | dtype | reference ms | kvfix ms | speedup (ref/kvfix) | floor ms | kvfix/floor "
            "| mm floor ms | kvfix/mm floor | max err kvfix | max err ref | peak MB kvfix | peak MB ref "
            "| peak MB floor | peak MB mm floor | reps |")
    lines = [head, "|" + "---|" * 17]
    failures = []
    for row in rows:
        s, dt, ms, err, mem, sk = row["shape"], row["dtype"], row["ms"], row["err"], row.get("mem", {}), row["skipped"]
        if "skip" in row:
            ref = ref_skip_text(row, rows) if s.ref_skip is not None else "skipped with kvfix"
            lines.append(f"| dscr_refine (K+V) | {s.label} | {dt} | {ref} | {row['skip']} |"
                         + " n/a |" * 11 + " 0 |")
            continue

        def cell(n, text):
            return sk[n] if n in sk else text(ms[n]) if n in ms else "n/a"

        def ratio(n):
            return f"{ms['kvfix'] / ms[n]:.2f}" if n in ms else "n/a"

        ref_ms = ref_skip_text(row, rows) if s.ref_skip is not None else cell("reference", _ms)
        speed = f"{ms['reference'] / ms['kvfix']:.2f}x" if "reference" in ms else "n/a"
        tok = "" if row["err_tokens"] == s.N else f" ({row['err_tokens']} tokens)"
        ref_err = f"{err['reference']:.1e}" if "reference" in err else "n/a"
        lines.append(
            f"| dscr_refine (K+V) | {s.label} | {dt} | {ref_ms} | {_ms(ms['kvfix'])} | {speed} "
            f"| {cell('floor', _ms)} | {ratio('floor')} | {cell('mm_floor', _ms)} | {ratio('mm_floor')} "
            f"| {err['kvfix']:.1e}{tok} | {ref_err} "
            f"| {_mb(mem.get('kvfix'))} | {_mb(mem.get('reference'))} | {_mb(mem.get('floor'))} "
            f"| {_mb(mem.get('mm_floor'))} | {row['reps']} |")
        bound = max(2 * err.get("reference", 0.0), TOL[dt] * row["scale"])
        if not (err["kvfix"] <= bound):
            failures.append(f"{s.label} {dt}: kvfix error {err['kvfix']:.2e} > bound {bound:.2e}")
    table = "\n".join(lines)

    out = []
    out.append(f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable']} usable), {info['mem']}, "
               f"{platform.system()} {platform.release()}")
    bi = kvfix.build_info()
    out.append(f"- torch {torch.__version__} ({torch.get_num_threads()} threads), kvfix {kvfix.__version__} "
               f"(kernels: {', '.join(bi.get('devices', []))}), Python {platform.python_version()}")
    out.append(f"- date: {started:%Y-%m-%d %H:%M:%S %Z}".rstrip())
    out.append(f"- command: `{cmd}`")
    out.append(f"- load average (1 min) at start / max after a row / end: {loads[0]:.2f} / {loads[1]:.2f} / "
               f"{loads[2]:.2f} (a shared machine: compare the ratios within a row, not absolute times across runs)")
    if loads[1] > 2 * info["usable"]:
        out.append(f"- WARNING: the machine was busy during this run (load up to {loads[1]:.1f} on "
                   f"{info['usable']} cores, this run's own {torch.get_num_threads()} threads included): "
                   "the timings are unreliable; rerun on a quiet machine")
    elapsed, budget_s, section_s = timing
    out.append(f"- CPU path: {common.cpu_path()}")
    out.append(f"- whole run: {elapsed:.0f} s of wall time (budget "
               f"{'none' if budget_s is None else f'{budget_s:.0f} s'}: `--budget-s`); per section: "
               + ", ".join(f"{t} {x:.0f} s" for t, x in section_s))
    out.append(f"- memory calibration: a {CALIB_BYTES >> 20} MiB temporary reads as {_mb(calib)} MB")
    return "\n".join(out) + "\n\n" + table, failures


def targets(rows) -> list:
    """The targets of issue 2, evaluated on this run (CPU)."""
    res = []
    for row in rows:
        s, dt, ms = row["shape"], row["dtype"], row["ms"]
        if "skip" in row:
            if (s.name == "LLaVA-1.5" and dt == "fp32") or dt == "bf16" or s.name == "N=16384":
                res.append(f"{dt} {s.name}: not measured ({row['skip']})")
            continue
        nan = float("nan")
        r1, r2 = ms["kvfix"] / ms.get("floor", nan), ms["kvfix"] / ms.get("mm_floor", nan)

        def verdict(limit):
            return (f"kvfix/floor = {common.num(r1)}, kvfix/mm floor = {common.num(r2)} (target <= {limit}): "
                    f"{common.verdict(r1, limit)} / {common.verdict(r2, limit)}")

        if s.name == "LLaVA-1.5" and dt == "fp32":
            sp = ms.get("reference", float("nan")) / ms["kvfix"]
            res.append(f"fp32 LLaVA-1.5: {verdict(1.15)}; speedup over the eager reference {common.num(sp, '.2f', 'x')}")
        if dt == "bf16":
            res.append(f"bf16 {s.name}: {verdict(1.3)}")
        if s.name == "N=16384" and row["mem"]["kvfix"] is not None:
            mb = row["mem"]["kvfix"] / 2**20
            res.append(f"N=16384 {dt}: kvfix peak beyond inputs/outputs {mb:.1f} MB (target < 256 MB): "
                       f"{'met' if mb < 256 else 'NOT met'}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds; prints only (CI smoke test)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"seconds for the whole run, shared out over the sections and rows (default "
                         f"{BUDGET_S:.0f}; --quick: unlimited): variants whose one call would not fit are "
                         "skipped (noted in the table), repeats stop when a row's share is spent")
    ap.add_argument("--out", default=RESULTS,
                    help="the markdown file to write (default bench/RESULTS.md; e.g. bench/RESULTS_AVX2.md for a "
                         "KVFIX_CPU_NO_AVX512=1 build, README \"Benchmarks\")")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker is not None:
        _memory_worker(args.memory_worker)
        return 0

    argv_used = sys.argv[1:] if argv is None else list(argv)
    main_mod = sys.modules.get("__main__")
    launcher = "python -m bench.table" if getattr(getattr(main_mod, "__spec__", None), "name", "") == "bench.table" \
        else "python bench/table.py"
    cmd = " ".join([launcher] + argv_used)
    n_threads = common.threads()
    torch.set_num_threads(n_threads)
    started = datetime.datetime.now().astimezone()
    budget_s = args.budget_s if args.budget_s is not None else (None if args.quick else BUDGET_S)
    run = common.Budget(None if budget_s is None else budget_s - (time.perf_counter() - T_START))
    load0 = os.getloadavg()[0]
    load_max = load0

    check = common.check_reference_columns()
    if not check < 1e-12:
        print(f"reference_columns_f64 disagrees with kvfix.reference.dscr_refine: {check:.2e}", file=sys.stderr)
        return 1

    weights_left = sum(w for _, _, w in SECTIONS)
    part = run.share(0, SECTIONS[0][2], weights_left)
    weights_left -= SECTIONS[0][2]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    min_reps, max_reps = 1, (9 if args.quick else 11)
    todo = [(shape, dt) for shape in shapes for dt in shape.dtypes]
    rows = []
    common.WORKER_START_S = 2 * T_IMPORTS + 1
    for i, (shape, dt) in enumerate(todo):
        t0 = time.perf_counter()
        share = part.share(len(todo) - i, reserve=common.WORKER_START_S)
        rows.append(time_row(shape, dt, share, min_reps, max_reps))
        load_max = max(load_max, os.getloadavg()[0])
        print(f"  timed {shape.label} {dt} ({rows[-1]['reps']} reps, {time.perf_counter() - t0:.1f} s"
              f"{', ' + rows[-1]['skip'] if 'skip' in rows[-1] else ''})", file=sys.stderr, flush=True)
    measured = [(r["shape"].name, r["dtype"], list(r["ms"])) for r in rows if r["ms"]]
    if os.path.exists("/proc/self/clear_refs"):
        mem = measure_memory(measured, n_threads) if measured else {"calibration": None}
    else:
        print("  no /proc/self/clear_refs (not Linux?): peak memory not measured", file=sys.stderr)
        mem = {"calibration": None}
    for r in rows:
        r["mem"] = {v: mem.get(f"{r['shape'].name}|{r['dtype']}|{v}") for v in VARIANTS}
    section_s = [("imports", T_IMPORTS), ("DSCR table (incl. memory)", run.elapsed())]
    # Sections with their own shapes and floors, one per method / issue.
    texts = []
    for title, section, weight in SECTIONS[1:]:
        t0 = time.perf_counter()
        texts.append(section(args.quick, run.share(0, weight, weights_left)))
        weights_left -= weight
        section_s.append((title, time.perf_counter() - t0))
        load_max = max(load_max, os.getloadavg()[0])
        print(f"  {title}: {section_s[-1][1]:.1f} s", file=sys.stderr, flush=True)
    kvs_text = "\n\n".join(texts)
    elapsed = time.perf_counter() - T_START
    loads = (load0, max(load_max, os.getloadavg()[0]), os.getloadavg()[0])
    report, failures = render(rows, mem["calibration"], machine(), cmd, started, loads,
                              (elapsed, budget_s, section_s))

    print(report)
    tgt = [] if args.quick else targets(rows)
    if tgt:
        print("\n" + "\n".join(f"- {t}" for t in tgt))
    print(f"\n{len(rows)} rows; accuracy check: {'all rows within tolerance' if not failures else 'FAILED'}")
    for f in failures:
        print(f"  {f}")
    print("\n" + kvs_text)
    print(f"\nwhole run: {elapsed:.0f} s (budget {'none' if budget_s is None else f'{budget_s:.0f} s'})")

    if not args.quick:
        doc = ["# kvfix benchmark results", "",
               "Generated by `python -m bench.table` (bench/table.py); do not edit by hand, rerun the command.", "",
               report, "",
               "Columns: medians of interleaved repeats (reps); speedup = reference ms / kvfix ms; floor = the bare "
               "GEMMs `torch.matmul(W, K)` and `torch.matmul(W, V)` with a precomputed N x N W in the same dtype; "
               "mm floor = the same products as one `torch.mm(W, K[b, h])` per batch item and head (in bf16/fp16 "
               "`torch.matmul` with a 2-D W and 4-D K copies W once per head: see peak MB floor); "
               "max err = max |out - reference in float64| over K and V; peak MB = resident-set high-water mark "
               "during one call beyond inputs and outputs, in a fresh process (method: bench/table.py docstring).",
               "", "Targets (issue 2, CPU):", ""] + [f"- {t}" for t in tgt] + [
               "", f"Accuracy check (kvfix error <= max(2 x eager reference error, tol x max|exact|)): "
               f"{'all rows within tolerance' if not failures else 'FAILED: ' + '; '.join(failures)}.",
               "", kvs_text, ""]
        with open(args.out, "w") as f:
            f.write("\n".join(doc))
        print(f"wrote {os.path.relpath(args.out)}")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# KVSmooth (issue 4): measured by bench/test_bench_kvsmooth.py

def kvsmooth_section(quick: bool, budget: common.Budget | None = None) -> str:
    """The KVSmooth tables (markdown): one decoding step of one layer against the eager reference
    and the floor (half the time of copying K: one read of K at copy bandwidth), and per-token
    decoding time with and without KVSmooth; interleaved medians (method: the docstring of
    bench/test_bench_kvsmooth.py). quick: small step shapes only, no decoding rows."""
    from bench import test_bench_kvsmooth as kvs
    rows = kvs.kvsmooth_rows(quick=quick, budget=budget)
    return ("## KVSmooth (issue 4)\n\n" + kvs.render(rows) + "\n\nStep: eager = the step in plain PyTorch "
            "(materialised fp32 softmax, torch.sort rank); floor = `dst.copy_(k)` time / 2; every step call starts "
            "with the cache emptied (as between two decoding steps of one layer). Decoding: random-weight "
            "LLaVA with LLaVA-1.5's attention geometry (hidden 4096, 32 heads, D 128), 2 layers, KVSmooth on both, "
            f"{kvs.N_NEW} tokens after a ~{kvs.CONTEXT}-token prompt.")


# (title, section(quick, budget), weight): each part gets what is left of the run's budget x its
# weight / the weights of the parts not run yet (so what one leaves goes to the next). The first
# is this file's DSCR table (timing, then the memory worker).
SECTIONS = [
    ("DSCR table", None, 0.24),
    ("structured DSCR", test_bench_dscr.dscr_structured_section, 0.20),     # issues 7, 13 (13 rows)
    ("DSCR in transformers", test_bench_hf_dscr.dscr_hf_section, 0.10),     # issue 13
    ("KVSmooth", kvsmooth_section, 0.12),                                   # issue 4
    ("SCR", test_bench_scr.scr_section, 0.06),                              # issue 5
    ("SCR in transformers", test_bench_hf_scr.scr_hf_section, 0.09),
    ("CMAC", test_bench_cmac.cmac_section, 0.07),                           # issue 6
    ("CMAC in generate", test_bench_hf_cmac.cmac_hf_section, 0.12),
]

if __name__ == "__main__":
    sys.exit(main())
