"""Speech recognition and translation with Whisper: audio → 30 s windows of log-mel features → the Rust
encoder-decoder, with the decoder prompt Whisper was trained on.

The prompt is ``<|startoftranscript|> <|lang|> <|task|> <|notimestamps|>`` for multilingual models, read from
``generation_config.json`` (``decoder_start_token_id``, ``lang_to_id``, ``task_to_id``,
``no_timestamps_token_id``), and ``<|startoftranscript|> <|notimestamps|>`` for English-only ones. With no
language given, it is detected as transformers does: the most likely language token after the start token.
``suppress_tokens`` are never generated and ``begin_suppress_tokens`` not first. Audio longer than the window
is cut into consecutive windows, each decoded on its own (no timestamps, so a word across a cut may be split).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from .audio import FeatureConfig, load_audio, log_mel
from .errors import InvalidInputError
from .model import GenerationStats, next_tokens
from .modeldir import read_json

if TYPE_CHECKING:
    from .model import Model

__all__ = ["DecoderPrompt", "decoder_prompt", "features", "transcribe"]

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class DecoderPrompt:
    """The decoder's start: ``ids``, then (when ``detect`` holds candidates) the most likely of those
    language tokens followed by ``after``."""

    ids: list[int]
    detect: list[int]
    after: list[int]
    suppress: list[int]
    begin_suppress: list[int]


def _ids(where: str, key: str, value: Any, vocab: int, outside_ok: bool = False) -> list[int]:
    """A list of token ids from an untrusted JSON value (a single id is a list of one). With ``outside_ok``,
    ids past the vocabulary are dropped, as transformers' suppressing processors ignore them (its configs of
    small models keep the defaults of the real vocabulary)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (t >= vocab and not outside_ok):
            raise InvalidInputError(f"{where}: {key!r} holds {t!r}, not a token id below the vocabulary of {vocab}")
        if t < vocab:
            out.append(t)
    return out


def _id_map(where: str, key: str, value: Any, vocab: int) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: {key!r} must be an object of token ids, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        ids = _ids(where, f"{key}.{k}", v, vocab)
        if len(ids) != 1:
            raise InvalidInputError(f"{where}: {key}.{k} must be one token id, got {v!r}")
        out[str(k)] = ids[0]
    return out


def decoder_prompt(model: Model, task: str | None, language: str | None) -> DecoderPrompt:
    """The decoder prompt for ``task`` (``"transcribe"``, ``"translate"``, None: the model's default) and
    ``language`` (a code such as ``"de"`` or a token ``"<|de|>"``; None: detect it)."""
    info, vocab = model._info, model._info["vocab_size"]
    where = str(model.path / "generation_config.json")
    gen = read_json(model.path, "generation_config.json")
    g = lambda key: _ids(where, key, gen.get(key), vocab)  # noqa: E731
    sot = (g("decoder_start_token_id") or [info["decoder_start_token_id"]])[0]
    langs = _id_map(where, "lang_to_id", gen.get("lang_to_id"), vocab)
    tasks = _id_map(where, "task_to_id", gen.get("task_to_id"), vocab)
    multilingual = gen.get("is_multilingual", bool(langs))
    if not isinstance(multilingual, bool):
        raise InvalidInputError(f"{where}: 'is_multilingual' must be true or false, got {multilingual!r}")
    if language is not None and not isinstance(language, str):
        raise InvalidInputError(f"language must be a str such as 'de', got {language!r}")
    tail = g("no_timestamps_token_id")
    rules = {
        "suppress": _ids(where, "suppress_tokens", gen.get("suppress_tokens"), vocab, outside_ok=True),
        "begin_suppress": _ids(
            where, "begin_suppress_tokens", gen.get("begin_suppress_tokens"), vocab, outside_ok=True
        ),
    }
    if task is not None and task not in TASKS:
        raise InvalidInputError(f"task must be one of {TASKS}, got {task!r}")
    if not (multilingual and langs):
        if task is not None or language is not None:
            raise InvalidInputError(
                f"{model.path} is an English-only model (generation_config.json has no languages): "
                "it takes no task or language"
            )
        forced = gen.get("forced_decoder_ids")
        if forced is not None:
            # [[position, id], ...] after the start token; transformers skips null ids.
            ok = isinstance(forced, list) and all(
                isinstance(f, list) and len(f) == 2 and type(f[0]) is int and (f[1] is None or type(f[1]) is int)
                for f in forced
            )
            if not ok:
                raise InvalidInputError(f"{where}: 'forced_decoder_ids' must be [[position, token id], ...]")
            pairs = sorted((f for f in forced if f[1] is not None), key=lambda f: f[0])
            ids = [sot] + _ids(where, "forced_decoder_ids", [f[1] for f in pairs], vocab)
            forced_set = set(ids)
            return DecoderPrompt(ids=ids + [t for t in tail if t not in forced_set], detect=[], after=[], **rules)
        return DecoderPrompt(ids=[sot] + tail, detect=[], after=[], **rules)
    # The caller's choice, else the generation config's (fine-tuned checkpoints set one), else transformers'
    # defaults: transcribe, and detect the language.
    for key, value in (("task", gen.get("task")), ("language", gen.get("language"))):
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"{where}: {key!r} must be a string, got {value!r}")
    task = task or gen.get("task") or "transcribe"
    if task not in TASKS:
        raise InvalidInputError(f"{where}: task {task!r} is not one of {TASKS}")
    language = language or gen.get("language")
    if task not in tasks:
        raise InvalidInputError(f"{where}: task_to_id has no {task!r}")
    after = [tasks[task]] + tail
    if language is None:
        return DecoderPrompt(ids=[sot], detect=sorted(langs.values()), after=after, **rules)
    token = language if language.startswith("<|") else f"<|{language.lower()}|>"
    if token not in langs:
        codes = ", ".join(sorted(k.strip("<|>") for k in langs))
        raise InvalidInputError(f"language {language!r} is not one of this model's: {codes}")
    return DecoderPrompt(ids=[sot, langs[token]] + after, detect=[], after=[], **rules)


