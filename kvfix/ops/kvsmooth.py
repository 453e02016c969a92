"""KVSmooth (METHODS §2): `row_entropy`, `kvsmooth_step_`, `kvsmooth_steps_`.

Every check of these ops is stated once, in C++ (kvsmooth_check and friends in
csrc/ops/kvsmooth.cpp), and runs in the CPU, CUDA and Meta kernels alike (the Meta kernel serves
torch.compile / FakeTensor / opcheck): shapes, dtypes, devices and numbers only, no tensor value
read on the host (no .item(), no sync), so the ops stay usable inside CUDA graphs. The wrappers
below only convert arguments.
"""
from __future__ import annotations

import math

import torch

from ._common import _as_real, _check_scale, _check_tensor, _check_tensors

__all__ = ["row_entropy", "kvsmooth_step_", "kvsmooth_steps_"]


def _check_lam(lam_ref, band):
    """kvfix.hf.KVSmooth validates its settings when it is built, before any op runs: the ops
    themselves check lam_ref and band in C++ (kvsmooth_check_lam)."""
    lam_ref, band = _as_real(lam_ref, "lam_ref"), _as_real(band, "band")
    if not (math.isfinite(lam_ref) and 0.0 <= lam_ref <= 1.0):
        raise ValueError(f"lam_ref must be in [0, 1], got {lam_ref}")
    if not (math.isfinite(band) and band >= 0.0):
        raise ValueError(f"band must be finite and >= 0, got {band}")
    return lam_ref, band


