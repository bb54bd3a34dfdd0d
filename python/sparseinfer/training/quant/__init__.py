"""Weight quantization: the algorithms (pure) and ``quantize`` (the model-level driver)."""

from .algorithms import gptq, group_scales, rtn
from .quantize import QuantSpec, quantize

__all__ = ["QuantSpec", "gptq", "group_scales", "quantize", "rtn"]
