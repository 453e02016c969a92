"""The specification (docs/METHODS.md) in plain PyTorch.

Every CPU and CUDA kernel of kvfix is tested against these functions. They are written for
clarity, not speed: they materialise the full N x N proximity matrix. They run in the dtype
of their inputs (float64 gives the ground truth the kernels are measured against), except
that depth and coordinates are used in the dtype of `k`.
"""
from __future__ import annotations

import torch

__all__ = ["dscr_weights", "dscr_refine", "dscr_refine_lowrank", "DSCR_EXP_CUTOFF"]

# A proximity term exp(x) with x below this counts as 0, in every backend: float32 leaves its
# normal range there (exp(-87) ~ 1.6e-38), so all implementations agree on when a column sum is
# 0 and a token keeps its own key (METHODS §1 "c_j == 0 after underflow"), float64 included.
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
    """Column-normalised DSCR weights `w[b, i, j]` (METHODS §1), shape [B, N, N].

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
    """DSCR refinement of the visual tokens' keys (and values), METHODS §1.

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



def dscr_refine_lowrank(k: torch.Tensor, v: torch.Tensor | None, lr: torch.Tensor, rr: torch.Tensor,
                        lc: torch.Tensor, rc: torch.Tensor, u: torch.Tensor, cinv: torch.Tensor):
    """Structured DSCR with given factors (kvfix/dscr_structured.py), materialised N x N.

    The weight matrix is `F[j, i] = (lr rr^T)[a_j, a_i] (lc rc^T)[w_j, w_i] + (u u^T)[j, i]`
    (token j at grid row a_j = j // gw, column w_j = j % gw); `k_hat_j = (sum_i F[j, i] k_i - 2 k_j)
    * cinv_j`, and tokens with cinv_j == 0 keep k_j. lr, rr: [gh, pr]; lc, rc: [gw, pc];
    u: [Bd, N, r]; cinv: [Bd, N] (Bd 1 or B). Runs in the dtype of k.
    """
    B, H, N, D = k.shape
    dt = k.dtype
    f = lambda t: t.to(dt)  # noqa: E731
    spatial = torch.kron(f(lr) @ f(rr).T, f(lc) @ f(rc).T)              # [N, N]
    F = (spatial[None] + f(u) @ f(u).transpose(1, 2)).expand(B, N, N)  # [B, N, N]
    ci = f(cinv).expand(B, N)[:, None, :, None]                         # [B, 1, N, 1]

    def apply(x):
        y = (torch.einsum("bji,bhid->bhjd", F, x) - 2 * x) * ci
        return torch.where(ci > 0, y, x)

    return apply(k), (None if v is None else apply(v))

