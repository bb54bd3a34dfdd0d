"""Layer-by-layer calibration for one-shot pruning and GPTQ on any Hugging Face causal LM.

The inputs of the first transformer block are captured once; then each block in turn records the inputs of its
linear layers (as a Hessian ``Σ x xᵀ`` or per-feature norms), has them pruned or quantized, and is run again to
produce the next block's inputs, so later layers see the already-compressed earlier ones (sequential, as in
SparseGPT). Only one block's statistics are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..masks import _is_linear, weight_matrix


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Mistral/Qwen2, OPT, GPT-2, MPT, ...)."""
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(_is_linear(m) for m in mod[0].modules()):
            candidates.append((name.count("."), name, mod))
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no transformer block list found")
    return min(candidates, key=lambda c: c[:2])[2]


def block_progress(desc: str) -> Callable | None:
    """A tqdm wrapper for the per-block loop of ``sequential`` (None when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return lambda it: tqdm(it, desc=desc, unit="block", leave=False)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[dict]) -> list[tuple[tuple, dict]]:
    """Runs the model up to its first block on each batch and returns that block's (args, kwargs) per batch."""
    block = transformer_blocks(model)[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("no calibration batches")
    return captured


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential(
    model: nn.Module,
    batches: list[dict],
    stat: str,
    process: Callable[[str, nn.Module, torch.Tensor], None],
    modules: dict[str, nn.Module],
    progress: Callable | None = None,
) -> None:
    """For each block: collect ``stat`` ("hessian": Σ xxᵀ, or "norm": Σ x² per feature) of the inputs of every
    module in ``modules`` inside it, call ``process(name, module, stat)`` for each, then feed the block's outputs
    forward."""
    was_training = model.training
    model.eval()
    blocks = transformer_blocks(model)
    names = {id(m): n for n, m in modules.items()}
    inputs = capture_block_inputs(model, batches)
    iterator = progress(range(len(blocks))) if progress else range(len(blocks))
    for i in iterator:
        block = blocks[i]
        targets = {names[id(m)]: m for m in block.modules() if id(m) in names}
        stats: dict[str, torch.Tensor] = {}

        def make_hook(name, stats=stats):
            def hook(_mod, inp):
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])  # [tokens, in]
                if stat == "hessian":
                    s = x.t() @ x
                else:
                    s = (x**2).sum(0)
                stats[name] = stats[name] + s if name in stats else s

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, mod in targets.items():
            if name in stats:
                process(name, mod, stats[name])
        inputs = [((_first(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    model.train(was_training)


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Writes an ``[out, in]`` matrix into a Linear or Conv1D module."""
    weight_matrix(mod).copy_(w.to(mod.weight.dtype))
