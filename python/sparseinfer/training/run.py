"""Carries out a recipe (``recipe.py``) stage by stage. Each stage saves a Hugging Face directory under
``work_dir`` (``pruned/``, ``finetuned/``) that the next stage starts from, so stages can run as separate
commands (``sparseinfer prune|finetune|quantize|export RECIPE``) or all at once (``sparseinfer train RECIPE``).
Metrics (perplexity before/after, loss terms, sparsity) accumulate in ``work_dir/metrics.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .compressed import export
from .finetune import finetune
from .gradual import gradual_prune
from .masks import prunable_linears, sparsity_report
from .pruning import prune
from .quant import quantize
from .recipe import RecipeError

STAGES = ("prune", "finetune", "quantize", "export")
#: The directory under ``work_dir`` each model-writing stage saves to.
OUTPUTS = {"prune": "pruned", "finetune": "finetuned"}


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def model_dir(recipe: dict) -> Path:
    if recipe["model"] == "default":
        from ..models import default_model_dir

        return default_model_dir()
    return Path(recipe["model"])


def _is_seq2seq(path: Path) -> bool:
    import transformers as tf

    return bool(getattr(tf.AutoConfig.from_pretrained(path), "is_encoder_decoder", False))


def _load(path: Path):
    import transformers as tf

    auto = tf.AutoModelForSeq2SeqLM if _is_seq2seq(path) else tf.AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def _tokenizer(path: Path):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(path)


def _examples(recipe: dict, tok, split: str, seq2seq: bool = False) -> list[dict]:
    d = recipe["data"]
    src = d.get(split)
    if not src:
        return []
    if str(src).endswith(".jsonl"):
        return D.load_jsonl(tok, src, d["seq_len"], d.get("answer_only", True), seq2seq, tok.eos_token_id)
    if seq2seq:
        raise ValueError(f"data.{split}: an encoder-decoder model trains on a .jsonl of prompt/answer pairs")
    return D.load_text(tok, src, d["seq_len"], tok.eos_token_id)


class Runner:
    """State shared by the stages of one recipe."""

    def __init__(self, recipe: dict, train: list[dict] | None = None, eval: list[dict] | None = None, device=None):
        """``train`` / ``eval`` replace the examples the recipe's data paths name (the study cuts its own
        splits); ``device`` is where models are loaded (default CPU)."""
        self.recipe = recipe
        self.work = Path(recipe["work_dir"])
        self.src = model_dir(recipe)
        self.tok = _tokenizer(self.src)
        self.seq2seq = _is_seq2seq(self.src)
        self.device = torch.device(device or "cpu")
        torch.manual_seed(recipe["seed"])
        self.train = train if train is not None else _examples(recipe, self.tok, "train", self.seq2seq)
        self.eval = eval if eval is not None else _examples(recipe, self.tok, "eval", self.seq2seq)
        if recipe.get("data", {}).get("eval_samples"):
            self.eval = self.eval[: recipe["data"]["eval_samples"]]
        self.metrics_path = self.work / "metrics.json"
        self.metrics: dict[str, Any] = json.loads(self.metrics_path.read_text()) if self.metrics_path.is_file() else {}

    def latest(self, stage: str = "export") -> Path:
        """The model ``stage`` starts from: the latest earlier stage's output in the work directory (fine-tuning,
        then pruning; one placed there by hand counts too), or the recipe's model when there is none. An earlier
        stage the recipe declares but has not run is an error, so a pruned recipe never exports or fine-tunes its
        dense source by mistake."""
        earlier = STAGES[: STAGES.index(stage)]
        for section in ("finetune", "prune"):
            if section not in earlier:
                continue
            out = self.work / OUTPUTS[section]
            if (out / "config.json").is_file():  # also a model put there by hand (a recipe without that stage)
                return out
            if self.recipe.get(section) is None:
                continue
            raise RecipeError(
                f"the recipe has a {section} stage but {out} holds no model: run 'sparseinfer {section} RECIPE' "
                f"first (or 'sparseinfer train RECIPE' for every stage)"
            )
        return self.src

    def calibration(self, model=None):
        s2s = D.seq2seq_ids(model) if model is not None else None
        return D.calibration_batches(self.train, self.recipe["data"]["calibration_samples"], seq2seq=s2s)

    def load(self, path: Path | str | None = None):
        """A Hugging Face model directory (default: the recipe's model) in fp32 on the runner's device."""
        return _load(Path(path) if path is not None else self.src).to(self.device)

    def ppl(self, model) -> float | None:
        return D.perplexity(model, self.eval) if self.eval else None

    def save_metrics(self, stage: str, values: dict) -> None:
        if not _rank0():
            return
        self.metrics[stage] = values
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics, indent=2, default=float))
        os.replace(tmp, self.metrics_path)

    def save_model(self, model, name: str) -> Path:
        from ..checkpoint import atomic_dir

        out = self.work / name
        if _rank0():
            with atomic_dir(out, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)
        return out

    # -- stages --------------------------------------------------------------------------------------------
    def prune(self) -> None:
        p = self.recipe["prune"] or {}
        model = _load(self.src)
        before = self.ppl(model)
        method = p.get("method", "sparsegpt")
        cal = self.calibration(model) if method != "magnitude" or p.get("allocation") == "owl" else None
        keys = ("structure", "ignore", "block_size", "damp", "allocation", "owl_lambda", "owl_m")
        kw = {k: p[k] for k in keys if k in p}
        values: dict[str, Any] = {"ppl_dense": before}
        if p.get("stages"):
            # Staged gradual pruning: fine-tune with the dense teacher between stages, with the finetune section.
            teacher = _load(self.src)
            cfg = self._finetune_config("gradual-ckpt")
            ckpt_dir = cfg.pop("out_dir")
            steps = p.get("steps_per_stage") or cfg.get("steps", 100)
            stage_ppl: list[float | None] = []
            r = gradual_prune(
                model,
                teacher,
                self.train,
                p["stages"],
                method,
                calibration=cal,
                steps_per_stage=steps,
                finetune_config=cfg,
                out_dir=ckpt_dir,
                progress=_rank0(),
                on_stage=lambda *_: stage_ppl.append(self.ppl(model)),
                **kw,
            )
            masks = r["masks"]
            values["stages"] = [{**h, "ppl": q} for h, q in zip(r["stages"], stage_ppl)]
        else:
            masks = prune(model, method, p.get("sparsity", 0.5), calibration=cal, **kw)
        rep = sparsity_report(model, masks)
        self.save_model(model, OUTPUTS["prune"])
        self.save_metrics("prune", {**values, "ppl_pruned": self.ppl(model), "sparsity": rep["global"]})

    def _finetune_config(self, ckpt: str) -> dict:
        cfg = dict(self.recipe.get("finetune") or {})
        cfg.setdefault("seed", self.recipe["seed"])
        cfg["out_dir"] = str(self.work / ckpt)
        cfg.setdefault("save_every", 50)
        if not self.train:
            raise ValueError("fine-tuning needs data.train")
        return cfg

    def finetune(self) -> None:
        student, teacher = _load(self.latest("finetune")), _load(self.src)
        cfg = self._finetune_config("finetune-ckpt")
        before = self.ppl(student)
        r = finetune(student, teacher, self.train, cfg, progress=_rank0())
        self.save_model(student, OUTPUTS["finetune"])
        final = r["final"]
        self.save_metrics(
            "finetune",
            {
                "ppl_before": before,
                "ppl_after": self.ppl(student),
                "final": final,
                "steps": r["steps"],
                "seconds": r["seconds"],
                "world_size": r["world_size"],
                "sparsity": sparsity_report(student, {n: None for n in prunable_linears(student)})["global"],
            },
        )

    def quantize(self) -> None:
        q = self.recipe["quantize"] or {}
        model = _load(self.latest("quantize"))
        method = q.get("method", "gptq")
        cal = self.calibration(model) if method == "gptq" else None
        quantize(model, q.get("bits", 8), q.get("group_size"), method, cal)
        self.save_metrics("quantize", {"ppl": self.ppl(model), **q})
        self._export(model)

    def export(self) -> None:
        self._export(_load(self.latest("export")))

    def _export(self, model) -> None:
        e = self.recipe.get("export") or {}
        out = Path(e.get("out_dir", self.work / "export"))
        if _rank0():
            export(
                model, self.tok, out, sparse=e.get("sparse"), recipe=self.recipe, metrics=self.metrics, overwrite=True
            )
        self.save_metrics("export", {"out_dir": str(out)})


def run(recipe: dict, stages=STAGES) -> dict:
    """Runs the given stages of a validated recipe (those whose section is present) and returns the metrics."""
    r = Runner(recipe)
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
        if stage == "export" and recipe.get("quantize") is not None and "quantize" in stages:
            continue  # quantize already exported
        if recipe.get(stage) is None and stage != "export":
            continue
        getattr(r, stage)()
    return r.metrics
