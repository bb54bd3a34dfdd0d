"""The checkpoint format is a contract (docs/FORMAT.md): golden files of version 1 (tests/fixtures/format-v1/,
written once by tests/fixtures/make_format_v1.py) must keep loading to the weights they were written from, and
today's writer must keep writing what they hold."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import sparseinfer

GOLDEN = Path(__file__).parent / "fixtures" / "format-v1"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
PROMPT = [5, 17, 42, 99, 7, 250, 13, 3, 64, 128, 31, 8]
FORMATS = {
    "sparse-f32": "sparse-f32",
    "sparse-bf16": "sparse-bf16",
    "sparse-int8": "sparse-int8",
    "sparse-int4-g32": "sparse-int4",
    "dense-int8": "dense-int8",
    "dense-int4-g32": "dense-int4",
}
# Relative logit error against the torch reference the golden files were written with. Float encodings: summation
# order only. Integer encodings: the weights are exact, but another summation order can move one int8 activation
# code across a rounding boundary, which then propagates (as in tests/training/test_export.py).
BUDGET = {"f32": 1e-5, "bf16": 1e-5, "int8": 3e-2, "int4": 3e-2}


def header(path: Path) -> dict:
    """The safetensors header of ``path``: tensor name → (dtype, shape), read per the safetensors spec."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    return {k: (v["dtype"], v["shape"]) for k, v in h.items() if k != "__metadata__"}


def test_every_encoding_has_a_golden_checkpoint():
    assert CASES == sorted(FORMATS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ["scalar", None])
def test_golden_checkpoint_loads_to_its_weights(case, isa):
    d = GOLDEN / case
    assert json.loads((d / "sparseinfer.json").read_text())["format_version"] == 1
    want = np.load(d / "expected_logits.npy")
    sparseinfer.kernels.set_isa(isa)
    try:
        model = sparseinfer.load(d)
        got = model.logits(PROMPT)
    finally:
        sparseinfer.kernels.set_isa(None)
    assert {layer["format"] for layer in model.info()["linear"]} == {FORMATS[case]}
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < BUDGET[FORMATS[case].split("-")[1]], err


def test_golden_tensors_follow_the_documented_layout():
    # One module per encoding, checked against docs/FORMAT.md's table, independently of our reader.
    m = "model.layers.0.mlp.down_proj"  # [64, 96]
    rows, cols = 64, 96
    sparse = {
        f"{m}.shape": ("I64", [2]),
        f"{m}.bitmask": ("U8", [rows, cols // 8]),
        f"{m}.row_offsets": ("I64", [rows]),
    }
    want = {
        "sparse-f32": {**sparse, f"{m}.compressed": "F32"},
        "sparse-bf16": {**sparse, f"{m}.compressed": "BF16"},
        "sparse-int8": {**sparse, f"{m}.compressed": "I8", f"{m}.weight_scale": ("F32", [rows, 1])},
        "sparse-int4-g32": {**sparse, f"{m}.compressed": "I8", f"{m}.weight_scale": ("F32", [rows, cols // 32])},
        "dense-int8": {f"{m}.weight": ("I8", [rows, cols]), f"{m}.weight_scale": ("F32", [rows, 1])},
        "dense-int4-g32": {
            f"{m}.weight_packed": ("I32", [rows, cols // 8]),
            f"{m}.weight_scale": ("F32", [rows, cols // 32]),
            f"{m}.weight_shape": ("I64", [2]),
        },
    }
    for case, tensors in want.items():
        h = header(GOLDEN / case / "model.safetensors")
        got = {k: v for k, v in h.items() if k.startswith(m + ".")}
        assert set(got) == set(tensors), case
        for k, spec in tensors.items():
            if isinstance(spec, str):  # the nonzeros: a 1-D tensor of the stored values
                assert got[k][0] == spec and len(got[k][1]) == 1, (case, k, got[k])
            else:
                assert got[k] == (spec[0], spec[1]), (case, k, got[k])


# -- the writer keeps writing the golden files (needs the training extra) -------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_the_writer_still_writes_the_golden_layout(tmp_path, case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(GOLDEN.parent))
    import make_format_v1 as golden

    from sparseinfer import training as T

    src = tmp_path / "src"
    model = golden.prepare(golden.source(src), case)
    out = T.export(model, src, tmp_path / case, sparse=golden.CASES[case][3])
    # The same tensors, dtypes and shapes, and the same compression config.
    assert header(out / "model.safetensors") == header(GOLDEN / case / "model.safetensors")
    q_new = json.loads((out / "config.json").read_text()).get("quantization_config")
    q_old = json.loads((GOLDEN / case / "config.json").read_text()).get("quantization_config")
    if q_old is not None:
        for q in (q_new, q_old):
            q.get("sparsity_config", {}).pop("global_sparsity", None)
    assert q_new == q_old
    # And a model that computes what the golden one does.
    want = np.load(GOLDEN / case / "expected_logits.npy")
    got = golden.reference_logits(model, case)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
