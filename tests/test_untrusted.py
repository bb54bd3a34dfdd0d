"""A model directory is untrusted input: it cannot reach outside itself, block, abort, panic or exhaust memory.
Every bad input is a typed ValueError naming the file.

Attempts that could abort (SIGABRT on a failed allocation, SIGBUS on a truncated map) or hang (a FIFO) run
in child processes (hostile_models.run_cases / run_child) with a timeout, so a regression fails its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

import sparseinfer
from sparseinfer import InvalidInputError, kernels
from sparseinfer.modeldir import MAX_JSON_BYTES

hostile_models = pytest.importorskip("hostile_models")
from hostile_models import run_cases, run_child, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("good") / "m")


@pytest.fixture
def model(tmp_path, good):
    return shutil.copytree(good, tmp_path / "m")


def test_the_tiny_model_loads_and_generates(good):
    m = sparseinfer.load(good)
    assert len(m.generate_ids([5, 6, 7], max_new_tokens=4)) <= 4
    assert m.generate("hello", max_new_tokens=2) is not None


# -- path traversal ------------------------------------------------------------------------------------


def write_index(d, files):
    names = [f"model.layers.{i}.x" for i in range(len(files))]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(zip(names, files))}))


def test_index_entries_cannot_leave_the_directory(tmp_path, model):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(model / "model.safetensors", outside / "model.safetensors")
    secret = outside / "secret.txt"
    secret.write_text("hunter2-secret-token-value")
    (model / "link.safetensors").symlink_to(outside / "model.safetensors")
    (model / "secret.safetensors").symlink_to(secret)
    for entry in [
        "../outside/model.safetensors",
        str(outside / "model.safetensors"),
        "sub/../../outside/model.safetensors",
        "link.safetensors",
        "secret.safetensors",
    ]:
        write_index(model, ["model.safetensors", entry])
        with pytest.raises(InvalidInputError) as e:
            sparseinfer.load(model)
        assert "outside the model directory" in str(e.value) or "not a relative path" in str(e.value), entry
        assert "hunter2" not in str(e.value)


def test_listed_shards_cannot_be_links_outside(tmp_path, model):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model / "model.safetensors", outside)
    (model / "model.safetensors").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        sparseinfer.load(model)


def test_config_cannot_be_a_link_outside(tmp_path, model):
    outside = tmp_path / "config.json"
    shutil.move(model / "config.json", outside)
    (model / "config.json").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        sparseinfer.load(model)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_handle_opened_outside_after_the_checks_is_refused(tmp_path, model, monkeypatch):
    # The race the post-open check closes: the path checked inside, then a directory on it swapped for a link
    # before the open. Simulated by opening an outside file in place of the checked one.
    from sparseinfer import modeldir

    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    real_open = os.open
    monkeypatch.setattr(modeldir.os, "open", lambda path, flags: real_open(outside, flags))
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        modeldir.read_json(model, "config.json")


def _hub_snapshot(root, good, repo_name="models--org--tiny"):
    # A hub cache: snapshots/<rev>/* are links into ../../blobs/<sha256 of the file>.
    repo = root / repo_name
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in good.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    return snap


def test_links_inside_and_hub_cache_snapshots_still_load(tmp_path, good):
    snap = _hub_snapshot(tmp_path, good)
    assert sparseinfer.load(snap).logits([1, 2]).shape == (2, hostile_models.VOCAB)


def test_a_folder_named_snapshots_outside_a_hub_cache_gains_no_second_root(tmp_path, good):
    # The same links, but the folder above `snapshots` is not a hub repository: blobs/ is outside the model.
    snap = _hub_snapshot(tmp_path, good, repo_name="not-a-hub-repo")
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        sparseinfer.load(snap)


def test_hub_snapshot_links_reach_only_files_directly_in_blobs(tmp_path, good):
    snap = _hub_snapshot(tmp_path, good)
    secret = snap.parent.parent / "blobs" / "deeper" / "config.json"
    secret.parent.mkdir()
    shutil.copy(good / "config.json", secret)
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(secret)
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        sparseinfer.load(snap)


def test_errors_do_not_echo_file_contents(model):
    (model / "model.safetensors").write_text("PRIVATE KEY material that must not leak into messages")
    with pytest.raises(InvalidInputError) as e:
        sparseinfer.load(model)
    assert "PRIVATE" not in str(e.value)
    first8 = struct.unpack("<Q", b"PRIVATE ")[0]
    assert str(first8) not in str(e.value)


# -- special files ---------------------------------------------------------------------------------------

SPECIAL = [
    ("fifo", "config.json"),
    ("fifo", "generation_config.json"),
    ("fifo", "tokenizer_config.json"),
    ("fifo", "tokenizer.json"),
    ("fifo", "model.safetensors"),
    ("fifo", "model.safetensors.index.json"),
    ("fifo", "shard.safetensors"),
    ("dev-zero", "config.json"),
    ("dev-zero", "tokenizer_config.json"),
    ("dev-zero", "model.safetensors"),
    ("huge", "config.json"),
    ("huge", "generation_config.json"),
    ("huge", "tokenizer_config.json"),
    ("directory", "config.json"),
]


@pytest.fixture(scope="module")
def special_results(tmp_path_factory, good):
    cases = []
    for i, (kind, name) in enumerate(SPECIAL):
        d = shutil.copytree(good, tmp_path_factory.mktemp("special") / f"m{i}")
        target = d / name
        if name == "shard.safetensors":
            write_index(d, ["model.safetensors", "shard.safetensors"])
        if target.exists():
            target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "dev-zero":
            target.symlink_to("/dev/zero")
        elif kind == "huge":
            # Valid JSON, padded with spaces past the cap.
            body = (good / name).read_text() if (good / name).exists() else '{"chat_template": "x"}'
            with open(target, "w") as f:
                f.write(body + " " * (MAX_JSON_BYTES + 1 - len(body)))
        else:
            target.mkdir()
        cases.append(str(d))
    body = """
    def attempt(d):
        m = sparseinfer.load(d)
        m.generate("hi", max_new_tokens=1)
        m.apply_chat_template([{"role": "user", "content": "hi"}])
    """
    return run_cases(body, cases, timeout=60)


@pytest.mark.parametrize("i", range(len(SPECIAL)), ids=[f"{k}-{n}" for k, n in SPECIAL])
def test_special_files_are_refused(special_results, i):
    r = special_results[i]
    assert "died" not in r, f"the attempt hung or crashed: {r}"
    assert r["raised"] == "InvalidInputError", r
    name = SPECIAL[i][1]
    assert "/" + name in r["msg"], r  # the path of the file itself ("config.json" is in "tokenizer_config.json")


# -- absurd sizes in config.json ------------------------------------------------------------------------

FIELDS = [
    "num_hidden_layers",
    "intermediate_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
]
VALUES = [10**12, 10**18, 2**63 - 1, 2**64 + 1, -1, 0, 1.5, "64", [64]]
SIZE_CASES = [(f, v) for f in FIELDS for v in VALUES]


@pytest.fixture(scope="module")
def size_results(tmp_path_factory, good):
    body = f"""
    import shutil, tempfile, pathlib
    GOOD = pathlib.Path({str(good)!r})
    TMP = pathlib.Path(tempfile.mkdtemp())
    def attempt(case):
        field, value = case
        d = TMP / f"m-{{field}}-{{abs(hash(repr(value)))}}"
        if not d.exists():
            shutil.copytree(GOOD, d)
        cfg = json.loads((GOOD / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        m = sparseinfer.load(d)
        m.generate_ids([1, 2, 3], max_new_tokens=2)
    """
    return run_cases(body, SIZE_CASES, timeout=300)


@pytest.mark.parametrize("i", range(len(SIZE_CASES)), ids=[f"{f}={v!r}" for f, v in SIZE_CASES])
def test_absurd_config_sizes_are_value_errors(size_results, i):
    r = size_results[i]
    assert "died" not in r, f"the process died: {r}"
    assert r["raised"] is not None, "loaded a model whose config does not match its tensors"
    assert r["value_error"] and r["typed"], r


@pytest.mark.parametrize(
    "kind, field",
    [
        ("gpt2", "n_embd"),
        ("gpt2", "n_positions"),
        ("gpt2", "n_inner"),
        ("opt", "ffn_dim"),
        ("mpt", "d_model"),
        ("mpt", "n_heads"),
        ("mpt", "expansion_ratio"),
        ("mpt", "d_model+n_heads"),
    ],
)
def test_absurd_sizes_in_other_architectures(tmp_path, kind, field):
    base = {
        "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 8, "n_positions": 8},
        "opt": {
            "model_type": "opt",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "ffn_dim": 64,
            "vocab_size": 8,
            "max_position_embeddings": 8,
        },
        "mpt": {"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 8},
    }[kind]
    cases = [str(tmp_path / f"{kind}-{v}") for v in (10**12, 10**18, 2**63 - 1)]
    for c, v in zip(cases, (10**12, 10**18, 2**63 - 1)):
        os.makedirs(c)
        with open(os.path.join(c, "config.json"), "w") as f:
            json.dump({**base, **{k: v for k in field.split("+")}}, f)
        hostile_models.write_safetensors(os.path.join(c, "model.safetensors"), {"x": np.zeros(1, np.float32)})
    results = run_cases("def attempt(d):\n    sparseinfer.load(d)\n", cases)
    for r in results.values():
        assert "died" not in r and r["value_error"] and r["typed"], r


@pytest.mark.parametrize(
    "field, value, match",
    [("sliding_window", 0, "sliding_window is 0"), ("rope_theta", -1.0, "rotary"), ("rope_theta", 0, "rotary")],
)
def test_degenerate_config_values(model, field, value, match):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", field: value}))
    with pytest.raises(InvalidInputError, match=match):
        sparseinfer.load(model)


def test_shape_lies_in_the_header_are_caught_before_allocation(tmp_path, good):
    # Sizes within the limits but far bigger than the file: the tensors' shapes must match before anything
    # is allocated from the config.
    cases = []
    for field, value in [("intermediate_size", 1 << 20), ("hidden_size", 1 << 16), ("vocab_size", 1 << 24)]:
        d = shutil.copytree(good, tmp_path / field)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, field: value}))
        cases.append(str(d))
    results = run_cases("def attempt(d):\n    sparseinfer.load(d)\n", cases)
    for r in results.values():
        assert "died" not in r and r["raised"] == "InvalidInputError", r


def test_huge_context_requests_do_not_preallocate(good):
    # The KV cache grows with use: a huge max_new_tokens and a huge (valid) context cost nothing up front.
    proc = run_child(
        f"""
        import shutil, tempfile, pathlib
        d = pathlib.Path(tempfile.mkdtemp()) / "m"
        shutil.copytree({str(good)!r}, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["max_position_embeddings"] = 1 << 26
        (d / "config.json").write_text(json.dumps(cfg))
        m = sparseinfer.load(d)
        g = sparseinfer._core.Generator(m._core, [1, 2, 3], 2**62)
        print(json.dumps([g.next_token() is not None, g.next_token() is not None]))
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [True, True]


def test_bandwidth_probe_sizes_are_validated():
    results = run_cases(
        """
        def attempt(kw):
            sparseinfer.kernels.measure_read_bandwidth(**kw)
        """,
        [
            {"nbytes": 10**15},
            {"nbytes": 2**63 - 1},
            {"nbytes": -1},
            {"nbytes": 1.5},
            {"repeats": 10**12},
            {"threads": 10**9},
            {"threads": -3},
        ],
    )
    for r in results.values():
        assert "died" not in r and r["raised"] == "InvalidInputError", r
    results = run_cases(
        """
        def attempt(kw):
            probe = sparseinfer.kernels.BandwidthProbe(kw.pop("nbytes", 1 << 20))
            probe.measure(**kw)
        """,
        [
            {"nbytes": 10**15},
            {"nbytes": 2**63 - 1},
            {"nbytes": -1},
            {"nbytes": 1.5},
            {"nbytes": True},
            {"repeats": 10**12},
            {"repeats": -1},
            {"threads": 10**9},
            {"threads": -3},
        ],
    )
    for r in results.values():
        assert "died" not in r and r["raised"] == "InvalidInputError", r


# -- token ids and panics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [[1.0, 2.0], [1.7], [-1], [2**32], [2**70], [hostile_models.VOCAB], [True], ["1"], [None]],
    ids=["float", "fraction", "negative", "u32-overflow", "huge", "past-vocab", "bool", "str", "none"],
)
def test_bad_token_ids_are_typed(good, ids):
    m = sparseinfer.load(good)
    for call in (
        lambda: m.logits(ids),
        lambda: m.generate_ids(ids, max_new_tokens=1),
        lambda: m._core.logits(ids),
        lambda: sparseinfer._core.Generator(m._core, ids, 1).next_token(),
    ):
        with pytest.raises(InvalidInputError):
            call()


def test_bad_binding_integers_are_typed(good):
    m = sparseinfer.load(good)
    for call in (
        lambda: sparseinfer._core.Generator(m._core, [1], -1),
        lambda: sparseinfer._core.Generator(m._core, [1], 1.5),
        lambda: sparseinfer._core.Generator(m._core, [1], 1, top_k=-2),
        lambda: sparseinfer._core.Generator(m._core, [1], 1, seed=-1),
        lambda: kernels.set_num_threads(-1),
        lambda: kernels.set_num_threads(10**12),
        lambda: kernels.pack(np.ones((4, 64), np.float32), "dense-int8", group_size=-32),
    ):
        with pytest.raises(InvalidInputError):
            call()


# -- sampling temperature --------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-30, 1e-38, 1e-45, 5e-324])
def test_tiny_temperatures_sample_the_argmax(good, t):
    m = sparseinfer.load(good)
    prompt = [5, 17, 42]
    want = int(np.argmax(m.logits(prompt)[-1]))
    for seed in range(5):
        assert m.generate_ids(prompt, max_new_tokens=1, temperature=t, seed=seed) == [want]


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -float("inf"), -1.0, -1e-300, "0.5"])
def test_bad_temperatures_are_typed(good, t):
    m = sparseinfer.load(good)
    with pytest.raises(InvalidInputError):
        m.generate_ids([1, 2], max_new_tokens=1, temperature=t)
    if not isinstance(t, str):
        with pytest.raises(InvalidInputError):
            sparseinfer._core.Generator(m._core, [1, 2], 1, temperature=t)


