"""Hub datasets as kvfix.eval items: `python -m kvfix.eval run --data hub:NAME[:CONFIG][@SPLIT]`.

A convenience beside the local official layouts (kvfix.eval.data): the rows of a dataset on the
Hugging Face hub (through the `datasets` package, `pip install "kvfix[hub]"`) or of a folder
written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`hub:/path/to/folder`) become
the same items the local loaders give, so running, scoring, resuming and comparing are
unchanged. SPLIT defaults to "test"; CONFIG to the dataset's default.

Fields read per task (the first present of each list), as lmms-lab's datasets name them:
- pope (lmms-lab/POPE; its "Full" config has one split per sampling: adversarial, popular,
  random): question_id, question, answer ("yes" / "no"), image. The "default" config mixes the
  three samplings; when question ids repeat there, an item's id becomes "category/question_id".
- mme (lmms-lab/MME): question_id (the image's path, e.g. "existence/000000006040.jpg", shared by
  the image's two questions), question, answer ("Yes" / "No"), category, image. Item ids are
  "category/image name/k" (k: the question's place among the image's questions), as the local
  MME loader writes them.
- amber: id (or question_id), query (or question, text), image. AMBER's scoring files
  (annotations.json, relation.json, safe_words.txt) are not part of such datasets: `run` takes
  AMBER's data folder from `--amber-data`.
CHAIR reads COCO's annotation folder and has no hub form here.

Images are written once to `image_dir` (run: `--images`, default <out>/images) as the dataset
stores them (the encoded bytes unchanged; a decoded PIL image as PNG), named from the row's
image name or id and a hash of the bytes, so rows sharing an image share the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import re

__all__ = ["HUB_PREFIX", "is_hub", "parse_hub_spec", "load_rows", "hub_items", "load_hub_items", "save_image"]

HUB_PREFIX = "hub:"

FIELDS = {
    "pope": {"id": ("question_id", "id"), "question": ("question", "text"), "label": ("answer", "label"),
             "image": ("image",)},
    "mme": {"id": ("question_id",), "question": ("question",), "label": ("answer",), "category": ("category",),
            "image": ("image",)},
    "amber": {"id": ("id", "question_id"), "question": ("query", "question", "text"), "image": ("image",)},
}


def is_hub(data: str) -> bool:
    return isinstance(data, str) and data.startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """"hub:lmms-lab/POPE:Full@adversarial" -> ("lmms-lab/POPE", "Full", "adversarial");
    split "test" unless given, config None unless given."""
    if not is_hub(spec):
        raise ValueError(f"not a hub dataset spec (hub:NAME[:CONFIG][@SPLIT]): {spec!r}")
    rest = spec[len(HUB_PREFIX):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: no dataset name")
    return name, config or None, split or "test"


def load_rows(name: str, config: str | None, split: str):
    """The rows (dicts) of one split: `datasets.load_from_disk` for a local folder, else
    `datasets.load_dataset(name, config, split=split)`; image columns are read undecoded
    ({"bytes", "path"}), so the files are written exactly as stored."""
    try:
        import datasets
    except ImportError:
        raise ImportError('--data hub:... needs the datasets package: pip install "kvfix[hub]"') from None
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split)
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _field(row: dict, task: str, key: str, n: int):
    for name in FIELDS[task][key]:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(f"{task} hub row {n}: no {key} field (looked for {', '.join(FIELDS[task][key])}; "
                     f"the row has {', '.join(sorted(row))})")


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _extension(data: bytes, path: str | None) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    ext = os.path.splitext(path or "")[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".img"


def save_image(value, image_dir: str, hint: str = "image") -> str:
    """Write one image cell to `image_dir` and return its path. `value`: {"bytes", "path"} (an
    undecoded `datasets.Image`; bytes None and a readable path: that file is used as it is), a
    PIL image (saved as PNG), or a path."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        data, src = value.get("bytes"), value.get("path")
        if data is None:
            if src and os.path.isfile(src):
                return src
            raise ValueError(f"image cell without bytes and without a readable path ({src!r})")
    elif hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data, src = buf.getvalue(), None
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(str(hint)))[0])[:80] or "image"
    name = f"{stem}-{hashlib.sha1(data).hexdigest()[:12]}{_extension(data, src)}"
    path = os.path.join(image_dir, name)
    if not os.path.exists(path):
        os.makedirs(image_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def _check_task(task: str) -> None:
    if task not in FIELDS:
        raise ValueError(f"--data hub:... serves {', '.join(FIELDS)}, not {task!r} "
                         "(CHAIR reads COCO's annotation folder: give --data the local COCO folder)")


def hub_items(task: str, rows, image_dir: str) -> list[dict]:
    """Rows of a hub dataset (dicts with the FIELDS of `task`) -> kvfix.eval items (see
    kvfix.eval.data), their images written to `image_dir`."""
    _check_task(task)
    items = []
    if task == "pope":
        for n, row in enumerate(rows):
            qid, label = _field(row, task, "id", n), str(_field(row, task, "label", n)).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"pope hub row {n}: answer must be yes or no, got {label!r}")
            item = {"id": qid, "image": save_image(_field(row, task, "image", n), image_dir,
                                                  row.get("image_source") or f"pope-{qid}"),
                    "question": str(_field(row, task, "question", n)), "question_id": qid, "label": label}
            if row.get("category") is not None:
                item["category"] = row["category"]
            items.append(item)
        ids = [it["id"] for it in items]
        if len(set(ids)) != len(ids) and all("category" in it for it in items):
            for it in items:  # the default config mixes the three samplings, each numbered alone
                it["id"] = it["question_id"] = f"{it['category']}/{it['question_id']}"
        return items
    if task == "mme":
        seen: dict = {}
        for n, row in enumerate(rows):
            qid, cat = str(_field(row, task, "id", n)), str(_field(row, task, "category", n))
            k = seen[(cat, qid)] = seen.get((cat, qid), -1) + 1
            item_id = f"{cat}/{os.path.basename(qid)}/{k}"
            items.append({"id": item_id, "image": save_image(_field(row, task, "image", n), image_dir,
                                                             f"{cat}-{os.path.basename(qid)}"),
                          "question": str(_field(row, task, "question", n)), "question_id": item_id,
                          "label": str(_field(row, task, "label", n)).strip(), "category": cat})
        return items
    for n, row in enumerate(rows):  # amber
        rid = _field(row, task, "id", n)
        rid = int(rid) if isinstance(rid, str) and rid.isdigit() else rid
        items.append({"id": rid, "image": save_image(_field(row, task, "image", n), image_dir, f"AMBER_{rid}"),
                      "question": str(_field(row, task, "question", n))})
    return items


def load_hub_items(task: str, spec: str, image_dir: str) -> list[dict]:
    """`hub_items` of the split named by `spec` (parse_hub_spec); image paths absolute."""
    name, config, split = parse_hub_spec(spec)
    _check_task(task)
    items = hub_items(task, load_rows(name, config, split), image_dir)
    for it in items:
        it["image"] = os.path.abspath(it["image"])
    return items
