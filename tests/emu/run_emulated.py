"""Run the emulated CUDA kernel suite (tests/emu) the way CI does.

    python tests/emu/run_emulated.py                  # seeds 0, 1, 2, then the ASan build
    python tests/emu/run_emulated.py --seeds 0 5      # chosen seeds only
    python tests/emu/run_emulated.py --asan-only      # the AddressSanitizer pass only
    python tests/emu/run_emulated.py --no-asan -- -k dscr -x    # extra pytest arguments after --
    python tests/emu/run_emulated.py --jobs 2         # two passes at a time, ASan in 2 shards

Each pass is one pytest process over tests/emu with KVFIX_EMU_SEED set (0 = blocks in index
order and threads in thread order, others = a random block order per kernel and launch shape and
a random fiber order per kernel and block). The ASan pass builds the modules with
-fsanitize=address and runs pytest with the ASan runtime preloaded (LD_PRELOAD), leak
detection off and --capture=sys (so a report that ends the process stays visible); seed 0.

A pass runs on one core (the emulator runs a block's fibers on one thread); --jobs N runs N
passes at a time and prints each pass's output when it ends. The ASan pass (about three times as
long as a seed pass) is then split into N shards (KVFIX_EMU_SHARD=i/N, tests/emu/conftest.py:
every N-th test), started first. Prints the wall time of every pass; exits non-zero if any fails.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kvemu_build  # noqa: E402


def _pytest(env: dict[str, str], extra: list[str], asan: bool, log=None) -> subprocess.Popen:
    """Start one pass; its output goes to `log` (a file) or, without one, to this process's."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # ASan reports go to fd 2 and end the process: keep pytest from capturing (and losing) them
    cap = ["--capture=sys"] if asan else []
    cmd = [sys.executable, "-m", "pytest", str(HERE.relative_to(REPO)), "-q", *cap, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)


def _run(passes: list[tuple[str, dict[str, str]]], extra: list[str], jobs: int) -> list:
    """Run `passes` `jobs` at a time, in the given order. One at a time, a pass prints as it runs;
    several, each one's output is printed when it ends (passes do not interleave)."""
    todo, running, results = list(passes), [], []
    while todo or running:
        while todo and len(running) < jobs:
            name, env = todo.pop(0)
            log = tempfile.TemporaryFile("w+") if jobs > 1 else None
            print(f"=== emulated suite, {name}{': started' if log else ''} ===", flush=True)
            running.append((name, _pytest(env, extra, env.get("KVFIX_EMU_ASAN") == "1", log), log, time.monotonic()))
        time.sleep(0.5)
        for job in [j for j in running if j[1].poll() is not None]:
            running.remove(job)
            name, proc, log, t0 = job
            if log is not None:
                log.seek(0)
                print(f"=== emulated suite, {name} ===", flush=True)
                sys.stdout.write(log.read())
                sys.stdout.flush()
                log.close()
            results.append((name, proc.returncode, time.monotonic() - t0))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-asan", action="store_true", help="skip the AddressSanitizer pass")
    ap.add_argument("--asan-only", action="store_true", help="only the AddressSanitizer pass")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="passes run at a time (default 1)")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    a = ap.parse_args()

    passes: list[tuple[str, dict[str, str]]] = []
    base = {k: v for k, v in os.environ.items() if k not in ("KVFIX_EMU_ASAN", "KVFIX_EMU_SEED", "KVFIX_EMU_SHARD")}
    if not a.asan_only:
        for s in a.seeds:
            passes.append((f"seed {s}", {**base, "KVFIX_EMU_SEED": str(s)}))
    if not a.no_asan:
        asan = {**kvemu_build.asan_env(base), "KVFIX_EMU_ASAN": "1", "KVFIX_EMU_SEED": "0"}
        if a.jobs > 1:
            passes = [(f"asan {i}/{a.jobs} (seed 0)", {**asan, "KVFIX_EMU_SHARD": f"{i}/{a.jobs}"})
                      for i in range(1, a.jobs + 1)] + passes
        else:
            passes.append(("asan (seed 0)", asan))

    results = _run(passes, a.pytest_args, max(1, a.jobs))
    print("=== summary ===")
    for name, rc, dt in results:
        print(f"  {name:18s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {dt:6.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
