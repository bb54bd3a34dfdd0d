"""sparseinfer.training: one-shot pruning, SquareHead sparse fine-tuning, quantization and compressed export.

Needs ``pip install sparseinfer[train]`` (torch, transformers). Pure functions of tensors live in
``pruning.algorithms``, ``quant.algorithms`` and ``distill.losses``; ``prune``, ``quantize``, ``finetune`` and
``export`` are thin drivers over them.

>>> from sparseinfer import training as T
>>> masks = T.prune(model, method="sparsegpt", sparsity=0.7, calibration=batches)  # allocation="owl" for OWL
>>> T.gradual_prune(t5, teacher, examples, stages=[0.5, 0.67, 0.75, 0.8], calibration=batches)  # staged
>>> T.finetune(model, teacher, examples, {"steps": 200, "w_ce": 1.0, "w_sq": 1.0})
>>> T.quantize(model, bits=8, method="gptq", calibration=batches)
>>> T.export(model, tokenizer, "out/sparse70-int8")
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - the inference-only install
    raise ImportError("sparseinfer.training needs torch and transformers: pip install 'sparseinfer[train]'") from e

from .compressed import export
from .distill.losses import ce_loss, kd_loss, squarehead_loss, total_loss
from .finetune import FinetuneConfig, bf16_is_fast, finetune
from .gradual import gradual_prune
from .masks import MaskKeeper, apply_masks, mask_from_scores, masks_from_zeros, prunable_linears, sparsity_report
from .pruning import prune
from .quant import QuantSpec, quantize

__all__ = [
    "FinetuneConfig",
    "bf16_is_fast",
    "MaskKeeper",
    "QuantSpec",
    "apply_masks",
    "ce_loss",
    "export",
    "finetune",
    "gradual_prune",
    "kd_loss",
    "mask_from_scores",
    "masks_from_zeros",
    "prunable_linears",
    "prune",
    "quantize",
    "sparsity_report",
    "squarehead_loss",
    "total_loss",
]
