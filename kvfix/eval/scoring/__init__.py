"""Scoring of hallucination benchmarks: POPE, CHAIR, MME (hallucination subset) and AMBER.

Each metric follows its benchmark's own definition (docs/EVAL_SCORING.md has the sources and the
few places where an offline step replaces a download). Scoring needs only predictions and the
benchmarks' files, so outputs from any source can be scored; `score_task` is the one entry point
of `python -m kvfix.eval run`, `score_main` the `score` command line.
"""
from __future__ import annotations

from collections import defaultdict

from .amber import amber_discriminative, amber_generative, amber_items, load_amber, score_amber
from .bootstrap import bootstrap_ci, bootstrap_cis
from .chair import Chair, chair_metrics
from .cli import score_main
from .mme import HALLUCINATION_SUBTASKS, mme_parse, score_mme
from .pope import pope_metrics, pope_parse, pope_parse_strict, score_pope

__all__ = ["Chair", "HALLUCINATION_SUBTASKS", "TASKS", "bootstrap_ci", "bootstrap_cis", "chair_metrics",
           "load_amber", "mme_parse", "pope_metrics", "pope_parse", "pope_parse_strict", "score_amber", "score_main",
           "score_mme", "score_pope", "score_task"]

TASKS = ("pope", "chair", "mme", "amber")


def _by_id(predictions: list[dict], key: str, field: str, ids: list) -> list[str]:
    """The `field` of the prediction for each of `ids` (matched on `key`); a missing one, a
    repeated one or one for no question is an error."""
    got: dict = {}
    for p in predictions:
        if p[key] in got:
            raise ValueError(f"two predictions for {key} {p[key]!r}")
        got[p[key]] = p[field]
    missing = [i for i in ids if i not in got]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} of {len(ids)} questions ({key} {missing[0]!r}, ...)")
    extra = set(got) - set(ids)
    if extra:
        raise ValueError(f"{len(extra)} predictions match no question ({key} {next(iter(extra))!r}, ...)")
    return [got[i] for i in ids]


def _with_ci(metrics_fn, items, bootstrap: int, seed: int) -> dict:
    out = metrics_fn(items)
    if bootstrap:
        out["ci95"] = bootstrap_cis(metrics_fn, items, n=bootstrap, seed=seed)
    return out


def _mme_records(questions: list[dict], predictions: list[dict]) -> list[dict]:
    answers = _by_id(predictions, "question_id", "text", [q["question_id"] for q in questions])
    return [dict(question_id=q["question_id"], image=q["image"], label=q["label"], answer=a,
                 subtask=q["subtask"] if "subtask" in q else q["category"])
            for q, a in zip(questions, answers)]


def _mme_groups(records: list[dict]) -> list[list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[(r["subtask"], r["image"])].append(r)
    return list(groups.values())


def score_task(task: str, predictions: list[dict], *, data: dict, bootstrap: int = 1000,
               seed: int = 0) -> dict:
    """Score one benchmark's predictions; every metric dict gets "ci95": the same keys with the
    bootstrap 95% interval [lo, hi] of each float (`bootstrap` resamples; 0: none).

    task, predictions, data and result:
    - "pope": predictions {question_id, text}; data {"questions": POPE question records
      {question_id, label, ...}}. -> {"official": POPE metrics, "strict": POPE metrics}
      (`score_pope`), resampling questions.
    - "chair": predictions {image_id, caption}; data {"coco_dir": COCO 2014 folder} or
      {"chair": a loaded `Chair`}. -> chair_s, chair_i, recall, avg_len, n; resampling captions.
    - "mme": predictions {question_id, text}; data {"questions": {question_id, image, label,
      subtask (or LLaVA's "category")}}. -> `score_mme`; resampling images.
    - "amber": predictions {id, response}; data {"amber_dir": AMBER's data folder} or
      `load_amber(...)`'s dict. -> `score_amber`; resampling captions and questions apart.
    """
    if task == "pope":
        qs = data["questions"]
        answers = _by_id(predictions, "question_id", "text", [q["question_id"] for q in qs])
        labels = [q["label"] for q in qs]
        out = {}
        for name, parse in (("official", pope_parse), ("strict", pope_parse_strict)):
            items = list(zip(labels, [parse(a) for a in answers]))
            out[name] = _with_ci(lambda s, u=name == "strict": pope_metrics(s, unparsed=u), items, bootstrap, seed)
        return out
    if task == "chair":
        chair = data["chair"] if "chair" in data else Chair(data["coco_dir"])
        return _with_ci(chair_metrics, chair.per_caption(predictions), bootstrap, seed)
    if task == "mme":
        groups = _mme_groups(_mme_records(data["questions"], predictions))
        return _with_ci(lambda s: score_mme([r for g in s for r in g]), groups, bootstrap, seed)
    if task == "amber":
        amber = data if "annotations" in data else load_amber(data["amber_dir"])
        gen, disc = amber_items(predictions, amber)
        out = {}
        if gen:
            out["generative"] = _with_ci(amber_generative, gen, bootstrap, seed)
        if disc:
            out["discriminative"] = _with_ci(amber_discriminative, disc, bootstrap, seed)
        return out
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
