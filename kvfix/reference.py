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


# ---------------------------------------------------------------------------------------------
# KVSmooth (SPEC §2)
#
# Choices made here (documented defaults of the whole project):
# - mask: bool (True = attend) or additive float, broadcastable to [B, 1, 1, T]. A position
#   takes no part in the softmax when the bool mask is False or the additive value is -inf;
#   finite additive values (also transformers' `finfo.min` padding) are added to the logits.
# - a row with no position taking part has entropy 0.
# - the queue is float32 [B, M], oldest entry first; NaN marks an empty slot (a fresh queue is all
#   NaN). A push shifts every entry one slot towards index 0 (dropping entry 0) and writes z at
#   index M - 1. rank = #{entries < z} / M with M the capacity: the new z itself and empty
#   (NaN) slots never count, so a partly filled queue gives small ranks.
# - the EMA needs position T - 2: with T == 1, or when the mask excludes position T - 2 (a padded
#   slot), nothing is smoothed and the returned lam is 0 for that item. z is pushed either way.

import math  # noqa: E402

__all__ += ["key_mask", "row_entropy", "kvsmooth_queue", "kvsmooth_ema", "kvsmooth_step"]


def key_mask(mask: torch.Tensor | None, B: int, T: int, dtype: torch.dtype, device=None):
    """(bias [B, T] in `dtype`, valid [B, T] bool) of a key mask broadcastable to [B, 1, 1, T]."""
    if mask is None:
        return (torch.zeros(B, T, dtype=dtype, device=device), torch.ones(B, T, dtype=torch.bool, device=device))
    m = mask.expand(B, 1, 1, T)[:, 0, 0, :]
    if m.dtype == torch.bool:
        return torch.zeros(B, T, dtype=dtype, device=m.device), m.clone()
    valid = m != float("-inf")
    return torch.where(valid, m.to(dtype), torch.zeros((), dtype=dtype, device=m.device)), valid


