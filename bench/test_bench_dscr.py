"""pytest-benchmark microbenchmarks of DSCR: `pytest bench/ --benchmark-only`.

Not collected by the default `pytest` run (testpaths = ["tests"]). One benchmark group per
shape and dtype, holding the eager reference, kvfix and the two GEMM floors (bench/common.py),
so `--benchmark-group-by=group` compares them side by side. N=16384 (seconds a call) runs only
with KVFIX_BENCH_LARGE=1; its eager reference is never run (it needs several GiB).
For the one-run table with errors and memory, use `python -m bench.table`.
"""
import os

import pytest
import torch

from bench import common

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
