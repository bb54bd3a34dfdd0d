"""Encoder-decoder benchmark: T5 translation and Whisper speech shapes, transformers fp32 against sparseinfer in
dense and sparse integer formats, one run.

Random-weight models of the released shapes (t5-small, t5-base, whisper-base, whisper-small), sparse variants
with a random fraction of every linear weight inside the blocks zeroed (random masks cost the kernels what
trained ones do). Batch 1, the kernels' thread count (2 here) on both sides, greedy, no EOS. One example is a
64-token encoder input (T5) or 30 s of audio features (Whisper, 3000 frames), then 64 decoder tokens. Each case
records the encoder time, decoder tokens/s after the first, the end-to-end time of the example, bytes read per
decoded token (decoder linear layers and head, plus the cross-attention keys and values every step reads) and
the GB/s that implies against the read bandwidth measured in the same run. transformers decodes with its KV
cache (encoder once, then one token per call), as its ``generate`` does.

    make bench-seq2seq   # JSON in bench/results/, table and plot in docs/benchmarks/

With timing disabled (`make test`), tiny shapes run 4 tokens per case as a smoke test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import sparseinfer
from conftest import cpu_details
from sparseinfer import _core, kernels

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

ENCODER_TOKENS = 64
NEW_TOKENS = 64
SHAPES = {
    "t5-smoke": dict(kind="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=512),
    "t5-small": dict(kind="t5", d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, vocab_size=32128),
    "t5-base": dict(kind="t5", d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128),
    "whisper-smoke": dict(
        kind="whisper", d_model=64, layers=2, heads=4, ffn=128, vocab_size=512, num_mel_bins=80, positions=1500
    ),
    "whisper-base": dict(
        kind="whisper", d_model=512, layers=6, heads=8, ffn=2048, vocab_size=51865, num_mel_bins=80, positions=1500
    ),
    "whisper-small": dict(
        kind="whisper", d_model=768, layers=12, heads=12, ffn=3072, vocab_size=51865, num_mel_bins=80, positions=1500
    ),
}
FULL = ["t5-small", "t5-base", "whisper-base", "whisper-small"]
OURS = [("dense-f32", 0.0), ("dense-int8", 0.0), ("dense-int4", 0.0)]
OURS += [("sparse-int8", s) for s in (0.5, 0.7, 0.8)] + [("sparse-int4", 0.7)]
CASES = [("transformers", "fp32", 0.0)] + [("sparseinfer", f, s) for f, s in OURS]


def config(shape: str):
    c = dict(SHAPES[shape])
    kind = c.pop("kind")
    if kind == "t5":
        # The original T5: ReLU MLP, tied and scaled head.
        return tf.T5Config(**c, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.WhisperConfig(
        d_model=c["d_model"],
        encoder_layers=c["layers"],
        decoder_layers=c["layers"],
        encoder_attention_heads=c["heads"],
        decoder_attention_heads=c["heads"],
        encoder_ffn_dim=c["ffn"],
        decoder_ffn_dim=c["ffn"],
        vocab_size=c["vocab_size"],
        num_mel_bins=c["num_mel_bins"],
        max_source_positions=c["positions"],
        max_target_positions=448,
        decoder_start_token_id=min(50258, c["vocab_size"] - 1),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )


def model_dir(shape: str, sparsity: float) -> Path:
    """The cached checkpoint of `shape` at `sparsity` (block linears only), built on first use."""
    from sparseinfer.models import cache_dir

    root = Path(os.environ.get("SPARSEINFER_BENCH_MODELS", cache_dir() / "bench-models"))
    out = root / f"{shape}-s{round(sparsity * 100):02d}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    auto = tf.AutoModelForSeq2SeqLM if shape.startswith("t5") else tf.AutoModelForSpeechSeq2Seq
    model = auto.from_config(config(shape)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sparsity > 0 and p.dim() == 2 and (".layers." in name or ".block." in name):
                p.mul_(torch.rand(p.shape, generator=gen) >= sparsity)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def encoder_input(shape: str, vocab: int):
    rng = np.random.default_rng(0)
    if shape.startswith("t5"):
        return [int(t) for t in rng.integers(2, vocab, ENCODER_TOKENS)]
    # Whisper's 30 s of features: log-mel values lie in about [-1, 1.5].
    return rng.uniform(-1.0, 1.5, (SHAPES[shape]["num_mel_bins"], 2 * SHAPES[shape]["positions"])).astype(np.float32)


def decoder_bytes(model) -> int:
    """Bytes transformers reads per decoded token: the decoder's parameters and the head, fp32."""
    dec = sum(p.numel() for n, p in model.named_parameters() if "decoder" in n and "embed" not in n)
    return 4 * (dec + model.get_output_embeddings().weight.numel())