def row_entropy(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each query head's attention row for a single-token query (METHODS §2 step 1).

    Args:
        q: [B, Hq, 1, D] query (after RoPE), float32/float16/bfloat16, contiguous last dim.
        k: [B, Hkv, T, D] keys, same dtype (any strides with a contiguous last dim, e.g. a
            layer of a DynamicCache or a slice of a static cache); Hq must be a multiple of Hkv
            (query head h reads kv head h // (Hq // Hkv)).
        scale: logit scale, default 1 / sqrt(D).
        mask: bool (True = attend) or additive float, broadcastable to [B, 1, 1, T]; positions
            with False or -inf take no part. A row without any position has entropy 0.

    Returns:
        [B, Hq] float32: `H = -sum p log p` of `p = softmax(q . k^T * scale + mask)`, computed in
        one streaming pass over k (online softmax, fp32 accumulation, nothing materialised).

    Non-finite input follows softmax, as the reference and SDPA (reference, CPU and CUDA alike): a
    nan or +inf logit of a position taking part (nan / inf in q or k, nan or +inf in an additive
    mask) gives that head a nan entropy, also where it is the only position; a -inf logit takes
    no part, as a masked position; a masked position takes no part whatever k holds there.
    """
    _check_tensors(q=q, k=k, mask=mask)
    return torch.ops.kvfix.row_entropy.default(q, k, _check_scale(scale), mask)


def kvsmooth_step_(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, queue: torch.Tensor, *,
                   scale: float | None = None, mask: torch.Tensor | None = None, lam_ref: float = 0.9,
                   band: float = 0.2, position: torch.Tensor | None = None) -> torch.Tensor:
    """One KVSmooth decoding step of one layer (METHODS §2), in place; returns lam [B] float32.

    Fused: entropy of every query head's row (as `row_entropy`), z = mean over query heads;
    push z onto each item's queue (FIFO, oldest first, drops the oldest; NaN = empty slot);
    rank = k / M with k = #{entries <= z} (the 1-based rank of z, which counts itself; equal
    values count, empty slots never do; M = queue capacity, also while the queue fills: the
    paper's k / M);
    lam = clamp(clamp(rank, lam_ref - band, lam_ref + band), 0, 1); then, in place,
    `k_cache[:, :, T-1] = (1 - lam) k_cache[:, :, T-1] + lam k_cache[:, :, T-2]` and the same for
    v_cache, all kv heads, per batch item (fp32 arithmetic, rounded once).

    Args:
        q: [B, Hq, 1, D] the step's query (after RoPE).
        k_cache, v_cache: [B, Hkv, T, D] the layer's cache with the current token at T - 1 (any
            strides with a contiguous last dim); modified in place. They must not share memory
            with themselves (no stride-0 `expand`), each other, queue, q or mask (ValueError).
        queue: float32 [B, M] per-item state, modified in place; start from
            `torch.full((B, 15), float("nan"))`.
        scale, mask: as in `row_entropy`. With T == 1, or where the mask excludes position
            T - 2, nothing is smoothed and lam is 0 for that item (z is still pushed).
        lam_ref: centre of the allowed band, in [0, 1] (paper: 0.9 LLaVA-1.5, 0.5 MiniGPT-4,
            0.7 InstructBLIP); band: half width, >= 0.
        position: the current token's cache position p as one int64 on q's device (e.g.
            transformers' `cache_position` while decoding), for a static cache of capacity T whose
            filled length the kernel reads from device memory: the step then acts as on the views
            `[:, :, :p + 1]` of k_cache, v_cache and the mask (positions after p take no part,
            position p is smoothed from p - 1), so one captured CUDA graph serves every step.
            None: p = T - 1. A p outside [0, T): ValueError on the CPU; on CUDA (no host read)
            that step's lam is nan, nan is pushed onto every queue and no cache position is written.

    Non-finite input: the entropies follow `row_entropy`'s rule; a nan z (a nan entropy in any
    query head) is pushed (an empty slot from then on) and has no rank, so lam = nan and the EMA
    writes nan into position T - 1 of that item's k_cache and v_cache (the step's attention is
    nan anyway); non-finite values at positions T - 2 / T - 1 go through the EMA's arithmetic
    (inf * 0 = nan at lam = 1); lam = 0 (T == 1, T - 2 masked) writes nothing.

    No host synchronisation: inputs are validated from their metadata only, so bad input raises
    a ValueError / TypeError naming the argument before anything is written. On CUDA the step is
    two kernel launches on the current stream (split-T streaming pass, then combine + queue +
    EMA) with a small workspace from the caching allocator, and all state is in `queue`; so it
    can be captured in a CUDA graph:

        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):                   # warm up once on a side stream first
            lam = kvfix.kvsmooth_step_(q, k_view, v_view, queue, mask=mask)
        ...                                         # write the next q / k / v / mask in place
        g.replay()                                  # lam, the caches and queue update in place

    A replay reuses the captured pointers, shapes and scalars. Over a static cache give the
    position from device memory: capture `kvsmooth_step_(q, k_static, v_static, queue,
    position=pos)` once and write the next position into `pos` (in place) before each replay;
    without it a replay smooths position T - 1 of the captured views, so a cache whose length
    grows needs one graph per length.
    """
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, queue=queue, mask=mask)
    if position is not None:
        _check_tensor(position, "position")
    return torch.ops.kvfix.kvsmooth_step_.default(q, k_cache, v_cache, queue, _check_scale(scale), mask,
                                                  _as_real(lam_ref, "lam_ref"), _as_real(band, "band"), position)


def kvsmooth_steps_(qs, k_caches, v_caches, queues, *, scales=None, masks=None, lam_ref: float = 0.9,
                    band: float = 0.2) -> torch.Tensor:
    """Several layers' KVSmooth steps in one call: `kvsmooth_step_(qs[i], k_caches[i], v_caches[i],
    queues[i], scale=scales[i], mask=masks[i], lam_ref=lam_ref, band=band)` for every i, in order,
    with the same results; returns lam [L, B] float32 (row i: layer i's).

    One dispatch from Python for all layers (kvfix.hf.KVSmooth issues one per decoded token,
    after the forward: docs/HOST.md). Every layer's arguments are checked, and the caches and
    queues of all layers for aliasing, before any layer is written; an error names the layer. On
    CUDA, consecutive layers of one shape (sizes, strides, dtype, scale and the same mask tensor,
    as a model's layers are) run as one pair of kernel launches, up to 64 layers a pair, the layer
    the grid's second index: bit for bit what one pair per layer gives. No host synchronisation.

    Args:
        qs, k_caches, v_caches, queues: sequences with one entry per layer (at least one), as
            `kvsmooth_step_` takes them; the layers' shapes and dtypes may differ, their batch
            size B and device may not.
        scales: one logit scale per layer (None: 1 / sqrt(D) for every layer).
        masks: one mask or None per layer (None: no mask anywhere).
        lam_ref, band: as in `kvsmooth_step_`, for every layer.
    """
    qs, k_caches, v_caches, queues = list(qs), list(k_caches), list(v_caches), list(queues)
    if not qs:
        raise ValueError("kvsmooth_steps_: needs at least one layer")
    for name, xs in (("qs", qs), ("k_caches", k_caches), ("v_caches", v_caches), ("queues", queues)):
        for i, x in enumerate(xs):
            _check_tensor(x, f"{name}[{i}]")
    masks = [None] * len(qs) if masks is None else list(masks)
    for i, m in enumerate(masks):
        if m is not None:
            _check_tensor(m, f"masks[{i}]")
    scales = [None] * len(qs) if scales is None else list(scales)
    for i, s in enumerate(scales):  # None: the default of layer i (the op checks the list lengths)
        s = _check_scale(s)
        if s is None:
            D = qs[i].shape[-1] if i < len(qs) and qs[i].dim() == 4 else 0
            s = 1.0 / math.sqrt(D) if D > 0 else 1.0
        scales[i] = s
    return torch.ops.kvfix.kvsmooth_steps_.default(qs, k_caches, v_caches, queues, scales, masks,
                                                   _as_real(lam_ref, "lam_ref"), _as_real(band, "band"))
