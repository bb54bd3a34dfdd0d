"""One-shot pruning: the algorithms (pure functions of one matrix) and ``prune`` (the model-level driver)."""

from .algorithms import magnitude, sparsegpt, wanda
from .calibrate import block_stacks, capture_stack_inputs, sequential, transformer_blocks
from .prune import prune

__all__ = [
    "block_stacks",
    "capture_stack_inputs",
    "magnitude",
    "prune",
    "sequential",
    "sparsegpt",
    "transformer_blocks",
    "wanda",
]
