"""`python -m kvfix.eval compare RUN_DIR... [--out DIR]`: runs side by side.

Writes into `--out` (default: the current folder):
- compare.md: one Markdown table, a row per run (its folder name, preset, methods) and a
  column per metric: the value with its bootstrap 95% interval, or mean +- std over seeds for
  sampling runs with several seeds (also printed).
- compare.png: one bar panel per metric, a bar per run, interval whiskers (drawn with Pillow).
- examples.html: a self-contained page (images embedded as data: URIs, no server): for a
  sample of items present in every run (first seed), the image, the prompt and each run's
  answer side by side; for CHAIR, each answer's hallucinated objects highlighted, as
  kvfix.eval.scoring.Chair(coco_dir).per_caption finds them (its mentions' character spans).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import random
import sys

__all__ = ["HEADLINE", "ci95_of", "examples_html", "flatten_metrics", "load_run", "main", "markdown_table",
           "plot_png"]


def load_run(path: str) -> dict:
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    from .run import read_predictions
    return {"name": os.path.basename(os.path.normpath(path)), "dir": path, "metrics": metrics,
            "predictions": read_predictions(os.path.join(path, "predictions.jsonl"))}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Numeric leaves of a (nested) metrics dict by dotted path ("official.accuracy"); the
    "ci95" entries are left out (ci95_of finds them)."""
    out = {}
    for k, v in metrics.items():
        if k == "ci95":
            continue
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def ci95_of(metrics: dict, path: str):
    """The bootstrap interval [lo, hi] of `path` in score_task's nested result, or None."""
    *parents, leaf = path.split(".")
    node = metrics
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    ci = node.get("ci95") if isinstance(node, dict) else None
    return ci.get(leaf) if isinstance(ci, dict) else None


# The columns shown by default (those present): each benchmark's headline numbers.
HEADLINE = {
    "pope": ["official.accuracy", "official.precision", "official.recall", "official.f1", "official.yes_ratio",
             "strict.accuracy", "strict.f1"],
    "chair": ["chair_s", "chair_i", "recall", "avg_len"],
    "mme": ["existence.score", "count.score", "position.score", "color.score", "total"],
    "amber": ["generative.chair", "generative.cover", "generative.hal", "generative.cog",
              "discriminative.all.accuracy", "discriminative.all.f1"],
}


def _metric_names(runs, which: str = "headline") -> list[str]:
    names: list[str] = []
    for r in runs:
        flat = flatten_metrics(r["metrics"]["metrics"])
        if which == "all":
            wanted = list(flat)
        elif which == "headline":
            wanted = [n for n in HEADLINE.get(r["metrics"]["task"], []) if n in flat] or list(flat)
        else:
            wanted = [n.strip() for n in which.split(",") if n.strip() in flat]
        names += [n for n in wanted if n not in names]
    return names


def _value(m: dict, name: str):
    v = flatten_metrics(m["metrics"]).get(name)
    lo = hi = None
    if name in m.get("seed_spread", {}):
        lo, hi = m["seed_spread"][name]["min"], m["seed_spread"][name]["max"]
    elif ci95_of(m["metrics"], name) is not None:
        lo, hi = ci95_of(m["metrics"], name)
    return v, lo, hi


def _cell(m: dict, name: str) -> str:
    v, lo, hi = _value(m, name)
    if v is None:
        return "-"
    if name in m.get("seed_spread", {}):
        return f"{_fmt(v)} ± {_fmt(m['seed_spread'][name]['std'])} ({len(m['per_seed'])} seeds)"
    if lo is not None:
        return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
    return _fmt(v)


