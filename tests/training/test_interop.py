"""Our exports against the libraries that define the format, and their checkpoints against sparseinfer.load.

- Dense-compatible exports (``sparse=False``: f32, bf16, int8 ``int-quantized``, int4 ``pack-quantized``) load in
  ``transformers.AutoModelForCausalLM.from_pretrained`` with the installed (current) compressed-tensors and
  compute what the source model computes.
- Sparse-bitmask exports decompress, with compressed-tensors 0.14's own code, to the source weights; and
  checkpoints that compressed-tensors 0.14 writes itself load in sparseinfer. compressed-tensors 0.14 (the last
  release with the sparse-bitmask compressor) lives beside the venv (``make setup-interop``) and runs in a
  subprocess (tests/training/ct_legacy.py).
- compressed-tensors 0.14 also writes the layouts sparseinfer only reads (2:4 sparse-24-bitmask, 8-bit
  pack-quantized, zero points), which load with logits compared the same way.
- Malformed scales and unknown formats are refused with what is wrong.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
tiny_models = pytest.importorskip("tiny_models")
from safetensors.numpy import load_file, save_file  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer import training as T  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 250, 13, 3, 64, 128, 31, 8]
# Relative logit error of a round trip that stores exactly the weights torch computes with (dequantized in f32 by
# both sides): summation order only.
DENSE_EXACT = 1e-4
# Our int8 kernels against torch with int8 block activations (tests/training/test_export.py's INT_ACT_FLIP).
INT_ACT_FLIP = 3e-2
# compressed-tensors 0.14 decompresses int8 with scales re-created as f16 (its initialize_module_for_quantization
# sees the int8 codes as the observed dtype): weights agree to f16's relative precision.
CT014_F16_SCALES = 1e-3
CT014 = Path(sys.prefix) / "ct014"
# compressed-tensors' BitmaskCompressor.compression_param_names, stored as <module>.<name>.
SPARSE_PARAMS = ("shape", "compressed", "bitmask", "row_offsets")
LEGACY = Path(__file__).with_name("ct_legacy.py")


def rel(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny random Llama, 50 % magnitude-pruned, and the directory it was built in (tokenizer source)."""
    path = tmp_path_factory.mktemp("src")
    model = tiny_models.build("llama", path, scale=3.0, hidden_size=128, intermediate_size=256)
    T.prune(model, "magnitude", 0.5)
    return path, model


def variant(model, bits):
    m = copy.deepcopy(model)
    if bits:
        T.quantize(m, bits=bits, method="rtn")
    return m


def hf_logits(path_or_model, **kw):
    m = path_or_model
    if not isinstance(m, torch.nn.Module):
        m = transformers.AutoModelForCausalLM.from_pretrained(m, **kw)
    with torch.no_grad():
        return m.eval()(torch.tensor([PROMPT])).logits[0].float().numpy()


DENSE = {"f32": (None, None), "bf16": (None, torch.bfloat16), "int8": (8, None), "int4": (4, None)}


@pytest.mark.parametrize("case", sorted(DENSE))
def test_transformers_loads_dense_compatible_exports(tmp_path, pruned, case):
    src, base = pruned
    bits, dtype = DENSE[case]
    model = variant(base, bits)
    if dtype is not None:
        model = model.to(dtype)
    out = T.export(model, src, tmp_path / "out", sparse=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    if dtype is None:
        err = rel(hf_logits(loaded), hf_logits(model))
        assert err < DENSE_EXACT, (case, err)
    else:
        # bf16 logits also differ by how each model was made (a cast model keeps bf16 rotary frequencies, a
        # loaded one f32): the weights are what the export controls, and they are equal.
        state = model.state_dict()
        for k, v in loaded.state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, state[k]), k
    cfg = json.loads((out / "config.json").read_text())
    if bits:
        q = cfg["quantization_config"]
        # What compressed-tensors' own writer emits; without these it loads the int8 codes as weights.
        assert q["quantization_status"] == "compressed"
        assert q["config_groups"]["group_0"]["format"] == q["format"]
        assert "sparsity_config" not in q
    if dtype is not None:
        # A bf16 model is written as bf16 and runs as bf16 in sparseinfer.
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert cfg["dtype"] == "bfloat16"
        assert {layer["format"] for layer in sparseinfer.load(out).info()["linear"]} == {"dense-bf16"}


SEQ2SEQ = {"t5": dict(feed_forward_proj="gated-gelu"), "whisper": dict(scale=2.0)}


# transformers 5's T5 _init_weights reads `wi_0.weight`, which a pack-quantized module (any writer's,
# compressed-tensors' own too) no longer has while it is still compressed: from_pretrained raises.
UPSTREAM_T5_INT4 = pytest.mark.xfail(
    raises=AttributeError, strict=True, reason="transformers' T5 _init_weights on pack-quantized modules"
)
SEQ2SEQ_CASES = [
    pytest.param(
        arch,
        bits,
        id=f"{arch}-{bits or 'f'}{'32' if not bits else ''}",
        marks=UPSTREAM_T5_INT4 if (arch, bits) == ("t5", 4) else (),
    )
    for arch in sorted(SEQ2SEQ)
    for bits in (None, 8, 4)
]


