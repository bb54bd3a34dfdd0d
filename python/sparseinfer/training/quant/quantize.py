"""``quantize(model, bits, group_size, method, calibration)``: quantize every prunable linear in place.

Weights are replaced by their dequantized values (fake quantization: the torch model now computes what the
quantized model computes) and each module remembers its codes and scales in ``module.sparseinfer_quant`` for
``export``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..masks import DEFAULT_IGNORE, prunable_linears, weight_matrix
from ..pruning.calibrate import block_progress, sequential, set_weight
from . import algorithms


@dataclass
class QuantSpec:
    """What ``quantize`` left on a module: int8 codes ``[out, in]`` and scales ``[out, groups]``."""

    bits: int
    group_size: int | None
    codes: torch.Tensor
    scales: torch.Tensor
    method: str


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    method: str = "gptq",
    calibration: Iterable[dict] | None = None,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict[str, QuantSpec]:
    """Quantizes the prunable linears of ``model`` in place (zeros stay zero) and returns their specs.

    bits: 8 (default per channel) or 4 (default group 128). method: "rtn" or "gptq" (needs ``calibration``).

    >>> quantize(model, bits=8, method="gptq", calibration=batches)
    """
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    algorithms.qmax(bits)
    if bits == 4 and group_size is None:
        group_size = 128
    modules = {n: m for n, m in prunable_linears(model, ignore).items() if isinstance(m, nn.Linear)}
    if not modules:
        raise ValueError("no linear layers to quantize (check the ignore patterns)")
    specs: dict[str, QuantSpec] = {}

    def store(name, mod, deq, codes, scales):
        set_weight(mod, deq)
        spec = QuantSpec(bits, group_size, codes, scales, method)
        mod.sparseinfer_quant = spec
        specs[name] = spec

    if method == "rtn":
        for name, mod in modules.items():
            store(name, mod, *algorithms.rtn(weight_matrix(mod).detach().float(), bits, group_size))
        return specs
    batches = list(calibration or [])
    if not batches:
        raise ValueError("gptq needs calibration batches")

    def process(name, mod, hessian):
        w = weight_matrix(mod).detach().float()
        store(name, mod, *algorithms.gptq(w, hessian, bits, group_size, block_size=block_size, damp=damp))

    sequential(model, batches, "hessian", process, modules, progress=block_progress(f"gptq int{bits}"))
    for name, mod in modules.items():
        if name not in specs:
            store(name, mod, *algorithms.rtn(weight_matrix(mod).detach().float(), bits, group_size))
    return specs