# -- the loaded model does not depend on its files --------------------------------------------------------


def test_truncating_the_weights_after_load_is_harmless(model):
    proc = run_child(
        f"""
        import os
        m = sparseinfer.load({str(model)!r})
        gen = sparseinfer._core.Generator(m._core, [5, 6, 7], 16)
        first = [gen.next_token() for _ in range(4)]
        with open({str(model / "model.safetensors")!r}, "r+b") as f:
            f.truncate(0)
        rest = [gen.next_token() for _ in range(8)]
        again = sparseinfer._core.Generator(m._core, list(range(40)), 4)
        print(json.dumps([len(first), len(rest), again.next_token() is not None]))
        """
    )
    assert proc.returncode == 0, f"the child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert json.loads(proc.stdout.splitlines()[-1]) == [4, 8, True]


# -- smaller typed errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "{", "\xff\xfe"])
def test_non_object_generation_config(model, content):
    (model / "generation_config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(InvalidInputError, match="generation_config.json"):
        sparseinfer.load(model)


@pytest.mark.parametrize("content", ["{", "[]", '{"model": 3}', "\xff"])
def test_corrupt_tokenizer_json(model, content):
    (model / "tokenizer.json").write_bytes(content.encode("latin-1"))
    m = sparseinfer.load(model)
    with pytest.raises(InvalidInputError, match="tokenizer.json"):
        m.generate("hello", max_new_tokens=1)


@pytest.mark.parametrize(
    "padding",
    [
        {"strategy": {"Fixed": 10**12}, "pad_to_multiple_of": None},
        {"strategy": "BatchLongest", "pad_to_multiple_of": 2**62},
    ],
    ids=["fixed-1e12", "multiple-2^62"],
)
def test_tokenizer_padding_settings_are_not_applied(model, padding):
    # transformers encodes one text unpadded whatever tokenizer.json says; applied, these two aborted the
    # process (a 4 TB allocation) or raised pyo3's PanicException (a BaseException).
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["padding"] = {"direction": "Right", "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>", **padding}
    tok["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    proc = hostile_models.run_child(
        f"""
        m = sparseinfer.load({str(model)!r})
        print(json.dumps(outcome(lambda: m.encode("hello there, hello"))))
        print(json.dumps(m.encode("hello there")))
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result, ids = proc.stdout.strip().splitlines()[-2:]
    assert json.loads(result)["raised"] is None, result
    assert len(json.loads(ids)) > 1  # not truncated to max_length either


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer.json", "tokenizer_config.json"])
def test_a_link_loop_is_a_typed_error(model, name):
    (model / name).unlink(missing_ok=True)
    os.symlink(name, model / name)
    with pytest.raises(InvalidInputError, match=name):
        m = sparseinfer.load(model)
        m.generate("hello", max_new_tokens=1, chat=name == "tokenizer_config.json")


def test_a_json_integer_too_long_to_convert_is_a_typed_error(model):
    (model / "generation_config.json").write_text('{"max_length": ' + "9" * 5000 + "}")
    with pytest.raises(InvalidInputError, match="generation_config.json"):
        sparseinfer.load(model)


@pytest.mark.parametrize(
    "field, value",
    [("rope_scaling", "llama3"), ("rope_parameters", [1]), ("rope_theta", "500000"), ("quantization_config", [1])],
)
def test_config_values_of_the_wrong_type_are_refused_not_ignored(model, field, value):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(InvalidInputError, match=field.split("_")[0]):
        sparseinfer.load(model)


def test_index_values_must_be_file_names(model):
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(InvalidInputError, match="is not a file name"):
        sparseinfer.load(model)
    (model / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(InvalidInputError, match="weight_map"):
        sparseinfer.load(model)


def test_config_is_a_typed_error_everywhere(model):
    for content in ["[]", "null", '{"model_type": 3}', "{" * 10000]:
        (model / "config.json").write_text(content)
        with pytest.raises(InvalidInputError, match="config.json"):
            sparseinfer.load(model)


# -- format versions (docs/FORMAT.md: an int this build reads; anything else refused by name) --------------

BAD_VERSIONS = ["2", "1", 2.0, 1.0, 1.5, True, None, 0, -1, [1], {"major": 1}]


def with_quant_version(d, value):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "sparseinfer_format_version": value}
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("value", BAD_VERSIONS, ids=repr)
def test_quantization_config_version_must_be_a_supported_int(model, value):
    with_quant_version(model, value)
    with pytest.raises(InvalidInputError) as e:
        sparseinfer.load(model)
    assert str(model / "config.json") in str(e.value)
    assert "quantization_config.sparseinfer_format_version" in str(e.value)


@pytest.mark.parametrize("value", BAD_VERSIONS, ids=repr)
def test_sparseinfer_json_version_must_be_a_supported_int(model, value):
    (model / "sparseinfer.json").write_text(json.dumps({"format_version": value}))
    with pytest.raises(InvalidInputError) as e:
        sparseinfer.load(model)
    assert str(model / "sparseinfer.json") in str(e.value) and "format_version" in str(e.value)


@pytest.mark.parametrize("content", ["[1]", '"1"', "{", "{}", '{"version": 1}'])
def test_sparseinfer_json_must_carry_its_version(model, content):
    (model / "sparseinfer.json").write_text(content)
    with pytest.raises(InvalidInputError, match="sparseinfer.json"):
        sparseinfer.load(model)


def test_newer_versions_are_unsupported_and_version_1_loads(model):
    with_quant_version(model, 1)
    (model / "sparseinfer.json").write_text(json.dumps({"format_version": 1, "recipe": None}))
    assert sparseinfer.load(model).logits([1, 2]).shape == (2, hostile_models.VOCAB)
    (model / "sparseinfer.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(sparseinfer.UnsupportedError, match="sparseinfer.json.*format_version.*newer"):
        sparseinfer.load(model)
    (model / "sparseinfer.json").unlink()
    with_quant_version(model, 3)
    with pytest.raises(sparseinfer.UnsupportedError, match="sparseinfer_format_version.*newer"):
        sparseinfer.load(model)
