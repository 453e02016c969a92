"""kvfix.eval.hub: hub datasets (`--data hub:...`) read into the same items as the local layouts.

Nothing is downloaded: rows are plain dicts shaped as lmms-lab's POPE / MME datasets give them
(the field mapping needs no `datasets`), `run` is driven with the row loader replaced, and where
the `datasets` package is installed a `Dataset` saved with save_to_disk goes through the real
loader (`hub:/folder`).
"""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from kvfix.eval import data as data_mod
from kvfix.eval import hub
from kvfix.eval.scoring import score_task


def _jpeg(seed, h=24, w=32):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def pope_rows():
    imgs = [_jpeg(s) for s in range(3)]
    return [{"id": str(k), "question_id": str(k + 1), "question": f"Is there a w{k} in the image?",
             "answer": "yes" if k % 2 else "no", "image_source": f"COCO_val2014_{k % 3:012d}",
             "image": {"bytes": imgs[k % 3], "path": None}, "category": "adversarial"} for k in range(5)]


def test_parse_hub_spec():
    assert hub.parse_hub_spec("hub:lmms-lab/POPE") == ("lmms-lab/POPE", None, "test")
    assert hub.parse_hub_spec("hub:lmms-lab/POPE:Full@adversarial") == ("lmms-lab/POPE", "Full", "adversarial")
    assert hub.parse_hub_spec("hub:/data/pope_saved@test") == ("/data/pope_saved", None, "test")
    assert hub.is_hub("hub:x") and not hub.is_hub("coco_pope.json")
    with pytest.raises(ValueError, match="no dataset name"):
        hub.parse_hub_spec("hub:@test")


def test_pope_rows_become_pope_items(tmp_path):
    rows = pope_rows()
    items = hub.hub_items("pope", rows, str(tmp_path / "img"))
    assert [it["id"] for it in items] == ["1", "2", "3", "4", "5"]
    assert [it["label"] for it in items] == ["no", "yes", "no", "yes", "no"]
    assert items[2]["question"] == "Is there a w2 in the image?" and items[2]["question_id"] == "3"
    # The stored bytes are written unchanged, once per distinct image, named from image_source.
    for it, row in zip(items, rows):
        with open(it["image"], "rb") as f:
            assert f.read() == row["image"]["bytes"]
    assert items[0]["image"] == items[3]["image"] and len(os.listdir(tmp_path / "img")) == 3
    assert os.path.basename(items[1]["image"]).startswith("COCO_val2014_000000000001-")
    assert items[1]["image"].endswith(".jpg")
    # The default config numbers each sampling alone: repeated ids get the category in front.
    mixed = rows + [dict(rows[0], category="random")]
    ids = [it["id"] for it in hub.hub_items("pope", mixed, str(tmp_path / "img"))]
    assert ids[0] == "adversarial/1" and ids[-1] == "random/1" and len(set(ids)) == 6
    # Labels in any case; a decoded PIL image is saved as PNG.
    pil = dict(rows[0], answer=" Yes", image=Image.open(io.BytesIO(rows[0]["image"]["bytes"])))
    (it,) = hub.hub_items("pope", [pil], str(tmp_path / "png"))
    assert it["label"] == "yes" and it["image"].endswith(".png")
    assert np.array_equal(np.asarray(Image.open(it["image"])), np.asarray(pil["image"]))


def test_bad_rows_and_tasks_name_the_problem(tmp_path):
    row = pope_rows()[0]
    with pytest.raises(ValueError, match="no question field"):
        hub.hub_items("pope", [{k: v for k, v in row.items() if k != "question"}], str(tmp_path))
    with pytest.raises(ValueError, match="yes or no"):
        hub.hub_items("pope", [dict(row, answer="maybe")], str(tmp_path))
    with pytest.raises(ValueError, match="CHAIR"):
        data_mod.load_items("chair", "hub:x", images=str(tmp_path))
    with pytest.raises(ValueError, match="--images"):
        data_mod.load_items("pope", "hub:x")
    with pytest.raises(ValueError, match="--amber-data"):
        data_mod.load_items("amber", "hub:x", images=str(tmp_path))


