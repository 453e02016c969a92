"""kvfix.eval: hallucination benchmarks (POPE, CHAIR, MME, AMBER) for kvfix-patched models.

    python -m kvfix.eval run --task pope --model llava-hf/llava-1.5-7b-hf --data q.json --images val2014 \\
        --method dscr --method kvsmooth:lam_ref=0.9 --out runs/pope-dscr
    python -m kvfix.eval score pope --questions q.json --answers runs/pope-dscr/predictions.jsonl
    python -m kvfix.eval compare runs/pope-plain runs/pope-dscr --out runs/compare

`kvfix.eval.scoring` scores predictions from any source against the benchmarks' own files
(docs/EVAL_SCORING.md). run.py (generation, resume, sharding), data.py (the official layouts),
hub.py (`--data hub:...`, hub datasets through `datasets`), protocols.py (presets per paper),
compare.py (table, plot, examples.html) and lmms.py (kvfix as an lmms-eval model, registered
through the `lmms_eval.models` entry point; imported only where lmms-eval is installed):
docs/EVAL.md.
"""
from .protocols import PRESETS, Protocol, get_preset

__all__ = ["PRESETS", "Protocol", "get_preset"]