def markdown_table(runs, which: str = "headline") -> str:
    names = _metric_names(runs, which)
    head = ["run", "task", "preset", "methods", "n"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        m = r["metrics"]
        row = [r["name"], m["task"], m["protocol"]["preset"], ", ".join(m["methods"]) or "none",
               str(m["n_items"])] + [_cell(m, n) for n in names]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


def plot_png(runs, path: str, which: str = "headline") -> None:
    """One panel per metric, one bar per run (colours listed in the legend), whiskers: the
    bootstrap 95% interval, or the range over seeds."""
    from PIL import Image, ImageDraw
    names = _metric_names(runs, which)
    pw, ph, pad = 220, 180, 30
    cols = max(1, min(4, len(names)))
    rows = max(1, -(-len(names) // cols))
    legend_h = 16 * len(runs) + 10
    img = Image.new("RGB", (cols * pw, rows * ph + legend_h), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(names):
        x0, y0 = (j % cols) * pw, (j // cols) * ph
        vals = [_value(r["metrics"], name) for r in runs]
        finite = [x for t in vals for x in t if isinstance(x, (int, float))]
        top = max([abs(x) for x in finite] + [1e-12])
        d.text((x0 + 5, y0 + 4), name[:32], fill="black")
        base = y0 + ph - pad // 2
        height = ph - pad - 20
        d.line([(x0 + 8, base), (x0 + pw - 8, base)], fill="black")
        bw = max(4, (pw - 20) // max(1, len(runs)) - 4)
        for i, (v, lo, hi) in enumerate(vals):
            if v is None:
                continue
            bx = x0 + 12 + i * (bw + 4)
            by = base - int(height * abs(v) / top)
            d.rectangle([bx, min(by, base), bx + bw, max(by, base)], fill=_COLOURS[i % len(_COLOURS)])
            if lo is not None and (lo != v or hi != v):
                ylo, yhi = base - int(height * abs(lo) / top), base - int(height * abs(hi) / top)
                cx = bx + bw // 2
                d.line([(cx, ylo), (cx, yhi)], fill="black")
                d.line([(cx - 3, ylo), (cx + 3, ylo)], fill="black")
                d.line([(cx - 3, yhi), (cx + 3, yhi)], fill="black")
            d.text((bx, min(by, base) - 12), _fmt(v)[:6], fill="black")
    ly = rows * ph + 5
    for i, r in enumerate(runs):
        d.rectangle([8, ly + 16 * i, 20, ly + 16 * i + 10], fill=_COLOURS[i % len(_COLOURS)])
        d.text((26, ly + 16 * i - 1), r["name"], fill="black")
    img.save(path, format="PNG")


def _data_uri(path: str, size: int = 336) -> str:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _highlight(text: str, spans) -> str:
    """HTML of `text` with the character spans [(start, end), ...] in <mark>."""
    out, pos = [], 0
    for a, b in sorted(spans):
        if a < pos:
            continue
        out += [html.escape(text[pos:a]), "<mark>", html.escape(text[a:b]), "</mark>"]
        pos = b
    return "".join(out + [html.escape(text[pos:])])


def examples_html(runs, path: str, *, n: int = 20, seed: int = 0) -> int:
    """Writes examples.html; returns the number of items shown."""
    first = []
    for r in runs:
        seeds = sorted({int(p["seed"]) for p in r["predictions"]})
        first.append({str(p["id"]): p for p in r["predictions"] if seeds and int(p["seed"]) == seeds[0]})
    common = [i for i in first[0] if all(i in f for f in first[1:])] if first else []
    sample = sorted(random.Random(seed).sample(common, min(n, len(common))), key=common.index)
    marks = [dict() for _ in runs]
    for k, r in enumerate(runs):
        m = r["metrics"]
        if m["task"] == "chair" and sample:
            from .scoring import Chair
            chair = Chair(m["data"]["coco_dir"])
            per = chair.per_caption([{"image_id": first[k][i]["image_id"], "caption": first[k][i]["text"]}
                                     for i in sample])
            marks[k] = {i: [(mt["start"], mt["end"]) for mt in d["mentions"] if mt["hallucinated"]]
                        for i, d in zip(sample, per)}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kvfix.eval examples</title><style>"
             "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;max-width:28em}"
             "mark{background:#fbb}img{max-width:336px}</style></head><body>",
             f"<h1>kvfix.eval: {len(sample)} examples</h1><p>Runs: "
             + ", ".join(html.escape(f"{r['name']} ({', '.join(r['metrics']['methods']) or 'no method'})")
                         for r in runs) + ". Highlighted: CHAIR's hallucinated objects.</p>",
             "<table><tr><th>image</th><th>prompt</th>"
             + "".join(f"<th>{html.escape(r['name'])}</th>" for r in runs) + "</tr>"]
    for i in sample:
        p0 = first[0][i]
        extra = "".join(f"<br><small>{html.escape(k)}: {html.escape(str(p0[k]))}</small>"
                        for k in ("label", "gt") if k in p0)
        parts.append(f"<tr><td><img src='{_data_uri(p0['image'])}'><br><small>{html.escape(i)}</small></td>"
                     f"<td>{html.escape(p0['prompt'])}{extra}</td>"
                     + "".join(f"<td>{_highlight(first[k][i]['text'], marks[k].get(i, []))}</td>"
                               for k in range(len(runs))) + "</tr>")
    parts.append("</table></body></html>\n")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return len(sample)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvfix.eval compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.json and predictions.jsonl)")
    p.add_argument("--out", default=".", help="folder for compare.md, compare.png, examples.html")
    p.add_argument("--examples", type=int, default=20, help="items shown in examples.html")
    p.add_argument("--seed", type=int, default=0, help="seed of the example sample")
    p.add_argument("--metrics", default="headline",
                   help="columns: 'headline' (each benchmark's main numbers), 'all', or a comma list of "
                        "dotted names (official.f1, chair_s, ...)")
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    tasks = {r["metrics"]["task"] for r in runs}
    if len(tasks) > 1:
        print(f"note: runs of several tasks ({', '.join(sorted(tasks))}); examples.html pairs items by id",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(runs, args.metrics)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table)
    plot_png(runs, os.path.join(args.out, "compare.png"), args.metrics)
    examples_html(runs, os.path.join(args.out, "examples.html"), n=args.examples, seed=args.seed)
    print(table, end="")
    return 0
