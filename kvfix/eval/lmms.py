"""kvfix as an lmms-eval model: lmms-eval's own tasks (pope, mme, coco_cap_chair, amber_g, ...)
run on a transformers VLM with any stack of kvfix methods.

    pip install "kvfix[lmms]"
    lmms-eval --model kvfix --tasks pope --batch_size 8 --device cuda \\
        --model_args 'pretrained=llava-hf/llava-1.5-7b-hf,methods="dscr;kvsmooth:lam_ref=0.9"'

Registration: pyproject.toml declares the entry point `kvfix = "kvfix.eval.lmms:manifest"` in
lmms-eval's group `lmms_eval.models`; lmms-eval (0.7.x, `ModelRegistryV2`) loads every entry
point of that group when `lmms_eval.models` is imported and calls `manifest()`, which names
`KvfixLMMS` as the "simple" model class of the id "kvfix". This module imports lmms_eval and is
imported only by lmms-eval (or by code that has it installed).

Model arguments (`--model_args key=value,...`):
- pretrained: hub name or local folder, loaded as `python -m kvfix.eval run` loads it
  (AutoProcessor + AutoModelForImageTextToText; the tokenizer pads on the left).
- methods: kvfix methods in `--method` syntax, separated by ";" and stacked in that order
  (`methods="cmac:preset=pope;kvsmooth"`: quote the value when a method carries several
  parameters, since lmms-eval splits model_args at commas outside quotes), or a JSON list.
- depth_model / depth_cache: DSCR's depth maps, as `run --depth-model / --depth-cache`
  ("uniform": no depth cue; the cache defaults to $XDG_CACHE_HOME/kvfix/depth).
- dtype (auto, float32, float16, bfloat16), device (default cuda when there is one, else cpu;
  lmms-eval's --device), batch_size (lmms-eval's --batch_size; a number; max_batch_size, which
  lmms-eval always passes, is accepted and unused), chat_template (true: the processor's chat
  template wraps the images and the task's text; false: one image token per image, a newline,
  then the text).

Requests: `generate_until` takes lmms-eval's simple-model arguments (context, generation
kwargs, doc_to_visual, doc_id, task, split); the images are `doc_to_visual(doc)` of the task's
document. Requests are batched in order among those with the same task, split, generation
kwargs and number of images. Generation kwargs: max_new_tokens (default 1024), temperature
(0: greedy; > 0: sampling with top_p when given), num_beams, until (stop strings: the answer is
cut before the first one found). `loglikelihood` and `generate_until_multi_round` raise
NotImplementedError: kvfix's methods act on generation (the prefill and the decoding loop,
which CMAC replaces), so a likelihood of a fixed continuation is not what they define.

Several processes (torchrun / accelerate launch, WORLD_SIZE > 1): the model creates an
accelerate `Accelerator`, runs on its device (cuda:LOCAL_RANK; the CPU without GPUs) and reports
its `rank` / `world_size`, by which lmms-eval shards the requests and merges the results.
"""
from __future__ import annotations

import ast
import json
import os

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from . import run as run_mod

__all__ = ["KvfixLMMS", "manifest", "parse_methods_arg", "MODEL_ID"]

MODEL_ID = "kvfix"


def manifest():
    """The payload of the `lmms_eval.models` entry point: model id "kvfix" -> KvfixLMMS."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.KvfixLMMS")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def parse_methods_arg(value) -> list[str]:
    """`methods=` of model_args -> `--method` specs: "dscr;kvsmooth:lam_ref=0.9" (optionally
    quoted), a JSON / Python list of specs, or a list already; each spec is checked."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        specs = [str(s) for s in value]
    else:
        text = _unquote(str(value))
        if text.startswith("["):
            try:
                specs = json.loads(text)
            except json.JSONDecodeError:
                specs = ast.literal_eval(text)
        else:
            specs = text.split(";")
        specs = [s.strip() for s in specs if str(s).strip()]
    for spec in specs:
        run_mod.parse_method(spec)
    return specs


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = _unquote(str(value)).lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


