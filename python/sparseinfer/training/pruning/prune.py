"""``prune(model, method, sparsity, calibration)``: one-shot pruning of every prunable linear layer in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..masks import DEFAULT_IGNORE, mask_from_scores, prunable_linears, weight_matrix
from . import algorithms
from .calibrate import block_progress, sequential, set_weight

METHODS = ("magnitude", "wanda", "sparsegpt")


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "sparsegpt",
    sparsity: float = 0.5,
    calibration: Iterable[dict] | None = None,
    structure: str = "unstructured",
    ignore: Iterable[str] = DEFAULT_IGNORE,
    layer_sparsity: dict[str, float] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Prunes ``model`` in place and returns ``{module name: keep mask [out, in]}``.

    method: "magnitude" (no data), "wanda" or "sparsegpt" (need ``calibration``: batches of model inputs, e.g.
    ``{"input_ids": LongTensor[B, S], "attention_mask": ...}``). structure: "unstructured" or "N:M" (e.g. "2:4").
    ``layer_sparsity`` overrides the sparsity of named modules (non-uniform / OWL-style allocations).

    >>> masks = prune(model, "sparsegpt", 0.7, calibration=[{"input_ids": ids}])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    modules = prunable_linears(model, ignore)
    if not modules:
        raise ValueError("no prunable linear layers (check the ignore patterns)")
    per = {n: (layer_sparsity or {}).get(n, sparsity) for n in modules}
    masks: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        for name, mod in modules.items():
            w = weight_matrix(mod)
            masks[name] = mask_from_scores(w.detach().abs().float(), per[name], structure)
            w.mul_(masks[name].to(w.dtype))
        return masks
    batches = list(calibration or [])
    if not batches:
        raise ValueError(f"{method} needs calibration batches")

    def process(name, mod, stat):
        w = weight_matrix(mod).detach().float()
        if method == "wanda":
            new, keep = algorithms.wanda(w, stat.sqrt(), per[name], structure)
        else:
            new, keep = algorithms.sparsegpt(w, stat, per[name], structure, block_size=block_size, damp=damp)
        set_weight(mod, new)
        masks[name] = keep

    stat = "norm" if method == "wanda" else "hessian"
    sequential(model, batches, stat, process, modules, progress=block_progress(f"{method} {sparsity:.0%}"))
    # Modules outside the blocks (none by default) are pruned by magnitude.
    for name, mod in modules.items():
        if name not in masks:
            w = weight_matrix(mod)
            masks[name] = mask_from_scores(w.detach().abs().float(), per[name], structure)
            w.mul_(masks[name].to(w.dtype))
    return masks
