"""``gradual_prune``: staged gradual pruning, the recipe Kurtic et al. (arXiv 2310.06927, section 4) use for
encoder-decoders (T5, Whisper): prune one-shot to the first sparsity, fine-tune with the dense teacher, prune the
fine-tuned model further, fine-tune again, and so on (e.g. 50 → 67 → 75 → 80 %). Each stage's masks are nested in
the previous stage's: what was pruned stays pruned.

A thin driver over ``prune`` and ``finetune``; in a recipe it is ``prune: {stages: [...], steps_per_stage: N}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .finetune import FinetuneConfig, finetune
from .masks import sparsity_report
from .pruning import prune


def check_stages(stages: Sequence[float]) -> list[float]:
    """The stage sparsities as floats; they must be strictly increasing, in [0, 1)."""
    out = [float(s) for s in stages]
    if not out:
        raise ValueError("stages must name at least one sparsity")
    if any(not 0 <= s < 1 for s in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"stages must be strictly increasing sparsities in [0, 1), got {list(stages)}")
    return out


def gradual_prune(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Sequence[dict[str, torch.Tensor]],
    stages: Sequence[float] = (0.5, 0.67, 0.75, 0.8),
    method: str = "sparsegpt",
    calibration: Iterable[dict] | Callable[[nn.Module], Iterable[dict]] | None = None,
    steps_per_stage: int = 100,
    finetune_config: FinetuneConfig | dict[str, Any] | None = None,
    out_dir: str | None = None,
    progress: bool = True,
    on_stage: Callable[[int, float, dict[str, torch.Tensor]], None] | None = None,
    **prune_kwargs: Any,
) -> dict[str, Any]:
    """Prunes ``student`` in place stage by stage to each sparsity in ``stages``, fine-tuning it for
    ``steps_per_stage`` steps (``finetune_config`` gives the losses and optimizer; SquareHead distills from
    ``teacher``) after every stage. ``prune_kwargs`` go to ``prune`` (structure, ignore, allocation, ...).
    ``calibration`` is a list of batches or a function of the model returning them. With ``out_dir`` each stage
    checkpoints in ``out_dir/stage-<i>`` and a rerun resumes. ``on_stage(i, sparsity, masks)`` is called after each
    stage's fine-tuning (to evaluate or save the model at every sparsity).

    Returns ``{"masks": the final keep masks, "stages": [{"sparsity", "achieved", "finetune"}]}``.

    >>> r = gradual_prune(student, teacher, examples, stages=[0.5, 0.67, 0.75, 0.8], method="sparsegpt",
    ...                   calibration=batches, steps_per_stage=200, finetune_config={"lr": 1e-4, "w_sq": 1})
    """
    stages = check_stages(stages)
    if steps_per_stage < 0:
        raise ValueError(f"steps_per_stage must be >= 0, got {steps_per_stage}")
    base = finetune_config if isinstance(finetune_config, FinetuneConfig) else None
    cfg_dict: dict[str, Any] = {} if base else dict(finetune_config or {})
    masks: dict[str, torch.Tensor] | None = None
    history = []
    for i, sparsity in enumerate(stages):
        batches = calibration(student) if callable(calibration) else calibration
        masks = prune(student, method, sparsity, calibration=batches, prior=masks, **prune_kwargs)
        achieved = sparsity_report(student, masks)["global"]
        result: dict[str, Any] = {}
        if steps_per_stage:
            stage_dir = str(Path(out_dir) / f"stage-{i}") if out_dir else None
            if base is not None:
                cfg = replace(base, steps=steps_per_stage, out_dir=stage_dir)
            else:
                cfg = {**cfg_dict, "steps": steps_per_stage, "out_dir": stage_dir}
            result = finetune(student, teacher, data, cfg, masks=masks, progress=progress)
        history.append({"sparsity": sparsity, "achieved": achieved, "finetune": result.get("final", {})})
        if on_stage is not None:
            on_stage(i, sparsity, masks)
    return {"masks": masks, "stages": history}
