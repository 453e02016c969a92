"""Bad input, op by op (issue 15): each case asserts the exception type, that the message names the
offending argument, and that the in-place targets are unchanged (bit for bit, NaN included).

Axes: wrong rank, shape, dtype, device (meta vs cpu), NaN / inf, empty, strides, aliasing (the
in-place ops: stride-0 `expand`, the same view twice, outputs overlapping inputs), out-of-range
parameters, and integer-like parameters that must be accepted (numpy integers). CPU only, tiny
tensors: the whole file runs in a few seconds. Non-finite *values* follow one rule per op (see
test_nonfinite_rules below and the ops' docstrings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

import kvfix
from kvfix import reference as R

NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    id: str
    call: Callable[[], object]           # runs the op
    exc: type                            # expected exception type
    names: str                           # the argument the message must name
    targets: list = field(default_factory=list)  # in-place targets that must stay unchanged


def _kv(B=1, H=2, N=16, D=8):
    return torch.randn(B, H, N, D)


def _dscr_cases():
    k, v, d, c = _kv(), _kv(), torch.rand(16), kvfix.patch_coords(4, 4)
    big = torch.randn(1, 2, 16, 16)
    cases = [
        Case("rank", lambda: kvfix.dscr_refine(k[0], None, d, c), ValueError, "k"),
        Case("shape_v", lambda: kvfix.dscr_refine(k, v[:, :1], d, c), ValueError, "v"),
        Case("dtype", lambda: kvfix.dscr_refine(k.double(), None, d, c), TypeError, "k"),
        Case("dtype_depth", lambda: kvfix.dscr_refine(k, None, d > 0.5, c), TypeError, "depth"),
        Case("device", lambda: kvfix.dscr_refine(k, v.to("meta"), d, c), ValueError, "v"),
        Case("nan_depth", lambda: kvfix.dscr_refine(k, None, d.clone().fill_(NAN), c), ValueError, "depth"),
        Case("inf_depth_grid", lambda: kvfix.dscr_refine(k, None, torch.full((16,), INF), (4, 4)), ValueError, "depth"),
        Case("depth_len", lambda: kvfix.dscr_refine(k, None, d[:15], c), ValueError, "depth"),
        Case("strides", lambda: kvfix.dscr_refine(k.transpose(2, 3), None, torch.rand(8), c[:8]), ValueError, "k"),
        Case("sigma", lambda: kvfix.dscr_refine(k, None, d, c, sigma_d=1e-30), ValueError, "sigma_d"),
        Case("alpha_neg", lambda: kvfix.dscr_refine(k, None, d, c, alpha=-1.0), ValueError, "alpha"),
        Case("grid_mismatch", lambda: kvfix.dscr_refine(k, None, d, (4, 5)), ValueError, "coords"),
        Case("grid_bool", lambda: kvfix.dscr_refine(k, None, d, (True, 16)), ValueError, "coords"),
        Case("grid_meta", lambda: kvfix.dscr_refine(k.to("meta"), None, d.to("meta"), (4, 4)), ValueError, "depth"),
        Case("method", lambda: kvfix.dscr_refine(k, None, d, c, method="fast"), ValueError, "method"),
        Case("dtype_v", lambda: kvfix.dscr_refine(k, v.half(), d, c), TypeError, "v"),
        Case("coords_shape", lambda: kvfix.dscr_refine(k, None, d, c[:, :1]), ValueError, "coords"),
        Case("coords_dtype", lambda: kvfix.dscr_refine(k, None, d, c.long()), TypeError, "coords"),
        Case("coords_nan", lambda: kvfix.dscr_refine(k, None, d, c.clone().fill_(NAN)), ValueError, "coords"),
        Case("coords_type", lambda: kvfix.dscr_refine(k, None, d, "4x4"), TypeError, "coords"),
        Case("beta_neg", lambda: kvfix.dscr_refine(k, None, d, c, beta=-0.1), ValueError, "beta"),
        Case("sigma_s_nan", lambda: kvfix.dscr_refine(k, None, d, c, sigma_s=NAN), ValueError, "sigma_s"),
        Case("grid_unit", lambda: kvfix.dscr_refine(k, None, d, (4, 4), grid_unit="pixel"), ValueError, "grid_unit"),
        Case("structured_tensor_coords", lambda: kvfix.dscr_refine(k, None, d, c, method="structured"), ValueError,
             "coords"),
    ]
    # dscr_refine_cache_: aliasing and validation before anything is written
    k1, k2, v1 = _kv(), _kv(), _kv()
    cases += [
        Case("cache_same_view_twice", lambda: kvfix.dscr_refine_cache_([k1, k1], None, d, (4, 4)),
             ValueError, "keys[1]", [k1]),
        Case("cache_keys_are_values", lambda: kvfix.dscr_refine_cache_([k1], [k1], d, c), ValueError, "values[0]",
             [k1]),
        Case("cache_overlapping_views", lambda: kvfix.dscr_refine_cache_([big[..., :8]], [big[..., 4:12]], d, c),
             ValueError, "values[0]", [big]),
        Case("cache_expand", lambda: kvfix.dscr_refine_cache_([k2[:, :1].expand(1, 2, 16, 8)], None, d, (4, 4)),
             ValueError, "keys[0]", [k2]),
        Case("cache_bad_second_layer", lambda: kvfix.dscr_refine_cache_([k1, k2.half()], [v1, v1], d, c),
             ValueError, "values[1]", [k1, k2, v1]),
        Case("cache_values_len", lambda: kvfix.dscr_refine_cache_([k1, k2], [v1], d, c), ValueError, "values",
             [k1, k2, v1]),
        Case("cache_nan_depth", lambda: kvfix.dscr_refine_cache_([k1], [v1], torch.full((16,), NAN), c),
             ValueError, "depth", [k1, v1]),
        Case("cache_not_list", lambda: kvfix.dscr_refine_cache_(k1, None, d, c), TypeError, "keys", [k1]),
        Case("cache_empty_list", lambda: kvfix.dscr_refine_cache_([], None, d, c), TypeError, "keys"),
        Case("cache_rank", lambda: kvfix.dscr_refine_cache_([k1[0]], None, d, c), ValueError, "keys[0]", [k1]),
        Case("cache_dtype", lambda: kvfix.dscr_refine_cache_([k1, k2.double()], None, d, c), TypeError, "keys[1]",
             [k1, k2]),
        Case("cache_strides", lambda: kvfix.dscr_refine_cache_([k1, k2.transpose(2, 3)], None, d, c), ValueError,
             "keys[1]", [k1, k2]),
        Case("cache_layer_n", lambda: kvfix.dscr_refine_cache_([k1, k2[:, :, :8]], None, d, c), ValueError, "keys[1]",
             [k1, k2]),
        Case("cache_meta_depth", lambda: kvfix.dscr_refine_cache_([k1], None, d.to("meta"), c), ValueError, "depth",
             [k1]),
        Case("cache_sigma", lambda: kvfix.dscr_refine_cache_([k1], [v1], d, c, sigma_s=0.0), ValueError, "sigma_s",
             [k1, v1]),
        Case("cache_values_type", lambda: kvfix.dscr_refine_cache_([k1], v1, d, c), TypeError, "values", [k1, v1]),
        Case("cache_value_overlaps_earlier_key", lambda: kvfix.dscr_refine_cache_([k1, k2], [v1, k1], d, c),
             ValueError, "values[1]", [k1, k2, v1]),
    ]
    # depth that IS a key's memory (float32 view): rejected (the CUDA kernel reads depth while writing)
    kd = torch.randn(1, 1, 16, 1)
    cases.append(Case("cache_depth_is_key_memory", lambda: kvfix.dscr_refine_cache_([kd], None, kd.view(16), c[:, :]),
                      ValueError, "depth", [kd]))
    return cases


def _grid_cases():
    """The grid form coords=(gh, gw): checked in C++ (dscr_check_grid) before the plan reads depth."""
    k, v, d = _kv(), _kv(), torch.rand(16)
    k1, k2, v1 = _kv(), _kv(), _kv()
    return [
        Case("grid_dtype", lambda: kvfix.dscr_refine(k.double(), None, d, (4, 4)), TypeError, "k"),
        Case("grid_strides_v", lambda: kvfix.dscr_refine(k, torch.randn(1, 2, 8, 16).transpose(2, 3), d, (4, 4)),
             ValueError, "v"),
        Case("grid_depth_len", lambda: kvfix.dscr_refine(k, None, d[:15], (4, 4)), ValueError, "depth"),
        Case("grid_depth_device", lambda: kvfix.dscr_refine(k, None, d.to("meta"), (4, 4)), ValueError, "depth"),
        Case("grid_depth_int", lambda: kvfix.dscr_refine(k, None, torch.arange(16), (4, 4)), TypeError, "depth"),
        Case("grid_sigma", lambda: kvfix.dscr_refine(k, None, d, (4, 4), sigma_d=1e-30), ValueError, "sigma_d"),
        Case("grid_cache_values_len", lambda: kvfix.dscr_refine_cache_([k1, k2], [v1], d, (4, 4)), ValueError,
             "values", [k1, k2, v1]),
        Case("grid_cache_layer_n", lambda: kvfix.dscr_refine_cache_([k1, k2[:, :, :8]], None, d, (4, 4)), ValueError,
             "keys[1]", [k1, k2]),
        Case("grid_cache_beta", lambda: kvfix.dscr_refine_cache_([k1], [v1], d, (4, 4), beta=-1.0), ValueError,
             "beta", [k1, v1]),
    ]


def _structured_cases():
    """The structured ops called directly (torch.ops.kvfix.*): every check in C++, by the CPU and
    Meta kernels alike."""
    from kvfix import dscr_structured as S
    d = torch.rand(1, 16)
    plan = kvfix.dscr_plan(4, 4, d, method="structured")
    fa = list((d,) + S.spatial_factors(plan, sigma_s=0.6, beta=0.8, device="cpu") + S.depth_args(plan, 0.6, 0.6))
    _, st = S._plan_checked(4, 4, d, 0.6, 0.6, 0.6, 0.8, torch.float32, "structured", "patch", "cpu")
    ba = list(st.args())
    lowrank, lowrank_ = torch.ops.kvfix.dscr_refine_lowrank, torch.ops.kvfix.dscr_refine_lowrank_cache_
    ban, ban_ = torch.ops.kvfix.dscr_refine_banded, torch.ops.kvfix.dscr_refine_banded_cache_
    k, v = _kv(), _kv()
    k1, k2, v1, k3 = _kv(), _kv(), _kv(), _kv()

    def w(args, i, x):  # args with argument i replaced
        args = list(args)
        args[i] = x
        return args

    return [
        Case("lowrank_rank", lambda: lowrank(k[0], None, *fa), ValueError, "k"),
        Case("lowrank_dtype_v", lambda: lowrank(k, v.half(), *fa), TypeError, "v"),
        Case("lowrank_lr_dtype", lambda: lowrank(k, v, *w(fa, 1, fa[1].double())), TypeError, "lr"),
        Case("lowrank_rr_shape", lambda: lowrank(k, v, *w(fa, 2, fa[2][:1])), ValueError, "rr"),
        Case("lowrank_lc_strides", lambda: lowrank(k, v, *w(fa, 3, fa[3].repeat(1, 2)[:, ::2])), ValueError, "lc"),
        Case("lowrank_grid", lambda: lowrank(k[:, :, :12], None, *w(fa, 0, d[:, :12])), ValueError, "lr, lc"),
        Case("lowrank_depth_shape", lambda: lowrank(k, None, *w(fa, 0, d[:, :8])), ValueError, "depth"),
        Case("lowrank_depth_device", lambda: lowrank(k, None, *w(fa, 0, d.to("meta"))), ValueError, "depth"),
        Case("lowrank_coef_d", lambda: lowrank(k, None, *w(fa, 5, NAN)), ValueError, "coef_d"),
        Case("lowrank_rank_d", lambda: lowrank(k, None, *w(fa, 6, 0)), ValueError, "rank_d"),
        Case("lowrank_cache_values_len", lambda: lowrank_([k1, k2], [v1], *fa), ValueError, "values", [k1, k2, v1]),
        Case("lowrank_cache_layer_dtype", lambda: lowrank_([k1, k2.double()], [], *fa), TypeError, "keys[1]", [k1, k2]),
        Case("lowrank_cache_same_view_twice", lambda: lowrank_([k1, k1], [], *fa), ValueError, "keys[1]", [k1]),
        Case("lowrank_cache_rc_dtype", lambda: lowrank_([k1], [v1], *w(fa, 4, fa[4].half())), TypeError, "rc", [k1, v1]),
        Case("ban_rank", lambda: ban(k[0], None, *ba), ValueError, "k"),
        Case("ban_shape_v", lambda: ban(k, v[:, :, :8], *ba), ValueError, "v"),
        Case("ban_strides", lambda: ban(k.transpose(2, 3), None, *ba), ValueError, "k"),
        Case("ban_gh", lambda: ban(k, None, *w(ba, 9, 3)), ValueError, "gh"),
        Case("ban_tok_range", lambda: ban(k, None, *w(ba, 0, st.tok + 1000)), ValueError, "tok"),
        Case("ban_tokw_dtype", lambda: ban(k, None, *w(ba, 1, st.tokw.double())), TypeError, "tokw"),
        Case("ban_cinv_shape", lambda: ban(k, None, *w(ba, 7, st.cinv[:, :8].contiguous())), ValueError, "cinv"),
        Case("ban_row_ptr_len", lambda: ban(k, None, *w(ba, 3, st.row_ptr[:-1])), ValueError, "row_ptr"),
        Case("ban_node_off_device", lambda: ban(k, None, *w(ba, 6, st.node_off.to("meta"))), ValueError, "node_off"),
        Case("ban_band_rank", lambda: ban(k, None, *w(ba, 8, st.band[None])), ValueError, "band"),
        Case("ban_cache_cnt", lambda: ban_([k1], [], *w(ba, 2, st.cnt * 0)), ValueError, "cnt", [k1]),
        Case("ban_cache_expand", lambda: ban_([k3[:, :1].expand(1, 2, 16, 8)], [], *ba), ValueError, "keys[0]", [k3]),
        Case("ban_cache_keys_are_values", lambda: ban_([k1], [k1], *ba), ValueError, "values[0]", [k1]),
        Case("ban_cache_layer_n", lambda: ban_([k1, k2[:, :, :8]], [], *ba), ValueError, "keys[1]", [k1, k2]),
    ]


def _plan_cases():
    return [
        Case("plan_depth_len", lambda: kvfix.dscr_plan(4, 4, torch.rand(15)), ValueError, "depth"),
        Case("plan_negative_range", lambda: kvfix.dscr_plan(4, 4, -1.0), ValueError, "depth"),
        Case("plan_string", lambda: kvfix.dscr_plan(4, 4, "0.5"), TypeError, "depth"),
        Case("plan_int_depth", lambda: kvfix.dscr_plan(4, 4, torch.arange(16)), TypeError, "depth"),
        Case("plan_meta", lambda: kvfix.dscr_plan(4, 4, torch.rand(16, device="meta")), ValueError, "depth"),
        Case("plan_grid", lambda: kvfix.dscr_plan(0, 4, 0.5), ValueError, "gh, gw"),
        Case("plan_dtype", lambda: kvfix.dscr_plan(4, 4, 0.5, dtype=torch.int8), TypeError, "dtype"),
    ]


def _geometry_cases():
    return [
        Case("coords_int32", lambda: kvfix.patch_coords(4, 4, dtype=torch.int32), TypeError, "dtype"),
        Case("coords_zero", lambda: kvfix.patch_coords(0, 4), ValueError, "gh"),
        Case("coords_float", lambda: kvfix.patch_coords(4.0, 4), ValueError, "gh"),
        Case("depth_rank", lambda: kvfix.patch_depth(torch.rand(8), 2, 2), ValueError, "depth_map"),
        Case("depth_empty", lambda: kvfix.patch_depth(torch.rand(0, 8), 2, 2), ValueError, "depth_map"),
        Case("depth_nan", lambda: kvfix.patch_depth(torch.full((4, 4), NAN), 2, 2), ValueError, "depth_map"),
        Case("depth_bool", lambda: kvfix.patch_depth(torch.rand(4, 4) > 0.5, 2, 2), TypeError, "depth_map"),
        Case("depth_complex", lambda: kvfix.patch_depth(torch.rand(4, 4, dtype=torch.complex64), 2, 2), TypeError,
             "depth_map"),
        Case("depth_meta", lambda: kvfix.patch_depth(torch.rand(4, 4, device="meta"), 2, 2), ValueError, "depth_map"),
    ]


def _kvsmooth_cases():
    q, kc, vc = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    queue = torch.full((1, 15), NAN)
    base = torch.randn(1, 1, 10, 8)
    t = [kc, vc, queue]
    kc2, vc2, queue2 = kc.clone(), vc.clone(), queue.clone()
    t2 = [kc2, vc2, queue2]
    return [
        Case("entropy_rank", lambda: kvfix.row_entropy(q[0], kc), ValueError, "q"),
        Case("entropy_prefill", lambda: kvfix.row_entropy(torch.randn(1, 4, 2, 8), kc), ValueError, "q"),
        Case("entropy_dtype", lambda: kvfix.row_entropy(q, kc.half()), TypeError, "k"),
        Case("entropy_heads", lambda: kvfix.row_entropy(torch.randn(1, 3, 1, 8), kc), ValueError, "kv heads"),
        Case("entropy_empty", lambda: kvfix.row_entropy(q, kc[:, :, :0]), ValueError, "k"),
        Case("entropy_mask", lambda: kvfix.row_entropy(q, kc, mask=torch.ones(1, 9, dtype=torch.bool)), ValueError,
             "mask"),
        Case("entropy_scale", lambda: kvfix.row_entropy(q, kc, scale=INF), ValueError, "scale"),
        Case("step_v_shape", lambda: kvfix.kvsmooth_step_(q, kc, vc[:, :, :9], queue), ValueError, "v_cache", t),
        Case("step_v_device", lambda: kvfix.kvsmooth_step_(q, kc, vc.to("meta"), queue), ValueError, "v_cache", t),
        Case("step_queue_dtype", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue.double()), TypeError, "queue", t),
        Case("step_queue_shape", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue[:, :0]), ValueError, "queue", t),
        Case("step_strides", lambda: kvfix.kvsmooth_step_(q, kc, torch.randn(1, 2, 10, 16)[..., ::2], queue),
             ValueError, "v_cache", t),
        Case("step_lam_ref", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, lam_ref=1.5), ValueError, "lam_ref", t),
        Case("step_band", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, band=NAN), ValueError, "band", t),
        Case("step_alias_kv", lambda: kvfix.kvsmooth_step_(q, kc, kc, queue), ValueError, "v_cache", t),
        Case("step_expand", lambda: kvfix.kvsmooth_step_(q, base.expand(1, 2, 10, 8), vc, queue), ValueError,
             "k_cache", [base, vc, queue]),
        Case("step_queue_in_cache", lambda: kvfix.kvsmooth_step_(q, kc, vc, kc[0, 0, 8:].reshape(1, 16)[:, :15]),
             ValueError, "queue", t),
        Case("step_position_dtype", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, position=torch.tensor([3.0])),
             TypeError, "position", t),
        Case("step_position_shape", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, position=torch.tensor([[3, 4]])),
             ValueError, "position", t),
        Case("step_position_range", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, position=torch.tensor(10)),
             ValueError, "position", t),
        Case("steps_lengths", lambda: kvfix.kvsmooth_steps_([q, q], [kc, kc2], [vc], [queue, queue2]), ValueError,
             "v_cache", t + t2),
        Case("steps_layer", lambda: kvfix.kvsmooth_steps_([q, q], [kc, kc2], [vc, vc2[:, :, :9]], [queue, queue2]),
             ValueError, "layer 1", t + t2),
        Case("steps_alias", lambda: kvfix.kvsmooth_steps_([q, q], [kc, kc2], [vc, vc], [queue, queue2]), ValueError,
             "v_cache[1]", t + t2),
        Case("entropy_q_dtype", lambda: kvfix.row_entropy(q.double(), kc), TypeError, "q"),
        Case("entropy_device", lambda: kvfix.row_entropy(q, kc.to("meta")), ValueError, "k"),
        Case("entropy_strides", lambda: kvfix.row_entropy(torch.randn(1, 4, 8, 2).transpose(2, 3)[:, :, :1], kc),
             ValueError, "q"),
        Case("entropy_mask_dtype", lambda: kvfix.row_entropy(q, kc, mask=torch.ones(1, 10, dtype=torch.int32)),
             TypeError, "mask"),
        Case("entropy_not_tensor", lambda: kvfix.row_entropy(q.tolist(), kc), TypeError, "q"),
        Case("entropy_scale_type", lambda: kvfix.row_entropy(q, kc, scale="0.3"), TypeError, "scale"),
        Case("step_rank", lambda: kvfix.kvsmooth_step_(q, kc[0], vc, queue), ValueError, "k_cache", t),
        Case("step_q_dtype", lambda: kvfix.kvsmooth_step_(q.half(), kc, vc, queue), TypeError, "k_cache", t),
        Case("step_v_dtype", lambda: kvfix.kvsmooth_step_(q, kc, vc.half(), queue), TypeError, "v_cache", t),
        Case("step_mask_device", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, mask=torch.ones(10, dtype=torch.bool,
                                                                                               device="meta")),
             ValueError, "mask", t),
        Case("step_mask_shape", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, mask=torch.ones(1, 1, 2, 10)),
             ValueError, "mask", t),
        Case("step_scale_nan", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, scale=NAN), ValueError, "scale", t),
        Case("step_lam_type", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue, lam_ref="0.9"), TypeError, "lam_ref", t),
        Case("step_queue_device", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue.to("meta")), ValueError, "queue",
             t),
        Case("step_q_in_cache", lambda: kvfix.kvsmooth_step_(kc[:, :1, :4].view(1, 4, 1, 8), kc, vc, queue),
             ValueError, "q", t),
        Case("step_mask_in_queue", lambda: kvfix.kvsmooth_step_(q, kc, vc, queue,
                                                               mask=queue[:, :10].view(1, 1, 1, 10)),
             ValueError, "mask", t),
    ]


def _scr_cases():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 20, 8)
    h, s = torch.randn(1, 16, 4), torch.rand(1, 16)
    h1 = torch.randn(1, 16, 1)
    hb = torch.randn(1, 16, 1)
    return [
        Case("scores_rank", lambda: kvfix.scr_scores(q[0], k, (2, 10)), ValueError, "q"),
        Case("scores_dtype", lambda: kvfix.scr_scores(q, k.half(), (2, 10)), TypeError, "k"),
        Case("scores_device", lambda: kvfix.scr_scores(q, k.to("meta"), (2, 10)), ValueError, "k"),
        Case("scores_empty", lambda: kvfix.scr_scores(q[:, :, :0], k, (2, 10)), ValueError, "q"),
        Case("scores_span", lambda: kvfix.scr_scores(q, k, (12, 10)), ValueError, "image_span"),
        Case("scores_span_type", lambda: kvfix.scr_scores(q, k, (2.0, 10)), TypeError, "image_span"),
        Case("scores_causal", lambda: kvfix.scr_scores(torch.randn(1, 4, 21, 8), k, (2, 10), causal=True),
             ValueError, "causal"),
        Case("scores_mask", lambda: kvfix.scr_scores(q, k, (2, 10), mask=torch.ones(1, 4, 5, 19)), ValueError, "mask"),
        Case("redist_rank", lambda: kvfix.scr_redistribute(h[0], s, (4, 4)), ValueError, "hidden"),
        Case("redist_scores_shape", lambda: kvfix.scr_redistribute(h, s[:, :15], (4, 4)), ValueError, "scores"),
        Case("redist_grid", lambda: kvfix.scr_redistribute(h, s, (4, 5)), ValueError, "grid_hw"),
        Case("redist_nan_scores", lambda: kvfix.scr_redistribute_(h, torch.full((1, 16), NAN), (4, 4)), ValueError,
             "scores", [h]),
        Case("redist_top_k", lambda: kvfix.scr_redistribute_(h, s, (4, 4), top_k=-1), ValueError, "top_k", [h]),
        Case("redist_lam_zero", lambda: kvfix.scr_redistribute_(h, s, (4, 4), lam=0.0), ValueError, "lam", [h]),
        Case("redist_lam_subnormal", lambda: kvfix.scr_redistribute_(h, s, (4, 4), lam=1e-320), ValueError, "lam", [h]),
        Case("redist_lam_huge", lambda: kvfix.scr_redistribute_(h, s, (4, 4), lam=1e39), ValueError, "lam", [h]),
        Case("redist_expand", lambda: kvfix.scr_redistribute_(hb[:, :1].expand(1, 16, 1), s, (4, 4)), ValueError,
             "hidden", [hb]),
        Case("redist_scores_alias", lambda: kvfix.scr_redistribute_(h1, h1[:, :, 0], (4, 4)), ValueError, "scores",
             [h1]),
        Case("redist_border", lambda: kvfix.scr_redistribute_(h, s, (4, 4), exclude_border=1), TypeError,
             "exclude_border", [h]),
        Case("scores_heads", lambda: kvfix.scr_scores(torch.randn(1, 3, 5, 8), k, (2, 10)), ValueError, "kv heads"),
        Case("scores_strides", lambda: kvfix.scr_scores(q, torch.randn(1, 2, 8, 20).transpose(2, 3), (2, 10)),
             ValueError, "k"),
        Case("scores_mask_dtype", lambda: kvfix.scr_scores(q, k, (2, 10), mask=torch.ones(1, 20, dtype=torch.long)),
             TypeError, "mask"),
        Case("scores_mask_device", lambda: kvfix.scr_scores(q, k, (2, 10), mask=torch.ones(20, device="meta")),
             ValueError, "mask"),
        Case("scores_scale_inf", lambda: kvfix.scr_scores(q, k, (2, 10), scale=INF), ValueError, "scale"),
        Case("scores_causal_type", lambda: kvfix.scr_scores(q, k, (2, 10), causal="yes"), TypeError, "causal"),
        Case("scores_span_end", lambda: kvfix.scr_scores(q, k, (2, 21)), ValueError, "image_span"),
        Case("redist_dtype", lambda: kvfix.scr_redistribute(h.double(), s, (4, 4)), TypeError, "hidden"),
        Case("redist_scores_dtype", lambda: kvfix.scr_redistribute(h, (s * 10).long(), (4, 4)), TypeError,
             "scores"),
        Case("redist_device", lambda: kvfix.scr_redistribute(h, s.to("meta"), (4, 4)), ValueError, "scores"),
        Case("redist_empty", lambda: kvfix.scr_redistribute(h[:, :0], s[:, :0], (0, 4)), ValueError, "hidden"),
        Case("redist_strides", lambda: kvfix.scr_redistribute_(torch.randn(1, 4, 16).transpose(1, 2), s, (4, 4)),
             ValueError, "hidden"),
        Case("redist_inf_scores", lambda: kvfix.scr_redistribute_(h, torch.full((1, 16), -INF), (4, 4)), ValueError,
             "scores", [h]),
        Case("redist_grid_type", lambda: kvfix.scr_redistribute_(h, s, (4.0, 4)), TypeError, "grid_hw", [h]),
        Case("redist_lam_nan", lambda: kvfix.scr_redistribute_(h, s, (4, 4), lam=NAN), ValueError, "lam", [h]),
    ]


def _cmac_cases():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    inv = 1.0 / 10000 ** (torch.arange(4) / 4)
    l, lt = torch.randn(2, 7), torch.randn(2, 7)
    return [
        Case("rope_rank", lambda: kvfix.rope_calibrate(k[0], (2, 6), inv), ValueError, "k"),
        Case("rope_odd", lambda: kvfix.rope_calibrate(k[..., :7], (2, 6), torch.rand(3)), ValueError, "head dim"),
        Case("rope_inv_dtype", lambda: kvfix.rope_calibrate(k, (2, 6), inv.double()), TypeError, "inv_freq"),
        Case("rope_gamma_tiny", lambda: kvfix.rope_calibrate(k, (2, 6), inv, gamma=1e-300), ValueError, "gamma"),
        Case("rope_gamma_zero", lambda: kvfix.rope_calibrate(k, (2, 6), inv, gamma=0.0), ValueError, "gamma"),
        Case("rope_span", lambda: kvfix.rope_calibrate(k, (6, 2), inv), ValueError, "image_span"),
        Case("rope_spans_start_after_end", lambda: kvfix.rope_calibrate(k, torch.tensor([[6, 2]]), inv), ValueError,
             "image_span"),
        Case("rope_spans_dtype", lambda: kvfix.rope_calibrate(k, torch.tensor([[2.0, 6.0]]), inv), TypeError,
             "image_span"),
        Case("rope_positions", lambda: kvfix.rope_calibrate(k, (2, 6), inv, positions=torch.zeros(1, 11,
                                                                                                  dtype=torch.long)),
             ValueError, "positions"),
        Case("rope_sections", lambda: kvfix.rope_calibrate(k, (2, 6), inv, mrope_section=[1, 2]), ValueError,
             "mrope_section"),
        Case("attn_heads", lambda: kvfix.cmac_attention(torch.randn(1, 3, 3, 8), k, v, (2, 6)), ValueError,
             "kv heads"),
        Case("attn_v_shape", lambda: kvfix.cmac_attention(q, k, v[:, :, :11], (2, 6)), ValueError, "v"),
        Case("attn_dtype", lambda: kvfix.cmac_attention(q, k.half(), v, (2, 6)), TypeError, "k"),
        Case("attn_tq", lambda: kvfix.cmac_attention(torch.randn(1, 4, 13, 8), k, v, (2, 6)), ValueError, "Tq"),
        Case("attn_kcal", lambda: kvfix.cmac_attention(q, k, v, (2, 6), k_calibrated=k[:, :, :3]), ValueError,
             "k_calibrated"),
        Case("attn_imd", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=torch.ones(2, dtype=torch.bool)),
             ValueError, "imd"),
        Case("attn_value_mean", lambda: kvfix.cmac_attention(q, k, v, (2, 6), value_mean="mean"), ValueError,
             "value_mean"),
        Case("contrast_shape", lambda: kvfix.contrastive_logits(l, lt[:, :6]), ValueError, "logits_distorted"),
        Case("contrast_empty", lambda: kvfix.contrastive_logits(l[:, :0], lt[:, :0]), ValueError, "logits"),
        Case("contrast_alpha_huge", lambda: kvfix.contrastive_logits(l, lt, alpha=1e308), ValueError, "alpha"),
        Case("contrast_alpha_neg", lambda: kvfix.contrastive_logits(l, lt, alpha=-1.0), ValueError, "alpha"),
        Case("contrast_beta", lambda: kvfix.contrastive_logits(l, lt, beta=0.0), ValueError, "beta"),
        Case("rope_dtype", lambda: kvfix.rope_calibrate(k.double(), (2, 6), inv), TypeError, "k"),
        Case("rope_empty", lambda: kvfix.rope_calibrate(k[:, :, :0], (0, 0), inv), ValueError, "k"),
        Case("rope_strides", lambda: kvfix.rope_calibrate(torch.randn(1, 2, 8, 12).transpose(2, 3), (2, 6), inv),
             ValueError, "k"),
        Case("rope_inv_shape", lambda: kvfix.rope_calibrate(k, (2, 6), inv[:3]), ValueError, "inv_freq"),
        Case("rope_inv_device", lambda: kvfix.rope_calibrate(k, (2, 6), inv.to("meta")), ValueError, "inv_freq"),
        Case("rope_gamma_nan", lambda: kvfix.rope_calibrate(k, (2, 6), inv, gamma=NAN), ValueError, "gamma"),
        Case("rope_positions_dtype", lambda: kvfix.rope_calibrate(k, (2, 6), inv, positions=torch.zeros(1, 12)),
             TypeError, "positions"),
        Case("rope_num_tokens", lambda: kvfix.rope_calibrate(k, torch.tensor([[2, 6]]), inv, num_tokens=13),
             ValueError, "num_tokens"),
        Case("rope_spans_shape", lambda: kvfix.rope_calibrate(k, torch.tensor([2, 6]), inv), ValueError,
             "image_span"),
        Case("attn_rank", lambda: kvfix.cmac_attention(q[0], k, v, (2, 6)), ValueError, "q"),
        Case("attn_device", lambda: kvfix.cmac_attention(q, k, v.to("meta"), (2, 6)), ValueError, "v"),
        Case("attn_strides", lambda: kvfix.cmac_attention(q, torch.randn(1, 2, 8, 12).transpose(2, 3), v, (2, 6)),
             ValueError, "k"),
        Case("attn_empty", lambda: kvfix.cmac_attention(q[:, :, :0], k, v, (2, 6)), ValueError, "q"),
        Case("attn_span", lambda: kvfix.cmac_attention(q, k, v, (6, 2)), ValueError, "image_span"),
        Case("attn_mask", lambda: kvfix.cmac_attention(q, k, v, (2, 6), mask=torch.ones(1, 4, 3, 11)), ValueError,
             "mask"),
        Case("attn_mask_dtype", lambda: kvfix.cmac_attention(q, k, v, (2, 6), mask=torch.ones(12, dtype=torch.int8)),
             TypeError, "mask"),
        Case("attn_scale_inf", lambda: kvfix.cmac_attention(q, k, v, (2, 6), scale=-INF), ValueError, "scale"),
        Case("attn_causal_type", lambda: kvfix.cmac_attention(q, k, v, (2, 6), causal=None), TypeError, "causal"),
        Case("attn_kcal_dtype", lambda: kvfix.cmac_attention(q, k, v, (2, 6), k_calibrated=k[:, :, 2:6].half()),
             TypeError, "k_calibrated"),
        Case("attn_kmean_shape", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=True,
                                                              k_calibrated_mean=torch.zeros(1, 4, 8)),
             ValueError, "k_calibrated_mean"),
        Case("attn_kmean_rank", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=True,
                                                             k_calibrated_mean=torch.zeros(2, 8)),
             ValueError, "k_calibrated_mean"),
        Case("attn_kmean_dtype", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=True,
                                                              k_calibrated_mean=torch.zeros(1, 2, 8).bfloat16()),
             TypeError, "k_calibrated_mean"),
        Case("attn_kmean_device", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=True,
                                                               k_calibrated_mean=torch.zeros(1, 2, 8, device="meta")),
             ValueError, "k_calibrated_mean"),
        Case("attn_kmean_not_tensor", lambda: kvfix.cmac_attention(q, k, v, (2, 6), imd=True,
                                                                   k_calibrated_mean=[[0.0] * 8] * 2),
             TypeError, "k_calibrated_mean"),
        Case("key_mean_rank", lambda: kvfix.cmac_key_mean(k[0]), ValueError, "k_calibrated"),
        Case("key_mean_dtype", lambda: kvfix.cmac_key_mean(k.double()), TypeError, "k_calibrated"),
        Case("contrast_dtype", lambda: kvfix.contrastive_logits(l.double(), lt.double()), TypeError, "logits"),
        Case("contrast_dtype_mismatch", lambda: kvfix.contrastive_logits(l, lt.half()), TypeError,
             "logits_distorted"),
        Case("contrast_device", lambda: kvfix.contrastive_logits(l, lt.to("meta")), ValueError, "logits_distorted"),
        Case("contrast_alpha_nan", lambda: kvfix.contrastive_logits(l, lt, alpha=NAN), ValueError, "alpha"),
        Case("contrast_beta_type", lambda: kvfix.contrastive_logits(l, lt, beta="0.2"), TypeError, "beta"),
        Case("contrast_not_tensor", lambda: kvfix.contrastive_logits(l.tolist(), lt), TypeError, "logits"),
    ]


CASES = _dscr_cases() + _grid_cases() + _structured_cases() + _plan_cases() + _geometry_cases() + _kvsmooth_cases() + _scr_cases() + _cmac_cases()


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case):
    before = [t.clone() for t in case.targets]
    with pytest.raises(case.exc) as info:
        case.call()
    assert case.names in str(info.value), f"message does not name {case.names!r}: {info.value}"
    for t, b in zip(case.targets, before):
        assert torch.equal(t.isnan(), b.isnan()) and torch.equal(t.nan_to_num(), b.nan_to_num()), \
            "an in-place target was written before the error"


# ---- accepted: integer-like parameters, non-overlapping views of one buffer, B = 0 ------------

def test_numpy_integers_accepted():
    k, d = _kv(), torch.rand(16)
    want = kvfix.dscr_refine(k, None, d, (4, 4))[0]
    torch.testing.assert_close(kvfix.dscr_refine(k, None, d, (np.int64(4), np.int32(4)))[0], want)
    torch.testing.assert_close(kvfix.patch_coords(np.int64(4), 4), kvfix.patch_coords(4, 4))
    h, s = torch.randn(1, 16, 4), torch.rand(1, 16)
    torch.testing.assert_close(kvfix.scr_redistribute(h, s, (np.int64(4), 4), top_k=np.int64(2)),
                               kvfix.scr_redistribute(h, s, (4, 4), top_k=2))
    q, kk = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 12, 8)
    torch.testing.assert_close(kvfix.scr_scores(q, kk, (np.int64(2), 10)), kvfix.scr_scores(q, kk, (2, 10)))


def test_interleaved_views_of_one_buffer_accepted():
    """k and v as the two halves of a fused [B, H, N, 2D] buffer, and layers of one static cache:
    their memory interleaves or adjoins without sharing an element."""
    fused = torch.randn(1, 2, 16, 16)
    k, v = fused[..., :8], fused[..., 8:]
    want_k, want_v = kvfix.dscr_refine(k, v, torch.rand(16).fill_(0.5), (4, 4))
    kvfix.dscr_refine_cache_([k], [v], torch.rand(16).fill_(0.5), (4, 4))
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(v, want_v)
    cache = torch.randn(3, 1, 2, 16, 8)  # [L, B, H, N, D]
    kvfix.dscr_refine_cache_(list(cache.unbind(0)), None, torch.rand(16), kvfix.patch_coords(4, 4))
    kv = torch.randn(1, 2, 10, 16)
    kvfix.kvsmooth_step_(torch.randn(1, 2, 1, 8), kv[..., :8], kv[..., 8:], torch.full((1, 15), NAN))


def test_empty_batch_with_per_item_depth():
    """B = 0 with depth [0, N] and broadcast coords: an empty result, not an expand error."""
    out, _ = kvfix.dscr_refine(torch.randn(0, 2, 16, 8), None, torch.rand(0, 16), kvfix.patch_coords(4, 4))
    assert out.shape == (0, 2, 16, 8)


# ---- large finite values (issue 15 item 4) and parameters at the edge (item 5) ------------------

@pytest.mark.parametrize("D,scale", [(48, None), (64, 0.3), (64, None)])
def test_scr_scores_large_finite_logits(D, scale):
    """Keys ~1e10: logits ~1e10, and an FMA-contracted x * scale - m * scale is off by hundreds at
    the row max; the exp helper must treat that as 0 (it returned NaN before)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, D), torch.randn(2, 2, 40, D) * 1e10
    got = kvfix.scr_scores(q, k, (2, 10), scale=scale)
    want = R.scr_scores(q.double(), k.double(), (2, 10), scale=scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_patch_depth_near_float64_range():
    m = torch.tensor([[1e308, -1e308], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 2), torch.tensor([255.0, 0.0, 127.5, 127.5]))
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 2, scale=1.0), torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_contrastive_large_alpha_no_cancellation():
    l = torch.tensor([[10.0, 9.5, -3.0]])
    got = kvfix.contrastive_logits(l, l.clone(), alpha=1e30, beta=0.2)
    torch.testing.assert_close(got, torch.tensor([[10.0, 9.5, -INF]]))  # (1 + a) l - a l = l exactly
    got = kvfix.contrastive_logits(l, l - 10.0, alpha=3e38, beta=0.2)
    assert got[0, 0] == INF and got[0, 1] == INF  # past float32's range: +inf, not nan


