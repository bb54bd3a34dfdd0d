"""A random-weight 2:4-sparse Llama in the published format, written by compressed-tensors' own code, and the same
weights as an f16 GGUF for llama.cpp.

The published 2:4 models (RedHatAI's Sparse-Llama-3.1-8B-2of4 and its fine-tunes) are bf16 checkpoints whose
block linears compressed-tensors stores as `sparse-24-bitmask` (docs/FORMAT.md, "Also read"). Here the weights
are N(0, 0.02) in bf16; every linear inside the blocks keeps the 2 largest |w| of each group of 4 consecutive
input columns; embedding, norms and head stay dense bf16. compressed-tensors 0.14 (the last release with the
sparse compressors) compresses them, block by block, with `ModelCompressor.compress` and writes
`quantization_config` into config.json with `ModelCompressor.update_config`. The files are sharded safetensors
with a `model.safetensors.index.json`; config.json otherwise is Llama 3.1's own (bench/llama_models.py).

The GGUF is read back from that checkpoint: compressed-tensors 0.14 decompresses each module
(`Sparse24BitMaskCompressor.decompress_weight`) and `llamacpp_compare.to_gguf` streams it to an f16 file
(bf16 -> f16 is exact for these weights' range, apart from |w| < 6e-5 where f16 is subnormal).

Both steps hold one block at a time: peak RSS is about 3.3 GB (write) and 3 GB (gguf) at the 8b width (a 1 GB
shard being filled, one block dense, the compressor's temporaries). Both need compressed-tensors 0.14, installed
apart from the venv (`make setup-interop`, as tests/training/ct_legacy.py), so they run in a subprocess with it
first on PYTHONPATH:

    python bench/llama_24.py write SIZE OUT    # the checkpoint directory OUT
    python bench/llama_24.py gguf SRC OUT      # the f16 GGUF OUT of checkpoint SRC

`checkpoint()` and `f16_gguf()` do that, and cache their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llama_models  # noqa: E402

CT014 = Path(os.environ.get("SPARSEINFER_CT014", Path(sys.prefix) / "ct014"))
SHARD_BYTES = 1 << 30  # the published checkpoints use ~5 GB shards; 1 GiB bounds this writer's memory


def checkpoint(size: str, root: Path) -> Path:
    """The cached 2:4 checkpoint of `size` under `root`, written by compressed-tensors 0.14 on first use."""
    out = root / f"llama-{size}-ct24"
    if not (out / "config.json").is_file():
        ct014("write", size, out)
    return out


def f16_gguf(size: str, root: Path) -> Path:
    """The cached f16 GGUF of `checkpoint(size, root)`'s weights, decompressed by compressed-tensors 0.14."""
    out = root / f"llama-{size}-ct24-f16.gguf"
    if not out.exists():
        ct014("gguf", checkpoint(size, root), out)
    return out


