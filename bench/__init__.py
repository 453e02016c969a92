"""kvfix benchmarks: `python -m bench.table` (table, bench/RESULTS.md) and `pytest bench/ --benchmark-only`."""
