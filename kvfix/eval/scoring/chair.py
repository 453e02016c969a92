"""CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning") over MSCOCO 2014.

An image's ground-truth objects are the categories of its instance annotations plus every
object its reference captions mention. A caption mentions an object when one of its words (or
two-word phrases) is in the 80-category synonym table (`coco_synonyms`); a mention is
hallucinated when its category is not among the image's ground-truth objects.

- chair_s: captions with at least one hallucinated mention / captions
- chair_i: hallucinated mentions / mentions (every mention counts, repeats included)
- recall: distinct ground-truth objects mentioned / ground-truth objects (summed over captions)
- avg_len: words per caption (the tokeniser's words, punctuation excluded)
"""
from __future__ import annotations

import json
import os

from .coco_synonyms import phrase_table, synonym_table
from .text import tokens, vocab_form

__all__ = ["Chair", "chair_metrics"]


def _annotation_files(coco_dir: str, kind: str) -> list[str]:
    """annotations/{kind}_val2014.json (required) and _train2014.json (when present) under
    `coco_dir`, or directly in it."""
    for base in (os.path.join(coco_dir, "annotations"), coco_dir):
        val = os.path.join(base, f"{kind}_val2014.json")
        if os.path.exists(val):
            train = os.path.join(base, f"{kind}_train2014.json")
            return [val] + ([train] if os.path.exists(train) else [])
    raise FileNotFoundError(f"no {kind}_val2014.json in {coco_dir}/annotations or {coco_dir}")


class Chair:
    """CHAIR scorer over a COCO 2014 folder: `coco_dir`/annotations/instances_val2014.json and
    captions_val2014.json (the train2014 files are read too when present, as the standard script
    reads both splits). Loading reads every annotation once; `score` and `per_caption` can then
    be called any number of times."""

    def __init__(self, coco_dir: str):
        self.coco_dir = coco_dir
        self.synonyms = synonym_table()
        self.phrases = phrase_table()
        self.gt_objects: dict[int, set[str]] = {}
        for path in _annotation_files(coco_dir, "instances"):
            with open(path) as f:
                inst = json.load(f)
            names = {c["id"]: c["name"] for c in inst["categories"]}
            for name in names.values():
                if name not in self.synonyms:
                    raise ValueError(f"COCO category {name!r} ({path}) is not in the CHAIR synonym table")
            for img in inst.get("images", []):
                self.gt_objects.setdefault(img["id"], set())
            for ann in inst["annotations"]:
                node = self.synonyms[names[ann["category_id"]]]
                self.gt_objects.setdefault(ann["image_id"], set()).add(node)
        for path in _annotation_files(coco_dir, "captions"):
            with open(path) as f:
                caps = json.load(f)
            for img in caps.get("images", []):
                self.gt_objects.setdefault(img["id"], set())
            for ann in caps["annotations"]:
                _, nodes = self.caption_objects(ann["caption"])
                self.gt_objects.setdefault(ann["image_id"], set()).update(nodes)

    def _mentions(self, caption: str) -> tuple[list[dict], int]:
        """The caption's object mentions in order ({word, object, start, end}: `word` is the
        matched vocabulary entry, `object` its category, [start, end) the characters of
        `caption` it covers) and its word count."""
        toks = tokens(caption)
        words = [(vocab_form(w, self.synonyms), s, e) for w, s, e in toks]
        merged = []
        i = 0
        while i < len(words):
            if i + 1 < len(words):
                pair = f"{words[i][0]} {words[i + 1][0]}"
                if pair in self.phrases:
                    merged.append((self.phrases[pair], words[i][1], words[i + 1][2]))
                    i += 2
                    continue
            merged.append(words[i])
            i += 1
        present = {w for w, _, _ in merged}
        if "toilet" in present and "seat" in present:
            merged = [m for m in merged if m[0] != "seat"]
        mentions = [dict(word=w, object=self.synonyms[w], start=s, end=e)
                    for w, s, e in merged if w in self.synonyms]
        return mentions, len(toks)

    def caption_objects(self, caption: str) -> tuple[list[str], list[str]]:
        """(words, node_words): the vocabulary entries `caption` mentions, in order and with
        repeats, and the category each one counts as."""
        mentions, _ = self._mentions(caption)
        return [m["word"] for m in mentions], [m["object"] for m in mentions]

    def per_caption(self, captions: list[dict]) -> list[dict]:
        """Each caption's detail, in order: image_id, caption, n_words, mentions (each {word,
        object, start, end, hallucinated}), mentioned (distinct categories mentioned),
        hallucinated (those not in the image), gt_objects, recalled (gt_objects mentioned);
        category lists are sorted. An image_id the annotations do not know is an error."""
        out = []
        for cap in captions:
            imid = cap["image_id"]
            if imid not in self.gt_objects:
                raise KeyError(f"image_id {imid!r} is not in the COCO annotations under {self.coco_dir}")
            gt = self.gt_objects[imid]
            mentions, n_words = self._mentions(cap["caption"])
            for m in mentions:
                m["hallucinated"] = m["object"] not in gt
            mentioned = {m["object"] for m in mentions}
            out.append(dict(image_id=imid, caption=cap["caption"], n_words=n_words, mentions=mentions,
                            mentioned=sorted(mentioned), hallucinated=sorted(mentioned - gt),
                            gt_objects=sorted(gt), recalled=sorted(mentioned & gt)))
        return out

    def score(self, captions: list[dict]) -> dict:
        """chair_s, chair_i, recall, avg_len and n (captions) of `captions` ({image_id, caption})."""
        return chair_metrics(self.per_caption(captions))


def chair_metrics(details: list[dict]) -> dict:
    """The CHAIR metrics of `Chair.per_caption` records (a ratio whose denominator is 0 is 0.0)."""
    n = len(details)
    n_mentions = sum(len(d["mentions"]) for d in details)
    n_hall = sum(m["hallucinated"] for d in details for m in d["mentions"])
    n_gt = sum(len(d["gt_objects"]) for d in details)
    return dict(
        chair_s=sum(bool(d["hallucinated"]) for d in details) / n if n else 0.0,
        chair_i=n_hall / n_mentions if n_mentions else 0.0,
        recall=sum(len(d["recalled"]) for d in details) / n_gt if n_gt else 0.0,
        avg_len=sum(d["n_words"] for d in details) / n if n else 0.0,
        n=n,
    )
