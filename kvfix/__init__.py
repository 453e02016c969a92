"""kvfix: fused KV-cache kernels that make vision-language models hallucinate less.

Ops (CPU always, CUDA when built with nvcc):
DSCR: `dscr_refine`, `dscr_refine_cache_` (structured or dense, `dscr_plan` says which);
KVSmooth: `row_entropy`, `kvsmooth_step_`, `kvsmooth_steps_`; SCR: `scr_scores`, `scr_redistribute(_)`;
CMAC: `rope_calibrate`, `cmac_key_mean`, `cmac_attention`, `contrastive_logits`.
Helpers: `patch_coords`, `patch_depth`, `DepthEstimator` (kvfix.depth); what DSCR's weights do:
`dscr_weight_stats`, `dscr_weight_map_png` (matplotlib).
transformers integration: `kvfix.hf`.
"""
from __future__ import annotations

import json
import os

import torch

from .depth import DepthEstimator  # transformers is imported only when an estimator is built
from .geometry import patch_coords, patch_depth
from .dscr_structured import DscrPlan, dscr_plan
from .dscr_diagnostics import DscrWeightStats, dscr_weight_map_png, dscr_weight_stats
from .ops import (cmac_attention, cmac_key_mean, contrastive_logits, dscr_refine, dscr_refine_cache_, kvsmooth_step_,
                  kvsmooth_steps_, rope_calibrate, row_entropy, scr_redistribute, scr_redistribute_, scr_scores)

__version__ = "0.1.0"
__all__ = ["DepthEstimator", "DscrPlan", "DscrWeightStats", "build_info", "cmac_attention", "cmac_key_mean",
           "contrastive_logits",
           "dscr_plan", "dscr_refine", "dscr_refine_cache_", "dscr_weight_map_png", "dscr_weight_stats",
           "kvsmooth_step_", "kvsmooth_steps_", "patch_coords", "patch_depth",
           "rope_calibrate", "row_entropy", "scr_redistribute", "scr_redistribute_", "scr_scores"]


def build_info() -> dict:
    """What this kvfix was built with and what it can run now.

    Keys: version, devices (kernels compiled in: "cpu", "cuda"), cuda_archs, built_with_torch,
    built_with_torch_cuda, nvcc, cuda_reason (why CUDA was or was not built), cpu_clones (the
    x86-64 targets the CPU kernels were compiled for: the loader runs the best one the CPU
    has; built with KVFIX_CPU_NO_AVX512=1 there is no "x86-64-v4"), torch (running version),
    cuda_available (a GPU is usable now).
    """
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        info = {"devices": ["cpu"], "cuda_archs": [], "cuda_reason": "unknown (no _build_info.json)"}
    info.update(version=__version__, torch=torch.__version__,
                cuda_available=torch.cuda.is_available() and "cuda" in info.get("devices", []))
    return info
