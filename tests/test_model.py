"""sparseinfer.load / Model: logits and greedy parity against transformers on tiny random models of every
architecture, sparse and quantized formats against an emulating torch reference, generation API and bad input.
"""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

import sparseinfer
from sparseinfer import InvalidInputError, SparseInferError, UnsupportedError, kernels

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")

# Architecture variants: (model_type, config overrides). Each covers a feature of the Llama family or an
# architecture of its own.
ARCHS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-llama3-rope": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral-sliding-window": ("mistral", dict(sliding_window=16)),
    "qwen2-qkv-bias": ("qwen2", {}),
    "opt": ("opt", {}),
    "gpt2": ("gpt2", {}),
    "mpt-alibi": ("mpt", {}),
    "mpt-6-heads": ("mpt", dict(d_model=96, n_heads=6)),
}
# fp32 logits: the same math in another summation order.
LOGITS_ATOL = 1e-4
PROMPT = [5, 17, 42, 99, 7, 250, 13, 3, 64, 128, 31, 8, 200, 44, 19, 2, 77, 160, 9, 11]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request, tmp_path_factory):
    kind, overrides = ARCHS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_models.build(kind, path, scale=3.0, **overrides)
    return path, ref


def torch_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def torch_greedy(ref, ids, n):
    # No EOS: both sides must produce exactly n tokens.
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def our_greedy(model, ids, n):
    gen = sparseinfer._core.Generator(model._core, ids, n)
    return [gen.next_token() for _ in range(n)]


def test_logits_match_transformers(arch_model):
    path, ref = arch_model
    model = sparseinfer.load(path)
    got = model.logits(PROMPT)
    want = torch_logits(ref, PROMPT)
    assert got.shape == want.shape == (len(PROMPT), tiny_models.VOCAB)
    assert np.abs(want).max() > 0.5, "logits too small to make the comparison meaningful"
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL, rtol=0)


def test_greedy_32_tokens_identical(arch_model):
    path, ref = arch_model
    model = sparseinfer.load(path)
    assert our_greedy(model, PROMPT, 32) == torch_greedy(ref, PROMPT, 32)


def test_long_prompt_prefills_in_chunks(arch_model):
    # Several prefill chunks (32 tokens each, 64 on AVX2, 128 with AMX), and past Mistral's 16-position window.
    path, ref = arch_model
    n = 200
    assert n > sparseinfer.build_info()["prefill_rows"]
    ids = [(i * 37) % tiny_models.VOCAB for i in range(n)]
    got = sparseinfer.load(path).logits(ids)
    np.testing.assert_allclose(got, torch_logits(ref, ids), atol=LOGITS_ATOL, rtol=0)


def test_decode_matches_prefill(arch_model):
    # Logits of a token decoded one at a time equal those of a single prefill over the same sequence.
    path, _ = arch_model
    model = sparseinfer.load(path)
    full = model.logits(PROMPT)
    gen = sparseinfer._core.Generator(model._core, PROMPT[:5], 10, 0.0)
    gen.next_token()
    # Greedy continuation from the full prefix equals argmax of the prefill logits at that position.
    assert gen.next_token() is not None
    assert int(np.argmax(model.logits(PROMPT[:5])[-1])) == int(np.argmax(full[4]))


# int8 keys and values (one scale per position and head) move each by up to half a code step, 0.4 % of the
# head's largest; scores and value sums add up such errors. The budget is the int8 weight formats' (relative to
# the largest logit): an int8 cache costs about what int8 weights cost. f16 moves each value by at most 2^-11 of
# itself, a tenth of int8's step, and gets a tenth of the budget.
KV_BUDGET = {"int8": 2e-2, "f16": 2e-3}


