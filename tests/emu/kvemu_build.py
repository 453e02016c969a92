"""Build and load emulated CUDA kernel modules (the kvemu SIMT emulator, tests/emu/include).

A *module* is one shim translation unit: every `*.cpp` in tests/emu/shims/ (project kernels)
and tests/emu/kernels/ (emulator self-tests) becomes `<stem>.so`. Before compiling, every source
file under csrc/kernels/, tests/emu/kernels/ and tests/emu/shims/ is passed through
kvemu_rewrite.py into a cache tree that mirrors the repository, so the shims include project
kernels as `"kernels/<name>.cuh"` exactly like csrc/cuda/*.cu do. No torch header is involved.

Builds are cached in tests/.emu_cache/, keyed by a hash of the module's sources (the shim and
what it includes with quotes, transitively), the emulator headers, the compiler version and the
flags; concurrent builders are serialised with a file lock. Variants: "opt"
(-O2) and "asan" (-O1 -g -fsanitize=address; loading it into Python needs libasan preloaded,
see `asan_env()`).

Nothing here imports pytest or torch: subprocesses use it with raw pointers (`RawTensor`).

Environment: KVFIX_EMU_CXX (compiler, default $CXX or g++), KVFIX_EMU_CXXFLAGS (extra flags,
e.g. -D defines for experiments), KVFIX_EMU_SRC_OVERLAY (a directory of replacement sources,
see `_overlay`), CUDA_HOME (for cuda_fp16.h / cuda_bf16.h; found as setup.py finds the
toolkit, tools/toolchain.py), KVFIX_EMU_ASAN=1 (the fixtures use the asan variant).
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import numbers
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvemu_rewrite import rewrite_source  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EMU_DIR = REPO / "tests" / "emu"
INCLUDE_DIR = EMU_DIR / "include"
CACHE_DIR = REPO / "tests" / ".emu_cache"
# Trees rewritten into the cache (repository-relative); module shims live in the last two.
REWRITE_TREES = ("csrc/kernels", "tests/emu/kernels", "tests/emu/shims")
MODULE_DIRS = ("tests/emu/shims", "tests/emu/kernels")
SOURCE_SUFFIXES = (".cuh", ".cu", ".h", ".hpp", ".inl", ".cpp", ".cc")

COMMON_FLAGS = (
    "-std=c++20", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
    "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
    "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-DKVFIX_EMU=1",
)
VARIANT_FLAGS = {
    "opt": ("-O2",),
    "asan": ("-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"),
}
LINK_FLAGS = ("-Wl,-Bsymbolic",)

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3, "int32": 4, "int64": 5,
               "uint8": 6, "int8": 7, "int16": 8, "bool": 9}


class BuildError(RuntimeError):
    """Compiling an emulated module failed; the message holds the command and compiler output."""


class EmuError(RuntimeError):
    """A launch failed: `code` is the cudaError_t, `report` the emulator's report."""

    def __init__(self, code: int, report: str):
        super().__init__(report)
        self.code = code
        self.report = report


def asan_requested() -> bool:
    return os.environ.get("KVFIX_EMU_ASAN", "").lower() in ("1", "true", "yes", "on")


def variant(asan: bool | None = None) -> str:
    return "asan" if (asan_requested() if asan is None else asan) else "opt"


def cxx() -> list[str]:
    return shlex.split(os.environ.get("KVFIX_EMU_CXX") or os.environ.get("CXX") or "g++")


def cuda_include() -> Path:
    """CUDA headers (cuda_fp16.h, cuda_bf16.h) from the toolkit setup.py would find
    (tools/toolchain.py); only headers are needed."""
    return Path(_toolchain().cuda_include())


