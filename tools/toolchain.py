"""Where the CUDA toolkit is and how kvfix's CUDA sources are compiled: stated once.

Used by setup.py (the extension build), tools/ptxas_report.py (the nvcc resource report),
tests/emu/kvemu_build.py (CUDA headers for the SIMT emulator) and scripts/dev (through the
command line below). Imports neither torch nor kvfix, so each of them can load it by path.

Discovery: the candidates are, in order, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the toolkit
of the `nvcc` on PATH (resolved through symlinks and wrapper-script locations); a candidate
counts when it has bin/nvcc and include/cuda_runtime.h. The extension build takes the first
whose nvcc has torch's CUDA major version; the emulator only needs the headers.

Command line (for shell scripts):
    python tools/toolchain.py cuda-home [--torch-cuda 13.0]
        prints the toolkit the build would use; exit 1 with the reason on stderr if none.
    python tools/toolchain.py archs
        prints the default CUDA architectures ("8.0;9.0").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

# CUDA architectures built by default: no GPU is needed to compile for them (TORCH_CUDA_ARCH_LIST
# overrides, as for any torch extension).
DEFAULT_ARCHS = "8.0;9.0"

# nvcc flags kvfix adds to torch's own (CUDAExtension supplies -std and the __CUDA_NO_HALF*
# defines; tools/ptxas_report.py compiles without torch and adds TORCH_NVCC_FLAGS itself).
KVFIX_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
TORCH_NVCC_FLAGS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


def cuda_home_candidates(require_nvcc: bool = True) -> list[str]:
    """Toolkit directories in preference order (see the module docstring)."""
    homes = [h for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: take the toolkit of the real binary (torch
        # would guess /usr/local and fail to link cudart).
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    seen: list[str] = []
    for h in homes:
        ok = os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))
        if require_nvcc:
            ok = ok and os.path.exists(os.path.join(h, "bin", "nvcc"))
        if ok and h not in seen:
            seen.append(h)
    return seen


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    """(major, minor) of the toolkit's nvcc, None if it does not run."""
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cuda(torch_cuda: str | None) -> tuple[str | None, str]:
    """(toolkit, reason): the first candidate whose nvcc matches torch's CUDA major version.

    `torch_cuda` is `torch.version.cuda` (None for a CPU-only torch). The toolkit is None when no
    build is possible; the reason says why, or which nvcc was picked.
    """
    if torch_cuda is None:
        return None, "this torch has no CUDA (torch.version.cuda is None)"
    homes = cuda_home_candidates()
    if not homes:
        return None, "nvcc not found (set CUDA_HOME)"
    major = int(torch_cuda.split(".")[0])
    found = []
    for home in homes:
        nv = nvcc_version(home)
        if nv is not None and nv[0] == major:
            return home, f"nvcc {nv[0]}.{nv[1]} at {home}, torch CUDA {torch_cuda}"
        found.append(f"{home}: nvcc {'?' if nv is None else '.'.join(map(str, nv))}")
    return None, (f"no CUDA toolkit matches the CUDA major version of torch ({torch_cuda}): " + "; ".join(found))


def find_nvcc() -> str | None:
    """The nvcc of the first candidate toolkit (any version), for torch-free tools."""
    homes = cuda_home_candidates()
    return os.path.join(homes[0], "bin", "nvcc") if homes else None


def cuda_include() -> str:
    """Include directory with cuda_fp16.h / cuda_bf16.h (the emulator needs headers, not nvcc)."""
    homes = cuda_home_candidates(require_nvcc=False)
    return os.path.join(homes[0] if homes else "/usr/local/cuda", "include")


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cuda-home", help="the toolkit the extension build would use")
    p.add_argument("--torch-cuda", default=None, help="torch.version.cuda (default: ask torch)")
    sub.add_parser("archs", help="default CUDA architectures")
    args = ap.parse_args(argv)
    if args.cmd == "archs":
        print(DEFAULT_ARCHS)
        return 0
    tc = args.torch_cuda
    if tc is None:
        import torch  # only here: the module itself stays torch-free

        tc = torch.version.cuda
    home, reason = find_cuda(tc)
    if home is None:
        print(reason, file=sys.stderr)
        return 1
    print(home)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
