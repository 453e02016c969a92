"""Evaluation protocols: what each paper's headline table ran, as presets for `kvfix.eval run`.

A `Protocol` fixes everything the model sees and how it decodes: the prompt (a template around
the benchmark's own question), whether the processor's chat template wraps it, max_new_tokens,
greedy or sampling (temperature, top_p, top_k, one run per seed), and the image set. `--preset`
picks one, `--set key=value` overrides single fields; metrics.json records the preset's name,
its source, every override and the resulting protocol.

Sources (docs/EVAL.md has the details and the links):
- CMAC (CVPR 2026): the authors' scripts, repository lijm48/IMCCD, experiments/cd_scripts/
  llava1.5_{pope,chair,mme}.bash and experiments/eval/{object_hallucination_vqa_llava,
  chair_eval,mme_llava}.py: sampling (temperature 1, top_p 1, no top_k), seed 55, POPE and MME
  questions + " Please answer this question with one word.", 64 (POPE) / 1024 (CHAIR, MME) new
  tokens, CHAIR on 500 images drawn at random from COCO val2014 with "Please describe this
  image in detail.". Method parameters: kvfix.hf.CMAC's presets (pope / chair / mme), and for
  CHAIR the authors' contrast gate (gate="first", docs/CMAC_HF.md).
- LLaVA-1.5 baselines ("plain"): LLaVA-1.5's own evaluation (haotian-liu/LLaVA,
  scripts/v1_5/eval/{pope,mme}.sh with llava/eval/model_vqa_loader.py): greedy (temperature 0),
  128 new tokens, the question + "\\nAnswer the question using a single word or phrase.". CHAIR
  has no script there; the plain CHAIR preset is the CMAC one decoded greedily with 512 new
  tokens (the length OPERA-style CHAIR evaluations use) -- a choice, recorded as such.
- AMBER: the benchmark's own query files carry the prompts (junyangwang0410/AMBER,
  data/query/query_*.json); greedy, 512 new tokens (choice: AMBER prescribes no decoding).
- DSCR (ICLR 2026), KVSmooth (CVPR 2026, arXiv 2602.04268), SCR (arXiv 2602.22469): no
  evaluation scripts by the authors could be found; their presets are the plain LLaVA-1.5
  protocol with the method switched on, and say so in `source`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Protocol", "PRESETS", "TASKS", "get_preset", "apply_overrides", "default_preset"]

TASKS = ("pope", "chair", "mme", "amber")

_ONE_WORD = " Please answer this question with one word."
_SINGLE_PHRASE = "\nAnswer the question using a single word or phrase."
_DESCRIBE = "Please describe this image in detail."


@dataclass(frozen=True)
class Protocol:
    """How a task is run. `prompt` is a format string: `{question}` is the benchmark's question
    (empty for CHAIR, whose prompt is fixed). `methods` are `--method` specs the preset switches
    on (`--method` on the command line adds to them). `image_set`: "all" items, or for CHAIR
    "random-N" (N images of COCO val2014 drawn with `image_seed`)."""
    task: str
    prompt: str
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seeds: tuple[int, ...] = (0,)
    chat_template: bool = True
    image_set: str = "all"
    image_seed: int = 0
    methods: tuple[str, ...] = ()
    source: str = ""

    def generation_kwargs(self) -> dict:
        """The keyword arguments of `generate` this protocol fixes."""
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        return kw

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["methods"] = list(self.methods)
        return d


_IMCCD = ("lijm48/IMCCD experiments/cd_scripts/llava1.5_{script}.bash + experiments/eval/{py}.py "
          "(CMAC authors' code)")
_LLAVA = "haotian-liu/LLaVA scripts/v1_5/eval/{script}.sh + llava/eval/model_vqa_loader.py (LLaVA-1.5)"
_NONE = ("{paper}: no evaluation script by the authors found; LLaVA-1.5's plain protocol with the "
         "method switched on")

PRESETS: dict[str, Protocol] = {
    "plain-pope": Protocol("pope", "{question}" + _SINGLE_PHRASE, 128,
                           source=_LLAVA.format(script="pope")),
    "plain-mme": Protocol("mme", "{question}" + _SINGLE_PHRASE, 128, source=_LLAVA.format(script="mme")),
    "plain-chair": Protocol("chair", _DESCRIBE, 512, image_set="random-500",
                            source="prompt and image set of " + _IMCCD.format(script="chair", py="chair_eval")
                            + "; greedy, 512 new tokens (choice: LLaVA-1.5 has no CHAIR script)"),
    "plain-amber": Protocol("amber", "{question}", 512,
                            source="junyangwang0410/AMBER data/query/query_*.json (prompts); greedy, "
                                   "512 new tokens (choice)"),
    "cmac-pope": Protocol("pope", "{question}" + _ONE_WORD, 64, do_sample=True, seeds=(55,),
                          methods=("cmac:preset=pope",),
                          source=_IMCCD.format(script="pope", py="object_hallucination_vqa_llava")),
    "cmac-chair": Protocol("chair", _DESCRIBE, 1024, do_sample=True, seeds=(55,), image_set="random-500",
                           image_seed=55, methods=("cmac:preset=chair,gate=first",),
                           source=_IMCCD.format(script="chair", py="chair_eval")),
    "cmac-mme": Protocol("mme", "{question}" + _ONE_WORD, 1024, do_sample=True, seeds=(55,),
                         methods=("cmac:preset=mme",), source=_IMCCD.format(script="mme", py="mme_llava")),
}
for _method, _paper in (("dscr", "DSCR (ICLR 2026)"), ("kvsmooth", "KVSmooth (CVPR 2026, arXiv 2602.04268)"),
                        ("scr", "SCR (arXiv 2602.22469)")):
    for _task in TASKS:
        _base = PRESETS[f"plain-{_task}"]
        PRESETS[f"{_method}-{_task}"] = dataclasses.replace(
            _base, methods=(_method,), source=_NONE.format(paper=_paper) + f" ({_base.source})")
PRESETS["cmac-amber"] = dataclasses.replace(
    PRESETS["plain-amber"], methods=("cmac",),
    source="CMAC: no AMBER script by the authors found; " + PRESETS["plain-amber"].source)


def default_preset(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return f"plain-{task}"


def get_preset(name: str, task: str | None = None) -> Protocol:
    """The preset `name` (see PRESETS); ValueError when unknown or made for another task."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]
    if task is not None and p.task != task:
        raise ValueError(f"preset {name!r} is for task {p.task!r}, not {task!r}")
    return p


def _parse_value(field_type: str, text: str):
    if field_type.startswith("tuple"):
        return tuple(int(s) if field_type == "tuple[int, ...]" else s
                     for s in (t.strip() for t in text.split(",")) if s)
    if field_type == "bool":
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if field_type == "int":
        return int(text)
    if field_type == "float":
        return float(text)
    if field_type == "int | None":
        return None if text.lower() == "none" else int(text)
    return text


def apply_overrides(protocol: Protocol, overrides: list[str]) -> tuple[Protocol, dict]:
    """`["max_new_tokens=8", "seeds=0,1,2", "do_sample=true"]` -> (new protocol, {field: value}).
    Unknown fields and unparsable values raise ValueError naming them."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Protocol)}
    changes: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key in ("task", "source"):
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(k for k in types if k not in ('task', 'source'))}")
        try:
            changes[key] = _parse_value(types[key], text.strip())
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from None
    if "seeds" in changes and not changes["seeds"]:
        raise ValueError("--set seeds=...: at least one seed")
    recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changes.items()}
    return dataclasses.replace(protocol, **changes), recorded

