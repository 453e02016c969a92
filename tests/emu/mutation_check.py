"""Mutation check: deliberately broken copies of a kernel must fail the emulated tests.

    python tests/emu/mutation_check.py            # every mutation below
    python tests/emu/mutation_check.py -k barrier # the mutations whose name contains "barrier"

Each mutation replaces one snippet of a kernel source in a temporary overlay directory
(KVFIX_EMU_SRC_OVERLAY: the working tree is never touched), rebuilds the emulated module and
runs the kernel's emulated tests with -x under KVFIX_EMU_SEED=0, then 1 and 2, then the ASan
build, until one fails. Prints which test caught each mutation; exits 1 if one was not caught.
A mutation whose snippet no longer exists in the source (the kernel changed) is reported as
"n/a" so the list can be kept up to date.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kvemu_build  # noqa: E402


@dataclass
class Mutation:
    name: str
    file: str  # repository-relative
    old: str
    new: str
    tests: str  # pytest target


DSCR = "csrc/kernels/dscr.cuh"
DSCR_TESTS = "tests/emu/test_emu_dscr.py"

MUTATIONS = [
    Mutation("barrier removed: before a tile's copy (previous tile still being read)", DSCR,
             "__syncthreads();  // the previous tile's readers are done", "//", DSCR_TESTS),
    Mutation("barrier removed: after the copies (tiles incomplete)", DSCR,
             "__syncthreads();  // tiles complete", "//", DSCR_TESTS),
    Mutation("barrier removed: before the column sums", DSCR,
             "__syncthreads();  // every warp is past its last tile", "//", DSCR_TESTS),
    Mutation("wrong tile index: 16-byte tile load reads source rows swapped in pairs", DSCR,
             "*dst = *reinterpret_cast<const uint4*>(src + r * sn + col);",
             "*dst = *reinterpret_cast<const uint4*>(src + (r ^ 1) * sn + col);", DSCR_TESTS),
    Mutation("wrong tile index: scalar tile load reads column + 1", DSCR,
             "? src[r * sn + col] : zero;", "? src[r * sn + col + 1] : zero;", DSCR_TESTS),
    Mutation("wrong tile index: output token tiles spaced TJ + 16 apart", DSCR,
             "const int j0 = jt * TJ;", "const int j0 = jt * (TJ + 16);", DSCR_TESTS),
    Mutation("wrong layout: weight fragment row_major instead of col_major", DSCR,
             "wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;",
             "wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;", DSCR_TESTS),
    Mutation("missing guard: SIMT path stores rows j >= N", DSCR,
             "if (jl >= rows) continue;", "", DSCR_TESTS),
    Mutation("diagonal not masked", DSCR, "il < rows && i != j_own", "il < rows", DSCR_TESTS),
    Mutation("geometry batch offset ignored", DSCR,
             "const float* const dep = a.depth + b * a.geo_sb;", "const float* const dep = a.depth;", DSCR_TESTS),
]


def _run(tests: str, env: dict[str, str]) -> tuple[bool, str]:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["KVFIX_EMU_QUIET"] = "1"
    # -v names each test before it runs; --capture=sys leaves fd 2 alone, so an ASan report or a
    # crash of the test process is not swallowed by pytest's output capture
    cmd = [sys.executable, "-m", "pytest", tests, "-x", "-v", "-rf", "-p", "no:cacheprovider", "--capture=sys"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if "BuildError" in r.stdout or "building emulated module" in r.stdout:
        return False, "the mutated source does not compile"
    m = re.search(r"^(FAILED|ERROR) (\S+)", r.stdout, re.M)
    if m:
        return True, m.group(2)
    out = r.stdout + r.stderr
    started = re.findall(r"^(tests/\S+::\S+)", r.stdout, re.M)
    during = f" during {started[-1]}" if started else ""
    if "ERROR: AddressSanitizer" in out:
        s = re.search(r"SUMMARY: AddressSanitizer: (.*)", out)
        return True, f"AddressSanitizer {s.group(1) if s else 'error'}{during}"
    if r.returncode < 0 or "Fatal Python error" in out:
        how = f"signal {-r.returncode}" if r.returncode < 0 else "fatal error"
        return True, f"the test process crashed ({how}){during}"
    return r.returncode != 0, out[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--no-asan", action="store_true")
    ap.add_argument("--config", action="append", choices=["seed0", "seed1", "seed2", "asan"],
                    help="run only these configurations (default: all, in order, until one fails)")
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("KVFIX_EMU_ASAN", "KVFIX_EMU_SEED", "KVFIX_EMU_SRC_OVERLAY")}
    configs = [("seed 0", {"KVFIX_EMU_SEED": "0"}), ("seed 1", {"KVFIX_EMU_SEED": "1"}),
               ("seed 2", {"KVFIX_EMU_SEED": "2"})]
    if not a.no_asan:
        configs.append(("asan", {**kvemu_build.asan_env({}), "KVFIX_EMU_ASAN": "1", "KVFIX_EMU_SEED": "0"}))
    if a.config:
        configs = [c for c in configs if c[0].replace(" ", "") in a.config]
    missed = 0
    for mut in MUTATIONS:
        if a.k not in mut.name:
            continue
        src = (REPO / mut.file).read_text(encoding="utf-8")
        if src.count(mut.old) != 1:
            print(f"n/a      {mut.name}: snippet not found once in {mut.file}", flush=True)
            continue
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kvemu-mut-") as ov:
            dest = Path(ov) / mut.file
            dest.parent.mkdir(parents=True)
            dest.write_text(src.replace(mut.old, mut.new), encoding="utf-8")
            caught, note = None, ""
            for cname, cenv in configs:
                failed, where = _run(mut.tests, {**base, **cenv, "KVFIX_EMU_SRC_OVERLAY": ov})
                if failed:
                    caught = (cname, where)
                    break
                if where == "the mutated source does not compile":
                    note = f": {where} (fix the mutation)"
                    break
        dt = time.monotonic() - t0
        if caught:
            print(f"caught   {mut.name}: {caught[0]}, {caught[1]} ({dt:.0f} s)", flush=True)
        else:
            missed += 1
            print(f"MISSED   {mut.name}{note} ({dt:.0f} s)", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
