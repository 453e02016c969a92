"""kvfix.eval.scoring against hand-computed values (POPE, CHAIR, MME, AMBER, bootstrap, CLI).

Every expected number below is worked out by hand in the comments from the benchmark's own
definition; the annotation folders are generated in tmp_path (nothing is downloaded).
"""
import json

import pytest

from kvfix.eval.scoring import (Chair, bootstrap_ci, bootstrap_cis, load_amber, mme_parse, pope_parse,
                                pope_parse_strict, score_amber, score_main, score_mme, score_pope,
                                score_task)
from kvfix.eval.scoring.bootstrap import percentile
from kvfix.eval.scoring.text import noun_lemma

# ---------------------------------------------------------------------------------------- POPE

PARSER_CASES = [
    # text, official, strict
    ("No, there is not.", "no", "no"),      # first sentence "No, there is not" -> words No there is not
    ("Yes.", "yes", "yes"),
    ("There is no dog", "no", None),        # "no" among the words
    ("I don't know", "yes", None),          # no negation word: official reads yes
    ("Not really", "yes", None),            # capital "Not" is not in the official list
    ("NO", "yes", "no"),                    # the official parser does not lowercase
    ("", "yes", None),
    ("no\nthere is none", "yes", "no"),     # split on single spaces only: "no\nthere" is one word
    ("Yes, there is a dog, not a cat.", "no", "yes"),   # commas dropped: "not" in the first sentence
    ("Yes there is a dog. No cat.", "yes", "yes"),      # only the first sentence is read
    ("No", "no", "no"),
    ("  yes!", "yes", "yes"),
    ("Yesterday", "yes", None),
]


@pytest.mark.parametrize("text,official,strict", PARSER_CASES)
def test_pope_parsers(text, official, strict):
    assert pope_parse(text) == official
    assert pope_parse_strict(text) == strict


POPE_LABELS = ["yes", "yes", "yes", "no", "no", "no", "Yes", "no"]
POPE_ANSWERS = ["Yes.", "No, there is not.", "Yes, there is a dog.", "There is no dog", "I don't know",
                "no", "", "Not really"]


def test_score_pope_official():
    # official: yes no yes no yes no yes yes -> TP 0,2,6  FN 1  TN 3,5  FP 4,7
    m = score_pope(POPE_LABELS, POPE_ANSWERS)
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["n"]) == (3, 1, 2, 2, 8)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)  # 2/3
    assert m["yes_ratio"] == pytest.approx(5 / 8)
    assert "unparsed" not in m


def test_score_pope_strict():
    # strict: yes no yes - - no - -  -> label yes: TP 0,2  FN 1 and 6 (unparsed)
    #                                  label no: TN 5, unparsed 3,4,7 (wrong, not FP)
    m = score_pope(POPE_LABELS, POPE_ANSWERS, parser="strict")
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["unparsed"]) == (2, 2, 1, 0, 4)
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(2 / 8)


def test_score_pope_degenerate_and_errors():
    m = score_pope(["no", "no"], ["No", "no."])   # nothing predicted yes, no positives
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        score_pope(["maybe"], ["yes"])
    with pytest.raises(ValueError):
        score_pope(["yes"], ["yes"], parser="loose")
    with pytest.raises(ValueError):
        score_pope(["yes", "no"], ["yes"])


# --------------------------------------------------------------------------------------- CHAIR

