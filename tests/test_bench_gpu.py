"""bench/gpu.py runs only where a GPU is; here its tables are built on the CPU with a stub timer,
so that the script does not rot between GPU sessions."""
import bench.gpu as G


def test_gpu_bench_tables_build_on_cpu(monkeypatch):
    monkeypatch.setattr(G, "DSCR_SHAPES", [(6, 8, 2), (12, 12, 1)])
    monkeypatch.setattr(G, "DENSE_MAX_N", 100)
    monkeypatch.setattr(G, "cuda_ms", lambda fn, reps=25, warmup=3: (fn(), 1.0)[1])
    dscr = G.dscr_rows("cpu")
    assert len(dscr) == 2 + 4 and all(row.count("|") == 12 for row in dscr)
    assert "n/a" not in dscr[2] and dscr[-1].endswith("| n/a |")  # 12 x 12 > DENSE_MAX_N: no dense
    kvs = G.kvsmooth_rows("cpu")
    assert len(kvs) == 2 + 4 and all(row.count("|") == 6 for row in kvs)