@pytest.mark.parametrize("arch, bits", SEQ2SEQ_CASES)
def test_transformers_loads_dense_compatible_seq2seq_exports(tmp_path, arch, bits):
    # The head is not lm_head everywhere (Whisper's is proj_out): it must be in the config's ignore list, or
    # compressed-tensors treats it as quantized and leaves it uninitialized.
    src = tmp_path / "src"
    model = tiny_models.build(arch, src, **SEQ2SEQ[arch])
    T.prune(model, "magnitude", 0.6)
    if bits:
        # Groups of 32: compressed-tensors refuses a group wider than a row (the tiny Whisper's are 64).
        T.quantize(model, bits=bits, method="rtn", group_size=32 if bits == 4 else None)
    out = T.export(model, src, tmp_path / "out", sparse=False)
    auto = transformers.AutoModelForSpeechSeq2Seq if arch == "whisper" else transformers.AutoModelForSeq2SeqLM
    loaded = auto.from_pretrained(out).eval()
    dec = torch.tensor([[0, 4, 7, 2]])
    if arch == "whisper":
        c = model.config
        inp = {
            "input_features": torch.randn(
                1, c.num_mel_bins, 2 * c.max_source_positions, generator=torch.Generator().manual_seed(0)
            )
        }
    else:
        inp = {"input_ids": torch.tensor([PROMPT[:6]])}
    with torch.no_grad():
        want, got = model.eval()(**inp, decoder_input_ids=dec).logits, loaded(**inp, decoder_input_ids=dec).logits
    assert rel(got.numpy(), want.numpy()) < DENSE_EXACT


