"""GGUF → Hugging Face directory import (the format llama.cpp users hold).

Reads a GGUF file with the ``gguf`` package (``pip install gguf``), dequantizes every tensor to float32, undoes
llama.cpp's rotary row permutation of q/k, and writes ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json``. Llama-architecture GGUFs with a BPE (``gpt2``)
tokenizer are supported, which covers Llama 3, SmolLM, Qwen2-style vocabularies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_dir, write_safetensors
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


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit="tensor")
    except ImportError:
        return iterable


def _tokenizer_files(reader, out: Path) -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # SmolLM and Llama 3 split digits one by one before the byte-level regex.
    if pre in ("smollm", "llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole and skipped when decoding.
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_special_tokens(special)
    tok.save(str(out / "tokenizer.json"))

    def tok_of(key):
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_of("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_of("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Converts a Llama-architecture GGUF file into a float32 Hugging Face directory at ``out_dir`` (atomic)."""
    try:
        import gguf
    except ImportError as e:
        raise InvalidInputError("GGUF import needs the 'gguf' package: pip install gguf") from e
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InvalidInputError(f"{gguf_path} does not exist")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises assorted errors on corrupt files
        raise InvalidInputError(f"{gguf_path}: not a readable GGUF file: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedError(f"GGUF architecture {arch!r} is not supported for import (only 'llama')")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    hidden = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens) if tokens is not None else 0))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tensors: dict[str, np.ndarray] = {}
        for t in _progress(reader.tensors, len(reader.tensors), f"converting {gguf_path.name}"):
            hf = _hf_name(t.name)
            if hf is None:
                if t.name.startswith("rope_freqs"):
                    raise UnsupportedError("GGUF with rope_freqs (Llama 3.1 rope scaling) is not supported yet")
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
            if hf.endswith("q_proj.weight"):
                w = unpermute_rope_rows(w, n_head)
            elif hf.endswith("k_proj.weight"):
                w = unpermute_rope_rows(w, n_kv)
            tensors[hf] = np.ascontiguousarray(w)
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt", "source": gguf_path.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer_files(reader, tmp)
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(out_dir)
