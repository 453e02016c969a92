"""bench/gpu.py runs only where a GPU is; here every section is built on the CPU on tiny shapes
(the ops with a stub timer, the whole-model section with tiny versions of the two model configs
and a wall-clock timer), so that the script does not rot between GPU sessions. No timing is
asserted."""
import math
import re

import pytest
import torch

import bench.gpu as G


def stub_timer(fn, reps, warmup, queued=True):
    fn()
    return 1.0


def cpu_ctx(timer=stub_timer):
    return G.Ctx("cpu", timer, lambda fn: fn, tiny=True, reps=1, warmup=0)


def tables(lines):
    """The markdown tables of a section: lists of rows (lists of cells), header first."""
    out, cur = [], None
    for line in lines:
        if line.startswith("|"):
            if cur is None:
                cur = []
                out.append(cur)
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            cur = None
    return out


def check_tables(sec, n_tables):
    ts = tables(sec.lines)
    assert len(ts) == n_tables, sec.markdown()
    for t in ts:
        assert len(t) >= 3 and set(t[1]) == {"---"}, t  # header, rule, at least one row
        assert all(len(r) == len(t[0]) for r in t), t
    return ts


def test_baselines_set_the_bandwidth():
    ctx = cpu_ctx()
    sec = G.baselines_section(ctx)
    assert not sec.errors
    check_tables(sec, 1)
    assert ctx.bw is not None and ctx.bw > 0


@pytest.mark.parametrize("name, n_tables, n_targets", [
    ("kvsmooth", 2, 6),     # step rows (target per B) and graph rows (replayed, time; per shape)
    ("dscr", 2, 2),         # per-grid table; the LLaVA image rows (time and auto's pick)
    ("rooflines", 1, 5),    # scr_scores, scr_redistribute(_), contrastive_logits, rope_calibrate
    ("cmac", 2, 3),         # decode (IMD on), prefill (IMD off, on)
])
def test_op_sections_build_on_cpu(name, n_tables, n_targets):
    ctx = cpu_ctx()
    ctx.bw = 1e6
    sec = G.SECTION_FNS[name](ctx)
    assert not sec.errors, sec.errors
    ts = check_tables(sec, n_tables)
    assert len(sec.targets) == n_targets, [t.text for t in sec.targets]
    assert all(t.met is not None for t in sec.targets), [t.text for t in sec.targets]
    if name != "cmac":  # (cmac: the CPU has no cuDNN / mem-efficient SDPA, shown as n/a)
        assert "n/a" not in ts[0][2], ts[0]  # the first row is fully measured
    assert sec.markdown().startswith("## ")


def test_dscr_rows_without_dense_beyond_the_limit():
    sec = G.dscr_section(cpu_ctx())
    grid = tables(sec.lines)[0]
    big = [r for r in grid[2:] if r[0] == "12x12"]  # 144 tokens > TINY_DENSE_MAX_N: dense not run
    small = [r for r in grid[2:] if r[0] == "4x5"]
    assert big and all(r[5] == "n/a" and r[-1] == "n/a" for r in big)
    assert small and all(r[5] != "n/a" and r[-1] != "n/a" for r in small)


def test_model_configs_are_the_7b_models():
    """Built on the meta device: the parameter counts of LLaVA-1.5-7B and Qwen2-VL-7B."""
    llava = G.build_model("llava", "meta", torch.bfloat16)
    assert sum(p.numel() for p in llava.parameters()) == 7_063_427_072
    assert {p.dtype for p in llava.parameters()} == {torch.bfloat16}
    qwen = G.build_model("qwen", "meta", torch.bfloat16)
    assert sum(p.numel() for p in qwen.parameters()) == 8_291_375_616
    assert qwen.config.get_text_config().rope_parameters["mrope_section"] == [16, 24, 24]


def test_cut_configs_keep_the_7b_widths():
    """--layers: the exact configs with only the layer counts cut (the CPU record)."""
    llava = G.build_model("llava", "meta", torch.float32, layers=4)
    full = G.llava_15_7b_config()
    assert llava.config.text_config.num_hidden_layers == 4 and llava.config.vision_config.num_hidden_layers == 4
    assert llava.config.text_config.hidden_size == full.text_config.hidden_size == 4096
    assert llava.config.text_config.vocab_size == full.text_config.vocab_size
    assert llava.config.vision_config.image_size == 336
    qwen = G.build_model("qwen", "meta", torch.float32, layers=2)
    assert qwen.config.text_config.num_hidden_layers == 2 and qwen.config.vision_config.depth == 2
    assert qwen.config.text_config.hidden_size == 3584
    assert {p.dtype for p in qwen.parameters()} == {torch.float32}


def test_cpu_layers_measures_only_the_models(capsys):
    with pytest.raises(SystemExit):
        G.main(["--device", "cpu", "--layers", "2"])
    assert "--sections models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.main(["--device", "cpu", "--sections", "models", "--layers", "0"])


@pytest.mark.parametrize("name", ["models", "host"])
def test_model_sections_run_tiny_models_on_cpu(name):
    """models: the tiny configs (4 layers); host: the 7B configs' layer counts at tiny widths."""
    sec = G.SECTION_FNS[name](cpu_ctx(G.wall_timer))
    assert not sec.errors, sec.errors
    ts = check_tables(sec, 2)
    for t in ts:
        assert [r[0] for r in t[2:]] == ["plain", "plain, 2 rows", "KVSmooth", "CMAC", "DSCR", "SCR"]
        assert all(math.isfinite(float(r[1])) for r in t[2:])  # measured for every variant
    assert len(sec.targets) == 2 * len(G.DECODE_TARGETS)
    if name == "host":
        assert all(t[2][3] == "+0.0" and t[2][6] == "+0.00" for t in ts)  # plain against itself
        assert all(math.isfinite(float(r[5])) for t in ts for r in t[2:])  # prefill ms of every variant
        assert "32 text layers, hidden 64" in sec.markdown() and "28 text layers, hidden 64" in sec.markdown()


def test_main_writes_the_markdown(tmp_path, capsys):
    out = tmp_path / "GPU.md"
    assert G.main(["--device", "cpu", "--sections", "rooflines", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# kvfix on a GPU")
    for key in ("- device: CPU", "- torch ", "transformers ", "- date: ", "- command: `python -m bench.gpu --device cpu"):
        assert key in text
    # the rooflines need the copy bandwidth: baselines run first
    assert text.index("## Baselines") < text.index("## SCR, contrastive_logits")
    assert re.search(r"## Targets \(issue 18\): \d+ of 5 met", text)
    assert "wrote" in capsys.readouterr().out


def test_cpu_host_record_header():
    """The CPU record of the host section says what it measured (not "timings meaningless", the
    line of a smoke run of the other sections on the CPU)."""
    head = "\n".join(G.header("cpu", "cmd", G.datetime.datetime.now(), host_only=True))
    assert "the host section, one thread" in head and "meaningless" not in head
    assert "meaningless" in "\n".join(G.header("cpu", "cmd", G.datetime.datetime.now()))


def test_main_rejects_unknown_sections():
    with pytest.raises(SystemExit):
        G.main(["--device", "cpu", "--sections", "nope"])
