"""Shared pieces of the DSCR benchmarks: shapes, inputs, the three timed variants, errors, memory.

Variants, all producing the refined keys and values of one layer:
- "reference": `kvfix.reference.dscr_refine` in the input dtype (eager PyTorch, full N x N
  weights; float32 for fp32 rows, bf16/fp16 arithmetic for those rows).
- "kvfix": `kvfix.dscr_refine` (the compiled op).
- "floor": the bare GEMMs `torch.matmul(W, K)` and `torch.matmul(W, V)` with a precomputed
  N x N matrix W in the input dtype: the work no dense implementation can skip. W holds random
  positive values of the size of the real weights (~1/N); GEMM speed does not depend on them.
- "mm_floor": the same products as one `torch.mm(W, K[b, h])` per batch item and head, into a
  preallocated [B, H, N, D] output. For bf16/fp16, `torch.matmul(W, K)` with a 2-D W and a 4-D
  K materialises W expanded over the heads (H x N^2 elements, see its peak memory) and runs a
  slower batched path, so this is the tighter floor there; for fp32 the two agree.

Time budgets (every section of bench/table.py): `Budget` shares a run's wall-clock seconds out
as the work goes, `Scaling` estimates one call of a variant before it runs (from the nearest
shape measured so far, by the variant's known scaling), and `interleave` times the variants of
one row interleaved, skipping a variant whose estimated call would not fit the row's budget and
stopping the repeats when the budget is spent (at least one).

Errors are measured against `kvfix.reference.dscr_refine` in float64. Where the full float64
reference is too large (N = 16384), it is evaluated on a subset of output tokens from the
reference weights of those columns only (`reference_columns_f64`, checked against the full
reference by `check_reference_columns`).
"""
from __future__ import annotations

import dataclasses
import gc
import glob
import math
import os
import re
import statistics
import time

import torch

import kvfix
import kvfix.reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# METHODS §1 defaults
PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    gh: int
    gw: int
    D: int
    dtypes: tuple
    ref_skip: str | None = None   # why the eager reference is not run (None: it is)
    err_cols: int | None = None   # float64 error on this many output tokens (None: all)

    @property
    def N(self) -> int:
        return self.gh * self.gw

    @property
    def label(self) -> str:
        return f"{self.name} B={self.B} H={self.H} N={self.N} D={self.D}"


FULL_SHAPES = [
    Shape("LLaVA-1.5", 1, 32, 24, 24, 128, ("fp32", "bf16", "fp16")),
    Shape("Qwen2-VL-7B-like", 1, 4, 32, 32, 128, ("fp32", "bf16")),
    Shape("N=4096", 1, 4, 64, 64, 128, ("fp32", "bf16")),
    Shape("N=16384", 1, 4, 128, 128, 128, ("fp32", "bf16"),
          ref_skip="eager reference materialises N x N matrices", err_cols=512),
]

QUICK_SHAPES = [
    Shape("tiny", 2, 2, 6, 8, 16, ("fp32", "bf16", "fp16")),
    Shape("small", 1, 3, 10, 10, 32, ("fp32", "bf16")),
    Shape("skip-path", 1, 2, 16, 16, 16, ("fp32", "bf16"),
          ref_skip="quick: exercises the no-reference path", err_cols=32),
]