def ct014(*args) -> None:
    if not (CT014 / "compressed_tensors").is_dir():
        raise SystemExit(f"compressed-tensors 0.14 is not installed in {CT014} (make setup-interop)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CT014), str(HERE)]))
    subprocess.run([sys.executable, __file__, *map(str, args)], env=env, check=True)


def normal(name: str, shape: tuple[int, ...]):
    """N(0, 0.02) in bf16, seeded by `name` (the same weights whatever order they are made in), made in slices so
    the f32 draw of a 128256 x 4096 embedding never exists at once."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    flat = out.view(-1)
    step = 1 << 25
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i : i + n] = torch.randn(n, generator=g) * 0.02
    return out


def prune_24(w):
    """Zeroes the 2 smallest |w| of every group of 4 consecutive input columns, in place. w: [rows, cols]."""
    import torch

    groups = w.view(-1, 4)  # [rows * cols / 4, 4]
    keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    groups.masked_fill_(~keep, 0)
    return w


def units(size: str):
    """(name, tensor names and shapes) of what is written together: the embedding, each block, the rest."""
    c = llama_models.config(size)
    d, v = c["hidden_size"], c["vocab_size"]
    yield "embed", [("model.embed_tokens.weight", (v, d))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        block = [(f"{p}{name}.weight", shape) for name, shape in llama_models.linear_shapes(size)]
        block += [(f"{p}input_layernorm.weight", (d,)), (f"{p}post_attention_layernorm.weight", (d,))]
        yield f"layer {layer}", block
    yield "head", [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def stored_bytes(tensors) -> int:
    """Bytes of a unit once compressed: a 2:4 linear keeps half its bf16 values and one mask bit per weight."""
    total = 0
    for name, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        total += n * 2 if ".layers." not in name or len(shape) == 1 else n + shape[0] * -(-shape[1] // 8) + 16
    return total


def write(size: str, out: Path) -> None:
    import compressed_tensors
    import torch
    import transformers as tf
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import Sparse24BitMaskConfig
    from safetensors.torch import save_file

    from sparseinfer.checkpoint import atomic_dir

    assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__version__
    config = llama_models.config(size)
    # The module tree compressed-tensors matches its targets against; on the meta device, so it costs nothing.
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**llama_models.config(size)))
    # What llm-compressor hands compressed-tensors for a 2:4 model; global_sparsity is filled in at the end.
    sparsity = Sparse24BitMaskConfig(global_sparsity=0.0, targets=["Linear"], ignore=["lm_head"])
    compressor = ModelCompressor(sparsity_config=sparsity)
    plan: list[list] = [[]]
    size_of_shard = 0
    for unit in units(size):
        n = stored_bytes(unit[1])
        if plan[-1] and size_of_shard + n > SHARD_BYTES:
            plan.append([])
            size_of_shard = 0
        plan[-1].append(unit)
        size_of_shard += n
    weight_map, total_bytes, zeros, params = {}, 0, 0, 0
    with atomic_dir(out, overwrite=True) as tmp:
        for i, shard in enumerate(plan):
            file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            stored = {}
            for label, tensors in shard:
                dense = {}
                for name, shape in tensors:
                    if len(shape) == 1:
                        dense[name] = torch.ones(shape, dtype=torch.bfloat16)
                    else:
                        dense[name] = normal(name, shape)
                        if ".layers." in name:
                            prune_24(dense[name])
                    zeros += dense[name].numel() - int(torch.count_nonzero(dense[name]))
                    params += dense[name].numel()
                stored.update(compressor.compress(model, state_dict=dense))
                del dense
                print(f"{out.name}: {label} -> {file}", flush=True)
            for k, t in stored.items():
                weight_map[k] = file
                total_bytes += t.numel() * t.element_size()
            save_file({k: t.contiguous() for k, t in stored.items()}, str(tmp / file), {"format": "pt"})
            del stored
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # compressed-tensors writes quantization_config itself; its global_sparsity is zeros over all parameters.
        compressor.sparsity_config.global_sparsity = zeros / params
        compressor.update_config(str(tmp))


def gguf(src: Path, out: Path) -> None:
    """`src`'s weights as an f16 GGUF: each 2:4 module decompressed by compressed-tensors 0.14, one at a time."""
    import compressed_tensors
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from llamacpp_compare import to_gguf
    from safetensors import safe_open

    assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__version__
    sparse = ModelCompressor.from_pretrained(str(src)).sparsity_compressor
    params = sparse.compression_param_names  # ("shape", "compressed", "bitmask")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def read(name: str):
        with safe_open(str(src / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shape_of(name: str) -> tuple[int, ...]:
        with safe_open(str(src / weight_map[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def as_numpy(t):
        return (t.float() if t.ndim == 1 else t.to(torch.float16)).numpy()

    def tensors():
        done = set()
        for key in weight_map:
            module, _, param = key.rpartition(".")
            if param not in params:
                yield key, shape_of(key), lambda key=key: as_numpy(read(key))
            elif module not in done:
                done.add(module)
                shape = tuple(read(f"{module}.shape").flatten().tolist())

                def load(module=module):
                    return as_numpy(sparse.decompress_weight({p: read(f"{module}.{p}") for p in params}))

                yield f"{module}.weight", shape, load

    to_gguf(src, out, tensors())


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or [""]
    if cmd == "write" and len(rest) == 2:
        write(rest[0], Path(rest[1]))
    elif cmd == "gguf" and len(rest) == 2:
        gguf(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(__doc__)
