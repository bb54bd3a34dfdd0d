"""llama.cpp against sparseinfer on the same weights: decode tokens/s, interleaved round by round.

Not part of `make test` or CI: it needs llama-cpp-python, which PyPI ships only as source (a ~5 minute build):

    pip install cmake ninja scikit-build-core gguf safetensors
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \\
        pip install --no-binary llama-cpp-python llama-cpp-python
    python bench/llamacpp_compare.py --size 1b --rounds 3    # writes docs/benchmarks/llamacpp.md

On a CPU with AMX, add `'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'` and the same
`-DCMAKE_CXX_FLAGS` to CMAKE_ARGS: in a VM that does not give threads the AMX tile state (this one), ggml's AMX
matmul faults at its first `ldtilecfg` (Q8_0 and Q4_0 crash, f16 runs), and sparseinfer does not use AMX either.

llama.cpp may live in another virtualenv: `--llamacpp-python /path/to/venv/bin/python` runs its cases (and the
quantization) with that interpreter, which needs only numpy and llama-cpp-python.

llama.cpp's own converter needs torch and transformers, so `to_gguf` writes the GGUF itself for the Llama bench
models (bench/llama_models.py): llama.cpp's tensor names and hyperparameter keys (from the `gguf` package), Q and
K rows permuted into llama.cpp's rotary layout, llama3 rope scaling as its `rope_freqs` tensor, norms in f32 and
the rest in f16, streamed one tensor at a time. The bench models have no tokenizer and both runtimes are fed token
ids, so the GGUF gets a synthetic SentencePiece-style vocab of the model's size (control tokens, the 256 byte
tokens, fillers). `llama_model_quantize` then makes Q8_0 and Q4_0 (llama.cpp keeps the output matrix at Q6_K in
Q4_0 files, its default).

`--ct24 --size 8b` compares on a 2:4 checkpoint in the published format instead (bench/llama_24.py: Llama-3.1-8B's
shape, bf16, compressed-tensors' `sparse-24-bitmask` written by compressed-tensors 0.14), which sparseinfer loads
as stored and packed to sparse-int8 and sparse-int4, against Q8_0 and Q4_0 of the same weights; it writes
docs/benchmarks/llamacpp-8b-24.md. Its files (~40 GB: checkpoint, f16, Q8_0 and Q4_0 GGUFs) go to `--work`.

Before timing, llama.cpp on the f16 GGUF and sparseinfer on the checkpoint as stored must give the prompt the same
logits (SAME_WEIGHTS), and every sparseinfer case must load in the format asked and decode the same tokens twice.
Each runtime runs in its own process, 2 threads, a 16-token prompt and 128 new tokens (the first comes from the
prompt pass; the other 127 single-token steps are timed), best of 2 per process. The rounds interleave every
runtime and format in an order rotated round by round (bench/harness.py), each with its own bandwidth probe,
because this VM's bandwidth moves from minute to minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

NEW_TOKENS = 128
# Largest |difference| over the largest |logit| after the prompt, llama.cpp on the f16 GGUF against sparseinfer on
# the checkpoint as stored: the same weights, rounded differently on the way (llama.cpp's f16 kernels round the
# activations to f16).
SAME_WEIGHTS = 2e-2
PROMPT = [int(t) for t in np.random.default_rng(0).integers(10, 32000, 16)]
# The prefill case: one pass over a 512-token prompt.
LONG_PROMPT = [int(t) for t in np.random.default_rng(1).integers(10, 32000, 512)]


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


def llama3_rope_factors(hp: dict) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` tensor for llama3 rope scaling (one divisor per frequency, as its converter
    computes it), or None for unscaled rope."""
    scaling = hp.get("rope_scaling") or {}
    if scaling.get("rope_type") != "llama3":
        return None
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / hp.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid)).astype(np.float32)


