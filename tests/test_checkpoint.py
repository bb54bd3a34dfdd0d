"""checkpoint.atomic_dir: a writer killed at any instant leaves the old or the new model at the path, complete,
and its temporaries are removed by the next write.

The kill test forks writers from a child process that has imported everything once (a "zygote"), so that each
of the many kills costs milliseconds: the writer overwrites a tiny model in a loop and is SIGKILLed after a
random delay, then the path is checked.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import sparseinfer
from sparseinfer import InvalidInputError
from sparseinfer.checkpoint import atomic_dir, write_safetensors

hostile_models = pytest.importorskip("hostile_models")

KILLS = 200

WRITER = r"""
import json, os, sys, traceback
from pathlib import Path
from hostile_models import CONFIG, llama_tensors
from sparseinfer.checkpoint import atomic_dir, write_safetensors

FINAL = Path(sys.argv[1])
TENSORS = llama_tensors()

def write(generation):
    # config.json and the weights carry the same generation, so a mix of two writes is visible.
    with atomic_dir(FINAL, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps({**CONFIG, "generation": generation}))
        write_safetensors(tmp / "model.safetensors", TENSORS, {"generation": generation})

print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                n = 0
                while True:
                    n += 1
                    write(f"{os.getpid()}-{n}")
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        print(pid, flush=True)
    else:  # "reap": the parent has killed the writer
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
"""


def read_line(proc: subprocess.Popen, timeout: float = 20) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"the writer process did not answer within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"the writer process ended: {proc.wait()}")
    return line.strip()


def read_generation(d: Path) -> str:
    """The generation of a complete model at ``d``: config.json and the weights parse and agree."""
    assert d.is_dir(), f"nothing at {d}"
    config = json.loads((d / "config.json").read_text())
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + n + end, "truncated weights"
    assert header["__metadata__"]["generation"] == config["generation"], "config.json and weights of two writes"
    return config["generation"]


def temporaries(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))


@pytest.fixture
def scratch(tmp_path):
    # tmpfs when there is one: fsync costs nothing there, so each write cycle is short and the kills land in
    # every part of it, renames included, as often as possible.
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    d = Path(tempfile.mkdtemp(dir=base, prefix="sparseinfer-atomic-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_killed_overwrite_leaves_a_complete_model(scratch):
    from sparseinfer import checkpoint

    if sys.platform.startswith("linux"):
        assert checkpoint._RENAMEAT2 is not None, "Linux overwrites must use renameat2(RENAME_EXCHANGE)"
    final = scratch / "m"
    tensors = hostile_models.llama_tensors()
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text(json.dumps({**hostile_models.CONFIG, "generation": "first"}))
        write_safetensors(tmp / "model.safetensors", tensors, {"generation": "first"})
    env = dict(
        os.environ,
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(final)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rng = random.Random(0)
    seen = set()
    dead = []
    # The kill delay grows while kills keep landing before any complete write (a loaded machine writes slower),
    # so the test keeps exercising overwrites instead of killing every writer before its first rename.
    longest, last = 0.01, None
    try:
        assert read_line(proc) == "ready"
        for i in range(KILLS):
            proc.stdin.write("fork\n")
            proc.stdin.flush()
            pid = int(read_line(proc))
            time.sleep(rng.uniform(0.0, longest))
            os.kill(pid, signal.SIGKILL)
            proc.stdin.write("reap\n")
            proc.stdin.flush()
            status = int(read_line(proc))
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"the writer failed by itself: {proc.stderr.read() if proc.poll() is not None else status}"
            )
            dead.append(pid)
            generation = read_generation(final)
            if generation == last:
                longest = min(longest * 1.5, 0.5)
            seen.add(generation)
            last = generation
            if i % 20 == 0:
                assert sparseinfer.load(final).logits([1, 2]).shape == (2, hostile_models.VOCAB)
            # Each writer removes what the killed ones before it left: the temporaries do not pile up.
            assert len(temporaries(final)) <= 2, temporaries(final)
    finally:
        proc.kill()
        proc.wait()
    assert len(seen) > KILLS // 4, "many kills should land after at least one complete write"

    # The next write removes the dead writers' temporaries and keeps a live writer's.
    (scratch / f".m.tmp-{dead[-1]}-left").mkdir()
    live = scratch / f".m.tmp-{os.getppid()}-busy"
    live.mkdir()
    (scratch / f".m.old-{dead[-2]}").mkdir()  # what the previous version of atomic_dir left
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps({**hostile_models.CONFIG, "generation": "last"}))
        write_safetensors(tmp / "model.safetensors", tensors, {"generation": "last"})
    assert read_generation(final) == "last"
    assert temporaries(final) == [live.name]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    final = tmp_path / "m"
    with atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("2")
    with pytest.raises(InvalidInputError, match="already exists"):
        with atomic_dir(final):
            pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "c.json").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c.json"]
    assert temporaries(final) == []


def test_a_failed_write_leaves_the_old_directory(tmp_path):
    final = tmp_path / "m"
    with atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.json").write_text("new")
            raise RuntimeError("export failed")
    assert (final / "a.json").read_text() == "old"
    assert temporaries(final) == []


def test_the_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    from sparseinfer import checkpoint

    monkeypatch.setattr(checkpoint, "_RENAMEAT2", None)
    final = tmp_path / "m"
    for text in ("old", "new"):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.json").write_text(text)
    assert (final / "a.json").read_text() == "new"
    assert temporaries(final) == []