def cross_kv_bytes(model) -> int:
    """Bytes of fp32 cross-attention keys and values transformers reads per decoded token: every decoder layer's
    keys and values at every encoder position."""
    c = model.config
    if c.model_type == "t5":
        return 4 * 2 * c.num_decoder_layers * ENCODER_TOKENS * c.num_heads * c.d_kv
    return 4 * 2 * c.decoder_layers * c.max_source_positions * c.d_model


def run_transformers(shape: str, path: Path, new_tokens: int) -> dict:
    torch.set_num_threads(kernels.num_threads())
    auto = tf.AutoModelForSeq2SeqLM if shape.startswith("t5") else tf.AutoModelForSpeechSeq2Seq
    model = auto.from_pretrained(path, dtype=torch.float32).eval()
    x = encoder_input(shape, model.config.vocab_size)
    kw = {"input_ids": torch.tensor([x])} if shape.startswith("t5") else {"input_features": torch.from_numpy(x)[None]}
    start = model.config.decoder_start_token_id

    def example(n):
        with torch.no_grad():
            t0 = time.perf_counter()
            enc = model.get_encoder()(**kw)
            t_enc = time.perf_counter() - t0
            tok, past, steps = torch.tensor([[start]]), None, []
            for _ in range(n):
                t = time.perf_counter()
                out = model(encoder_outputs=enc, decoder_input_ids=tok, cache=past, use_cache=True)
                past = out.cache if "cache" in out else out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - t)
        return t_enc, steps, time.perf_counter() - t0

    example(2)  # warm up
    # The best of two examples, as for sparseinfer.
    t_enc, steps, total = min((example(new_tokens) for _ in range(2)), key=lambda r: r[2])
    return {
        "encoder_s": t_enc,
        "decode_tok_s": (len(steps) - 1) / sum(steps[1:]),
        "example_s": total,
        "bytes_per_token": decoder_bytes(model),
        "cross_kv_bytes": cross_kv_bytes(model),
    }


def run_ours(shape: str, path: Path, fmt: str, new_tokens: int) -> dict:
    model = sparseinfer.load(path, weights=fmt)
    info = model.info()
    x = encoder_input(shape, info["vocab_size"])

    def example(n):
        t0 = time.perf_counter()
        gen = _core.Generator(model._core, x, n)
        for _ in range(n):
            assert gen.next_token() is not None
        return gen.stats(), time.perf_counter() - t0

    example(2)  # warm up: page in the weights
    best = None
    for _ in range(2):
        st, total = example(new_tokens)
        if best is None or total < best[1]:
            best = (st, total)
    st, total = best
    enc_s = _time_encoder(model, x)
    return {
        "encoder_s": enc_s,
        "decode_tok_s": st["decode_tokens"] / st["decode_s"],
        "example_s": total,
        "bytes_per_token": info["bytes_per_token"],
        "cross_kv_bytes": st["cross_kv_bytes"],
        "encoder_bytes": info["encoder_bytes"],
        "kernel": info["kernel"],
        "activations": info["activations"],
    }


def _time_encoder(model, x) -> float:
    t = time.perf_counter()
    model.encoder_hidden_states(x)
    return time.perf_counter() - t


@pytest.mark.parametrize("runtime,fmt,sparsity", CASES, ids=[f"{r}-{f}-{s:.0%}" for r, f, s in CASES])
@pytest.mark.parametrize("shape", FULL)
def test_seq2seq(benchmark, read_bandwidth, shape, runtime, fmt, sparsity):
    disabled = benchmark.disabled
    if disabled and shape not in ("t5-small", "whisper-base"):
        pytest.skip("smoke runs cover one shape of each kind")
    if disabled and (runtime, fmt, sparsity) not in (CASES[0], ("sparseinfer", "sparse-int8", 0.7)):
        pytest.skip("smoke runs cover transformers and one sparse format")
    size = shape.split("-")[0] + "-smoke" if disabled else shape
    new_tokens = 4 if disabled else NEW_TOKENS
    path = model_dir(size, sparsity)
    if runtime == "transformers":
        result = run_transformers(size, path, new_tokens)
    else:
        result = run_ours(size, path, fmt, new_tokens)
    gbs = (result["bytes_per_token"] + result["cross_kv_bytes"]) * result["decode_tok_s"] / 1e9
    benchmark.group = f"seq2seq {size}"
    benchmark.extra_info.update(
        shape=size,
        runtime=runtime,
        format=fmt,
        sparsity=sparsity,
        encoder_input=ENCODER_TOKENS if size.startswith("t5") else "30 s (3000 frames)",
        new_tokens=new_tokens,
        gbs=gbs,
        fraction_of_bandwidth=gbs / read_bandwidth,
        read_bandwidth_gbs=read_bandwidth,
        threads=kernels.num_threads(),
        isa=sparseinfer.build_info()["isa"],
        cpu=cpu_details(),
        **result,
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert result["decode_tok_s"] > 0 and result["encoder_s"] > 0