# ---------------------------------------------------------------------------------------------
# KVSmooth (METHODS §2)
#
# Choices made here (documented defaults of the whole project):
# - mask: bool (True = attend) or additive float, broadcastable to [B, 1, 1, T]. A position
#   takes no part in the softmax when the bool mask is False or the additive value is -inf;
#   finite additive values (also transformers' `finfo.min` padding) are added to the logits.
# - a row with no position taking part has entropy 0.
# - the queue is float32 [B, M], oldest entry first; NaN marks an empty slot (a fresh queue is all
#   NaN). A push shifts every entry one slot towards index 0 (dropping entry 0) and writes z at
#   index M - 1. rank = k / M, the paper's coefficient: k = #{entries <= z} is the 1-based rank
#   of z among the queued values (z, pushed first, counts itself; equal values count), M is the
#   capacity, also while the queue fills (the paper's formula), so a partly filled queue gives
#   small ranks. Empty (NaN) slots never count.
# - the EMA needs position T - 2: with T == 1, or when the mask excludes position T - 2 (a padded
#   slot), nothing is smoothed and the returned lam is 0 for that item. z is pushed either way.
# - non-finite input propagates, as softmax (and SDPA) do: a nan or +inf logit of a position
#   taking part (nan / inf in q or k, nan or +inf in an additive mask) gives that query head a nan
#   entropy; a -inf logit takes no part, as a masked position (a row of -inf logits has entropy
#   0); a masked position takes no part whatever k holds there. The step: a nan z (a nan entropy
#   in any head) is pushed (an empty slot from then on) and gives lam = nan, so the EMA writes nan
#   into position T - 1 of K and V; otherwise non-finite cache values at T - 2 / T - 1 go through
#   the EMA's arithmetic (inf * 0 = nan). lam = 0 (T == 1, T - 2 masked) writes nothing.

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
    """Entropy of each query head's softmax row, METHODS §2 step 1, materialised: [B, Hq].

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
    any_part = (logits != float("-inf")).any(dim=-1)                   # [B, Hq] (a nan logit takes part)
    logits = torch.where(any_part[..., None], logits, torch.zeros_like(logits))
    p = torch.softmax(logits, dim=-1)                                   # nan rows: a nan or +inf logit
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    h = torch.where(p.isnan().any(dim=-1), torch.full((), float("nan"), dtype=q.dtype, device=q.device),
                    -plogp.sum(dim=-1))
    return torch.where(any_part, h, torch.zeros_like(h))


def kvsmooth_queue(queue: torch.Tensor, z: torch.Tensor, *, lam_ref: float = 0.9, band: float = 0.2):
    """METHODS §2 steps 2-3 for one step: (lam [B] float32, new queue [B, M] float32).

    Pushes z (rounded to float32) onto each item's FIFO (oldest first, NaN = empty), then
    lam = clamp(clamp(k / M, lam_ref - band, lam_ref + band), 0, 1) with k = #{entries <= z}
    (the 1-based rank of z, z included; NaN slots never count) and M the queue capacity; a NaN z
    has no rank: lam = NaN. `queue` is not modified.
    """
    z32 = z.to(torch.float32)
    new = torch.cat([queue[:, 1:], z32[:, None]], dim=1)
    M = queue.shape[1]
    rank = (new <= z32[:, None]).sum(dim=1).to(torch.float32) / M
    lam = rank.clamp(lam_ref - band, lam_ref + band).clamp(0.0, 1.0)
    return torch.where(z32.isnan(), z32, lam), new


def kvsmooth_ema(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """METHODS §2 step 4 on a copy: x[:, :, T-1] = (1 - lam) x[:, :, T-1] + lam x[:, :, T-2] per item,
    computed in float64 when x is float64, else in float32 and rounded once to x's dtype. Items
    with lam == 0 are left as they are (not even 0 * a non-finite x[:, :, T-2] is added)."""
    out = x.clone()
    if x.shape[2] < 2:
        return out
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    lam = lam.to(ct)[:, None, None]
    last, prev = x[:, :, -1].to(ct), x[:, :, -2].to(ct)
    out[:, :, -1] = torch.where(lam == 0, x[:, :, -1], ((1 - lam) * last + lam * prev).to(x.dtype))
    return out


def kvsmooth_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, queue: torch.Tensor, *,
                  scale: float | None = None, mask: torch.Tensor | None = None, lam_ref: float = 0.9,
                  band: float = 0.2, entropy_dtype: torch.dtype | None = None, position=None):
    """One KVSmooth decoding step (METHODS §2), functional: (lam [B] float32, k, v, queue) with new
    tensors for the smoothed caches and the pushed queue; the inputs are not modified.

    The entropy runs in `entropy_dtype` (default float64: the ground truth), z = its mean over
    query heads. lam is 0 for items that are not smoothed (T == 1, position T - 2 masked).
    position: the current token's cache position p (an int or a one-element tensor; None: T - 1):
    the step on the first p + 1 positions of the caches and the mask, the later ones unchanged.
    """
    if position is not None:
        p, T = int(position), k_cache.shape[2]
        if not 0 <= p < T:
            raise ValueError(f"position {p} is outside the cache's positions [0, {T})")
        if mask is not None and mask.shape[-1] == T:
            mask = mask[..., :p + 1]
        lam, k, v, new_queue = kvsmooth_step(q, k_cache[:, :, :p + 1], v_cache[:, :, :p + 1], queue, scale=scale,
                                             mask=mask, lam_ref=lam_ref, band=band, entropy_dtype=entropy_dtype)
        return (lam, torch.cat([k, k_cache[:, :, p + 1:]], dim=2), torch.cat([v, v_cache[:, :, p + 1:]], dim=2),
                new_queue)
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
# SCR (METHODS §3)
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
    """SCR diagnostic scores (METHODS §3), materialised: [B, N] in the dtype of q.

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
    """SCR redistribution (METHODS §3) on a copy, in the dtype of hidden ([B, N, C]).

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


# ---------------------------------------------------------------------------------------------
# CMAC (METHODS §4)
#
# Choices made here (documented defaults, docs/CMAC.md):
# - image spans: (start, end) ints shared by the batch, or an int64 tensor [B, 2] of per-item
#   spans of one length N (left padding shifts the span per item). Key t is an image key of item
#   b when start_b <= t < end_b.
# - queries are bottom-right aligned: query i sits at cache position T - Tq + i; it is an
#   "after-image" query when that position is >= end_b. The calibrated segment is (after-image
#   query, image key); every other pair uses the plain key.
# - mu_P (IMD threshold, per batch item) is the mean of the segment's logits scale * q . k_cal
#   over query heads, the call's after-image queries and image keys, before any mask is added;
#   a call without after-image queries has no segment, and IMD changes nothing.
# - mask: bool (True = attend) or additive float broadcastable to [B, Hq, Tq, T]; False or
#   -inf removes a pair, finite values are added to the logits. A row where no key takes part
#   returns zeros.
# - positions (RoPE) are integers. CMPC compresses the image toward its END, next to the text
#   (the authors' construction): with a the RoPE position of the first token after the span, the
#   calibrated position of an image key at p is a - (a - p) / gamma, i.e. the key is rotated by
#   (1 - 1 / gamma) (a - p) inv_freq[f] per frequency f, so an after-image query at q sees image
#   key p at distance (q - a) + (a - p) / gamma. Multi-section RoPE: a is taken per section
#   (that section's position of the first token after the image). Where the span ends the
#   sequence (no token after it in k), a = (position of the span's last token) + 1 per section.
#   The angle is computed in float32 or better (float64 for float64 keys), whatever k's dtype.

__all__ += ["image_spans", "rope_calibrate", "cmac_key_mean", "cmac_attention", "contrastive_logits"]


def image_spans(image_span, B: int, device=None):
    """(start [B], end [B]) int64 tensors of an image span given as (start, end) or a [B, 2] tensor."""
    if isinstance(image_span, torch.Tensor):
        sp = image_span.to(device=device, dtype=torch.int64).expand(B, 2)
        return sp[:, 0], sp[:, 1]
    s, e = image_span
    return (torch.full((B,), int(s), dtype=torch.int64, device=device),
            torch.full((B,), int(e), dtype=torch.int64, device=device))


def _rope_sections(mrope_section, half: int, device):
    """Section index of each of the D/2 frequencies: zeros for 1-D RoPE."""
    if mrope_section is None:
        return torch.zeros(half, dtype=torch.int64, device=device)
    sizes = torch.tensor(list(mrope_section), dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)


def rope_calibrate(k: torch.Tensor, image_span, inv_freq: torch.Tensor, *, gamma: float = 3.0,
                   positions: torch.Tensor | None = None, mrope_section=None,
                   num_tokens: int | None = None) -> torch.Tensor:
    """CMPC calibrated image keys (METHODS §4), [B, H, N, D] in k's dtype.

    Key t of the span [s, e) gets the rotation by delta = (1 - 1 / gamma) (a - p) per frequency,
    p its RoPE position and a the position of the first token after the span (index e; per RoPE
    section for multi-section RoPE; positions None means p = t and a = e): the calibrated
    position a - (a - p) / gamma compresses the image toward its end. The angle is computed in
    float32 (float64 for float64 keys), the rotation in k's dtype. rotate_half convention:
    frequency f pairs dims f and f + D/2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    B, H, T, D = k.shape
    half = D // 2
    st, en = image_spans(image_span, B, k.device)
    N = int(num_tokens) if num_tokens is not None else int(en[0] - st[0])
    if positions is None:
        pos = torch.arange(T, device=k.device).expand(1, B, T)
    elif positions.dim() == 2:
        pos = positions[None]
    else:
        pos = positions
    pos = pos.to(torch.int64)
    S = pos.shape[0]
    sec = _rope_sections(mrope_section, half, k.device)
    sec = sec.clamp(max=S - 1)  # 1-D positions serve every section
    idx = st[:, None] + torch.arange(N, device=k.device)                        # [B, N]
    p = torch.gather(pos, 2, idx[None].expand(S, B, N))                         # [S, B, N]
    # anchor: the position of the first token after the span, or one past the span's last one
    nxt = torch.gather(pos, 2, en.clamp(max=T - 1)[None, :, None].expand(S, B, 1))
    last = torch.gather(pos, 2, (en - 1).clamp(min=0)[None, :, None].expand(S, B, 1)) + 1
    a = torch.where((en < T)[None, :, None], nxt, last)                         # [S, B, 1]
    wide = torch.float64 if k.dtype == torch.float64 else torch.float32
    delta = (a - p).to(wide) * (1.0 - 1.0 / gamma)                              # [S, B, N]
    ang = delta[sec].permute(1, 2, 0) * inv_freq.to(wide)                       # [B, N, D/2]
    cos, sin = torch.cos(ang)[:, None].to(k.dtype), torch.sin(ang)[:, None].to(k.dtype)
    x = torch.gather(k, 2, idx[:, None, :, None].expand(B, H, N, D))
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def cmac_key_mean(k_calibrated: torch.Tensor) -> torch.Tensor:
    """The mean over the N image tokens of [B, Hkv, N, D] keys: [B, Hkv, D] (float64 for float64
    keys, else float32); zeros for N = 0."""
    wide = torch.float64 if k_calibrated.dtype == torch.float64 else torch.float32
    if k_calibrated.shape[2] == 0:
        return k_calibrated.new_zeros(k_calibrated.shape[:2] + k_calibrated.shape[3:], dtype=wide)
    return k_calibrated.to(wide).mean(dim=2)


