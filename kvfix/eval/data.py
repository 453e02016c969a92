"""Loaders for the benchmarks' official layouts (local copies; nothing is downloaded).

Every loader returns a list of items, dicts with at least
    "id"        the item's id in the benchmark (unique; with the seed, the prediction's key)
    "image"     path of the image file
    "question"  the benchmark's question ("" for CHAIR, whose prompt is fixed by the protocol)
and the fields kvfix.eval.scoring reads, under its names, copied into each prediction:
POPE "question_id", "label"; CHAIR "image_id"; MME "question_id" ("category/image/k"),
"label" (Yes / No), "category"; AMBER: "id" is AMBER's own (an int).

Layouts:
- POPE: a question file (jsonl, one {"question_id", "image", "text", "label"} per line, as in
  the POPE repository's output/coco/*.json and LLaVA's llava_pope_test.jsonl) and the image
  folder its "image" names are relative to (COCO val2014).
- CHAIR: a COCO folder with val2014/ (COCO_val2014_%012d.jpg) and
  annotations/instances_val2014.json (+ captions_val2014.json, read by the scorer). The image
  set is every val2014 image ("all") or "random-N": N file names drawn with random.Random(seed)
  from the sorted listing.
- MME: MME_Benchmark_release_version/: one folder per category, either images/ +
  questions_answers_YN/*.txt or the images and their .txt side by side; each .txt line is
  "question<TAB>answer" for the image of the same stem.
- AMBER: the repository's folder: data/query/query_all.json (or query_generative.json /
  query_discriminative.json: [{"id", "image", "query"}]), data/annotations.json,
  data/relation.json, data/safe_words.txt (read by the scorer) and image/ (AMBER_*.jpg).
- A hub dataset, `hub:NAME[:CONFIG][@SPLIT]` (POPE, MME, AMBER): kvfix.eval.hub; `images` is
  then the folder its images are written to.
"""
from __future__ import annotations

import json
import os
import random
import re

from .hub import is_hub, load_hub_items

__all__ = ["ANSWER_FIELD", "load_items", "load_pope", "load_chair", "load_mme", "load_amber", "scoring_data"]

_IMAGE_EXT = (".jpg", ".jpeg", ".png")


def load_pope(questions: str, images: str) -> list[dict]:
    items = []
    with open(questions) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            q = json.loads(line)
            for key in ("question_id", "image", "text", "label"):
                if key not in q:
                    raise ValueError(f"{questions}:{n}: POPE question without {key!r}")
            items.append({"id": q["question_id"], "image": os.path.join(images, q["image"]),
                          "question": q["text"], "question_id": q["question_id"], "label": q["label"]})
    return items


_COCO_ID = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def load_chair(coco_dir: str, image_set: str = "all", seed: int = 0) -> list[dict]:
    folder = os.path.join(coco_dir, "val2014")
    if not os.path.isdir(folder):
        raise ValueError(f"CHAIR: {folder} not found (expected the COCO layout val2014/ + annotations/)")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_EXT))
    if image_set != "all":
        m = re.fullmatch(r"random-(\d+)", image_set)
        if not m:
            raise ValueError(f"CHAIR image_set must be 'all' or 'random-N', got {image_set!r}")
        k = int(m.group(1))
        names = random.Random(seed).sample(names, min(k, len(names)))
    items = []
    for name in names:
        m = _COCO_ID.search(name)
        if not m:
            raise ValueError(f"CHAIR: cannot read a COCO image id from {name!r}")
        image_id = int(m.group(1))
        items.append({"id": image_id, "image": os.path.join(folder, name), "question": "",
                      "image_id": image_id})
    return items


def _mme_pairs(cat_dir: str):
    """(image path, txt path) pairs of one MME category, in either official layout."""
    qa_dir, img_dir = os.path.join(cat_dir, "questions_answers_YN"), os.path.join(cat_dir, "images")
    if not os.path.isdir(qa_dir):
        qa_dir = img_dir = cat_dir
    images = {os.path.splitext(n)[0]: n for n in os.listdir(img_dir) if n.lower().endswith(_IMAGE_EXT)}
    for txt in sorted(n for n in os.listdir(qa_dir) if n.endswith(".txt")):
        stem = os.path.splitext(txt)[0]
        if stem not in images:
            raise ValueError(f"MME: no image for {os.path.join(qa_dir, txt)}")
        yield os.path.join(img_dir, images[stem]), os.path.join(qa_dir, txt)


