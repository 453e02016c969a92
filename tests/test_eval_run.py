"""kvfix.eval run / score / compare end to end on a tiny random LLaVA and generated data in the
benchmarks' official layouts (no download): loading, prompting, batching, every method and a
stack, resuming, sharding over two processes, the records written, their scoring by
kvfix.eval.scoring, and the comparison page.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("lemminflect")
from PIL import Image  # noqa: E402

from kvfix.eval import compare as compare_mod  # noqa: E402
from kvfix.eval import data as data_mod  # noqa: E402
from kvfix.eval import protocols  # noqa: E402
from kvfix.eval import run as run_mod  # noqa: E402
from kvfix.eval.__main__ import main as eval_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ tiny model
def tiny_llava_processor():
    """A LlavaProcessor built offline: CLIP image processor (32 px, centre crop) + a word-level
    tokenizer whose ids match kvfix.hf.testing.tiny_llava (0 pad, 1 bos, 2 eos, 100 <image>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(96)] + ["<image>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:{% endfor %}")
    return LlavaProcessor(image_processor=ip, tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=template)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvfix.hf.testing import tiny_llava
    d = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(d)
    tiny_llava_processor().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    import transformers

    from kvfix.depth import default_processor
    bb = transformers.Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, out_indices=[1, 2],
                                   reshape_hidden_states=False, initializer_range=0.2)
    cfg = transformers.DepthAnythingConfig(backbone_config=bb, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16],
                                           reassemble_factors=[4, 2], fusion_hidden_size=16, head_hidden_size=8,
                                           initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = transformers.DepthAnythingForDepthEstimation(cfg).eval()
        with torch.no_grad():
            m.head.conv3.bias.fill_(2.0)
    d = tmp_path_factory.mktemp("tiny_depth")
    m.save_pretrained(d)
    default_processor(cfg).save_pretrained(d)
    return str(d)


