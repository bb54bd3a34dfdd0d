"""compressed-tensors 0.9-0.14 (the last releases with the sparse-bitmask compressors), run in a subprocess.

The main environment holds a current compressed-tensors; ``make setup-interop`` installs 0.14 on its own into
a directory that is put first on ``PYTHONPATH`` for this script only (the rest, torch and transformers, comes
from the main environment). Two commands:

    python ct_legacy.py write SRC OUT KIND       # KIND one of KINDS: compressed-tensors compresses the (pruned)
                                                 # model in SRC into OUT with its own ModelCompressor, and
                                                 # OUT.decompressed.safetensors, its own decompression of OUT
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


# What each fixture kind is: compressed-tensors' sparsity compressor (None, unstructured "bitmask" or "2:4"),
# its weight quantization args (None: float weights) and the quantization compressor's format.
KINDS = {
    "sparse-f32": ("bitmask", None, None),
    "sparse-int8": ("bitmask", dict(num_bits=8, symmetric=True, strategy="channel"), "int-quantized"),
    "sparse24-f32": ("2:4", None, None),
    "sparse24-int8": ("2:4", dict(num_bits=8, symmetric=True, strategy="channel"), "int-quantized"),
    "pack8": (None, dict(num_bits=8, symmetric=True, strategy="channel"), "pack-quantized"),
    "pack4-asym": (None, dict(num_bits=4, symmetric=False, strategy="group", group_size=64), "pack-quantized"),
    "int8-asym": (None, dict(num_bits=8, symmetric=False, strategy="channel"), "int-quantized"),
    # W8A8: int8 channel weights, int8 dynamic per-token activations (the scheme's input_activations).
    "w8a8": (None, dict(num_bits=8, symmetric=True, strategy="channel", acts="token"), "int-quantized"),
}


def write(src: Path, out: Path, kind: str) -> None:
    import compressed_tensors
    import torch
    import transformers as tf
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
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
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind}")
    structure, qargs, qformat = KINDS[kind]
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    sparsity = None
    if structure == "bitmask":
        sparsity = BitmaskConfig(
            global_sparsity=zeros, sparsity_structure="unstructured", targets=["Linear"], ignore=["lm_head"]
        )
    elif structure == "2:4":
        sparsity = Sparse24BitMaskConfig(global_sparsity=zeros, targets=["Linear"], ignore=["lm_head"])
    quant = None
    if qargs is not None:
        # compressed-tensors' own scheme, its own scales and zero points, and its own rounding.
        qargs = dict(qargs)
        acts = qargs.pop("acts", None)
        args = QuantizationArgs(type="int", **qargs)
        inputs = QuantizationArgs(num_bits=8, type="int", strategy=acts, dynamic=True) if acts else None
        scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=inputs)
        quant = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=qformat)
        apply_quantization_config(model, quant)
        with torch.no_grad():
            for m in linears:
                w = m.weight
                if args.strategy == "group":
                    g = w.reshape(w.shape[0], -1, args.group_size)
                    lo, hi = g.amin(-1), g.amax(-1)
                else:
                    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
                scale, zp = calculate_qparams(lo, hi, args)
                m.weight_scale.data = scale.to(m.weight_scale.dtype)
                if not args.symmetric:
                    m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype)
                m.weight.data = fake_quantize(w, scale, zp, args)
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
