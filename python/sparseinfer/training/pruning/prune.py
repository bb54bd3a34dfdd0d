"""``prune(model, method, sparsity, calibration)``: one-shot pruning of every prunable linear layer in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..masks import DEFAULT_IGNORE, prunable_linears, weight_matrix
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
    prior: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prunes ``model`` in place and returns ``{module name: keep mask [out, in]}``.

    method: "magnitude" (no data), "wanda" or "sparsegpt" (need ``calibration``: batches of model inputs, e.g.
    ``{"input_ids": LongTensor[B, S], "attention_mask": ...}``; for an encoder-decoder also ``labels`` or
    ``decoder_input_ids``). structure: "unstructured" or "N:M" (e.g. "2:4").
    ``layer_sparsity`` overrides the sparsity of named modules. ``prior`` holds the keep masks of an earlier stage:
    the new masks are nested in them (staged gradual pruning).

    >>> masks = prune(model, "sparsegpt", 0.7, calibration=[{"input_ids": ids}])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    modules = prunable_linears(model, ignore)
    if not modules:
        raise ValueError("no prunable linear layers (check the ignore patterns)")
    prior = prior or {}
    batches = list(calibration or [])
    if method != "magnitude" and not batches:
        raise ValueError(f"{method} needs calibration batches")
    per = {n: sparsity for n in modules}
    per.update({n: s for n, s in (layer_sparsity or {}).items() if n in modules})
    masks: dict[str, torch.Tensor] = {}

    def process(name, mod, stat):
        w = weight_matrix(mod).detach().float()
        keep0 = prior.get(name)
        if method == "wanda":
            new, keep = algorithms.wanda(w, stat.sqrt(), per[name], structure, prior=keep0)
        elif method == "sparsegpt":
            new, keep = algorithms.sparsegpt(
                w, stat, per[name], structure, block_size=block_size, damp=damp, prior=keep0
            )
        else:
            new, keep = algorithms.magnitude(w, per[name], structure, prior=keep0)
        set_weight(mod, new)
        masks[name] = keep

    if method != "magnitude":
        stat = "norm" if method == "wanda" else "hessian"
        sequential(model, batches, stat, process, modules, progress=block_progress(f"{method} {sparsity:.0%}"))
    # Magnitude pruning, and modules outside the blocks (none by default), need no statistics.
    for name, mod in modules.items():
        if name not in masks:
            process(name, mod, None)
    return masks