# ------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A few images in the official layouts of COCO (CHAIR, POPE), MME and AMBER."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def image(path, h=40, w=48):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

    coco = root / "coco"
    ids = [42, 73, 139, 285, 632, 724]
    names = [f"COCO_val2014_{i:012d}.jpg" for i in ids]
    for k, n in enumerate(names):
        image(str(coco / "val2014" / n), 40 + 4 * k, 48)
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    os.makedirs(coco / "annotations")
    with open(coco / "annotations" / "instances_val2014.json", "w") as f:
        json.dump({"images": [{"id": i, "file_name": n} for i, n in zip(ids, names)], "categories": cats,
                   "annotations": [{"id": k, "image_id": i, "category_id": 1 + k % 2} for k, i in enumerate(ids)]}, f)
    with open(coco / "annotations" / "captions_val2014.json", "w") as f:
        json.dump({"images": [{"id": i, "file_name": n} for i, n in zip(ids, names)],
                   "annotations": [{"id": k, "image_id": i, "caption": "a person with a dog"}
                                   for k, i in enumerate(ids)]}, f)
    pope = root / "coco_pope_random.json"
    with open(pope, "w") as f:
        for q in range(6):
            f.write(json.dumps({"question_id": q + 1, "image": names[q % 6], "text": f"w{q} w{q + 1} w7",
                                "label": "yes" if q % 2 else "no"}) + "\n")
    mme = root / "MME_Benchmark_release_version"
    for k in range(2):  # existence: images/ + questions_answers_YN/
        image(str(mme / "existence" / "images" / f"{k:012d}.jpg"))
        os.makedirs(mme / "existence" / "questions_answers_YN", exist_ok=True)
        with open(mme / "existence" / "questions_answers_YN" / f"{k:012d}.txt", "w") as f:
            f.write(f"w{k} w3 w5\tYes\nw{k} w8 w9\tNo\n")
    for k in range(2):  # color: images and .txt side by side
        image(str(mme / "color" / f"{k:012d}.png"))
        with open(mme / "color" / f"{k:012d}.txt", "w") as f:
            f.write(f"w{k + 10} w11\tYes\nw{k + 10} w12\tNo\n")
    amber = root / "AMBER"
    for k in range(3):
        image(str(amber / "image" / f"AMBER_{k + 1}.jpg"))
    os.makedirs(amber / "data" / "query")
    with open(amber / "data" / "query" / "query_all.json", "w") as f:
        json.dump([{"id": k + 1, "image": f"AMBER_{k + 1}.jpg", "query": "w1 w2" if k else "Describe this image."}
                   for k in range(3)], f)
    with open(amber / "data" / "annotations.json", "w") as f:
        json.dump([{"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
                   {"id": 2, "type": "discriminative-hallucination", "truth": "yes"},
                   {"id": 3, "type": "discriminative-hallucination", "truth": "no"}], f)
    with open(amber / "data" / "relation.json", "w") as f:
        json.dump({"dog": [], "cat": []}, f)
    (amber / "data" / "safe_words.txt").write_text("animal\n")
    return {"root": str(root), "coco": str(coco), "pope": str(pope), "images": str(coco / "val2014"),
            "mme": str(mme), "amber": str(amber)}


def _task_args(task, datasets):
    if task == "pope":
        return ["--data", datasets["pope"], "--images", datasets["images"]]
    return ["--data", datasets[{"chair": "coco", "mme": "mme", "amber": "amber"}[task]]]


def _run(task, model_dir, datasets, out, *extra, tokens=4):
    argv = ["run", "--task", task, "--model", model_dir, *_task_args(task, datasets), "--out", str(out),
            "--set", f"max_new_tokens={tokens}", "--bootstrap", "50", "--no-progress", *extra]
    assert eval_main(argv) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return run_mod.read_predictions(os.path.join(out, "predictions.jsonl")), metrics


def _answers(preds):
    return [(p["id"], p["seed"], p["text"]) for p in preds]


# ------------------------------------------------------------------------------------------ tests
def test_loaders_read_the_official_layouts(datasets):
    pope = data_mod.load_items("pope", datasets["pope"], images=datasets["images"])
    assert [p["question_id"] for p in pope] == [1, 2, 3, 4, 5, 6] and pope[1]["label"] == "yes"
    assert all(os.path.exists(p["image"]) for p in pope)
    chair = data_mod.load_items("chair", datasets["coco"])
    assert [c["image_id"] for c in chair] == [42, 73, 139, 285, 632, 724]
    pick = data_mod.load_items("chair", datasets["coco"], image_set="random-3", image_seed=5)
    assert len(pick) == 3 and pick == data_mod.load_items("chair", datasets["coco"], image_set="random-3", image_seed=5)
    mme = data_mod.load_items("mme", datasets["mme"])
    assert len(mme) == 8 and {m["category"] for m in mme} == {"existence", "color"}
    assert mme[0]["question_id"] == "color/000000000000.png/0" and mme[0]["label"] == "Yes"
    assert all(os.path.exists(m["image"]) for m in mme)
    amber = data_mod.load_items("amber", datasets["amber"])
    assert [a["id"] for a in amber] == [1, 2, 3] and amber[0]["question"] == "Describe this image."
    with pytest.raises(ValueError, match="--images"):
        data_mod.load_items("pope", datasets["pope"])


def test_protocol_presets_and_overrides():
    p = protocols.get_preset("cmac-pope", "pope")
    assert p.do_sample and p.max_new_tokens == 64 and "IMCCD" in p.source and p.methods == ("cmac:preset=pope",)
    for name, preset in protocols.PRESETS.items():
        assert preset.source and name.endswith(preset.task), name
    q, rec = protocols.apply_overrides(p, ["max_new_tokens=8", "seeds=1,2", "do_sample=false", "top_k=none"])
    assert (q.max_new_tokens, q.seeds, q.do_sample, q.top_k) == (8, (1, 2), False, None)
    assert rec == {"max_new_tokens": 8, "seeds": [1, 2], "do_sample": False, "top_k": None}
    with pytest.raises(ValueError, match="FIELD"):
        protocols.apply_overrides(p, ["no_such=1"])
    with pytest.raises(ValueError, match="task"):
        protocols.get_preset("cmac-pope", "chair")
    assert run_mod.parse_method("kvsmooth:lam_ref=0.9,band=0.2") == ("kvsmooth", {"lam_ref": 0.9, "band": 0.2})
    with pytest.raises(ValueError, match="unknown method"):
        run_mod.parse_method("opera")


def test_run_pope_writes_predictions_and_metrics(model_dir, datasets, tmp_path):
    preds, metrics = _run("pope", model_dir, datasets, tmp_path / "r", "--batch-size", "4")
    assert [p["id"] for p in preds] == [1, 2, 3, 4, 5, 6]
    assert all(p["seed"] == 0 and p["label"] in ("yes", "no") and "question_id" in p for p in preds)
    assert preds[0]["prompt"] == "w0 w1 w7\nAnswer the question using a single word or phrase."
    assert all(len(p["text"].split()) <= 4 for p in preds) and any(p["text"] for p in preds)
    # Each answer is what model.generate gives for the prompt through the processor's chat template.
    model, proc = run_mod.load_model(model_dir)
    proc.tokenizer.padding_side = "left"
    text = run_mod._chat_text(proc, protocols.get_preset("plain-pope"), preds[2]["prompt"])
    assert text.startswith("USER: <image> w2 w3 w7")
    img = Image.open(preds[2]["image"]).convert("RGB")
    inp = proc(images=[img], text=[text], return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=0)
    answer = proc.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answer.strip() == preds[2]["text"]
    # The scorer's result for these predictions, intervals included.
    from kvfix.eval.scoring import score_task
    questions = data_mod.load_items("pope", datasets["pope"], images=datasets["images"])
    assert metrics["metrics"] == json.loads(json.dumps(score_task("pope", preds, data={"questions": questions},
                                                                  bootstrap=50)))
    off = metrics["metrics"]["official"]
    assert off["n"] == 6 and off["ci95"]["accuracy"][0] <= off["accuracy"] <= off["ci95"]["accuracy"][1]
    assert metrics["protocol"]["preset"] == "plain-pope" and metrics["protocol"]["overrides"] == {"max_new_tokens": 4}
    assert metrics["protocol"]["max_new_tokens"] == 4 and metrics["protocol"]["source"]
    env = metrics["environment"]
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and "transformers" in env
    t = metrics["timing"]
    assert t["generate_s"] > 0 and t["loop_s"] >= t["generate_s"] and t["harness_overhead"] is not None


def test_resume_after_interruption_and_limit(model_dir, datasets, tmp_path):
    full, _ = _run("pope", model_dir, datasets, tmp_path / "full", "--batch-size", "2")
    # --limit 2, then the whole set into the same folder: the first two are not generated again.
    _, lim = _run("pope", model_dir, datasets, tmp_path / "lim", "--batch-size", "2", "--limit", "2")
    assert lim["metrics"]["official"]["n"] == 2
    preds, metrics = _run("pope", model_dir, datasets, tmp_path / "lim", "--batch-size", "2")
    assert _answers(preds) == _answers(full)
    assert metrics["timing"]["per_rank"][0]["items"] == 4 and metrics["n_items"] == 6
    # An interrupted run: two complete lines and half of the third.
    path = tmp_path / "lim" / "predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:10])
    preds, metrics = _run("pope", model_dir, datasets, tmp_path / "lim", "--batch-size", "2")
    assert _answers(preds) == _answers(full) and metrics["timing"]["per_rank"][0]["items"] == 4
    # A different protocol into the same folder is refused.
    with pytest.raises(ValueError, match="another run"):
        _run("pope", model_dir, datasets, tmp_path / "lim", tokens=5)


def test_sampling_seeds_report_the_spread(model_dir, datasets, tmp_path):
    preds, metrics = _run("pope", model_dir, datasets, tmp_path / "s", "--set", "do_sample=true",
                          "--set", "seeds=3,4", "--limit", "3")
    assert [(p["id"], p["seed"]) for p in preds] == [(i, s) for s in (3, 4) for i in (1, 2, 3)]
    assert [p["seed"] for p in metrics["per_seed"]] == [3, 4]
    accs = [p["metrics"]["official"]["accuracy"] for p in metrics["per_seed"]]
    assert metrics["metrics"]["official.accuracy"] == pytest.approx(sum(accs) / 2)
    spread = metrics["seed_spread"]["official.accuracy"]
    assert (spread["min"], spread["max"]) == (min(accs), max(accs))
    again, _ = _run("pope", model_dir, datasets, tmp_path / "s2", "--set", "do_sample=true",
                    "--set", "seeds=3,4", "--limit", "3")
    assert _answers(again) == _answers(preds)  # sampling is reproducible
    # Batches of 2, interrupted after the first: the resumed run samples as the whole one.
    whole, _ = _run("pope", model_dir, datasets, tmp_path / "b", "--set", "do_sample=true", "--set", "seeds=3,4",
                    "--limit", "3", "--batch-size", "2")
    os.makedirs(tmp_path / "b2")
    (tmp_path / "b2" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:2]))
    resumed, metrics = _run("pope", model_dir, datasets, tmp_path / "b2", "--set", "do_sample=true",
                            "--set", "seeds=3,4", "--limit", "3", "--batch-size", "2")
    assert _answers(resumed) == _answers(whole) and metrics["timing"]["per_rank"][0]["items"] == 4


