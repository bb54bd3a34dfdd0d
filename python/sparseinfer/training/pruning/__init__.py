"""One-shot pruning: the algorithms (pure functions of one matrix), OWL layer allocation, and ``prune`` (the
model-level driver)."""

from .algorithms import magnitude, sparsegpt, wanda
from .calibrate import block_stacks, capture_stack_inputs, sequential, transformer_blocks
from .owl import outlier_ratio, owl_sparsities
from .prune import owl_allocation, prune

__all__ = [
    "block_stacks",
    "capture_stack_inputs",
    "magnitude",
    "outlier_ratio",
    "owl_allocation",
    "owl_sparsities",
    "prune",
    "sequential",
    "sparsegpt",
    "transformer_blocks",
    "wanda",
]
