"""`python -m kvfix.eval run`: generate a benchmark's answers with kvfix methods switched on.

    python -m kvfix.eval run --task pope --model llava-hf/llava-1.5-7b-hf \\
        --data coco_pope_popular.json --images coco/val2014 --method dscr --method kvsmooth:lam_ref=0.9 \\
        --out runs/pope-dscr-kvs

Writes into `--out`:
- run.json: the run's identity (task, model, protocol, methods); a rerun into the same folder
  must match it, and then resumes: items already in the predictions are skipped.
- predictions.jsonl: one line per (item, seed), appended batch by batch as it goes (an
  interrupted run resumes where it stopped; a half-written last line is dropped). Each line is
  the item's fields (see kvfix.eval.data) plus "seed", "prompt" (the text given to the chat
  template) and "text" (the decoded answer, stripped), repeated as "caption" (CHAIR) or
  "response" (AMBER): the file is what `python -m kvfix.eval score` reads as predictions.
- metrics.json: "metrics" (kvfix.eval.scoring.score_task's result, each metric dict with its
  bootstrap 95% intervals under "ci95"; with several seeds, the mean of every metric over the
  seeds by dotted name, and "seed_spread" their std / min / max), "per_seed" (each seed's full
  result), the protocol (preset, overrides, source), the methods, the data, the environment
  and the timing (generation, depth maps, the harness's own time).

Distributed: under torchrun / `accelerate launch` (WORLD_SIZE > 1) the process group is
initialised with gloo (it only carries barriers and small objects); rank r takes items
r, r + W, ...; each rank appends to predictions.rank{r}.jsonl; rank 0 merges every file into
predictions.jsonl in item order, removes the shards, and scores once. Resuming reads every
prediction file present, so it works per shard and across a change of world size.

Data: `--data` is a benchmark's local copy in its official layout (kvfix.eval.data) or, for
POPE / MME / AMBER, a hub dataset `hub:NAME[:CONFIG][@SPLIT]` (kvfix.eval.hub; its images are
written to `--images`, default <out>/images; AMBER's scoring files then come from
`--amber-data`).

Methods: `--method NAME[:key=value,...]` (dscr, kvsmooth, scr, cmac; values are Python
literals) builds kvfix.hf.DSCR / KVSmooth / SCR / CMAC with those keyword arguments; several
stack in the given order. DSCR's depth maps come from `--depth-model` (a transformers
depth-estimation model name or folder; "uniform" runs DSCR without a depth cue), computed on
what the vision tower sees -- the processor's resized, centre-cropped pixels, un-normalised
(LLaVA), or the image itself (Qwen2-VL keeps the whole image) -- and cached on disk in
`--depth-cache` (default <out>/depth), keyed by the depth model and the pixels.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from . import data as data_mod
from .protocols import PRESETS, TASKS, Protocol, apply_overrides, default_preset, get_preset

__all__ = ["main", "run", "parse_method", "build_methods", "load_model", "build_parser", "read_predictions"]

_METHODS = {"dscr": "DSCR", "kvsmooth": "KVSmooth", "scr": "SCR", "cmac": "CMAC"}


# ------------------------------------------------------------------------------------------- methods
def parse_method(spec: str) -> tuple[str, dict]:
    """"kvsmooth:lam_ref=0.9,band=0.2" -> ("kvsmooth", {"lam_ref": 0.9, "band": 0.2})."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in _METHODS:
        raise ValueError(f"--method {spec!r}: unknown method {name!r} (one of {', '.join(_METHODS)})")
    kwargs = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, text = part.partition("=")
        if not sep:
            raise ValueError(f"--method {spec!r}: expected key=value, got {part!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        kwargs[key.strip()] = value
    return name, kwargs


def build_methods(specs) -> list:
    import kvfix.hf
    methods = []
    for spec in specs:
        name, kwargs = parse_method(spec)
        try:
            methods.append(getattr(kvfix.hf, _METHODS[name])(**kwargs))
        except TypeError as e:
            raise ValueError(f"--method {spec!r}: {e}") from None
    return methods


# -------------------------------------------------------------------------------------------- model
def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "cpu"):
    """(model, processor) from a hub name or a local folder, as transformers loads them
    (AutoProcessor + AutoModelForImageTextToText); the tokenizer pads on the left."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(name_or_path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype)
    return model.to(device).eval(), processor


def _prepare_processor(processor):
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    return processor


def _chat_text(processor, protocol: Protocol, prompt: str) -> str:
    if protocol.chat_template and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


# -------------------------------------------------------------------------------------------- depth
class DepthCache:
    """Depth maps of what the vision tower sees, cached on disk (one .pt per map)."""

    def __init__(self, model: str, cache_dir: str, device):
        self.model_name, self.cache_dir, self.device = model, cache_dir, device
        self._estimator = None
        self.seconds = 0.0
        os.makedirs(cache_dir, exist_ok=True)

    def _views(self, processor, inputs, images) -> list[torch.Tensor]:
        """Float [H, W, 3] views in [0, 1]: the processor's crop (4-D pixel_values) or the image."""
        pv = inputs.get("pixel_values")
        ip = getattr(processor, "image_processor", None)
        if isinstance(pv, torch.Tensor) and pv.dim() == 4 and pv.shape[0] == len(images) and ip is not None:
            mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            x = pv.float().cpu() * std + mean if getattr(ip, "do_normalize", True) else pv.float().cpu()
            return list(x.clamp(0, 1).permute(0, 2, 3, 1).contiguous())
        import numpy as np
        return [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0) for im in images]

    def __call__(self, processor, inputs, images) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        views = self._views(processor, inputs, images)
        maps: list = [None] * len(views)
        missing = []
        for i, v in enumerate(views):
            key = hashlib.sha1(self.model_name.encode() + str(tuple(v.shape)).encode()
                               + v.numpy().tobytes()).hexdigest()
            path = os.path.join(self.cache_dir, key + ".pt")
            if os.path.exists(path):
                maps[i] = torch.load(path)
            else:
                missing.append((i, path))
        if missing:
            if self._estimator is None:
                from kvfix.depth import DepthEstimator
                self._estimator = DepthEstimator(self.model_name, device=self.device)
            new = self._estimator([views[i].numpy() for i, _ in missing])
            for (i, path), m in zip(missing, new):
                m = m.float().cpu()
                tmp = path + f".tmp{os.getpid()}"
                torch.save(m, tmp)
                os.replace(tmp, path)
                maps[i] = m
        self.seconds += time.perf_counter() - t0
        return maps


