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