CATEGORIES = [(1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (18, "dog"), (17, "cat"),
              (25, "giraffe"), (58, "hot dog"), (62, "chair"), (63, "couch"), (65, "bed"),
              (67, "dining table"), (70, "toilet"), (88, "teddy bear")]


def make_coco(root, images, instances, captions):
    """A COCO-2014-format folder: root/annotations/{instances,captions}_val2014.json."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    imgs = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 48} for i in images]
    inst = {"images": imgs, "categories": [{"id": c, "name": n, "supercategory": "x"} for c, n in CATEGORIES],
            "annotations": [{"id": k, "image_id": im, "category_id": c, "bbox": [0, 0, 4, 4], "area": 16,
                             "iscrowd": 0} for k, (im, c) in enumerate(instances)]}
    caps = {"images": imgs, "annotations": [{"id": k, "image_id": im, "caption": c}
                                            for k, (im, c) in enumerate(captions)]}
    (ann / "instances_val2014.json").write_text(json.dumps(inst))
    (ann / "captions_val2014.json").write_text(json.dumps(caps))
    return root


@pytest.fixture
def coco(tmp_path):
    return make_coco(
        tmp_path / "coco", [1, 2, 3, 4],
        instances=[(1, 18), (1, 1), (1, 18), (2, 88), (2, 65), (3, 70), (4, 58), (4, 67)],
        captions=[(1, "A man walking his dog on the street."),     # person, dog
                  (1, "A bicycle leaning on the wall."),           # bicycle (from a caption only)
                  (2, "A teddy bear lying on a bed."),
                  (3, "A white toilet in a small bathroom."),
                  (4, "Two hot dogs on a plate.")])


# Ground truth: 1 {dog, person, bicycle}  2 {teddy bear, bed}  3 {toilet}  4 {hot dog, dining table}
GENERATED = [
    # dog, person, cat(H); 9 words; recalls dog, person (2 of 3)
    {"image_id": 1, "caption": "Two dogs and a man play near a cat."},
    # teddy bear, couch(H: sofa), teddy bear ("bear" alone never fires); 10 words; recalls 1 of 2
    {"image_id": 2, "caption": "A teddy bear sits on the sofa with teddy bears."},
    # toilet only: a seat next to a toilet is no chair; 7 words; recalls 1 of 1
    {"image_id": 3, "caption": "The seat of the toilet is up."},
    # hot dog, giraffe(H: a baby giraffe is no person), motorcycle(H: a motor bike is no bicycle);
    # 11 words; recalls 1 of 2
    {"image_id": 4, "caption": "A hot dog and a baby giraffe on a motor bike."},
]


def test_chair_ground_truth(coco):
    ch = Chair(str(coco))
    assert ch.gt_objects[1] == {"dog", "person", "bicycle"}
    assert ch.gt_objects[2] == {"teddy bear", "bed"}
    assert ch.gt_objects[3] == {"toilet"}
    assert ch.gt_objects[4] == {"hot dog", "dining table"}


def test_chair_score(coco):
    m = Chair(str(coco)).score(GENERATED)
    assert m["n"] == 4
    assert m["chair_s"] == pytest.approx(3 / 4)       # captions 1, 2, 4
    assert m["chair_i"] == pytest.approx(4 / 10)      # 1 + 1 + 0 + 2 of 3 + 3 + 1 + 3 mentions
    assert m["recall"] == pytest.approx(5 / 8)        # (2 + 1 + 1 + 1) / (3 + 2 + 1 + 2)
    assert m["avg_len"] == pytest.approx(37 / 4)      # (9 + 10 + 7 + 11) / 4


def test_chair_per_caption(coco):
    d = Chair(str(coco)).per_caption(GENERATED)
    assert d[0]["mentioned"] == ["cat", "dog", "person"]
    assert d[0]["hallucinated"] == ["cat"]
    assert d[0]["recalled"] == ["dog", "person"]
    assert d[0]["gt_objects"] == ["bicycle", "dog", "person"]
    cap = GENERATED[3]["caption"]
    spans = [(cap[m["start"]:m["end"]], m["object"], m["hallucinated"]) for m in d[3]["mentions"]]
    assert spans == [("hot dog", "hot dog", False), ("baby giraffe", "giraffe", True),
                     ("motor bike", "motorcycle", True)]
    assert [m["word"] for m in d[1]["mentions"]] == ["teddy bear", "sofa", "teddy bear"]
    with pytest.raises(KeyError):
        Chair(str(coco)).per_caption([{"image_id": 99, "caption": "a dog"}])


@pytest.mark.parametrize("caption,words,nodes", [
    ("Two wine glasses and skis", ["wine glass", "ski"], ["wine glass", "skis"]),
    ("knives, forks and a spoon", ["knife", "fork", "spoon"], ["knife", "fork", "spoon"]),
    ("people and children", ["people", "child"], ["person", "person"]),
    ("a passenger train on train tracks", ["train"], ["train"]),   # no person; "train track" no train
    ("a man in a bow tie at home plate", ["man", "tie"], ["person", "tie"]),
    ("puppies, kittens and a TV", ["puppy", "kitten", "tv"], ["dog", "cat", "tv"]),
    ("an adult elephant and a baby cub", ["elephant"], ["elephant"]),
    ("a toilet seat", ["toilet"], ["toilet"]),
    ("a seat", ["seat"], ["chair"]),
    ("cell phones on the dining tables", ["cell phone", "table"], ["cell phone", "dining table"]),
    ("a hot-dog stand", [], []),                                   # a hyphenated word is one word
    ("", [], []),
])
def test_chair_caption_objects(coco, caption, words, nodes):
    assert Chair(str(coco)).caption_objects(caption) == (words, nodes)


def test_chair_annotation_folder_errors(tmp_path, coco):
    with pytest.raises(FileNotFoundError):
        Chair(str(tmp_path / "nowhere"))
    # the annotations folder itself is accepted too
    assert Chair(str(coco / "annotations")).gt_objects[3] == {"toilet"}


def test_noun_lemma_offline():
    assert [noun_lemma(w) for w in ["dogs", "buses", "knives", "geese", "mice", "children"]] == \
        ["dog", "bus", "knife", "goose", "mouse", "child"]


# ----------------------------------------------------------------------------------------- MME

@pytest.mark.parametrize("answer,parsed", [
    ("Yes", "yes"), ("no", "no"), (" No.\n", "no"), ("Yes, there is.", "yes"),
    ("Not sure", "no"),            # "no" within the first four characters
    ("The answer is no", "other"), ("", "other"), ("nope", "no"),
])
def test_mme_parse(answer, parsed):
    assert mme_parse(answer) == parsed


MME_RECORDS = [
    # existence: image a both right; image b one right ("The answer is no" -> other)
    dict(question_id=1, image="a.jpg", subtask="existence", label="Yes", answer="Yes"),
    dict(question_id=2, image="a.jpg", subtask="existence", label="No", answer="No, there is not."),
    dict(question_id=3, image="b.jpg", subtask="existence", label="Yes", answer="yes"),
    dict(question_id=4, image="b.jpg", subtask="existence", label="No", answer="The answer is no"),
    # count: image c one right
    dict(question_id=5, image="c.jpg", subtask="count", label="Yes", answer="no"),
    dict(question_id=6, image="c.jpg", subtask="count", label="No", answer="No"),
]


def test_score_mme():
    m = score_mme(MME_RECORDS)
    assert list(m) == ["existence", "count", "total"]
    e, c = m["existence"], m["count"]
    assert (e["acc"], e["acc_plus"], e["n"], e["images"], e["other"]) == (0.75, 0.5, 4, 2, 1)
    assert e["score"] == pytest.approx(125.0)     # (3/4 + 1/2) * 100
    assert (c["acc"], c["acc_plus"]) == (0.5, 0.0)
    assert c["score"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(175.0)


# --------------------------------------------------------------------------------------- AMBER

def make_amber(root):
    root.mkdir()
    relation = {"dog": ["puppy"], "cat": ["kitten"], "grass": ["lawn"], "car": [], "tree": [], "animal": []}
    ann = [dict(id=1, type="generative", truth=["dog", "grass"], hallu=["cat", "car"]),
           dict(id=2, type="generative", truth=["tree"], hallu=["dog"]),
           dict(id=8, type="generative", truth=["cat"], hallu=["tree"]),
           dict(id=3, type="discriminative-hallucination", truth="no"),
           dict(id=4, type="discriminative-hallucination", truth="yes"),
           dict(id=5, type="discriminative-attribute-state", truth="no"),
           dict(id=6, type="discriminative-attribute-number", truth="yes"),
           dict(id=7, type="discriminative-relation", truth="no")]
    (root / "annotations.json").write_text(json.dumps(ann))
    (root / "relation.json").write_text(json.dumps(relation))
    (root / "safe_words.txt").write_text("animal\n")
    return root


AMBER_RESPONSES = [
    # puppy covers dog, lawn covers grass, kitten: hallucinated and mentions hallu "cat", animal: safe
    dict(id=1, response="A puppy on the lawn chasing a kitten, an animal."),
    # dog: hallucinated (mentions hallu "dog"); the truth "tree" is not covered
    dict(id=2, response="Dogs on a road."),
    # kitten covers cat
    dict(id=8, response="A kitten."),
    dict(id=3, response="No"),        # truth no: right, answered no
    dict(id=4, response="No"),        # truth yes: wrong, answered no
    dict(id=5, response="Yes"),       # truth no: wrong
    dict(id=6, response="Yes."),      # truth yes: not exactly "Yes": wrong
    dict(id=7, response=" No\n"),     # truth no: right
]


def test_score_amber(tmp_path):
    m = score_amber(AMBER_RESPONSES, load_amber(str(make_amber(tmp_path / "amber"))))
    g = m["generative"]
    assert g["n"] == 3
    assert g["chair"] == pytest.approx(2 / 6)   # nouns: puppy lawn kitten animal | dog | kitten
    assert g["cover"] == pytest.approx(3 / 4)   # dog grass | - | cat  of 2 + 1 + 1 truth objects
    assert g["hal"] == pytest.approx(2 / 3)
    assert g["cog"] == pytest.approx(2 / 4)     # cat | dog  of 2 + 1 + 1 hallu objects
    d = m["discriminative"]
    assert set(d) == {"all", "existence", "attribute", "state", "number", "relation"}
    # all: right 3, 7; answered no 3, 4, 7; truth no 3, 5, 7; both 3, 7
    assert d["all"]["accuracy"] == pytest.approx(2 / 5)
    assert (d["all"]["precision"], d["all"]["recall"], d["all"]["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # existence (3, 4): P 1/2, R 1/1
    assert (d["existence"]["accuracy"], d["existence"]["f1"]) == pytest.approx((0.5, 2 / 3))
    assert (d["attribute"]["accuracy"], d["attribute"]["precision"], d["attribute"]["f1"]) == (0.0, 0.0, 0.0)
    assert d["state"]["n"] == 1 and d["number"]["n"] == 1
    assert (d["relation"]["accuracy"], d["relation"]["f1"]) == (1.0, 1.0)
    with pytest.raises(KeyError):
        score_amber([dict(id=99, response="Yes")], load_amber(str(tmp_path / "amber")))


# ----------------------------------------------------------------------------------- bootstrap

def test_percentile_and_bootstrap():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.025) == pytest.approx(1.075)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert bootstrap_ci(mean, [0.3] * 7, n=50) == pytest.approx((0.3, 0.3))
    items = [0.0] * 10 + [1.0] * 10
    lo, hi = bootstrap_ci(mean, items, n=200, seed=1)
    assert 0.0 < lo < 0.5 < hi < 1.0
    assert bootstrap_ci(mean, items, n=200, seed=1) == (lo, hi)
    cis = bootstrap_cis(lambda xs: {"m": mean(xs), "n": len(xs), "g": {"x": mean(xs)}}, items, n=200, seed=1)
    assert cis == {"m": [lo, hi], "g": {"x": [lo, hi]}}          # ints get no interval
    with pytest.raises(ValueError):
        bootstrap_ci(mean, [], n=10)


# ------------------------------------------------------------------------------ score_task, CLI

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pope_files(tmp_path):
    qs = [dict(question_id=i, image=f"{i}.jpg", text="Is there a dog in the image?", label=lab)
          for i, lab in enumerate(POPE_LABELS)]
    ans = [dict(question_id=i, text=a) for i, a in enumerate(POPE_ANSWERS)][::-1]   # any order
    return write_jsonl(tmp_path / "q.jsonl", qs), write_jsonl(tmp_path / "a.jsonl", ans)


def test_score_task_pope_matches_by_id(tmp_path):
    from kvfix.eval.scoring.cli import read_records
    q, a = pope_files(tmp_path)
    out = score_task("pope", read_records(a), data={"questions": read_records(q)}, bootstrap=0)
    assert out["official"]["accuracy"] == pytest.approx(5 / 8)
    assert out["strict"]["accuracy"] == pytest.approx(3 / 8)
    assert "ci95" not in out["official"]
    with pytest.raises(ValueError):
        score_task("pope", read_records(a)[1:], data={"questions": read_records(q)})
    with pytest.raises(ValueError):
        score_task("vqa", [], data={})


def run_cli(capsys, argv):
    assert score_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_pope(tmp_path, capsys):
    q, a = pope_files(tmp_path)
    out = run_cli(capsys, ["pope", "--questions", q, "--answers", a, "--bootstrap", "100"])
    off = out["official"]
    assert (off["accuracy"], off["yes_ratio"]) == pytest.approx((5 / 8, 5 / 8))
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        lo, hi = off["ci95"][key]
        assert lo <= hi
    assert out["strict"]["unparsed"] == 4


def test_cli_chair(coco, tmp_path, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", GENERATED)
    out = run_cli(capsys, ["chair", "--captions", caps, "--coco", str(coco), "--bootstrap", "100"])
    assert (out["chair_s"], out["chair_i"], out["recall"], out["avg_len"]) == pytest.approx((0.75, 0.4, 0.625, 9.25))
    assert set(out["ci95"]) == {"chair_s", "chair_i", "recall", "avg_len"}
    lo, hi = out["ci95"]["chair_i"]
    assert 0.0 <= lo <= hi <= 1.0


def test_cli_mme(tmp_path, capsys):
    qs = [dict(question_id=r["question_id"], image=r["image"], text="Is there a dog?", label=r["label"],
               category=r["subtask"]) for r in MME_RECORDS]
    ans = [dict(question_id=r["question_id"], text=r["answer"]) for r in MME_RECORDS]
    out = run_cli(capsys, ["mme", "--questions", write_jsonl(tmp_path / "q.jsonl", qs),
                           "--answers", write_jsonl(tmp_path / "a.jsonl", ans), "--bootstrap", "0"])
    assert out["total"] == pytest.approx(175.0)
    assert out["existence"]["score"] == pytest.approx(125.0)


def test_cli_amber(tmp_path, capsys):
    amber = make_amber(tmp_path / "amber")
    answers = tmp_path / "amber_answers.json"
    answers.write_text(json.dumps(AMBER_RESPONSES))                  # AMBER's own JSON list
    out = run_cli(capsys, ["amber", "--answers", str(answers), "--amber", str(amber), "--bootstrap", "50"])
    assert out["generative"]["cover"] == pytest.approx(0.75)
    assert out["discriminative"]["existence"]["f1"] == pytest.approx(2 / 3)
    assert "existence" in out["discriminative"]["ci95"]
