"""The GPU record: every kvfix op against its baseline, and the kvfix.hf methods on 7B-size models.

    python -m bench.gpu [--out docs/GPU.md] [--sections kvsmooth,cmac] [--quick] [--budget-s 420]

Needs a GPU and kvfix built with its CUDA kernels (scripts/gpu_check.sh builds, tests and runs
this in one go on a lent machine). Each section prints its table as soon as it is done, and the
markdown file (default docs/GPU.md) is rewritten after every section, so a run cut short still
leaves what it measured: device, torch / transformers / flash-attn versions, date, command,
the tables, and the targets of issue 18 with their verdicts. A section that fails prints its
error and the run goes on; a section that would not fit in what is left of --budget-s is
skipped (both are noted in the file). `--device cpu` runs every section on tiny shapes with a
wall-clock timer: a smoke test of this script without a GPU, whose numbers mean nothing;
`--device cpu --sections models --layers 4 --dtype fp32 --out bench/MODELS_CPU.md --budget-s 1800` is the CPU
record of the models section instead: the same configs at full width with their text and vision
layer counts cut to 4 (issue 18's "same benchmark on the CPU"); `--device cpu --sections host --dtype fp32
--out bench/HOST_CPU.md` is the CPU record of the host section (one thread).
Expected run time on an H100: about 2.5 minutes (the op sections ~40 s, the host section ~30 s, each
model ~35-40 s; ESTIMATE_S below is what a section must have left to start).

Sections (bf16 unless a row says otherwise; inputs are random normal, never zeros):
- baselines: copy bandwidth (a 1 GiB device copy: read + write bytes / time; every roofline
  below divides by it), the smallest kernel (a 1-element `mul_`), a cuBLAS bf16 GEMM.
- kvsmooth: `kvsmooth_step_` and `row_entropy` at B = 1 and 32, T = 600 / 2048 / 8192 (H = 32,
  D = 128) against a read of K (`K.sum()`, measured) and K's bytes at copy bandwidth; 32 layers'
  steps captured in one CUDA graph over a static cache, replayed.
- dscr: structured / in place / dense against the cuBLAS floor (`W @ K`, `W @ V`) and a copy,
  per grid; and one image of LLaVA-1.5-7B: the 24 refined layers' [1, 32, 576, 128] spans in one
  `dscr_refine_cache_` call (auto, structured, dense), with the algorithm `auto` picks, and the
  host time of a new image's plan.
- rooflines: `scr_scores`, `scr_redistribute(_)`, `contrastive_logits`, `rope_calibrate` against
  their bytes at copy bandwidth.
- cmac: `cmac_attention` decode (2 rows, T = 2048, H = 32, D = 128; IMD off / on / on the second
  row only) and prefill (T = 640, causal) against torch SDPA (default dispatch and each backend)
  and the flash-attn package when installed, on the same q, k, v.
- host: the host's time per decoded token, plain and with each kvfix.hf method, on the two 7B
  configs' layer counts at tiny widths (where decoding waits on the host, as HF decoding at batch
  1 does on a GPU, a method's added host time per layer is what it adds per token), and the
  prefill's time at those widths (mostly host time: SCR's diagnostic pass, DSCR's plan).
- models: random-weight LLaVA-1.5-7B and Qwen2-VL-7B (their exact configs, written out below;
  built on the GPU in bf16, nothing downloaded), one image at the model's size, greedy: plain vs
  kvfix.hf.KVSmooth / CMAC / DSCR (random depth map, planned anew in every prefill) / SCR,
  prefill ms and decode ms per token;
  plus "plain, 2 rows" (the same prompt twice as one batch, greedy: the shape CMAC's two branches
  run in), which separates the cost of a batch of 2 rows from CMAC's own.

Timing. Ops: CUDA events around each call, median of `reps` calls after `warmup` calls. The calls
are queued behind a GPU sleep long enough for the host to enqueue them all, so an op's time is
its GPU time, not the Python in front of it; except where the op itself reads a value on the
host (the structured DSCR plan reads the depth range of a depth on the GPU), which then waits
for the GPU and counts (`scr_redistribute` checks its scores on the host on the CPU only). Where the host cost matters (decode paths) a "call"
column times single calls on an idle GPU instead (host overhead included). Small inputs stay in
L2 between repeats, for the op and its baseline alike. Models: each timed `generate` call is
one CUDA-event measurement; the variants run interleaved (bench.common.balanced_orders), `warmup` rounds
then `reps` rounds, medians; prefill = `generate(max_new_tokens=1)`, decode per token =
(generate of 1 + n tokens - prefill) / n, with min_new_tokens = max_new_tokens (no early stop).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable

import torch

import kvfix
from kvfix import dscr_structured
from kvfix import reference as R

PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)  # METHODS §1 defaults
BF16 = torch.bfloat16
SECTIONS = ("baselines", "kvsmooth", "dscr", "rooflines", "cmac", "host", "models")
# seconds each section needs on an H100 (this file's estimate; a section is skipped when less is
# left); models: per model (LLaVA-1.5-7B, then Qwen2-VL-7B, each skipped alone when time is short)
ESTIMATE_S = {"baselines": 5, "kvsmooth": 15, "dscr": 20, "rooflines": 10, "cmac": 10, "models": 85, "host": 40}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "GPU.md")

# DSCR per-grid table: (gh, gw, H); dense (N x N weights) only up to DENSE_MAX_N tokens.
DSCR_SHAPES = [(24, 24, 32), (48, 48, 4), (64, 64, 4), (128, 128, 4)]
DENSE_MAX_N = 4096
TINY_DSCR_SHAPES, TINY_DENSE_MAX_N = [(4, 5, 2), (12, 12, 1)], 100  # the CPU smoke run


# --------------------------------------------------------------------------------------------
# timing and context

def cuda_timer(fn: Callable, reps: int, warmup: int, queued: bool = True) -> float:
    """Median ms of `reps` calls of fn, CUDA events around each, after `warmup` calls.
    queued: the calls are enqueued behind a GPU sleep (the host runs ahead: GPU time);
    otherwise each call starts on an idle GPU (host overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if queued:
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        # cycles at <= 2 GHz: at least 1.5x the host time of the timed calls, at most ~0.2 s
        torch.cuda._sleep(int(2e9 * min(0.2, 1.5 * host * reps + 1e-3)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
        if not queued:
            end.synchronize()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def wall_timer(fn: Callable, reps: int, warmup: int, queued: bool = True) -> float:
    """Median wall-clock ms (the CPU smoke run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def cuda_graph(fn: Callable) -> Callable:
    """fn captured in a CUDA graph (after two warm-up calls on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@dataclasses.dataclass
class Ctx:
    """What every section gets: where to run, how to time, how big, how much time is left.

    timer(fn, reps, warmup, queued) -> median ms; graph(fn) -> a callable replaying fn (on the CPU
    fn itself: capture needs a GPU). tiny: tiny shapes (CPU smoke run and tests). bw: copy
    bandwidth in bytes per ms, set by the baselines section (None: rooflines not available).
    layers: the models section builds the exact configs with their text and vision layer counts
    cut to this (full widths, vocabularies and image sizes); it overrides tiny there."""
    device: str
    timer: Callable
    graph: Callable
    tiny: bool = False
    quick: bool = False
    reps: int = 25
    warmup: int = 3
    bw: float | None = None
    deadline: float = math.inf
    layers: int | None = None   # models section: the configs cut to this many layers, at full width
    model_dtype: torch.dtype = BF16

    def ms(self, fn, reps=None, warmup=None, queued=True) -> float:
        return self.timer(fn, self.reps if reps is None else reps, self.warmup if warmup is None else warmup,
                          queued)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def roofline(self, nbytes: float) -> float:
        return nbytes / self.bw if self.bw else math.nan

    def randn(self, *shape, dtype=BF16):
        return torch.randn(*shape, device=self.device, dtype=dtype)


@dataclasses.dataclass
class Target:
    text: str               # what is compared, with the numbers
    met: bool | None        # None: not measured

    def line(self) -> str:
        verdict = "not measured" if self.met is None else ("met" if self.met else "NOT met")
        return f"{self.text}: **{verdict}**"


def target(name: str, value: float, limit: float, what: str = "x") -> Target:
    if value is None or not math.isfinite(value):
        return Target(f"{name} <= {limit}{what}", None)
    return Target(f"{name} = {value:.2f}{what} (target <= {limit}{what})", value <= limit)


@dataclasses.dataclass
class Section:
    name: str
    title: str
    lines: list = dataclasses.field(default_factory=list)      # markdown
    targets: list = dataclasses.field(default_factory=list)    # Target
    errors: list = dataclasses.field(default_factory=list)     # rows that failed

    def table(self, header: list, rows: list) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        self.lines.append("")

    def note(self, text: str) -> None:
        self.lines += [text, ""]

    @contextlib.contextmanager
    def row(self, what: str):
        """A row that may fail: the error is printed and noted, the section goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a benchmark row must not end the run
            msg = f"{what}: {type(e).__name__}: {e}".replace("\n", " ")[:400]
            traceback.print_exc(file=sys.stderr)
            print(f"  row failed: {msg}", file=sys.stderr, flush=True)
            self.errors.append(msg)
        finally:
            _free()

    def markdown(self) -> str:
        out = [f"## {self.title}", ""] + self.lines
        if self.errors:
            out += ["Rows that failed:", ""] + [f"- {e}" for e in self.errors] + [""]
        if self.targets:
            out += ["Targets:", ""] + [f"- {t.line()}" for t in self.targets] + [""]
        return "\n".join(out)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt(ms: float) -> str:
    if ms is None or not math.isfinite(ms):
        return "n/a"
    return f"{ms:.4f}" if ms < 1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def ratio(a, b) -> float:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else math.nan


def worst_of(ratios) -> float:
    """The largest finite ratio (nan when none was measured)."""
    return max((r for r in ratios if math.isfinite(r)), default=math.nan)


def rfmt(x: float) -> str:
    return f"{x:.2f}" if x is not None and math.isfinite(x) else "n/a"


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}" if b < 2**30 else f"{b / 2**30:.2f} Gi"


# --------------------------------------------------------------------------------------------
# baselines

def baselines_section(ctx: Ctx) -> Section:
    sec = Section("baselines", "Baselines: copy bandwidth, smallest kernel, cuBLAS GEMM")
    rows = []
    n = (1 << 14) if ctx.tiny else (1 << 29)  # bf16 elements: 1 GiB
    src = ctx.randn(n)
    dst = torch.empty_like(src)
    ms = ctx.ms(lambda: dst.copy_(src))
    ctx.bw = 2 * nbytes(src) / ms
    rows.append(["copy (`dst.copy_(src)`)", f"{mib(nbytes(src))} MiB bf16", fmt(ms), f"{ctx.bw / 1e6:.0f} GB/s (read + write)"])
    del src, dst
    x = ctx.randn(1, dtype=torch.float32)
    ms = ctx.ms(lambda: x.mul_(1.0))
    rows.append(["smallest kernel (`x.mul_(1.0)`, 1 element)", "4 B", fmt(ms), "GPU time of one launch"])
    m = 64 if ctx.tiny else 8192
    a, b = ctx.randn(m, m), ctx.randn(m, m)
    ms = ctx.ms(lambda: a @ b, reps=10 if ctx.quick else None)
    rows.append([f"cuBLAS GEMM (`a @ b`, {m}^3)", "bf16", fmt(ms), f"{2 * m ** 3 / ms / 1e9:.0f} TFLOP/s"])
    sec.table(["baseline", "size", "ms", "rate"], rows)
    sec.note("Every roofline below is the op's bytes (read + written) divided by this run's copy bandwidth.")
    return sec


# --------------------------------------------------------------------------------------------
# KVSmooth

def _kvs_shapes(ctx):
    if ctx.tiny:
        return dict(H=4, D=16, steps=[(1, 9), (2, 20)], graph=[(1, 20), (2, 9)], layers=3)
    steps = [(B, T) for B in (1, 32) for T in (600, 2048, 8192)]
    graph = [(1, 2048), (32, 600)] if ctx.quick else [(1, 600), (1, 2048), (1, 8192), (32, 600)]
    return dict(H=32, D=128, steps=steps, graph=graph, layers=32)


def kvsmooth_section(ctx: Ctx) -> Section:
    sec = Section("kvsmooth", "KVSmooth: one decoding step against a read of K")
    sh = _kvs_shapes(ctx)
    H, D = sh["H"], sh["D"]
    rows, worst = [], {}
    for B, T in sh["steps"]:
        with sec.row(f"kvsmooth B={B} T={T}"):
            q, k, v = ctx.randn(B, H, 1, D), ctx.randn(B, H, T, D), ctx.randn(B, H, T, D)
            queue = torch.full((B, 15), float("nan"), device=ctx.device)
            step = ctx.ms(lambda: kvfix.kvsmooth_step_(q, k, v, queue))
            call = ctx.ms(lambda: kvfix.kvsmooth_step_(q, k, v, queue), reps=10, warmup=1, queued=False)
            ent = ctx.ms(lambda: kvfix.row_entropy(q, k))
            read = ctx.ms(lambda: k.sum())
            roof = ctx.roofline(nbytes(k))
            r = ratio(step, read)
            worst.setdefault(B, []).append(r)
            rows.append([B, T, mib(nbytes(k)), fmt(step), fmt(call), fmt(ent), fmt(read), fmt(roof), rfmt(r),
                         rfmt(ratio(step, roof))])
            del q, k, v
    sec.table(["B", "T", "K MiB", "kvsmooth_step_ ms", "step call ms", "row_entropy ms", "read of K ms (`K.sum()`)",
               "K bytes / bw ms", "step / read", "step / roofline"], rows)
    for B in sorted(worst):
        sec.targets.append(target(f"KVSmooth step / read of K, B={B}, worst T", worst_of(worst[B]), 1.5))

    L = sh["layers"]
    grows = []
    for B, T in sh["graph"]:
        with sec.row(f"kvsmooth graph B={B} T={T}"):
            M, cap = 15, T + 16  # a static cache of capacity T + 16 holding T tokens
            qs = [ctx.randn(B, H, 1, D) for _ in range(L)]
            ks = [ctx.randn(B, H, cap, D) for _ in range(L)]
            vs = [ctx.randn(B, H, cap, D) for _ in range(L)]
            queues = [torch.full((B, M), float("nan"), device=ctx.device) for _ in range(L)]
            pos = torch.tensor([T - 1], device=ctx.device)  # the current token's position, in device memory

            def all_layers():
                for i in range(L):
                    kvfix.kvsmooth_step_(qs[i], ks[i], vs[i], queues[i], position=pos)

            def read_all():
                for x in ks:
                    x[:, :, :T].sum()

            k_filled, v_filled = [x[:, :, :T] for x in ks], [x[:, :, :T] for x in vs]

            def one_call():  # the layers in one op call (kvfix.hf.KVSmooth's way): 2 launches in all
                kvfix.kvsmooth_steps_(qs, k_filled, v_filled, queues)

            replay = ctx.graph(all_layers)
            g_ms = ctx.ms(replay, reps=10)
            eager = ctx.ms(all_layers, reps=10, warmup=1, queued=False)
            steps = ctx.ms(one_call, reps=10, warmup=1, queued=False)
            read = ctx.ms(read_all, reps=10)
            # one replay per decoding step: position T, T + 1, ... written in place before each
            before = ks[-1].clone()
            for t in range(T, T + M):
                pos.fill_(t)
                replay()
            moved = (ks[-1] != before).flatten(3).any(-1).any(1).any(0)  # positions the replays wrote
            want = torch.zeros(cap, dtype=torch.bool, device=ctx.device)
            want[T:T + M] = True
            sec.targets.append(Target(f"KVSmooth: {L} layers' steps replayed from one CUDA graph over a static cache, "
                                      f"the position read from device memory (B={B}, T={T}: {M} replays at positions "
                                      f"{T}..{T + M - 1} smoothed exactly those and filled the queues)",
                                      bool(torch.equal(moved, want) and torch.isfinite(queues[-1]).all())))
            r = ratio(g_ms, read)
            grows.append([B, T, L, fmt(g_ms), fmt(g_ms / L * 1e3) + " us", fmt(eager), fmt(steps), fmt(read),
                          rfmt(r)])
            sec.targets.append(target(f"KVSmooth {L}-layer graph replay / {L} reads of K, B={B} T={T}", r, 1.5))
            del qs, ks, vs, queues, replay, before
    sec.table(["B", "T", "layers", "graph replay ms", "per layer", "eager calls ms (idle GPU)",
               "one kvsmooth_steps_ call ms (idle GPU)", "reads of K ms", "replay / reads"], grows)
    sec.note(f"Graph: the {L} layers' `kvsmooth_step_(..., position=pos)` calls over a static cache (one "
             f"[B, {H}, T + 16, {D}] K and V per layer, T positions filled) captured once in a CUDA graph; the "
             "kernels read the current position from `pos` (device memory), so the same graph serves every "
             "decoding step when the decoder writes the next position into `pos` before each replay. step call = "
             "one call on an idle GPU (Python validation and launch included); eager calls: the layers' "
             f"`kvsmooth_step_` calls one by one (2 launches each); one `kvsmooth_steps_` call: the {L} layers' "
             "steps (of the T filled positions) in one op call, 2 launches in all.")
    return sec


# --------------------------------------------------------------------------------------------
# DSCR

def _depth(ctx, N):
    return torch.rand(1, N, device=ctx.device) + 0.01


def dscr_section(ctx: Ctx) -> Section:
    sec = Section("dscr", "DSCR: structured, dense and the cuBLAS floor; one LLaVA-1.5-7B image")
    shapes, dense_max = (TINY_DSCR_SHAPES, TINY_DENSE_MAX_N) if ctx.tiny else (DSCR_SHAPES, DENSE_MAX_N)
    dtypes = (torch.float32, BF16)
    rows = []
    for gh, gw, H in shapes:
        for dt in dtypes:
            with sec.row(f"dscr {gh}x{gw} H={H} {dt}"):
                N, D = gh * gw, (16 if ctx.tiny else 128)
                k, v = ctx.randn(1, H, N, D, dtype=dt), ctx.randn(1, H, N, D, dtype=dt)
                depth = _depth(ctx, N)
                kc, vc = k.clone(), v.clone()
                plan = kvfix.dscr_plan(gh, gw, depth, dtype=dt, **PARAMS)
                ms = {"structured": ctx.ms(lambda: kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured", **PARAMS)),
                      "in place": ctx.ms(lambda: kvfix.dscr_refine_cache_([kc], [vc], depth, (gh, gw),
                                                                           method="structured", **PARAMS)),
                      "copy": ctx.ms(lambda: (k.clone(), v.clone()))}
                err = "n/a"
                if N <= dense_max:
                    coords = kvfix.patch_coords(gh, gw, device=ctx.device)
                    W = R.dscr_weights(depth, coords, **PARAMS)[0].T.contiguous().to(dt)
                    ms["dense"] = ctx.ms(lambda: kvfix.dscr_refine(k, v, depth, coords, **PARAMS))
                    ms["floor"] = ctx.ms(lambda: (torch.matmul(W, k), torch.matmul(W, v)))
                    ks = kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured", **PARAMS)[0]
                    kd = kvfix.dscr_refine(k, v, depth, coords, **PARAMS)[0]
                    err = f"{(ks.float() - kd.float()).abs().max().item():.1e}"
                    del W, ks, kd
                rows.append([f"{gh}x{gw}", H, str(dt)[6:], fmt(ms["structured"]), fmt(ms["in place"]),
                             fmt(ms.get("dense")), fmt(ms.get("floor")), fmt(ms["copy"]),
                             rfmt(ratio(ms["structured"], ms.get("floor"))),
                             rfmt(ratio(ms["structured"], ms.get("dense"))), plan.algorithm, err])
                del k, v, kc, vc
    sec.table(["grid", "H", "dtype", "structured ms", "in place ms", "dense ms", "floor ms (cuBLAS)", "K+V copy ms",
               "structured / floor", "structured / dense", "auto picks", "max abs(structured - dense)"], rows)
    sec.note("K, V [1, H, N, D]; structured = `dscr_refine(..., (gh, gw), method=\"structured\")` (out of place; its "
             "plan reads the depth range on the host), in place = `dscr_refine_cache_`, dense = tensor coords, "
             "floor = `W @ K` and `W @ V` with a precomputed N x N W in the dtype (cuBLAS).")

    # one image of LLaVA-1.5-7B: layers [8, 32) of a [1, 32, T, 128] cache, the 24 x 24 span
    L, H, D, (gh, gw), s, T = (2, 2, 16, (4, 4), 3, 24) if ctx.tiny else (24, 32, 128, (24, 24), 35, 640)
    N = gh * gw
    lrows = []
    for dt in (BF16, torch.float16):
        with sec.row(f"dscr LLaVA {dt}"):
            kcache = [ctx.randn(1, H, T, D, dtype=dt) for _ in range(L)]
            vcache = [ctx.randn(1, H, T, D, dtype=dt) for _ in range(L)]
            keys = [x[:, :, s:s + N] for x in kcache]
            values = [x[:, :, s:s + N] for x in vcache]
            depth = _depth(ctx, N)
            plan = kvfix.dscr_plan(gh, gw, depth, dtype=dt, **PARAMS)
            ms = {m: ctx.ms(lambda m=m: kvfix.dscr_refine_cache_(keys, values, depth, (gh, gw), method=m, **PARAMS),
                            reps=15)
                  for m in ("auto", "structured", "dense")}
            faster = "structured" if ms["structured"] <= ms["dense"] else "dense"
            # a new image's plan (host): a smooth map pooled on the CPU as kvfix.hf.DSCR pools it
            from bench.common import depth_map
            fresh = kvfix.patch_depth(depth_map("smooth", gh, gw, seed=1), gh, gw).flatten()
            plan_ms = ctx.ms(lambda: (dscr_structured._PLANS.clear(),
                                      kvfix.dscr_plan(gh, gw, fresh, dtype=dt, device=ctx.device, **PARAMS)),
                             reps=9, warmup=1, queued=False)
            lrows.append([str(dt)[6:], fmt(ms["auto"]), fmt(ms["structured"]), fmt(ms["dense"]),
                          fmt(ms["auto"] / L), plan.algorithm, faster, fmt(plan_ms)])
            if dt == BF16:
                sec.targets.append(target(f"DSCR, one image, all {L} layers (auto, bf16)", ms["auto"], 0.3, " ms"))
                sec.targets.append(Target(f"`auto` picks the faster algorithm on this device (bf16): picks "
                                          f"{plan.algorithm}, faster measured {faster}", plan.algorithm == faster))
            del kcache, vcache, keys, values
    sec.table(["dtype", f"auto ms ({L} layers)", "structured ms", "dense ms", "auto per layer ms", "auto picks",
               "faster", "plan ms (a new image, host)"], lrows)
    sec.note(f"One image of LLaVA-1.5-7B as `kvfix.hf.DSCR` refines it: the {gh} x {gw} image span [{s}, {s + N}) of "
             f"the K and V caches ([1, {H}, {T}, {D}]) of the {L} selected layers in one `dscr_refine_cache_` call "
             "(auto includes its plan's host read of the depth range; the plan itself is cached: the same depth "
             "every repeat). Plan: `kvfix.dscr_plan` of a new image's depth (a smooth map, every patch its own "
             "depth, pooled on the CPU), the host time a new image adds once, before its first layer.")
    return sec


# --------------------------------------------------------------------------------------------
# SCR ops, contrastive_logits, rope_calibrate: against their memory roofline

def _inv_freq(D, device, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))


def rooflines_section(ctx: Ctx) -> Section:
    sec = Section("rooflines", "SCR, contrastive_logits, rope_calibrate against their memory roofline")
    rows = []
    worst = {}

    def add(op, shape, dt, ms, b, extra=""):
        roof = ctx.roofline(b)
        r = ratio(ms, roof)
        worst.setdefault(op, []).append(r)
        rows.append([op, shape, str(dt)[6:], fmt(ms), mib(b), fmt(roof), rfmt(r), extra])

    tiny = ctx.tiny
    # scr_scores: (label, B, Hq, Hkv, T, span, Tq) -- queries: the text after the image
    scores_shapes = ([("tiny", 1, 4, 2, 30, (3, 19), 8)] if tiny else
                     [("LLaVA-1.5-7B prompt", 1, 32, 32, 621, (5, 581), 40),
                      ("Qwen2-VL-7B prompt", 1, 28, 4, 623, (6, 582), 40),
                      ("B=8, T=4096", 8, 32, 8, 4096, (100, 2404), 64)])
    D = 16 if tiny else 128
    for label, B, Hq, Hkv, T, span, Tq in scores_shapes:
        with sec.row(f"scr_scores {label}"):
            q, k = ctx.randn(B, Hq, Tq, D), ctx.randn(B, Hkv, T, D)
            ms = ctx.ms(lambda: kvfix.scr_scores(q, k, span, causal=True))
            add("scr_scores", f"{label}: q [{B}, {Hq}, {Tq}, {D}], k [{B}, {Hkv}, {T}, {D}], N={span[1] - span[0]}",
                BF16, ms, nbytes(q, k) + B * (span[1] - span[0]) * 4, "causal")
    # scr_redistribute: (label, B, gh, gw, C)
    red_shapes = ([("tiny", 2, 4, 5, 32)] if tiny else
                  [("LLaVA-1.5-7B", 1, 24, 24, 4096), ("Qwen2-VL-7B", 1, 24, 24, 3584), ("B=8 LLaVA", 8, 24, 24, 4096)])
    top_k = 4 if tiny else 32
    for label, B, gh, gw, C in red_shapes:
        with sec.row(f"scr_redistribute {label}"):
            N, s = gh * gw, 5
            stream = ctx.randn(B, N + 40, C)
            hidden = stream[:, s:s + N]
            scores = torch.rand(B, N, device=ctx.device) + 0.01
            out = kvfix.scr_redistribute(hidden, scores, (gh, gw), top_k=top_k)
            changed = int((out != hidden).any(-1).sum())
            es = hidden.element_size()
            ms = ctx.ms(lambda: kvfix.scr_redistribute(hidden, scores, (gh, gw), top_k=top_k))
            add("scr_redistribute", f"{label}: hidden [{B}, {N}, {C}], top_k {top_k}", BF16, ms,
                2 * B * N * C * es + nbytes(scores), "out of place: all rows read and written")
            ms = ctx.ms(lambda: kvfix.scr_redistribute_(hidden, scores, (gh, gw), top_k=top_k))
            add("scr_redistribute_", f"{label}: a [{B}, {N}, {C}] view of the stream, top_k {top_k}", BF16, ms,
                2 * changed * C * es + nbytes(scores), f"in place: the {changed} changed rows read and written")
            del stream, hidden, out
    # contrastive_logits: (B, V, dtype)
    cl_shapes = ([(2, 100, BF16), (1, 100, torch.float32)] if tiny else
                 [(1, 32064, BF16), (1, 152064, BF16), (1, 152064, torch.float32), (64, 152064, BF16)])
    for B, V, dt in cl_shapes:
        with sec.row(f"contrastive_logits {B}x{V} {dt}"):
            la, lb = ctx.randn(B, V, dtype=dt), ctx.randn(B, V, dtype=dt)
            ms = ctx.ms(lambda: kvfix.contrastive_logits(la, lb))
            add("contrastive_logits", f"[{B}, {V}]", dt, ms, 3 * nbytes(la), "2 reads + 1 write")
    # rope_calibrate: (label, B, Hkv, T, span, mrope)
    rope_shapes = ([("tiny", 1, 2, 24, (3, 19), None), ("tiny M-RoPE", 2, 2, 24, (3, 19), [2, 3, 3])] if tiny else
                   [("LLaVA-1.5-7B prompt", 1, 32, 621, (5, 581), None),
                    ("Qwen2-VL-7B prompt (M-RoPE)", 1, 4, 623, (6, 582), [16, 24, 24]),
                    ("B=8 LLaVA, T=2048", 8, 32, 2048, (35, 611), None)])
    for label, B, Hkv, T, span, sections in rope_shapes:
        with sec.row(f"rope_calibrate {label}"):
            k = ctx.randn(B, Hkv, T, D)
            inv = _inv_freq(D, ctx.device)
            N = span[1] - span[0]
            pos, extra = None, "positions = cache index"
            b = 2 * B * Hkv * N * D * k.element_size() + nbytes(inv)
            if sections is not None:
                pos = torch.arange(T, device=ctx.device).expand(len(sections), B, T).contiguous()
                b += len(sections) * B * N * 8
                extra = "M-RoPE positions [3, B, T] (their span read)"
            ms = ctx.ms(lambda: kvfix.rope_calibrate(k, span, inv, positions=pos, mrope_section=sections))
            add("rope_calibrate", f"{label}: k [{B}, {Hkv}, {T}, {D}], N={N}", BF16, ms, b, extra)
    sec.table(["op", "shape", "dtype", "ms", "MiB moved", "roofline ms", "ms / roofline", "bytes counted"], rows)
    sec.note("roofline = the bytes the op must move (read + written, as counted in the last column) / this run's copy "
             "bandwidth. Neither SCR op reads anything on the host on a GPU (`scr_redistribute` writes nan over an "
             "item whose scores are not finite instead of checking them there).")
    for op, w in worst.items():
        sec.targets.append(target(f"{op} / memory roofline, worst row", worst_of(w), 3.0))
    return sec


# --------------------------------------------------------------------------------------------
# CMAC attention against SDPA and flash-attn

def _flash_attn():
    try:
        import flash_attn
        from flash_attn import flash_attn_func
        return flash_attn.__version__, flash_attn_func
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        return None, None


def _sdpa_baselines(ctx, q, k, v, causal) -> tuple[dict, list]:
    """({name: ms} of torch SDPA (default dispatch and each backend) and the flash-attn package,
    notes on the backends that cannot run here)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out, notes = {}, []
    out["SDPA (default)"] = ctx.ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("SDPA mem-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                out[name] = ctx.ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        except RuntimeError as e:  # backend not available for this device / shape
            out[name] = math.nan
            notes.append(f"{name} not available here ({str(e).splitlines()[0][:120]})")
    version, fa = _flash_attn()
    if fa is not None and q.is_cuda:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, T, H, D] views
        out[f"flash-attn {version}"] = ctx.ms(lambda: fa(qt, kt, vt, causal=causal))
    return out, notes


def cmac_section(ctx: Ctx) -> Section:
    sec = Section("cmac", "CMAC attention against torch SDPA and flash-attn")
    if ctx.tiny:
        H, D, dec, pre = 2, 16, dict(B=2, T=24, span=(3, 11)), dict(B=1, T=20, span=(2, 10))
    else:
        H, D, dec, pre = 32, 128, dict(B=2, T=2048, span=(35, 611)), dict(B=1, T=640, span=(35, 611))
    inv = _inv_freq(D, ctx.device)
    for phase, sh in (("decode", dec), ("prefill", pre)):
        with sec.row(f"cmac {phase}"):
            B, T, span = sh["B"], sh["T"], sh["span"]
            Tq = 1 if phase == "decode" else T
            q, k, v = ctx.randn(B, H, Tq, D), ctx.randn(B, H, T, D), ctx.randn(B, H, T, D)
            kcal = kvfix.rope_calibrate(k, span, inv)
            variants = {"cmac, IMD off": False, "cmac, IMD on": True}
            if B == 2:
                variants["cmac, IMD on row 2 only (as kvfix.hf.CMAC)"] = torch.tensor([False, True], device=ctx.device)
            ms = {name: ctx.ms(lambda imd=imd: kvfix.cmac_attention(q, k, v, span, k_calibrated=kcal, imd=imd))
                  for name, imd in variants.items()}
            call = {}
            if phase == "decode":
                call["cmac, IMD on"] = ctx.ms(lambda: kvfix.cmac_attention(q, k, v, span, k_calibrated=kcal, imd=True),
                                              reps=10, warmup=1, queued=False)
            # decode: one query at the last position sees every key (SDPA's is_causal would align top-left)
            base, notes = _sdpa_baselines(ctx, q, k, v, phase == "prefill")
            call["SDPA (default)"] = math.nan
            if phase == "decode":
                import torch.nn.functional as F
                call["SDPA (default)"] = ctx.ms(lambda: F.scaled_dot_product_attention(q, k, v), reps=10, warmup=1,
                                                queued=False)
            ref_name = "SDPA (default)" if phase == "decode" else "SDPA flash"
            ref = base.get(ref_name, math.nan)
            if not math.isfinite(ref):
                ref_name, ref = "SDPA (default)", base["SDPA (default)"]
            fastest = min((x for x in base.values() if math.isfinite(x)), default=math.nan)
            rows = [[n, fmt(x), fmt(call.get(n, math.nan)), rfmt(ratio(x, ref)), rfmt(ratio(x, fastest))]
                    for n, x in list(ms.items()) + list(base.items())]
            shape = f"q [{B}, {H}, {Tq}, {D}], k, v [{B}, {H}, {T}, {D}], image span {list(span)}"
            sec.note(f"**{phase}**: {shape}" + (", causal" if phase == "prefill" else ""))
            sec.table(["kernel", "ms", "call ms (idle GPU)", f"/ {ref_name}", "/ fastest baseline"], rows)
            for n in notes:
                sec.note(f"{phase}: {n}")
            for name in ms:
                if phase == "decode" and name != "cmac, IMD on":
                    continue
                sec.targets.append(target(f"cmac_attention {phase} ({name.split(', ', 1)[1]}) / {ref_name}",
                                          ratio(ms[name], ref), 1.5))
            del q, k, v, kcal
    version, _ = _flash_attn()
    sec.note("cmac = `cmac_attention(q, k, v, span, k_calibrated=rope_calibrate(k, span, inv_freq), imd=...)` (CMPC "
             "on every after-image query, IMD as stated). Baselines: plain attention on the same q, k, v; flash-attn "
             f"package: {version or 'not installed'}. call = one call on an idle GPU (Python and launch included).")
    return sec


# --------------------------------------------------------------------------------------------
# whole models: the exact LLaVA-1.5-7B and Qwen2-VL-7B configs, random weights

def llava_15_7b_config(tiny: bool = False, layers: int | None = None, tiny_layers: int = 4):
    """llava-hf/llava-1.5-7b-hf's config (CLIP ViT-L/14-336 + Vicuna-7B), written out; tiny: the
    same token ids and vocabulary, `tiny_layers` small text layers, a 4 x 4 patch grid (CPU tests,
    the host section); layers: the full config with its text and vision layer counts cut to
    `layers` (CPU record)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False)
    if tiny:
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, projection_dim=32)
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=tiny_layers, num_attention_heads=4,
                    num_key_value_heads=4)
    elif layers is not None:
        text.update(num_hidden_layers=layers)
        vision.update(num_hidden_layers=max(layers, 2))  # vision_feature_layer=-2 needs two
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                       image_token_id=32000, pad_token_id=32001, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       tie_word_embeddings=False)


def qwen2_vl_7b_config(tiny: bool = False, layers: int | None = None, tiny_layers: int = 4):
    """Qwen/Qwen2-VL-7B-Instruct's config, written out; tiny: same token ids and vocabulary,
    `tiny_layers` small text layers, 1 vision block; layers: the full config with `layers` text
    layers and vision blocks."""
    from transformers import Qwen2VLConfig
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                attention_dropout=0.0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if tiny:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=tiny_layers, num_attention_heads=4,
                    num_key_value_heads=2, max_window_layers=tiny_layers,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
        vision.update(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    elif layers is not None:
        text.update(num_hidden_layers=layers, max_window_layers=layers)
        vision.update(depth=layers)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def build_model(family: str, device: str, dtype: torch.dtype, tiny: bool = False, layers: int | None = None,
                tiny_layers: int = 4):
    """A random-weight model of the family, its parameters created on `device` in `dtype` (no CPU
    initialisation, nothing downloaded); greedy generation never stops at eos."""
    import transformers
    if family == "llava":
        cfg, cls = llava_15_7b_config(tiny, layers, tiny_layers), transformers.LlavaForConditionalGeneration
    else:
        cfg, cls = qwen2_vl_7b_config(tiny, layers, tiny_layers), transformers.Qwen2VLForConditionalGeneration
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.get_text_config().pad_token_id or 0
    return model


def model_prompt(model, family: str, device: str, tiny: bool = False, text_after: int = 40):
    """(inputs, depth map, image side): one image of the model's size, a few text tokens before,
    `text_after` after. LLaVA-1.5: 336 x 336 (24 x 24 patches of 14). Qwen2-VL keeps an image's own
    resolution; this takes 672 x 672 (48 x 48 patches, merged 2 x 2: 24 x 24 = 576 tokens, as
    LLaVA). tiny: 112 x 112 for Qwen2-VL (4 x 4 tokens), LLaVA's tiny config's own size."""
    gen = torch.Generator().manual_seed(0)
    cfg, vc = model.config, model.config.vision_config
    dtype = next(model.parameters()).dtype
    if family == "llava":
        side, g = vc.image_size, vc.image_size // vc.patch_size
        ids = ([1] + torch.randint(3, 32000, (4,), generator=gen).tolist() + [cfg.image_token_id] * (g * g)
               + torch.randint(3, 32000, (text_after,), generator=gen).tolist())
        inputs = {"pixel_values": torch.randn(1, 3, side, side, generator=gen)}
    else:
        side = 112 if tiny else 672
        h = side // vc.patch_size
        gh = h // vc.spatial_merge_size
        ids = (torch.randint(0, 151643, (5,), generator=gen).tolist() + [cfg.vision_start_token_id]
               + [cfg.image_token_id] * (gh * gh) + [cfg.vision_end_token_id]
               + torch.randint(0, 151643, (text_after,), generator=gen).tolist())
        row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        inputs = {"pixel_values": torch.randn(h * h, row, generator=gen),
                  "image_grid_thw": torch.tensor([[1, h, h]])}
    input_ids = torch.tensor([ids])
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if family == "qwen":
        inputs["mm_token_type_ids"] = (input_ids == cfg.image_token_id).int()
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    depth = torch.rand(side, side, generator=gen).to(device) + 0.01
    return inputs, depth, side


PLAIN_2 = "plain, 2 rows"   # the prompt twice as one batch, no method: CMAC's batch shape


def _methods():
    from kvfix import hf
    return {"plain": None, PLAIN_2: None, "KVSmooth": hf.KVSmooth, "CMAC": hf.CMAC, "DSCR": hf.DSCR, "SCR": hf.SCR}


def doubled_inputs(inputs: dict) -> dict:
    """The model inputs of one prompt as a batch of two identical rows (LLaVA: pixel_values
    [1, ...] -> [2, ...]; Qwen2-VL: the image's patch rows and grid twice)."""
    out = {}
    for k, v in inputs.items():
        out[k] = torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
    return out


# decode per token / plain: KVSmooth <= 1.10, CMAC <= 1.4 (both branches in one batch of 2 rows),
# DSCR and SCR 1.0 (they touch only the prefill; up to 1.05 counts as 1.0)
DECODE_TARGETS = {"KVSmooth": 1.10, "CMAC": 1.4, "DSCR": 1.05, "SCR": 1.05}
MODELS = (("LLaVA-1.5-7B", "llava"), ("Qwen2-VL-7B", "qwen"))


class _StepClock:
    """perf_counter stamps of the output layer's forward calls: one per generation step (the
    prefill's first token, then each decoded token; CMAC's two branches are one batch). CPU only:
    on a GPU a stamp would need a synchronisation inside the step."""

    def __init__(self, model):
        self.stamps: list[float] = []
        self._hook = model.get_output_embeddings().register_forward_hook(
            lambda *_: self.stamps.append(time.perf_counter()))

    def close(self):
        self._hook.remove()


def model_rows(ctx: Ctx, family: str, n_new: int, reps: int, warmup: int,
               tiny_layers: int | None = None) -> tuple[dict, dict]:
    """{variant: (prefill ms, decode ms per token)} and a description of the run.

    tiny_layers: the tiny-width model with this many text layers (the host section), whatever
    ctx.tiny and ctx.layers say.

    GPU: prefill = generate(max_new_tokens=1), decode = (generate(1 + n) - prefill) / n, CUDA
    events. CPU: one generate(1 + n) per round, timed by _StepClock: prefill = from the call to the
    first token's output layer, decode = the median interval between the n decode steps (the
    difference of two whole generate calls would drown the decode in the prefill's noise)."""
    from kvfix import hf
    t0 = time.perf_counter()
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tiny = tiny_layers is not None or (ctx.tiny and ctx.layers is None)
    model = build_model(family, ctx.device, ctx.model_dtype, tiny, None if tiny else ctx.layers, tiny_layers or 4)
    if ctx.device != "cpu":
        torch.cuda.synchronize()
    built = time.perf_counter() - t0
    inputs, depth, side = model_prompt(model, family, ctx.device, tiny)
    inputs2 = doubled_inputs(inputs)
    prompt = inputs["input_ids"].shape[1]
    methods = _methods()
    samples = {name: ([], []) for name in methods}

    def gen(handle, k, rows2=False):
        kw = dict(max_new_tokens=k, min_new_tokens=k, do_sample=False)
        dscr_structured._PLANS.clear()  # every prompt a new image: DSCR plans it (host) in each prefill
        if handle is None:
            out = model.generate(**(inputs2 if rows2 else inputs), **kw)
        else:
            out = handle.generate(**inputs, depth_maps=[depth], **kw)
        if out.shape[1] != prompt + k or out.shape[0] != (2 if rows2 else 1):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {k} new tokens")

    def timed(handle, rows2=False) -> tuple[float, float]:
        """(prefill ms, decode ms per token) of one round."""
        if ctx.device != "cpu":
            t1 = ctx.ms(lambda: gen(handle, 1, rows2), reps=1, warmup=0, queued=False)
            tn = ctx.ms(lambda: gen(handle, 1 + n_new, rows2), reps=1, warmup=0, queued=False)
            return t1, (tn - t1) / n_new
        clock = _StepClock(model)
        try:
            start = time.perf_counter()
            gen(handle, 1 + n_new, rows2)
        finally:
            clock.close()
        steps = clock.stamps[-(n_new + 1):]  # the first token's step, then the n decode steps
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        return 1e3 * (steps[0] - start), 1e3 * statistics.median(gaps)

    names = list(methods)
    from bench.common import balanced_orders
    orders = balanced_orders(len(names))  # each round its own predecessors (rotating kept the cyclic order)
    for rnd in range(warmup + reps):
        for name in (names[i] for i in orders[rnd % len(orders)]):
            handle = None if methods[name] is None else hf.enable(model, methods[name]())
            try:
                p, d = timed(handle, rows2=name == PLAIN_2)
            finally:
                if handle is not None:
                    handle.disable()
            if rnd >= warmup:
                samples[name][0].append(p)
                samples[name][1].append(d)
    res = {name: (statistics.median(ps), statistics.median(ds)) for name, (ps, ds) in samples.items()}
    cfg = model.config.get_text_config()
    vc = model.config.vision_config
    info = dict(prompt=prompt, side=side, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                vision_layers=getattr(vc, "num_hidden_layers", None) or vc.depth,
                params=sum(p.numel() for p in model.parameters()), built_s=built,
                dtype=str(next(model.parameters()).dtype)[6:], attn=model.config._attn_implementation,
                peak=(f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                      if ctx.device == "cuda" else ""),
                decode_rounds={name: ds for name, (_, ds) in samples.items()},  # round by round, all variants
                prefill_rounds={name: ps for name, (ps, _) in samples.items()})
    del model, inputs
    _free()
    return res, info


def models_section(ctx: Ctx) -> Section:
    sec = Section("models", "Whole models: kvfix.hf methods against plain greedy decoding")
    tiny = ctx.tiny and ctx.layers is None
    n_new = 2 if tiny else (8 if ctx.quick or ctx.device == "cpu" else 32)
    reps = 1 if (tiny or ctx.quick) else 3
    warmup = 0 if tiny else 1
    per_model = ESTIMATE_S["models"]
    for label, family in MODELS:
        if ctx.left() < per_model:
            sec.errors.append(f"{label}: skipped, {ctx.left():.0f} s left of the budget (needs ~{per_model:.0f} s)")
            continue
        with sec.row(label):
            res, info = model_rows(ctx, family, n_new, reps, warmup)
            dec, pre = info["decode_rounds"], info["prefill_rounds"]

            def paired(rounds, name, base):  # the median over the rounds of each round's ratio
                return statistics.median(ratio(a, b) for a, b in zip(rounds[name], rounds[base]))
            rows = []
            for name, (p, d) in res.items():
                rows.append([name, fmt(p), rfmt(paired(pre, name, "plain")), fmt(d), rfmt(paired(dec, name, "plain")),
                             rfmt(paired(dec, name, PLAIN_2))])
                if name in DECODE_TARGETS:
                    sec.targets.append(target(f"{label} {name} decode per token / plain", paired(dec, name, "plain"),
                                              DECODE_TARGETS[name]))
            sec.note(f"{label}: plain with 2 rows / plain {rfmt(paired(dec, PLAIN_2, 'plain'))} (the batch-of-2 "
                     f"floor); CMAC decode / plain, 2 rows {rfmt(paired(dec, 'CMAC', PLAIN_2))} (CMAC's own cost on "
                     f"top of it; the target line above is against plain with 1 row)")
            sec.note(f"**{label}** (random weights, {info['params'] / 1e9:.2f} B parameters, {info['dtype']}, "
                     f"{info['layers']} text layers, hidden {info['hidden']}, {info['vision_layers']} vision layers, "
                     f"attention {info['attn']}, built in "
                     f"{info['built_s']:.1f} s{info['peak']}): one {info['side']} x {info['side']} image, prompt "
                     f"{info['prompt']} tokens, greedy, {n_new} decoded tokens; medians of {reps} timed round(s) after "
                     f"{warmup} warm-up round(s); ratios: the median over the rounds of each round's ratio (the "
                     f"variants run in turn within a round)")
            sec.table(["variant", "prefill ms", "prefill / plain", "decode ms / token", "decode / plain",
                       "decode / plain, 2 rows"], rows)
    sec.note("Variants: `kvfix.hf.enable(model, Method())` with the defaults, enabled outside the timed calls; "
             "DSCR gets a random depth map at the image's size. prefill = `generate(max_new_tokens=1)` (vision tower, "
             "prefill, first token; SCR's diagnostic pass, DSCR's plan and refinement included: the plan cache is "
             "cleared before every generate, as for a new image); decode = (generate of 1 + n "
             "tokens - prefill) / n. CMAC runs both branches as one batch of 2 rows; \"plain, 2 rows\" is plain "
             "greedy on the prompt twice as one batch (the same shape, no method)."
             + (" On the CPU one generate of 1 + n tokens per round, stamped at each call of the output layer: "
                "prefill = up to the first token's step, decode = the median interval between decode steps."
                if ctx.device == "cpu" else ""))
    return sec


# The 7B configs' text layer counts (the host section's models: these layers at tiny widths).
FULL_LAYERS = {"llava": 32, "qwen": 28}


def host_section(ctx: Ctx) -> Section:
    """Decoding at batch 1 is bound by the host on a GPU: transformers dispatches every op of every
    layer from Python (tens of microseconds a layer), and the GPU's share of a 7B model's token
    (its weights read once) is shorter. What a method adds to the host's time per layer is then
    what it adds to the token. The models here have the 7B configs' layer counts at tiny widths,
    so the step's arithmetic is negligible and its time is that host time."""
    sec = Section("host", "Host time per decoded token: the 7B layer counts at tiny widths")
    smoke = ctx.reps <= 1
    n_new, reps, warmup = (2, 1, 0) if smoke else ((20, 25, 1) if ctx.device == "cpu" else (40, 5, 1))
    threads = torch.get_num_threads()
    for label, family in MODELS:
        L = FULL_LAYERS[family]
        with sec.row(f"host {label}"):
            if ctx.device == "cpu":  # one thread, as the host's Python: no worker threads waking per op
                torch.set_num_threads(1)
            try:
                res, info = model_rows(ctx, family, n_new, reps, warmup, tiny_layers=L)
            finally:
                torch.set_num_threads(threads)
            plain, rounds = res["plain"][1], info["decode_rounds"]
            pre_plain, pre_rounds = res["plain"][0], info["prefill_rounds"]
            rows = []
            for name, (p, d) in res.items():
                # each round runs every variant once: the differences to plain within a round are
                # what the machine's slow and fast phases disturb least
                diff = sorted(a - b for a, b in zip(rounds[name], rounds["plain"]))
                q1, q2, q3 = (diff[(len(diff) - 1) * i // 4] for i in (1, 2, 3))
                added = ratio(plain + q2, plain)
                pre = statistics.median(a - b for a, b in zip(pre_rounds[name], pre_rounds["plain"]))
                rows.append([name, fmt(d), rfmt(added), f"{1e3 * q2 / L:+.1f}",
                             f"{1e3 * q1 / L:+.1f} .. {1e3 * q3 / L:+.1f}", fmt(p), f"{pre:+.2f}"])
                if name in DECODE_TARGETS:
                    sec.targets.append(target(f"{label}, host time alone: {name} decode per token / plain",
                                              added, DECODE_TARGETS[name]))
            sec.note(f"**{label}** shape, tiny widths ({L} text layers, hidden {info['hidden']}, {info['dtype']}, "
                     f"attention {info['attn']}): prompt {info['prompt']} tokens, {n_new} decoded tokens; medians of "
                     f"{reps} round(s) after {warmup} warm-up round(s)")
            sec.table(["variant", "decode ms / token", "/ plain", "us added per layer",
                       "quartiles of the rounds (us per layer)", "prefill ms", "prefill ms added"], rows)
    sec.note("Each target here is a bound on the whole-model row of the same name (models section) wherever "
             "decoding waits on the host: a method that adds more host time than its target allows cannot meet "
             "it there. CMAC's two branches are one batch of 2 rows (on a GPU nearly free at batch 1; here the "
             "tiny model's own arithmetic, also doubled, is part of its ratio). Timed as the models section "
             "times decoding (CPU: per-step stamps at the output layer; GPU: generate differences); decode ms: the "
             "median over the rounds; / plain and us added: the median of the rounds' differences to plain (each "
             "round runs every variant once), with their quartiles. prefill ms: `generate`'s time to its first "
             "token, every prompt a new image (DSCR plans it on the host: the plan cache is cleared before every "
             "generate); added: the median of the rounds' differences to plain. At these widths a prefill is "
             "mostly host time; how much of it a GPU's prefill of the 7B model hides is for a GPU run to show.")
    return sec


SECTION_FNS = {"baselines": baselines_section, "kvsmooth": kvsmooth_section, "dscr": dscr_section,
               "rooflines": rooflines_section, "cmac": cmac_section, "models": models_section, "host": host_section}


# --------------------------------------------------------------------------------------------
# report

def header(device: str, cmd: str, started: datetime.datetime, layers: int | None = None,
           host_only: bool = False) -> list[str]:
    try:
        import transformers
        tf = transformers.__version__
    except Exception as e:  # noqa: BLE001 - the op sections run without it
        tf = f"not importable ({type(e).__name__}: {e})"
    bi = kvfix.build_info()
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), "
               f"CUDA {torch.version.cuda}")
    elif layers is not None:
        from bench.common import cpu_path
        dev = (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
               f"{cpu_path()}): the models at full width, cut to {layers} layers")
    elif host_only:
        from bench.common import cpu_path
        dev = (f"CPU ({platform.processor() or platform.machine()}; {cpu_path()}): the host section, one thread, "
               "the 7B configs' layer counts at tiny widths")
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}): smoke run on tiny shapes, timings meaningless"
    version, _ = _flash_attn()
    return [f"- device: {dev}",
            f"- torch {torch.__version__}, transformers {tf}, flash-attn "
            f"{version or 'not installed'}, Python {platform.python_version()}",
            f"- kvfix {kvfix.__version__} (kernels: {', '.join(bi.get('devices', []))}; CUDA archs "
            f"{', '.join(bi.get('cuda_archs', [])) or 'none'}; built with torch {bi.get('built_with_torch')}, "
            f"nvcc {bi.get('nvcc')})",
            f"- date: {started:%Y-%m-%d %H:%M:%S %Z}".rstrip(),
            f"- command: `{cmd}`"]


def render(head: list, sections: list, elapsed: float, done: bool, title: str = "kvfix on a GPU") -> str:
    out = [f"# {title}", "",
           "Generated by `python -m bench.gpu` (bench/gpu.py; method in its docstring); do not edit by hand, rerun it.",
           ""] + head + [f"- run time: {elapsed:.0f} s" + ("" if done else " (run in progress or cut short)"), ""]
    targets = [t for s in sections for t in s.targets]
    if targets:
        met = sum(t.met is True for t in targets)
        out += [f"## Targets (issue 18): {met} of {len(targets)} met", ""] + [f"- {t.line()}" for t in targets] + [""]
    for s in sections:
        out += [s.markdown()]
    return "\n".join(out) + "\n"


def make_ctx(device: str, quick: bool, budget_s: float, layers: int | None = None,
             model_dtype: torch.dtype = BF16) -> Ctx:
    if device == "cuda":
        return Ctx("cuda", cuda_timer, cuda_graph, tiny=False, quick=quick, reps=15 if quick else 25,
                   deadline=time.perf_counter() + budget_s, layers=layers, model_dtype=model_dtype)
    return Ctx("cpu", wall_timer, lambda fn: fn, tiny=True, quick=quick, reps=3, warmup=1,
               deadline=time.perf_counter() + budget_s, layers=layers, model_dtype=model_dtype)


def run(ctx: Ctx, names, write: Callable[[list, bool], None]) -> list:
    """Run the named sections in order (baselines first when rooflines need it), each guarded."""
    done = []
    for name in names:
        need = ESTIMATE_S[name]
        if ctx.left() < need and not ctx.tiny:
            sec = Section(name, f"{name}: skipped")
            sec.errors.append(f"skipped: {ctx.left():.0f} s left of the budget, the section needs ~{need} s")
        else:
            t0 = time.perf_counter()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                sec = SECTION_FNS[name](ctx)
            except Exception as e:  # noqa: BLE001 - a failed section must not end the run
                traceback.print_exc(file=sys.stderr)
                sec = Section(name, f"{name}: failed")
                sec.errors.append(f"{type(e).__name__}: {e}".replace("\n", " ")[:400])
            _free()
            sec.lines.append(f"(section time: {time.perf_counter() - t0:.1f} s)")
            sec.lines.append("")
        print(sec.markdown(), flush=True)
        done.append(sec)
        write(done, False)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write (default docs/GPU.md)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all, in that order)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, graph rows and decoded tokens")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for the whole run: a section that would not fit in what is left is skipped")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: tiny shapes, wall-clock timer (a smoke test of this script; numbers meaningless, "
                         "except the CPU records of the host section and, with --layers, the models section)")
    ap.add_argument("--layers", type=int, default=None,
                    help="models section: the exact configs with their text and vision layers cut to this many "
                         "(with --device cpu: the CPU record of the models section at full width, e.g. "
                         "`--device cpu --sections models --layers 4 --dtype fp32 --out bench/MODELS_CPU.md --budget-s 1800`)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the models' dtype (default bf16)")
    args = ap.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if "rooflines" in names and "baselines" not in names:
        names.insert(0, "baselines")  # the rooflines need the copy bandwidth
    names = [s for s in SECTIONS if s in names]
    if args.device == "cpu" and args.layers is not None and names != ["models"]:
        ap.error("--device cpu --layers measures the models section only: add --sections models")
    if args.device == "cuda" and (not torch.cuda.is_available() or "cuda" not in kvfix.build_info()["devices"]):
        print("bench.gpu needs a GPU and kvfix built with its CUDA kernels (or --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    argv_used = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join(["python -m bench.gpu"] + argv_used)
    head = header(args.device, cmd, started, args.layers if args.device == "cpu" else None,
                  host_only=args.device == "cpu" and names == ["host"])
    print("\n".join(head), flush=True)
    ctx = make_ctx(args.device, args.quick, args.budget_s, args.layers,
                   BF16 if args.dtype == "bf16" else torch.float32)
    title = ("kvfix whole-model decode cost on the CPU" if args.device == "cpu" and args.layers is not None
             else "kvfix host time per decoded token on the CPU" if args.device == "cpu" and names == ["host"]
             else "kvfix on a GPU")

    def write(sections, done):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(render(head, sections, time.perf_counter() - t_start, done, title))

    torch.manual_seed(0)
    with torch.no_grad():
        sections = run(ctx, names, write)
    write(sections, True)
    targets = [t for s in sections for t in s.targets]
    failed = [f"{s.name}: {e}" for s in sections for e in s.errors]
    print(f"\n{len(sections)} sections in {time.perf_counter() - t_start:.0f} s; targets met "
          f"{sum(t.met is True for t in targets)} of {len(targets)}; rows failed or skipped: {len(failed)}; "
          f"wrote {args.out}", flush=True)
    for t in targets:
        print(f"  target: {t.line()}")
    for f in failed:
        print(f"  failed/skipped: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
