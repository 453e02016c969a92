"""Self-tests of the kvemu SIMT emulator (kernels in tests/emu/kernels/selftest.cuh).

They prove the emulator runs CUDA semantics faithfully (barriers, every shuffle kind and width,
votes, atomics, wmma, dynamic shared memory, launch checks) and that it catches what it exists
to catch: a missing __syncthreads gives a wrong result under some fiber-order seed, blocks that
race on the same output give a seed-dependent result (random block order), a shuffle
that a lane never reaches is a reported deadlock (never a hang), and AddressSanitizer reports
an out-of-bounds store at the kernel's source line.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvemu_build
from kvemu_build import EmuError
from kvemu_rewrite import rewrite_source

HERE = Path(__file__).resolve().parent
SELFTEST_SRC = HERE / "kernels" / "selftest.cuh"
SEED = int(os.environ.get("KVFIX_EMU_SEED", "0") or 0)

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_INVALID_CONFIGURATION = 9
CUDA_ERROR_MISALIGNED_ADDRESS = 716
CUDA_ERROR_LAUNCH_FAILURE = 719


@pytest.fixture(scope="module")
def st(emu):
    mod = emu.module("selftest")
    mod.reset()
    return mod


def _line_of(marker: str) -> int:
    for n, line in enumerate(SELFTEST_SRC.read_text().splitlines(), 1):
        if marker in line:
            return n
    raise AssertionError(f"marker {marker!r} not in {SELFTEST_SRC}")


# ----------------------------------------------------------------------------------------------
# the source rewrite (pure Python)

def test_rewrite_keeps_lines_and_handles_launches_and_shared():
    src = textwrap.dedent("""\
        extern __shared__ float g_dyn[];
        template <class T, int B>
        __global__ void k(const T* x, T* y) {
          __shared__ __align__(16) float s[B], t[2][B];
          extern __shared__ __align__(16) unsigned char smem[];
          const char* c = "k<<<1, 2>>>(x)";  // k<<<1, 2>>>(x) in a comment
          y[0] = x[0] + s[0] + t[0][0] + smem[0];
        }
        template <class T>
        void go(const T* x, T* y, cudaStream_t st) {
          ns::k<T, (4 > 2 ? 64 : 32)><<<dim3(2), 64,
                                        16, st>>>(x,
                                                  y);
          k<T, 64><<<1, 64>>>();
        }
        """)
    out = rewrite_source(src, "csrc/kernels/x.cuh")
    head, body = out.split("\n", 2)[:2], out.split("\n", 2)[2]
    assert head == ["#include <kvemu/emu.h>", '#line 1 "csrc/kernels/x.cuh"']
    assert body.count("\n") == src.count("\n")
    lines = body.splitlines()
    assert "static ::kvemu::DynamicShared<float> g_dyn;" in lines[0]
    assert lines[3] == ('  auto& s = ::kvemu::shared_var<float [B]>(16, "s", [] {}); '
                        'auto& t = ::kvemu::shared_var<float [2][B]>(16, "t", [] {});')
    assert "unsigned char* const smem = ::kvemu::dynamic_shared<unsigned char>();" in lines[4]
    assert lines[5] == src.splitlines()[5]  # strings and comments untouched
    assert lines[10].lstrip().startswith("::kvemu::launch(::kvemu::LaunchConfig(dim3(2), 64,")
    assert "[&](auto&... kvemu_a_) { ns::k<T, (4 > 2 ? 64 : 32)>(kvemu_a_...); }, x," in lines[11]
    assert lines[12].strip() == "y);"
    assert lines[13].strip().endswith("{ k<T, 64>(kvemu_a_...); });")


# ----------------------------------------------------------------------------------------------
# barriers and shared memory

def test_block_reduction(st):
    x = torch.randn(3000)
    partial, total = torch.zeros(5), torch.zeros(1)
    st.block_sum(x, partial, total)
    ref = x.double().sum().item()
    assert math.isclose(total.item(), ref, rel_tol=1e-5, abs_tol=1e-4)
    assert math.isclose(partial.double().sum().item(), ref, rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_kernels_pass_under_every_seed(st, seed):
    x = torch.randn(1000)
    partial, total = torch.zeros(4), torch.zeros(1)
    st.block_sum(x, partial, total, seed=seed)
    assert math.isclose(total.item(), x.double().sum().item(), rel_tol=1e-5, abs_tol=1e-4)
    xs = torch.randn(3)
    out = torch.full((3 * 64,), float("nan"))
    st.broadcast(xs, out, 64, 1, seed=seed)
    torch.testing.assert_close(out.view(3, 64), xs[:, None] * torch.arange(64.0))


def test_missing_barrier_gives_a_wrong_result_under_some_seed(st):
    x = torch.randn(1000)
    ref = x.double().sum().item()
    wrong = []
    for seed in (0, 1, 2):
        partial = torch.zeros(4)
        st.block_sum_no_barrier(x, partial, seed=seed)
        got = partial.double().sum().item()
        wrong.append(not math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-3))
    assert any(wrong), "a tree reduction without barriers went unnoticed under seeds 0, 1, 2"


def test_missing_barrier_that_thread_order_hides_is_caught_by_a_random_seed(st):
    """Thread 0 publishes through shared memory without a barrier. In thread order (seed 0)
    thread 0 runs first and the result happens to be right; random orders let readers run
    first, and they read the poison (NaN) that fills shared memory at the start of a block."""
    xs = torch.randn(3)
    ref = xs[:, None] * torch.arange(64.0)

    def run(seed):
        out = torch.zeros(3 * 64)
        st.broadcast(xs, out, 64, 0, seed=seed)
        return out.view(3, 64)

    assert torch.equal(run(0), ref)
    bad = [s for s in (1, 2, 3) if not torch.equal(run(s), ref)]
    assert bad, "no random seed exposed the missing barrier"
    assert torch.isnan(run(bad[0])).any()  # the readers saw uninitialised (poisoned) shared memory


def test_dynamic_shared_memory(st):
    x = torch.randn(200)
    y = torch.full_like(x, float("nan"))
    st.reverse_chunks(x, y, 64, 0, 0)
    ref = torch.cat([c.flip(0) for c in x.split(64)[:3]] + [torch.zeros(0)])
    torch.testing.assert_close(y[:192], ref)
    # the last block covers 8 tokens: its reversed chunk pairs y[j] with buf[63 - (j - 192)]
    torch.testing.assert_close(y[192:], torch.zeros(8))  # buf rows past n were zero-filled


def test_dynamic_shared_memory_over_48k_needs_the_opt_in(st):
    st.reset()
    x = torch.randn(128)
    y = torch.zeros_like(x)
    pad = 12 * 1024  # 64 + 12288 floats = 49408 bytes > 48 KiB
    with pytest.raises(EmuError) as e:
        st.reverse_chunks(x, y, 64, pad, 0, quiet=True)
    assert e.value.code == CUDA_ERROR_INVALID_VALUE and "cudaFuncSetAttribute" in e.value.report
    st.reverse_chunks(x, y, 64, pad, 1)
    torch.testing.assert_close(y, torch.cat([x[:64].flip(0), x[64:].flip(0)]))
    st.reset()


def test_builtin_variables_in_3d(st):
    g, b = (3, 2, 2), (4, 2, 3)
    nb, nt = 3 * 2 * 2, 4 * 2 * 3
    out = torch.full((nb * nt,), -1, dtype=torch.int32)
    st.coords3d(out, *g, *b)
    ref = []
    for bz in range(g[2]):
        for by in range(g[1]):
            for bx in range(g[0]):
                for tz in range(b[2]):
                    for ty in range(b[1]):
                        for tx in range(b[0]):
                            ref.append(((bx * 4 + by) * 4 + bz) * 1000 + (tx * 8 + ty) * 8 + tz)
    assert out.tolist() == ref


def _block_order(st, grid, seed, threads=32):
    n = grid[0] * grid[1] * grid[2]
    nxt, last = torch.zeros(1, dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32)
    order = torch.full((n,), -1, dtype=torch.int32)
    st.block_order(nxt, order, last, *grid, threads, seed=seed)
    assert nxt.item() == n and sorted(order.tolist()) == list(range(n)), "every block runs exactly once"
    return order.tolist(), last.item()


@pytest.mark.parametrize("grid", [(7, 1, 1), (3, 2, 2), (64, 1, 1), (2, 1, 1)])
def test_block_order_is_index_order_for_seed_0_and_a_seeded_permutation_otherwise(st, grid):
    n = grid[0] * grid[1] * grid[2]
    assert _block_order(st, grid, 0) == (list(range(n)), n - 1)
    runs = {seed: _block_order(st, grid, seed) for seed in range(1, 9)}
    for seed in (1, 2):
        assert _block_order(st, grid, seed) == runs[seed], "the same seed and launch give the same order"
    orders = {tuple(o) for o, _ in runs.values()}
    assert len(orders) > 1 and (n == 2 or tuple(range(n)) not in orders)
    # the racy store of every block: which block wins depends on the seed, as on a GPU
    assert len({last for _, last in runs.values()}) > 1
    if n > 2:  # the shape keys the permutation too
        assert _block_order(st, grid, 1, threads=64)[0] != runs[1][0]


# ----------------------------------------------------------------------------------------------
# warp collectives

def _shfl_model(vals: list, kind: int, arg: int, width: int, poison):
    """CUDA's shuffle semantics (PTX shfl.sync, c = ((32 - width) << 8) | clamp)."""
    n = len(vals)
    out = []
    a = arg & 31  # only the low 5 bits of the lane / offset operand count
    for t in range(n):
        w, lane = divmod(t, 32)
        live = min(32, n - 32 * w)
        seg = lane - lane % width
        if kind == 0:
            j = seg + arg % width
        elif kind == 1:
            j = lane - a if lane - a >= seg else lane
        elif kind == 2:
            j = lane + a if lane + a < seg + width else lane
        else:
            j = lane ^ a
            j = j if j < seg + width else lane
        out.append(vals[32 * w + j] if j < live else poison)
    return out


