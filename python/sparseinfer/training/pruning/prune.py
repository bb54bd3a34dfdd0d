"""``prune(model, method, sparsity, calibration)``: one-shot pruning of every prunable linear layer in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..masks import DEFAULT_IGNORE, prunable_linears, weight_matrix
from . import algorithms, owl
from .calibrate import block_groups, block_progress, sequential, set_weight

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


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
    allocation: str = "uniform",
    owl_lambda: float = 0.08,
    owl_m: float = 5.0,
) -> dict[str, torch.Tensor]:
    """Prunes ``model`` in place and returns ``{module name: keep mask [out, in]}``.

    method: "magnitude" (no data), "wanda" or "sparsegpt" (need ``calibration``: batches of model inputs, e.g.
    ``{"input_ids": LongTensor[B, S], "attention_mask": ...}``; for an encoder-decoder also ``labels`` or
    ``decoder_input_ids``). structure: "unstructured" or "N:M" (e.g. "2:4").
    ``layer_sparsity`` overrides the sparsity of named modules. ``allocation="owl"`` spreads ``sparsity`` over the
    transformer blocks by their outlier ratio (``pruning.owl``; needs ``calibration``; ``owl_lambda`` bounds the
    spread, ``owl_m`` is the outlier multiple). ``prior`` holds the keep masks of an earlier stage: the new masks
    are nested in them (staged gradual pruning).

    >>> masks = prune(model, "sparsegpt", 0.7, calibration=[{"input_ids": ids}])
    >>> masks = prune(model, "wanda", 0.7, calibration=batches, allocation="owl")
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    modules = prunable_linears(model, ignore)
    if not modules:
        raise ValueError("no prunable linear layers (check the ignore patterns)")
    prior = prior or {}
    batches = list(calibration or [])
    if (method != "magnitude" or allocation == "owl") and not batches:
        raise ValueError(f"{method if method != 'magnitude' else 'OWL allocation'} needs calibration batches")
    per = {n: sparsity for n in modules}
    if allocation == "owl":
        per.update(owl_allocation(model, batches, modules, sparsity, owl_lambda, owl_m))
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


@torch.no_grad()
def owl_allocation(
    model: nn.Module,
    batches: list[dict],
    modules: dict[str, nn.Module],
    sparsity: float,
    lam: float = 0.08,
    m: float = 5.0,
) -> dict[str, float]:
    """Per-module sparsities from OWL (``pruning.owl``): one calibration pass over the unpruned model collects
    each block's Wanda scores, and every module in a block gets that block's sparsity."""
    groups = [g for g in block_groups(model, modules) if g]
    where = {n: i for i, g in enumerate(groups) for n in g}
    pending: dict[int, list[torch.Tensor]] = {}
    ratios: dict[int, float] = {}

    def process(name, mod, stat):
        i = where[name]
        scores = weight_matrix(mod).detach().abs().float() * stat.sqrt().float().reshape(1, -1)  # [out, in]
        pending.setdefault(i, []).append(scores)
        if len(pending[i]) == len(groups[i]):  # the block is complete: keep one number, not its scores
            ratios[i] = owl.outlier_ratio(pending.pop(i), m)

    sequential(model, batches, "norm", process, modules, progress=block_progress("OWL outlier ratios"))
    if len(ratios) != len(groups):
        raise ValueError("some blocks saw no calibration inputs")
    sizes = [sum(weight_matrix(modules[n]).numel() for n in g) for g in groups]
    alloc = owl.owl_sparsities([ratios[i] for i in range(len(groups))], sparsity, lam, sizes)
    return {n: alloc[i] for i, g in enumerate(groups) for n in g}
