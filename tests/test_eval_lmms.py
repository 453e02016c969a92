"""kvfix as an lmms-eval model (kvfix.eval.lmms), where lmms-eval is installed (the optional extra
`kvfix[lmms]`; CI does not install it, and then every test here is skipped).

- the entry point declared in pyproject.toml is found by lmms-eval's own registry (ModelRegistryV2,
  group lmms_eval.models) and resolves to the model class;
- `generate_until` on lmms-eval `Instance`s, the model built from a model_args string as
  lmms-eval builds it, answers as the methods enabled by hand on the same batches do;
- lmms-eval's evaluator runs its own POPE task (its prompt, generation kwargs, scoring) with the
  model on a local copy of a POPE-shaped dataset (save_to_disk; nothing is downloaded).
"""
import os

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from kvfix.eval import run as run_mod  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = {"max_new_tokens": 4, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_eval_run import tiny_llava_processor

    from kvfix.hf.testing import tiny_llava
    d = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(d)
    tiny_llava_processor().save_pretrained(d)
    return str(d)


def _image(seed, h=40, w=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _docs():
    return [{"question_id": str(k + 1), "question": f"w{k} w{k + 1} w7", "answer": "yes" if k % 2 else "no",
             "category": "random", "image": _image(k, 40 + 4 * k)} for k in range(4)]


def test_entry_point_is_found_by_lmms_eval(tmp_path, monkeypatch):
    """pyproject's entry point, installed as a distribution's metadata, is what lmms-eval's
    registry loads: the id "kvfix" resolves to KvfixLMMS, a simple lmms model."""
    tomllib = pytest.importorskip("tomllib")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from kvfix.eval.lmms import KvfixLMMS
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
    assert eps == {"kvfix": "kvfix.eval.lmms:manifest"}
    dist = tmp_path / "kvfix_entry_point_probe-0.0.dist-info"
    os.makedirs(dist)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvfix-entry-point-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    resolved = registry.resolve("kvfix")
    assert resolved.model_type == "simple" and resolved.class_path == "kvfix.eval.lmms.KvfixLMMS"
    assert registry.get_model_class("kvfix") is KvfixLMMS


def test_model_args_and_generation_kwargs():
    from kvfix.eval.lmms import KvfixLMMS, _cut, parse_methods_arg
    assert parse_methods_arg('"dscr;kvsmooth:lam_ref=0.9,band=0.2"') == ["dscr", "kvsmooth:lam_ref=0.9,band=0.2"]
    assert parse_methods_arg('["cmac:preset=pope", "scr"]') == ["cmac:preset=pope", "scr"]
    assert parse_methods_arg("") == []
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods_arg("opera")
    # lmms-eval's own parser keeps a quoted value whole (commas inside it included).
    from lmms_eval.utils import simple_parse_args_string
    args = simple_parse_args_string('pretrained=x,methods="cmac:preset=chair,gate=first;kvsmooth",batch_size=2')
    assert parse_methods_arg(args["methods"]) == ["cmac:preset=chair,gate=first", "kvsmooth"]
    assert KvfixLMMS.generation_kwargs(GEN) == ({"max_new_tokens": 4, "num_beams": 1, "do_sample": False}, ["\n\n"])
    kw, until = KvfixLMMS.generation_kwargs({"temperature": 0.7, "top_p": 0.9, "until": "###"})
    assert kw == {"max_new_tokens": 1024, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert until == ["###"]
    assert _cut("a b. c\n\nd ###", ["###", "\n\n"]) == "a b. c" and _cut("abc", []) == "abc"


def _instances(docs, task="pope_t", split="test", gens=None):
    from lmms_eval.api.instance import Instance
    return [Instance(request_type="generate_until", idx=0, metadata={"task": task, "doc_id": i, "repeats": 1},
                     arguments=(d["question"] + "\nAnswer the question using a single word or phrase.",
                                dict((gens or {}).get(i, GEN)), lambda doc: [doc["image"]], i, task, split))
            for i, d in enumerate(docs)]


@pytest.mark.parametrize("methods", [["dscr", "kvsmooth:lam_ref=0.9"], ["cmac", "scr:top_k=2"]],
                         ids=["dscr+kvsmooth", "cmac+scr"])
def test_generate_until_equals_the_methods_enabled_by_hand(model_dir, methods):
    import kvfix.hf
    from kvfix.eval.lmms import KvfixLMMS
    lm = KvfixLMMS.create_from_arg_string(f'pretrained={model_dir},methods="{";".join(methods)}",depth_model=uniform',
                                          {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert lm.method_specs == methods and lm.batch_size == 2 and lm.device == torch.device("cpu")
    docs = _docs()
    lm.task_dict = {"pope_t": {"test": docs}}
    short = dict(GEN, max_new_tokens=2)
    reqs = _instances(docs, gens={1: short})
    got = lm.generate_until(reqs)
    # By hand: requests batched in order among equal generation kwargs -> [0, 2], [3] and [1].
    model, proc = run_mod.load_model(model_dir)
    proc.tokenizer.padding_side = "left"
    handle = kvfix.hf.enable(model, *run_mod.build_methods(methods))
    expect = {}
    try:
        for batch, new in (([0, 2], 4), ([3], 4), ([1], 2)):
            texts = [f"USER: <image> {reqs[i].args[0]} ASSISTANT:" for i in batch]
            inp = proc(images=[docs[i]["image"] for i in batch], text=texts, return_tensors="pt", padding=True)
            maps = "uniform" if "dscr" in methods else None
            out = handle.generate(**inp, depth_maps=maps, max_new_tokens=new, do_sample=False, num_beams=1,
                                  pad_token_id=0)
            for i, a in zip(batch, proc.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)):
                expect[i] = a.strip()
    finally:
        handle.disable()
    assert got == [expect[i] for i in range(4)]
    assert any(got) and len(got[1].split()) <= 2
    assert lm.prompt_text("q", 1) == "USER: <image> q ASSISTANT:"
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood(reqs)


def test_lmms_eval_runs_its_pope_task_with_kvfix(model_dir, tmp_path, monkeypatch):
    """lmms-eval's evaluator, its POPE task (prompt, generation kwargs, metrics) on a local
    POPE-shaped dataset, with the model id "kvfix" and a stack of methods."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from kvfix.eval.lmms import manifest
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)  # what the entry point does when installed

    docs = _docs()
    feats = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "category": datasets.Value("string"),
                               "image": datasets.Image()})
    cols = {k: [d[k] for d in docs] for k in feats}
    data_dir = tmp_path / "pope_local"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(cols, features=feats)}).save_to_disk(str(data_dir))
    tasks_dir = tmp_path / "tasks"
    os.makedirs(tasks_dir)
    pope_yaml = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks", "pope", "pope.yaml")
    (tasks_dir / "kvfix_pope_local.yaml").write_text(
        f"include: {pope_yaml}\ntask: kvfix_pope_local\ndataset_path: {data_dir}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n")
    result = simple_evaluate(model="kvfix", model_args=f'pretrained={model_dir},methods="kvsmooth;cmac"',
                             tasks=["kvfix_pope_local"], task_manager=TaskManager(include_path=str(tasks_dir)),
                             batch_size=2, device="cpu", log_samples=True)
    metrics = result["results"]["kvfix_pope_local"]
    assert 0.0 <= metrics["pope_accuracy,none"] <= 1.0
    # The logged answers are the model's own (generate_until on the same requests, outside lmms-eval).
    samples = result["samples"]["kvfix_pope_local"]
    assert len(samples) == 4
    from kvfix.eval.lmms import KvfixLMMS
    lm = KvfixLMMS(pretrained=model_dir, methods="kvsmooth;cmac", device="cpu", batch_size=2)
    lm.task_dict = {"pope_t": {"test": docs}}
    expect = lm.generate_until(_instances(docs, gens={i: dict(GEN) for i in range(4)}))
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples}
    assert [by_doc[i] for i in range(4)] == expect
    # lmms-eval's POPE accuracy: the lowercased answer equals the label.
    correct = sum(a.lower().strip() == d["answer"] for a, d in zip(expect, docs))
    assert metrics["pope_accuracy,none"] == pytest.approx(correct / 4)