# -------------------------------------------------------------------------------------- predictions
def read_predictions(path: str, *, repair: bool = False) -> list[dict]:
    """The records of a predictions file; a half-written last line (an interrupted run) is
    skipped, and with `repair` cut off the file so appending continues cleanly."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    records, good_end, pos = [], 0, 0
    for line in raw.split(b"\n"):
        end = pos + len(line) + 1
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if end < len(raw):  # a broken line in the middle is not an interruption
                    raise ValueError(f"{path}: unreadable line at byte {pos}") from None
                break
        if end <= len(raw):
            good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def _prediction_files(out: str) -> list[str]:
    names = sorted(n for n in os.listdir(out) if n.startswith("predictions.rank") and n.endswith(".jsonl"))
    return [os.path.join(out, "predictions.jsonl")] + [os.path.join(out, n) for n in names]


def _key(rec) -> tuple[str, int]:
    return str(rec["id"]), int(rec["seed"])


# -------------------------------------------------------------------------------------- environment
def environment(device) -> dict:
    import transformers

    import kvfix
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "kvfix": getattr(kvfix, "__version__", None),
           "device": str(device), "argv": sys.argv}
    try:
        env["kvfix_build"] = kvfix.build_info()
    except Exception as e:  # noqa: BLE001 - a record, not a check: say why it is missing
        env["kvfix_build"] = f"unavailable: {e}"
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(kvfix.__file__),
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    try:
        import tqdm
        env["tqdm"] = tqdm.__version__
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------------------------------- run
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m kvfix.eval run", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="hub name or local folder (model + processor)")
    p.add_argument("--data", required=True, help="POPE: question file; CHAIR: COCO folder; MME / AMBER: folder; "
                   "POPE / MME / AMBER: a hub dataset hub:NAME[:CONFIG][@SPLIT] (kvfix.eval.hub)")
    p.add_argument("--images", help="POPE: the image folder the question file's names are relative to; "
                   "hub:...: the folder its images are written to (default <out>/images)")
    p.add_argument("--amber-split", default="all", choices=("all", "generative", "discriminative"))
    p.add_argument("--amber-data", help="AMBER from the hub: AMBER's data folder (annotations.json, "
                   "relation.json, safe_words.txt), for scoring")
    p.add_argument("--out", required=True, help="run folder (created; a rerun resumes)")
    p.add_argument("--preset", help=f"protocol (default plain-TASK); one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one protocol field, e.g. max_new_tokens=8, seeds=0,1,2, do_sample=true")
    p.add_argument("--method", dest="methods", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="kvfix method to enable (repeatable; stacks in order)")
    p.add_argument("--depth-model", default=None,
                   help="depth model for DSCR (default kvfix.depth.DEFAULT_DEPTH_MODEL; 'uniform': none)")
    p.add_argument("--depth-cache", help="folder for cached depth maps (default <out>/depth)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N items (a quick look)")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK) if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _data_record(args) -> dict:
    """--data (a hub spec as given, a path made absolute), --images and --amber-data."""
    return {"data": args.data if data_mod.is_hub(args.data) else os.path.abspath(args.data),
            "images": os.path.abspath(args.images) if args.images else None,
            **({"amber_data": os.path.abspath(args.amber_data)} if args.amber_data else {})}


def _identity(args, protocol: Protocol, preset: str, overrides: dict, methods: list[str]) -> dict:
    return {"task": args.task, "model": args.model, **_data_record(args), "preset": preset,
            "overrides": overrides, "protocol": protocol.to_dict(), "methods": methods,
            "depth_model": args.depth_model}


def _check_identity(out: str, ident: dict) -> None:
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            raise ValueError(f"{out} holds another run (differs in {', '.join(diff)}); use another --out")


def run(args: argparse.Namespace, *, model=None, processor=None) -> dict | None:
    """Run from parsed arguments (build_parser). `model` / `processor` may be given instead of
    loading `args.model` (it is then only recorded). Returns metrics.json's content on rank 0."""
    world, rank, local_rank = _dist_info()
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return _run(args, model, processor, world, rank, local_rank)
    finally:
        if world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _run(args, model, processor, world, rank, local_rank):
    t_start = time.perf_counter()
    preset = args.preset or default_preset(args.task)
    protocol, overrides = apply_overrides(get_preset(preset, args.task), args.overrides)
    method_specs = list(protocol.methods) + list(args.methods)
    for spec in method_specs:
        parse_method(spec)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    images = args.images
    if images is None and data_mod.is_hub(args.data):
        images = os.path.join(args.out, "images")
    items = data_mod.load_items(args.task, args.data, images=images, image_set=protocol.image_set,
                                image_seed=protocol.image_seed, split=args.amber_split, amber_data=args.amber_data)
    if args.limit is not None:
        items = items[:args.limit]
    ids = [str(it["id"]) for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{args.task}: duplicate item ids in {args.data}")

    os.makedirs(args.out, exist_ok=True)
    ident = _identity(args, protocol, preset, overrides, method_specs)
    _check_identity(args.out, ident)  # on every rank: a refusal stops them all, none waits at a barrier
    if rank == 0:
        with open(os.path.join(args.out, "run.json.tmp"), "w") as f:
            json.dump(ident, f, indent=1)
        os.replace(os.path.join(args.out, "run.json.tmp"), os.path.join(args.out, "run.json"))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()

    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if model is None:
        model, processor = load_model(args.model, dtype=args.dtype, device=str(device))
    processor = _prepare_processor(processor)
    methods = build_methods(method_specs)
    needs_depth = any(type(m).__name__ == "DSCR" for m in methods)
    depth = None
    if needs_depth and args.depth_model != "uniform":
        from kvfix.depth import DEFAULT_DEPTH_MODEL
        depth = DepthCache(args.depth_model or DEFAULT_DEPTH_MODEL,
                           args.depth_cache or os.path.join(args.out, "depth"), device)

    own_path = os.path.join(args.out, "predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    done = set()
    for path in _prediction_files(args.out):
        done |= {_key(r) for r in read_predictions(path, repair=(path == own_path))}
    mine = [(i, it) for i, it in enumerate(items) if i % world == rank]
    # Batches have fixed boundaries (every batch_size items of this rank's list, per seed) and
    # leave done items out: after an interruption (predictions are written a batch at a time) the
    # remaining batches are the uninterrupted run's, padded and seeded the same.
    batches = []
    for s in protocol.seeds:
        for b in range(0, len(mine), args.batch_size):
            chunk = [(s, i, it) for i, it in mine[b:b + args.batch_size] if (str(it["id"]), s) not in done]
            if chunk:
                batches.append((s * 1_000_003 + mine[b][0], chunk))
    n_todo = sum(len(c) for _, c in batches)

    import kvfix.hf
    handle = kvfix.hf.enable(model, *methods) if methods else None
    gen_kwargs = protocol.generation_kwargs()
    answer_field = data_mod.ANSWER_FIELD[args.task]
    pad = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None)
    if pad is not None:
        gen_kwargs["pad_token_id"] = pad
    from PIL import Image
    from tqdm import tqdm
    total = len(mine) * len(protocol.seeds)
    bar = tqdm(total=total, initial=total - n_todo, desc=f"{args.task} rank {rank}" if world > 1 else args.task,
               unit="item", disable=args.no_progress or rank != 0, dynamic_ncols=True)
    def prepare(batch):
        """Images, prompts and processor outputs of a batch (in a worker thread, while the
        previous batch generates)."""
        images = [Image.open(it["image"]).convert("RGB") for _, _, it in batch]
        prompts = [protocol.prompt.format(question=it["question"]) for _, _, it in batch]
        texts = [_chat_text(processor, protocol, p) for p in prompts]
        return images, prompts, processor(images=images, text=texts, return_tensors="pt", padding=True)

    t_loop, gen_s = time.perf_counter(), 0.0
    try:
        with open(own_path, "a") as out, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(prepare, batches[0][1]) if batches else None
            for k, (batch_seed, batch) in enumerate(batches):
                images, prompts, inputs = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(prepare, batches[k + 1][1])
                maps = depth(processor, inputs, images) if depth is not None else (
                    "uniform" if needs_depth else None)
                inputs = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in inputs.items()}
                if inputs["pixel_values"].is_floating_point():
                    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
                # Sampling: one random stream per batch (seed, the batch's place in the item list):
                # reproducible for the same batch size and world size, resumed or not.
                torch.manual_seed(batch_seed)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    if handle is not None:
                        seq = handle.generate(**inputs, depth_maps=maps, **gen_kwargs)
                    else:
                        seq = model.generate(**inputs, **gen_kwargs)
                gen_s += time.perf_counter() - t0
                answers = processor.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for (s, _, it), prompt, ans in zip(batch, prompts, answers):
                    rec = {**it, "seed": s, "prompt": prompt, "text": ans.strip()}
                    rec[answer_field] = rec["text"]
                    out.write(json.dumps(rec) + "\n")
                out.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if handle is not None:
            handle.disable()
    timing = {"generate_s": gen_s, "loop_s": time.perf_counter() - t_loop,
              "depth_s": depth.seconds if depth is not None else 0.0, "items": n_todo}

    if world > 1:
        import torch.distributed as dist
        timings = [None] * world
        dist.all_gather_object(timings, timing)
        if rank != 0:
            dist.barrier()
            return None
    else:
        timings = [timing]
    try:
        records = _merge(args.out, items, protocol.seeds)
        result = _score(args, items, records, protocol, preset, overrides, method_specs, timings, world,
                        device, time.perf_counter() - t_start)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
    return result


