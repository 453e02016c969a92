"""CMAC (METHODS §4): calibrated image keys (CMPC, `rope_calibrate`), their mean for IMD's
threshold (`cmac_key_mean`), attention with IMD (`cmac_attention`), contrastive logits
(`contrastive_logits`).

Image spans travel to the kernels as two ints (one span for the batch) or an int64 tensor
[B, 2] read on the device (per-item spans; no host read). Every check of rope_calibrate,
cmac_attention and contrastive_logits is stated once, in C++ (cmac_check_rope,
cmac_check_attention, cmac_check_contrastive in csrc/ops/cmac.cpp), run by the CPU, CUDA and Meta
kernels; the wrappers below convert arguments. The one host read here: rope_calibrate's token
count N from a tensor image_span without num_tokens (the output's size, which the op takes).
"""
from __future__ import annotations

import torch

from ._common import _as_int, _as_real, _check_built_for, _check_scale, _check_tensor, _check_tensors

__all__ = ["rope_calibrate", "cmac_key_mean", "cmac_attention", "contrastive_logits"]

_VALUE_MEANS = {"scalar": 0, "vector": 1}


def _span_arg(image_span):
    """-> (start, end, spans tensor or None): (start, end) ints, or a tensor [B, 2] as int64
    (int32 converted) contiguous. Shapes, dtype, device and ranges: cmac_check_spans in C++ (the
    values of a CPU tensor there too; a CUDA tensor's are read by the kernels only, clamped to
    [0, T])."""
    if isinstance(image_span, torch.Tensor):
        sp = image_span.to(torch.int64) if image_span.dtype == torch.int32 else image_span
        return 0, 0, sp.contiguous()
    if not isinstance(image_span, (tuple, list)) or len(image_span) != 2:
        raise TypeError(f"image_span must be (start, end) ints or an int64 tensor [B, 2], got {image_span!r}")
    s, e = (_as_int(x, "image_span") for x in image_span)
    return s, e, None


def rope_calibrate(k: torch.Tensor, image_span, inv_freq: torch.Tensor, *, gamma: float = 3.0,
                   positions: torch.Tensor | None = None, mrope_section=None,
                   num_tokens: int | None = None) -> torch.Tensor:
    """CMPC: the image keys re-rotated to calibrated positions (METHODS §4). Returns [B, Hkv, N, D].

    Args:
        k: [B, Hkv, T, D] post-RoPE keys (e.g. a layer's cache; any strides with a contiguous
            last dim), float32/float16/bfloat16; D even.
        image_span: (start, end) cache indices shared by the batch (N = end - start), or an
            int64 tensor [B, 2] of per-item spans of one length N on k's device (left padding
            shifts spans per item). A CUDA tensor is read on the device only; its spans must be
            in range (the kernel clamps reads to [0, T); out-of-range tokens come out as 0).
        inv_freq: [D/2] float32, the model's rotary inverse frequencies (e.g.
            `model.language_model.rotary_emb.inv_freq`), on k's device.
        gamma: calibration strength, > 0 (1: keys unchanged up to rounding; the authors use 3);
            ValueError where (1 - 1/gamma) T overflows float32 (gamma below ~T / 3.4e38).
        positions: None (RoPE position = cache index), [B, T] (1-D RoPE) or [S, B, T]
            (multi-section RoPE, S = len(mrope_section)) integer RoPE positions of the keys.
        mrope_section: section sizes of the D/2 frequencies (Qwen2-VL: [16, 24, 24] -> t, h, w),
            summing to D/2. None: 1-D RoPE.
        num_tokens: N for a tensor image_span; None reads it from the tensor (one host read).

    CMPC compresses the image toward its end, next to the text, as the authors' code does: for
    key t with RoPE position p and a the position of the first token after the span (index
    end; per section for multi-section RoPE, i.e. that section's position of the token after
    the image; where the span ends at T, one past the span's last position), the calibrated
    position is a - (a - p) / gamma, so the key is rotated by delta = (1 - 1 / gamma) (a - p)
    radians times inv_freq[f] for each frequency f, and an after-image query at q sees image key
    p at distance (q - a) + (a - p) / gamma. rotate_half convention of Llama / Qwen2-VL:
    frequency f pairs dims f and f + D/2, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). fp32
    arithmetic, output in k's dtype, a new contiguous tensor.
    """
    _check_tensors(k=k, inv_freq=inv_freq)
    start, end, spans = _span_arg(image_span)
    if spans is None:
        n = end - start
    elif num_tokens is not None:
        n = _as_int(num_tokens, "num_tokens")
    elif spans.dim() == 2 and spans.shape[0] >= 1 and spans.shape[1] == 2:
        n = int(spans[0, 1] - spans[0, 0])  # one host read: N is the output's size
    else:
        n = 0  # a wrongly shaped image_span: C++ says so
    sections = None
    if mrope_section is not None:
        if isinstance(mrope_section, torch.Tensor) or not isinstance(mrope_section, (list, tuple)):
            raise TypeError(f"mrope_section must be a list of ints, got {mrope_section!r}")
        sections = [_as_int(x, f"mrope_section[{i}]") for i, x in enumerate(mrope_section)]
    if positions is not None:
        _check_tensor(positions, "positions")
        if positions.dtype == torch.int32:
            positions = positions.to(torch.int64)
        if positions.dim() == 2:  # [B, T]: one row
            positions = positions.unsqueeze(0)
        positions = positions.contiguous()
    _check_built_for(k, "rope_calibrate")
    return torch.ops.kvfix.rope_calibrate.default(k, start, end, spans, n, inv_freq, _as_real(gamma, "gamma"),
                                                  positions, sections)


