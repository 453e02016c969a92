"""bench/common.py: the interleaving that every CPU benchmark table is timed with."""
from collections import Counter

import pytest

from bench import common


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_orders_each_variant_follows_each_other_equally(n):
    orders = common.balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 or n == 1 else 2 * n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    follows = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1  # every ordered pair equally often


def test_interleave_runs_the_balanced_orders():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    tm = common.interleave(fns, common.Budget(None), max_reps=4)
    assert tm.reps == 4
    passes = [calls[i:i + 4] for i in range(4, 20, 4)]  # after the 4 warm-up calls
    assert passes == [["abcd"[i] for i in o] for o in common.balanced_orders(4)]
    follows = Counter((p[i], p[i + 1]) for p in passes for i in range(3))
    assert set(follows.values()) == {1} and len(follows) == 12


def test_cache_evictor_reads_at_least_twice_the_last_level_cache():
    llc = common.last_level_cache_bytes()
    assert llc > 0
    evict = common.CacheEvictor()
    assert evict.buf.numel() * 4 >= max(2 * llc, 64 << 20)
    assert evict("any variant") is None