def cmac_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_span, *,
                   k_calibrated: torch.Tensor | None = None, scale: float | None = None,
                   mask: torch.Tensor | None = None, causal: bool = True, imd=False,
                   value_mean: str = "scalar", k_calibrated_mean: torch.Tensor | None = None) -> torch.Tensor:
    """CMAC attention (METHODS §4: CMPC logits, IMD values), materialised: [B, Hq, Tq, D].

    q [B, Hq, Tq, D], k, v [B, Hkv, T, D] (query head h reads kv head h // (Hq // Hkv)),
    k_calibrated [B, Hkv, N, D] (the image keys at calibrated positions, e.g. `rope_calibrate`;
    None: no calibration). imd: bool or bool tensor [B]. value_mean: "scalar" (mean over image
    tokens and head dim, as the authors' code) or "vector" (over tokens only, as the paper).
    k_calibrated_mean: None (mu_P is the mean of the segment's logits, formed here), or [B, Hkv,
    D], the caller's mean of the segment's image keys: mu_P = scale * sum over query heads h and
    after-image queries r of q[b, h, r] . k_calibrated_mean[b, kv(h)] / (Hq * rows), which equals
    the mean of the logits (by linearity) when the argument is that mean.
    Runs in q's dtype (float64 gives the ground truth); see the module notes for the choices.
    """
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dt = q.dtype
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    st, en = image_spans(image_span, B, dev)
    qpos = torch.arange(T - Tq, T, device=dev)
    kpos = torch.arange(T, device=dev)
    kk = k.to(dt)
    inimg = (kpos[None] >= st[:, None]) & (kpos[None] < en[:, None])              # [B, T]
    after = qpos[None] >= en[:, None]                                             # [B, Tq]
    seg = after[:, None, :, None] & inimg[:, None, None, :]                       # [B, 1, Tq, T]
    logits = torch.einsum("bhqd,bhtd->bhqt", q, kk.repeat_interleave(g, 1)) * scale
    if k_calibrated is not None:
        kc = kk.clone()
        N = k_calibrated.shape[2]
        for b in range(B):
            s = int(st[b])
            kc[b, :, s:s + N] = k_calibrated[b].to(dt)
        cal = torch.einsum("bhqd,bhtd->bhqt", q, kc.repeat_interleave(g, 1)) * scale
        logits = torch.where(seg, cal, logits)
    valid = torch.ones(B, Hq, Tq, T, dtype=torch.bool, device=dev)
    bias = torch.zeros((), dtype=dt, device=dev)
    if causal:
        valid = valid & (kpos[None, :] <= qpos[:, None])
    if mask is not None:
        m = mask.expand(B, Hq, Tq, T)
        if m.dtype == torch.bool:
            valid = valid & m
        else:
            valid = valid & (m != float("-inf"))
            bias = torch.where(m != float("-inf"), m.to(dt), torch.zeros((), dtype=dt, device=dev))
    scores = torch.where(valid, logits + bias, torch.full((), float("-inf"), dtype=dt, device=dev))
    any_valid = valid.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(any_valid, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(valid, probs, torch.zeros_like(probs))
    vv = v.to(dt).repeat_interleave(g, 1)                                         # [B, Hq, T, D]
    if isinstance(imd, torch.Tensor):
        imd_b = imd.to(device=dev, dtype=torch.bool).expand(B)
    else:
        imd_b = torch.full((B,), bool(imd), dtype=torch.bool, device=dev)
    segh = seg.expand(B, Hq, Tq, T)
    count = segh.sum(dim=(1, 2, 3)).to(dt)                                        # [B]
    if k_calibrated_mean is None:
        mu_p = torch.where(segh, logits, torch.zeros_like(logits)).sum(dim=(1, 2, 3)) / count.clamp(min=1)
    else:
        km = k_calibrated_mean.to(dt).repeat_interleave(g, 1)                     # [B, Hq, D]
        qa = torch.where(after[:, None, :, None], q, torch.zeros((), dtype=dt, device=dev))
        rows = after.sum(dim=1).to(dt)                                            # [B]
        mu_p = torch.einsum("bhqd,bhd->b", qa, km) * scale / (rows * Hq).clamp(min=1)
    hit = segh & (logits > mu_p[:, None, None, None]) & imd_b[:, None, None, None]
    n_img = (en - st).clamp(min=1).to(dt)[:, None, None]
    # where, not a product with a 0/1 weight: a non-finite value outside the image must not reach mu_V
    mu_v = torch.where(inimg[:, None, :, None], vv, torch.zeros((), dtype=dt, device=dev)).sum(dim=2) / n_img
    if value_mean == "scalar":
        mu_v = mu_v.mean(dim=-1, keepdim=True).expand(B, Hq, D)
    p_hit = torch.where(hit, probs, torch.zeros_like(probs))
    return (probs - p_hit) @ vv + p_hit.sum(-1, keepdim=True) * mu_v[:, :, None, :]


def contrastive_logits(logits: torch.Tensor, logits_distorted: torch.Tensor, *, alpha: float = 3.0,
                       beta: float = 0.2) -> torch.Tensor:
    """Contrastive decoding (METHODS §4): (1 + alpha) l - alpha l~ on the plausible set
    {y : log p(y) >= log beta + max log p}, p = softmax(l) of the original branch; -inf elsewhere.
    log p(y) - max log p = l_y - max l, so the cut needs the row maximum only. In l's dtype,
    computed as l + alpha (l - l~) (the same value without cancelling two terms of size alpha |l|).
    Non-finite rule: a row whose l holds nan or +inf has no softmax (torch.softmax gives nan):
    all nan."""
    keep = logits - logits.amax(dim=-1, keepdim=True) >= math.log(beta)
    out = logits + alpha * (logits - logits_distorted.to(logits.dtype))
    out = torch.where(keep, out, torch.full((), float("-inf"), dtype=out.dtype, device=out.device))
    bad = (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1, keepdim=True)
    return torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