class KvfixLMMS(lmms):
    """A transformers VLM with kvfix methods, as an lmms-eval simple model (module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, methods="", depth_model: str | None = None,
                 depth_cache: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size=1, max_batch_size=None, chat_template=True, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"kvfix: unknown model_args {sorted(kwargs)}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"kvfix: batch_size must be a number, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError("kvfix: batch_size must be >= 1")
        self.pretrained = str(pretrained)
        self.method_specs = parse_methods_arg(methods)
        self.use_chat_template = _as_bool(chat_template)

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from accelerate import Accelerator
            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = run_mod.load_model(self.pretrained, dtype=str(dtype), device=str(self._device))
        self._model = model
        self.processor = run_mod._prepare_processor(processor)
        self.methods = run_mod.build_methods(self.method_specs)
        self.needs_depth = any(type(m).__name__ == "DSCR" for m in self.methods)
        self.depth = None
        if self.needs_depth and depth_model != "uniform":
            from kvfix.depth import DEFAULT_DEPTH_MODEL
            cache = depth_cache or os.path.join(
                os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "kvfix", "depth")
            self.depth = run_mod.DepthCache(depth_model or DEFAULT_DEPTH_MODEL, cache, self._device)
        import kvfix.hf
        self.handle = kvfix.hf.enable(model, *self.methods) if self.methods else None

    # ---- what lmms-eval reads -----------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- prompts ---------------------------------------------------------------------------------
    def prompt_text(self, context: str, n_images: int) -> str:
        """The text given to the processor for `context` with `n_images` images before it (none
        added when the context already holds the processor's image token)."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in context:
            n_images = 0
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return f"{image_token}\n" * n_images + context

    @staticmethod
    def generation_kwargs(gen: dict) -> tuple[dict, list[str]]:
        """lmms-eval's generation kwargs -> (`generate` kwargs, stop strings)."""
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.get("temperature") or 0.0)
        kw = {"max_new_tokens": int(gen.get("max_new_tokens") or 1024),
              "num_beams": int(gen.get("num_beams") or 1), "do_sample": temperature > 0}
        if temperature > 0:
            kw["temperature"] = temperature
            if gen.get("top_p") is not None:
                kw["top_p"] = float(gen["top_p"])
        return kw, until

    # ---- requests --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm
        entries = []
        for k, req in enumerate(requests):
            context, gen, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            visuals = [v.convert("RGB") for v in (visuals or [])]
            key = (task, split, repr(sorted(gen.items(), key=lambda kv: kv[0])), len(visuals))
            entries.append((key, k, context, gen, visuals))
        groups: dict = {}
        for e in entries:
            groups.setdefault(e[0], []).append(e)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="kvfix", dynamic_ncols=True)
        try:
            for group in groups.values():
                for b in range(0, len(group), self.batch_size_per_gpu):
                    batch = group[b:b + self.batch_size_per_gpu]
                    answers = self._generate([e[2] for e in batch], [e[4] for e in batch], batch[0][3])
                    for (_, k, context, gen, _), ans in zip(batch, answers):
                        out[k] = ans
                        self.cache_hook.add_partial("generate_until", (context, gen), ans)
                    bar.update(len(batch))
        finally:
            bar.close()
        return out

    def _generate(self, contexts: list[str], visuals: list[list], gen: dict) -> list[str]:
        kw, until = self.generation_kwargs(gen)
        images = [im for v in visuals for im in v]
        texts = [self.prompt_text(c, len(v)) for c, v in zip(contexts, visuals)]
        if images:
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self.processor(text=texts, return_tensors="pt", padding=True)
        maps = None
        if images and self.needs_depth:
            maps = self.depth(self.processor, inputs, images) if self.depth is not None else "uniform"
        inputs = {k: (v.to(self._device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if isinstance(inputs.get("pixel_values"), torch.Tensor) and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is not None:
            kw["pad_token_id"] = pad
        with torch.inference_mode():
            if self.handle is not None:
                seq = self.handle.generate(**inputs, depth_maps=maps, **kw)
            else:
                seq = self._model.generate(**inputs, **kw)
        answers = self.processor.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_cut(a, until).strip() for a in answers]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "kvfix: loglikelihood requests are not supported: kvfix's methods act on generation (the "
            "prefill and the decoding loop), not on the likelihood of a fixed continuation; use "
            "generate_until tasks (pope, mme, coco_cap_chair, amber_g, ...)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("kvfix: multi-round generation is not supported")


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                end = min(end, i)
    return text[:end]
