"""llama.cpp against sparseinfer on the same weights: decode tokens/s, interleaved round by round.

Not part of `make test` or CI: it needs llama-cpp-python, which PyPI ships only as source (a ~5 minute build):

    pip install cmake ninja scikit-build-core gguf safetensors
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \\
        pip install --no-binary llama-cpp-python llama-cpp-python
    python bench/llamacpp_compare.py --size 1b --rounds 3    # writes docs/benchmarks/llamacpp.md

llama.cpp may live in another virtualenv: `--llamacpp-python /path/to/venv/bin/python` runs its cases (and the
quantization) with that interpreter, which needs only numpy and llama-cpp-python.

llama.cpp's own converter needs torch and transformers, so `to_gguf` writes the GGUF itself for the Llama bench
models (bench/llama_models.py): llama.cpp's tensor names and hyperparameter keys (from the `gguf` package), Q and
K rows permuted into llama.cpp's rotary layout, norms in f32 and the rest in f16. The bench models have no
tokenizer and both runtimes are fed token ids, so the GGUF gets a synthetic 32000-entry SentencePiece-style vocab
(control tokens, the 256 byte tokens, fillers). `llama_model_quantize` then makes Q8_0 and Q4_0 (llama.cpp
keeps the output matrix at Q6_K in Q4_0 files, its default).

Each runtime runs in its own process, 2 threads, a 16-token prompt and 128 new tokens (the first comes from the
prompt pass; the other 127 single-token steps are timed), best of 2 per process. The rounds interleave every
runtime and format, each with its own bandwidth probe, because this VM's bandwidth moves from minute to minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NEW_TOKENS = 128
PROMPT = [int(t) for t in np.random.default_rng(0).integers(10, 32000, 16)]


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (as llama.cpp's converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def synthetic_vocab(writer, n_vocab: int) -> None:
    """A SentencePiece-style vocab of `n_vocab` entries: <unk>, <s>, </s>, the 256 byte tokens, fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)  # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def to_gguf(model_dir: Path, out: Path) -> Path:
    """Writes a Llama bench checkpoint (safetensors) as an f16 GGUF, atomically. Needs `gguf` and `safetensors`."""
    import gguf
    from safetensors import safe_open

    hp = json.loads((model_dir / "config.json").read_text())
    if hp["model_type"] != "llama":
        raise SystemExit(f"{model_dir}: only Llama checkpoints are converted here, not {hp['model_type']}")
    layers, hidden, heads = hp["num_hidden_layers"], hp["hidden_size"], hp["num_attention_heads"]
    kv_heads = hp.get("num_key_value_heads", heads)
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, layers)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(model_dir.name)
    w.add_block_count(layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(hp.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hidden // heads)
    synthetic_vocab(w, hp["vocab_size"])
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name.endswith("q_proj.weight"):
                    t = permute_rotary(t, heads)
                elif name.endswith("k_proj.weight"):
                    t = permute_rotary(t, kv_heads)
                new = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise SystemExit(f"{path}: no llama.cpp name for tensor {name}")
                w.add_tensor(new, np.ascontiguousarray(t.astype(np.float32 if t.ndim == 1 else np.float16)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, out)
    return out


def quantize(src: Path, out: Path, kind: str) -> Path:
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src} -> {kind}")
    os.replace(tmp, out)
    return out


def time_llamacpp(path: Path) -> float:
    """Best of 2 decode rates (tokens/s) of llama.cpp on `path`, 2 threads, greedy, in this process."""
    import llama_cpp as L

    llm = L.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=256, n_batch=64, verbose=False)
    ctx, vocab = llm._ctx.ctx, llm.n_vocab()
    memory = L.llama_get_memory(ctx)

    def step(ids):
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,)).argmax())

    def run(n):
        L.llama_memory_clear(memory, True)
        tok = step(PROMPT)
        t = time.perf_counter()
        for _ in range(n - 1):
            tok = step([tok])
        return (n - 1) / (time.perf_counter() - t)

    run(8)  # page the weights in
    return max(run(NEW_TOKENS) for _ in range(2))


def time_ours(model_dir: Path, fmt: str) -> float:
    import sparseinfer

    m = sparseinfer.load(model_dir, weights=fmt, threads=2)
    m.generate_ids(PROMPT, max_new_tokens=8)
    best = 0.0
    for _ in range(2):
        m.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS)
        best = max(best, m.last_stats.decode_tokens_per_s)
    return best


