"""SCR (METHODS §3): `scr_scores`, `scr_redistribute`, `scr_redistribute_`.

Every check of the SCR ops is stated once, in C++ (scr_scores_check / scr_redistribute_check in
csrc/ops/scr.cpp), run by the CPU, CUDA and Meta kernels; the wrappers below convert arguments.
"""
from __future__ import annotations

import torch

from ._common import _as_int, _as_real, _check_built_for, _check_pair, _check_scale, _check_tensors

__all__ = ["scr_scores", "scr_redistribute", "scr_redistribute_"]


def scr_scores(q: torch.Tensor, k: torch.Tensor, image_span, *, scale: float | None = None,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """SCR diagnostic scores (METHODS §3): attention mass each image key receives, [B, N] float32.

    Args:
        q: [B, Hq, Tq, D] queries (after RoPE), float32/float16/bfloat16, contiguous last dim
            (e.g. the text tokens after the image).
        k: [B, Hkv, T, D] keys, same dtype, any strides with a contiguous last dim (a cache
            slice); Hq must be a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        image_span: (start, end) ints, 0 <= start <= end <= T: the image's key columns, N = end - start.
        scale: logit scale, default 1 / sqrt(D).
        mask: None, bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, T] (the
            4-D mask transformers' SDPA receives); False / -inf keys take no part.
        causal: query i sits at position T - Tq + i (bottom-right aligned, a cached prefix before
            it) and sees keys <= its position; needs Tq <= T.

    Returns:
        scores[b, j] = mean over query heads of sum over the Tq rows of p[b, h, i, start + j], with
        p = softmax(q k^T * scale + mask) over ALL T keys of the row (choice: the sum over queries,
        the "attention mass"; divide by Tq for a mean). Rows without any key contribute 0.
        Computed in float32 without materialising a [Tq, T] matrix per head.

    Non-finite input follows softmax (the reference, CPU and CUDA alike): a nan or +inf logit of
    a key that takes part (nan / inf in q or k, nan or +inf in an additive mask) makes its row's
    probabilities nan in every column, also where it is the row's only key and when the row sees
    no image column (causal), hence that item's scores; a -inf logit takes no part, as a masked key.
    """
    _check_tensors(q=q, k=k, mask=mask)
    start, end = _check_pair(image_span, "image_span")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_built_for(q, "scr_scores")
    return torch.ops.kvfix.scr_scores.default(q, k, start, end, _check_scale(scale), mask, causal)


def _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border):
    """Argument conversion only (scores to float32 contiguous, Python ints and numbers); every
    check of the values is scr_redistribute_check in csrc/ops/scr.cpp."""
    _check_tensors(hidden=hidden, scores=scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    gh, gw = _check_pair(grid_hw, "grid_hw")
    if not isinstance(exclude_border, bool):
        raise TypeError(f"exclude_border must be a bool, got {type(exclude_border).__name__}")
    return scores.to(torch.float32).contiguous(), gh, gw, _as_int(top_k, "top_k"), _as_real(lam, "lam")


def scr_redistribute(hidden: torch.Tensor, scores: torch.Tensor, grid_hw, *, top_k: int = 32, lam: float = 1.1,
                     exclude_border: bool = True) -> torch.Tensor:
    """SCR redistribution (METHODS §3) of the visual tokens' hidden states; returns a new contiguous tensor.

    Args:
        hidden: [B, N, C] float32/float16/bfloat16, any strides with a contiguous last dim.
        scores: [B, N] floating point (used as float32), finite: on the CPU NaN and +-inf raise a
            ValueError; on CUDA the host reads nothing (no sync) and an item with a non-finite
            score gets nan in every row.
        grid_hw: (gh, gw) with gh * gw == N, tokens in row-major order over the patch grid.
        top_k (>= 0): number of sources, capped at the candidates; 0 leaves hidden unchanged.
        lam: redistribution strength, a normal float32 number > 0 (in [1.2e-38, 3.4e38]).
        exclude_border: sources only among patches off the first/last row and column (grids with
            fewer than 3 rows or columns then have none).

    Sources: the top_k highest scores among the candidates (ties: lower index first). Neighbours:
    the 8-connected grid neighbours of any source that are not sources. h'[s] = h[s] / lam;
    h'[n] = h[n] + (lam - 1) * sum of the ORIGINAL h[s] over the sources adjacent to n (fp32,
    rounded once); every other row unchanged. Deterministic.
    """
    s, gh, gw, top_k, lam = _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border)
    _check_built_for(hidden, "scr_redistribute")
    return torch.ops.kvfix.scr_redistribute.default(hidden, s, gh, gw, top_k, lam, exclude_border)


def scr_redistribute_(hidden: torch.Tensor, scores: torch.Tensor, grid_hw, *, top_k: int = 32, lam: float = 1.1,
                      exclude_border: bool = True) -> torch.Tensor:
    """In-place `scr_redistribute`: writes only the changed rows of hidden (which may be a view,
    e.g. the image span of a [B, T, C] residual stream) and returns hidden. Neighbours read the
    original source rows (copied aside first), so the result equals the out-of-place op's. hidden's
    elements must be distinct memory (no stride-0 `expand`) and must not share memory with scores
    (ValueError)."""
    s, gh, gw, top_k, lam = _scr_args(hidden, scores, grid_hw, top_k, lam, exclude_border)
    _check_built_for(hidden, "scr_redistribute_")
    torch.ops.kvfix.scr_redistribute_.default(hidden, s, gh, gw, top_k, lam, exclude_border)
    return hidden
