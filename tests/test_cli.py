"""The sparseinfer command line (python -m sparseinfer)."""

import json
import subprocess
import sys


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
