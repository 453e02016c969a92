"""Run the emulated CUDA kernel suite (tests/emu) the way CI does.

    python tests/emu/run_emulated.py                  # seeds 0, 1, 2, then the ASan build
    python tests/emu/run_emulated.py --seeds 0 5      # chosen seeds only
    python tests/emu/run_emulated.py --asan-only      # the AddressSanitizer pass only
    python tests/emu/run_emulated.py --no-asan -- -k dscr -x    # extra pytest arguments after --

Each pass is one pytest process over tests/emu with KVFIX_EMU_SEED set (0 = blocks in index
order and threads in thread order, others = a random block order per kernel and launch shape and
a random fiber order per kernel and block). The ASan pass builds the modules with
-fsanitize=address and runs pytest with the ASan runtime preloaded (LD_PRELOAD), leak
detection off and --capture=sys (so a report that ends the process stays visible); seed 0. Prints the wall time of every pass; exits non-zero if any fails.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kvemu_build  # noqa: E402


def _pytest(env: dict[str, str], extra: list[str], asan: bool) -> int:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # ASan reports go to fd 2 and end the process: keep pytest from capturing (and losing) them
    cap = ["--capture=sys"] if asan else []
    cmd = [sys.executable, "-m", "pytest", str(HERE.relative_to(REPO)), "-q", *cap, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-asan", action="store_true", help="skip the AddressSanitizer pass")
    ap.add_argument("--asan-only", action="store_true", help="only the AddressSanitizer pass")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    a = ap.parse_args()

    passes: list[tuple[str, dict[str, str]]] = []
    base = {k: v for k, v in os.environ.items() if k not in ("KVFIX_EMU_ASAN", "KVFIX_EMU_SEED")}
    if not a.asan_only:
        for s in a.seeds:
            passes.append((f"seed {s}", {**base, "KVFIX_EMU_SEED": str(s)}))
    if not a.no_asan:
        passes.append(("asan (seed 0)", {**kvemu_build.asan_env(base), "KVFIX_EMU_ASAN": "1", "KVFIX_EMU_SEED": "0"}))

    results = []
    for name, env in passes:
        print(f"=== emulated suite, {name} ===", flush=True)
        t0 = time.monotonic()
        rc = _pytest(env, a.pytest_args, env.get("KVFIX_EMU_ASAN") == "1")
        results.append((name, rc, time.monotonic() - t0))
    print("=== summary ===")
    for name, rc, dt in results:
        print(f"  {name:14s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {dt:6.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
