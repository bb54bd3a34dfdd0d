"""sparseinfer: sparse fine-tuning and fast sparse/quantized LLM inference on CPUs.

Inference needs only numpy and the Rust extension; ``sparseinfer.training`` (``pip install
sparseinfer[train]``) adds torch and transformers.
"""

from . import audio, kernels, models
from ._core import __version__, build_info
from .errors import InvalidInputError, SparseInferError, UnsupportedError
from .model import GenerationStats, Model, Stream, generate, load, transcribe

__all__ = [
    "GenerationStats",
    "Model",
    "Stream",
    "generate",
    "load",
    "transcribe",
    "InvalidInputError",
    "SparseInferError",
    "UnsupportedError",
    "__version__",
    "build_info",
    "audio",
    "kernels",
    "models",
]
