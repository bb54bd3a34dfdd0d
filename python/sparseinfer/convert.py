"""GGUF → Hugging Face directory import (the format llama.cpp users hold).

Reads a GGUF file with the ``gguf`` package (``pip install gguf``), dequantizes every tensor to float32, undoes
llama.cpp's rotary row permutation of q/k, and writes ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json``. Llama-architecture GGUFs with a BPE (``gpt2``)
tokenizer are supported, which covers Llama 3, SmolLM, Qwen2-style vocabularies.

``keep_grid=True`` keeps the linear layers' own integer grid instead (Q4_0, Q4_1 or Q8_0: codes, f16 scales and
Q4_1's f16 minimums bit for bit) in a compressed checkpoint (docs/FORMAT.md), which ``sparseinfer.load`` runs as
stored on the same grid (but for an int8 code of -128, which llama.cpp's quantizer does not write: the int8
kernels hold -127..127). Q4_0 and Q8_0 are compressed-tensors' own ``pack-quantized`` / ``int-quantized`` (group
32, symmetric), so transformers reads them too; Q4_1's float minimums need sparseinfer's extension.

The file is untrusted input: every metadata key is read with its expected type and range, every tensor's type,
shape and extent are checked against the file and the metadata before it is read, and anything else is an
``InvalidInputError`` naming the file and the key or tensor.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_dir, write_safetensors
from .ctformat import PACK_QUANTIZED_MIN, pack_int4, quantization_config
from .errors import InvalidInputError, UnsupportedError

# GGUF tensor names → Hugging Face Llama names (`{i}`: block index).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# The runtime's size limits (`limits` in rust/sparseinfer-core/src/runtime/config.rs): a GGUF that declares more
# could not be loaded once converted.
_MAX_HIDDEN = 1 << 17
_MAX_LAYERS = 1 << 10
_MAX_HEADS = 1 << 10
_MAX_HEAD_DIM = 1 << 11
_MAX_INTERMEDIATE = 1 << 20
_MAX_VOCAB = 1 << 24
_MAX_POSITIONS = 1 << 26
# ggml tensors have at most four dimensions (GGML_MAX_DIMS).
_MAX_DIMS = 4
# Header counts. The gguf reader keeps a few numpy views (~100 bytes each) per header value, so a count that
# lies costs memory and time in proportion to it long before the file runs out. Real files stay far below these:
# a few dozen keys, hundreds to a few thousand tensors, vocabularies of up to ~262K tokens with merges and scores.
_MAX_KEYS = 1 << 16
_MAX_TENSORS = 1 << 16
_MAX_ARRAY = 1 << 22  # elements of one metadata array
_MAX_HEADER_VALUES = 1 << 23  # elements of all arrays together

_REQUIRED = object()


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        return _NAMES[key].format(i=parts[1]) if key in _NAMES else None
    return _NAMES.get(name)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's conversion permutation, which interleaves the two rotary halves of each head's
    rows: rows ``[h, 2, hd/2]`` were stored as ``[h, hd/2, 2]``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Metadata:
    """Typed access to a GGUF file's key/value metadata. A key of the wrong type, out of range or missing
    (without a default) is an ``InvalidInputError`` naming the file and the key."""

    def __init__(self, gguf, reader, path: Path):
        self._fields = reader.fields
        self._path = path
        t = gguf.GGUFValueType
        self._t = t
        self._ints = {t.UINT8, t.INT8, t.UINT16, t.INT16, t.UINT32, t.INT32, t.UINT64, t.INT64}

    def error(self, key: str, msg: str) -> InvalidInputError:
        return InvalidInputError(f"{self._path}: GGUF key {key!r} {msg}")

    def _read(self, key: str, default: Any) -> tuple[bool, list, Any]:
        """(present, value types, contents); a missing required key raises."""
        f = self._fields.get(key)
        if f is None:
            if default is _REQUIRED:
                raise self.error(key, "is missing")
            return False, [], default
        try:
            value = f.contents()
        except Exception as e:  # e.g. a string that is not UTF-8
            raise self.error(key, f"cannot be read: {type(e).__name__}: {e}") from None
        return True, list(f.types), value

    def _type_name(self, types: list) -> str:
        if not types:
            return "no value"
        if types[0] == self._t.ARRAY:
            return f"an array of {types[-1].name}" if len(types) > 1 else "an empty array"
        return types[0].name

    def integer(self, key: str, default: Any = _REQUIRED, lo: int = 1, hi: int = 2**63 - 1) -> Any:
        present, types, value = self._read(key, default)
        if not present:
            return value
        if len(types) != 1 or types[0] not in self._ints:
            raise self.error(key, f"must be an integer, got {self._type_name(types)}")
        if not lo <= value <= hi:
            raise self.error(key, f"is {value}, outside {lo}..{hi}")
        return int(value)

    def real(self, key: str, default: Any = _REQUIRED) -> Any:
        """A finite number > 0."""
        present, types, value = self._read(key, default)
        if not present:
            return value
        if len(types) != 1 or types[0] not in self._ints | {self._t.FLOAT32, self._t.FLOAT64}:
            raise self.error(key, f"must be a number, got {self._type_name(types)}")
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, f"is {value}, not a finite number > 0")
        return float(value)

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        present, types, value = self._read(key, default)
        if present and types != [self._t.STRING]:
            raise self.error(key, f"must be a string, got {self._type_name(types)}")
        return value

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        present, types, value = self._read(key, default)
        if present and types != [self._t.BOOL]:
            raise self.error(key, f"must be a bool, got {self._type_name(types)}")
        return bool(value) if present else value

    def strings(self, key: str, default: Any = _REQUIRED) -> Any:
        present, types, value = self._read(key, default)
        if present and types != [self._t.ARRAY, self._t.STRING]:
            raise self.error(key, f"must be an array of strings, got {self._type_name(types)}")
        return value

    def integers(self, key: str, default: Any = _REQUIRED) -> Any:
        present, types, value = self._read(key, default)
        if present and not (len(types) == 2 and types[0] == self._t.ARRAY and types[1] in self._ints):
            raise self.error(key, f"must be an array of integers, got {self._type_name(types)}")
        return value


@functools.cache
def _checked_reader(gguf):
    """A ``GGUFReader`` that refuses, before reading it, a tensor whose type is unknown, whose dimensions are
    absurd or whose data runs past the end of the file, and any header read past the end of the file (the
    plain reader silently reads short arrays there, and can loop on an array length that lies)."""

    class CheckedReader(gguf.GGUFReader):
        def __init__(self, path: str):
            self.path = path  # for messages; set first, the parent's __init__ reads the whole header
            super().__init__(path)

        def _build_fields(self, offs, count):
            self._check_count("GGUF.kv_count", int(count), _MAX_KEYS)
            self._values = 0
            return super()._build_fields(offs, count)

        def _build_tensor_info(self, offs, count):
            self._check_count("GGUF.tensor_count", int(count), _MAX_TENSORS)
            return super()._build_tensor_info(offs, count)

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) == int(gguf.GGUFValueType.ARRAY):
                # The element count follows the element type (u32); check it before the reader loops over it.
                n = int(self._get(int(orig_offs) + 4, np.uint64)[0])
                self._check_count("a metadata array's length", n, _MAX_ARRAY)
                self._values += n
                self._check_count("the metadata arrays' total length", self._values, _MAX_HEADER_VALUES)
            return super()._get_field_parts(orig_offs, raw_type)

        def _check_count(self, what: str, n: int, limit: int) -> None:
            if n > limit:
                raise InvalidInputError(f"{self.path}: {what} is {n}, over the limit of {limit}")

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise InvalidInputError(
                    f"{self.path}: truncated GGUF file: the header needs bytes {int(offset)}..{end} of {len(self.data)}"
                )
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            for index, field in enumerate(fields):
                self._check_tensor(index, int(start_offs), field)
            super()._build_tensors(start_offs, fields)

        def _check_tensor(self, index: int, start: int, field) -> None:
            _, name_data, _, dims, raw_type, offset = field.parts
            try:
                name = bytes(name_data).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError(f"{self.path}: tensor {index}: the name is not UTF-8") from None
            where = f"{self.path}: tensor {name!r}"
            dims = [int(d) for d in dims]
            kind = int(raw_type[0])
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise InvalidInputError(f"{where}: unknown GGML tensor type {kind}") from None
            if not 1 <= len(dims) <= _MAX_DIMS or any(d < 1 for d in dims):
                raise InvalidInputError(f"{where}: dimensions {dims} (1 to {_MAX_DIMS} sizes, each >= 1)")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise InvalidInputError(f"{where}: rows of {dims[0]} are not whole {qtype.name} blocks of {block}")
            n_bytes = math.prod(dims) // block * type_size  # Python ints: no overflow
            begin = start + int(offset[0])
            if begin + n_bytes > len(self.data):
                raise InvalidInputError(
                    f"{where}: {qtype.name} {dims} needs bytes {begin}..{begin + n_bytes} of a "
                    f"{len(self.data)}-byte file (truncated, or dimensions that lie)"
                )

    return CheckedReader


def _open(gguf, path: Path):
    try:
        return _checked_reader(gguf)(str(path))
    except InvalidInputError:
        raise
    except Exception as e:  # the gguf package raises assorted errors on corrupt files
        raise InvalidInputError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit="tensor")
    except ImportError:
        return iterable


def _tokenizer_files(meta: _Metadata, out: Path, vocab_size: int, context: int) -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.string("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = meta.strings("tokenizer.ggml.tokens")
    if not tokens:
        raise meta.error("tokenizer.ggml.tokens", "is empty")
    if len(tokens) > vocab_size:
        raise meta.error("tokenizer.ggml.tokens", f"has {len(tokens)} tokens, more than the vocabulary {vocab_size}")
    types = meta.integers("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise meta.error("tokenizer.ggml.token_type", f"has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, m in enumerate(meta.strings("tokenizer.ggml.merges", [])):
        pair = tuple(m.split(" "))
        if len(pair) != 2 or not all(pair):
            raise meta.error("tokenizer.ggml.merges", f"entry {i} {m[:80]!r} is not two tokens separated by a space")
        for t in (*pair, pair[0] + pair[1]):
            if t not in vocab:
                raise meta.error("tokenizer.ggml.merges", f"entry {i} {m[:80]!r}: {t[:80]!r} is not a token")
        merges.append(pair)
    pre = meta.string("tokenizer.ggml.pre", "default")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # SmolLM and Llama 3 split digits one by one before the byte-level regex.
        if pre in ("smollm", "llama-bpe", "llama3"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens are matched whole and skipped when decoding.
        tok.add_special_tokens(special)
    except Exception as e:  # tokenizers raises a bare Exception on a vocabulary it cannot build
        raise meta.error("tokenizer.ggml.tokens", f"does not make a BPE tokenizer: {e}") from None
    tok.save(str(out / "tokenizer.json"))

    def tok_of(key):
        i = meta.integer(key, None, lo=0, hi=len(tokens) - 1)
        return None if i is None else tokens[i]

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_of("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_of("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": meta.flag("tokenizer.ggml.add_bos_token", False),
        "model_max_length": context,
    }
    template = meta.string("tokenizer.chat_template", None)
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF name → Hugging Face shape ``[out, in]`` of every tensor the config implies (``output`` when
    untied)."""
    d, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (v, d)
    block = {
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_gate": (ff, d),
        "ffn_up": (ff, d),
        "ffn_down": (d, ff),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in block.items()})
    return shapes


