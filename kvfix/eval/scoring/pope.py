"""POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Binary yes/no questions about object presence; "yes" is the positive class. The metrics are the
benchmark's own: accuracy, precision, recall, F1 and the share of "yes" answers.
"""
from __future__ import annotations

import re
from collections import Counter

__all__ = ["pope_parse", "pope_parse_strict", "pope_confusion", "pope_metrics", "score_pope"]

_FIRST_WORD = re.compile(r"^[^a-z0-9]*([a-z]+)")


def pope_parse(text: str) -> str:
    """POPE's official answer parser, rule for rule.

    Only the text before the first "." is read; commas are dropped; the rest is split on single
    spaces. If "no", "not" or "No" is among those words the answer is "no", otherwise "yes". There
    is no lowercasing and no stripping: "NO", "Not really" and "no\\nThere is a dog" parse as "yes",
    and so does an empty answer.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_parse_strict(text: str) -> str | None:
    """The strict parser: the answer's first word, case-insensitive, must be "yes" or "no"
    (leading spaces and punctuation skipped); anything else is unparsed (None)."""
    m = _FIRST_WORD.match(text.lower())
    if m and m.group(1) in ("yes", "no"):
        return m.group(1)
    return None


def _label(label: str) -> str:
    lab = label.strip().lower()
    if lab not in ("yes", "no"):
        raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
    return lab


def pope_confusion(pairs) -> dict:
    """Counts of (label, parsed prediction: "yes", "no" or None) pairs: tp, fp, tn, fn (None with
    label "yes" is a miss, fn), unparsed, yes (predicted yes) and n."""
    pairs = Counter(pairs)
    c = dict(tp=0, fp=0, tn=0, fn=0, unparsed=0, yes=0, n=0)
    for (lab, pred), k in pairs.items():
        lab = _label(lab)
        c["n"] += k
        if pred is None:
            c["unparsed"] += k
            if lab == "yes":
                c["fn"] += k
            continue
        if pred == "yes":
            c["yes"] += k
            c["tp" if lab == "yes" else "fp"] += k
        else:
            c["tn" if lab == "no" else "fn"] += k
    return c


def pope_metrics(pairs, *, unparsed: bool = False) -> dict:
    """`score_pope`'s result from (label, parsed prediction: "yes", "no" or None) pairs;
    `unparsed` adds the count of None predictions."""
    c = pope_confusion(pairs)
    n = c["n"]
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = dict(accuracy=(c["tp"] + c["tn"]) / n if n else 0.0, precision=precision, recall=recall,
               f1=f1, yes_ratio=c["yes"] / n if n else 0.0, n=n, tp=c["tp"], fp=c["fp"], tn=c["tn"], fn=c["fn"])
    if unparsed:
        out["unparsed"] = c["unparsed"]
    return out


def score_pope(labels: list[str], answers: list[str], *, parser: str = "official") -> dict:
    """POPE metrics of raw `answers` against `labels` ("yes"/"no", any case), in order.

    parser="official" reads each answer with `pope_parse`, parser="strict" with
    `pope_parse_strict`. Keys: accuracy, precision, recall, f1 ("yes" is positive), yes_ratio
    (answers read as "yes" over all), n, and the counts tp, fp, tn, fn; "strict" adds unparsed.
    An unparsed answer is wrong: it counts in n (accuracy, yes_ratio) and, for a "yes" label, as
    a false negative (recall); it is never a predicted positive (precision). A ratio whose
    denominator is 0 is reported as 0.0.
    """
    if parser == "official":
        preds = [pope_parse(a) for a in answers]
    elif parser == "strict":
        preds = [pope_parse_strict(a) for a in answers]
    else:
        raise ValueError(f"parser must be 'official' or 'strict', got {parser!r}")
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    return pope_metrics(zip(labels, preds), unparsed=parser == "strict")
