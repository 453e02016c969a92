"""Python entry points of the kvfix ops, one module per method: `kvfix.ops.dscr`,
`kvfix.ops.kvsmooth`, `kvfix.ops.scr`, `kvfix.ops.cmac` (routing and argument conversion), with the
conversions they share in `kvfix.ops._common`.

The C++ library (`kvfix._C`) declares each method's ops in its own file (csrc/ops/<method>.cpp, a
`TORCH_LIBRARY_FRAGMENT(kvfix, ...)`) with their checks, Meta kernels and the registrations of
the CPU kernels (csrc/cpu/<method>*.cpp); when built, the CUDA kernels register themselves
(csrc/cuda/<method>*.cu).
Every check is stated once, in C++, and runs in the CPU, CUDA and Meta kernels alike (the Meta kernel is what
torch.compile / FakeTensor / opcheck see): bad input is a `ValueError` / `TypeError` naming the
offending argument, raised before anything is written (the in-place ops' aliasing check too). The
wrappers only convert arguments (Python / numpy ints and numbers, tuples, dtype conversions) and
refuse non-tensors.
"""
from __future__ import annotations

from .cmac import cmac_attention, cmac_key_mean, contrastive_logits, rope_calibrate
from .dscr import dscr_refine, dscr_refine_cache_
from .kvsmooth import kvsmooth_step_, kvsmooth_steps_, row_entropy
from .scr import scr_redistribute, scr_redistribute_, scr_scores

__all__ = ["dscr_refine", "dscr_refine_cache_", "row_entropy", "kvsmooth_step_", "kvsmooth_steps_", "scr_scores",
           "scr_redistribute", "scr_redistribute_", "rope_calibrate", "cmac_key_mean", "cmac_attention",
           "contrastive_logits"]