def cmac_key_mean(k_calibrated: torch.Tensor) -> torch.Tensor:
    """The mean image key that IMD's threshold needs: [B, Hkv, N, D] -> [B, Hkv, D] float32.

    k_calibrated: the image keys at calibrated positions (`rope_calibrate`'s output; or the image
    keys `k[:, :, s:e]` where no calibration is used), float32/float16/bfloat16. The mean over the
    N tokens, accumulated in float32 (ATen's reduction; zeros for N = 0), a new contiguous tensor
    on k_calibrated's device. The calibrated keys do not change between decode steps: compute it
    once per image and layer, next to `rope_calibrate`, and pass it to every `cmac_attention`
    call as `k_calibrated_mean=`, which then reads no image key for the threshold. No host
    synchronisation.
    """
    _check_tensor(k_calibrated, "k_calibrated")
    if k_calibrated.dim() != 4:
        raise ValueError(f"cmac_key_mean: k_calibrated must be [B, Hkv, N, D], got shape {tuple(k_calibrated.shape)}")
    if k_calibrated.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cmac_key_mean: k_calibrated must be float32, float16 or bfloat16, got {k_calibrated.dtype}")
    B, H, N, D = k_calibrated.shape
    if N == 0:
        return k_calibrated.new_zeros((B, H, D), dtype=torch.float32)
    return k_calibrated.mean(dim=2, dtype=torch.float32).contiguous()