# The ggml block types whose grid a compressed checkpoint holds exactly: bytes per block of 32 weights, bits, and
# whether the block stores a minimum (w = d·u + m, u = 0..15) after its scale. Every block starts with its f16
# scale d; the codes follow: Q4_0 and Q4_1 as 16 bytes whose low nibbles are weights 0..15 and high nibbles
# 16..31 (u, stored offset by 8 for Q4_0's symmetric w = d·(u − 8)), Q8_0 as 32 signed bytes (w = d·q).
_GRID_BLOCK = 32
_GRIDS = {"Q4_0": (18, 4, False), "Q4_1": (20, 4, True), "Q8_0": (34, 8, False)}


def _is_linear(name: str) -> bool:
    """A transformer block's projection (the ``_NAMES`` entries of a block that map to a ``*_proj``)."""
    hf = _hf_name(name)
    return hf is not None and name.startswith("blk.") and hf.endswith("_proj.weight")


def _grid_of(t, shape: tuple[int, ...], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q4_0 / Q4_1 / Q8_0 tensor's codes (int8 ``[rows, cols]``: -8..7 as ``u − 8`` for the 4-bit types),
    f16 scales and (Q4_1) f16 minimums ``[rows, cols / 32]``, read from its blocks without rounding."""
    block, bits, has_min = _GRIDS[t.tensor_type.name]
    rows, cols = shape
    raw = np.asarray(t.data).reshape(-1).view(np.uint8)
    nb = cols // _GRID_BLOCK
    if cols % _GRID_BLOCK or raw.size != rows * nb * block:
        raise InvalidInputError(
            f"{where}: {raw.size} bytes, {t.tensor_type.name} {list(shape)} needs {rows * nb * block}"
        )
    b = raw.reshape(rows, nb, block)
    scales = b[..., 0:2].copy().view(np.float16)[..., 0]
    mins = b[..., 2:4].copy().view(np.float16)[..., 0] if has_min else None
    qs = b[..., 4 if has_min else 2 :]
    for what, v in (("scale", scales), ("minimum", mins)):
        if v is not None and not np.isfinite(v).all():
            r, g = np.argwhere(~np.isfinite(v))[0]
            raise InvalidInputError(f"{where}: non-finite {what} {v[r, g]} in block {g} of row {r}")
    if bits == 8:
        codes = qs.view(np.int8).reshape(rows, cols)
    else:
        u = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [rows, nb, 32] in column order
        codes = (u.astype(np.int8) - 8).reshape(rows, cols)
    return codes, scales, mins


def _grid_type(reader, path: Path) -> str | None:
    """The one grid type of every linear layer, for ``keep_grid`` (``None`` when there is none: the tensor checks
    then name what is missing); an integer tensor type is bad input, other types are refused by name."""
    linears = [t for t in reader.tensors if _is_linear(t.name)]
    for t in linears:
        if t.tensor_type.name in ("I8", "I16", "I32", "I64"):
            raise InvalidInputError(f"{path}: tensor {t.name!r}: tensor type {t.tensor_type.name} is not a weight type")
    kinds = sorted({t.tensor_type.name for t in linears})
    if not kinds:
        return None
    if len(kinds) != 1 or kinds[0] not in _GRIDS:
        raise UnsupportedError(
            f"{path}: keeping the grid needs every linear layer in one of {', '.join(_GRIDS)}; this file's are "
            f"{', '.join(kinds) or 'none'} (convert without keep_grid to dequantize to float32)"
        )
    return kinds[0]


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False, keep_grid: bool = False
) -> Path:
    """Converts a Llama-architecture GGUF file into a float32 Hugging Face directory at ``out_dir`` (atomic); with
    ``keep_grid``, the linear layers keep their Q4_0 / Q4_1 / Q8_0 codes and scales (the module docstring).
    A file whose metadata or tensors are malformed raises ``InvalidInputError`` naming the key or tensor."""
    try:
        import gguf
    except ImportError as e:
        raise InvalidInputError("GGUF import needs the 'gguf' package: pip install gguf") from e
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InvalidInputError(f"{gguf_path} does not exist")
    reader = _open(gguf, gguf_path)
    meta = _Metadata(gguf, reader, gguf_path)
    arch = meta.string("general.architecture")
    if arch != "llama":
        raise UnsupportedError(f"GGUF architecture {arch!r} is not supported for import (only 'llama')")
    n_head = meta.integer("llama.attention.head_count", hi=_MAX_HEADS)
    n_kv = meta.integer("llama.attention.head_count_kv", n_head, hi=n_head)
    if n_head % n_kv:
        raise meta.error("llama.attention.head_count_kv", f"{n_kv} does not divide head_count {n_head}")
    hidden = meta.integer("llama.embedding_length", hi=_MAX_HIDDEN)
    head_dim = meta.integer("llama.rope.dimension_count", hidden // n_head or None, hi=_MAX_HEAD_DIM)
    if head_dim is None or head_dim % 2:
        raise meta.error("llama.rope.dimension_count", f"the head size {head_dim} is not a positive even number")
    names = {t.name for t in reader.tensors}
    tokens = meta.strings("tokenizer.ggml.tokens", None)
    vocab = meta.integer("llama.vocab_size", len(tokens) if tokens else _REQUIRED, hi=_MAX_VOCAB)
    context = meta.integer("llama.context_length", 2048, hi=_MAX_POSITIONS)

    def token_id(key):
        return meta.integer(key, None, lo=0, hi=vocab - 1)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta.integer("llama.feed_forward_length", hi=_MAX_INTERMEDIATE),
        "num_hidden_layers": meta.integer("llama.block_count", hi=_MAX_LAYERS),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": meta.real("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.real("llama.rope.freq_base", 10000.0),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
    }
    expected = _expected_shapes(config)
    grid = _grid_type(reader, gguf_path) if keep_grid else None
    q = gguf.GGMLQuantizationType
    integer_types = {q.I8, q.I16, q.I32, q.I64}  # ggml's integer tensors hold indices, not weights
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tensors: dict[str, np.ndarray] = {}
        for t in _progress(reader.tensors, len(reader.tensors), f"converting {gguf_path.name}"):
            where = f"{gguf_path}: tensor {t.name!r}"
            hf = _hf_name(t.name)
            if hf is None:
                if t.name.startswith("rope_freqs"):
                    raise UnsupportedError("GGUF with rope_freqs (Llama 3.1 rope scaling) is not supported yet")
                continue
            shape = tuple(int(d) for d in reversed(t.shape))
            if t.name not in expected:
                raise InvalidInputError(f"{where}: not part of a model of {config['num_hidden_layers']} blocks")
            if shape != expected[t.name]:
                raise InvalidInputError(f"{where}: shape {list(shape)}, the metadata implies {list(expected[t.name])}")
            if t.tensor_type in integer_types:
                raise InvalidInputError(f"{where}: tensor type {t.tensor_type.name} is not a weight type")
            if grid and _is_linear(t.name):
                tensors.update(_grid_tensors(t, shape, where, hf, n_head, n_kv))
                continue
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            except Exception as e:  # a type the gguf package cannot dequantize (F64, Q8_K, ...), or bad data
                raise InvalidInputError(f"{where}: cannot read tensor type {t.tensor_type.name}: {e}") from None
            if hf.endswith("q_proj.weight"):
                w = unpermute_rope_rows(w, n_head)
            elif hf.endswith("k_proj.weight"):
                w = unpermute_rope_rows(w, n_kv)
            tensors[hf] = np.ascontiguousarray(w)
        missing = [
            n for n in expected if _hf_name(n) not in tensors and _stem(_hf_name(n)) + ".weight_scale" not in tensors
        ]
        if missing:
            raise InvalidInputError(f"{gguf_path}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
        if grid:
            _, bits, has_min = _GRIDS[grid]
            config["quantization_config"] = quantization_config(
                sparse=False,
                global_sparsity=0.0,
                bits=bits,
                group_size=_GRID_BLOCK,
                ignore=["lm_head"],
                float_linears=[],
                symmetric=not has_min,
                fmt=PACK_QUANTIZED_MIN if has_min else None,
            )
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt", "source": gguf_path.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer_files(meta, tmp, vocab, context)
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(out_dir)


def _stem(hf: str | None) -> str:
    return (hf or "").removesuffix(".weight")


def _grid_tensors(t, shape, where: str, hf: str, n_head: int, n_kv: int) -> dict[str, np.ndarray]:
    """The compressed tensors of one linear layer on its GGUF grid (docs/FORMAT.md): q/k rows un-permuted like
    the float path (a row permutation moves each row's blocks whole)."""
    codes, scales, mins = _grid_of(t, shape, where)
    heads = n_head if hf.endswith("q_proj.weight") else n_kv if hf.endswith("k_proj.weight") else None
    if heads:
        codes, scales = unpermute_rope_rows(codes, heads), unpermute_rope_rows(scales, heads)
        mins = None if mins is None else unpermute_rope_rows(mins, heads)
    m = _stem(hf)
    out = {f"{m}.weight_scale": np.ascontiguousarray(scales)}
    if _GRIDS[t.tensor_type.name][1] == 8:
        out[f"{m}.weight"] = np.ascontiguousarray(codes)
    else:
        out[f"{m}.weight_packed"] = pack_int4(codes)
        out[f"{m}.weight_shape"] = np.array(codes.shape, dtype=np.int64)
    if mins is not None:
        out[f"{m}.weight_min"] = np.ascontiguousarray(mins)
    return out