def test_mme_rows_match_the_local_layout(tmp_path):
    """The same MME questions as hub rows and in MME's release layout give the same items (image
    paths aside) and the same scores, acc+ grouping the two questions of each image."""
    local = tmp_path / "MME"
    rows = []
    for cat, names in (("existence", ["000000000001.jpg", "000000000002.jpg"]), ("count", ["000000000003.jpg"])):
        os.makedirs(local / cat)
        for j, name in enumerate(names):
            img = _jpeg(len(rows) + j)
            (local / cat / name).write_bytes(img)
            qa = [(f"Is there a w{j} here? Please answer yes or no.", "Yes"), (f"Is there a w{j + 5}?", "No")]
            (local / cat / (name[:-4] + ".txt")).write_text("".join(f"{q}\t{a}\n" for q, a in qa))
            rows += [{"question_id": f"{cat}/{name}", "question": q, "answer": a, "category": cat,
                      "image": {"bytes": img, "path": name}} for q, a in qa]
    from_hub = hub.hub_items("mme", rows, str(tmp_path / "img"))
    from_disk = data_mod.load_items("mme", str(local))
    def strip(its):
        return sorted((dict(it, image=None) for it in its), key=lambda it: it["id"])
    assert strip(from_hub) == strip(from_disk)
    assert from_hub[0]["id"] == "existence/000000000001.jpg/0" and from_hub[1]["id"] == "existence/000000000001.jpg/1"
    answers = ["Yes", "No", "Yes", "Yes", "No", "No"]  # image 1 right twice, image 2 once, image 3 once
    by_id = dict(zip([it["id"] for it in from_hub], answers))
    scores = [score_task("mme", [{"question_id": it["id"], "text": by_id[it["id"]]} for it in its],
                         data=data_mod.scoring_data("mme", "", its), bootstrap=0) for its in (from_hub, from_disk)]
    assert scores[0] == scores[1]
    assert scores[0]["existence"]["acc"] == pytest.approx(3 / 4) and scores[0]["existence"]["acc_plus"] == 0.5
    assert scores[0]["count"]["acc"] == 0.5 and scores[0]["count"]["acc_plus"] == 0.0


def test_amber_rows_and_split_from_the_annotations(tmp_path):
    rows = [{"id": k, "query": "Describe this image." if k == 1 else f"Is there a w{k}?",
             "image": {"bytes": _jpeg(k), "path": f"AMBER_{k}.jpg"}} for k in (1, 2, 3)]
    items = hub.hub_items("amber", rows, str(tmp_path / "img"))
    assert [(it["id"], it["question"]) for it in items] == [(1, "Describe this image."), (2, "Is there a w2?"),
                                                           (3, "Is there a w3?")]
    ann = tmp_path / "amber_data"
    os.makedirs(ann)
    (ann / "annotations.json").write_text(json.dumps([
        {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 3, "type": "discriminative-hallucination", "truth": "no"}]))
    (ann / "relation.json").write_text("{}")
    (ann / "safe_words.txt").write_text("")
    orig = hub.load_rows
    hub.load_rows = lambda name, config, split: rows
    try:
        gen = data_mod.load_items("amber", "hub:fake/AMBER", images=str(tmp_path / "img"), split="generative",
                                  amber_data=str(ann))
        disc = data_mod.load_items("amber", "hub:fake/AMBER", images=str(tmp_path / "img"),
                                   split="discriminative", amber_data=str(ann))
    finally:
        hub.load_rows = orig
    assert [it["id"] for it in gen] == [1] and [it["id"] for it in disc] == [2, 3]
    assert data_mod.scoring_data("amber", "hub:fake/AMBER", items, amber_data=str(ann)) == {"amber_dir": str(ann)}


