"""``export(model, tokenizer, out_dir)``: write the compressed checkpoint that ``sparseinfer.load`` runs.

The contract is docs/FORMAT.md (version 1): compressed-tensors names and layouts (``sparse-bitmask``,
``int-quantized``, ``pack-quantized``) plus our documented sparse-int4 extension. The encoders here are pure
numpy functions so the format can be tested without torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_dir, write_safetensors

FORMAT_VERSION = 1
# A module is stored sparse when at least this fraction of its weights is zero.
SPARSE_THRESHOLD = 0.25


def pack_bitmask(keep: np.ndarray) -> np.ndarray:
    """bool [rows, cols] → uint8 [rows, ceil(cols/8)], bit j%8 of byte j//8, least significant first."""
    return np.packbits(keep.astype(bool), axis=1, bitorder="little")


def unpack_bitmask(bits: np.ndarray, cols: int) -> np.ndarray:
    return np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool)


def encode_sparse(values: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """The sparse-bitmask tensors of a matrix whose zeros are the pruned weights (float or int8 codes)."""
    keep = values != 0
    rows, cols = values.shape
    counts = keep.sum(1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return {
        f"{prefix}.shape": np.array([rows, cols], dtype=np.int64),
        f"{prefix}.bitmask": pack_bitmask(keep),
        f"{prefix}.compressed": np.ascontiguousarray(values[keep]),
        f"{prefix}.row_offsets": offsets,
    }


def decode_sparse(t: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    rows, cols = (int(v) for v in t[f"{prefix}.shape"])
    keep = unpack_bitmask(t[f"{prefix}.bitmask"], cols)
    out = np.zeros((rows, cols), dtype=t[f"{prefix}.compressed"].dtype)
    out[keep] = t[f"{prefix}.compressed"]
    return out


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


def encode_linear(
    w: np.ndarray, codes: np.ndarray | None, scales: np.ndarray | None, bits: int | None, sparse: bool, prefix: str
) -> dict[str, np.ndarray]:
    """The tensors of one linear ``<prefix>`` (``prefix`` ends without ``.weight``). w: float [out, in];
    codes/scales/bits from quantization (None for float)."""
    t: dict[str, np.ndarray] = {}
    if codes is None:
        if sparse:
            t.update(encode_sparse(w, f"{prefix}.weight"))
        else:
            t[f"{prefix}.weight"] = w
        return t
    t[f"{prefix}.weight_scale"] = np.ascontiguousarray(scales, dtype=np.float32)
    if sparse:
        t.update(encode_sparse(codes.astype(np.int8), f"{prefix}.weight"))
    elif bits == 8:
        t[f"{prefix}.weight"] = codes.astype(np.int8)
    else:
        t[f"{prefix}.weight_packed"] = pack_int4(codes)
        t[f"{prefix}.weight_shape"] = np.array(codes.shape, dtype=np.int64)
    return t


def quantization_config(sparse: bool, global_sparsity: float, bits: int | None, group_size: int | None) -> dict:
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "dense" if bits is None else ("int-quantized" if bits == 8 else "pack-quantized"),
        "ignore": ["lm_head"],
        "sparseinfer_format_version": FORMAT_VERSION,
    }
    if sparse:
        cfg["sparsity_config"] = {
            "format": "sparse-bitmask",
            "global_sparsity": round(global_sparsity, 6),
            "sparsity_structure": "unstructured",
            "targets": ["Linear"],
            "ignore": ["lm_head"],
        }
    if bits is not None:
        cfg["config_groups"] = {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel" if group_size is None else "group",
                    "group_size": group_size,
                },
            }
        }
    return cfg


def export(
    model,
    tokenizer,
    out_dir: str | os.PathLike[str],
    sparse: bool | None = None,
    recipe: dict | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``model`` (a transformers causal LM, possibly pruned and ``quantize``d) as a compressed checkpoint.

    sparse: store linears as bitmask + nonzeros (None: each linear with >= 25 % zeros). ``tokenizer``: a
    transformers tokenizer (``save_pretrained``) or a directory to copy tokenizer files from, or None.

    >>> export(model, tokenizer, "out/sparse70-int8")
    >>> sparseinfer.load("out/sparse70-int8").generate("Once upon a time")
    """
    import torch

    from .masks import prunable_linears

    state = {k: v.detach() for k, v in model.state_dict().items()}
    linears = {n: m for n, m in prunable_linears(model).items() if isinstance(m, torch.nn.Linear)}
    tensors: dict[str, np.ndarray] = {}
    per_module: dict[str, float] = {}
    zeros = total = 0
    bits_seen: set[tuple[int, int | None]] = set()
    any_sparse = False
    float_dtype = np.float16 if next(model.parameters()).dtype == torch.float16 else np.float32
    for name, mod in linears.items():
        w = mod.weight.detach().float().cpu().numpy()
        spec = getattr(mod, "sparseinfer_quant", None)
        frac = float((w == 0).mean())
        is_sparse = frac >= SPARSE_THRESHOLD if sparse is None else bool(sparse)
        codes = scales = bits = None
        if spec is not None:
            codes = spec.codes.cpu().numpy().astype(np.int8)
            # A weight pruned after quantization, or one that rounded to zero, is zero: keep codes and weights
            # in agreement so the bitmask is exactly the nonzeros.
            codes = np.where(w == 0, 0, codes).astype(np.int8)
            scales = spec.scales.cpu().numpy().astype(np.float32)
            bits = spec.bits
            bits_seen.add((spec.bits, spec.group_size))
        tensors.update(encode_linear(w.astype(float_dtype), codes, scales, bits, is_sparse, name))
        state.pop(f"{name}.weight", None)
        any_sparse |= is_sparse
        per_module[name] = frac
        zeros += int((w == 0).sum())
        total += w.size
    if len(bits_seen) > 1:
        raise ValueError(f"mixed quantization schemes are not supported by the format: {sorted(bits_seen)}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    for k, v in state.items():
        if tied and k == "lm_head.weight":
            continue
        a = v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
        tensors[k] = a.astype(float_dtype) if a.dtype == np.float32 else a
    bits, group = next(iter(bits_seen)) if bits_seen else (None, None)
    config = model.config.to_dict()
    if any_sparse or bits is not None:
        config["quantization_config"] = quantization_config(any_sparse, zeros / max(total, 1), bits, group)
    config["dtype"] = "float16" if float_dtype == np.float16 else "float32"
    config.pop("torch_dtype", None)
    info = {
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        "sparsity": {"global": zeros / max(total, 1), **per_module},
        "quantization": None if bits is None else {"bits": bits, "group_size": group},
        "metrics": metrics,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt", "sparseinfer_format_version": "1"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            (tmp / "generation_config.json").write_text(json.dumps(gen.to_diff_dict(), indent=2, default=str))
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            else:
                src = Path(tokenizer)
                for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    if (src / f).is_file():
                        shutil.copy(src / f, tmp / f)
        (tmp / "sparseinfer.json").write_text(json.dumps(info, indent=2, default=str))
    return Path(out_dir)