def safetensors_tensors(model_dir: Path):
    """(name, shape, load) of every tensor in `model_dir`'s safetensors files, each read when `load()` is called."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            shapes = [f.get_slice(n).get_shape() for n in names]
        for name, shape in zip(names, shapes):

            def load(path=path, name=name):
                with safe_open(str(path), framework="np") as f:
                    return f.get_tensor(name)

            yield name, tuple(shape), load


def to_gguf(model_dir: Path, out: Path, tensors=None) -> Path:
    """Writes a Llama checkpoint as an f16 GGUF, atomically. Needs `gguf` and `safetensors`.

    `tensors`: (Hugging Face name, shape, load) triples, `load()` giving the float array; by default every tensor
    of `model_dir`'s safetensors files. The file is streamed: one tensor is in memory at a time."""
    import gguf

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
    # Tensor infos first, then each tensor's data in the same order, loaded one at a time.
    plan = []  # (llama.cpp name, shape, dtype, load, rotary heads to permute the rows for)
    factors = llama3_rope_factors(hp)
    if factors is not None:
        plan.append(
            (
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                factors.shape,
                np.float32,
                lambda: factors,
                None,
            )
        )
    rotary = {"q_proj.weight": heads, "k_proj.weight": kv_heads}
    for name, shape, load in safetensors_tensors(model_dir) if tensors is None else tensors:
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"{model_dir}: no llama.cpp name for tensor {name}")
        dtype = np.float32 if len(shape) == 1 else np.float16
        plan.append((new, tuple(shape), dtype, load, rotary.get(name.rsplit(".", 2)[-2] + ".weight")))
    for new, shape, dtype, _, _ in plan:
        w.add_tensor_info(new, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for new, shape, dtype, load, permute_heads in plan:
        t = load()
        if tuple(t.shape) != shape:
            raise SystemExit(f"{model_dir}: {new} has shape {t.shape}, expected {shape}")
        if permute_heads:
            t = permute_rotary(t, permute_heads)
        w.write_tensor_data(np.ascontiguousarray(t.astype(dtype)))
    w.close()
    os.replace(tmp, out)
    return out


def quantize(src: Path, out: Path, kind: str) -> Path:
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = {
        "q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0,
        "q4_1": L.LLAMA_FTYPE_MOSTLY_Q4_1,
    }[kind]
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src} -> {kind}")
    os.replace(tmp, out)
    return out


def llamacpp(path: Path):
    """llama.cpp on `path` in this process (2 threads): (llm, step, clear), `step(ids)` returning a view of the
    logits of the last id (valid until the next step). Keep `llm` alive while stepping."""
    import llama_cpp as L

    n = len(LONG_PROMPT)
    llm = L.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=2 * n, n_batch=n, verbose=False)
    ctx, vocab = llm._ctx.ctx, llm.n_vocab()
    memory = L.llama_get_memory(ctx)

    def step(ids):
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))

    return llm, step, lambda: L.llama_memory_clear(memory, True)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_llamacpp(path: Path) -> dict:
    """Best of 2 decode rates (tokens/s) of llama.cpp on `path`, 2 threads, greedy, in this process, and the best
    of 2 prefill rates over LONG_PROMPT."""
    t = time.perf_counter()
    llm, step, clear = llamacpp(path)
    load_s = time.perf_counter() - t

    def run(n):
        clear()
        tok = int(step(PROMPT).argmax())
        t = time.perf_counter()
        for _ in range(n - 1):
            tok = int(step([tok]).argmax())
        return (n - 1) / (time.perf_counter() - t)

    def prefill():
        clear()
        t = time.perf_counter()
        step(LONG_PROMPT)
        return len(LONG_PROMPT) / (time.perf_counter() - t)

    run(8)  # page the weights in
    rate = max(run(NEW_TOKENS) for _ in range(2))
    prefill_rate = max(prefill() for _ in range(2))
    return {"tok_s": rate, "prefill_tok_s": prefill_rate, "load_s": load_s, "peak_rss_gb": peak_rss_gb()}