def row_entropy(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each query head's softmax row, SPEC §2 step 1, materialised: [B, Hq].

    q [B, Hq, 1, D], k [B, Hkv, T, D] (query head h reads kv head h // (Hq // Hkv)).
    `p = softmax(q . k^T * scale + mask)`, `H = -sum p log p` over the positions taking part
    (0 * log 0 = 0). Runs in the dtype of q (float64 gives the ground truth); returns that dtype.
    """
    B, Hq, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.to(q.dtype).repeat_interleave(Hq // Hkv, dim=1)               # [B, Hq, T, D]
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0, :], kk) * scale  # [B, Hq, T]
    bias, valid = key_mask(mask, B, T, q.dtype, q.device)
    logits = torch.where(valid[:, None, :], logits + bias[:, None, :],
                         torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    any_valid = valid.any(dim=-1)[:, None]                              # [B, 1]
    logits = torch.where(any_valid[..., None], logits, torch.zeros_like(logits))
    p = torch.softmax(logits, dim=-1)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    h = -plogp.sum(dim=-1)
    return torch.where(any_valid, h, torch.zeros_like(h))


def kvsmooth_queue(queue: torch.Tensor, z: torch.Tensor, *, lam_ref: float = 0.9, band: float = 0.2):
    """SPEC §2 steps 2-3 for one step: (lam [B] float32, new queue [B, M] float32).

    Pushes z (rounded to float32) onto each item's FIFO (oldest first, NaN = empty), then
    lam = clamp(clamp(#{entries < z} / M, lam_ref - band, lam_ref + band), 0, 1). `queue` is
    not modified.
    """
    z32 = z.to(torch.float32)
    new = torch.cat([queue[:, 1:], z32[:, None]], dim=1)
    M = queue.shape[1]
    rank = (new < z32[:, None]).sum(dim=1).to(torch.float32) / M
    lam = rank.clamp(lam_ref - band, lam_ref + band).clamp(0.0, 1.0)
    return lam, new


def kvsmooth_ema(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SPEC §2 step 4 on a copy: x[:, :, T-1] = (1 - lam) x[:, :, T-1] + lam x[:, :, T-2] per item,
    computed in float64 when x is float64, else in float32 and rounded once to x's dtype."""
    out = x.clone()
    if x.shape[2] < 2:
        return out
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    lam = lam.to(ct)[:, None, None]
    last, prev = x[:, :, -1].to(ct), x[:, :, -2].to(ct)
    out[:, :, -1] = ((1 - lam) * last + lam * prev).to(x.dtype)
    return out


def kvsmooth_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, queue: torch.Tensor, *,
                  scale: float | None = None, mask: torch.Tensor | None = None, lam_ref: float = 0.9,
                  band: float = 0.2, entropy_dtype: torch.dtype | None = None):
    """One KVSmooth decoding step (SPEC §2), functional: (lam [B] float32, k, v, queue) with new
    tensors for the smoothed caches and the pushed queue; the inputs are not modified.

    The entropy runs in `entropy_dtype` (default float64: the ground truth), z = its mean over
    query heads. lam is 0 for items that are not smoothed (T == 1, position T - 2 masked).
    """
    et = torch.float64 if entropy_dtype is None else entropy_dtype
    B, T = k_cache.shape[0], k_cache.shape[2]
    z = row_entropy(q.to(et), k_cache.to(et), scale=scale, mask=mask).mean(dim=1)
    lam, new_queue = kvsmooth_queue(queue, z, lam_ref=lam_ref, band=band)
    if T >= 2:
        _, valid = key_mask(mask, B, T, torch.float32, k_cache.device)
        lam = torch.where(valid[:, T - 2], lam, torch.zeros_like(lam))
    else:
        lam = torch.zeros_like(lam)
    return lam, kvsmooth_ema(k_cache, lam), kvsmooth_ema(v_cache, lam), new_queue


# ---------------------------------------------------------------------------------------------
# SCR (SPEC §3)
#
# Choices made here (documented defaults of the whole project, docs/SCR.md):
# - scr_scores: the attention mass of image column j is the sum over the Tq query rows of the
#   softmax probabilities p[i, j] (not their mean), averaged over the query heads. Rows are
#   normalised over all T keys before the image columns are read; a key takes no part when the
#   bool mask is False, the additive mask is -inf, or (causal) it lies after the query's
#   position T - Tq + i. A row with no key taking part contributes 0.
# - scr_redistribute: the border (first/last row and column) is excluded from the sources when
#   exclude_border, so grids with fewer than 3 rows or columns have no source and stay unchanged.
#   Scores must be finite (NaN and +-inf are rejected by the ops).

__all__ += ["scr_scores", "scr_sources", "scr_redistribute"]


def _scr_valid_bias(mask, causal: bool, B: int, Hq: int, Tq: int, T: int, dtype, device):
    """(bias [B, Hq, Tq, T] in `dtype`, valid [B, Hq, Tq, T] bool) of a mask broadcastable to
    [B, Hq, Tq, T] and the bottom-right aligned causal rule."""
    if mask is None:
        bias = torch.zeros(B, Hq, Tq, T, dtype=dtype, device=device)
        valid = torch.ones(B, Hq, Tq, T, dtype=torch.bool, device=device)
    else:
        m = mask.expand(B, Hq, Tq, T)
        if m.dtype == torch.bool:
            bias, valid = torch.zeros(B, Hq, Tq, T, dtype=dtype, device=device), m.clone()
        else:
            valid = m != float("-inf")
            bias = torch.where(valid, m.to(dtype), torch.zeros((), dtype=dtype, device=device))
    if causal:
        pos = torch.arange(Tq, device=device)[:, None] + (T - Tq)        # query i sits at T - Tq + i
        valid = valid & (torch.arange(T, device=device)[None, :] <= pos)
    return bias, valid


def scr_scores(q: torch.Tensor, k: torch.Tensor, image_span, *, scale: float | None = None,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """SCR diagnostic scores (SPEC §3), materialised: [B, N] in the dtype of q.

    q [B, Hq, Tq, D], k [B, Hkv, T, D] (query head h reads kv head h // (Hq // Hkv)),
    image_span (start, end) with N = end - start. p = softmax(q k^T * scale + mask) over all T
    keys per query row; scores[b, j] = mean over heads of sum over rows of p[b, h, i, start + j].
    Runs in the dtype of q (float64 gives the ground truth).
    """
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    start, end = image_span
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.to(q.dtype).repeat_interleave(Hq // Hkv, dim=1)                 # [B, Hq, T, D]
    logits = torch.einsum("bhid,bhtd->bhit", q, kk) * scale                # [B, Hq, Tq, T]
    bias, valid = _scr_valid_bias(mask, causal, B, Hq, Tq, T, q.dtype, q.device)
    neg = torch.full((), float("-inf"), dtype=q.dtype, device=q.device)
    logits = torch.where(valid, logits + bias, neg)
    any_valid = valid.any(dim=-1, keepdim=True)                              # [B, Hq, Tq, 1]
    p = torch.softmax(torch.where(any_valid, logits, torch.zeros_like(logits)), dim=-1)
    p = torch.where(any_valid, p, torch.zeros_like(p))
    return p[..., start:end].sum(dim=2).mean(dim=1)


def scr_sources(scores: torch.Tensor, grid_hw, *, top_k: int = 32, exclude_border: bool = True) -> torch.Tensor:
    """Source mask [B, N] bool: the top_k highest scores among the candidate patches (all, or the
    non-border ones when exclude_border); ties: lower index first; top_k capped at the candidates."""
    gh, gw = grid_hw
    B, N = scores.shape
    r = torch.arange(N, device=scores.device) // gw
    c = torch.arange(N, device=scores.device) % gw
    cand = torch.ones(N, dtype=torch.bool, device=scores.device)
    if exclude_border:
        cand = (r > 0) & (r < gh - 1) & (c > 0) & (c < gw - 1)
    idx = cand.nonzero().flatten()
    src = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    kk = min(top_k, idx.numel())
    if kk > 0:
        order = torch.sort(scores[:, idx], dim=1, descending=True, stable=True).indices[:, :kk]
        src.scatter_(1, idx[order], True)
    return src


def scr_redistribute(hidden: torch.Tensor, scores: torch.Tensor, grid_hw, *, top_k: int = 32, lam: float = 1.1,
                     exclude_border: bool = True) -> torch.Tensor:
    """SCR redistribution (SPEC §3) on a copy, in the dtype of hidden ([B, N, C]).

    h'[s] = h[s] / lam for sources; h'[n] = h[n] + (lam - 1) * sum of the ORIGINAL h[s] over the
    sources s 8-adjacent to n, for the non-source neighbours n; everything else unchanged.
    """
    gh, gw = grid_hw
    B, N, C = hidden.shape
    src = scr_sources(scores, grid_hw, top_k=top_k, exclude_border=exclude_border)     # [B, N]
    r = torch.arange(N, device=hidden.device) // gw
    c = torch.arange(N, device=hidden.device) % gw
    adj = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    adj &= ~torch.eye(N, dtype=torch.bool, device=hidden.device)                        # [N, N]: 8-neighbours
    # a[b, n, s] = 1 where s is a source adjacent to the non-source n
    a = adj[None] & src[:, None, :] & ~src[:, :, None]
    gathered = torch.einsum("bns,bsc->bnc", a.to(hidden.dtype), hidden)
    nb = a.any(dim=2)[..., None]
    out = torch.where(nb, hidden + (lam - 1) * gathered, hidden)
    return torch.where(src[..., None], hidden / lam, out)