@pytest.mark.parametrize("kv", ["int8", "f16"])
def test_kv_cache_within_budget(arch_model, kv):
    # Against transformers' f32 attention, over a prompt long enough for several prefill chunks and Mistral's
    # window, then decoding token by token from the same cache.
    path, ref = arch_model
    model = sparseinfer.load(path, kv_cache=kv)
    assert model.info()["kv_cache"] == kv and sparseinfer.load(path).info()["kv_cache"] == "f32"
    ids = [(i * 37) % tiny_models.VOCAB for i in range(200)]
    want = torch_logits(ref, ids)
    err = np.abs(model.logits(ids) - want).max() / np.abs(want).max()
    assert err <= KV_BUDGET[kv], f"relative logit error {err:.2e}"
    gen = sparseinfer._core.Generator(model._core, ids[:150], 8)
    steps = [gen.next_token() for _ in range(8)]
    assert all(t is not None for t in steps)
    # The first decoded token's logits came from the cache of the 150-token prefill: greedy equals the argmax
    # wherever transformers' top two logits are not within the budget of each other.
    top2 = np.sort(want[149])[-2:]
    if top2[1] - top2[0] > 2 * KV_BUDGET[kv] * np.abs(want).max():
        assert steps[0] == int(np.argmax(want[149]))


def test_kv_cache_defaults_to_f16_where_linears_take_int8_activations(llama_dir):
    # The int8 activations' own rounding is far coarser than a half's; f32 activations keep f32 attention.
    kv = {
        (w, a): sparseinfer.load(llama_dir, weights=w, activations=a, pack_cache=False).info()["kv_cache"]
        for w, a in [(None, None), ("dense-int8", None), ("sparse-int4", None), ("dense-int8", "f32")]
    }
    assert kv == {
        (None, None): "f32",
        ("dense-int8", None): "f16",
        ("sparse-int4", None): "f16",
        ("dense-int8", "f32"): "f32",
    }
    assert sparseinfer.load(llama_dir, weights="dense-int8", kv_cache="f32").info()["kv_cache"] == "f32"


def test_kv_cache_rejects_unknown_formats(llama_dir):
    with pytest.raises(InvalidInputError, match="kv_cache"):
        sparseinfer.load(llama_dir, kv_cache="int4")


# -- sparse and quantized formats ---------------------------------------------------------------------


def emulate(ref, fmt, token=False, group_size=None, asymmetric=False):
    """`ref` with every linear weight replaced by its packed-and-dequantized value (the head as dense-int8 /
    bf16 / f32, as the runtime plans it) and, for integer formats, int8 block-quantized linear inputs (one
    scale per token with `token`). `group_size` applies to every integer layer, `asymmetric` to the int4 ones
    (the head is int8), as `load` does. Its attention runs in f32, so the loads compared with it closely keep an
    f32 cache: an f16 one's rounding, amplified by the int8 activations downstream, uses much of the budget on
    these sharp-attention logits (test_sparse_formats_within_budget holds the default to it)."""
    import copy

    emu = copy.deepcopy(ref)
    head_fmt = {"f32": "dense-f32", "bf16": "dense-bf16"}.get(fmt.split("-")[1], "dense-int8")
    hooks = []
    for name, mod in emu.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        f = head_fmt if name.endswith("lm_head") else fmt
        w = mod.weight.detach().numpy().astype(np.float32)
        opts = {"group_size": group_size, "asymmetric": asymmetric and "int4" in f} if "int" in f else {}
        mod.weight.data = torch.from_numpy(kernels.pack(np.ascontiguousarray(w), f, **opts).to_dense())
        if "int" in f:
            hooks.append(
                mod.register_forward_pre_hook(lambda m, args: (tiny_models.block_quantize_acts(args[0], token),))
            )
    return emu


# Worst logit error, relative to the largest reference logit, against the emulating reference. f32 and bf16
# weights are exact up to summation order; integer paths may flip an activation code that sits on a rounding
# boundary, and that flip propagates through the blocks.
FORMAT_BUDGET = {"sparse-f32": 1e-5, "sparse-bf16": 1e-5, "sparse-int8": 2e-2, "sparse-int4": 2e-2}


@pytest.fixture(scope="module")
def sparse_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse-llama")
    ref = tiny_models.build("llama", path, scale=3.0, sparsity=0.7, hidden_size=128, intermediate_size=256)
    return path, ref


