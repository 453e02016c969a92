"""The specification (shared/SPEC.md) in plain PyTorch.

Every CPU and CUDA kernel of kvfix is tested against these functions. They are written for
clarity, not speed: they materialise the full N x N proximity matrix. They run in the dtype
of their inputs (float64 gives the ground truth the kernels are measured against), except
that depth and coordinates are used in the dtype of `k`.
"""
from __future__ import annotations

import torch

__all__ = ["dscr_weights", "dscr_refine", "DSCR_EXP_CUTOFF"]

# A proximity term exp(x) with x below this counts as 0, in every backend: float32 leaves its
# normal range there (exp(-87) ~ 1.6e-38), so all implementations agree on when a column sum is
# 0 and a token keeps its own key (SPEC §1 "c_j == 0 after underflow"), float64 included.
DSCR_EXP_CUTOFF = -87.0


def _exp_cut(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < DSCR_EXP_CUTOFF, torch.zeros_like(x), torch.exp(x))


def _as_batched(x: torch.Tensor, batch: int, trailing: int) -> torch.Tensor:
    """[N, *t] -> [B, N, *t] (broadcast); [B, N, *t] unchanged."""
    if x.dim() == 1 + trailing:
        x = x.unsqueeze(0)
    return x.expand(batch, *x.shape[1:])


def dscr_weights(depth: torch.Tensor, coords: torch.Tensor, *, sigma_d: float = 0.6,
                 sigma_s: float = 0.6, alpha: float = 0.6, beta: float = 0.8,
                 batch: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Column-normalised DSCR weights `w[b, i, j]` (SPEC §1), shape [B, N, N].

    wt[i, j] = exp(-alpha (d_i - d_j)^2 / (2 sigma_d^2)) + exp(-beta |s_i - s_j|^2 / (2 sigma_s^2)),
    wt[j, j] = 0, w[i, j] = wt[i, j] / sum_i wt[i, j]. A term whose exponent is below
    DSCR_EXP_CUTOFF counts as 0. A column whose sum is 0 (N == 1, or underflow) is returned as
    all zeros; `dscr_refine` keeps such tokens unchanged. `batch` defaults to depth's batch.
    """
    if batch is None:
        batch = depth.shape[0] if depth.dim() == 2 else 1
    d = _as_batched(depth, batch, 0).to(dtype)
    s = _as_batched(coords, batch, 1).to(dtype)
    dd = (d[:, :, None] - d[:, None, :]) ** 2
    ss = ((s[:, :, None, :] - s[:, None, :, :]) ** 2).sum(-1)
    wt = _exp_cut(-alpha * dd / (2 * sigma_d ** 2)) + _exp_cut(-beta * ss / (2 * sigma_s ** 2))
    n = wt.shape[-1]
    wt = wt * (1 - torch.eye(n, dtype=dtype, device=wt.device))
    c = wt.sum(dim=1, keepdim=True)  # column sums c_j, [B, 1, N]
    return torch.where(c > 0, wt / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(wt))


def dscr_refine(k: torch.Tensor, v: torch.Tensor | None, depth: torch.Tensor, coords: torch.Tensor,
                *, sigma_d: float = 0.6, sigma_s: float = 0.6, alpha: float = 0.6, beta: float = 0.8):
    """DSCR refinement of the visual tokens' keys (and values), SPEC §1.

    k, v: [B, H, N, D]; depth: [B, N] or [N]; coords: [B, N, 2] or [N, 2].
    Returns (k_hat, v_hat) with k_hat[b, h, j] = sum_i w[b, i, j] k[b, h, i]; v_hat is None
    when v is None. Tokens whose column sum is 0 (N == 1, underflow) are kept as they are.
    Arithmetic runs in the dtype of `k` (pass float64 for the ground truth).
    """
    B, H, N, D = k.shape
    if N == 0:
        return k.clone(), (None if v is None else v.clone())
    w = dscr_weights(depth, coords, sigma_d=sigma_d, sigma_s=sigma_s, alpha=alpha, beta=beta,
                     batch=B, dtype=k.dtype)
    keep = (w.sum(dim=1) == 0)[:, None, :, None]  # [B, 1, N, 1]: columns with no weight

    def apply(x):
        y = torch.einsum("bij,bhid->bhjd", w, x)
        return torch.where(keep, x, y)

    return apply(k), (None if v is None else apply(v))