@pytest.mark.parametrize("task,n", [("chair", 6), ("mme", 8), ("amber", 3)])
def test_run_other_tasks(model_dir, datasets, tmp_path, task, n):
    preds, metrics = _run(task, model_dir, datasets, tmp_path / task, "--batch-size", "3")
    assert len(preds) == n
    m = metrics["metrics"]
    if task == "chair":
        assert preds[0]["prompt"] == "Please describe this image in detail."
        assert all(p["caption"] == p["text"] and "image_id" in p for p in preds)
        assert m["n"] == 6 and set(m["ci95"]) >= {"chair_s", "chair_i"}
        assert metrics["data"]["coco_dir"] == os.path.abspath(datasets["coco"])
    elif task == "mme":
        assert set(m) == {"existence", "color", "total", "ci95"}
        assert m["existence"]["n"] == 4 and m["color"]["images"] == 2
    else:
        assert all(p["response"] == p["text"] for p in preds)
        assert m["generative"]["n"] == 1 and m["discriminative"]["all"]["n"] == 2


STACK = ["dscr", "kvsmooth", "scr:top_k=2", "cmac"]


@pytest.mark.parametrize("methods", [[m] for m in STACK] + [STACK], ids=lambda m: "+".join(m))
def test_every_method_and_a_stack(model_dir, depth_dir, datasets, tmp_path, methods):
    out = tmp_path / "m"
    extra = [a for m in methods for a in ("--method", m)] + ["--depth-model", depth_dir, "--limit", "3"]
    preds, metrics = _run("pope", model_dir, datasets, out, "--batch-size", "2", *extra)
    assert len(preds) == 3 and metrics["methods"] == methods
    # The same run by hand: the methods enabled on the loaded model, generate on the same batches.
    import kvfix.hf
    model, proc = run_mod.load_model(model_dir)
    proc.tokenizer.padding_side = "left"
    handle = kvfix.hf.enable(model, *run_mod.build_methods(methods))
    items = data_mod.load_items("pope", datasets["pope"], images=datasets["images"])[:3]
    expect = []
    for b in (items[:2], items[2:]):
        imgs = [Image.open(it["image"]).convert("RGB") for it in b]
        texts = [run_mod._chat_text(proc, protocols.get_preset("plain-pope"),
                                    protocols.get_preset("plain-pope").prompt.format(question=it["question"]))
                 for it in b]
        inp = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        maps = None
        if "dscr" in methods:
            from kvfix.depth import DepthEstimator
            crops = (inp["pixel_values"] * torch.tensor(proc.image_processor.image_std).view(1, 3, 1, 1)
                     + torch.tensor(proc.image_processor.image_mean).view(1, 3, 1, 1)).clamp(0, 1)
            maps = DepthEstimator(depth_dir)([c.permute(1, 2, 0).numpy() for c in crops])
            assert all(m.shape == (32, 32) for m in maps)  # the processor's crop, not the 40x48 file
        out_ids = handle.generate(**inp, depth_maps=maps, max_new_tokens=4, do_sample=False, pad_token_id=0)
        expect += [t.strip() for t in proc.batch_decode(out_ids[:, inp["input_ids"].shape[1]:],
                                                        skip_special_tokens=True)]
    handle.disable()
    assert [p["text"] for p in preds] == expect
    if "dscr" in methods:
        assert len(os.listdir(out / "depth")) == 3  # cached: one map per image
        again, _ = _run("pope", model_dir, datasets, tmp_path / "m2", "--batch-size", "2", *extra,
                        "--depth-cache", str(out / "depth"))
        assert _answers(again) == _answers(preds)


