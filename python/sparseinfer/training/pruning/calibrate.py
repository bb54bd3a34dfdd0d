"""Layer-by-layer calibration for one-shot pruning and GPTQ on Hugging Face causal LMs and encoder-decoders.

One forward pass per batch records what every transformer block is called with (masks, position embeddings or
biases, the encoder's output for a decoder's cross-attention); then each block in turn records the inputs of its
linear layers (as a Hessian ``Σ x xᵀ`` or per-feature norms), has them pruned or quantized, and is run again to
produce the next block's hidden states, so later layers see the already-compressed earlier ones (sequential, as in
SparseGPT). Encoder-decoders (T5, Whisper, BART) go stack by stack: the encoder's blocks first, then the decoder's,
whose recorded inputs then hold the compressed encoder's output. Only one block's statistics are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..masks import _is_linear, weight_matrix


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList whose first element holds a linear layer, in module order: ``(name, list)``."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(_is_linear(m) for m in mod[0].modules()):
            out.append((name, mod))
    if not out:
        raise ValueError(f"{type(model).__name__}: no transformer block list found")
    return out


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Mistral/Qwen2, OPT, GPT-2, MPT, ...)."""
    return min(_block_lists(model), key=lambda c: (c[0].count("."), c[0]))[1]


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The block lists to calibrate, in the order data flows through them: the transformer blocks of a causal
    LM; for an encoder-decoder the outermost block lists (``encoder.block`` then ``decoder.block`` in T5,
    ``model.encoder.layers`` then ``model.decoder.layers`` in Whisper and BART)."""
    if not is_encoder_decoder(model):
        return [transformer_blocks(model)]
    lists = _block_lists(model)
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    # Module order puts the encoder first in every Hugging Face encoder-decoder; make it explicit.
    outer.sort(key=lambda c: "decoder" in c[0].split("."))
    return [m for _, m in outer]


def block_progress(desc: str) -> Callable | None:
    """A tqdm wrapper for the per-block loop of ``sequential`` (None when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return lambda it: tqdm(it, desc=desc, unit="block", leave=False)


class _Stop(Exception):
    pass


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A block call's hidden states (the first positional argument, or ``hidden_states=``) and the rest."""
    if args:
        return args[0], args[1:], kwargs
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise ValueError("a transformer block was called without hidden states")


def _call(block: nn.Module, hidden: torch.Tensor, rest_args: tuple, kwargs: dict, positional: bool):
    if positional:
        return block(hidden, *rest_args, **kwargs)
    return block(*rest_args, hidden_states=hidden, **kwargs)


@torch.no_grad()
def capture_stack_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[dict]) -> list[dict]:
    """Runs the model on each batch up to the last block of ``blocks`` and records what each block is called
    with. Per batch: ``{"hidden": the first block's hidden states, "calls": [(args without hidden, kwargs,
    positional)] per block}``. The later blocks' hidden states are not kept: ``sequential`` recomputes them."""
    captured: list[dict] = []
    current: dict = {}

    def make_hook(i):
        def hook(_mod, args, kwargs):
            hidden, rest, kw = _split_hidden(args, kwargs)
            if i == 0:
                current["hidden"] = hidden
            current["calls"].append((rest, kw, bool(args)))
            if i == len(blocks) - 1:
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            current = {"calls": []}
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
            if len(current["calls"]) != len(blocks):
                raise ValueError(f"the model called {len(current['calls'])} of its {len(blocks)} blocks")
            captured.append(current)
    finally:
        for h in handles:
            h.remove()
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
    """For each block (of each stack, see ``block_stacks``): collect ``stat`` ("hessian": Σ xxᵀ, or "norm": Σ x²
    per feature) of the inputs of every module in ``modules`` inside it, call ``process(name, module, stat)`` for
    each, then feed the block's outputs forward."""
    was_training = model.training
    model.eval()
    names = {id(m): n for n, m in modules.items()}
    for blocks in block_stacks(model):
        # Recorded after the previous stack was processed, so a decoder sees the compressed encoder's output.
        inputs = capture_stack_inputs(model, blocks, batches)
        hidden = [b["hidden"] for b in inputs]
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
                for h, b in zip(hidden, inputs):
                    _call(block, h, *b["calls"][i])
            finally:
                for h in handles:
                    h.remove()
            for name, mod in targets.items():
                if name in stats:
                    process(name, mod, stats[name])
            hidden = [_first(_call(block, h, *b["calls"][i])) for h, b in zip(hidden, inputs)]
            for b in inputs:
                b["calls"][i] = None  # this block's recorded inputs are no longer needed
    model.train(was_training)


def block_groups(model: nn.Module, modules: dict[str, nn.Module]) -> list[list[str]]:
    """The names in ``modules`` grouped by transformer block (every stack's blocks in order); modules outside
    the blocks are left out."""
    names = {id(m): n for n, m in modules.items()}
    groups = []
    for blocks in block_stacks(model):
        for block in blocks:
            groups.append([names[id(m)] for m in block.modules() if id(m) in names])
    return groups


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Writes an ``[out, in]`` matrix into a Linear or Conv1D module."""
    weight_matrix(mod).copy_(w.to(mod.weight.dtype))