def time_ours(model_dir: Path, fmt: str | None) -> dict:
    """Best of 2 decode rates of sparseinfer on `model_dir` packed as `fmt` (None: as stored), and best of 2
    prefill rates over LONG_PROMPT; the two greedy decodes must agree, and with `fmt` every linear must have been
    packed to it."""
    import sparseinfer

    t = time.perf_counter()
    m = sparseinfer.load(model_dir, weights=fmt, threads=2)
    load_s = time.perf_counter() - t
    pack_cache = m.info()["pack_cache"]
    formats = {layer["format"] for layer in m.info()["linear"]}
    if fmt is not None and formats != {fmt}:
        raise SystemExit(f"{model_dir} as {fmt}: the linears were packed as {sorted(formats)}")
    m.generate_ids(PROMPT, max_new_tokens=8)
    best, outputs = 0.0, []
    for _ in range(2):
        outputs.append(m.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS))
        best = max(best, m.last_stats.decode_tokens_per_s)
    if outputs[0] != outputs[1]:
        raise SystemExit(f"{model_dir} as {fmt}: two greedy decodes of the same prompt differ")
    prefill = 0.0
    for _ in range(2):
        m.generate_ids(LONG_PROMPT, max_new_tokens=1)
        prefill = max(prefill, m.last_stats.prefill_tokens_per_s)
    return {
        "tok_s": best,
        "prefill_tok_s": prefill,
        "load_s": load_s,
        "pack_cache": pack_cache,
        "peak_rss_gb": peak_rss_gb(),
        "kernel_isa": m.info().get("isa", "-"),
    }


def logits_llamacpp(path: Path, out: Path) -> dict:
    """The logits after the prompt, saved to `out`."""
    llm, step, _ = llamacpp(path)
    np.save(out, np.array(step(PROMPT), np.float32))
    return {"peak_rss_gb": peak_rss_gb()}


