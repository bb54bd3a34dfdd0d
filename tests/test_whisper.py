"""Whisper in the runtime: the numpy log-mel front end against transformers' WhisperFeatureExtractor (on
speech from espeak-ng when it is installed, and on a synthetic signal), encoder outputs, decoder logits and
greedy tokens against transformers on tiny random models, the decoder prompt (language, task, no timestamps,
language detection, suppressed tokens) against transformers' generate(), long audio in windows, sparse and
quantized weights, the training side's export, the CLI, WAV files, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import wave

import numpy as np
import pytest

import sparseinfer
from sparseinfer import InvalidInputError, UnsupportedError
from sparseinfer.audio import FeatureConfig, log_mel, read_wav, resample

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tiny_models = pytest.importorskip("tiny_models")

# fp32 in another summation order: within 1e-4 of the largest |value|.
REL = 1e-4
# transformers takes its float32 torch STFT path, ours is float64: they differ by float32 rounding.
FEATURE_ATOL = 1e-4
MEL = 16
FRAMES = 32  # 2 x max_source_positions of the tiny config
RATE = 16000


def speech(text: str = "The quick brown fox jumps over the lazy dog.") -> tuple[np.ndarray, int] | None:
    """Speech from espeak-ng (22050 Hz 16-bit WAV), or None when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/s.wav"
        subprocess.run([exe, "-w", path, text], check=True, capture_output=True)
        return read_wav(path)


def synthetic(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A chirp plus noise: energy across the mel range."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.02 * np.random.default_rng(seed).standard_normal(len(t))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    # Scaled weights: at scale 1 a random decoder repeats one token forever.
    ref = tiny_models.build("whisper", path, scale=5.0)
    return path, ref


def features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((MEL, FRAMES)).astype(np.float32)


def hf_generate(ref, feats, n, prompt=1, **kw):
    """transformers' generate(): the generated ids after the decoder prompt of ``prompt`` tokens, up to (not
    with) EOS. (The raw sequences: its default output also drops tokens it takes for timestamps.)"""
    transformers.logging.set_verbosity_error()
    with torch.no_grad():
        out = ref.generate(
            input_features=torch.from_numpy(feats)[None], max_new_tokens=n, return_dict_in_generate=True, **kw
        )
    ids = out["sequences"][0].tolist()[prompt:]
    return ids[: ids.index(1)] if 1 in ids else ids


# -- the front end -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    clips = [synthetic(7.5)]
    s = speech()
    if s is not None:
        clips.append(resample(*s, RATE))
    for clip in clips:
        want = fe(clip, sampling_rate=RATE, return_tensors="np").input_features[0]
        got = log_mel(clip, FeatureConfig(n_mels=n_mels), 3000)
        assert got.shape == want.shape == (n_mels, 3000)
        np.testing.assert_allclose(got, want, atol=FEATURE_ATOL, rtol=0)


def test_speech_is_available_where_ci_installs_it():
    # .ci/run installs espeak-ng (make setup-audio) and sets this; elsewhere the speech clip is optional.
    import os

    if os.environ.get("SPARSEINFER_REQUIRE_SPEECH") and speech() is None:
        pytest.fail("espeak-ng is missing: the front end was tested on a synthetic signal only")


def test_resample_keeps_a_tone():
    rate = 22050
    t = np.arange(rate) / rate
    x = np.sin(2 * np.pi * 441 * t).astype(np.float32)  # a whole number of periods: no edge effect
    y = resample(x, rate, RATE)
    assert len(y) == RATE
    want = np.sin(2 * np.pi * 441 * np.arange(RATE) / RATE)
    np.testing.assert_allclose(y, want, atol=1e-4)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_reader_reads_what_the_wave_module_writes(tmp_path, width):
    rng = np.random.default_rng(width)
    x = rng.uniform(-0.9, 0.9, (500, 2))
    scale = float(1 << (8 * width - 1))
    if width == 1:
        codes = np.round(x * 127 + 128).astype(np.uint8)
        raw = codes.tobytes()
    else:
        ints = np.round(x * (scale - 1)).astype(np.int64)
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.ravel())
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw)
    got, rate = read_wav(path)
    assert rate == 8000 and got.shape == (500,)
    np.testing.assert_allclose(got, x.mean(axis=1), atol=2.0 / 127 if width == 1 else 1e-4)


