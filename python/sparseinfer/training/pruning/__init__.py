"""One-shot pruning: the algorithms (pure functions of one matrix) and ``prune`` (the model-level driver)."""

from .algorithms import magnitude, sparsegpt, wanda
from .calibrate import capture_block_inputs, sequential, transformer_blocks
from .prune import prune

__all__ = ["capture_block_inputs", "magnitude", "prune", "sequential", "sparsegpt", "transformer_blocks", "wanda"]
