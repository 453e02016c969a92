#!/usr/bin/env python3
"""ptxas resource report of kvfix's CUDA kernels (no GPU needed).

Compiles every framework-free kernel header csrc/kernels/*.cuh, one small generated translation
unit per header and architecture (no torch headers: a few seconds each), with `-Xptxas -v`, and
reports per kernel and architecture: registers per thread, static shared memory, the dynamic
shared memory its launcher requests, spill stores/loads, stack frame, threads per block (from the
kernel's __launch_bounds__, read from the PTX) and the resulting resident blocks per SM.

Writes a markdown table to docs/RESOURCES.md (--out), prints it, and exits non-zero when any
kernel spills, uses more static shared memory than a block may declare (48 KiB), or requests more
shared memory in total than its architecture gives one block.

Header conventions (read by this script):
  // @ptxas-instantiate: <explicit instantiation>;   one line per template instantiation to
                                                     compile (e.g. the host launcher, which
                                                     instantiates every kernel it can launch)
  constexpr int k<Name>DynamicSmemBytes = <n>;       dynamic shared memory the header's launchers
                                                     request (largest value; 0 if absent)

The flags are setup.py's (tools/toolchain.py: kvfix's own plus the -std and __CUDA_NO_HALF*_
macros torch's CUDAExtension adds) so the report describes the code setup.py builds.

Usage: python tools/ptxas_report.py [--archs 80 90] [--out docs/RESOURCES.md] [--no-write]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toolchain  # noqa: E402  (tools/toolchain.py: CUDA discovery and flags, shared with setup.py)

# Per-architecture limits (CUDA programming guide, compute capabilities table).
STATIC_SMEM_LIMIT = 48 * 1024  # a block's statically declared shared memory, every arch
ARCH_LIMITS = {
    # arch: (max shared memory per block incl. opt-in dynamic, shared memory per SM usable by
    #        blocks, reserved shared memory per block, registers per SM, max threads per SM,
    #        max blocks per SM)
    "80": (166912, 167936, 1024, 65536, 2048, 32),
    "86": (101376, 102400, 1024, 65536, 1536, 16),
    "89": (101376, 102400, 1024, 65536, 1536, 24),
    "90": (232448, 233472, 1024, 65536, 2048, 32),
}

NVCC_FLAGS = [*toolchain.KVFIX_NVCC_FLAGS, *toolchain.TORCH_NVCC_FLAGS]

RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
RE_PROPS = re.compile(r"Function properties for (\S+)")
RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
RE_USED = re.compile(r"Used (\d+) registers")
RE_SMEM = re.compile(r"(\d+) bytes smem")
RE_PTX_ENTRY = re.compile(r"^(?:\.(?:visible|weak)\s+)?\.entry\s+([^\s(]+)\s*\(", re.M)
RE_MAXNTID = re.compile(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)")
RE_INST = re.compile(r"^\s*//\s*@ptxas-instantiate:\s*(.+?)\s*$", re.M)
RE_DYN = re.compile(r"constexpr\s+(?:int|unsigned|size_t|int64_t)\s+k\w*DynamicSmemBytes\s*=\s*(\d+)")


def find_nvcc() -> str:
    nvcc = toolchain.find_nvcc()
    if nvcc is None:
        sys.exit("ptxas_report: nvcc not found (set CUDA_HOME)")
    return nvcc


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """'void ns::kernel<float, 64>(Args, long)' -> 'kernel<float, 64>'."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)  # drop the parameter list: the first '(' outside template brackets
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut]
    depth, start = 0, 0  # drop namespaces: the last '::' outside template brackets
    for i in range(len(s) - 1):
        if s[i] in "<":
            depth += 1
        elif s[i] == ">":
            depth -= 1
        elif s[i:i + 2] == "::" and depth == 0:
            start = i + 2
    return s[start:]


def compile_unit(nvcc: str, header: str, arch: str, workdir: str):
    """Compile one generated TU for `header` and `arch`; return (ptxas log, ptx text)."""
    text = open(header).read()
    stem = os.path.splitext(os.path.basename(header))[0]
    rel = os.path.relpath(header, os.path.join(ROOT, "csrc"))
    body = [f'#include "{rel}"'] + RE_INST.findall(text)
    d = os.path.join(workdir, f"{stem}_sm{arch}")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, f"{stem}_report.cu")
    with open(src, "w") as f:
        f.write("// generated by tools/ptxas_report.py\n" + "\n".join(body) + "\n")
    cmd = [nvcc, "-c", src, "-o", os.path.join(d, "out.o"), *NVCC_FLAGS,
           "-I", os.path.join(ROOT, "csrc"), f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "--keep", "--keep-dir", d]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        sys.exit(f"ptxas_report: nvcc failed for {rel} (sm_{arch})")
    ptx = ""
    for path in glob.glob(os.path.join(d, "*.ptx")):
        ptx += open(path).read()
    return p.stdout + p.stderr, ptx