def threads() -> int:
    """The cores this process may run on (the machine's, unless restricted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# time budgets

class Budget:
    """Wall-clock seconds from now, shared out as the work goes (None: unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else max(0.0, self.seconds - self.elapsed())

    def share(self, parts_left: int, weight: float = 1.0, weights_left: float | None = None,
              reserve: float = 0.0) -> "Budget":
        """The next part's budget: (what is left - reserve) x weight / weights_left (default:
        / parts_left). What a part leaves unspent goes to the parts after it."""
        if self.seconds is None:
            return Budget(None)
        total = weights_left if weights_left is not None else float(max(1, parts_left))
        return Budget(max(0.0, self.left() - reserve) * weight / total)


class Scaling:
    """A-priori seconds of one call: the nearest measured call of the same key, scaled by the
    cost units (e.g. B H N^2 D for a dense N x N variant): the largest measured point not above
    the asked cost, else the smallest above it."""

    def __init__(self):
        self.points = {}  # key -> {cost units: seconds}

    def record(self, key, cost: float, seconds: float) -> None:
        self.points.setdefault(key, {})[cost] = seconds

    def estimate(self, key, cost: float) -> float | None:
        pts = self.points.get(key)
        if not pts:
            return None
        below = [c for c in pts if c <= cost]
        c = max(below) if below else min(pts)
        return pts[c] * cost / c


# seconds a memory worker (a fresh process) needs to start, import torch and kvfix and warm up:
# kept out of the rows' shares; bench/table.py sets it from its own import time
WORKER_START_S = 5.0
DSCR_SCALING = Scaling()  # dense DSCR variants, key (dtype, variant), cost B H N^2 D: shared by sections


def dense_cost(shape: "Shape") -> float:
    return float(shape.B * shape.H * shape.N ** 2 * shape.D)


def fmt_s(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 0.1 else f"{x:.2f}"


@dataclasses.dataclass
class Timing:
    """What `interleave` measured: medians and minima (s) per variant that ran, the repeats (every
    variant that ran has the same number), the warm-up call's seconds, and the reason per skipped
    variant. The minima feed the a-priori estimates (Scaling): on a shared machine they are the
    least disturbed by other processes."""
    med: dict
    best: dict
    reps: int
    first: dict
    skipped: dict
    seconds: float

    def ms(self, name: str) -> float:
        return 1e3 * self.med[name] if name in self.med else math.nan


def cell(row: dict, name: str, spec: str = ".3g") -> str:
    """A row dict's `{name}_ms` formatted, or why the variant was skipped (row["skipped"])."""
    if name in row.get("skipped", {}):
        return row["skipped"][name]
    x = row.get(f"{name}_ms", math.nan)
    return "n/a" if x != x else format(x, spec)


def num(x: float, spec: str = ".2f", suffix: str = "") -> str:
    """x formatted, or "n/a" for NaN (a ratio with a skipped variant)."""
    return "n/a" if x != x else format(x, spec) + suffix


def verdict(x: float, limit: float) -> str:
    return "not measured" if x != x else "met" if x <= limit else "NOT met"


def skip_reason(est: float, limit: float, budget: float) -> str:
    """Why a variant is not run: its estimated call does not fit what the row's budget allows it."""
    if budget < 0.01:
        return f"skipped: the run's budget is spent (one call ~{fmt_s(est)} s on this machine)"
    return (f"skipped: one call ~{fmt_s(est)} s > {fmt_s(max(0.0, limit))} s left for it (row budget "
            f"{fmt_s(budget)} s) on this machine")


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache of cpu0 (sysfs), or `default` where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=default)


class CacheEvictor:
    """Calling it reads a float32 buffer of twice the last-level cache (at least 64 MiB), so that
    the call timed after it finds none of its inputs in the cache: a clean read, nothing to
    write back during the timed call."""

    def __init__(self):
        self.buf = torch.ones(max(2 * last_level_cache_bytes(), 64 << 20) // 4)

    def __call__(self, *_) -> None:
        self.buf.sum()


def balanced_orders(n: int) -> list:
    """Orders of n variants (lists of indices) in which, over all of them, each variant follows
    every other one equally often: a Williams design (n orders for even n, 2n for odd n). A call's
    time depends on the call before it (what it left in the cache, the memory it freed); with the
    orders rotated, each variant always followed the same one."""
    if n <= 1:
        return [list(range(n))]
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(x + i) % n for x in first] for i in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def interleave(fns: dict, budget: Budget, *, max_reps: int, min_reps: int = 1, est: dict | None = None,
               calls_needed: int = 2, before=None, setup=None, reserve_pass: bool = False,
               on_first=None, required: tuple = (), relative: dict | None = None) -> Timing:
    """Time the variants `fns` (name -> callable) of one row interleaved: pass r runs them in the
    order balanced_orders(n)[r % len], so each variant follows each other one about equally often.

    A-priori: the estimated pass (the sum of `est[name]`, seconds of one call, None: unknown) must
    fit budget / calls_needed (`calls_needed`: the calls a variant needs at least: warm-up and one
    timed, plus one for a later memory measurement): the row is skipped if the `required`
    variants alone do not fit, then each other variant, in order, is skipped if it does not fit
    beside those kept. The rest run once to warm up (timed: `first`): the required ones first,
    then each other one, in order, if its calls fit beside the remaining calls of those kept: as
    estimated from `relative`, else assuming its call as fast as the fastest measured so far,
    then as its warm-up measured. Then passes of one call each, until
    `max_reps` passes, or until the next pass (timed as the median pass so far; twice that when
    `reserve_pass`, for a later memory measurement) would overrun the budget, but at least
    `min_reps` passes (>= 1).
    Every variant that ran has the same repeats, so medians are compared over the same passes.
    before(name): untimed, before each call; setup(name) -> kwargs of the call (untimed);
    on_first(name, output): called with each warm-up call's output (e.g. to take its error);
    required: variants without which the row means nothing: if one is skipped, all are; they warm
    up first; relative: name -> the known ratio of its call to the required ones' (e.g. a method's
    generate against plain generate), checked against the budget before its warm-up call."""
    t0 = time.perf_counter()
    left = budget.left()
    limit = left / calls_needed  # seconds per pass
    skipped = {}
    est = {n: e for n, e in (est or {}).items() if n in fns and e is not None}
    need = sum(est.get(n, 0.0) for n in required)
    if need > limit:  # the row cannot run
        first_req = max((n for n in required if n in est), key=est.get)
        skipped = {m: skip_reason(est[first_req], limit, left) if m == first_req else f"skipped with {first_req}"
                   for m in fns}
    for n in fns:  # the optional variants, in order, while the estimated pass fits
        if n in required or n in skipped or n not in est:
            continue
        if need + est[n] > limit:
            skipped[n] = skip_reason(est[n], limit - need, left)
        else:
            need += est[n]
    names = [n for n in fns if n not in skipped]

    def call(n, keep=False):
        if before:
            before(n)
        kw = setup(n) if setup else {}
        t = time.perf_counter()
        out = fns[n](**kw)
        t = time.perf_counter() - t
        if keep:
            on_first(n, out)
        del out
        return t

    first = {n: call(n, keep=on_first is not None) for n in names if n in required}  # warm-up, required first
    base = kept = sum(first.values())  # kept: one pass of the variants kept so far
    more = calls_needed - 1  # the calls each kept variant still needs after its warm-up
    for n in names:  # then the others, in order, while their calls fit what is left
        if n in first:
            continue
        if (relative or {}).get(n) is not None:
            e, how = relative[n] * base, f" (~{relative[n]} x {'+'.join(required)})"
        else:  # no estimate: assume it costs what the fastest call measured so far did
            e, how = min(first.values(), default=0.0), " (not measured: assumed as fast as the fastest variant)"
        room = budget.left() - more * kept
        if room <= 0:
            skipped[n] = f"skipped: the variants kept fill the row budget ({fmt_s(left)} s) on this machine"
        elif e * calls_needed > room:
            skipped[n] = skip_reason(e, room / calls_needed, left) + how
        else:
            first[n] = call(n, keep=on_first is not None)
            if more * (kept + first[n]) > budget.left():
                skipped[n] = (f"skipped after one call: {fmt_s(first[n])} s, too long for the "
                              f"{fmt_s(max(0.0, room - first[n]))} s left of the row budget ({fmt_s(left)} s) "
                              "on this machine")
            else:
                kept += first[n]
    names = [n for n in names if n not in skipped]
    times = {n: [] for n in names}
    passes = []
    reps = 0
    orders = balanced_orders(len(names))
    while names and reps < max_reps:
        if reps >= max(1, min_reps):
            nxt = statistics.median(passes) * (2 if reserve_pass else 1)
            if nxt > budget.left():
                break
        t_pass = time.perf_counter()
        for i in orders[reps % len(orders)]:
            n = names[i]
            times[n].append(call(n))
        passes.append(time.perf_counter() - t_pass)
        reps += 1
    return Timing({n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()}, reps,
                  first, skipped,
                  time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# what ran: the CPU paths of ATen and of kvfix's kernels

_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_path() -> str:
    """One line: ATen's CPU capability, the clone of kvfix's CPU kernels that runs here, and the
    bf16 / fp16 instructions the CPU has (without them bf16 / fp16 GEMMs are emulated, slowly).

    kvfix's CPU kernels are compiled with target_clones("arch=x86-64-v4", "arch=x86-64-v3",
    "default") (csrc/cpu/simd.h; without the v4 clone when built with KVFIX_CPU_NO_AVX512=1); the
    loader's resolver takes the v4 (AVX-512) clone where the CPU has AVX512F/BW/CD/DQ/VL and the
    build has it, else v3 (AVX2 + FMA), else the default one: the CPU's flags read from
    /proc/cpuinfo, the clones from the built library."""
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - old torch
        aten = "unknown"
    flags = cpu_flags()
    v4 = v3 = None
    try:
        with open(kvfix._C.__file__, "rb") as f:
            lib = f.read()
        v4, v3 = b"arch_x86_64_v4" in lib, b"arch_x86_64_v3" in lib
    except (AttributeError, OSError):
        pass
    if not flags:
        ours = "unknown (no /proc/cpuinfo)"
    elif v3 is False:
        ours = "one build, no clones found in kvfix._C"
    elif _V4 <= flags and v4 is not False:
        ours = "x86-64-v4 clones (AVX-512)"
    elif _V4 <= flags:
        ours = "x86-64-v3 clones (AVX2 + FMA): this build has no AVX-512 clones (KVFIX_CPU_NO_AVX512=1)"
    elif _V3 <= flags:
        ours = "x86-64-v3 clones (AVX2 + FMA; no AVX-512)"
    else:
        ours = "default clones (no AVX2)"
    low = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags]
    env = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
           if os.environ.get(k)]
    return (f"ATen {aten} (torch.backends.cpu.get_cpu_capability()); kvfix CPU kernels: {ours}; "
            f"bf16/fp16 instructions: {', '.join(low) if low else 'none (bf16 and fp16 GEMMs are emulated)'}"
            + (f"; instruction sets limited by {' '.join(env)}" if env else ""))


