"""Argument conversion shared by the op modules (kvfix.ops.<method>): Python / numpy ints and
numbers, tensors refused when something else is expected. Every check of the values is the C++
op's (csrc/ops/<method>.cpp)."""
from __future__ import annotations

import operator

import torch

from .. import _C  # noqa: F401  (registers torch.ops.kvfix.*)


def _check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_tensors(**xs) -> None:
    """TypeError naming the first argument that is not a tensor (None allowed for mask)."""
    for name, x in xs.items():
        if not (name == "mask" and x is None):
            _check_tensor(x, name)


def _as_int(value, name: str) -> int:
    """An int or a numpy integer (anything with __index__), not a bool, not a tensor (reading a
    tensor's value would synchronise)."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _as_real(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _check_scale(scale):
    """scale as the ops take it (float or None): a TypeError for anything else (bool included);
    its value (finite) is checked in C++."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return float(scale)


def _check_pair(value, name: str) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of ints, got {value!r}")
    return _as_int(value[0], f"{name}[0]"), _as_int(value[1], f"{name}[1]")


def _check_built_for(x: torch.Tensor, op: str) -> None:
    """A CUDA tensor given to a kvfix built without CUDA kernels: say why, not the dispatcher's
    'could not run ... with arguments from the CUDA backend'."""
    if x.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvfix::{op}", "CUDA"):
        from .. import build_info
        raise RuntimeError(f"kvfix was built without CUDA kernels ({build_info().get('cuda_reason')}); "
                           "rebuild it where nvcc matches torch's CUDA: pip install --no-build-isolation .")
