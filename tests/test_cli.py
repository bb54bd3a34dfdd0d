"""The sparseinfer command line (python -m sparseinfer)."""

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "sparseinfer", *args], capture_output=True, text=True, timeout=300)


def test_info_prints_build_json():
    r = run("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["isa"] in info["available_isas"]


def test_demo_runs_every_format():
    r = run("demo", "--rows", "256", "--cols", "512", "--copies", "2")
    assert r.returncode == 0, r.stderr
    for fmt in ("numpy f32", "dense-f32", "sparse-int8", "sparse-int4"):
        assert fmt in r.stdout


def test_unknown_command_fails_cleanly():
    r = run("frobnicate")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_version():
    import sparseinfer

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sparseinfer {sparseinfer.__version__}"


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from sparseinfer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "info", "convert", "bench", "demo", "prune", "finetune", "quantize", "export", "train"} <= set(
        commands.choices
    )
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = "".join(sub.format_help().split())  # without the wrapping
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default:{action.default})" in text, (name, action.dest)
    usage = commands.choices["bench"].format_help()
    assert "{table,json}" in usage and "{f32,int8,int8-token}" in usage
    assert "sparse-int8" in commands.choices["generate"].format_help()


@pytest.mark.parametrize(
    "args, match",
    [
        (["generate", "hi", "--weights", "sparse-int3"], "invalid choice"),
        (["bench", "--formats", "stored,sparse-int3"], "unknown format 'sparse-int3'"),
        (["bench", "--new-tokens", "0"], "must be > 0"),
        (["demo", "--sparsity", "1.5"], "must be in"),
        (["bench", "-o", "xml"], "invalid choice"),
    ],
)
def test_bad_option_values_are_refused_by_the_parser(args, match):
    r = run(*args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr


def one_line_error(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparseinfer: error: "), r.stderr
    return lines[0]


def test_a_hub_id_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for command in (["generate", "-m", "HuggingFaceTB/SmolLM2-135M", "hi"], ["info", "HuggingFaceTB/SmolLM2-135M"]):
        msg = one_line_error(run(*command))
        assert "does not download" in msg and "hf download HuggingFaceTB/SmolLM2-135M --local-dir" in msg
    # A snapshot already in the Hugging Face cache is named.
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    msg = one_line_error(run("bench", "HuggingFaceTB/SmolLM2-135M"))
    assert f"-m {snap}" in msg


def test_a_gguf_file_gets_a_hint(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    msg = one_line_error(run("generate", "-m", str(gguf), "hi"))
    assert f"sparseinfer convert {gguf} OUT_DIR" in msg
    msg = one_line_error(run("info", str(tmp_path / "missing.gguf")))
    assert "does not exist" in msg
    (tmp_path / "config.json").write_text("{}")
    msg = one_line_error(run("info", str(tmp_path / "config.json")))
    assert "a model is a directory" in msg


def test_training_commands_without_torch_are_one_line_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\n")
    block_torch = (
        "import sys; sys.modules['torch'] = None; from sparseinfer.cli import main; "
        f"sys.exit(main(['prune', {str(recipe)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", block_torch], capture_output=True, text=True, timeout=120)
    assert "sparseinfer[train]" in one_line_error(r)
    msg = one_line_error(run("train", str(tmp_path / "missing.yaml")))
    assert "missing.yaml" in msg


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    hostile_models = pytest.importorskip("hostile_models")
    return hostile_models.tiny_llama(tmp_path_factory.mktemp("cli-plain") / "m")


def test_bench_json(plain_dir):
    r = run(
        "bench", str(plain_dir), "--formats", "stored,sparse-int8", "--new-tokens", "3", "--repeats", "1", "-o", "json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # nothing but the JSON object on stdout
    assert out["new_tokens"] == 3 and out["read_bandwidth_gb_per_s"] > 0 and out["build"]["isa"]
    assert [row["format"] for row in out["results"]] == ["stored", "sparse-int8"]
    for row in out["results"]:
        assert row["decode_tokens_per_s"] > 0 and row["bytes_per_token"] > 0 and row["decode_tokens"] == 2
    assert out["results"][1]["packed_format"] == "sparse-int8"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tiny_models = pytest.importorskip("tiny_models")
    pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("cli-llama")
    tiny_models.build("llama", path, scale=3.0, eos_token_id=None)
    return path


def test_generate_streams_and_reports_speed(tiny_dir):
    import sparseinfer

    r = run("generate", "-m", str(tiny_dir), "Once upon a time", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    want = sparseinfer.load(tiny_dir).generate("Once upon a time", max_new_tokens=12)
    assert r.stdout == want + "\n"
    assert "decode 11 tok at" in r.stderr and "tok/s" in r.stderr


def test_generate_with_weights_and_sampling(tiny_dir):
    args = ("generate", "-m", str(tiny_dir), "To be", "--max-new-tokens", "8", "--weights", "sparse-int8")
    a = run(*args, "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    b = run(*args, "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and "sparse-int8" in a.stderr


def test_generate_with_an_int8_kv_cache(tiny_dir):
    import sparseinfer

    r = run("generate", "-m", str(tiny_dir), "To be", "--max-new-tokens", "8", "--kv-cache", "int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == sparseinfer.load(tiny_dir, kv_cache="int8").generate("To be", max_new_tokens=8) + "\n"


def test_info_of_a_model(tiny_dir):
    r = run("info", str(tiny_dir), "--weights", "dense-int4")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "llama" and info["format"] == "dense-int4" and "linear" not in info


def test_bench_prints_a_row_per_format(tiny_dir):
    r = run("bench", str(tiny_dir), "--formats", "stored,sparse-int8", "--new-tokens", "4", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "stored" in r.stdout and "sparse-int8" in r.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path, tiny_dir):
    r = run("generate", "-m", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "-m", str(tiny_dir), "", "--max-new-tokens", "3")
    assert r.returncode == 2 and "empty" in r.stderr