# --------------------------------------------------------------------------------------------
# inputs

DEPTH_KINDS = ("smooth", "surfaces-1", "surfaces-3", "surfaces-20", "ramp")


def depth_map(kind: str, gh: int, gw: int, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A float64 [4 gh, 4 gw] depth map (4 x 4 pixels per patch), to be pooled by `kvfix.patch_depth`.

    - "smooth": bicubic interpolation of random 5 x 5 values, plus 2% pixel noise;
    - "surfaces-k" (k = 1, 3, 20): k fronto-parallel regions at distinct depths (evenly spaced
      levels in a random order), the Voronoi cells of k random points; pooled, a patch on a
      boundary gets a mix of its regions' depths (k = 1: a constant map, pooled to zeros);
    - "ramp": a tilted plane, depth = y + 0.618 x (pixel coordinates): every patch at its own
      depth, the continuum case.
    generator: draw from it instead of a fresh one seeded with `seed`.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    H, W = 4 * gh, 4 * gw
    if kind == "smooth":
        coarse = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
        dmap = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True)[0, 0]
        return dmap + 0.02 * torch.rand(dmap.shape, generator=g, dtype=torch.float64)
    if kind.startswith("surfaces-"):
        k = int(kind.split("-")[1])
        pts = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([H, W], dtype=torch.float64)
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                                indexing="ij")
        dist = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
        levels = torch.linspace(1.0, 2.0, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
        return levels[dist.argmin(0)]
    if kind == "ramp":
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
        return yy + 0.618 * xx
    raise ValueError(f"depth kind must be one of {DEPTH_KINDS}, got {kind!r}")


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0, floor: bool = True, unit: str = "patch",
                depth_kind: str = "smooth", depth_scale: float = 1.0) -> dict:
    """k, v ~ N(0, 1) [B, H, N, D]; depth: `depth_map(depth_kind)` pooled to the grid by
    `kvfix.patch_depth(..., scale=depth_scale)` (1.0 by default for the dense table, 255.0 the
    default units); coords: `kvfix.patch_coords` (`unit`: patch units by default); W: the
    floor's N x N matrix."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    k = torch.randn(B, H, N, D, generator=g).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    depth = kvfix.patch_depth(depth_map(depth_kind, shape.gh, shape.gw, generator=g), shape.gh, shape.gw, scale=depth_scale)
    coords = kvfix.patch_coords(shape.gh, shape.gw, unit=unit)
    out = dict(k=k, v=v, depth=depth, coords=coords)
    if floor:
        out["W"] = (torch.rand(N, N, generator=g) * (2.0 / N)).to(dtype)
    return out


def variant_fns(inp: dict, with_reference: bool = True) -> dict:
    """name -> zero-argument callable returning the outputs (tuple of tensors)."""
    k, v, depth, coords = inp["k"], inp["v"], inp["depth"], inp["coords"]
    fns = {}
    if with_reference:
        dr, cr = depth.to(k.dtype), coords.to(k.dtype)
        fns["reference"] = lambda: kvfix.reference.dscr_refine(k, v, dr, cr, **PARAMS)
    fns["kvfix"] = lambda: kvfix.dscr_refine(k, v, depth, coords, **PARAMS)
    if "W" in inp:
        W = inp["W"]
        fns["floor"] = lambda: (torch.matmul(W, k), torch.matmul(W, v))

        def mm_floor():
            outs = (torch.empty_like(k, memory_format=torch.contiguous_format),
                    torch.empty_like(v, memory_format=torch.contiguous_format))
            for x, y in zip((k, v), outs):
                for b in range(x.shape[0]):
                    for h in range(x.shape[1]):
                        torch.mm(W, x[b, h], out=y[b, h])
            return outs

        fns["mm_floor"] = mm_floor
    return fns


# --------------------------------------------------------------------------------------------
# float64 ground truth

def reference_columns_f64(k, v, depth, coords, cols: torch.Tensor, *, sigma_d=0.6, sigma_s=0.6,
                          alpha=0.6, beta=0.8):
    """METHODS §1 in float64 for the output tokens `cols` only: (k_hat[..., cols, :], v_hat[..., cols, :]).

    Column j of the weights needs only wt[:, j] and its sum c_j, so an N x |cols| block is
    enough. depth [N] and coords [N, 2] (shared by the batch), as the benchmarks use them.
    """
    d = depth.to(torch.float64)
    s = coords.to(torch.float64)
    dd = (d[:, None] - d[None, cols]) ** 2                                  # [N, J]
    ss = ((s[:, None, :] - s[None, cols, :]) ** 2).sum(-1)                 # [N, J]
    wt = torch.exp(-alpha * dd / (2 * sigma_d ** 2)) + torch.exp(-beta * ss / (2 * sigma_s ** 2))
    wt[cols, torch.arange(cols.numel())] = 0.0                             # diagonal mask
    c = wt.sum(dim=0)                                                      # [J]
    keep = c == 0
    w = wt / torch.where(keep, torch.ones_like(c), c)

    def apply(x):
        x64 = x.to(torch.float64)
        y = torch.einsum("ij,bhid->bhjd", w, x64)
        return torch.where(keep[None, None, :, None], x64[:, :, cols], y)

    return apply(k), apply(v)


def check_reference_columns(seed: int = 1) -> float:
    """Max |reference_columns_f64 - kvfix.reference.dscr_refine (float64)| on a small case."""
    shape = Shape("check", 2, 3, 9, 11, 8, ("fp32",))
    inp = make_inputs(shape, torch.float64, seed=seed, floor=False)
    full_k, full_v = kvfix.reference.dscr_refine(inp["k"], inp["v"], inp["depth"].double(),
                                                 inp["coords"].double(), **PARAMS)
    cols = torch.tensor([0, 5, 17, 50, 98])
    ck, cv = reference_columns_f64(inp["k"], inp["v"], inp["depth"], inp["coords"], cols, **PARAMS)
    return max(float((ck - full_k[:, :, cols]).abs().max()), float((cv - full_v[:, :, cols]).abs().max()))


def error_columns(shape: Shape):
    """The output tokens the float64 error is taken on: None (all), or evenly spaced indices."""
    if shape.err_cols is None or shape.err_cols >= shape.N:
        return None
    return torch.linspace(0, shape.N - 1, shape.err_cols).round().long().unique()


def ground_truth(shape: Shape, inp: dict):
    """(k_hat, v_hat) in float64 on the error columns (all tokens when `error_columns` is None)."""
    cols = error_columns(shape)
    if cols is None:
        return kvfix.reference.dscr_refine(inp["k"].double(), inp["v"].double(), inp["depth"].double(),
                                           inp["coords"].double(), **PARAMS), None
    return reference_columns_f64(inp["k"], inp["v"], inp["depth"], inp["coords"], cols, **PARAMS), cols


def max_error(outs, truth, cols) -> float:
    err = 0.0
    for o, t in zip(outs, truth):
        o = o.to(torch.float64)
        if cols is not None:
            o = o[:, :, cols]
        err = max(err, float((o - t).abs().max()))
    return err


# --------------------------------------------------------------------------------------------
# peak memory (Linux): resident-set high-water mark around one call

_STATUS_RE = {key: re.compile(rf"^{key}:\s+(\d+) kB", re.M) for key in ("VmRSS", "VmHWM")}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(_STATUS_RE[key].search(f.read()).group(1))


def peak_bytes_beyond(fn) -> tuple[int, tuple]:
    """Bytes the process's resident set grew to during `fn()`, beyond what it held before and
    beyond `fn`'s outputs. Resets the kernel's high-water mark (VmHWM) by writing "5" to
    /proc/self/clear_refs (Linux >= 4.0), calls fn, reads VmHWM. Sees every allocation that is
    touched (ATen, BLAS/oneDNN scratch, std::vector), not only ATen's. Meant to run in a fresh
    process started with MALLOC_MMAP_THRESHOLD_ fixed (see bench.table), so that freed large
    blocks go back to the OS and are not silently reused."""
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    outs = fn()
    hwm = _status_kb("VmHWM")
    out_bytes = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    return max(0, (hwm - before) * 1024 - out_bytes), outs
