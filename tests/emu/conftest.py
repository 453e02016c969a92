"""Fixtures of the emulated CUDA kernel tests (see kvemu_fixtures.py and README.md here)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvemu_fixtures import emu  # noqa: F401  (the session fixture)


def pytest_report_header(config):
    asan = os.environ.get("KVFIX_EMU_ASAN", "") not in ("", "0")
    return [f"kvemu: KVFIX_EMU_SEED={os.environ.get('KVFIX_EMU_SEED', '0')}, ASan={'on' if asan else 'off'}"]
