"""Percentile bootstrap intervals for the benchmark metrics."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["bootstrap_ci", "bootstrap_cis", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ascending `sorted_values`, linear between the two nearest ranks
    (numpy's default "linear" method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _samples(items: Sequence, n: int, seed: int):
    if not items:
        raise ValueError("bootstrap over no items")
    rng = random.Random(seed)
    items = list(items)
    for _ in range(n):
        yield rng.choices(items, k=len(items))


def bootstrap_ci(metric_fn: Callable[[list], float], items: Sequence, *, n: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of metric_fn over `n` resamples of `items` (drawn with
    replacement, each as many as `items`; `seed` makes it reproducible)."""
    values = sorted(float(metric_fn(s)) for s in _samples(items, n, seed))
    return percentile(values, 0.025), percentile(values, 0.975)


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        elif isinstance(v, float):
            yield prefix + (k,), v


def bootstrap_cis(metrics_fn: Callable[[list], dict], items: Sequence, *, n: int = 1000,
                  seed: int = 0) -> dict:
    """95% percentile intervals of every float in the (possibly nested) dict metrics_fn returns,
    from one set of `n` resamples: a dict of the same shape with [lo, hi] in place of each
    float (a value missing from some resamples, e.g. a group none of them drew, is taken over
    the resamples that have it)."""
    values: dict[tuple, list[float]] = {}
    for s in _samples(items, n, seed):
        for key, v in _leaves(metrics_fn(s)):
            values.setdefault(key, []).append(v)
    out: dict = {}
    for key, vs in values.items():
        vs.sort()
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = [percentile(vs, 0.025), percentile(vs, 0.975)]
    return out
