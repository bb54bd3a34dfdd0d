"""YAML recipes: one file names the model, the data, the pruner, the fine-tuning losses and schedule, the
quantization and the export, and ``run`` carries them out. Validated up front with clear errors.

    model: path/to/hf_model          # or "default": SmolLM2-135M-Instruct, converted from its GGUF
    work_dir: runs/sparse70          # intermediate models and checkpoints
    seed: 0
    data:
      train: data/train/             # a text file, a folder of .txt/.md, or a .jsonl of prompt/answer
      eval: data/eval/               # optional; perplexity before/after each stage
      seq_len: 256
      calibration_samples: 64
    prune:    {method: sparsegpt, sparsity: 0.7, structure: unstructured}   # allocation: owl for OWL
    finetune: {steps: 200, lr: 1.0e-4, batch_size: 8, w_ce: 1.0, w_kd: 0.0, w_sq: 1.0}
    quantize: {bits: 8, group_size: null, method: gptq}
    export:   {out_dir: runs/sparse70/export}

Staged gradual pruning (the paper's schedule for encoder-decoders such as T5; ``model`` may be any
``AutoModelForSeq2SeqLM`` directory, trained on a ``.jsonl`` of prompt/answer pairs): ``stages`` replaces
``sparsity``, and the ``finetune`` section's losses and optimizer are used between stages for ``steps_per_stage``
steps (default: ``finetune.steps``) and then once more for the final fine-tuning:

    prune:    {method: sparsegpt, stages: [0.5, 0.67, 0.75, 0.8], steps_per_stage: 100}
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from .finetune import FinetuneConfig
from .gradual import check_stages

SECTIONS = {"model", "work_dir", "seed", "data", "prune", "finetune", "quantize", "export"}
DATA_KEYS = {"train", "eval", "seq_len", "calibration_samples", "answer_only", "eval_samples"}
PRUNE_KEYS = {
    "method",
    "sparsity",
    "structure",
    "ignore",
    "block_size",
    "damp",
    "allocation",
    "owl_lambda",
    "owl_m",
    "stages",
    "steps_per_stage",
}
QUANT_KEYS = {"bits", "group_size", "method"}
EXPORT_KEYS = {"out_dir", "sparse"}


class RecipeError(ValueError):
    """A recipe that cannot be run, with the key at fault."""


def _check_keys(section: str, d: Any, allowed: set[str]) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise RecipeError(f"recipe section {section!r} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise RecipeError(f"recipe section {section!r}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return d


def validate(recipe: dict) -> dict:
    """Checks a parsed recipe and fills defaults; returns a normalised copy."""
    if not isinstance(recipe, dict):
        raise RecipeError("a recipe is a YAML mapping")
    r = copy.deepcopy(recipe)
    unknown = sorted(set(r) - SECTIONS)
    if unknown:
        raise RecipeError(f"unknown recipe sections {unknown}; allowed: {sorted(SECTIONS)}")
    if "model" not in r:
        raise RecipeError("the recipe needs 'model' (a model directory, or 'default')")
    r.setdefault("seed", 0)
    r.setdefault("work_dir", "runs/recipe")
    data = _check_keys("data", r.get("data"), DATA_KEYS)
    data.setdefault("seq_len", 256)
    data.setdefault("calibration_samples", 64)
    r["data"] = data
    if r.get("prune") is not None:
        p = _check_keys("prune", r["prune"], PRUNE_KEYS)
        if p.get("method", "sparsegpt") not in ("magnitude", "wanda", "sparsegpt"):
            raise RecipeError(f"prune.method must be magnitude, wanda or sparsegpt, got {p.get('method')!r}")
        s = p.get("sparsity", 0.5)
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise RecipeError(f"prune.sparsity must be a number in [0, 1), got {s!r}")
        if p.get("allocation", "uniform") not in ("uniform", "owl"):
            raise RecipeError(f"prune.allocation must be uniform or owl, got {p.get('allocation')!r}")
        if "stages" in p:
            if "sparsity" in p:
                raise RecipeError("prune: give either sparsity (one shot) or stages (gradual), not both")
            stages = p["stages"]
            if not isinstance(stages, list) or not all(isinstance(x, (int, float)) for x in stages):
                raise RecipeError(f"prune.stages must be a list of sparsities, got {stages!r}")
            try:
                check_stages(stages)
            except ValueError as e:
                raise RecipeError(f"prune.{e}") from e
            n = p.get("steps_per_stage", 0)
            if not isinstance(n, int) or n < 0:
                raise RecipeError(f"prune.steps_per_stage must be an integer >= 0, got {n!r}")
        elif "steps_per_stage" in p:
            raise RecipeError("prune.steps_per_stage needs prune.stages")
    if r.get("finetune") is not None:
        ft = r["finetune"]
        names = {f.name for f in fields(FinetuneConfig)} - {"extra", "out_dir"}
        _check_keys("finetune", ft, names)
        try:
            FinetuneConfig.from_dict(ft)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"finetune: {e}") from e
    if r.get("quantize") is not None:
        q = _check_keys("quantize", r["quantize"], QUANT_KEYS)
        if q.get("bits", 8) not in (4, 8):
            raise RecipeError(f"quantize.bits must be 4 or 8, got {q.get('bits')!r}")
        if q.get("method", "gptq") not in ("rtn", "gptq"):
            raise RecipeError(f"quantize.method must be rtn or gptq, got {q.get('method')!r}")
    if r.get("export") is not None:
        _check_keys("export", r["export"], EXPORT_KEYS)
    needs_data = (r.get("prune") or {}).get("method", "sparsegpt") != "magnitude" and r.get("prune") is not None
    needs_data |= bool((r.get("prune") or {}).get("stages")) or (r.get("prune") or {}).get("allocation") == "owl"
    needs_data |= r.get("finetune") is not None or (r.get("quantize") or {}).get("method", "gptq") == "gptq"
    if needs_data and not data.get("train"):
        raise RecipeError("data.train is required for calibration or fine-tuning")
    return r


def load(path: str | os.PathLike[str]) -> dict:
    """Reads and validates a YAML (or JSON) recipe file."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        recipe = json.loads(text)
    else:
        import yaml

        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from e
    return validate(recipe)
