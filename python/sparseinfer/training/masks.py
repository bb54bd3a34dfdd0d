"""Sparsity masks: selecting prunable layers, building unstructured and N:M masks from scores, applying and
keeping them. Pure functions over tensors, plus two helpers that walk a model.

A mask is a bool tensor shaped like the weight: True = kept, False = pruned.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import torch
from torch import nn

# Not pruned by default: embeddings, the output head (Whisper's is the top-level ``proj_out``) and norms are not
# nn.Linear inside blocks, except the head.
DEFAULT_IGNORE = ("lm_head", "re:^proj_out$", "*embed*", "*wte*", "*wpe*", "*norm*", "*ln_*", "*score*")


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    for pat in ignore:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif fnmatch.fnmatch(name, pat) or name == pat or name.endswith("." + pat):
            return True
    return False


def prunable_linears(model: nn.Module, ignore: Iterable[str] = DEFAULT_IGNORE) -> dict[str, nn.Module]:
    """Every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) whose name matches no ``ignore`` pattern
    (fnmatch globs, or ``re:<regex>``)."""
    out = {}
    for name, mod in model.named_modules():
        if _is_linear(mod) and not _ignored(name, ignore):
            out[name] = mod
    return out


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view: GPT-2's Conv1D stores ``[in, out]``)."""
    return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``"unstructured"`` → None; ``"2:4"`` → (2, 4)."""
    if structure == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", structure)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"structure must be 'unstructured' or 'N:M' with 0 < N < M, got {structure!r}")
    return int(m.group(1)), int(m.group(2))


def mask_from_scores(scores: torch.Tensor, sparsity: float, structure: str = "unstructured", per_row: bool = False):
    """Keep the highest scores. Unstructured: prune the ``sparsity`` fraction with the lowest scores over the whole
    matrix (or per output row when ``per_row``). N:M: keep the N highest of every M consecutive inputs (the
    sparsity is then 1 - N/M and ``sparsity`` is ignored)."""
    # scores: [out, in]
    nm = parse_structure(structure)
    if nm is not None:
        n, m = nm
        rows, cols = scores.shape
        if cols % m:
            raise ValueError(f"{cols} input columns are not a multiple of M={m}")
        g = scores.reshape(rows, cols // m, m)
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(2, g.topk(n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = scores.argsort(dim=1)[:, :k]
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, idx, False)
        return keep
    k = int(scores.numel() * sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    idx = flat.argsort()[:k]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[idx] = False
    return keep.reshape(scores.shape)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the pruned weights of each named module (masks are ``[out, in]``)."""
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        w = weight_matrix(mods[name])
        w.mul_(mask.to(w.dtype))


def masks_from_zeros(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Masks that keep exactly the nonzero weights of the named modules."""
    mods = dict(model.named_modules())
    return {n: weight_matrix(mods[n]).detach() != 0 for n in names}


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of zeros in each masked module's weight, and ``"global"`` over all of them."""
    mods = dict(model.named_modules())
    out, zeros, total = {}, 0, 0
    for name in masks:
        w = weight_matrix(mods[name])
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    out["global"] = zeros / max(total, 1)
    return out


class MaskKeeper:
    """Keeps pruned weights at exactly zero during fine-tuning: their gradients are zeroed before the optimizer
    step (so Adam's moments for them stay zero and nothing revives them) and the weights are re-masked after it.

    Works on FSDP2-sharded models (``fully_shard``): a weight that is a DTensor gets its mask sharded the same way,
    so each rank masks only its own shard. (FSDP1's flattened parameters are not supported.)

    >>> keeper = MaskKeeper(model, masks)
    >>> loss.backward(); keeper.before_step(); opt.step(); keeper.after_step()
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        mods = dict(model.named_modules())
        self.items = []
        for name, mask in masks.items():
            w = mods[name].weight
            m = mask.t() if type(mods[name]).__name__ == "Conv1D" else mask
            self.items.append((w, _like(m, w)))

    @torch.no_grad()
    def before_step(self) -> None:
        for p, m in self.items:
            if p.grad is not None:
                p.grad.mul_(m.to(p.grad.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        for p, m in self.items:
            p.mul_(m.to(p.dtype))


def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The bool mask on the weight's device, sharded like it when the weight is a DTensor."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch < 2.4
        DTensor = None
    if DTensor is not None and isinstance(weight, DTensor):
        # Every rank holds the same full mask, so each cuts out its own shard (no communication).
        return distribute_tensor(mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None)
    return mask.to(weight.device)
