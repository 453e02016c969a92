"""Build kvfix._C: CPU kernels always; CUDA kernels too when torch has CUDA and nvcc is found.

Environment:
  KVFIX_NO_CUDA=1        build the CPU kernels only.
  KVFIX_REQUIRE_CUDA=1   fail instead of falling back to a CPU-only build.
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0": no GPU is needed to build).
  CUDA_HOME              CUDA toolkit. Default: the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda
                         and the toolkit of the nvcc on PATH whose major version matches torch's
                         CUDA (tools/toolchain.py).
  MAX_JOBS               parallel compile jobs.

Install with `pip install --no-build-isolation .` after torch is installed (keeping torch out
of the build requirements stops pip from fetching a second, mismatched torch).
"""
import glob
import importlib.util
import json
import os
import sys
import warnings

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_toolchain():
    """tools/toolchain.py, by path: CUDA discovery and flags shared with the resource report,
    the emulator build and scripts/dev."""
    spec = importlib.util.spec_from_file_location("kvfix_toolchain", os.path.join(ROOT, "tools", "toolchain.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toolchain = _load_toolchain()


def _cuda_decision():
    """Return (use_cuda, cuda_home, reason)."""
    if _flag("KVFIX_NO_CUDA"):
        return False, None, "KVFIX_NO_CUDA is set"
    home, reason = toolchain.find_cuda(torch.version.cuda)
    return home is not None, home, reason


def _nvidia_include_dirs():
    """Headers the torch wheel ships (cusparse.h etc.) that ATen/cuda needs; /usr/local/cuda may lack them."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/*/include"):
            for d in glob.glob(os.path.join(p, sub)):
                if os.path.isdir(d) and glob.glob(os.path.join(d, "cusparse*.h")) and d not in dirs:
                    dirs.append(d)
    return dirs


use_cuda, cuda_home, reason = _cuda_decision()
if not use_cuda:
    if _flag("KVFIX_REQUIRE_CUDA"):
        raise RuntimeError(f"KVFIX_REQUIRE_CUDA=1 but the CUDA build is not possible: {reason}")
    if "KVFIX_NO_CUDA" not in reason and torch.version.cuda is not None:
        warnings.warn(f"kvfix: building the CPU kernels only: {reason}")

os.chdir(ROOT)  # the source globs below are relative to the project
sources = sorted(glob.glob("csrc/ops/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
# -fopenmp: at::parallel_for is a header template; without it our own loops run on one thread.
cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp"]  # libgomp, the OpenMP runtime torch itself loads
define_macros = []
# KVFIX_CPU_NO_AVX512=1: the CPU kernels without their AVX-512 clones (x86-64-v3 and default only),
# to time the AVX2 path on a machine that has AVX-512 (README, "Benchmarks").
cpu_clones = ["x86-64-v4", "x86-64-v3", "default"]
if _flag("KVFIX_CPU_NO_AVX512"):
    define_macros.append(("KVFIX_CPU_NO_AVX512", "1"))
    cpu_clones = cpu_clones[1:]
archs = ""
if use_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME when imported (below): without it, it guesses
    # /usr/local, where nvcc may be a wrapper script and cudart is missing.
    os.environ["CUDA_HOME"] = cuda_home
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if use_cuda:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or toolchain.DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _nvidia_include_dirs()
    ext = CUDAExtension(
        "kvfix._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": [*toolchain.KVFIX_NVCC_FLAGS, "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("kvfix._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# What was built, for kvfix.build_info().
info = {
    "devices": ["cpu", "cuda"] if use_cuda else ["cpu"],
    "cuda_archs": archs.replace(" ", ";").split(";") if use_cuda else [],
    "built_with_torch": torch.__version__,
    "built_with_torch_cuda": torch.version.cuda,
    "nvcc": ".".join(map(str, toolchain.nvcc_version(cuda_home))) if use_cuda else None,
    "cuda_reason": reason,
    "cpu_clones": cpu_clones,
}
with open(os.path.join(ROOT, "kvfix", "_build_info.json"), "w") as f:
    json.dump(info, f, indent=1)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
