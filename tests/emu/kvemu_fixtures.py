"""pytest fixtures for emulated CUDA kernels (loaded by tests/emu/conftest.py).

    def test_something(emu):
        mod = emu.module("dscr")          # tests/emu/shims/dscr.cpp, built once per session
        mod.dscr_refine(k, v, k_out, v_out, depth, coords, coef_d, coef_s)   # raises EmuError

`emu` builds the modules of the selected tests in the background on first use (two compiler
processes; test_emu_<name>.py -> module <name>, others on demand), caches the builds in
tests/.emu_cache/, and skips the emulated tests where no C++ compiler or CUDA headers
exist. KVFIX_EMU_SEED picks the block and fiber order (0 = index and thread order, the default;
others random; CI runs 0, 1, 2);
KVFIX_EMU_ASAN=1 switches to the AddressSanitizer builds (the process needs libasan preloaded:
`python tests/emu/run_emulated.py --asan-only` sets that up).
"""
from __future__ import annotations

import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvemu_build  # noqa: E402
from kvemu_build import BuildError, EmuError, Module  # noqa: E402,F401

__all__ = ["emu", "EmuSession", "EmuError", "kvfix_reference", "kvfix_structured", "cmac_attention_call",
           "cmac_inputs", "cmac_nonfinite_inputs", "inv_freq", "unaligned"]


