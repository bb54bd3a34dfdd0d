"""A GGUF file is untrusted input to ``sparseinfer convert``: metadata that lies (missing, zero or absurd sizes,
values of the wrong type, bad merges) and tensors that lie (an unreadable type, absurd dimensions, data past
the end of the file) are each an ``InvalidInputError`` naming the file and the key or tensor, and the CLI
prints one line without a traceback.

Every hostile file is written with the gguf package's own ``GGUFWriter`` from a tiny valid model (truncation
and a lying array length are byte edits of such a file). The conversions run in child processes with a
timeout (hostile_models.run_cases): the plain reader can loop on an array length that lies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparseinfer

gguf = pytest.importorskip("gguf")
hostile_models = pytest.importorskip("hostile_models")
tiny_models = pytest.importorskip("tiny_models")
from hostile_models import CONFIG, VOCAB, llama_tensors, run_cases  # noqa: E402

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType

# Hugging Face names → GGUF names (the inverse of convert._NAMES).
_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in _GGUF:
        return _GGUF[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_GGUF['.'.join(parts[3:-1])]}.weight"


def tiny_gguf(path: Path, tok_dir: Path, keys=None, drop=(), tensors=None) -> Path:
    """Writes the tiny Llama of hostile_models as a GGUF. ``keys``: key → (value, type[, sub type]) set on top
    of the valid metadata; ``drop``: keys removed; ``tensors``: GGUF name → None (left out) or keyword
    arguments of ``GGUFWriter.add_tensor`` replacing that tensor."""
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(CONFIG["num_hidden_layers"])
    w.add_context_length(CONFIG["max_position_embeddings"])
    w.add_embedding_length(CONFIG["hidden_size"])
    w.add_feed_forward_length(CONFIG["intermediate_size"])
    w.add_head_count(CONFIG["num_attention_heads"])
    w.add_head_count_kv(CONFIG["num_key_value_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(CONFIG["rms_norm_eps"])
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, spec in (keys or {}).items():
        w.add_key_value(key, spec[0], spec[1], *spec[2:])
    for key in drop:
        w.kv_data[0].pop(key)
    tensors = tensors or {}
    for hf, a in llama_tensors().items():
        name = gguf_name(hf)
        if name not in tensors:
            w.add_tensor(name, a)
        elif tensors[name] is not None:
            w.add_tensor(name, **tensors[name])
    for name, spec in tensors.items():  # tensors the model does not have
        if spec is not None and name not in {gguf_name(hf) for hf in llama_tensors()}:
            w.add_tensor(name, **spec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncated(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def lying_array_length(path: Path, n: int) -> None:
    """Sets the length of the file's last metadata array (an INT32 array) to ``n``."""
    data = bytearray(path.read_bytes())
    key = b"zz.last_array"
    at = data.index(key) + len(key)
    assert data[at : at + 8] == bytes([9, 0, 0, 0, 5, 0, 0, 0])  # ARRAY of INT32
    data[at + 8 : at + 16] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def lying_header_count(path: Path, offset: int, n: int) -> None:
    """Sets the u64 at ``offset`` of the header (8: tensor count, 16: key count) to ``n``."""
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


HC = "llama.attention.head_count"
E = CONFIG["hidden_size"]
EMB = np.zeros((VOCAB, E), np.float32)

