"""Counting what a test's code reads back to the host (a helper module of the tests, not collected)."""
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode


class CpuCalls(TorchFunctionMode):
    """Counts the `Tensor.cpu()` calls made directly in a kvfix file (`where`, e.g. "hf/images.py"):
    on a GPU model each is a device-to-host copy, a synchronisation."""

    def __init__(self, where: str):
        super().__init__()
        self.suffix, self.n = os.path.join(*where.split("/")), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and traceback.extract_stack()[-2].filename.endswith(self.suffix):
            self.n += 1
        return func(*args, **(kwargs or {}))
