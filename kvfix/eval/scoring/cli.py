"""`python -m kvfix.eval score {pope,chair,mme,amber} ...`: score prediction files, print one
JSON object (`score_task`'s result)."""
from __future__ import annotations

import argparse
import json
import sys


def read_records(path: str) -> list[dict]:
    """Records of a JSON Lines file, or of a JSON file holding one list."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvfix.eval score",
                                description="Score predictions against a benchmark's own files; prints one JSON object.")
    sub = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (ci95); 0: none (default 1000)")
    common.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    s = sub.add_parser("pope", parents=[common], help="POPE: official and strict parsers")
    s.add_argument("--questions", required=True, help="POPE questions, JSONL {question_id, image, text, label}")
    s.add_argument("--answers", required=True, help="answers, JSONL {question_id, text}")
    s = sub.add_parser("chair", parents=[common], help="CHAIR over MSCOCO 2014")
    s.add_argument("--captions", required=True, help="captions, JSONL {image_id, caption}")
    s.add_argument("--coco", required=True, help="COCO folder with annotations/instances_val2014.json, captions_val2014.json")
    s = sub.add_parser("mme", parents=[common], help="MME (hallucination subset: existence, count, position, color)")
    s.add_argument("--questions", required=True, help="questions, JSONL {question_id, image, label, subtask or category}")
    s.add_argument("--answers", required=True, help="answers, JSONL {question_id, text}")
    s = sub.add_parser("amber", parents=[common], help="AMBER, generative and discriminative")
    s.add_argument("--answers", required=True, help="responses, JSON list or JSONL {id, response}")
    s.add_argument("--amber", required=True, help="AMBER's data folder (annotations.json, relation.json, safe_words.txt)")
    return p


def score_main(argv: list[str] | None = None) -> int:
    """Run `score ...` (argv without the leading "score"); prints the result, returns 0."""
    from . import score_task

    args = _parser().parse_args(argv)
    if args.task in ("pope", "mme"):
        preds, data = read_records(args.answers), {"questions": read_records(args.questions)}
    elif args.task == "chair":
        preds, data = read_records(args.captions), {"coco_dir": args.coco}
    else:
        preds, data = read_records(args.answers), {"amber_dir": args.amber}
    result = score_task(args.task, preds, data=data, bootstrap=args.bootstrap, seed=args.seed)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0
