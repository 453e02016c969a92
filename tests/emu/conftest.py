"""Fixtures of the emulated CUDA kernel tests (see kvemu_fixtures.py and README.md here)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvemu_fixtures import emu  # noqa: F401  (the session fixture)


def pytest_collection_modifyitems(config, items):
    """KVFIX_EMU_SHARD=i/n (run_emulated.py --jobs): keep the i-th of every n collected tests
    (1-based), so that n processes share one pass; neighbouring parametrisations (of similar
    cost) go to different shards."""
    shard = os.environ.get("KVFIX_EMU_SHARD")
    if not shard:
        return
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise pytest.UsageError(f"KVFIX_EMU_SHARD must be i/n with 1 <= i <= n, got {shard!r}")
    keep = items[i - 1::n]
    kept = {id(item) for item in keep}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


def pytest_report_header(config):
    asan = os.environ.get("KVFIX_EMU_ASAN", "") not in ("", "0")
    shard = os.environ.get("KVFIX_EMU_SHARD")
    return [f"kvemu: KVFIX_EMU_SEED={os.environ.get('KVFIX_EMU_SEED', '0')}, ASan={'on' if asan else 'off'}"
            + (f", shard {shard}" if shard else "")]
