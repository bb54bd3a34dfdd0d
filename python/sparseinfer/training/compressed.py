"""``export(model, tokenizer, out_dir)``: write the compressed checkpoint that ``sparseinfer.load`` runs.

The contract is docs/FORMAT.md (version 1): compressed-tensors names and layouts (``sparse-bitmask`` as
compressed-tensors 0.9-0.14 write it, ``int-quantized``, ``pack-quantized``) plus our documented sparse-int4
extension, and the ``quantization_config`` compressed-tensors' own writer emits, so that transformers and
compressed-tensors load the export with the weights we trained. The bit-level encoders are numpy functions so the
layouts can be tested without torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_dir
from ..ctformat import FORMAT_VERSION, pack_int4, quant_format, quantization_config, unpack_int4

__all__ = ["FORMAT_VERSION", "export", "pack_int4", "quant_format", "quantization_config", "unpack_int4"]
# A module is stored sparse when at least this fraction of its weights is zero.
SPARSE_THRESHOLD = 0.25


def pack_bitmask(keep: np.ndarray) -> np.ndarray:
    """bool [rows, cols] → uint8 [rows, ceil(cols/8)], bit j%8 of byte j//8, least significant first."""
    return np.packbits(keep.astype(bool), axis=1, bitorder="little")


def unpack_bitmask(bits: np.ndarray, cols: int) -> np.ndarray:
    return np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool)


def encode_sparse(values, module: str) -> dict[str, Any]:
    """The sparse-bitmask tensors of ``<module>``'s weight, whose zeros are the pruned weights: a float or int8
    codes matrix [rows, cols], numpy or torch (bf16 values stay bf16). Laid out as compressed-tensors'
    ``BitmaskTensor.dict(module)``: ``<module>.shape`` I64 [2], ``.bitmask`` U8, ``.compressed`` (the nonzeros,
    row-major), ``.row_offsets`` I64 [rows]."""
    keep = np.asarray(values != 0)
    rows, cols = values.shape
    counts = keep.sum(1)
    offsets = (np.cumsum(counts) - counts).astype(np.int64)
    compressed = values[keep] if isinstance(values, np.ndarray) else values[_torch().from_numpy(keep)]
    return {
        f"{module}.shape": np.array([rows, cols], dtype=np.int64),
        f"{module}.bitmask": pack_bitmask(keep),
        f"{module}.compressed": compressed,
        f"{module}.row_offsets": offsets,
    }


def decode_sparse(t: dict[str, np.ndarray], module: str) -> np.ndarray:
    rows, cols = (int(v) for v in t[f"{module}.shape"])
    keep = unpack_bitmask(t[f"{module}.bitmask"], cols)
    out = np.zeros((rows, cols), dtype=t[f"{module}.compressed"].dtype)
    out[keep] = t[f"{module}.compressed"]
    return out


def _torch():
    import torch

    return torch


def encode_linear(w, codes: np.ndarray | None, scales: np.ndarray | None, bits: int | None, sparse: bool, module: str):
    """The tensors of one linear ``<module>``. w: float [out, in] (numpy or torch, in the dtype to store);
    codes/scales/bits from quantization (None for float)."""
    t: dict[str, Any] = {}
    if codes is None:
        if sparse:
            t.update(encode_sparse(w, module))
        else:
            t[f"{module}.weight"] = w
        return t
    t[f"{module}.weight_scale"] = np.ascontiguousarray(scales, dtype=np.float32)
    if sparse:
        # compressed-tensors compresses the int8 codes the quantization compressor left in ``.weight``.
        t.update(encode_sparse(codes.astype(np.int8), module))
    elif bits == 8:
        t[f"{module}.weight"] = codes.astype(np.int8)
    else:
        t[f"{module}.weight_packed"] = pack_int4(codes)
        t[f"{module}.weight_shape"] = np.array(codes.shape, dtype=np.int64)
    return t


def write_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Writes numpy arrays and torch tensors with the safetensors library (torch keeps bf16 as bf16)."""
    torch = _torch()
    from safetensors.torch import save_file

    as_torch = {
        k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()).contiguous()
        for k, v in tensors.items()
    }
    save_file(as_torch, str(path), metadata=metadata)


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

    sparse: store linears as compressed-tensors' sparse-bitmask (None: each linear with >= 25 % zeros).
    ``sparse=False`` writes the dense-compatible form (quantized but not bitmask-compressed), which stacks
    without a sparse-bitmask decompressor read: compressed-tensors >= 0.15, so current transformers and vLLM.
    Float tensors keep the model's dtype (f32, f16 or bf16). ``tokenizer``: a transformers tokenizer
    (``save_pretrained``) or a directory to copy tokenizer files from, or None.

    >>> export(model, tokenizer, "out/sparse70-int8")
    >>> sparseinfer.load("out/sparse70-int8").generate("Once upon a time")
    """
    torch = _torch()

    from .masks import prunable_linears

    state = {k: v.detach() for k, v in model.state_dict().items()}
    linears = {n: m for n, m in prunable_linears(model).items() if isinstance(m, torch.nn.Linear)}
    tensors: dict[str, Any] = {}
    per_module: dict[str, float] = {}
    zeros = total = 0
    bits_seen: set[tuple[int, int | None]] = set()
    any_sparse = False
    float_linears: list[str] = []
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"export: model dtype {dtype} is not a float dtype (float32, float16 or bfloat16)")
    for name, mod in linears.items():
        w = mod.weight.detach().cpu()
        zero = (w == 0).numpy()
        spec = getattr(mod, "sparseinfer_quant", None)
        frac = float(zero.mean())
        is_sparse = frac >= SPARSE_THRESHOLD if sparse is None else bool(sparse)
        codes = scales = bits = None
        if spec is not None:
            codes = spec.codes.cpu().numpy().astype(np.int8)
            # A weight pruned after quantization, or one that rounded to zero, is zero: keep codes and weights
            # in agreement so the bitmask is exactly the nonzeros.
            codes = np.where(zero, 0, codes).astype(np.int8)
            scales = spec.scales.cpu().numpy().astype(np.float32)
            bits = spec.bits
            bits_seen.add((spec.bits, spec.group_size))
        else:
            float_linears.append(name)
        tensors.update(encode_linear(w.to(dtype), codes, scales, bits, is_sparse, name))
        state.pop(f"{name}.weight", None)
        any_sparse |= is_sparse
        per_module[name] = frac
        zeros += int(zero.sum())
        total += zero.size
    if len(bits_seen) > 1:
        raise ValueError(f"mixed quantization schemes are not supported by the format: {sorted(bits_seen)}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    # Tensors tied to one already written (T5's encoder/decoder embed_tokens are `shared`) are written once,
    # under the first name, as transformers' own save_pretrained does; loaders re-tie them.
    seen: set[tuple] = set()
    for k, v in state.items():
        if tied and k == "lm_head.weight":
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        tensors[k] = v.to(dtype) if v.is_floating_point() else v
    bits, group = next(iter(bits_seen)) if bits_seen else (None, None)
    config = model.config.to_dict()
    if any_sparse or bits is not None:
        # Every other Linear (the head, whatever its name) is stored as it is.
        heads = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in linears]
        config["quantization_config"] = quantization_config(
            any_sparse, zeros / max(total, 1), bits, group, ignore=heads, float_linears=float_linears
        )
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    info = {
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        "sparsity": {"global": zeros / max(total, 1), **per_module},
        "quantization": None if bits is None else {"bits": bits, "group_size": group},
        "metrics": metrics,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tensors(tmp / "model.safetensors", tensors, {"format": "pt", "sparseinfer_format_version": "1"})
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