@pytest.mark.parametrize("fmt", sorted(FORMAT_BUDGET))
def test_sparse_formats_within_budget(sparse_llama, fmt):
    path, ref = sparse_llama
    model = sparseinfer.load(path, weights=fmt, kv_cache="f32")
    info = model.info()
    assert {layer["format"] for layer in info["linear"]} == {fmt}
    # 70 % of each matrix was pruned; the runtime must see at most 30 % density everywhere.
    assert max(layer["density"] for layer in info["linear"]) <= 0.301
    got = model.logits(PROMPT)
    want = torch_logits(emulate(ref, fmt), PROMPT)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= FORMAT_BUDGET[fmt], f"{fmt}: relative logit error {err:.2e}"
    # The default cache (f16 for the int8-activation formats) stays within the format's budget too.
    default = sparseinfer.load(path, weights=fmt)
    err = np.abs(default.logits(PROMPT) - want).max() / np.abs(want).max()
    assert err <= FORMAT_BUDGET[fmt], f"{fmt}, {default.info()['kv_cache']} cache: relative logit error {err:.2e}"
    # And the format stays close to the unquantized model: it is still the same model.
    dense = torch_logits(ref, PROMPT)
    assert np.corrcoef(got.ravel(), dense.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("fmt", ["sparse-int8", "sparse-int4", "dense-int8"])
def test_int8_token_activations_within_budget(sparse_llama, fmt):
    path, ref = sparse_llama
    model = sparseinfer.load(path, weights=fmt, activations="int8-token", kv_cache="f32")
    info = model.info()
    assert info["activations"] == "int8-token"
    if "avx512vnni" in info["kernel"]:
        assert info["kernel"].startswith(fmt.replace("-", "_") + "_i8_token")
    got = model.logits(PROMPT)
    want = torch_logits(emulate(ref, fmt, token=True), PROMPT)
    assert np.abs(got - want).max() / np.abs(want).max() <= FORMAT_BUDGET["sparse-int8"]
    # Per-token scales are a different emulation: the block one must not match as well.
    block = torch_logits(emulate(ref, fmt), PROMPT)
    assert np.abs(got - want).max() < np.abs(got - block).max()
    with pytest.raises(InvalidInputError, match="activations"):
        sparseinfer.load(path, weights=fmt, activations="int4")


@pytest.mark.parametrize("fmt", ["dense-int8", "dense-int4", "dense-bf16"])
def test_dense_quantized_formats_within_budget(sparse_llama, fmt):
    path, ref = sparse_llama
    got = sparseinfer.load(path, weights=fmt, kv_cache="f32").logits(PROMPT)
    want = torch_logits(emulate(ref, fmt), PROMPT)
    assert np.abs(got - want).max() / np.abs(want).max() <= FORMAT_BUDGET["sparse-int8"]


@pytest.mark.parametrize("fmt", ["dense-int4", "sparse-int4"])
def test_asymmetric_int4_at_load_within_budget(sparse_llama, fmt):
    path, ref = sparse_llama
    model = sparseinfer.load(path, weights=fmt, asymmetric=True, group_size=32, kv_cache="f32")
    assert model.info()["lm_head_format"] == "dense-int8"  # symmetric: asymmetry is an int4 grid
    got = model.logits(PROMPT)
    want = torch_logits(emulate(ref, fmt, group_size=32, asymmetric=True), PROMPT)
    assert np.abs(got - want).max() / np.abs(want).max() <= FORMAT_BUDGET["sparse-int4"]
    for weights in ("sparse-int8", "dense-bf16", None):
        with pytest.raises(InvalidInputError, match="asymmetric"):
            sparseinfer.load(path, weights=weights, asymmetric=True)


def test_bytes_per_token_shrink_with_sparsity(sparse_llama):
    path, _ = sparse_llama
    sizes = {f: sparseinfer.load(path, weights=f).info()["bytes_per_token"] for f in ("dense-f32", "sparse-int8")}
    assert sizes["sparse-int8"] < sizes["dense-f32"] / 3


# -- generation API -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-gen")
    # No EOS token, so generations run to max_new_tokens unless a test sets one.
    tiny_models.build("llama", path, scale=3.0, eos_token_id=None)
    return path


def test_generate_text_and_stream_agree(llama_dir):
    model = sparseinfer.load(llama_dir)
    text = model.generate("Once upon a time", max_new_tokens=20)
    pieces = list(model.stream("Once upon a time", max_new_tokens=20))
    assert "".join(pieces) == text
    assert model.last_stats.new_tokens == 20 and model.last_stats.finish_reason == "length"
    assert text == sparseinfer.generate(llama_dir, "Once upon a time", max_new_tokens=20)
    # Load options pass through generate() to load().
    tok = sparseinfer.load(llama_dir, weights="sparse-int8", activations="int8-token")
    want = tok.generate("Once upon a time", max_new_tokens=8)
    kw = dict(weights="sparse-int8", activations="int8-token", max_new_tokens=8)
    assert sparseinfer.generate(llama_dir, "Once upon a time", **kw) == want
    # Greedy text equals decoding the greedy ids.
    ids = model.encode("Once upon a time")
    assert text == model.decode(our_greedy(model, ids, 20))


def test_sampling_is_seeded(llama_dir):
    model = sparseinfer.load(llama_dir)
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    a, b = model.generate("The quick", **kw), model.generate("The quick", **kw)
    assert a == b
    others = {model.generate("The quick", **{**kw, "seed": s}) for s in range(5)}
    assert len(others) > 1, "different seeds should give different samples at temperature 1"


def test_stop_strings_and_eos(llama_dir):
    model = sparseinfer.load(llama_dir)
    full = model.generate("Sparse", max_new_tokens=30)
    assert len(full) > 4
    stop = full[2:4]
    cut = model.generate("Sparse", max_new_tokens=30, stop=[stop])
    assert cut == full[: full.find(stop)] and model.last_stats.finish_reason == "stop"
    # Make the first greedy token an EOS token: generation ends at once with no text.
    first = our_greedy(model, model.encode("Sparse"), 1)[0]
    model.eos_token_ids = frozenset({first})
    assert model.generate("Sparse", max_new_tokens=30) == ""
    assert model.last_stats.finish_reason == "eos"


def test_zero_new_tokens_and_context_limit(llama_dir):
    model = sparseinfer.load(llama_dir)
    assert model.generate("Once", max_new_tokens=0) == ""
    # The context is 256 positions: generation stops there rather than failing. 250 prompt tokens leave 6
    # positions to decode into, and the token predicted at the last position is the 7th.
    ids = [3] * 250
    out = "".join(model.stream(ids, max_new_tokens=50))
    assert model.last_stats.finish_reason == "context" and model.last_stats.new_tokens == 7
    assert out
    with pytest.raises(InvalidInputError, match="context"):
        model.generate([3] * 256, max_new_tokens=1)


def test_interleaved_streams_keep_their_own_stats(llama_dir):
    model = sparseinfer.load(llama_dir)
    prompt = "Once upon a time"
    want = model.generate(prompt, max_new_tokens=12)
    a = model.stream(prompt, max_new_tokens=12)
    b = model.stream([3] * 250, max_new_tokens=50)  # ends at the context after 7 tokens
    got = [next(a), next(a)]
    assert list(b) and b.stats.finish_reason == "context" and b.stats.new_tokens == 7
    assert b.stats.prompt_tokens == 250
    assert model.last_stats is b.stats  # b finished; a has not
    got += list(a)
    assert "".join(got) == want
    assert a.stats.new_tokens == 12 and a.stats.finish_reason == "length"
    assert a.stats.prompt_tokens == len(model.encode(prompt)) and a.stats.decode_tokens == 11
    assert model.last_stats is a.stats  # the call that finished last
    assert b.stats.finish_reason == "context" and b.stats.new_tokens == 7  # untouched by a
    # A stream closed early publishes its own stats when it is closed; one never started publishes nothing.
    c = model.stream(prompt, max_new_tokens=30, stop=["\x00never"])
    d = model.stream(prompt, max_new_tokens=5)
    next(c)
    c.close()
    assert model.last_stats is c.stats and 1 <= c.stats.new_tokens < 30
    d.close()
    assert model.last_stats is c.stats
    # generate() and generate_ids() also leave their own stats in last_stats.
    model.generate_ids(prompt, max_new_tokens=3)
    assert model.last_stats.new_tokens == 3 and model.last_stats is not c.stats


def test_two_threads_two_models(llama_dir):
    models = [sparseinfer.load(llama_dir), sparseinfer.load(llama_dir, weights="sparse-int8")]
    want = [m.generate("To be", max_new_tokens=16) for m in models]
    got = [None, None]

    def run(i):
        for _ in range(3):
            got[i] = models[i].generate("To be", max_new_tokens=16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert got == want


def test_info_describes_the_model(llama_dir):
    info = sparseinfer.load(llama_dir, weights="dense-int8").info()
    assert info["arch"] == "llama" and info["num_layers"] == 3 and info["num_kv_heads"] == 2
    assert info["format"] == "dense-int8" and info["lm_head_format"] == "dense-int8"
    assert len(info["linear"]) == 3 * 4 and info["isa"] in sparseinfer.build_info()["available_isas"]
    assert info["parameters"] > 0 and info["bytes_per_token"] > 0


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        [],
        [tiny_models.VOCAB],
        [-1],
        "x",
    ],
)
def test_bad_prompts(llama_dir, bad):
    model = sparseinfer.load(llama_dir)
    if bad == "x":
        with pytest.raises(InvalidInputError):
            model.generate("x", max_new_tokens=-1)
        with pytest.raises(InvalidInputError):
            model.generate("x", temperature=-1.0)
        with pytest.raises(InvalidInputError):
            model.generate("x", top_p=1.5)
        return
    with pytest.raises(InvalidInputError):
        model.generate(bad, max_new_tokens=4)