def kvfix_reference():
    """`kvfix.reference`, loaded from its file: the emulated tests need neither the compiled
    extension nor the rest of the package (whose build may lag behind the sources)."""
    mod = sys.modules.get("kvfix.reference")
    if mod is not None:
        return mod
    import importlib.util
    path = kvemu_build.REPO / "kvfix" / "reference.py"
    spec = importlib.util.spec_from_file_location("kvemu_kvfix_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["kvemu_kvfix_reference"] = mod
    return mod


def kvfix_structured(emu=None):
    """`kvfix.dscr_structured` (the structured-DSCR planner), loaded from its file without the
    compiled extension. Its call into C++, the depth structure `_depth_op`
    (csrc/kernels/dscr_plan.h, kvfix::dscr_depth_structure in the extension), runs from the
    emulator's build of module "dscr_banded" once `emu` (the session fixture) is given: call it so
    from the module fixture of a test that plans."""
    name = "kvemu_kvfix_dscr_structured"
    mod = sys.modules.get(name)
    if mod is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, kvemu_build.REPO / "kvfix" / "dscr_structured.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while it executes
        spec.loader.exec_module(mod)
    if emu is not None:
        banded = emu.module("dscr_banded")

        def depth_op(d, cd, budget, orders, force, cap, spatial):
            sizes, info = torch.zeros(3, dtype=torch.int64), torch.zeros(7, dtype=torch.float64)
            banded.dscr_depth_plan(d, cd, budget, orders, force, cap, spatial, sizes, info)
            order, G, nnz = sizes.tolist()
            n = d.numel() if info[0] > 0 else 0
            f64, i64 = torch.float64, torch.int64
            outs = (torch.empty(n, dtype=i64), torch.empty(n, order if n else 0, dtype=f64), torch.empty(G, dtype=i64),
                    torch.empty(G, dtype=i64), torch.empty(nnz, dtype=f64),
                    None if spatial is None else torch.empty(n, dtype=f64))
            banded.dscr_depth_take(*outs)
            return outs[:5] + (torch.empty(0, dtype=f64) if outs[5] is None else outs[5], info)

        mod._depth_op = depth_op
    return mod


def cmac_attention_call(mod, entry, q, k, v, span, *, k_calibrated=None, scale=None, mask=None, causal=True,
                        imd=False, value_mean="scalar", splits=3, k_calibrated_mean=None):
    """CMAC attention through `entry` of an emulated module ("cmac": cmac_attention, the SIMT
    kernels; "cmac_tc": cmac_attention_tc, the tensor-core prefill kernel, and cmac_attention, the
    dispatch), with kvfix.reference.cmac_attention's arguments: span (s, e) or a [B, 2] tensor, imd
    a bool or a [B] bool tensor, mask broadcast to [B, Hq, Tq, T]. Returns the output, NaN-poisoned
    before the launch (an unwritten element stays NaN); the module's EmuError propagates."""
    B, Hq, Tq, D = q.shape
    out = torch.full((B, Hq, Tq, D), float("nan"), dtype=q.dtype)
    spans = span if isinstance(span, torch.Tensor) else None
    s, e = (0, 0) if spans is not None else span
    items = imd if isinstance(imd, torch.Tensor) else None
    m = None if mask is None else mask.expand(B, Hq, Tq, k.shape[2])
    getattr(mod, entry)(q, k, v, k_calibrated, out, spans, s, e, m, int(items is not None or bool(imd)), items,
                        int(value_mean == "vector"), scale if scale is not None else 1.0 / math.sqrt(D), int(causal),
                        splits, None if k_calibrated_mean is None else k_calibrated_mean.float().contiguous())
    return out


def inv_freq(D):
    """RoPE inverse frequencies (base 10000) of head dim D."""
    return 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def unaligned(x):
    """x with the same values, its rows one element off a 16-byte boundary (the kernels'
    element-wise loads)."""
    B, H, T, D = x.shape
    return torch.cat([torch.zeros(B, H, T, 1, dtype=x.dtype), x], -1)[..., 1:]


def cmac_inputs(B, Hq, Hkv, Tq, T, D, span, dtype, gamma=3.0):
    """Random CMAC attention inputs in `dtype`: q [B, Hq, Tq, D], k [B, Hkv, T, D], v [B, Hkv, T, D]
    strided (a transposed [B, T, Hkv, D]) and the image keys of `span` RoPE-calibrated with `gamma`."""
    q = torch.randn(B, Hq, Tq, D).to(dtype)
    k = torch.randn(B, Hkv, T, D).to(dtype)
    v = torch.randn(B, T, Hkv, D).to(dtype).transpose(1, 2)
    kc = kvfix_reference().rope_calibrate(k.float(), span, inv_freq(D), gamma=gamma).to(dtype)
    return q, k, v, kc


def cmac_nonfinite_inputs(Tq):
    """float32 q [2, 2, Tq, 16], k, v [2, 1, 40, 16] with the CMAC non-finite rule's cases (image
    span (3, 21)): a nan query row (item 0, head 0, row 2: every logit nan), a key of +inf in one
    dim (item 1, position 30; its other dims 0: a +inf logit), and an inf value before the image
    (item 0, position 1, dim 3: reaches that dim of the rows that see it, not mu_V)."""
    q, k, v = torch.randn(2, 2, Tq, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    q[0, 0, 2] = float("nan")
    k[1, 0, 30] = 0.0
    k[1, 0, 30, 0] = math.inf
    v[0, 0, 1, 3] = math.inf
    return q, k, v


class EmuSession:
    """Builds and loads the emulated modules of this session (one variant: opt or asan)."""

    def __init__(self, asan: bool, prebuild: list[str] | None = None):
        self.asan = asan
        self.variant = kvemu_build.variant(asan)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
        self._builds: dict[str, Future] = {}
        self._loaded: dict[str, Module] = {}
        names = kvemu_build.modules()
        for name in (names if prebuild is None else [n for n in prebuild if n in names]):
            self._builds[name] = self._pool.submit(kvemu_build.build, name, asan)
        self._asan_selftest: Future | None = None
        if not asan and "selftest" in self._builds:  # test_emulator.py's ASan subprocess tests
            self._asan_selftest = self._pool.submit(kvemu_build.build, "selftest", True)

    def asan_path(self, name: str) -> Path:
        """The ASan build of `name` (for subprocesses that preload libasan)."""
        if self.asan:
            return self.path(name)
        try:
            if name == "selftest" and self._asan_selftest is not None:
                return self._asan_selftest.result()
            return kvemu_build.build(name, True)
        except BuildError as e:
            pytest.fail(str(e), pytrace=False)

    @property
    def seed(self) -> int:
        """The block- and fiber-order seed of this run (KVFIX_EMU_SEED)."""
        return int(os.environ.get("KVFIX_EMU_SEED", "0") or 0)

    def path(self, name: str) -> Path:
        if name not in self._builds:
            self._builds[name] = self._pool.submit(kvemu_build.build, name, self.asan)
        try:
            return self._builds[name].result()
        except BuildError as e:
            pytest.fail(str(e), pytrace=False)

    def module(self, name: str) -> Module:
        """The loaded module `name` (tests/emu/shims/<name>.cpp or tests/emu/kernels/<name>.cpp)."""
        mod = self._loaded.get(name)
        if mod is None:
            mod = self._loaded[name] = Module(name, self.path(name))
        return mod

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _selected_modules(session) -> list[str] | None:
    """Modules the selected tests will use, to build them in parallel up front: test_emulator.py
    uses "selftest", test_emu_<name>.py uses "<name>" (others are built when first asked for)."""
    items = getattr(session, "items", None)
    if not items:
        return None
    names = []
    for item in items:
        stem = Path(str(item.fspath)).stem
        name = "selftest" if stem == "test_emulator" else stem[len("test_emu_"):] if stem.startswith("test_emu_") else None
        if name and name not in names:
            names.append(name)
    return names


@pytest.fixture(scope="session")
def emu(request):
    problem = kvemu_build.toolchain_problem()
    if problem:
        if os.environ.get("KVFIX_EMU_REQUIRE") == "1":  # CI: no silent skip of the kernel tests
            pytest.fail(f"KVFIX_EMU_REQUIRE=1 but the emulated CUDA kernels cannot be built: {problem}")
        pytest.skip(f"emulated CUDA kernels: {problem}")
    asan = kvemu_build.asan_requested()
    if asan and not kvemu_build.asan_runtime_loaded():
        pytest.fail("KVFIX_EMU_ASAN=1 needs the ASan runtime preloaded into Python: "
                    f"LD_PRELOAD={kvemu_build.libasan_path()} ASAN_OPTIONS=detect_leaks=0, "
                    "or run `python tests/emu/run_emulated.py --asan-only`", pytrace=False)
    session = EmuSession(asan, _selected_modules(request.session))
    yield session
    session.close()