def ct014(*args):
    if not (CT014 / "compressed_tensors").is_dir():
        pytest.skip(f"compressed-tensors 0.14 is not installed in {CT014} (make setup-interop)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CT014), str(Path(__file__).parents[1])]))
    r = subprocess.run([sys.executable, str(LEGACY), *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("bits", [None, 8], ids=["sparse-f32", "sparse-int8"])
def test_compressed_tensors_014_decompresses_our_sparse_exports(tmp_path, pruned, bits):
    src, base = pruned
    model = variant(base, bits)
    out = T.export(model, src, tmp_path / "out", sparse=True)
    t = load_file(str(out / "model.safetensors"))
    for name in T.prunable_linears(model):
        assert {k for k in t if k.startswith(f"{name}.")} >= {f"{name}.{p}" for p in SPARSE_PARAMS}
    ct014("decompress", out, tmp_path / "dense.safetensors")
    dense = load_file(str(tmp_path / "dense.safetensors"))
    for name, mod in T.prunable_linears(model).items():
        want = mod.weight.detach().numpy()
        got = dense[f"{name}.weight"]
        budget = 0 if bits is None else CT014_F16_SCALES * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=budget, err_msg=name)
        assert np.array_equal(got == 0, want == 0), name


@pytest.fixture(scope="module")
def pruned24(tmp_path_factory):
    """The tiny random Llama of ``pruned``, 2:4 magnitude-pruned."""
    path = tmp_path_factory.mktemp("src24")
    model = tiny_models.build("llama", path, scale=3.0, hidden_size=128, intermediate_size=256)
    T.prune(model, "magnitude", 0.5, structure="2:4")
    return path, model


# Fixture kind (tests/training/ct_legacy.py KINDS) -> the kernel format sparseinfer loads it as.
CT014_KINDS = {
    "sparse-f32": "sparse-f32",
    "sparse-int8": "sparse-int8",
    "sparse24-f32": "sparse-f32",
    "sparse24-int8": "sparse-int8",
    "pack8": "dense-int8",
    "pack4-asym": "dense-int4",
    "int8-asym": "dense-int8",
    "w8a8": "dense-int8",
}


@pytest.mark.parametrize("kind", sorted(CT014_KINDS))
def test_sparseinfer_loads_compressed_tensors_014_checkpoints(tmp_path, pruned, pruned24, kind):
    src, base = pruned24 if kind.startswith("sparse24") else pruned
    base.save_pretrained(tmp_path / "pruned")
    fixture = tmp_path / kind
    ct014("write", tmp_path / "pruned", fixture, kind)
    t = load_file(str(fixture / "model.safetensors"))
    if kind.startswith("sparse"):
        assert "model.layers.0.mlp.up_proj.bitmask" in t and "model.layers.0.mlp.up_proj.weight.bitmask" not in t
    dense = load_file(str(fixture.with_name(f"{kind}.decompressed.safetensors")))
    ref = copy.deepcopy(base)
    weights = {k: v for k, v in dense.items() if k.endswith(".weight")}
    if not kind.endswith("f32"):
        for name in T.prunable_linears(ref):
            w, scale = weights[f"{name}.weight"], dense[f"{name}.weight_scale"]
            if kind == "int8-asym":
                # The int8 kernels are symmetric: zero points are decoded, then the weights refit on that grid.
                weights[f"{name}.weight"] = sparseinfer.kernels.pack(w, "dense-int8").to_dense()
            elif not kind.endswith("asym"):
                # compressed-tensors' symmetric int8 rounds to -128, which the int8 kernels store as -127
                # (docs/FORMAT.md): the reference makes the same one-step move.
                weights[f"{name}.weight"] = w + (np.rint(w / scale) == -128) * scale
        head = ref.lm_head.weight.detach().numpy()
        ref.lm_head.weight.data = torch.from_numpy(sparseinfer.kernels.pack(head, "dense-int8").to_dense())
        tiny_models.quantize_linear_inputs(ref, token=kind == "w8a8")
    missing = ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False).missing_keys
    assert missing == []
    loaded = sparseinfer.load(fixture)
    assert {layer["format"] for layer in loaded.info()["linear"]} == {CT014_KINDS[kind]}
    # A W8A8 scheme's dynamic per-token activations are what the model runs with.
    assert loaded.info()["activations"] == ("int8-token" if kind == "w8a8" else "int8" if "f32" not in kind else "f32")
    err = rel(loaded.logits(PROMPT), hf_logits(ref))
    assert err < (DENSE_EXACT if kind.endswith("f32") else INT_ACT_FLIP), err


def test_sparse_24_bitmask_that_is_not_2_4_is_refused(tmp_path, pruned24):
    src, base = pruned24
    base.save_pretrained(tmp_path / "pruned")
    fixture = tmp_path / "sparse24-f32"
    ct014("write", tmp_path / "pruned", fixture, "sparse24-f32")
    name = "model.layers.0.mlp.up_proj"

    def three_of_four(t):
        t[f"{name}.bitmask"][0, 0] |= 0b0111  # a third weight in columns 0..3 of row 0

    rewrite(fixture, three_of_four)
    with pytest.raises(sparseinfer.InvalidInputError, match=rf"{name}.bitmask is not 2:4: columns 0..4 of row 0"):
        sparseinfer.load(fixture)


def rewrite(out, edit):
    """Applies ``edit`` to the tensors of ``out``'s model.safetensors (f32 checkpoints only: numpy has no bf16)."""
    t = load_file(str(out / "model.safetensors"))
    edit(t)
    save_file(t, str(out / "model.safetensors"), {"format": "pt"})


def test_legacy_weight_bitmask_naming_still_loads(tmp_path, pruned):
    src, base = pruned
    out = T.export(variant(base, 8), src, tmp_path / "out", sparse=True)
    want = sparseinfer.load(out).logits(PROMPT)

    def legacy(t):
        for k in [k for k in t if k.endswith(".bitmask")]:
            module = k.removesuffix(".bitmask")
            for p in SPARSE_PARAMS:
                t[f"{module}.weight.{p}"] = t.pop(f"{module}.{p}")

    rewrite(out, legacy)
    assert "model.layers.0.self_attn.q_proj.weight.bitmask" in load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(sparseinfer.load(out).logits(PROMPT), want)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda s: np.where(np.arange(s.size).reshape(s.shape) == 3, np.nan, s), "non-finite scale NaN at [3, 0]"),
        (lambda s: np.where(np.arange(s.size).reshape(s.shape) == 0, np.inf, s), "non-finite scale inf at [0, 0]"),
        (lambda s: np.ones(s.shape, np.int32), "has dtype I32: scales must be floats"),
    ],
    ids=["nan", "inf", "int32"],
)
def test_bad_weight_scale_is_refused_with_what_is_wrong(tmp_path, pruned, bad, message):
    src, base = pruned
    out = T.export(variant(base, 8), src, tmp_path / "out", sparse=False)
    name = "model.layers.1.mlp.down_proj.weight_scale"

    def edit(t):
        v = bad(t[name])
        t[name] = v if v.dtype == np.int32 else v.astype(np.float32)

    rewrite(out, edit)
    with pytest.raises(sparseinfer.InvalidInputError) as e:
        sparseinfer.load(out)
    assert name in str(e.value) and message in str(e.value) and "shape" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "field, value",
    [("format", "float-quantized"), ("group", "nvfp4-pack-quantized"), ("sparsity", "marlin-24")],
)
def test_unsupported_compressed_tensors_format_is_refused_by_name(tmp_path, pruned, field, value):
    src, base = pruned
    out = T.export(variant(base, 8), src, tmp_path / "out", sparse=True)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    {"format": q, "group": q["config_groups"]["group_0"], "sparsity": q["sparsity_config"]}[field]["format"] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(sparseinfer.UnsupportedError, match=f'format "{value}" is not supported'):
        sparseinfer.load(out)
