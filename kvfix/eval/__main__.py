"""`python -m kvfix.eval {run,score,compare} ...` (also under torchrun / accelerate launch -m)."""
from __future__ import annotations

import sys

_USAGE = "usage: python -m kvfix.eval {run,score,compare} [-h] ..."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE + "\n\n  run      generate a benchmark's answers (predictions.jsonl, metrics.json)\n"
              "  score    score predictions (kvfix.eval.scoring)\n"
              "  compare  runs side by side (compare.md, compare.png, examples.html)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from .run import main as run_main
        return run_main(rest)
    if cmd == "score":
        from .scoring import score_main
        return score_main(rest)
    if cmd == "compare":
        from .compare import main as compare_main
        return compare_main(rest)
    print(f"{_USAGE}\nunknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