def test_missing_and_unsupported(tmp_path, llama_dir):
    with pytest.raises(InvalidInputError, match="does not exist"):
        sparseinfer.load(tmp_path / "nope")
    with pytest.raises(SparseInferError, match="config.json"):
        sparseinfer.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedError, match="llama"):
        sparseinfer.load(tmp_path)
    with pytest.raises(InvalidInputError, match="format"):
        sparseinfer.load(llama_dir, weights="sparse-int3")


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_corrupt_checkpoints(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    st = d / "model.safetensors"
    good = st.read_bytes()
    cases = {
        "truncated": lambda: st.write_bytes(good[: len(good) // 2]),
        "garbage": lambda: st.write_bytes(b"\xff" * 64),
        "tiny": lambda: st.write_bytes(b"abc"),
        "shape lie": lambda: rewrite_header(
            st, lambda h: h["model.norm.weight"].__setitem__("shape", [h["model.norm.weight"]["shape"][0] * 2])
        ),
        "missing tensor": lambda: rewrite_header(st, lambda h: h.pop("model.layers.1.mlp.up_proj.weight")),
        "bad dtype": lambda: rewrite_header(st, lambda h: h["model.norm.weight"].__setitem__("dtype", "F8")),
        "config lies": lambda: (d / "config.json").write_text(
            json.dumps({**json.loads((llama_dir / "config.json").read_text()), "hidden_size": 96})
        ),
        "bad json": lambda: (d / "config.json").write_text("{"),
    }
    for name, corrupt in cases.items():
        st.write_bytes(good)
        (d / "config.json").write_text((llama_dir / "config.json").read_text())
        corrupt()
        with pytest.raises(InvalidInputError) as e:
            sparseinfer.load(d)
        assert str(e.value), name


def test_nan_weights_rejected(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    d = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.nan
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(InvalidInputError, match="non-finite"):
        sparseinfer.load(d)


def test_no_tokenizer_means_ids_only(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    model = sparseinfer.load(d)
    assert model.logits([1, 2, 3]).shape == (3, tiny_models.VOCAB)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        model.generate("hello")
