"""The compressed-tensors layouts sparseinfer writes (docs/FORMAT.md), as numpy functions: the int4 word packing
and config.json's ``quantization_config``. Shared by the trainer's export and the GGUF import, which needs no
torch."""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT_VERSION = 1
# sparseinfer's extension of ``pack-quantized`` for asymmetric 4-bit grids with float minimums (llama.cpp's Q4_1):
# ``<module>.weight_min`` instead of integer zero points (docs/FORMAT.md). Its own name, so compressed-tensors
# refuses the checkpoint rather than loading it without the minimums; rust/.../checkpoint/encodings.rs reads it.
PACK_QUANTIZED_MIN = "sparseinfer-pack-quantized-min"


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int8 codes in -8..7 [rows, cols] → int32 [rows, ceil(cols/8)], code c in bits 4·(c%8) as q + 8."""
    rows, cols = codes.shape
    pad = (-cols) % 8
    u = (np.pad(codes.astype(np.int64), ((0, 0), (0, pad))) + 8).astype(np.uint32).reshape(rows, -1, 8)
    words = np.zeros(u.shape[:2], dtype=np.uint32)
    for k in range(8):
        words |= u[:, :, k] << np.uint32(4 * k)
    return words.view(np.int32)


def unpack_int4(words: np.ndarray, cols: int) -> np.ndarray:
    w = words.view(np.uint32)
    codes = np.stack([(w >> np.uint32(4 * k)) & np.uint32(0xF) for k in range(8)], axis=-1).reshape(w.shape[0], -1)
    return (codes[:, :cols].astype(np.int16) - 8).astype(np.int8)


def quant_format(bits: int | None) -> str:
    """compressed-tensors' name of the format our integer weights are stored in (``dense``: float weights)."""
    return "dense" if bits is None else ("int-quantized" if bits == 8 else "pack-quantized")


def quantization_config(
    sparse: bool,
    global_sparsity: float,
    bits: int | None,
    group_size: int | None,
    ignore: list[str],
    float_linears: list[str],
    symmetric: bool = True,
    fmt: str | None = None,
) -> dict:
    """config.json's ``quantization_config`` as compressed-tensors' ``ModelCompressor.update_config`` writes it.
    ``ignore``: the Linear modules stored as they are (the head: ``lm_head``, Whisper's ``proj_out``), which
    compressed-tensors must not treat as compressed; ``float_linears``: further ones stored as floats in a
    quantized model (no quantization of their own), ignored by the quantization scheme only.
    ``quantization_status: compressed`` and the group's ``format`` are what tell compressed-tensors (>= 0.15,
    through transformers) that the stored weights are codes to decompress; without them it loads the codes
    as if they were the weights. ``symmetric=False`` declares an asymmetric grid; ``fmt`` overrides the format
    name (``PACK_QUANTIZED_MIN``)."""
    fmt = fmt or quant_format(bits)
    cfg: dict[str, Any] = {"quant_method": "compressed-tensors"}
    if bits is not None:
        # compressed-tensors 0.9-0.14 read every key beside quant_method and sparsity_config as a quantization
        # config (and then require config_groups): a sparse float export has none of them.
        q_ignore = sorted(set(ignore) | set(float_linears))
        cfg.update(format=fmt, ignore=q_ignore, sparseinfer_format_version=FORMAT_VERSION)
    if sparse:
        cfg["sparsity_config"] = {
            "format": "sparse-bitmask",
            "global_sparsity": round(global_sparsity, 6),
            "sparsity_structure": "unstructured",
            "targets": ["Linear"],
            "ignore": sorted(ignore),
        }
    if bits is not None:
        cfg["quantization_status"] = "compressed"
        cfg["config_groups"] = {
            "group_0": {
                "targets": ["Linear"],
                "format": fmt,
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "channel" if group_size is None else "group",
                    "group_size": group_size,
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        }
    return cfg