# ---- non-finite rules (one per op, documented in its docstring) ----------------------------------

def test_nonfinite_rules_contrastive():
    """A row whose original logits hold nan or +inf has no softmax: all nan (reference = kernel);
    other rows are untouched."""
    l, lt = torch.randn(3, 6), torch.randn(3, 6)
    l[0, 2] = NAN
    l[1, 4] = INF
    for out in (kvfix.contrastive_logits(l, lt), R.contrastive_logits(l, lt)):
        assert out[:2].isnan().all()
        assert not out[2].isnan().any()
    torch.testing.assert_close(kvfix.contrastive_logits(l, lt)[2], R.contrastive_logits(l, lt)[2])


@pytest.mark.parametrize("where", ["all", "one"])
def test_nonfinite_rules_scr_scores(where):
    """A nan logit (here from an additive mask) makes its row's softmax nan, so the item's scores
    are nan, as the reference; a row whose keys are all masked out contributes 0."""
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 12, 8)
    mask = torch.zeros(2, 1, 3, 12)
    if where == "all":
        mask[0, :, 1] = NAN
    else:
        mask[0, :, 1, 5] = NAN
    mask[1, :, 2] = -INF  # a row without keys
    for plain in (False, True):
        got = kvfix.scr_scores(q, k, (2, 10), mask=mask, causal=plain)
        want = R.scr_scores(q.double(), k.double(), (2, 10), mask=mask.double(), causal=plain)
        assert got[0].isnan().all() and want[0].isnan().all()
        torch.testing.assert_close(got[1].double(), want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("imd", [False, True])
def test_nonfinite_rules_cmac_attention(imd):
    """softmax(P) @ V's rule: a nan query row, or a +inf logit, gives a nan row (it gave 0 / a
    dropped key before); a -inf logit takes no part; an inf value outside the image reaches only
    the dims it touches (the reference's mu_V no longer turns it into nan everywhere)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 1, 12, 8), torch.randn(2, 1, 12, 8)
    q[0, 0, 2] = NAN                   # item 0, head 0, row 2
    k[1, 0, 3] = 0.0
    k[1, 0, 3, 0] = INF                # item 1, key 3 (in the image): +inf / -inf logits by q's sign
    v[0, 0, 0, 1] = INF                # item 0, key 0 (before the image), dim 1
    kc = R.rope_calibrate(k, (2, 6), 1.0 / 10000 ** (torch.arange(4) / 4))
    got = kvfix.cmac_attention(q, k, v, (2, 6), k_calibrated=kc, imd=imd)
    want = R.cmac_attention(q.double(), k.double(), v.double(), (2, 6), k_calibrated=kc.double(), imd=imd)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    assert got[0, 0, 2].isnan().all()
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], atol=1e-5, rtol=1e-5)


def test_dscr_scr_nonfinite_inputs_rejected():
    """DSCR's depth / coords and SCR's scores: non-finite values are a ValueError on the CPU
    (read once per image). On CUDA the dense DSCR op and SCR's redistribution write the item nan
    instead of reading on the host (tests/test_dscr.py, tests/test_scr.py)."""
    with pytest.raises(ValueError, match="depth"):
        kvfix.dscr_refine(_kv(), None, torch.full((16,), NAN), kvfix.patch_coords(4, 4))
    with pytest.raises(ValueError, match="scores"):
        kvfix.scr_redistribute(torch.randn(1, 16, 4), torch.full((1, 16), INF), (4, 4))


def test_case_count_matches_readme():
    """The README's reliability note quotes the number of cases."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    m = re.search(r"tests/test_bad_inputs\.py[^.]*?(\d+) bad-input cases", readme)
    assert m is not None and int(m.group(1)) == len(CASES), f"README quotes {m and m.group(1)}, file has {len(CASES)}"


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
@pytest.mark.parametrize("per_token", [False, True])
def test_hf_dscr_depth_dtype_raises_before_forward(dtype, per_token):
    """kvfix.hf.DSCR: a bool or complex depth map (a map or per-token depths) is a TypeError
    naming the image, before any forward (the docs' promise), not a silent cast."""
    from kvfix.hf import testing
    model = testing.tiny_llava(num_layers=2)
    inputs, _ = testing.llava_prompt(model, [1])
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    shape = (16,) if per_token else (8, 8)
    try:
        with kvfix.hf.enable(model, kvfix.hf.DSCR()) as h:
            with h.images(depth_maps=[torch.ones(shape, dtype=dtype)]):
                with pytest.raises(TypeError, match="depth map of image 0 must be real-valued"):
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert calls == []