def run_in(python: str, *args: str) -> str:
    """Runs this file with `args` under `python` and returns its last output line."""
    out = subprocess.run([python, __file__, *args], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sparseinfer-llamacpp")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks")
    ap.add_argument("--llamacpp-python", default=sys.executable, help="interpreter with llama-cpp-python")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--version", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # one case, in its own process (the runtimes never share memory or threads)
        case = json.loads(a.one)
        rate = time_llamacpp(Path(case["gguf"])) if case["runtime"] == "llama.cpp" else time_ours(**case["ours"])
        print(rate)
        return
    if a.quantize:
        src, out, kind = a.quantize
        print(quantize(Path(src), Path(out), kind))
        return
    if a.version:
        import llama_cpp

        print(llama_cpp.__version__)
        return

    import llama_models

    from sparseinfer import kernels

    dense = llama_models.model_dir(a.size, 0.0)
    sparse = llama_models.model_dir(a.size, a.sparsity)
    a.work.mkdir(parents=True, exist_ok=True)
    f16 = a.work / f"llama-{a.size}-f16.gguf"
    if not f16.exists():
        to_gguf(dense, f16)
    ggufs = {k: a.work / f"llama-{a.size}-{k}.gguf" for k in ("q8_0", "q4_0")}
    for kind, path in ggufs.items():
        if not path.exists():
            run_in(a.llamacpp_python, "--quantize", str(f16), str(path), kind)
    version = run_in(a.llamacpp_python, "--version")
    s = f"{a.sparsity:.0%}"
    cases = [
        ("llama.cpp Q8_0", {"runtime": "llama.cpp", "gguf": str(ggufs["q8_0"])}),
        ("sparseinfer dense-int8", {"runtime": "ours", "ours": {"model_dir": str(dense), "fmt": "dense-int8"}}),
        (f"sparseinfer sparse-int8 {s}", {"runtime": "ours", "ours": {"model_dir": str(sparse), "fmt": "sparse-int8"}}),
        ("llama.cpp Q4_0", {"runtime": "llama.cpp", "gguf": str(ggufs["q4_0"])}),
        ("sparseinfer dense-int4", {"runtime": "ours", "ours": {"model_dir": str(dense), "fmt": "dense-int4"}}),
        (f"sparseinfer sparse-int4 {s}", {"runtime": "ours", "ours": {"model_dir": str(sparse), "fmt": "sparse-int4"}}),
    ]
    rounds = []
    for r in range(a.rounds):
        bw = kernels.measure_read_bandwidth(nbytes=1 << 28, repeats=3)
        rates = {}
        for name, case in cases:
            python = a.llamacpp_python if case["runtime"] == "llama.cpp" else sys.executable
            rates[name] = float(run_in(python, "--one", json.dumps(case)))
            print(f"round {r + 1}: {name}: {rates[name]:.1f} tok/s", flush=True)
        rounds.append({"read_bandwidth_gbs": bw, "decode_tok_s": rates})
    lines = [
        "# llama.cpp against sparseinfer (decode tokens/s)",
        "",
        f"llama-cpp-python {version} built from source with `-DGGML_NATIVE=ON` (its AVX-512 VNNI "
        f"kernels), against sparseinfer on the same random Llama-shaped {a.size} weights "
        f"(bench/llama_models.py; the sparse rows use the {s}-sparse copy, which llama.cpp would read as dense). "
        "2 threads each, 16-token prompt, 128 new tokens, greedy; best of 2 per process. Every round runs every "
        "case once, each in its own process, with its own bandwidth probe. Made by `bench/llamacpp_compare.py`.",
        "",
        "| round | read bandwidth (GB/s) | " + " | ".join(n for n, _ in cases) + " |",
        "|---|---|" + "---|" * len(cases),
    ]
    for i, r in enumerate(rounds):
        lines.append(
            f"| {i + 1} | {r['read_bandwidth_gbs']:.1f} | "
            + " | ".join(f"{r['decode_tok_s'][n]:.1f}" for n, _ in cases)
            + " |"
        )
    med = {n: float(np.median([r["decode_tok_s"][n] for r in rounds])) for n, _ in cases}
    q8, q4 = med["llama.cpp Q8_0"], med["llama.cpp Q4_0"]
    lines += [
        "",
        "Medians over the rounds, against llama.cpp at the same bit width:",
        "",
        "| case | decode tok/s | vs llama.cpp Q8_0 | vs llama.cpp Q4_0 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {med[n]:.1f} | {med[n] / q8:.2f}x | {med[n] / q4:.2f}x |" for n, _ in cases]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "llamacpp.md").write_text("\n".join(lines) + "\n")
    (a.out / "llamacpp.json").write_text(json.dumps({"cases": [n for n, _ in cases], "rounds": rounds}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