def cmac_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_span, *,
                   k_calibrated: torch.Tensor | None = None, scale: float | None = None,
                   mask: torch.Tensor | None = None, causal: bool = True, imd=False,
                   value_mean: str = "scalar", k_calibrated_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with CMAC's calibrated image keys and, optionally, IMD (METHODS §4). [B, Hq, Tq, D].

    Args:
        q: [B, Hq, Tq, D] queries (after RoPE); k, v: [B, Hkv, T, D] keys and values (GQA: query
            head h reads kv head h // (Hq // Hkv)); float32/float16/bfloat16, any strides with a
            contiguous last dim (a layer of a cache works without a copy). Queries are
            bottom-right aligned: query i sits at cache position T - Tq + i (prefill: Tq = T;
            decode: Tq = 1).
        image_span: (start, end) cache indices, or an int64 tensor [B, 2] of per-item spans
            (read on the device). Query i is "after the image" when T - Tq + i >= end.
        k_calibrated: [B, Hkv, N, D] image keys at calibrated positions (`rope_calibrate`);
            pairs (after-image query, image key) use them instead of k. None: plain keys.
        scale: logit scale, default 1 / sqrt(D).
        mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, T] (what SDPA
            gets, e.g. padding). False / -inf removes a pair; a row without any key returns 0.
        causal: mask keys after the query's position.
        imd: bool, or bool tensor [B] (per item: one batched call can run the original and the
            distorted branch). On an item, mu_P = the mean of the calibrated segment's logits
            (scale * q . k_cal, before masking) over query heads, this call's after-image
            queries and image keys; pairs of the segment with logit > mu_P take the value mu_V
            instead of v. Softmax normalisation is unchanged.
        value_mean: mu_V = mean of the kv head's image values over tokens and head dim
            ("scalar", the authors' code) or over tokens only ("vector", the paper).
        k_calibrated_mean: None, or [B, Hkv, D] float32 (any layout; made contiguous): the mean
            over the span of the image keys the segment uses (k_calibrated's, or k's image keys
            without it), as `cmac_key_mean` computes it once per image and layer. With it mu_P is
            a dot product of the after-image queries' sum with the mean (no image key is read
            for the threshold; CUDA decode launches no threshold kernel); without it the op
            computes the mean itself on every call. Used only where IMD is on.

    One streaming pass per query block (online softmax, fp32 accumulation; the [Tq, T] matrix is
    never stored). Output in q's dtype, a new contiguous tensor. No host synchronisation.

    Non-finite input follows softmax(P) @ V, as the reference and SDPA's math path (reference, CPU
    and CUDA alike): a nan or +inf logit of a key the row sees (nan / inf in q, k, k_calibrated, or
    nan in an additive mask) makes the whole output row nan; a -inf logit takes no part, as a
    masked key; a nan / inf value of a key the row sees reaches the dims it touches. Whether a
    non-finite value of a key the row cannot see (masked, causal) reaches it is not specified.
    """
    _check_tensors(q=q, k=k, v=v, mask=mask)
    if k_calibrated is not None:
        _check_tensor(k_calibrated, "k_calibrated")
    if k_calibrated_mean is not None:
        _check_tensor(k_calibrated_mean, "k_calibrated_mean")
        k_calibrated_mean = k_calibrated_mean.contiguous()  # shape, dtype, device: checked in C++
    start, end, spans = _span_arg(image_span)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    imd_items = None
    if isinstance(imd, torch.Tensor):
        imd_items, imd = imd.contiguous(), True
    elif not isinstance(imd, bool):
        raise TypeError(f"imd must be a bool or a bool tensor [B], got {type(imd).__name__}")
    if value_mean not in _VALUE_MEANS:
        raise ValueError(f"value_mean must be 'scalar' or 'vector', got {value_mean!r}")
    _check_built_for(q, "cmac_attention")
    return torch.ops.kvfix.cmac_attention.default(q, k, v, start, end, spans, k_calibrated, _check_scale(scale),
                                                  mask, causal, imd, imd_items, _VALUE_MEANS[value_mean],
                                                  k_calibrated_mean)


def contrastive_logits(logits: torch.Tensor, logits_distorted: torch.Tensor, *, alpha: float = 3.0,
                       beta: float = 0.2) -> torch.Tensor:
    """Contrastive decoding logits (METHODS §4): `(1 + alpha) l - alpha l~` on the plausible set
    `{y : log p(y) >= log beta + max log p}` (p = softmax of the ORIGINAL branch's logits l,
    so the test is `l_y - max l >= log beta`), -inf elsewhere.

    logits, logits_distorted: [..., V] float32/float16/bfloat16, same shape, dtype and device
    (any layout). alpha in [0, 3.4e38] (finite in float32), beta in (0, 1]. One fused pass per
    row (row max, then the combination, computed as `l + alpha (l - l~)`: no cancellation of two
    terms of size alpha |l|), fp32 arithmetic, output [..., V] in the input dtype; a value past
    the dtype's range is +-inf. Non-finite input (the rule of softmax, which this op thresholds):
    a row whose `logits` hold nan or +inf has no softmax and comes out all nan; -inf logits are
    never plausible; a nan or inf in `logits_distorted` propagates to its own token where that
    token is plausible.
    """
    _check_tensors(logits=logits, logits_distorted=logits_distorted)
    alpha, beta = _as_real(alpha, "alpha"), _as_real(beta, "beta")  # their ranges: checked in C++
    _check_built_for(logits, "contrastive_logits")
    return torch.ops.kvfix.contrastive_logits.default(logits, logits_distorted, alpha, beta)
