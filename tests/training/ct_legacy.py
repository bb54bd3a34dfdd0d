"""compressed-tensors 0.9-0.14 (the last releases with the sparse-bitmask compressor), run in a subprocess.

The main environment holds a current compressed-tensors; ``make setup-interop`` installs 0.14 on its own into
a directory that is put first on ``PYTHONPATH`` for this script only (the rest, torch and transformers, comes
from the main environment). Two commands:

    python ct_legacy.py write SRC OUT KIND       # KIND sparse-f32 | sparse-int8: compressed-tensors compresses
                                                 # the (pruned) model in SRC into OUT with its own ModelCompressor,
                                                 # and OUT.decompressed.safetensors, its own decompression of OUT
    python ct_legacy.py decompress DIR OUT_FILE  # decompress checkpoint DIR with compressed-tensors' own code
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fresh_model(directory: Path):
    """A model with the architecture of ``directory``'s config, built without its quantization_config (the
    compressors read that themselves)."""
    import transformers as tf

    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**config)).eval()


def decompress(directory: Path, out_file: Path) -> None:
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__version__
    from safetensors.torch import load_file

    # As transformers does before it hands the model to the compressor: the tensors stored as they are
    # (embeddings, norms, the head) are loaded first; the compressor fills in the compressed modules.
    model = fresh_model(directory)
    stored = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({k: v for k, v in stored.items() if k in model.state_dict()}, strict=False)
    ModelCompressor.from_pretrained(str(directory)).decompress(str(directory), model)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_file))


def write(src: Path, out: Path, kind: str) -> None:
    import compressed_tensors
    import torch
    import transformers as tf
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__version__
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    sparsity = BitmaskConfig(
        global_sparsity=zeros, sparsity_structure="unstructured", targets=["Linear"], ignore=["lm_head"]
    )
    quant = None
    if kind == "sparse-int8":
        # compressed-tensors' W8A16 per-channel scheme, its own scales and its own rounding.
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        quant = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format="int-quantized")
        apply_quantization_config(model, quant)
        with torch.no_grad():
            for m in linears:
                w = m.weight
                scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
                m.weight_scale.data = scale.to(m.weight_scale.dtype)
                m.weight.data = fake_quantize(w, scale, zp, args)
    elif kind != "sparse-f32":
        raise SystemExit(f"unknown kind {kind}")
    compressor = ModelCompressor(sparsity_config=sparsity, quantization_config=quant)
    state = compressor.compress(model)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    decompress(out, out.with_name(f"{out.name}.decompressed.safetensors"))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "write":
        write(Path(rest[0]), Path(rest[1]), rest[2])
    elif cmd == "decompress":
        decompress(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(__doc__)
