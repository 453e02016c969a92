"""AMBER (Wang et al., 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation"), scored from AMBER's own files as its inference.py defines, offline.

Inputs are AMBER's: responses [{id, response}], data/annotations.json (per id: type, truth,
hallu), data/relation.json (object -> associated words) and data/safe_words.txt.

Discriminative questions (every type but "generative"): "no" is the positive class. precision
= questions answered "No" whose truth is "no" / questions answered "No"; recall = the same /
questions whose truth is "no"; F1 from those; accuracy = correct / questions. Reported for all
questions, existence (discriminative-hallucination), attribute (state, number and action
together, and each apart) and relation (every other discriminative type). A response counts
only as exactly "Yes" or "No" (surrounding whitespace stripped), as in AMBER.

Generative captions: the candidate nouns are the response's words whose noun lemma is in AMBER's
vocabulary (relation.json's objects and their associated words). A noun in safe_words.txt is
never a hallucination; a noun equal to a truth object or to a word associated with one covers
that truth object (the first such in AMBER's order: associated words first, truth objects after)
and is not a hallucination; any other noun is a hallucination and, if it equals a hallu object
or one of its associated words, marks that hallu object as mentioned.
- chair: hallucinated nouns / candidate nouns
- cover: covered truth objects / truth objects
- hal: captions with a hallucinated noun / captions
- cog: hallu objects mentioned / hallu objects

Two steps differ from AMBER's script, which needs downloads: nouns are not POS-filtered (AMBER
keeps nltk's NN* tags; here every vocabulary word counts), lemmas come from lemminflect instead
of nltk's WordNet, and AMBER's spaCy (en_core_web_lg) similarity test (a noun within cosine 0.8
of a truth or hallu word counts as that word) is left out: only exact matches count. F1 is
computed exactly (AMBER adds 1e-4 to the denominator after rounding P and R to 0.1%).
"""
from __future__ import annotations

import json
import os

from .text import tokens, vocab_form

__all__ = ["AMBER_ATTRIBUTE_TYPES", "load_amber", "amber_vocab", "amber_discriminative",
           "amber_generative", "amber_generative_detail", "amber_items", "score_amber"]

AMBER_ATTRIBUTE_TYPES = {"discriminative-attribute-state": "state",
                         "discriminative-attribute-number": "number",
                         "discriminative-attribute-action": "action"}


def load_amber(amber_dir: str) -> dict:
    """AMBER's data files from `amber_dir` (the repository's data/ folder, or a folder holding
    it): {"annotations": {id: entry}, "relation": {...}, "safe_words": [...]}."""
    base = amber_dir if os.path.exists(os.path.join(amber_dir, "annotations.json")) else os.path.join(amber_dir, "data")
    with open(os.path.join(base, "annotations.json")) as f:
        annotations = {a["id"]: a for a in json.load(f)}
    with open(os.path.join(base, "relation.json")) as f:
        relation = json.load(f)
    with open(os.path.join(base, "safe_words.txt")) as f:
        safe_words = [line.rstrip("\n") for line in f]
    return dict(annotations=annotations, relation=relation, safe_words=safe_words)


def _prf(items: list[tuple[str, str]]) -> dict:
    """items: (truth "yes"/"no", response as given)."""
    n = len(items)
    correct = sum((t == "yes" and r == "Yes") or (t == "no" and r == "No") for t, r in items)
    ans_no = sum(r == "No" for _, r in items)
    truth_no = sum(t == "no" for t, _ in items)
    hit = sum(t == "no" and r == "No" for t, r in items)
    precision = hit / ans_no if ans_no else 0.0
    recall = hit / truth_no if truth_no else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=correct / n if n else 0.0, precision=precision, recall=recall, f1=f1, n=n)