SHUFFLE_CASES = [(kind, arg, width) for kind in range(4) for width in (32, 16, 8, 4, 2, 1)
                 for arg in {0, 1, 3, width - 1, width + 1, 17} if kind != 0 or arg < 40] + [(0, -1, 32), (0, -3, 8)]


@pytest.mark.parametrize("threads", [64, 48])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64, torch.float16])
def test_shuffles_every_kind_and_width(st, threads, dtype):
    if dtype == torch.int32:
        vals = torch.arange(100, 100 + threads, dtype=dtype)
    else:
        vals = (torch.arange(threads, dtype=torch.float64) * 0.5 - 7).to(dtype)
    for kind, arg, width in SHUFFLE_CASES:
        if kind in (1, 2) and arg < 0:
            continue
        out = torch.zeros_like(vals)
        st.shuffle(vals, out, kind, arg, width)
        exp = _shfl_model(vals.tolist(), kind, arg, width, None)
        got = out.tolist()
        for t, (g, e) in enumerate(zip(got, exp)):
            if e is None:  # the source lane does not exist: undefined, the emulator poisons it
                assert (g == -1) if dtype == torch.int32 else math.isnan(g), (kind, arg, width, t)
            else:
                assert g == e, (f"kind {kind} arg {arg} width {width} thread {t}: {g} != {e}")