def load_mme(mme_dir: str) -> list[dict]:
    items = []
    for cat in sorted(os.listdir(mme_dir)):
        cat_dir = os.path.join(mme_dir, cat)
        if not os.path.isdir(cat_dir):
            continue
        for image, txt in _mme_pairs(cat_dir):
            with open(txt) as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
            for k, line in enumerate(lines):
                question, sep, gt = line.partition("\t")
                if not sep:
                    raise ValueError(f"MME: {txt} line {k + 1} is not 'question<TAB>answer'")
                qid = f"{cat}/{os.path.basename(image)}/{k}"
                items.append({"id": qid, "image": image, "question": question, "question_id": qid,
                              "label": gt.strip(), "category": cat})
    if not items:
        raise ValueError(f"MME: no questions found under {mme_dir}")
    return items


def load_amber(amber_dir: str, split: str = "all") -> list[dict]:
    query = os.path.join(amber_dir, "data", "query", f"query_{split}.json")
    if not os.path.isfile(query):
        raise ValueError(f"AMBER: {query} not found")
    with open(query) as f:
        rows = json.load(f)
    return [{"id": r["id"], "image": os.path.join(amber_dir, "image", r["image"]), "question": r["query"]}
            for r in rows]


def load_items(task: str, data: str, *, images: str | None = None, image_set: str = "all",
               image_seed: int = 0, split: str = "all", amber_data: str | None = None) -> list[dict]:
    """The items of `task` from `data` (POPE: the question file, with `images`; CHAIR: the COCO
    folder; MME: its folder; AMBER: its folder; a hub dataset "hub:...", with `images` the folder
    its images are written to and, for AMBER, `amber_data` AMBER's data folder, whose
    annotations pick the `split`); image paths absolute."""
    if is_hub(data):
        if images is None:
            raise ValueError("--data hub:... needs a folder to write the images to (--images)")
        if task == "amber" and amber_data is None:
            raise ValueError("AMBER from the hub needs --amber-data (AMBER's data folder: annotations.json, "
                             "relation.json, safe_words.txt)")
        items = load_hub_items(task, data, images)
        if task == "amber" and split != "all":
            from .scoring import load_amber as load_amber_files
            ann = load_amber_files(amber_data)["annotations"]
            missing = [it["id"] for it in items if it["id"] not in ann]
            if missing:
                raise ValueError(f"AMBER: {len(missing)} hub ids not in {amber_data}'s annotations "
                                 f"({missing[0]!r}, ...)")
            items = [it for it in items if (ann[it["id"]]["type"] == "generative") == (split == "generative")]
        return items
    if task == "pope":
        if images is None:
            raise ValueError("POPE needs --images (the COCO val2014 folder)")
        items = load_pope(data, images)
    elif task == "chair":
        items = load_chair(data, image_set, image_seed)
    elif task == "mme":
        items = load_mme(data)
    elif task == "amber":
        items = load_amber(data, split)
    else:
        raise ValueError(f"unknown task {task!r}")
    for it in items:
        it["image"] = os.path.abspath(it["image"])
    return items


# The answer is also written under the name the scorer's prediction format uses for it.
ANSWER_FIELD = {"pope": "text", "chair": "caption", "mme": "text", "amber": "response"}


def scoring_data(task: str, data: str, items: list[dict], amber_data: str | None = None) -> dict:
    """The `data=` argument of kvfix.eval.scoring.score_task for `task` (AMBER: `amber_data`
    when given, else the `data` folder)."""
    if task in ("pope", "mme"):
        return {"questions": items}
    if task == "chair":
        return {"coco_dir": data}
    return {"amber_dir": amber_data or data}