def test_score_subcommand_scores_a_run(model_dir, datasets, tmp_path, capsys):
    preds, metrics = _run("chair", model_dir, datasets, tmp_path / "c")
    capsys.readouterr()
    assert eval_main(["score", "chair", "--captions", str(tmp_path / "c" / "predictions.jsonl"),
                      "--coco", datasets["coco"], "--bootstrap", "50"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["metrics"]
    assert eval_main(["nope"]) == 2


def test_compare_table_plot_and_examples(model_dir, datasets, tmp_path, capsys):
    _run("chair", model_dir, datasets, tmp_path / "plain", tokens=6)
    _run("chair", model_dir, datasets, tmp_path / "kvs", "--method", "kvsmooth", tokens=6)
    _run("chair", model_dir, datasets, tmp_path / "seeds", "--set", "do_sample=true", "--set", "seeds=0,1",
         tokens=6)
    # The tiny model's words are no COCO objects: give one run captions that name some.
    path = tmp_path / "kvs" / "predictions.jsonl"
    recs = run_mod.read_predictions(str(path))
    for r in recs:
        r["text"] = r["caption"] = "A dog & a cat <b>on a sofa</b>."
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert eval_main(["compare", str(tmp_path / "plain"), str(tmp_path / "kvs"), str(tmp_path / "seeds"),
                      "--out", str(out), "--examples", "4"]) == 0
    table = (out / "compare.md").read_text()
    assert capsys.readouterr().out == table
    rows = table.strip().splitlines()
    assert len(rows) == 5 and rows[0].split(" | ")[5:] == ["chair_s", "chair_i", "recall", "avg_len |"]
    assert "kvsmooth" in rows[3] and "[" in rows[2] and "±" in rows[4] and "2 seeds" in rows[4]
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    page = (out / "examples.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and "Please describe this image in detail." in page
    # Every image's reference captions name a person and a dog: cat and sofa (a couch) are marked.
    assert page.count("A dog &amp; a <mark>cat</mark> &lt;b&gt;on a <mark>sofa</mark>&lt;/b&gt;.") == 4
    assert "<b>" not in page and page.count("<mark>") == 8
    nested = {"a": {"x": 1.0, "ci95": {"x": [0, 2]}}, "n": 3, "t": "s"}
    assert compare_mod.flatten_metrics(nested) == {"a.x": 1.0, "n": 3}
    assert compare_mod.ci95_of(nested, "a.x") == [0, 2] and compare_mod.ci95_of(nested, "n") is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_to_the_single_process_run(model_dir, datasets, tmp_path):
    argv = ["run", "--task", "pope", "--model", model_dir, *_task_args("pope", datasets), "--set",
            "max_new_tokens=4", "--batch-size", "1", "--bootstrap", "50", "--no-progress"]
    single, one = _run("pope", model_dir, datasets, tmp_path / "one", "--batch-size", "1")
    out = tmp_path / "two"
    os.makedirs(out)
    # Rank 1 was interrupted after its first item: it resumes its shard.
    with open(out / "predictions.rank1.jsonl", "w") as f:
        f.write(json.dumps(single[1]) + "\n")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-m", "kvfix.eval", *argv, "--out", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    merged = run_mod.read_predictions(str(out / "predictions.jsonl"))
    assert _answers(merged) == _answers(single)
    assert sorted(os.listdir(out)) == ["metrics.json", "predictions.jsonl", "run.json"]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["environment"]["world_size"] == 2 and metrics["metrics"] == one["metrics"]
    assert [t["items"] for t in metrics["timing"]["per_rank"]] == [3, 2]


class TinyQwenProcessor:
    """What kvfix.eval.run needs of a Qwen2-VL processor, built offline (transformers' own
    Qwen2VLProcessor needs torchvision for its video half): Qwen2-VL's image processor (patch 4,
    merge 2), a word-level tokenizer with kvfix.hf.testing.tiny_qwen2_vl's ids, and the image
    placeholder expanded to one token per merged patch, as Qwen2VLProcessor does."""
    image_token = "<|vision_start|><|image_pad|><|vision_end|>"
    chat_template = None

    def __init__(self):
        import transformers
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        special = ["<pad>", "<s>", "</s>", "<unk>"]
        vision = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        words = special + [f"w{i}" for i in range(96)] + vision     # ids 100..103
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens(special + vision)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                 eos_token="</s>", unk_token="<unk>")
        cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
        self.image_processor = cls(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                   max_pixels=32 * 32)

    def __call__(self, images, text, return_tensors="pt", padding=True):
        vis = self.image_processor(images=images, return_tensors="pt")
        counts = (vis["image_grid_thw"].prod(-1) // 4).tolist()
        text = [t.replace("<|image_pad|>", "<|image_pad|> " * n) for t, n in zip(text, counts)]
        enc = self.tokenizer(text, return_tensors="pt", padding=True)
        return {**enc, **vis, "mm_token_type_ids": (enc["input_ids"] == 100).int()}

    def batch_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def test_qwen2_vl_injected_model_and_whole_image_depth(depth_dir, datasets, tmp_path):
    import kvfix.hf
    from kvfix.depth import DepthEstimator
    from kvfix.hf.testing import tiny_qwen2_vl
    args = run_mod.build_parser().parse_args(
        ["--task", "pope", "--model", "tiny-qwen2-vl", *_task_args("pope", datasets), "--out", str(tmp_path / "q"),
         "--method", "dscr", "--method", "kvsmooth", "--depth-model", depth_dir, "--limit", "3", "--batch-size", "3",
         "--set", "max_new_tokens=4", "--bootstrap", "0", "--no-progress"])
    model, proc = tiny_qwen2_vl(), TinyQwenProcessor()
    metrics = run_mod.run(args, model=model, processor=proc)
    preds = run_mod.read_predictions(str(tmp_path / "q" / "predictions.jsonl"))
    assert metrics["model"] == "tiny-qwen2-vl" and len(preds) == 3 and metrics["metrics"]["official"]["n"] == 3
    assert len(os.listdir(tmp_path / "q" / "depth")) == 3
    # By hand: Qwen2-VL sees the whole image (resized, no crop), so the depth maps are of the files.
    items = data_mod.load_items("pope", datasets["pope"], images=datasets["images"])[:3]
    imgs = [Image.open(it["image"]).convert("RGB") for it in items]
    maps = DepthEstimator(depth_dir)(imgs)
    assert [tuple(m.shape) for m in maps] == [(im.height, im.width) for im in imgs]
    texts = [f"{proc.image_token}\n{it['question']}\nAnswer the question using a single word or phrase."
             for it in items]
    inp = proc(images=imgs, text=texts)
    with kvfix.hf.enable(model, kvfix.hf.DSCR(), kvfix.hf.KVSmooth()) as h:
        out = h.generate(**inp, depth_maps=maps, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expect = [t.strip() for t in proc.batch_decode(out[:, inp["input_ids"].shape[1]:])]
    assert [p["text"] for p in preds] == expect