@pytest.mark.parametrize("threads", [64, 40])
@pytest.mark.parametrize("half_masks", [0, 1])
def test_ballot_any_all_match_reduce(st, threads, half_masks):
    pred = torch.randint(0, 3, (threads,), dtype=torch.int32)
    pred[:16] = 1  # a half warp where all lanes agree
    out = torch.zeros(threads, 6, dtype=torch.int32)
    st.vote(pred, out, half_masks)
    got = out.view(-1).tolist()
    p = pred.tolist()
    for t in range(threads):
        w, lane = divmod(t, 32)
        live = min(32, threads - 32 * w)
        lanes = range(16) if half_masks and lane < 16 else range(16, 32) if half_masks else range(32)
        group = [l for l in lanes if l < live]
        ballot = sum(1 << l for l in group if p[32 * w + l] != 0)
        match = sum(1 << l for l in group if p[32 * w + l] == p[t])
        gmask = sum(1 << l for l in group)
        same = all(p[32 * w + l] == p[t] for l in group)
        exp = [ballot, int(ballot != 0), int(all(p[32 * w + l] != 0 for l in group)), match,
               sum(p[32 * w + l] for l in group), gmask if same else 0]
        assert [g & 0xFFFFFFFF for g in got[6 * t:6 * t + 6]] == exp, t