def test_bad_wav_files_are_clear_errors(tmp_path):
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(InvalidInputError, match="not a WAV file"):
        read_wav(tmp_path / "text.wav")
    with pytest.raises(InvalidInputError, match="cannot be read|not a regular file"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        read_wav(tmp_path)
    header = b"RIFF" + (36).to_bytes(4, "little") + b"WAVE"
    fmt = b"fmt " + (16).to_bytes(4, "little") + (7).to_bytes(2, "little") + bytes(14)
    (tmp_path / "alaw.wav").write_bytes(header + fmt + b"data" + (4).to_bytes(4, "little") + bytes(4))
    with pytest.raises(InvalidInputError, match="not supported|channels"):
        read_wav(tmp_path / "alaw.wav")


# -- the model ---------------------------------------------------------------------------------------------


def test_encoder_and_decoder_match_transformers(whisper):
    path, ref = whisper
    model = sparseinfer.load(path)
    assert model.encoder_decoder and model.reads_audio
    feats = features()
    # More than one prefill step on every path (32, 64 or 128 tokens).
    dec = [0] + [(i * 53 + 11) % tiny_models.VOCAB for i in range(140)]
    assert len(dec) > sparseinfer.build_info()["prefill_rows"]
    with torch.no_grad():
        out = ref(input_features=torch.from_numpy(feats)[None], decoder_input_ids=torch.tensor([dec]))
    want_enc, want = out.encoder_last_hidden_state[0].numpy(), out.logits[0].numpy()
    got_enc = model.encoder_hidden_states(feats)
    assert got_enc.shape == want_enc.shape == (FRAMES // 2, 64)
    np.testing.assert_allclose(got_enc, want_enc, atol=REL * np.abs(want_enc).max(), rtol=0)
    got = model.logits(feats, dec)
    assert got.shape == want.shape == (len(dec), tiny_models.VOCAB)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=REL * np.abs(want).max(), rtol=0)


def test_sinusoidal_positions_are_computed_when_not_stored(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = tiny_models.build("whisper", tmp_path)  # scale 1: the table is the sinusoids transformers sets
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.encoder.embed_positions.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    feats = features(1)
    with torch.no_grad():
        want = ref.model.encoder(torch.from_numpy(feats)[None]).last_hidden_state[0].numpy()
    got = sparseinfer.load(tmp_path).encoder_hidden_states(feats)
    np.testing.assert_allclose(got, want, atol=REL * np.abs(want).max(), rtol=0)


def test_greedy_tokens_identical_to_transformers_generate(whisper):
    path, ref = whisper
    model = sparseinfer.load(path)
    clip = synthetic(FRAMES * 160 / RATE)
    (feats,) = model.features(clip)
    # transformers' generate() applies the saved generation config (begin_suppress_tokens: 220 is in this
    # vocabulary).
    want = hf_generate(ref, feats, 24)
    assert len(set(want)) > 2, f"a near-constant reference makes a weak test: {want}"
    assert model.transcribe(clip, return_ids=True, max_new_tokens=24) == want
    assert model.last_stats.prompt_tokens == FRAMES // 2
    assert isinstance(model.transcribe(clip, max_new_tokens=24), str)


def _multilingual(src, dst):
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.pop("_from_model_config", None)  # else transformers drops the keys below as not the model config's
    gen.update(
        is_multilingual=True,
        lang_to_id={"<|en|>": 5, "<|de|>": 6, "<|fr|>": 7},
        task_to_id={"transcribe": 8, "translate": 9},
        no_timestamps_token_id=10,
        suppress_tokens=[11, 12],
    )
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def test_language_task_and_detection_as_transformers_does(whisper, tmp_path):
    path, ref = whisper
    mpath = _multilingual(path, tmp_path / "multi")
    ref.generation_config = transformers.GenerationConfig.from_pretrained(mpath)
    model = sparseinfer.load(mpath)
    clip = synthetic(FRAMES * 160 / RATE, seed=3)
    (feats,) = model.features(clip)
    # A given language and task: the prompt is <sot> <|fr|> <|transcribe|> <|notimestamps|>.
    want = hf_generate(ref, feats, 16, prompt=4, language="fr", task="transcribe")
    assert len(set(want)) > 1, want
    assert model.transcribe(clip, task="transcribe", language="fr", return_ids=True, max_new_tokens=16) == want
    assert model.transcribe(clip, language="<|fr|>", return_ids=True, max_new_tokens=16) == want
    # No language: the most likely language token after <sot> (transformers' detect_language), then the task.
    with torch.no_grad():
        (lang,) = ref.detect_language(input_features=torch.from_numpy(feats)[None]).tolist()
    want = hf_generate(ref, feats, 16, prompt=4, task="transcribe")
    assert len(set(want)) > 2, want
    assert model.transcribe(clip, task="transcribe", return_ids=True, max_new_tokens=16) == want
    assert model.last_stats.extra["language"] == model.tokenizer.id_to_token(lang).strip("<|>")
    want = hf_generate(ref, feats, 16, prompt=4, task="translate")
    assert model.transcribe(clip, task="translate", return_ids=True, max_new_tokens=16) == want
    # The generation config's language and task are the defaults, as transformers takes them.
    cfg = json.loads((mpath / "generation_config.json").read_text())
    (mpath / "generation_config.json").write_text(json.dumps({**cfg, "language": "fr", "task": "transcribe"}))
    want = hf_generate(ref, feats, 16, prompt=4, language="fr", task="transcribe")
    assert sparseinfer.load(mpath).transcribe(clip, return_ids=True, max_new_tokens=16) == want
    (mpath / "generation_config.json").write_text(json.dumps(cfg))
    gen = sparseinfer._core.Generator(model._core, feats, 4, decoder_prompt=[0], suppress_tokens=[11, 12])
    assert gen.choose([5, 6, 7]) == lang
    with pytest.raises(InvalidInputError, match="not one of this model's: de, en, fr"):
        model.transcribe(clip, language="xx")
    with pytest.raises(InvalidInputError, match="task must be one of"):
        model.transcribe(clip, task="summarize")
    with pytest.raises(InvalidInputError, match="English-only"):
        sparseinfer.load(path).transcribe(clip, task="translate")


def test_long_audio_runs_in_windows(whisper):
    path, _ = whisper
    model = sparseinfer.load(path)
    n = FRAMES * 160
    clip = synthetic(2.5 * n / RATE, seed=5)
    windows = model.features(clip)
    assert len(windows) == 3 and all(w.shape == (MEL, FRAMES) for w in windows)
    got = model.transcribe(clip, return_ids=True, max_new_tokens=6)
    assert model.last_stats.extra["windows"] == 3
    each = [model.transcribe(clip[i : i + n], return_ids=True, max_new_tokens=6) for i in range(0, len(clip), n)]
    assert got == [t for w in each for t in w]


def test_sparse_and_quantized_weights(tmp_path):
    ref = tiny_models.build("whisper", tmp_path, sparsity=0.7, scale=2.0)
    feats = features(2)
    dec = [0, 5, 9, 17, 33, 65]
    with torch.no_grad():
        want = ref(input_features=torch.from_numpy(feats)[None], decoder_input_ids=torch.tensor([dec])).logits[0]
    want = want.numpy()
    model = sparseinfer.load(tmp_path, weights="sparse-f32")
    ups = [e for e in model.info()["linear"] if e["name"] == "up"]
    assert ups and all(e["format"] == "sparse-f32" and e["density"] < 0.35 for e in ups)
    np.testing.assert_allclose(model.logits(feats, dec), want, atol=REL * np.abs(want).max(), rtol=0)
    got = sparseinfer.load(tmp_path, weights="sparse-int8").logits(feats, dec)
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_int8_encoder_with_64_wide_heads_matches(tmp_path):
    """Heads 64 wide over 40 encoder positions (two whole tiles and a partial one): where the CPU has AMX-BF16
    the int8 encoder's attention runs on bf16 tiles built from the q/k/v rows; the logits stay within the int8
    budget of transformers' either way."""
    heads = dict(encoder_attention_heads=1, decoder_attention_heads=1, max_source_positions=40)
    ref = tiny_models.build("whisper", tmp_path, sparsity=0.7, scale=2.0, **heads)
    feats = np.random.default_rng(3).standard_normal((MEL, 80)).astype(np.float32)
    dec = [0, 5, 9, 17, 33, 65]
    with torch.no_grad():
        want = ref(input_features=torch.from_numpy(feats)[None], decoder_input_ids=torch.tensor([dec])).logits[0]
    want = want.numpy()
    got = sparseinfer.load(tmp_path, weights="sparse-int8").logits(feats, dec)
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_pruned_quantized_export_loads_and_matches(tmp_path):
    from sparseinfer import training as T

    src = tmp_path / "src"
    ref = tiny_models.build("whisper", src, scale=2.0)
    T.prune(ref, "magnitude", 0.6)
    T.quantize(ref, bits=8, method="rtn")
    out = T.export(ref, src, tmp_path / "out", sparse=True)
    model = sparseinfer.load(out)
    blocks = {e["format"] for e in model.info()["linear"] if not e["name"].startswith("conv")}
    assert blocks == {"sparse-int8"}, blocks
    feats = features(4)
    dec = [0, 3, 7, 21, 40]
    with torch.no_grad():
        want = ref(input_features=torch.from_numpy(feats)[None], decoder_input_ids=torch.tensor([dec])).logits[0]
    want = want.numpy()
    got = model.logits(feats, dec)
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_transcribe_api_and_cli(whisper, tmp_path, capsys):
    path, _ = whisper
    clip = synthetic(0.3, seed=7)  # one window
    wav = tmp_path / "clip.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((clip * 32767).astype("<i2").tobytes())
    model = sparseinfer.load(path)
    ids = model.transcribe(wav, return_ids=True, max_new_tokens=8)
    assert ids == model.transcribe(read_wav(wav)[0], return_ids=True, max_new_tokens=8)
    assert sparseinfer.transcribe(path, str(wav), return_ids=True, max_new_tokens=8) == ids
    text = sparseinfer.transcribe(path, wav, max_new_tokens=8)
    assert text == model.decode(ids).strip()
    from sparseinfer.cli import main

    assert main(["transcribe", "-m", str(path), str(wav), "--max-new-tokens", "8", "--ids"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == ids
    assert "tok/s" in cap.err


def test_misuse_and_bad_configs_are_clear_errors(whisper, tmp_path):
    path, _ = whisper
    model = sparseinfer.load(path)
    with pytest.raises(InvalidInputError, match="transcribe"):
        model.generate("hello")
    with pytest.raises(InvalidInputError, match="spectrogram"):
        model.logits([1, 2, 3], [0])
    with pytest.raises(InvalidInputError, match="frames"):
        model.encoder_hidden_states(np.zeros((MEL, FRAMES + 2), np.float32))
    with pytest.raises(InvalidInputError, match="mel bins"):
        model.encoder_hidden_states(np.zeros((MEL + 1, FRAMES), np.float32))
    bad = np.zeros((MEL, FRAMES), np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite"):
        model.encoder_hidden_states(bad)
    with pytest.raises(InvalidInputError, match="non-finite"):
        model.transcribe(np.full(1000, np.inf, np.float32))
    with pytest.raises(InvalidInputError, match="no samples"):
        model.transcribe(np.zeros(0, np.float32))
    t5 = tiny_models.build("t5", tmp_path / "t5")
    del t5
    with pytest.raises(InvalidInputError, match="does not read audio"):
        sparseinfer.load(tmp_path / "t5").transcribe(np.zeros(100, np.float32))

    def edited(name, **changes):
        dst = tmp_path / name
        shutil.copytree(path, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(changes)
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    with pytest.raises(InvalidInputError, match="num_mel_bins"):
        sparseinfer.load(edited("mel", num_mel_bins=10**12))
    with pytest.raises(InvalidInputError, match="max_source_positions"):
        sparseinfer.load(edited("src", max_source_positions=0))
    with pytest.raises(UnsupportedError, match="encoder_attention_heads"):
        sparseinfer.load(edited("heads", encoder_attention_heads=2))
    with pytest.raises(InvalidInputError, match="conv1"):
        sparseinfer.load(edited("mel2", num_mel_bins=MEL * 2))
    # Audio that would resample to nothing or to too much.
    with pytest.raises(InvalidInputError, match="sampling_rate"):
        model.transcribe(np.zeros(1000, np.float32), sampling_rate=1)
    with pytest.raises(InvalidInputError, match="no sample"):
        model.transcribe(np.zeros(1, np.float32), sampling_rate=48000)
    with pytest.raises(InvalidInputError, match="samples, channels"):
        model.transcribe(np.zeros((2, 1000), np.float32))
    with pytest.raises(InvalidInputError, match="language must be a str"):
        model.transcribe(np.zeros(100, np.float32), language=3)
    with pytest.raises(InvalidInputError, match="temperature"):
        model.transcribe(np.zeros(100, np.float32), temperature="hot")
    with pytest.raises(InvalidInputError, match="whole vocabulary"):
        g = sparseinfer._core.Generator(model._core, features(), 2, suppress_tokens=list(range(tiny_models.VOCAB)))
        g.next_token()
    gen = tmp_path / "gen"
    shutil.copytree(path, gen)
    for bad, field in [
        ({"is_multilingual": True, "lang_to_id": {"<|en|>": []}, "task_to_id": {"transcribe": 8}}, "lang_to_id"),
        ({"forced_decoder_ids": [[1, 5], ["a", 6]]}, "forced_decoder_ids"),
        ({"is_multilingual": "false"}, "is_multilingual"),
    ]:
        (gen / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(InvalidInputError, match=field):
            sparseinfer.load(gen).transcribe(np.zeros(100, np.float32))
    (gen / "generation_config.json").write_text(json.dumps({"suppress_tokens": ["x"]}))
    with pytest.raises(InvalidInputError, match="suppress_tokens"):
        sparseinfer.load(gen).transcribe(np.zeros(100, np.float32))
    (gen / "preprocessor_config.json").write_text(json.dumps({"hop_length": 0}))
    (gen / "generation_config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="hop_length"):
        sparseinfer.load(gen).transcribe(np.zeros(100, np.float32))


def test_huge_forced_prompts_are_refused_in_linear_time(whisper, tmp_path):
    # 200,000 forced ids and as many no-timestamps ids (4 MB of JSON, under the 16 MiB cap): the prompt is
    # built in one pass and refused for its length; a quadratic merge of the two lists took minutes.
    hostile_models = pytest.importorskip("hostile_models")
    path, _ = whisper
    gen = tmp_path / "forced"
    shutil.copytree(path, gen)
    n = 200_000
    cfg = {"forced_decoder_ids": [[i + 1, 2 + i % 50] for i in range(n)], "no_timestamps_token_id": [3] * n}
    (gen / "generation_config.json").write_text(json.dumps(cfg))
    proc = hostile_models.run_child(
        f"""
        import numpy as np
        m = sparseinfer.load({str(gen)!r})
        print(json.dumps(outcome(lambda: m.transcribe(np.zeros(1600, np.float32)))))
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == "InvalidInputError", result