def test_run_from_hub_rows_equals_the_local_run(tmp_path, monkeypatch):
    """`run --data hub:...` on rows holding the local POPE file's questions and image bytes
    answers exactly as the run on the local files (tiny LLaVA, greedy)."""
    pytest.importorskip("transformers")
    pytest.importorskip("lemminflect")
    from test_eval_run import _run, tiny_llava_processor

    from kvfix.hf.testing import tiny_llava
    model_dir = str(tmp_path / "model")
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    img_dir = tmp_path / "val2014"
    os.makedirs(img_dir)
    rows = []
    with open(tmp_path / "pope.json", "w") as f:
        for q in range(4):
            name = f"COCO_val2014_{q % 3:012d}.jpg"
            (img_dir / name).write_bytes(_jpeg(q % 3, 40 + q % 3, 48))
            rec = {"question_id": q + 1, "image": name, "text": f"w{q} w{q + 1} w7", "label": "yes" if q % 2 else "no"}
            f.write(json.dumps(rec) + "\n")
            rows.append({"question_id": q + 1, "question": rec["text"], "answer": rec["label"],
                         "image": {"bytes": (img_dir / name).read_bytes(), "path": name}})
    local = {"pope": str(tmp_path / "pope.json"), "images": str(img_dir)}
    preds_local, m_local = _run("pope", model_dir, local, tmp_path / "local")
    monkeypatch.setattr(hub, "load_rows", lambda name, config, split: rows)
    out = tmp_path / "hub"
    from kvfix.eval import run as run_mod
    from kvfix.eval.__main__ import main as eval_main
    assert eval_main(["run", "--task", "pope", "--model", model_dir, "--data", "hub:lmms-lab/POPE:Full@random",
                      "--out", str(out), "--set", "max_new_tokens=4", "--bootstrap", "50", "--no-progress"]) == 0
    preds_hub = run_mod.read_predictions(str(out / "predictions.jsonl"))
    assert [(p["id"], p["text"]) for p in preds_hub] == [(p["id"], p["text"]) for p in preds_local]
    assert all(p["image"].startswith(str(out / "images")) for p in preds_hub)
    with open(out / "metrics.json") as f:
        m_hub = json.load(f)
    assert m_hub["data"]["data"] == "hub:lmms-lab/POPE:Full@random"
    assert m_hub["metrics"]["official"]["f1"] == m_local["metrics"]["official"]["f1"]
    # A rerun resumes (the identity records the hub spec as given).
    assert eval_main(["run", "--task", "pope", "--model", model_dir, "--data", "hub:lmms-lab/POPE:Full@random",
                      "--out", str(out), "--set", "max_new_tokens=4", "--bootstrap", "0", "--no-progress"]) == 0


def test_saved_dataset_through_the_datasets_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = pope_rows()
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "image"}
    cols["image"] = [{"bytes": r["image"]["bytes"], "path": f"{r['image_source']}.jpg"} for r in rows]
    features = datasets.Features({**{k: datasets.Value("string") for k in cols if k != "image"},
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(cols, features=features)
    datasets.DatasetDict({"adversarial": ds}).save_to_disk(str(tmp_path / "saved"))
    items = hub.load_hub_items("pope", f"hub:{tmp_path / 'saved'}@adversarial", str(tmp_path / "img"))
    expect = hub.hub_items("pope", rows, str(tmp_path / "img2"))
    assert [dict(it, image=None) for it in items] == [dict(it, image=None) for it in expect]
    for it, row in zip(items, rows):
        with open(it["image"], "rb") as f:
            assert f.read() == row["image"]["bytes"]
    with pytest.raises(ValueError, match="no split 'test'"):
        hub.load_hub_items("pope", f"hub:{tmp_path / 'saved'}", str(tmp_path / "img"))
