"""Random Llama-shaped checkpoints for the end-to-end benchmark, written with numpy (no torch needed) and cached.

Weights are N(0, 0.02) in float16 (half the disk of f32; both runtimes upcast at load). Sparse variants zero a
random fraction of every linear weight inside the blocks: random masks cost the kernels the same as trained ones.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

from sparseinfer.checkpoint import atomic_dir, write_safetensors
from sparseinfer.models import cache_dir

# What Llama 3.1 changed in config.json: GQA (per size), a 500000 rope base with llama3 frequency scaling, a 128K
# context, bf16 weights.
LLAMA31 = dict(
    rope_theta=500000.0,
    rope_scaling=dict(
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        rope_type="llama3",
    ),
    max_position_embeddings=131072,
    torch_dtype="bfloat16",
)

SIZES = {
    # CI smoke size (benchmarks disabled): seconds to build and run.
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, num_attention_heads=4, vocab_size=4096),
    "134m": dict(
        hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12, vocab_size=32000
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=16, vocab_size=32000
    ),
    # meta-llama/Llama-3.1-8B's config.json, written 2:4-sparse in the published format by bench/llama_24.py.
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        **LLAMA31,
    ),
    # Smoke shapes for the 8b path: two blocks at the 8b width, and a tiny one with the same config keys (its vocab
    # holds llamacpp_compare's prompt).
    "8b-2l": None,  # filled below: the 8b shape with two blocks
    "tiny31": dict(
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=768,  # llama.cpp's Q8_0 and Q4_0 need rows of whole 32-blocks
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        **LLAMA31,
    ),
}

SIZES["8b-2l"] = {**SIZES["8b"], "num_hidden_layers": 2}


def config(size: str) -> dict:
    c = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=SIZES[size]["num_attention_heads"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype="float16",
    )
    c.update(copy.deepcopy(SIZES[size]))  # transformers edits rope_scaling in place
    c.update(bos_token_id=None, eos_token_id=None)  # no EOS: every run decodes exactly the requested tokens
    return c


def linear_shapes(size: str) -> list[tuple[str, tuple[int, int]]]:
    """(name inside a block, [rows, cols]) of every linear of one decoder block, in checkpoint order."""
    c = config(size)
    d, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (c.get("head_dim") or d // c["num_attention_heads"])
    return [
        ("self_attn.q_proj", (d, d)),
        ("self_attn.k_proj", (kv, d)),
        ("self_attn.v_proj", (kv, d)),
        ("self_attn.o_proj", (d, d)),
        ("mlp.gate_proj", (i, d)),
        ("mlp.up_proj", (i, d)),
        ("mlp.down_proj", (d, i)),
    ]


def parameters(size: str) -> int:
    c = SIZES[size]
    d, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    block = sum(r * k for _, (r, k) in linear_shapes(size)) + 2 * d
    return n * block + 2 * v * d + d


def model_dir(size: str, sparsity: float = 0.0, root: Path | None = None) -> Path:
    """The cached checkpoint directory for `size` at `sparsity`, built on first use."""
    root = root or Path(os.environ.get("SPARSEINFER_BENCH_MODELS", cache_dir() / "bench-models"))
    out = root / f"llama-{size}-s{round(sparsity * 100):02d}"
    if (out / "config.json").is_file():
        return out
    c = dict(config(size), torch_dtype="float16")
    d, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    rng = np.random.default_rng(0)
    mask_rng = np.random.default_rng(int(sparsity * 1000) + 1)

    def linear(rows, cols):
        w = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)
        if sparsity > 0:
            w[mask_rng.random((rows, cols), dtype=np.float32) < sparsity] = 0
        return w

    t = {
        "model.embed_tokens.weight": (rng.standard_normal((v, d), dtype=np.float32) * 0.02).astype(np.float16),
        "lm_head.weight": (rng.standard_normal((v, d), dtype=np.float32) * 0.02).astype(np.float16),
        "model.norm.weight": np.ones(d, np.float16),
    }
    for layer in range(n):
        p = f"model.layers.{layer}."
        for name, shape in linear_shapes(size):
            t[p + name + ".weight"] = linear(*shape)
        t[p + "input_layernorm.weight"] = np.ones(d, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, np.float16)
    with atomic_dir(out, overwrite=True) as tmp:
        write_safetensors(tmp / "model.safetensors", t, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(c, indent=2))
    return out