def feature_config(model: Model) -> FeatureConfig:
    """The model's front-end settings (``preprocessor_config.json``, else Whisper's)."""
    cfg = read_json(model.path, "preprocessor_config.json")
    return FeatureConfig.from_json(cfg, model._info["num_mel_bins"], str(model.path / "preprocessor_config.json"))


def features(model: Model, audio: Any, sampling_rate: int | None = None) -> list[np.ndarray]:
    """The ``[mel bins, frames]`` float32 spectrograms of ``audio`` (a WAV path or samples), one per window of
    ``2 · max_source_positions`` frames (30 s for Whisper); the last window is padded with silence."""
    if model._info.get("encoder_input") != "mel":
        raise InvalidInputError(f"{model._info['arch']} does not read audio")
    cfg = feature_config(model)
    x = load_audio(audio, sampling_rate, cfg.sampling_rate)
    frames = 2 * model._info["max_source_positions"]
    n = frames * cfg.hop_length
    return [log_mel(x[i : i + n], cfg, frames) for i in range(0, len(x), n)]


def transcribe(
    model: Model,
    audio: Any,
    task: str | None = None,
    language: str | None = None,
    return_ids: bool = False,
    sampling_rate: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str | list[int]:
    """The text (or, with ``return_ids``, the generated token ids, without the prompt, windows concatenated)
    of ``audio``; see the module docs. Statistics land in ``model.last_stats``."""
    if not isinstance(return_ids, bool):
        raise InvalidInputError(f"return_ids must be a bool, got {return_ids!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidInputError(f"temperature must be a number, got {temperature!r}")
    prompt = decoder_prompt(model, task, language)
    room = model._info["max_positions"] - len(prompt.ids) - (1 + len(prompt.after) if prompt.detect else 0)
    if room < 1:
        raise InvalidInputError(
            f"the decoder's context of {model._info['max_positions']} positions leaves no room after the prompt"
        )
    if max_new_tokens is None:
        max_new_tokens = room
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    windows = features(model, audio, sampling_rate)
    stats = GenerationStats(finish_reason="length")
    stats.extra.update(windows=len(windows))
    t0 = time.perf_counter()
    ids: list[int] = []
    texts: list[str] = []
    detected = None
    for mel in windows:
        start = prompt.ids if detected is None else prompt.ids + [detected] + prompt.after
        out = _window(
            model,
            mel,
            prompt,
            start,
            detected is None and bool(prompt.detect),
            max_new_tokens,
            temperature,
            seed,
            stats,
        )
        if prompt.detect and detected is None:
            detected, out = out[0], out[1:]
        ids.extend(out)
        if not return_ids:
            texts.append(model.decode(out).strip())
    if detected is not None:
        stats.extra["language"] = _language_of(model, detected)
    stats.extra["wall_s"] = time.perf_counter() - t0
    model.last_stats = stats
    return ids if return_ids else " ".join(t for t in texts if t)


def _window(
    model: Model,
    mel: np.ndarray,
    prompt: DecoderPrompt,
    start: list[int],
    detect: bool,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    stats: GenerationStats,
) -> list[int]:
    """One window's generated ids (led by the detected language token when ``detect``)."""
    gen = _core.Generator(
        model._core,
        mel,
        max_new_tokens,
        float(temperature),
        None,
        None,
        1.0,
        seed,
        decoder_prompt=start,
        suppress_tokens=prompt.suppress,
        begin_suppress_tokens=prompt.begin_suppress,
    )
    out: list[int] = []
    stats.finish_reason = "length"
    if detect:
        out.append(gen.choose(prompt.detect))  # never None: the context has room (checked by transcribe)
        gen.force(prompt.after)
    generated = list(next_tokens(gen, max_new_tokens, model.eos_token_ids, stats))
    out.extend(generated)
    s = gen.stats()
    stats.prompt_tokens += s["prompt_tokens"]
    stats.prefill_s += s["prefill_s"]
    stats.decode_tokens += s["decode_tokens"]
    stats.decode_s += s["decode_s"]
    stats.new_tokens += len(generated)
    return out


def _language_of(model: Model, token: int) -> str:
    """The language code of a language token (its id, without a tokenizer.json)."""
    try:
        name = model.tokenizer.id_to_token(token)
    except InvalidInputError:
        return str(token)
    return name.strip("<|>") if name else str(token)
