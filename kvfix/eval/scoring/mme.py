"""MME (Fu et al., 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large
Language Models"), scored as its eval_tool/calculation.py defines.

Each image carries two yes/no questions. Per subtask: acc = correct answers / questions,
acc_plus = images whose questions are all answered correctly / images, score = (acc + acc_plus)
x 100 (0..200). The total is the sum of the subtask scores: over the hallucination subset
(existence, count, position, color) it is MME's hallucination score, 0..800.
"""
from __future__ import annotations

from collections import defaultdict

__all__ = ["HALLUCINATION_SUBTASKS", "mme_parse", "score_mme"]

HALLUCINATION_SUBTASKS = ("existence", "count", "position", "color")


def mme_parse(answer: str) -> str:
    """MME's parser: the lowercased answer (surrounding whitespace stripped) is "yes" or "no"
    as it stands, else "yes" if its first four characters hold "yes", else "no" if they hold "no"
    ("not sure" -> "no", "none" -> "no"), else "other" (always wrong)."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _subtask_metrics(records: list[dict]) -> dict:
    by_image: dict[str, list[bool]] = defaultdict(list)
    other = 0
    for r in records:
        pred = mme_parse(r["answer"])
        other += pred == "other"
        by_image[r["image"]].append(pred == r["label"].strip().lower())
    n = len(records)
    acc = sum(sum(v) for v in by_image.values()) / n
    acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
    return dict(acc=acc, acc_plus=acc_plus, score=(acc + acc_plus) * 100, n=n,
                images=len(by_image), other=other)


def score_mme(records: list[dict]) -> dict:
    """MME scores of `records` ({question_id, image, subtask, label: "Yes"/"No", answer}).

    Returns {subtask: {acc, acc_plus, score, n, images, other}, ..., "total": sum of scores};
    subtasks appear in the order of HALLUCINATION_SUBTASKS, then any others alphabetically.
    Questions are grouped into images by (subtask, image).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        lab = r["label"].strip().lower()
        if lab not in ("yes", "no"):
            raise ValueError(f"MME label must be 'yes' or 'no', got {r['label']!r}")
        groups[r["subtask"]].append(r)
    order = [s for s in HALLUCINATION_SUBTASKS if s in groups] + sorted(set(groups) - set(HALLUCINATION_SUBTASKS))
    out = {s: _subtask_metrics(groups[s]) for s in order}
    out["total"] = sum(out[s]["score"] for s in order)
    return out