def logits_ours(model_dir: Path, out: Path) -> dict:
    """The logits after the prompt of the checkpoint as stored, saved to `out`, and its per-linear formats and
    densities."""
    import sparseinfer

    t = time.perf_counter()
    m = sparseinfer.load(model_dir, threads=2)
    load_s = time.perf_counter() - t
    np.save(out, m.logits(PROMPT)[-1])
    linear = m.info()["linear"]
    return {
        "formats": sorted({layer["format"] for layer in linear}),
        "densities": [min(layer["density"] for layer in linear), max(layer["density"] for layer in linear)],
        "load_s": load_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def run_case(case: dict, python: str) -> dict:
    """One case in its own process (the runtimes never share memory or threads): `python` for llama.cpp."""
    py = python if case["runtime"] == "llama.cpp" else sys.executable
    return harness.run_json([py, __file__, "--one", json.dumps(case)], what=f"{case['runtime']} {case.get('fmt', '')}")


def paired_lines(rounds: list[dict], names: list[str]) -> list[str]:
    """Ratios paired within each round, median (range) over the rounds: every sparseinfer case against
    llama.cpp at its bit width and, for a sparse case, against our dense case at that width."""

    def ratio_row(n: str, b: str) -> str:
        dec = [r["decode_tok_s"][n] / r["decode_tok_s"][b] for r in rounds]
        pre = [r["prefill_tok_s"][n] / r["prefill_tok_s"][b] for r in rounds]
        return f"| {n} / {b} | {harness.fmt_spread(dec)} | {harness.fmt_spread(pre)} |"

    rows = []
    for n in names:
        if not n.startswith("sparseinfer") or not ("int4" in n or "int8" in n):
            continue
        width = "int4" if "int4" in n else "int8"
        bases = ["llama.cpp Q4_0" if width == "int4" else "llama.cpp Q8_0"]
        if " sparse-" in n:
            bases.append(f"sparseinfer dense-{width}")
        rows += [ratio_row(n, b) for b in bases if b in names]
    return [
        "",
        "Paired within each round (both cases minutes apart on the same machine), median and range over the rounds:",
        "",
        "| ratio | decode | prefill |",
        "|---|---|---|",
        *rows,
    ]


def one(case: dict) -> dict:
    if case.get("logits"):
        if case["runtime"] == "llama.cpp":
            return logits_llamacpp(Path(case["gguf"]), Path(case["logits"]))
        return logits_ours(Path(case["model_dir"]), Path(case["logits"]))
    if case["runtime"] == "llama.cpp":
        return time_llamacpp(Path(case["gguf"]))
    return time_ours(Path(case["model_dir"]), case["fmt"])


def check_same_function(f16: Path, model_dir: Path, work: Path, python: str, structure: str) -> dict:
    """Before timing: llama.cpp on the f16 GGUF and sparseinfer on the checkpoint as stored give the prompt the
    same logits (so the GGUF holds the same weights, rope included), and every linear of the checkpoint loads in
    one format at the expected density."""
    theirs, ours = work / f"{f16.stem}.logits-llamacpp.npy", work / f"{model_dir.name}.logits-ours.npy"
    run_case({"runtime": "llama.cpp", "gguf": str(f16), "logits": str(theirs)}, python)
    info = run_case({"runtime": "ours", "model_dir": str(model_dir), "logits": str(ours)}, python)
    a, b = np.load(ours), np.load(theirs)
    err = float(np.abs(a - b).max() / np.abs(b).max())
    if err > SAME_WEIGHTS:
        raise SystemExit(f"{model_dir}: logits differ from llama.cpp's on {f16.name} by {err:.2e} > {SAME_WEIGHTS}")
    lo, hi = info["densities"]
    if len(info["formats"]) != 1 or (structure == "2:4" and not lo == hi == 0.5):
        raise SystemExit(f"{model_dir}: loaded as {info['formats']} at densities {lo}..{hi}")
    info["logits_rel_err"] = err
    print(
        f"check: {model_dir.name} loads as {info['formats'][0]} (density {lo:.3f}..{hi:.3f}), logits within "
        f"{err:.1e} of llama.cpp's on {f16.name}",
        flush=True,
    )
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument(
        "--ct24",
        action="store_true",
        help="compare on the 2:4 checkpoint in the published format (bench/llama_24.py) instead of the f16 copies",
    )
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: sparseinfer with SPARSEINFER_ISA=avx2, against a llama.cpp built for AVX2 only "
        "(--llamacpp-python names its interpreter); writes llamacpp-avx2.md",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sparseinfer-llamacpp")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks")
    ap.add_argument("--llamacpp-python", default=sys.executable, help="interpreter with llama-cpp-python")
    ap.add_argument("--prepare", action="store_true", help="make and check the models, then stop before timing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--version", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    if a.quantize:
        src, out, kind = a.quantize
        print(json.dumps({"path": str(quantize(Path(src), Path(out), kind))}))
        return
    if a.version:
        import llama_cpp

        print(json.dumps({"version": llama_cpp.__version__}))
        return

    import llama_models

    from sparseinfer import kernels

    a.work.mkdir(parents=True, exist_ok=True)
    if a.isa == "avx2":
        os.environ["SPARSEINFER_ISA"] = "avx2"  # the cases' processes inherit it
    # sparseinfer's load cache for this comparison's models, beside them (the cases' processes inherit it).
    os.environ.setdefault("SPARSEINFER_PACK_CACHE", str(a.work / "packed"))
    os.environ.setdefault("SPARSEINFER_PACK_CACHE_GB", "64")
    if a.ct24:
        import llama_24

        dense = sparse = llama_24.checkpoint(a.size, a.work)
        f16 = llama_24.f16_gguf(a.size, a.work)
        stem = f"llama-{a.size}-ct24"
    else:
        dense = llama_models.model_dir(a.size, 0.0)
        sparse = llama_models.model_dir(a.size, a.sparsity)
        f16 = a.work / f"llama-{a.size}-f16.gguf"
        if not f16.exists():
            to_gguf(dense, f16)
        stem = f"llama-{a.size}"
    ggufs = {k: a.work / f"{stem}-{k}.gguf" for k in ("q8_0", "q4_0")}
    for kind, path in ggufs.items():
        if not path.exists():
            harness.run_json([a.llamacpp_python, __file__, "--quantize", str(f16), str(path), kind], what=kind)
    version = harness.run_json([a.llamacpp_python, __file__, "--version"], what="llama.cpp version")["version"]
    check = check_same_function(f16, dense, a.work, a.llamacpp_python, "2:4" if a.ct24 else "dense")

    def ours(model_dir, fmt):
        return {"runtime": "ours", "model_dir": str(model_dir), "fmt": fmt}

    q8 = {"runtime": "llama.cpp", "gguf": str(ggufs["q8_0"])}
    q4 = {"runtime": "llama.cpp", "gguf": str(ggufs["q4_0"])}
    if a.ct24:
        cases = [
            ("llama.cpp Q8_0", q8),
            ("sparseinfer sparse-int8 2:4", ours(sparse, "sparse-int8")),
            ("llama.cpp Q4_0", q4),
            ("sparseinfer sparse-int4 2:4", ours(sparse, "sparse-int4")),
            (f"sparseinfer {check['formats'][0]} 2:4 (as stored)", ours(sparse, None)),
        ]
        intro = (
            f"llama-cpp-python {version} built from source with `-DGGML_NATIVE=ON` and AMX off (its AVX-512 VNNI "
            f"kernels), against sparseinfer on the same random weights in Llama 3.1's configuration, size {a.size} "
            "(bench/llama_models.py; 8b is Llama-3.1-8B's shape): a bf16 2:4 checkpoint in the published format, "
            "compressed-tensors' `sparse-24-bitmask` as compressed-tensors 0.14's own `ModelCompressor` writes it "
            f"(bench/llama_24.py). sparseinfer loads it as stored ({check['formats'][0]}) and packed to sparse-int8 "
            "and sparse-int4; llama.cpp reads the same weights, decompressed by compressed-tensors, as an f16 GGUF "
            "quantized to Q8_0 and Q4_0 (dense: it stores the zeros). Checked first: sparseinfer's logits as stored "
            f"are within {check['logits_rel_err']:.0e} (relative) of llama.cpp's on the f16 GGUF. "
        )
        name = f"llamacpp-{a.size}-24"
    else:
        s = f"{a.sparsity:.0%}"
        cases = [
            ("llama.cpp Q8_0", q8),
            ("sparseinfer dense-int8", ours(dense, "dense-int8")),
            (f"sparseinfer sparse-int8 {s}", ours(sparse, "sparse-int8")),
            ("llama.cpp Q4_0", q4),
            ("sparseinfer dense-int4", ours(dense, "dense-int4")),
            (f"sparseinfer sparse-int4 {s}", ours(sparse, "sparse-int4")),
        ]
        import sparseinfer

        native = sparseinfer.build_info()["isa"]  # the kernels this CPU runs: avx512, avxvnni, avx2, neon
        build = (
            f"`-DGGML_NATIVE=ON` (its kernels for this CPU, on which sparseinfer runs its {native} ones)"
            if a.isa == "native"
            else "`-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF` (its AVX2 "
            "kernels, no AVX-512 or AVX-VNNI)"
        )
        runtime = (
            "sparseinfer" if a.isa == "native" else "sparseinfer forced to its AVX2 kernels (`SPARSEINFER_ISA=avx2`)"
        )
        intro = (
            f"llama-cpp-python {version} built from source with {build}, against {runtime} on the same random "
            f"Llama-shaped {a.size} weights (bench/llama_models.py; the sparse rows use the {s}-sparse copy, which "
            "llama.cpp would read as dense). "
        )
        # llamacpp.md is the AVX-512 machine's; a CPU without AVX-512 writes its own native report beside it.
        name = (
            ("llamacpp" if native == "avx512" else f"llamacpp-native-{native}")
            if a.isa == "native"
            else "llamacpp-avx2"
        )
    if a.prepare:
        return

    def run(case_name, case):
        res = run_case(case, a.llamacpp_python)
        if case["runtime"] == "ours" and a.isa != "native" and res["kernel_isa"] != a.isa:
            raise SystemExit(f"{case_name} ran on {res['kernel_isa']}, not {a.isa}")
        return res

    probe = kernels.BandwidthProbe()
    records = harness.interleave(
        cases,
        a.rounds,
        run,
        probe=lambda: probe.measure(repeats=3),
        log=lambda line: print(line, flush=True),
    )
    rounds = [
        {
            "read_bandwidth_gbs": rec["read_bandwidth_gbs"],
            "order": rec["order"],
            "decode_tok_s": {n: v["tok_s"] for n, v in rec["results"].items()},
            "prefill_tok_s": {n: v["prefill_tok_s"] for n, v in rec["results"].items()},
            "kernel_isa": {n: v.get("kernel_isa", "-") for n, v in rec["results"].items()},
            "load_s": {n: v["load_s"] for n, v in rec["results"].items()},
            "pack_cache": {n: v.get("pack_cache", "-") for n, v in rec["results"].items()},
            "peak_rss_gb": {n: v["peak_rss_gb"] for n, v in rec["results"].items()},
        }
        for rec in records
    ]
    from report_train import cpu_name

    lines = [
        "# llama.cpp against sparseinfer (decode tokens/s)",
        "",
        f"On {cpu_name()} ({os.cpu_count()} cores). "
        + intro
        + "2 threads each, 16-token prompt, 128 new tokens, greedy; best of 2 per process; prefill: one pass "
        f"over a {len(LONG_PROMPT)}-token prompt, best of 2. Every round runs every case once, each in its own "
        "process, in an order rotated round by round (bench/harness.py), with its own bandwidth probe. Made by "
        f"`bench/llamacpp_compare.py{' --ct24 --size ' + a.size if a.ct24 else ''}"
        f"{' --isa ' + a.isa if a.isa != 'native' else ''}`.",
        "",
        "| round | read bandwidth (GB/s) | " + " | ".join(n for n, _ in cases) + " |",
        "|---|---|" + "---|" * len(cases),
    ]
    for i, r in enumerate(rounds):
        lines.append(
            f"| {i + 1} | {r['read_bandwidth_gbs']:.1f} | "
            + " | ".join(f"{r['decode_tok_s'][n]:.2f}" for n, _ in cases)
            + " |"
        )
    med = {n: float(np.median([r["decode_tok_s"][n] for r in rounds])) for n, _ in cases}
    pre = {n: float(np.median([r["prefill_tok_s"][n] for r in rounds])) for n, _ in cases}
    # sparseinfer's first load packs and writes the load cache; later rounds read it (a round's entry says which).
    first_load = {n: rounds[0]["load_s"][n] for n, _ in cases}
    load = {n: float(np.median([r["load_s"][n] for r in rounds[1:] or rounds])) for n, _ in cases}
    rss = {n: max(r["peak_rss_gb"][n] for r in rounds) for n, _ in cases}
    q8, q4 = med["llama.cpp Q8_0"], med["llama.cpp Q4_0"]
    pq8, pq4 = pre["llama.cpp Q8_0"], pre["llama.cpp Q4_0"]
    lines += [
        "",
        "Medians over the rounds, against llama.cpp at the same bit width; load time in the first round (for "
        "sparseinfer: packing from the checkpoint, and writing its load cache) and the median of the later rounds "
        "(sparseinfer: from the load cache), and the process's peak RSS (largest; mapped weight pages count once "
        "touched):",
        "",
        "| case | decode tok/s | vs llama.cpp Q8_0 | vs llama.cpp Q4_0 | prefill tok/s | vs Q8_0 | vs Q4_0 "
        "| first load (s) | later loads (s) | load cache | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {med[n]:.2f} | {med[n] / q8:.2f}x | {med[n] / q4:.2f}x | {pre[n]:.1f} | {pre[n] / pq8:.2f}x | "
        f"{pre[n] / pq4:.2f}x | {first_load[n]:.1f} | {load[n]:.1f} | "
        f"{' / '.join(r.get('pack_cache', {}).get(n, '-') for r in rounds)} | {rss[n]:.1f} |"
        for n, _ in cases
    ]
    lines += paired_lines(rounds, [n for n, _ in cases])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    result = {"cases": [n for n, _ in cases], "check": check, "rounds": rounds}
    (a.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
