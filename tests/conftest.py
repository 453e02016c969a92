import os
import zlib

import pytest
import torch

# Small, reproducible runs: at most two threads, whatever the machine has.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh random inputs, reproducibly: the seed is derived from its id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# Tiny random-weight models for the transformers tests (a module may override one, e.g. a
# different image size), and no kvfix handle left on them after a test.
@pytest.fixture(scope="module")
def llava():
    from kvfix.hf import testing
    return testing.tiny_llava()


@pytest.fixture(scope="module")
def qwen():
    from kvfix.hf import testing
    return testing.tiny_qwen2_vl()


@pytest.fixture(autouse=True)
def _no_leftover_handle(request):
    yield
    for name in ("llava", "qwen"):
        if name in request.fixturenames:
            import kvfix.hf
            h = kvfix.hf.get_handle(request.getfixturevalue(name))
            if h is not None:
                h.disable()