def test_atomics_float_and_int(st):
    n = 300
    x = torch.randn(n)
    keys = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    fsum = torch.zeros(1)
    isum, cas, sync = (torch.zeros(1, dtype=torch.int32) for _ in range(3))
    imax = torch.full((1,), -(2 ** 31), dtype=torch.int32)
    imin = torch.full((1,), 2 ** 31 - 1, dtype=torch.int32)
    usum = torch.zeros(1, dtype=torch.int64)
    st.atomics(x, keys, fsum, isum, imax, imin, usum, cas, sync)
    assert math.isclose(fsum.item(), x.double().sum().item(), rel_tol=1e-5, abs_tol=1e-4)
    assert isum.item() == int(keys.sum())
    assert imax.item() == int(keys.max()) and imin.item() == int(keys.min())
    assert usum.item() == int((keys.long() + 1).sum())  # unsigned wrap-around, read back as int64
    assert cas.item() == n
    assert sync.item() == int((keys % 2 == 0).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layouts", [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 0)])
@pytest.mark.parametrize("with_c", [False, True])
def test_wmma_matches_a_float_reference(st, dtype, layouts, with_c):
    M, N, K = 32, 48, 64
    a_col, b_col, c_col = layouts
    A = torch.randn(M, K).to(dtype)
    B = torch.randn(K, N).to(dtype)
    C0 = torch.randn(M, N)
    a_mem = A.t().contiguous() if a_col else A.contiguous()
    b_mem = B.t().contiguous() if b_col else B.contiguous()
    c0_mem = (C0.t().contiguous() if c_col else C0.contiguous()) if with_c else None
    C = torch.full((N, M) if c_col else (M, N), float("nan"))
    st.wmma_gemm(a_mem, b_mem, c0_mem, C, M, N, K, a_col, b_col, c_col)
    got = C.t() if c_col else C
    ref = 2 * (A.double() @ B.double() + (C0.double() if with_c else 0))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_math_intrinsics(st):
    x = torch.linspace(-3, 3, 70)
    out = torch.full((70, 8), float("nan"))
    st.math(x, out)
    xd = x.double()
    i = torch.arange(70)
    ref = torch.stack([
        torch.exp(-xd * xd) + torch.exp(-xd.abs()),
        torch.exp2(xd) / torch.sqrt(xd.abs() + 1),
        torch.clamp(xd, min=0.25) + torch.clamp(xd, max=-0.25),
        x.half().double(),
        x.bfloat16().double(),
        torch.exp((x * 0.5).half().float()).half().double(),
        (x.bfloat16().float() ** 2 + 1).bfloat16().double(),
        xd / 3 + torch.clamp(i, min=3) + torch.clamp(i, max=3),
    ], dim=1)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)


def test_launch_configuration_errors(st):
    before = st.grids_run
    with pytest.raises(EmuError) as e:
        st.noop(0, 32, 0, quiet=True)
    assert e.value.code == CUDA_ERROR_INVALID_CONFIGURATION and "invalid grid" in e.value.report
    with pytest.raises(EmuError) as e:
        st.noop(1, 2048, 0, quiet=True)
    assert e.value.code == CUDA_ERROR_INVALID_CONFIGURATION and "invalid block" in e.value.report
    with pytest.raises(EmuError) as e:
        st.noop(1, 32, 300_000, quiet=True)
    assert e.value.code == CUDA_ERROR_INVALID_VALUE
    assert st.grids_run == before  # none of them ran
    st.noop(2, 1024, 0)
    assert st.grids_run == before + 1  # launches are counted (kvfix tests count a launcher's grids)


# ----------------------------------------------------------------------------------------------
# failures, each in a subprocess (a crash or a hang cannot take pytest down)

_CHILD = textwrap.dedent("""\
    import ctypes, sys
    sys.path.insert(0, {here!r})
    import kvemu_build as kb
    m = kb.Module("selftest", {path!r})
    which, n, threads = {which}, {n}, {threads}
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    ibuf = kb.RawTensor(libc.malloc(4 * 1024), "int32", (1024,))
    fbuf = kb.RawTensor(libc.malloc(4 * n), "float32", (n,))  # exactly n floats
    hbuf = kb.RawTensor(libc.malloc(4096 + 64), "float16", (2048,))
    hbuf.ptr = (hbuf.ptr + 63) // 64 * 64
    try:
        m.failure(which, ibuf, fbuf, hbuf, n, threads)
    except kb.EmuError as e:
        print("EMU_ERROR", e.code)
        print(e.report)
        # the next launch must work: the abandoned fibers' stacks are reused
        m.coords3d(ibuf, 2, 1, 1, 64, 1, 1)
        got = (ctypes.c_int32 * 128).from_address(ibuf.ptr)
        ok = all(got[b * 64 + t] == b * 16 * 1000 + t * 64 for b in range(2) for t in range(64))
        print("RECOVERED" if ok else "NOT RECOVERED")
        sys.exit(3)
    print("NO_ERROR")
    """)


