"""GGUF import: a tiny Llama written as llama.cpp writes it (q/k rows permuted, Q8_0 tensors) converts back to
a directory whose logits match transformers; and the real default model (SmolLM2-135M) end to end."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import sparseinfer
from sparseinfer import InvalidInputError
from sparseinfer.convert import convert_gguf, unpermute_rope_rows

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
tiny_models = pytest.importorskip("tiny_models")


def permute(w, n_head):
    """llama.cpp's conversion permutation (the inverse of unpermute_rope_rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert np.array_equal(unpermute_rope_rows(permute(w, 6), 6), w)


def write_gguf(ref, path, quantize_mlp: bool, linear_type: str | None = None):
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = json.loads((path.parent / "hf" / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
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
    expected = {}
    for name, p in ref.state_dict().items():
        a = p.detach().numpy().astype(np.float32)
        if name in names:
            g = names[name]
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:]).removesuffix(".weight")
            g = f"blk.{i}.{per_layer[rest]}.weight"
        if "q_proj" in name:
            a = permute(a, cfg.num_attention_heads)
        elif "k_proj" in name:
            a = permute(a, cfg.num_key_value_heads)
        if linear_type and ("mlp" in name or "self_attn" in name):
            qt = gguf.GGMLQuantizationType[linear_type]
            q = gguf.quants.quantize(a, qt)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=qt)
            a = gguf.quants.dequantize(q, qt)
        elif quantize_mlp and "mlp" in name:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            a = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, a)
        expected[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("quantize_mlp", [False, True])
def test_gguf_round_trip_matches_transformers(tmp_path, quantize_mlp):
    ref = tiny_models.build("llama", tmp_path / "hf", scale=3.0, hidden_size=64, intermediate_size=128)
    write_gguf(ref, tmp_path / "m.gguf", quantize_mlp)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    model = sparseinfer.load(out)
    ids = model.encode("Once upon a time there was a tiny model")
    assert ids == sparseinfer.load(tmp_path / "hf").encode("Once upon a time there was a tiny model")
    if quantize_mlp:  # the reference must see the same dequantized Q8_0 weights
        import transformers as tf

        ref = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(model.logits(ids), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_keep_grid_stores_the_gguf_grid_and_runs_on_it(tmp_path, qtype):
    """Linear layers quantized by the gguf package (llama.cpp's reference quantizers) keep their codes, scales and
    minimums: the stored tensors dequantize, as docs/FORMAT.md defines them, to exactly what gguf dequantizes;
    the runtime packs them as stored on that grid; transformers reads the compressed-tensors ones."""
    from safetensors.numpy import load_file

    from sparseinfer.training.compressed import unpack_int4

    ref = tiny_models.build("llama", tmp_path / "hf", scale=3.0, hidden_size=64, intermediate_size=128)
    want = write_gguf(ref, tmp_path / "m.gguf", quantize_mlp=False, linear_type=qtype)
    f32 = convert_gguf(tmp_path / "m.gguf", tmp_path / "f32")
    kept = convert_gguf(tmp_path / "m.gguf", tmp_path / "kept", keep_grid=True)

    t = load_file(kept / "model.safetensors")
    linears = [n.removesuffix(".weight") for n in want if "mlp" in n or "self_attn" in n]
    for m in linears:
        s = t[f"{m}.weight_scale"]
        assert s.dtype == np.float16 and s.shape[1] * 32 == want[f"{m}.weight"].shape[1]
        if qtype == "Q8_0":
            w = t[f"{m}.weight"].astype(np.float32) * np.repeat(s.astype(np.float32), 32, axis=1)
        else:
            codes = unpack_int4(t[f"{m}.weight_packed"], want[f"{m}.weight"].shape[1]).astype(np.float32)
            s32 = np.repeat(s.astype(np.float32), 32, axis=1)
            if qtype == "Q4_1":
                w = s32 * (codes + 8) + np.repeat(t[f"{m}.weight_min"].astype(np.float32), 32, axis=1)
            else:
                w = s32 * codes
        heads = {"q_proj": ref.config.num_attention_heads, "k_proj": ref.config.num_key_value_heads}
        mine = want[f"{m}.weight"]  # as written to the GGUF: q/k rows in llama.cpp's order
        mine = unpermute_rope_rows(mine, heads[m[-6:]]) if m[-6:] in heads else mine
        np.testing.assert_array_equal(w, mine, err_msg=m)
    assert (kept / "model.safetensors").stat().st_size < (f32 / "model.safetensors").stat().st_size / 2
    if qtype == "Q4_0":  # llama.cpp's d = max / -8 is negative wherever a block's largest magnitude is positive
        assert any((t[f"{m}.weight_scale"] < 0).any() for m in linears)

    cfg = json.loads((kept / "config.json").read_text())["quantization_config"]
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        8 if qtype == "Q8_0" else 4,
        32,
        qtype != "Q4_1",
    )
    # The runtime decodes the stored grid to the very values of the float32 conversion...
    dense = sparseinfer.load(f32, weights="dense-f32", pack_cache=False)
    ids = dense.encode("Once upon a time there was a tiny model")
    want_logits = dense.logits(ids)
    decoded = sparseinfer.load(kept, weights="dense-f32", pack_cache=False).logits(ids)
    np.testing.assert_array_equal(decoded, want_logits)
    # ...and, as stored, runs the linear layers on that grid (only the head, int8 as for every quantized
    # checkpoint, and the order of the sums differ).
    model = sparseinfer.load(kept, activations="f32", pack_cache=False)
    layer_formats = {layer["format"] for layer in model.info()["linear"]}
    assert layer_formats == {"dense-int8" if qtype == "Q8_0" else "dense-int4"}, layer_formats
    got = model.logits(ids)
    np.testing.assert_allclose(got, want_logits, atol=2e-2 * np.abs(want_logits).max(), rtol=0)
    # And compressed-tensors' own decompression (through transformers) reads Q4_0 and Q8_0 as the same model;
    # Q4_1's extension is refused by name rather than loaded without its minimums.
    import transformers as tf

    if qtype == "Q4_1":
        assert cfg["format"] == "sparseinfer-pack-quantized-min"
        with pytest.raises(Exception, match="sparseinfer-pack-quantized-min"):
            tf.AutoModelForCausalLM.from_pretrained(kept)
        # The minimums are untrusted input like every tensor: a NaN or a wrong shape is refused by name, and so
        # are minimums the declared format does not have (another reader would run the codes without them) or
        # the format without its minimums.
        from safetensors.numpy import save_file

        name = next(k for k in t if k.endswith(".weight_min"))
        stem = name.removesuffix(".weight_min")
        config = json.loads((kept / "config.json").read_text())

        def write(tensors, **qc):
            save_file(tensors, kept / "model.safetensors")
            c = json.loads(json.dumps(config))
            for k, v in qc.items():
                c["quantization_config"][k] = v
                if k == "format":
                    c["quantization_config"]["config_groups"]["group_0"]["format"] = v
            (kept / "config.json").write_text(json.dumps(c))

        zp = np.zeros(t[name].shape, dtype=np.int8)
        for tensors, qc, match in [
            ({**t, name: np.full_like(t[name], np.nan)}, {}, name),
            ({**t, name: np.ascontiguousarray(t[name][:, :1])}, {}, name),
            (t, {"format": "pack-quantized"}, "needs quantization format"),
            ({k: v for k, v in t.items() if k != name}, {}, f"{name} is missing"),
            ({**t, f"{stem}.weight_zero_point": zp}, {}, "weight_zero_point beside float minimums"),
        ]:
            write(tensors, **qc)
            with pytest.raises(InvalidInputError, match=re.escape(match)):
                sparseinfer.load(kept, pack_cache=False)
        write(t)
        group = config["quantization_config"]["config_groups"]["group_0"]
        group["weights"]["symmetric"] = True
        (kept / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidInputError, match="asymmetric 4-bit codes"):
            sparseinfer.load(kept, pack_cache=False)
        return
    pytest.importorskip("compressed_tensors")
    theirs = tf.AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(got, want_logits, atol=2e-4, rtol=0)


def test_keep_grid_refuses_a_non_finite_block_scale_by_tensor(tmp_path):
    """A Q4_0 block whose f16 scale is NaN: the float conversion would carry it into the weights and the load
    would refuse them; keeping the grid refuses it at the source, naming the tensor, block and row."""
    ref = tiny_models.build("llama", tmp_path / "hf", scale=3.0, hidden_size=64, intermediate_size=128)
    write_gguf(ref, tmp_path / "m.gguf", quantize_mlp=False, linear_type="Q4_0")
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    raw[t.data_offset : t.data_offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match=r"'blk\.1\.ffn_up\.weight': non-finite scale nan in block 0 of row 0"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out", keep_grid=True)
    assert not (tmp_path / "out").exists()


def test_keep_grid_refuses_mixed_or_other_linear_types(tmp_path):
    ref = tiny_models.build("llama", tmp_path / "hf", scale=3.0, hidden_size=64, intermediate_size=128)
    write_gguf(ref, tmp_path / "mixed.gguf", quantize_mlp=True)  # Q8_0 MLP, f32 attention
    with pytest.raises(sparseinfer.UnsupportedError, match="F32, Q8_0"):
        convert_gguf(tmp_path / "mixed.gguf", tmp_path / "out", keep_grid=True)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(InvalidInputError, match="GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a failed conversion must leave nothing behind"


# -- the real default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from sparseinfer import models

    try:
        models.gguf_path()
    except InvalidInputError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SPARSEINFER_CACHE")
    os.environ["SPARSEINFER_CACHE"] = str(cache)
    try:
        yield models.default_model_dir()
    finally:
        if old is None:
            del os.environ["SPARSEINFER_CACHE"]
        else:
            os.environ["SPARSEINFER_CACHE"] = old


def test_default_model_matches_transformers(smollm):
    import transformers as tf

    model = sparseinfer.load(smollm)
    info = model.info()
    assert info["arch"] == "llama" and info["num_layers"] == 30 and info["parameters"] == 134_515_008
    tok = tf.AutoTokenizer.from_pretrained(smollm)
    text = "The capital of France is"
    ids = tok(text)["input_ids"]
    assert ids == model.encode(text)
    ref = tf.AutoModelForCausalLM.from_pretrained(smollm).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
        hf_ids = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    got = model.logits(ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() * 100  # 1e-3 relative to the logit scale
    gen = sparseinfer._core.Generator(model._core, ids, 16)
    ours = [gen.next_token() for _ in range(len(hf_ids))]
    assert ours == hf_ids
    assert "Paris" in model.generate(text, max_new_tokens=8)


def test_default_model_through_load_none(smollm):
    # With SPARSEINFER_CACHE pointing at the converted copy, load(None) reuses it (no second conversion).
    before = os.stat(smollm / "model.safetensors").st_mtime
    model = sparseinfer.load(None)
    assert model.path == smollm and os.stat(smollm / "model.safetensors").st_mtime == before
