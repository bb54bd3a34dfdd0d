"""The whole path on a tiny Llama: prune -> (fine-tune) -> quantize -> export -> load with compressed-tensors'
own decoders (equal weights) and with sparseinfer.load (logits match the fake-quantized torch model)."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
import sparseinfer  # noqa: E402
from sparseinfer import training as T  # noqa: E402
from sparseinfer.training import compressed as E  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 250, 13, 3, 64, 128, 31, 8]
# Relative logit error allowed against the int8-activation emulation: one activation code flipped at a rounding
# boundary (s/127 of a 64-block's range) and propagated through three blocks stays well under this.
INT_ACT_FLIP = 3e-2


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    model = tiny_models.build("llama", path, scale=3.0, hidden_size=128, intermediate_size=256)
    batches = [
        {"input_ids": torch.randint(0, tiny_models.VOCAB, (2, 32), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]
    T.prune(model, "sparsegpt", 0.7, calibration=batches)
    return path, model, batches


def load_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


CASES = {
    "sparse-f32": dict(bits=None, sparse=True, fmt="sparse-f32"),
    "sparse-int8": dict(bits=8, sparse=True, fmt="sparse-int8"),
    "sparse-int4": dict(bits=4, sparse=True, fmt="sparse-int4"),
    "dense-int8": dict(bits=8, sparse=False, fmt="dense-int8"),
    "dense-int4": dict(bits=4, sparse=False, fmt="dense-int4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trip(tmp_path, pruned, case):
    src, base, batches = pruned
    c = CASES[case]
    model = copy.deepcopy(base)
    if c["bits"]:
        T.quantize(model, bits=c["bits"], method="gptq", calibration=batches)
    out = T.export(model, src, tmp_path / "out", sparse=c["sparse"])
    # 1. What torch holds is what the checkpoint decodes to.
    t = load_tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    info = json.loads((out / "sparseinfer.json").read_text())
    assert info["format_version"] == 1
    q = cfg.get("quantization_config")
    assert (q is not None) == (c["sparse"] or c["bits"] is not None)
    for name, mod in T.prunable_linears(model).items():
        want = mod.weight.detach().numpy()
        got = decode_with_compressed_tensors(t, name, q)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # 2. The runtime picks the matching kernel format and computes what the fake-quantized model computes.
    loaded = sparseinfer.load(out)
    assert {layer["format"] for layer in loaded.info()["linear"]} == {c["fmt"]}
    ref = copy.deepcopy(model)
    if c["bits"]:
        # The runtime's integer kernels use int8 activations, and the head becomes dense-int8.
        head = ref.lm_head.weight.detach().numpy()
        ref.lm_head.weight.data = torch.from_numpy(sparseinfer.kernels.pack(head, "dense-int8").to_dense())
        tiny_models.quantize_linear_inputs(ref)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    # The scalar path computes exactly what the emulation does. SIMD paths sum in another order, which can move an
    # activation across an int8 rounding boundary; one flipped code then propagates through the blocks.
    sparseinfer.kernels.set_isa("scalar")
    try:
        got = sparseinfer.load(out).logits(PROMPT)
    finally:
        sparseinfer.kernels.set_isa(None)
    # Float formats: exact up to summation order. Integer formats: the weights are exact (checked above and in the
    # kernel tests); torch's summation order differs from the scalar path's too, so a rare activation code may flip.
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-5 if c["bits"] is None else INT_ACT_FLIP), err
    err = np.abs(loaded.logits(PROMPT) - want).max() / np.abs(want).max()
    assert err < (1e-5 if c["bits"] is None else INT_ACT_FLIP), err


def decode_with_compressed_tensors(t, name, qcfg):
    """Dense weights of `name` using compressed-tensors' own helpers where it has them."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.utils.helpers import unpack_bitmasks

    scale = t.get(f"{name}.weight_scale")
    if f"{name}.bitmask" in t:
        # compressed-tensors' sparse-bitmask tensors sit beside the module's: <module>.bitmask, not .weight.bitmask.
        assert not any(k.startswith(f"{name}.weight.") for k in t)
        rows, cols = (int(v) for v in t[f"{name}.shape"])
        keep = unpack_bitmasks(torch.from_numpy(t[f"{name}.bitmask"]), [rows, cols]).numpy()
        vals = np.zeros((rows, cols), dtype=np.float32)
        vals[keep] = t[f"{name}.compressed"].astype(np.float32)
        # Our own decoder agrees with compressed-tensors' bit order.
        assert np.array_equal(E.decode_sparse(t, name).astype(np.float32), vals)
        codes = vals
    elif f"{name}.weight_packed" in t:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = tuple(int(v) for v in t[f"{name}.weight_shape"])
        codes = unpack_from_int32(torch.from_numpy(t[f"{name}.weight_packed"]), 4, torch.Size(shape)).numpy()
        assert np.array_equal(codes, E.unpack_int4(t[f"{name}.weight_packed"], shape[1]))
        codes = codes.astype(np.float32)
    else:
        codes = t[f"{name}.weight"].astype(np.float32)
    if scale is None:
        return codes
    group = qcfg["config_groups"]["group_0"]["weights"]["group_size"] or codes.shape[1]
    del ct
    return codes * np.repeat(scale, group, axis=1)[:, : codes.shape[1]]


def test_writes_are_atomic(tmp_path, pruned, monkeypatch):
    src, model, _ = pruned

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "write_tensors", boom)
    with pytest.raises(RuntimeError):
        T.export(model, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "the temp dir must be cleaned up"


def test_declared_per_token_activations_are_honoured(tmp_path, pruned):
    src, base, batches = pruned
    model = copy.deepcopy(base)
    T.quantize(model, bits=8, method="rtn")
    out = T.export(model, src, tmp_path / "out", sparse=True)
    assert sparseinfer.load(out).info()["activations"] == "int8"
    cfg = json.loads((out / "config.json").read_text())
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = acts
    (out / "config.json").write_text(json.dumps(cfg))
    token = sparseinfer.load(out)
    assert token.info()["activations"] == "int8-token"
    assert sparseinfer.load(out, activations="int8").info()["activations"] == "int8"
    np.testing.assert_array_equal(
        token.logits(PROMPT), sparseinfer.load(out, weights="sparse-int8", activations="int8-token").logits(PROMPT)
    )
    # A static per-tensor declaration keeps the finer per-block dynamic scales.
    acts.update(strategy="tensor", dynamic=False)
    (out / "config.json").write_text(json.dumps(cfg))
    assert sparseinfer.load(out).info()["activations"] == "int8"


def test_refuses_newer_format(tmp_path, pruned):
    src, model, _ = pruned
    out = T.export(model, src, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["sparseinfer_format_version"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(sparseinfer.UnsupportedError, match="version"):
        sparseinfer.load(out)