def _run_child(emu, which: int, *, n: int = 64, threads: int = 64, asan: bool | None = None):
    asan = emu.asan if asan is None else asan
    path = emu.asan_path("selftest") if asan else emu.path("selftest")
    code = _CHILD.format(here=str(HERE), path=str(path), which=which, n=n, threads=threads)
    env = kvemu_build.asan_env() if asan else dict(os.environ)
    env["KVFIX_EMU_QUIET"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_shuffle_with_a_lane_that_never_arrives_is_a_reported_deadlock(emu):
    r = _run_child(emu, 0)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "RECOVERED" in r.stdout.split(), r.stdout
    assert f"EMU_ERROR {CUDA_ERROR_LAUNCH_FAILURE}" in r.stdout
    assert "deadlock" in r.stdout and "kernel shfl_deadlock" in r.stdout and "block (0,0,0)" in r.stdout
    shfl_line = _line_of("BROKEN: lane 5 never arrives")
    assert f"__shfl_xor_sync(mask=0xffffffff) (tests/emu/kernels/selftest.cuh:{shfl_line})" in r.stdout
    assert "lane(s) 5 of the mask never arrive" in r.stdout
    assert re.search(r"thread 5: waiting at __syncthreads\(\) \(tests/emu/kernels/selftest\.cuh:\d+\)", r.stdout)


def test_barrier_after_an_early_exit_is_a_reported_deadlock(emu):
    r = _run_child(emu, 1)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "RECOVERED" in r.stdout.split(), r.stdout
    assert "deadlock" in r.stdout and "kernel barrier_after_exit" in r.stdout
    assert "1 of 64 threads exited without reaching the __syncthreads()" in r.stdout
    assert "thread 0: exited" in r.stdout


def test_divergent_warp_collectives_are_reported(emu):
    r = _run_child(emu, 2)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "RECOVERED" in r.stdout.split(), r.stdout
    assert "divergent warp collective" in r.stdout and "kernel divergent_collectives" in r.stdout


def test_misaligned_wmma_pointer_is_reported(emu):
    r = _run_child(emu, 4)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "RECOVERED" in r.stdout.split(), r.stdout
    assert f"EMU_ERROR {CUDA_ERROR_MISALIGNED_ADDRESS}" in r.stdout
    assert "not 256-bit (32-byte) aligned" in r.stdout and "wmma_misaligned" in r.stdout


@pytest.mark.parametrize("which,marker,size", [(5, "kvemu-selftest: shared oob store", 128),
                                                (6, "kvemu-selftest: dynamic shared oob store", 124)],
                         ids=["static", "dynamic"])
def test_asan_reports_shared_memory_overruns(emu, which, marker, size):
    r = _run_child(emu, which, asan=True)
    assert r.returncode != 0 and "NO_ERROR" not in r.stdout, r.stdout + r.stderr
    err = r.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in err and "WRITE of size 4" in err, err
    frame0 = next(l for l in err.splitlines() if l.strip().startswith("#0 "))
    assert f"tests/emu/kernels/selftest.cuh:{_line_of(marker)}" in frame0, err
    assert re.search(rf"0 bytes (after|to the right of) {size}-byte region", err), err


def test_asan_reports_an_out_of_bounds_store_at_the_kernel_line(emu):
    n = 40  # 64 threads store into 40 floats
    r = _run_child(emu, 3, n=n, threads=64, asan=True)
    assert r.returncode != 0 and "NO_ERROR" not in r.stdout, r.stdout + r.stderr
    err = r.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in err, err
    assert "WRITE of size 4" in err
    line = _line_of("kvemu-selftest: oob store")
    frame0 = next(l for l in err.splitlines() if l.strip().startswith("#0 "))
    assert "oob_store" in frame0 and f"tests/emu/kernels/selftest.cuh:{line}" in frame0, err
    assert re.search(rf"\d+ bytes (after|to the right of) {4 * n}-byte region", err), err
