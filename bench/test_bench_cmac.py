"""CMAC benchmarks (METHODS §4, issue 6 item 5): `pytest bench/test_bench_cmac.py --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]). One layer's attention at
LLaVA-1.5's geometry (B=1, Hq=Hkv=32, D=128, image span (5, 581): 576 image tokens after a
5-token system prompt), fp32 and bf16:
- prefill: Tq = T = 640, causal;
- decode: Tq = 1, T = 2048.
Variants per shape:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` on the same q, k, v (what a user
  already has; no calibration, no IMD): the floor;
- "kvfix": `kvfix.cmac_attention` with `k_calibrated` (CMPC on), imd=False (the original branch);
- "kvfix_imd": the same with imd=True (the distorted branch);
- "eager": `kvfix.reference.cmac_attention` (materialised logits) in the input dtype, imd=True.
`rope_calibrate` runs once per image per layer (outside the timed calls).

`cmac_rows()` measures with the variants interleaved (balanced orders: common.balanced_orders; medians), which is what the
targets are judged on (shared, noisy machines: compare ratios within one run); `python -m
bench.test_bench_cmac` prints that table, `cmac_section()` is what bench/table.py includes.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kvfix  # noqa: E402
import kvfix.reference  # noqa: E402
from bench import common  # noqa: E402

B, H, D = 1, 32, 128
SPAN = (5, 581)
SHAPES = {"prefill": (640, 640), "decode": (1, 2048)}
QUICK_SHAPES = {"prefill": (48, 48), "decode": (1, 96)}
QUICK_SPAN = (3, 35)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_SDPA = 1.5   # kvfix (imd off) <= 1.5 x SDPA, prefill and decode (fp32)
TARGET_IMD = 1.2    # imd=True <= 1.2 x imd=False


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def inputs(Tq: int, T: int, dtype: torch.dtype, span=SPAN, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    v = torch.randn(B, H, T, D, generator=g).to(dtype)
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    kc = kvfix.rope_calibrate(k, span, inv, gamma=3.0)
    return dict(q=q, k=k, v=v, kc=kc, span=span, causal=Tq == T)


def variant_fns(inp: dict, with_eager: bool = True) -> dict:
    q, k, v, kc, span = inp["q"], inp["k"], inp["v"], inp["kc"], inp["span"]
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=inp["causal"]),
        "kvfix": lambda: kvfix.cmac_attention(q, k, v, span, k_calibrated=kc),
        "kvfix_imd": lambda: kvfix.cmac_attention(q, k, v, span, k_calibrated=kc, imd=True),
    }
    if with_eager:
        fns["eager"] = lambda: kvfix.reference.cmac_attention(q, k, v, span, k_calibrated=kc, imd=True)
    return fns


def max_error(inp: dict) -> float:
    """max |kvfix (imd) - reference in float64| (the benchmark's outputs are the real thing)."""
    q, k, v, kc, span = inp["q"], inp["k"], inp["v"], inp["kc"], inp["span"]
    got = kvfix.cmac_attention(q, k, v, span, k_calibrated=kc, imd=True)
    want = kvfix.reference.cmac_attention(q.double(), k.double(), v.double(), span, k_calibrated=kc.double(),
                                          imd=True)
    return float((got.double() - want).abs().max())


def cmac_rows(reps: int = 21, quick: bool = False, threads: int | None = None,
              budget: common.Budget | None = None) -> list[dict]:
    """reps: at most (3 quick); budget: the time all rows may take, shared out per row
    (common.interleave: at least one repeat; None: exactly the reps)."""
    torch.set_num_threads(threads or _threads())
    budget = budget or common.Budget(None)
    todo = [(dt, dtype, kind, shape) for dt, dtype in DTYPES.items()
            for kind, shape in (QUICK_SHAPES if quick else SHAPES).items()]
    rows = []
    for i, (dt, dtype, kind, (Tq, T)) in enumerate(todo):
        inp = inputs(Tq, T, dtype, span=QUICK_SPAN if quick else SPAN)
        tm = common.interleave(variant_fns(inp), budget.share(len(todo) - i), max_reps=3 if quick else reps,
                               required=("sdpa", "kvfix"))
        rows.append(dict(kind=kind, Tq=Tq, T=T, dtype=dt, threads=torch.get_num_threads(), reps=tm.reps,
                         err=max_error(inp), skipped=tm.skipped, **{f"{n}_ms": tm.ms(n) for n in variant_fns(inp)}))
    return rows


def render(rows: list[dict]) -> str:
    out = ["| op | shape | dtype | threads | SDPA ms | kvfix ms | kvfix imd ms | eager ms | kvfix/SDPA | "
           "imd/no-imd | eager/kvfix imd | max err | reps |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in rows:
        ratio, imd = r["kvfix_ms"] / r["sdpa_ms"], r["kvfix_imd_ms"] / r["kvfix_ms"]
        out.append(f"| cmac_attention {r['kind']} | B={B} H={H} Tq={r['Tq']} T={r['T']} D={D} | {r['dtype']} | "
                   f"{r['threads']} | {common.cell(r, 'sdpa')} | {common.cell(r, 'kvfix')} | {common.cell(r, 'kvfix_imd')} | "
                   f"{common.cell(r, 'eager')} | {common.num(ratio)} | {common.num(imd)} | {common.num(r['eager_ms'] / r['kvfix_imd_ms'], '.1f', 'x')} | "
                   f"{r['err']:.1e} | {r['reps']} |")
        if r["dtype"] == "fp32" and r["T"] >= 640:
            verdicts.append(f"- {r['kind']} fp32: kvfix/SDPA = {ratio:.2f} (target <= {TARGET_SDPA}): "
                            f"{common.verdict(ratio, TARGET_SDPA)}; imd/no-imd = {common.num(imd)} "
                            f"(target <= {TARGET_IMD}): {common.verdict(imd, TARGET_IMD)}")
    if verdicts:
        out += ["", "Targets (issue 6, CPU):", ""] + verdicts
    return "\n".join(out)


def cmac_section(quick: bool, budget: common.Budget | None = None) -> str:
    """The CMAC table (markdown) for bench/table.py: interleaved medians (method: this module's
    docstring). quick: small shapes; budget: the time it may take."""
    return ("## CMAC (issue 6)\n\n" + render(cmac_rows(quick=quick, budget=budget)) + "\n\nSDPA = torch's "
            "scaled_dot_product_attention on the same q, k, v (no calibration, no IMD); kvfix = cmac_attention "
            "with calibrated image keys (gamma 3); eager = kvfix.reference.cmac_attention in the input dtype; "
            f"image span {SPAN} (LLaVA-1.5: 576 image tokens); max err vs float64 reference, imd on.")


# --------------------------------------------------------------------------------------------
# pytest-benchmark

CASES = [(kind, dt) for dt in DTYPES for kind in SHAPES]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    torch.set_num_threads(_threads())
    kind, dt = request.param
    Tq, T = SHAPES[kind]
    return kind, dt, variant_fns(inputs(Tq, T, DTYPES[dt]))


@pytest.mark.parametrize("variant", ["sdpa", "kvfix", "kvfix_imd", "eager"])
def test_cmac_attention(benchmark, case, variant):
    kind, dt, fns = case
    Tq, T = SHAPES[kind]
    benchmark.group = f"cmac_attention {kind} B={B} H={H} Tq={Tq} T={T} D={D} {dt}"
    benchmark.extra_info.update(B=B, H=H, Tq=Tq, T=T, D=D, dtype=dt, threads=torch.get_num_threads())
    benchmark.pedantic(fns[variant], rounds=10 if variant == "eager" else 30, warmup_rounds=2, iterations=1)


def test_kvfix_variant_agrees():
    assert max_error(inputs(*QUICK_SHAPES["prefill"], torch.float32, span=QUICK_SPAN)) < 1e-5


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="CMAC benchmark table (interleaved medians)")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--reps", type=int, default=21, help="interleaved repeats per row")
    args = ap.parse_args()
    print(render(cmac_rows(reps=args.reps, quick=args.quick, threads=args.threads)))