def parse(log: str, ptx: str) -> dict[str, dict]:
    threads = {}
    for m in RE_PTX_ENTRY.finditer(ptx):
        nt = RE_MAXNTID.search(ptx, m.end(), m.end() + 2000)
        if nt:
            threads[m.group(1)] = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3))
    kernels, cur, entries = {}, None, set()
    for line in log.splitlines():
        m = RE_ENTRY.search(line)
        if m:
            entries.add(m.group(1))
            continue
        m = RE_PROPS.search(line)
        if m:
            cur = m.group(1)
            kernels.setdefault(cur, {})
            continue
        if cur is None:
            continue
        m = RE_STACK.search(line)
        if m:
            kernels[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = RE_USED.search(line)
        if m:
            sm = RE_SMEM.search(line)
            kernels[cur].update(regs=int(m.group(1)), smem=int(sm.group(1)) if sm else 0)
            cur = None
    out = {}
    for name, k in kernels.items():
        if name in entries and "regs" in k:
            k["threads"] = threads.get(name)
            out[name] = k
    return out


def blocks_per_sm(arch: str, regs: int, smem_total: int, threads: int | None):
    if not threads:
        return None
    _, smem_sm, reserved, regs_sm, threads_sm, blocks_sm = ARCH_LIMITS[arch]
    warps = (threads + 31) // 32
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocation unit: 256 registers a warp
    by_regs = regs_sm // (regs_warp * warps)
    by_smem = smem_sm // (smem_total + reserved)
    return min(by_regs, by_smem, threads_sm // threads, blocks_sm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=[a.replace(".", "") for a in toolchain.DEFAULT_ARCHS.split(";")],
                    help="compute capabilities (default: setup.py's, 80 90)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "RESOURCES.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = ap.parse_args()
    for a in args.archs:
        if a not in ARCH_LIMITS:
            sys.exit(f"ptxas_report: unknown arch {a} (known: {', '.join(ARCH_LIMITS)})")

    nvcc = find_nvcc()
    version = re.search(r"release (\S+),", subprocess.run([nvcc, "--version"], capture_output=True,
                                                          text=True).stdout)
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cuh")))
    if not headers:
        sys.exit("ptxas_report: no csrc/kernels/*.cuh")

    rows, problems = [], []
    with tempfile.TemporaryDirectory(prefix="kvfix_ptxas_") as work, \
            cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        jobs = {(h, a): pool.submit(compile_unit, nvcc, h, a, work) for h in headers for a in args.archs}
        parsed = {}
        for (h, a), fut in jobs.items():
            log, ptx = fut.result()
            parsed[(h, a)] = parse(log, ptx)
    names = demangle(sorted({n for ks in parsed.values() for n in ks}))
    for h in headers:
        dyn = max([int(x) for x in RE_DYN.findall(open(h).read())] or [0])
        for a in args.archs:
            ks = parsed[(h, a)]
            if not ks:
                problems.append(f"{os.path.basename(h)}: no kernels compiled for sm_{a} "
                                "(missing // @ptxas-instantiate: lines?)")
            for mangled, k in ks.items():
                name = short_name(names.get(mangled, mangled))
                total = k["smem"] + dyn
                occ = blocks_per_sm(a, k["regs"], total, k.get("threads"))
                rows.append((name, a, k, dyn, occ, os.path.basename(h)))
                if k["spill_st"] or k["spill_ld"]:
                    problems.append(f"{name} sm_{a}: spills {k['spill_st']} B stores / {k['spill_ld']} B loads")
                if k["smem"] > STATIC_SMEM_LIMIT:
                    problems.append(f"{name} sm_{a}: {k['smem']} B static shared memory > {STATIC_SMEM_LIMIT}")
                if total > ARCH_LIMITS[a][0]:
                    problems.append(f"{name} sm_{a}: {total} B shared memory > {ARCH_LIMITS[a][0]} per block")
                if occ == 0:
                    problems.append(f"{name} sm_{a}: cannot be resident (registers/shared memory per block)")
    rows.sort(key=lambda r: (r[5], r[0], r[1]))

    lines = [
        "# CUDA kernel resources",
        "",
        f"Generated by `python tools/ptxas_report.py` (nvcc {version.group(1) if version else '?'}); "
        "do not edit by hand. Per kernel instantiation and "
        "architecture: registers per thread, static shared memory, dynamic shared memory the "
        "launcher requests, spill stores / loads and stack frame (bytes per thread), threads per "
        "block (`__launch_bounds__`) and the resident blocks per SM those resources allow. The "
        "report fails on any spill or on shared memory over the architecture's limit.",
        "",
        "| kernel | arch | registers | static smem (B) | dynamic smem (B) | spill st / ld (B) | stack (B) "
        "| threads | blocks/SM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a, k, dyn, occ, _ in rows:
        lines.append(f"| `{name}` | sm_{a} | {k['regs']} | {k['smem']} | {dyn} | {k['spill_st']} / {k['spill_ld']} "
                     f"| {k['stack']} | {k.get('threads') or '?'} | {occ if occ is not None else '?'} |")
    lines.append("")
    if problems:
        lines += ["**Problems:**", ""] + [f"- {p}" for p in problems] + [""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if problems:
        print("ptxas_report: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