@functools.lru_cache(maxsize=None)
def _toolchain():
    spec = importlib.util.spec_from_file_location("kvfix_toolchain", REPO / "tools" / "toolchain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def toolchain_problem() -> str | None:
    """Why emulated modules cannot be built here (None when they can)."""
    if shutil.which(cxx()[0]) is None:
        return f"no C++ compiler ({cxx()[0]})"
    if not (cuda_include() / "cuda_fp16.h").is_file():
        return f"no CUDA headers in {cuda_include()} (set CUDA_HOME)"
    return None


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    try:
        out = subprocess.run([*cxx(), "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        return f"unavailable: {e}"
    return out.splitlines()[0] if out else "unknown"


def libasan_path() -> str:
    """The AddressSanitizer runtime of the compiler (to LD_PRELOAD into Python)."""
    out = subprocess.run([*cxx(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def asan_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python process that loads asan modules."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(p for p in (libasan_path(), env.get("LD_PRELOAD", "")) if p)
    opts = env.get("ASAN_OPTIONS", "")
    extra = "detect_leaks=0"  # Python and torch keep their allocations until exit
    env["ASAN_OPTIONS"] = f"{opts}:{extra}" if opts else extra
    return env


def asan_runtime_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libasan" in f.read()
    except OSError:
        return False


def modules() -> dict[str, Path]:
    """Module name -> shim source (repository-relative)."""
    found: dict[str, Path] = {}
    for d in MODULE_DIRS:
        for p in sorted((REPO / d).glob("*.cpp")):
            rel = p.relative_to(REPO)
            if p.stem in found:
                raise BuildError(f"two emulated modules named {p.stem!r}: {found[p.stem]} and {rel}")
            found[p.stem] = rel
    return found


def _overlay() -> Path | None:
    """KVFIX_EMU_SRC_OVERLAY: a directory mirroring repository paths whose files replace the
    repository's in the emulated build (e.g. a deliberately broken copy of a kernel, for
    mutation tests) without touching the working tree."""
    d = os.environ.get("KVFIX_EMU_SRC_OVERLAY", "")
    return Path(d).resolve() if d else None


def _tree_files() -> dict[Path, Path]:
    """Repository-relative path -> file to read, for every rewritten source (overlay applied)."""
    files: dict[Path, Path] = {}
    roots = [REPO] + ([_overlay()] if _overlay() else [])
    for base in roots:
        for tree in REWRITE_TREES:
            root = base / tree
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file() and p.suffix in SOURCE_SUFFIXES:
                        files[p.relative_to(base)] = p
    return files


def source_key() -> str:
    h = hashlib.sha256()
    for rel, p in sorted(_tree_files().items()):
        h.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
    for p in [*sorted(q for q in INCLUDE_DIR.rglob("*") if q.is_file()), EMU_DIR / "kvemu_rewrite.py"]:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(_compiler_id().encode() + str(cuda_include()).encode())
    return h.hexdigest()


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _unlock(f) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def _module_files(name: str) -> list[tuple[Path, Path]]:
    """(repository-relative path, file) of the shim and every source it includes with quotes,
    transitively, resolved like the compiler does (own directory, then csrc/, then the root)."""
    files = _tree_files()
    todo = [modules()[name]]
    seen: dict[Path, Path] = {}
    while todo:
        rel = todo.pop()
        if rel in seen or rel not in files:
            continue
        seen[rel] = files[rel]
        for inc in _INCLUDE_RE.findall(files[rel].read_text(encoding="utf-8", errors="replace")):
            for cand in (rel.parent / inc, Path("csrc") / inc, Path(inc)):
                cand = Path(os.path.normpath(cand))
                if cand in files:
                    todo.append(cand)
                    break
    return sorted(seen.items())


def module_key(name: str, var: str) -> str:
    """Cache key of one module build: its own sources, the emulator, compiler and flags."""
    h = hashlib.sha256()
    for rel, p in _module_files(name):
        h.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
    for p in [*sorted(q for q in INCLUDE_DIR.rglob("*") if q.is_file()), EMU_DIR / "kvemu_rewrite.py"]:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    extra = os.environ.get("KVFIX_EMU_CXXFLAGS", "")
    h.update(f"{_compiler_id()}|{cuda_include()}|{name}|{var}|{extra}|{COMMON_FLAGS}|{VARIANT_FLAGS[var]}".encode())
    return h.hexdigest()


def prepare_sources(key: str) -> Path:
    """The rewritten source tree for `key` (created once)."""
    dest = CACHE_DIR / f"src-{key[:16]}"
    if dest.is_dir():
        return dest
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src-tmp-", dir=CACHE_DIR))
    try:
        for rel, p in sorted(_tree_files().items()):
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.write_text(rewrite_source(p.read_text(encoding="utf-8"), str(rel)), encoding="utf-8")
            except ValueError as e:
                raise BuildError(f"kvemu rewrite failed for {p}: {e}") from e
        try:
            os.rename(tmp, dest)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def build_command(name: str, srcdir: Path, out: Path, asan: bool) -> list[str]:
    mods = modules()
    if name not in mods:
        raise BuildError(f"no emulated module {name!r} (have: {', '.join(sorted(mods))})")
    extra = shlex.split(os.environ.get("KVFIX_EMU_CXXFLAGS", ""))
    return [*cxx(), *COMMON_FLAGS, *VARIANT_FLAGS[variant(asan)], *extra,
            f"-I{INCLUDE_DIR}", f"-I{srcdir / 'csrc'}", f"-I{srcdir}", "-isystem", str(cuda_include()),
            str(srcdir / mods[name]), "-o", str(out), *LINK_FLAGS]


def build(name: str, asan: bool | None = None) -> Path:
    """Build module `name` (cached) and return the path of its shared library."""
    var = variant(asan)
    if name not in modules():
        raise BuildError(f"no emulated module {name!r} (have: {', '.join(sorted(modules()))})")
    key = module_key(name, var)
    out = CACHE_DIR / f"{name}-{var}-{key[:16]}.so"
    if out.is_file():
        return out
    lock = _lock(CACHE_DIR / f".lock-{name}-{var}")
    try:
        if out.is_file():
            return out
        srcdir = prepare_sources(source_key())
        tmp = out.with_suffix(f".tmp{os.getpid()}.so")
        cmd = build_command(name, srcdir, tmp, var == "asan")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"building emulated module {name!r} ({var}) failed:\n$ {shlex.join(cmd)}\n"
                             f"{proc.stdout}{proc.stderr}")
        out.with_suffix(".log").write_text(
            f"$ {shlex.join(cmd)}\n# {time.monotonic() - t0:.1f} s\n{proc.stdout}{proc.stderr}", encoding="utf-8")
        os.replace(tmp, out)
        if _overlay() is None:  # superseded builds (overlay builds are experiments: keep the rest)
            for old in CACHE_DIR.glob(f"{name}-{var}-*.so"):
                if old != out:
                    old.unlink(missing_ok=True)
                    old.with_suffix(".log").unlink(missing_ok=True)
            _prune_sources(keep=srcdir)
    finally:
        _unlock(lock)
    return out


def _prune_sources(keep: Path, max_age_s: float = 3600.0) -> None:
    now = time.time()
    for d in CACHE_DIR.glob("src-*"):
        if d != keep and d.is_dir() and now - d.stat().st_mtime > max_age_s:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# calling entries


class Arg(ctypes.Structure):
    """Mirror of `kvemu_arg` (include/kvemu/shim.h)."""
    _fields_ = [("kind", ctypes.c_int32), ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("data", ctypes.c_void_p), ("f", ctypes.c_double),
                ("i", ctypes.c_int64), ("sizes", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8)]


@dataclass
class RawTensor:
    """A tensor argument without torch: address, dtype name, shape and strides in elements."""
    ptr: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None


def _fill(arg: Arg, value: Any, index: int) -> None:
    if value is None:
        arg.kind = 0
        return
    if isinstance(value, (bool, numbers.Integral)):  # Python and numpy integers
        arg.kind, arg.i = 3, int(value)
        return
    if isinstance(value, numbers.Real) and not hasattr(value, "data_ptr"):  # floats, numpy floats
        arg.kind, arg.f = 2, float(value)
        return
    if isinstance(value, RawTensor):
        shape = tuple(value.shape)
        strides = value.strides
        if strides is None:
            strides, acc = [], 1
            for s in reversed(shape):
                strides.append(acc)
                acc *= s
            strides = tuple(reversed(strides))
        ptr, dtype = value.ptr, value.dtype
    elif hasattr(value, "data_ptr") and hasattr(value, "stride"):  # a torch.Tensor
        if value.device.type != "cpu":
            raise ValueError(f"argument {index}: emulated kernels take CPU tensors, got {value.device}")
        shape, strides = tuple(value.shape), tuple(value.stride())
        ptr, dtype = value.data_ptr(), str(value.dtype).replace("torch.", "")
    else:
        raise TypeError(f"argument {index}: unsupported type {type(value).__name__}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"argument {index}: unsupported dtype {dtype}")
    if len(shape) > 8:
        raise ValueError(f"argument {index}: more than 8 dims")
    arg.kind, arg.dtype, arg.ndim, arg.data = 1, DTYPE_CODES[dtype], len(shape), ptr
    for d, (n, s) in enumerate(zip(shape, strides)):
        arg.sizes[d], arg.strides[d] = n, s


class Module:
    """A loaded emulated module. `mod.call("entry", *args)` or `mod.entry(*args)`.

    Arguments: torch CPU tensors (or RawTensor), Python numbers, None. A failed launch raises
    EmuError with the emulator's report (deadlock, divergent collective, bad launch config...).
    `seed=` runs this call with that block- and fiber-order seed (default: KVFIX_EMU_SEED, 0 = index
    and thread order).
    """

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, Path(path)
        self.lib = ctypes.CDLL(str(path))
        self.lib.kvemu_last_error.restype = ctypes.c_char_p
        self.lib.kvemu_set_seed.argtypes = [ctypes.c_longlong]
        self.lib.kvemu_current_seed.restype = ctypes.c_longlong
        self.lib.kvemu_grids_run.restype = ctypes.c_longlong
        self._entries: dict[str, Any] = {}

    @property
    def asan(self) -> bool:
        return bool(self.lib.kvemu_is_asan())

    @property
    def seed(self) -> int:
        return int(self.lib.kvemu_current_seed())

    @property
    def grids_run(self) -> int:
        """Grids this module has launched so far (valid configurations, failed or not)."""
        return int(self.lib.kvemu_grids_run())

    def reset(self) -> None:
        """Forget cudaFuncSetAttribute opt-ins and any seed override of this module."""
        self.lib.kvemu_reset()

    def has(self, entry: str) -> bool:
        return hasattr(self.lib, "kvemu_entry_" + entry)

    def _entry(self, entry: str):
        fn = self._entries.get(entry)
        if fn is None:
            try:
                fn = getattr(self.lib, "kvemu_entry_" + entry)
            except AttributeError:
                raise AttributeError(f"emulated module {self.name!r} has no entry {entry!r}") from None
            fn.argtypes = [ctypes.POINTER(Arg), ctypes.c_int]
            fn.restype = ctypes.c_int
            self._entries[entry] = fn
        return fn

    def call(self, entry: str, *args: Any, seed: int | None = None, quiet: bool = False) -> None:
        """Run entry `entry`; `seed` overrides the block and fiber order, `quiet` keeps an expected
        failure's report off stderr (it is still in the EmuError)."""
        fn = self._entry(entry)
        arr = (Arg * max(1, len(args)))()
        for i, a in enumerate(args):
            _fill(arr[i], a, i)
        if seed is not None:
            self.lib.kvemu_set_seed(int(seed))
        if quiet:
            self.lib.kvemu_set_quiet(1)
        try:
            rc = fn(arr, len(args))
        finally:
            if seed is not None:
                self.lib.kvemu_set_seed(-1)
            if quiet:
                self.lib.kvemu_set_quiet(-1)
        if rc != 0:
            raise EmuError(rc, (self.lib.kvemu_last_error() or b"").decode(errors="replace"))

    def __getattr__(self, entry: str):
        if entry.startswith("_"):
            raise AttributeError(entry)
        self._entry(entry)
        return functools.partial(self.call, entry)


@functools.lru_cache(maxsize=None)
def load(name: str, asan: bool | None = None) -> Module:
    """Build (cached) and load module `name` in this process."""
    var = variant(asan)
    if var == "asan" and not asan_runtime_loaded():
        raise BuildError("the asan variant needs the ASan runtime preloaded: run Python with "
                         f"LD_PRELOAD={libasan_path()} ASAN_OPTIONS=detect_leaks=0 "
                         "(python tests/emu/run_emulated.py --asan-only does this)")
    return Module(name, build(name, var == "asan"))


if __name__ == "__main__":  # python tests/emu/kvemu_build.py [--asan] [module ...]
    argv = sys.argv[1:]
    use_asan = "--asan" in argv
    names = [a for a in argv if not a.startswith("--")] or sorted(modules())
    for n in names:
        t = time.monotonic()
        print(f"{n}: {build(n, use_asan)} ({time.monotonic() - t:.1f} s)")