# (id, what is written, the key or tensor the error must name); the writer's arguments are tiny_gguf's.
CASES = [
    ("no-head-count", {"drop": [HC]}, HC),
    ("zero-head-count", {"keys": {HC: (0, V.UINT32)}}, HC),
    ("zero-kv-heads", {"keys": {HC + "_kv": (0, V.UINT32)}}, HC + "_kv"),
    ("kv-heads-not-dividing", {"keys": {HC + "_kv": (3, V.UINT32)}}, HC + "_kv"),
    ("head-count-string", {"keys": {HC: ("4", V.STRING)}}, HC),
    ("head-count-float", {"keys": {HC: (4.0, V.FLOAT32)}}, HC),
    ("head-count-array", {"keys": {HC: ([4, 4], V.ARRAY, V.UINT32)}}, HC),
    ("head-count-huge", {"keys": {HC: (2**40, V.UINT64)}}, HC),
    ("embedding-bool", {"keys": {"llama.embedding_length": (True, V.BOOL)}}, "llama.embedding_length"),
    ("no-embedding-length", {"drop": ["llama.embedding_length"]}, "llama.embedding_length"),
    ("block-count-huge", {"keys": {"llama.block_count": (10**12, V.UINT64)}}, "llama.block_count"),
    ("block-count-negative", {"keys": {"llama.block_count": (-2, V.INT32)}}, "llama.block_count"),
    ("context-zero", {"keys": {"llama.context_length": (0, V.UINT32)}}, "llama.context_length"),
    ("context-string", {"keys": {"llama.context_length": ("2048", V.STRING)}}, "llama.context_length"),
    ("ffn-huge", {"keys": {"llama.feed_forward_length": (2**62, V.UINT64)}}, "llama.feed_forward_length"),
    ("vocab-huge", {"keys": {"llama.vocab_size": (10**9, V.UINT32)}}, "llama.vocab_size"),
    ("eps-negative", {"keys": {"llama.attention.layer_norm_rms_epsilon": (-1e-5, V.FLOAT32)}}, "rms_epsilon"),
    ("eps-nan", {"keys": {"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)}}, "rms_epsilon"),
    ("rope-base-zero", {"keys": {"llama.rope.freq_base": (0.0, V.FLOAT32)}}, "llama.rope.freq_base"),
    ("rope-base-string", {"keys": {"llama.rope.freq_base": ("1e4", V.STRING)}}, "llama.rope.freq_base"),
    ("rope-dims-odd", {"keys": {"llama.rope.dimension_count": (7, V.UINT32)}}, "llama.rope.dimension_count"),
    ("no-architecture", {"drop": ["general.architecture"]}, "general.architecture"),
    ("architecture-int", {"keys": {"general.architecture": (3, V.UINT32)}}, "general.architecture"),
    ("tokens-ints", {"keys": {"tokenizer.ggml.tokens": ([1, 2, 3], V.ARRAY, V.INT32)}}, "tokenizer.ggml.tokens"),
    ("no-tokens", {"drop": ["tokenizer.ggml.tokens"]}, "tokenizer.ggml.tokens"),
    ("tokens-not-utf8", {"keys": {"tokenizer.ggml.tokens": ([b"\xff\xfe"] * 8, V.ARRAY, V.STRING)}}, "tokens"),
    ("token-types-short", {"keys": {"tokenizer.ggml.token_type": ([1, 1], V.ARRAY, V.INT32)}}, "token_type"),
    ("token-types-strings", {"keys": {"tokenizer.ggml.token_type": (["a", "b"], V.ARRAY, V.STRING)}}, "token_type"),
    ("merge-one-token", {"keys": {"tokenizer.ggml.merges": (["abc"], V.ARRAY, V.STRING)}}, "tokenizer.ggml.merges"),
    ("merge-three-tokens", {"keys": {"tokenizer.ggml.merges": (["a b c"], V.ARRAY, V.STRING)}}, "merges"),
    ("merge-unknown", {"keys": {"tokenizer.ggml.merges": (["\u4e01 \u4e02"], V.ARRAY, V.STRING)}}, "merges"),
    ("merges-ints", {"keys": {"tokenizer.ggml.merges": ([1, 2], V.ARRAY, V.INT32)}}, "tokenizer.ggml.merges"),
    ("bos-past-vocab", {"keys": {"tokenizer.ggml.bos_token_id": (10**6, V.UINT32)}}, "bos_token_id"),
    ("eos-negative", {"keys": {"tokenizer.ggml.eos_token_id": (-1, V.INT32)}}, "eos_token_id"),
    ("pad-past-tokens", {"keys": {"tokenizer.ggml.padding_token_id": (VOCAB + 5, V.UINT32)}}, "padding_token_id"),
    ("chat-template-int", {"keys": {"tokenizer.chat_template": (7, V.UINT32)}}, "tokenizer.chat_template"),
    ("add-bos-string", {"keys": {"tokenizer.ggml.add_bos_token": ("yes", V.STRING)}}, "add_bos_token"),
    ("f64-tensor", {"tensors": {"token_embd.weight": {"tensor": EMB.astype(np.float64)}}}, "token_embd.weight"),
    ("i32-tensor", {"tensors": {"output_norm.weight": {"tensor": np.ones(E, np.int32)}}}, "output_norm.weight"),
    ("unknown-type", {"tensors": {"blk.0.attn_q.weight": {"tensor": EMB[:E], "raw_dtype": 99}}}, "blk.0.attn_q"),
    ("dims-huge", {"tensors": {"token_embd.weight": {"tensor": EMB, "raw_shape": [2**40, E]}}}, "token_embd"),
    ("dims-wrap", {"tensors": {"token_embd.weight": {"tensor": EMB, "raw_shape": [2**32, 2**32]}}}, "token_embd"),
    ("dims-zero", {"tensors": {"output.weight": {"tensor": EMB, "raw_shape": [0, E]}}}, "output.weight"),
    ("dims-five", {"tensors": {"output.weight": {"tensor": EMB, "raw_shape": [1, 1, 1, VOCAB, E]}}}, "output.weight"),
    ("shape-transposed", {"tensors": {"token_embd.weight": {"tensor": EMB.T.copy()}}}, "token_embd.weight"),
    ("shape-short", {"tensors": {"blk.1.ffn_up.weight": {"tensor": np.zeros((8, E), np.float32)}}}, "blk.1.ffn_up"),
    ("tensor-missing", {"tensors": {"blk.1.ffn_down.weight": None}}, "blk.1.ffn_down.weight"),
    ("block-past-count", {"tensors": {"blk.7.attn_norm.weight": {"tensor": np.ones(E, np.float32)}}}, "blk.7"),
    ("truncated-data", {"truncate": -100}, "blk.1.ffn_down.weight"),  # written last
    ("truncated-header", {"truncate": 200}, "truncated"),
    ("array-length-lies", {"keys": {"zz.last_array": ([1, 2, 3], V.ARRAY, V.INT32)}, "lie": 2**20}, "truncated"),
    # Counts past any real file's are refused before the reader loops over them (memory and time).
    ("array-length-huge", {"keys": {"zz.last_array": ([1, 2, 3], V.ARRAY, V.INT32)}, "lie": 2**40}, "array's length"),
    ("key-count-huge", {"count": (16, 2**40)}, "GGUF.kv_count"),
    ("tensor-count-huge", {"count": (8, 2**40)}, "GGUF.tensor_count"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_models.tokenizer_json(d, VOCAB)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("gguf")
    out = []
    for name, spec, _ in CASES:
        spec = dict(spec)
        cut, lie, count = spec.pop("truncate", None), spec.pop("lie", None), spec.pop("count", None)
        p = tiny_gguf(d / f"{name}.gguf", tok_dir, **spec)
        if cut is not None:
            truncated(p, cut)
        if lie is not None:
            lying_array_length(p, lie)
        if count is not None:
            lying_header_count(p, *count)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def results(files):
    body = """
    import tempfile
    from sparseinfer.convert import convert_gguf
    OUT = tempfile.mkdtemp()
    def attempt(path):
        convert_gguf(path, OUT + "/" + path.rsplit("/", 1)[-1])
    """
    return run_cases(body, files, timeout=120)


def test_the_tiny_gguf_converts_and_loads(tmp_path, tok_dir):
    from sparseinfer.convert import convert_gguf

    out = convert_gguf(tiny_gguf(tmp_path / "m.gguf", tok_dir), tmp_path / "out")
    m = sparseinfer.load(out)
    assert m.logits([1, 2, 3]).shape == (3, VOCAB)
    assert m.generate("hello", max_new_tokens=2) is not None


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_lying_gguf_is_a_typed_error_naming_the_field(results, files, i):
    r = results[i]
    assert "died" not in r, f"the conversion hung or crashed: {r}"
    assert r["raised"] == "InvalidInputError", r
    assert files[i] in r["msg"], r  # names the file
    assert CASES[i][2] in r["msg"], r  # and the key or tensor


@pytest.mark.parametrize("name", ["zero-head-count", "f64-tensor", "merge-one-token"])
def test_cli_prints_one_line_without_a_traceback(tmp_path, files, name):
    i = IDS.index(name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sparseinfer", "convert", files[i], str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sparseinfer: error: ") and CASES[i][2] in last, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_fuzz_corpus_replays_without_findings():
    # The committed corpus of the convert fuzz target (tests/fuzz/convert_target.py, `make fuzz-convert`):
    # each input converts and runs, or is refused with a ValueError, in a child with a timeout.
    corpus = Path(__file__).parent / "fuzz" / "corpus" / "convert"
    inputs = sorted(str(p) for p in corpus.iterdir())
    assert len(inputs) >= 5
    body = f"""
    import sys
    from pathlib import Path
    sys.path.insert(0, {str(corpus.parents[1])!r})
    from convert_target import one_input

    def attempt(path):
        one_input(Path(path).read_bytes())
    """
    results = run_cases(body, inputs, timeout=300)
    findings = {inputs[i]: r for i, r in results.items() if r.get("raised") is not None or "died" in r}
    assert not findings, findings
