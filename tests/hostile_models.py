"""A tiny Llama model directory built with numpy alone (no torch), and a way to run attempts against it in a
child process, for the tests that treat a model directory as an attacker's input.

An attempt that aborts, segfaults or hangs the child fails its test instead of killing pytest; the child's
address space is capped at 4 GiB so that one that reads or allocates without end cannot take the machine's
memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from sparseinfer.checkpoint import write_safetensors

VOCAB = 320
CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def llama_tensors(cfg: dict = CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights whose shapes match ``cfg``."""
    rng = np.random.default_rng(seed)
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, g = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": w(v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(h * hd, d)
        t[p + "self_attn.k_proj.weight"] = w(g * hd, d)
        t[p + "self_attn.v_proj.weight"] = w(g * hd, d)
        t[p + "self_attn.o_proj.weight"] = w(d, h * hd)
        t[p + "mlp.gate_proj.weight"] = w(i, d)
        t[p + "mlp.up_proj.weight"] = w(i, d)
        t[p + "mlp.down_proj.weight"] = w(d, i)
    return t


def tiny_llama(path: Path, tokenizer: bool = True, **config_overrides) -> Path:
    """Writes config.json, model.safetensors and (with ``tokenizer``) a byte-level BPE tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config_overrides}))
    write_safetensors(path / "model.safetensors", llama_tensors())
    if tokenizer:
        from tiny_models import tokenizer_json

        tokenizer_json(path, VOCAB)
    return path


CHILD_PRELUDE = """
import json, resource, sys
# A regression that reads without end or allocates wildly fails with MemoryError or an abort in this child,
# instead of taking the machine's memory.
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import sparseinfer
from sparseinfer import InvalidInputError, SparseInferError

def outcome(fn):
    # What an attempt did: "ok", or the exception class and whether it is a ValueError (one line of JSON).
    try:
        fn()
        return {"raised": None}
    except BaseException as e:
        return {"raised": type(e).__name__, "value_error": isinstance(e, ValueError),
                "typed": isinstance(e, SparseInferError), "msg": str(e)[:500]}
"""


def run_child(code: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` (after CHILD_PRELUDE) in a fresh interpreter; the caller checks returncode and stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def run_cases(body: str, cases: list, timeout: float = 120) -> dict[int, dict]:
    """Runs ``body`` once per case in as few child processes as possible. ``body`` is the source of a function
    ``attempt(case)`` whose exceptions are recorded; each case's outcome is printed as it finishes, so a case
    that kills its child is reported as ``{"died": returncode}`` and the rest run in a new child."""
    results: dict[int, dict] = {}
    todo = list(range(len(cases)))
    while todo:
        code = (
            textwrap.dedent(body)
            + f"\nCASES = json.loads({json.dumps(json.dumps([cases[i] for i in todo]))})\n"
            + f"IDS = {todo!r}\n"
            + "for i, case in zip(IDS, CASES):\n"
            + "    print('START', i, flush=True)\n"
            + "    print('RESULT', i, json.dumps(outcome(lambda: attempt(case))), flush=True)\n"
        )
        stderr = ""
        try:
            proc = run_child(code, timeout=timeout)
            out, rc, stderr = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout"
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("RESULT "):
                _, i, payload = line.split(" ", 2)
                results[int(i)] = json.loads(payload)
                started = None
        if started is not None:
            results[started] = {"died": rc, "stderr": stderr[-2000:]}
        left = [i for i in todo if i not in results]
        if left and len(left) == len(todo):
            # No case started (the child failed on import): report it on every remaining case.
            for i in left:
                results[i] = {"died": rc, "stderr": stderr[-2000:]}
        todo = [i for i in todo if i not in results]
    return results