def _merge(out: str, items: list[dict], seeds) -> list[dict]:
    """Every prediction file -> predictions.jsonl in (seed, item) order; shard files removed."""
    by_key = {}
    files = _prediction_files(out)
    for path in files:
        for r in read_predictions(path):
            by_key.setdefault(_key(r), r)
    keep = [(str(it["id"]), s) for s in seeds for it in items]
    records = [by_key[k] for k in keep if k in by_key]
    # Predictions of items outside this run's list (an earlier run without --limit) stay, after these.
    kept = set(keep)
    rest = [r for k, r in by_key.items() if k not in kept]
    target = os.path.join(out, "predictions.jsonl")
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        for r in records + rest:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, target)
    for path in files[1:]:
        os.remove(path)
    return records


def _score(args, items, records, protocol, preset, overrides, method_specs, timings, world, device, wall):
    from .compare import flatten_metrics
    from .scoring import score_task
    sdata = data_mod.scoring_data(args.task, args.data, items, amber_data=args.amber_data)
    per_seed = []
    for s in protocol.seeds:
        preds = [r for r in records if int(r["seed"]) == s]
        per_seed.append({"seed": s, "n": len(preds),
                         "metrics": score_task(args.task, preds, data=sdata, bootstrap=args.bootstrap, seed=0)})
    if len(per_seed) == 1:
        summary, spread = per_seed[0]["metrics"], {}
    else:  # the mean of each metric over the seeds, and its spread
        flat = [flatten_metrics(p["metrics"]) for p in per_seed]
        summary, spread = {}, {}
        for name in flat[0]:
            vals = torch.tensor([float(f[name]) for f in flat], dtype=torch.float64)
            summary[name] = float(vals.mean())
            spread[name] = {"std": float(vals.std(unbiased=True)), "min": float(vals.min()), "max": float(vals.max())}
    gen = sum(t["generate_s"] for t in timings)
    loop = sum(t["loop_s"] for t in timings)
    dep = sum(t["depth_s"] for t in timings)
    result = {
        "task": args.task, "model": args.model, "n_items": len(items), "limit": args.limit,
        "metrics": summary, "seed_spread": spread, "per_seed": per_seed,
        "protocol": {"preset": preset, "overrides": overrides, **protocol.to_dict()},
        "methods": method_specs, "depth_model": args.depth_model, "batch_size": args.batch_size,
        "data": {**_data_record(args), **({"coco_dir": os.path.abspath(args.data)} if args.task == "chair" else {})},
        "environment": {**environment(device), "world_size": world},
        "timing": {"per_rank": timings, "generate_s": gen, "depth_s": dep, "loop_s": loop,
                   "harness_overhead": (loop - gen - dep) / gen if gen > 0 else None, "wall_s": wall},
    }
    tmp = os.path.join(args.out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if result is not None:
        print(json.dumps(result["metrics"], indent=1, default=str))
    return 0

