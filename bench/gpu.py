"""CUDA timings of the DSCR and KVSmooth ops: `python -m bench.gpu` on a machine with a GPU.

This project's machines have no GPU, so bench/table.py (bench/RESULTS.md) is CPU only; this
prints a markdown table to record by hand in the docs, with the machine and the date, when a
GPU is at hand. Timing: CUDA events around each call, medians of 25 calls after 3 warm-ups,
so host overhead (launches, the structured plan's one host read of the depth range) counts.

- DSCR, K and V [1, H, N, 128]: structured (coords=(gh, gw), method="structured", out of place),
  in place (dscr_refine_cache_), the dense kernel (tensor coords), the dense GEMM floor
  (`W @ K`, `W @ V` with a precomputed N x N W in the dtype), K.clone() + V.clone(); and
  max |structured - dense|.
- KVSmooth, B=1, H=32, D=128: kvsmooth_step_, row_entropy and a copy of K.
"""
import statistics

import torch

import kvfix
from kvfix import reference as R

PARAMS = dict(sigma_d=0.6, sigma_s=0.6, alpha=0.6, beta=0.8)
DSCR_SHAPES = [(24, 24, 32), (48, 48, 4), (64, 64, 4), (128, 128, 4)]  # gh, gw, H
DENSE_MAX_N = 4096


def cuda_ms(fn, reps: int = 25, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dscr_rows(dev: str = "cuda") -> list:
    lines = ["| grid | H | dtype | structured ms | in place ms | dense ms | floor ms | copy ms "
             "| structured/floor | structured/dense | max abs(structured - dense) |", "|" + "---|" * 11]
    for gh, gw, H in DSCR_SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            N = gh * gw
            k = torch.randn(1, H, N, 128, device=dev).to(dt)
            v = torch.randn_like(k)
            depth = torch.rand(1, N, device=dev)
            coords = kvfix.patch_coords(gh, gw, device=dev)
            kc, vc = k.clone(), v.clone()
            ms = {"structured": cuda_ms(lambda: kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured",
                                                                  **PARAMS)),
                  "in place": cuda_ms(lambda: kvfix.dscr_refine_cache_([kc], [vc], depth, (gh, gw),
                                                                       method="structured", **PARAMS)),
                  "copy": cuda_ms(lambda: (k.clone(), v.clone()))}
            err = "n/a"
            if N <= DENSE_MAX_N:
                W = R.dscr_weights(depth, coords, **PARAMS)[0].T.contiguous().to(dt)
                ms["dense"] = cuda_ms(lambda: kvfix.dscr_refine(k, v, depth, coords, **PARAMS))
                ms["floor"] = cuda_ms(lambda: (torch.matmul(W, k), torch.matmul(W, v)))
                ks = kvfix.dscr_refine(k, v, depth, (gh, gw), method="structured", **PARAMS)[0]
                kd = kvfix.dscr_refine(k, v, depth, coords, **PARAMS)[0]
                err = f"{(ks.float() - kd.float()).abs().max().item():.1e}"

            def cell(n):
                return f"{ms[n]:.3f}" if n in ms else "n/a"

            def ratio(a, b):
                return f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "n/a"
            lines.append(f"| {gh}x{gw} | {H} | {str(dt)[6:]} | {cell('structured')} | {cell('in place')} "
                         f"| {cell('dense')} | {cell('floor')} | {cell('copy')} | {ratio('structured', 'floor')} "
                         f"| {ratio('structured', 'dense')} | {err} |")
    return lines


def kvsmooth_rows(dev: str = "cuda") -> list:
    lines = ["| kvsmooth T | dtype | kvsmooth_step_ ms | row_entropy ms | copy of K ms |", "|" + "---|" * 5]
    for T in (2048, 8192):
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(1, 32, 1, 128, device=dev).to(dt)
            k = torch.randn(1, 32, T, 128, device=dev).to(dt)
            v = torch.randn_like(k)
            queue = torch.full((1, 15), float("nan"), device=dev)
            dst = torch.empty_like(k)
            lines.append(f"| {T} | {str(dt)[6:]} | {cuda_ms(lambda: kvfix.kvsmooth_step_(q, k, v, queue)):.4f} "
                         f"| {cuda_ms(lambda: kvfix.row_entropy(q, k)):.4f} | {cuda_ms(lambda: dst.copy_(k)):.4f} |")
    return lines


def main() -> None:
    if not torch.cuda.is_available() or "cuda" not in kvfix.build_info()["devices"]:
        raise SystemExit("bench.gpu needs a GPU and kvfix built with its CUDA kernels")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, kvfix {kvfix.build_info()['version']}\n")
    print("\n".join(dscr_rows()), "\n", flush=True)
    print("\n".join(kvsmooth_rows()))


if __name__ == "__main__":
    main()