def amber_discriminative(items: list[dict]) -> dict:
    """items: {type, truth, response}. {all, existence, attribute, state, number, action,
    relation}: each {accuracy, precision, recall, f1, n}, for the groups that have questions."""
    groups: dict[str, list] = {"all": [], "existence": [], "attribute": [], "state": [], "number": [],
                               "action": [], "relation": []}
    for it in items:
        pair = (it["truth"], it["response"].strip())
        groups["all"].append(pair)
        t = it["type"]
        if t == "discriminative-hallucination":
            groups["existence"].append(pair)
        elif t in AMBER_ATTRIBUTE_TYPES:
            groups["attribute"].append(pair)
            groups[AMBER_ATTRIBUTE_TYPES[t]].append(pair)
        else:
            groups["relation"].append(pair)
    return {k: _prf(v) for k, v in groups.items() if v}


def amber_vocab(relation: dict) -> set[str]:
    """AMBER's object vocabulary: relation.json's objects and every word associated with one."""
    vocab = set(relation)
    for words in relation.values():
        vocab.update(words)
    return vocab


def amber_generative_detail(response: str, truth: list[str], hallu: list[str], *, relation: dict,
                            safe_words, vocab: set[str]) -> dict:
    """One caption: nouns (candidate nouns in order), hallucinated (flags, one per noun),
    covered (one flag per truth entry), cog (one flag per hallu entry). `vocab` is
    `amber_vocab(relation)`."""
    safe_index = [(w, i) for i, t in enumerate(truth) for w in relation.get(t, [])]
    safe_index += [(t, i) for i, t in enumerate(truth)]
    hallu_index = [(w, i) for i, h in enumerate(hallu) for w in relation.get(h, [])]
    hallu_index += [(h, i) for i, h in enumerate(hallu)]
    nouns = [v for v in (vocab_form(w, vocab) for w, _, _ in tokens(response)) if v in vocab]
    covered = [False] * len(truth)
    cog = [False] * len(hallu)
    flags = []
    for noun in nouns:
        if noun in safe_words:
            flags.append(False)
            continue
        j = next((i for w, i in safe_index if w == noun), None)
        if j is not None:
            covered[j] = True
            flags.append(False)
            continue
        j = next((i for w, i in hallu_index if w == noun), None)
        if j is not None:
            cog[j] = True
        flags.append(True)
    return dict(nouns=nouns, hallucinated=flags, covered=covered, cog=cog)


def amber_generative(details: list[dict]) -> dict:
    """chair, cover, hal, cog and n (captions) of `amber_generative_detail` records."""
    nouns = sum(len(d["nouns"]) for d in details)
    truth = sum(len(d["covered"]) for d in details)
    hallu = sum(len(d["cog"]) for d in details)
    n = len(details)
    return dict(
        chair=sum(sum(d["hallucinated"]) for d in details) / nouns if nouns else 0.0,
        cover=sum(sum(d["covered"]) for d in details) / truth if truth else 0.0,
        hal=sum(any(d["hallucinated"]) for d in details) / n if n else 0.0,
        cog=sum(sum(d["cog"]) for d in details) / hallu if hallu else 0.0,
        n=n,
    )


def amber_items(responses: list[dict], data: dict) -> tuple[list[dict], list[dict]]:
    """(generative details, discriminative items) of `responses` against `load_amber` data."""
    ann, relation = data["annotations"], data["relation"]
    safe = set(data["safe_words"])
    vocab = amber_vocab(relation)
    gen, disc = [], []
    for r in responses:
        if r["id"] not in ann:
            raise KeyError(f"AMBER id {r['id']!r} is not in annotations.json")
        a = ann[r["id"]]
        if a["type"] == "generative":
            gen.append(amber_generative_detail(r["response"], a["truth"], a["hallu"], relation=relation,
                                               safe_words=safe, vocab=vocab))
        else:
            disc.append(dict(type=a["type"], truth=a["truth"], response=r["response"]))
    return gen, disc


def score_amber(responses: list[dict], data: dict) -> dict:
    """AMBER metrics of `responses` ({id, response}) against `load_amber(...)` data:
    {"generative": {chair, cover, hal, cog, n}, "discriminative": {all, existence, attribute,
    state, number, action, relation}}; a part with no responses is left out."""
    gen, disc = amber_items(responses, data)
    out = {}
    if gen:
        out["generative"] = amber_generative(gen)
    if disc:
        out["discriminative"] = amber_discriminative(disc)
    return out
