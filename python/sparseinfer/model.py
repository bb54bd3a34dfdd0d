"""The inference front door: ``load`` a model directory and ``generate`` text with the Rust runtime.

Weights never pass through Python: the Rust core reads the safetensors files and packs the linear layers
into a kernel format. Python only tokenizes (with the ``tokenizers`` library), applies stop rules and detokenizes
incrementally for streaming.

>>> import sparseinfer
>>> model = sparseinfer.load("path/to/model", weights="sparse-int8")
>>> for piece in model.stream("Once upon a time", max_new_tokens=32):
...     print(piece, end="")
"""

from __future__ import annotations

import inspect
import numbers
import operator
import os
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .chat import apply_chat_template
from .errors import InvalidInputError, SparseInferError
from .modeldir import MAX_TOKENIZER_BYTES, read_json, read_model_file

__all__ = ["GenerationStats", "Model", "Stream", "generate", "load", "transcribe"]


@dataclass
class GenerationStats:
    """Token counts and timings of one generation (prefill includes sampling the first token).

    ``finish_reason``: ``"length"`` (``max_new_tokens``), ``"eos"``, ``"stop"`` (a stop string), ``"context"``
    (the context is full); a stream its consumer closed early keeps ``"length"``."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prefill {self.prompt_tokens} tok at {self.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {self.decode_tokens} tok at {self.decode_tokens_per_s:.1f} tok/s ({self.finish_reason})"
        )


class Stream(Iterator[str]):
    """What :meth:`Model.stream` returns: an iterator over the completion's text pieces, with the statistics
    of this call alone in ``stats`` (filled in as it runs, final once it is exhausted or closed). Streams
    interleaved on one model each keep their own."""

    def __init__(self, pieces: Generator[str, None, None], stats: GenerationStats):
        self._pieces = pieces
        self.stats = stats

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stops the generation (as breaking out of a loop over it does, once the stream is dropped)."""
        self._pieces.close()


class Model:
    """A loaded model: the Rust runtime plus its tokenizer. Create it with :func:`load`.

    Decoder-only models continue their prompt. Encoder-decoder models (T5) take the prompt as the encoder's
    input ("translate English to German: ...") and generate the decoder's output from the decoder start token;
    ``encoder_decoder`` tells which this is."""

    def __init__(self, path: str | os.PathLike[str], weights: str | None = None, threads: int | None = None, **pack):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InvalidInputError(f"model directory {str(self.path)!r} does not exist")
        if threads is not None:
            if threads < 1:
                raise InvalidInputError(f"threads must be >= 1, got {threads}")
            _core.set_num_threads(threads)
        cache, cache_bytes = _pack_cache(pack.get("pack_cache"))
        self._core = _core.load_model(
            str(self.path),
            weights,
            pack.get("group_size"),
            pack.get("asymmetric", False),
            pack.get("activations"),
            cache,
            cache_bytes,
            pack.get("kv_cache"),
        )
        self.encoder_decoder: bool = isinstance(self._core, _core.Seq2SeqModel)
        self._info = self._core.info()
        self._tokenizer = None
        gen_cfg = read_json(self.path, "generation_config.json")
        eos = set(self._info["eos_token_ids"])
        g = gen_cfg.get("eos_token_id")
        eos.update(t for t in (g if isinstance(g, list) else [g]) if type(t) is int and t >= 0)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # The stats of the generation that finished last (each call also keeps its own: Stream.stats).
        self.last_stats = GenerationStats()

    # -- tokenizer -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` from ``tokenizer.json`` (loaded on first use)."""
        if self._tokenizer is None:
            raw = read_model_file(self.path, "tokenizer.json", MAX_TOKENIZER_BYTES)
            if raw is None:
                raise InvalidInputError(f"{self.path} has no tokenizer.json; pass token ids to logits() instead")
            try:
                from tokenizers import Tokenizer
            except ImportError as e:  # pragma: no cover - a declared dependency
                raise SparseInferError("the 'tokenizers' package is required for text prompts") from e
            try:
                tok = Tokenizer.from_str(raw.decode("utf-8"))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise InvalidInputError(f"{self.path / 'tokenizer.json'}: not a valid tokenizer: {e}") from None
            # transformers encodes one text without padding or truncation, whatever the file sets; a file's
            # padding is also the one setting that makes encode() allocate by a number it names (a fixed length
            # of 10**12 aborts the process).
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def _tokenizer_call(self, what: str, f, *args, **kwargs):
        """``f(*args, **kwargs)`` on the tokenizer, its failures (a Rust panic surfaces as a BaseException) as
        typed errors naming tokenizer.json."""
        try:
            return f(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
            raise
        except BaseException as e:  # noqa: B036 - pyo3's PanicException derives from BaseException
            raise InvalidInputError(
                f"{self.path / 'tokenizer.json'}: the tokenizer failed to {what}: {type(e).__name__}: {e}"
            ) from None

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text`` (with the chat template of ``tokenizer_config.json`` when ``chat``)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"the prompt must be a str, got {type(text).__name__}")
        if chat:
            if self.encoder_decoder:
                raise InvalidInputError(f"{self._info['arch']} is an encoder-decoder model: it has no chat template")
            text = self.apply_chat_template([{"role": "user", "content": text}])
            return self._tokenizer_call("encode", self.tokenizer.encode, text, add_special_tokens=False).ids
        return self._tokenizer_call("encode", self.tokenizer.encode, text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer_call("decode", self.tokenizer.decode, list(ids), skip_special_tokens=True)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """Renders ``messages`` with the model's Jinja chat template as transformers'
        ``apply_chat_template(..., tokenize=False)`` does (see :func:`sparseinfer.chat.apply_chat_template`),
        in a sandbox with time and size budgets: the template is untrusted code from the model directory.
        ``continue_final_message=True`` (with ``add_generation_prompt=False``) leaves the last message open."""
        return apply_chat_template(
            self.path,
            messages,
            add_generation_prompt,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            continue_final_message=continue_final_message,
            **kwargs,
        )

    # -- running ---------------------------------------------------------------------------------------
    @property
    def reads_audio(self) -> bool:
        """Whether the encoder reads a log-mel spectrogram (Whisper) rather than token ids."""
        return self._info.get("encoder_input") == "mel"

    def _encoder_input(self, x: Any) -> Any:
        """Token ids, or for an audio encoder a ``(mel bins, frames)`` float32 spectrogram."""
        if not self.reads_audio:
            return _check_ids(x, self._info["vocab_size"])
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise InvalidInputError(
                f"{self._info['arch']}'s encoder reads a (mel bins, frames) float spectrogram "
                f"(see features()), got {arr.dtype} of shape {arr.shape}"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def logits(self, token_ids: Any, decoder_ids: Sequence[int] | None = None) -> np.ndarray:
        """``(len(token_ids), vocab)`` float32 logits of every position (for parity tests). An encoder-decoder
        takes the encoder's input (token ids, or a spectrogram for Whisper) and returns
        ``(len(decoder_ids), vocab)`` for the decoder's."""
        vocab = self._info["vocab_size"]
        if self.encoder_decoder:
            if decoder_ids is None:
                raise InvalidInputError("an encoder-decoder model needs decoder_ids as well as the encoder's input")
            return self._core.logits(self._encoder_input(token_ids), _check_ids(decoder_ids, vocab))
        ids = _check_ids(token_ids, vocab)
        if decoder_ids is not None:
            raise InvalidInputError(f"{self._info['arch']} is a decoder-only model: it takes no decoder_ids")
        return self._core.logits(ids)

    def encoder_hidden_states(self, token_ids: Any) -> np.ndarray:
        """The encoder's output ``(positions, hidden)`` float32 of an encoder-decoder model, for token ids or
        (Whisper) a spectrogram."""
        if not self.encoder_decoder:
            raise InvalidInputError(f"{self._info['arch']} is a decoder-only model: it has no encoder")
        return self._core.encode(self._encoder_input(token_ids))

    def features(self, audio: Any, sampling_rate: int | None = None) -> list[np.ndarray]:
        """Whisper's ``(mel bins, frames)`` float32 log-mel spectrograms of ``audio`` (a WAV path, or samples
        at ``sampling_rate``, default the model's 16 kHz), one per 30 s window."""
        from .speech import features

        return features(self, audio, sampling_rate)

    def transcribe(
        self,
        audio: Any,
        task: str | None = None,
        language: str | None = None,
        return_ids: bool = False,
        sampling_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str | list[int]:
        """Whisper: the text of ``audio`` (a WAV path, or samples at ``sampling_rate``), transcribed or, with
        ``task="translate"``, translated to English. ``language``: the spoken language's code (``"de"``),
        None to detect it. ``return_ids``: the generated token ids instead of text. See
        :mod:`sparseinfer.speech`; statistics (with the detected language) land in ``last_stats``."""
        from .speech import transcribe

        if not self.reads_audio:
            raise InvalidInputError(f"{self._info['arch']} does not read audio: use generate()")
        return transcribe(self, audio, task, language, return_ids, sampling_rate, max_new_tokens, temperature, seed)

    def _prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if self.reads_audio:
            raise InvalidInputError(f"{self._info['arch']}'s encoder reads audio: use transcribe()")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidInputError("the prompt is empty")
            ids = self.encode(prompt, chat=chat)
        else:
            ids = _check_ids(prompt, self._info["vocab_size"])
        if not ids:
            raise InvalidInputError("the prompt encodes to no tokens")
        if not self.encoder_decoder and len(ids) >= self._info["max_positions"]:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; the model's context is {self._info['max_positions']} positions"
            )
        return ids

    def _tokens(
        self,
        stats: GenerationStats,
        ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float,
        seed: int | None,
    ) -> Generator[int, None, None]:
        """Yields new token ids until EOS, ``max_new_tokens`` or the context, filling ``stats`` (this call's
        own), which becomes ``last_stats`` when the generation ends. A consumer that stops at a stop string sets
        ``finish_reason`` itself before closing."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        stats.prompt_tokens, stats.finish_reason = len(ids), "length"
        if max_new_tokens == 0:
            self.last_stats = stats
            return
        for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidInputError(f"{name} must be a number, got {value!r}")
        gen = _core.Generator(
            self._core, ids, max_new_tokens, float(temperature), top_k, top_p, float(repetition_penalty), seed
        )
        t0 = time.perf_counter()
        try:
            for tok in next_tokens(gen, max_new_tokens, self.eos_token_ids, stats):
                stats.new_tokens += 1
                yield tok
        finally:
            s = gen.stats()
            stats.prefill_s = s["prefill_s"]
            stats.decode_tokens = s["decode_tokens"]
            stats.decode_s = s["decode_s"]
            stats.extra["wall_s"] = time.perf_counter() - t0
            self.last_stats = stats

    def generate_ids(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
    ) -> list[int]:
        """The new token ids (no detokenization: works without a tokenizer when ``prompt`` is ids; an
        encoder-decoder's are the encoder input ids, and it returns the generated decoder ids without the start
        token). Its statistics are ``last_stats`` when it returns."""
        ids = self._prompt_ids(prompt, chat)
        stats = GenerationStats()
        return list(self._tokens(stats, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool = False,
    ) -> Stream:
        """Yields the completion's text pieces as they decode. Stops at EOS, a ``stop`` string (not included),
        ``max_new_tokens`` or the context length. ``prompt`` may be text or token ids.

        The returned :class:`Stream` carries this call's own :class:`GenerationStats` in ``.stats``, final once
        it is exhausted or closed; ``model.last_stats`` is the stats of whichever call finished last, so
        interleaved streams should read their own ``.stats``. Nothing runs (the prompt is not even checked)
        until the first piece is asked for."""
        stats = GenerationStats()
        sampling = (temperature, top_k, top_p, repetition_penalty, seed)
        return Stream(self._pieces(stats, prompt, max_new_tokens, sampling, stop, chat), stats)

    def _pieces(
        self,
        stats: GenerationStats,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        sampling: tuple,
        stop: Sequence[str] | str | None,
        chat: bool,
    ) -> Generator[str, None, None]:
        """The body of :meth:`stream`; ``sampling``: (temperature, top_k, top_p, repetition_penalty, seed)."""
        ids = self._prompt_ids(prompt, chat)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise InvalidInputError("stop strings must be non-empty")
        tokens = self._tokens(stats, ids, max_new_tokens, *sampling)
        out: list[int] = []
        emitted = 0  # characters of the decoded completion already yielded
        hold = max((len(s) for s in stops), default=1) - 1  # text held back while a stop string may be forming
        try:
            for tok in tokens:
                out.append(tok)
                text = self.decode(out)
                cut = min((i for i in (text.find(s, emitted) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    stats.finish_reason = "stop"  # before close(), which publishes the stats
                    tokens.close()
                    if cut > emitted:
                        yield text[emitted:cut]
                    return
                # Hold back an incomplete UTF-8 sequence and a possible stop-string prefix.
                safe = len(text) - (1 if text.endswith("\ufffd") else 0) - hold
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
        finally:
            tokens.close()  # a stream closed early ends its generation (and publishes its stats) now
        text = self.decode(out)
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> str:
        """The completion of ``prompt`` (without the prompt). Keywords as for :meth:`stream`. Its statistics are
        ``last_stats`` when it returns."""
        return "".join(self.stream(prompt, **kw))

    def info(self) -> dict[str, Any]:
        """Architecture, parameter count, per-layer format/density, bytes read per token, kernel ISA."""
        d = dict(self._info)
        d["path"] = str(self.path)
        return d

    def __repr__(self) -> str:
        i = self._info
        return f"sparseinfer.Model({str(self.path)!r}, arch={i['arch']!r}, format={i['format']!r})"


def next_tokens(gen: Any, limit: int, eos: frozenset[int], stats: GenerationStats) -> Iterator[int]:
    """Up to ``limit`` tokens of a ``_core.Generator``, stopping before EOS or when the context is full; sets
    ``stats.finish_reason`` when it stops early."""
    for _ in range(limit):
        tok = gen.next_token()
        if tok is None:
            stats.finish_reason = "context"
            return
        if tok in eos:
            stats.finish_reason = "eos"
            return
        yield tok


def _check_ids(ids: Sequence[int], vocab: int) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError("expected token ids, got a string")
    try:
        items = list(ids)
    except TypeError as e:
        raise InvalidInputError(f"token ids must be a sequence of integers: {e}") from None
    out = []
    for t in items:
        # operator.index: ints and numpy integers only; a float id is refused, not truncated onto another id.
        if isinstance(t, bool):
            raise InvalidInputError(f"token ids must be integers, got {t!r}")
        try:
            out.append(operator.index(t))
        except TypeError:
            raise InvalidInputError(f"token ids must be integers, got {type(t).__name__} {t!r}") from None
    if not out:
        raise InvalidInputError("no token ids")
    bad = [t for t in out if t < 0 or t >= vocab]
    if bad:
        raise InvalidInputError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
    return out


PACK_CACHE_GB = 20.0


def _pack_cache(pack_cache: str | os.PathLike[str] | bool | None) -> tuple[str | None, int]:
    """The load cache's directory (None: off) and its size budget in bytes, for ``load(pack_cache=...)``. A bad
    setting in the environment turns the cache off with a warning: the cache never makes a load fail."""
    if pack_cache is not None and not isinstance(pack_cache, (bool, str, os.PathLike)):
        raise InvalidInputError(f"pack_cache must be None, True, False or a directory, got {pack_cache!r}")
    if pack_cache is False:
        return None, 0
    if pack_cache is None or pack_cache is True:
        env = os.environ.get("SPARSEINFER_PACK_CACHE")
        switch = None if env is None else env.strip().lower()
        if switch in ("", "0", "off", "false", "no"):
            return None, 0
        if switch is not None and switch not in ("1", "on", "true", "yes"):
            pack_cache = env
        else:
            from .models import cache_dir

            pack_cache = cache_dir() / "packed"
    gb = os.environ.get("SPARSEINFER_PACK_CACHE_GB", str(PACK_CACHE_GB))
    try:
        budget = float(gb)
    except ValueError:
        budget = float("nan")
    if not budget >= 0:
        warnings.warn(
            f"SPARSEINFER_PACK_CACHE_GB={gb!r} is not a number of gigabytes: the load cache is off", stacklevel=3
        )
        return None, 0
    return os.fspath(pack_cache), int(min(budget * 1e9, 2**64 - 1))


def load(
    model_dir: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    threads: int | None = None,
    group_size: int | None = None,
    asymmetric: bool = False,
    activations: str | None = None,
    pack_cache: str | os.PathLike[str] | bool | None = None,
    kv_cache: str | None = None,
) -> Model:
    """Loads a model directory (``None`` or a preset name: the default model, see ``sparseinfer.models``).

    ``weights``: None keeps the stored precision, or a kernel format (``"sparse-int8"``, ``"dense-int4"``, ...)
    to pack every linear layer into (zeros become the sparsity pattern). ``activations``: how the linear
    layers meet their inputs, ``None`` for each format's default, or ``"f32"``, ``"int8"`` (int8 per
    64-column block) or ``"int8-token"`` (int8 with one scale per token: fewer instructions per weight).

    ``pack_cache``: where the packed layers are kept so the next load of the same directory with the same
    options reads them instead of packing again (packing is nearly all of a load). ``None``: the
    ``SPARSEINFER_PACK_CACHE`` directory (``0`` turns the cache off), else ``packed/`` under the user cache;
    ``False``: no cache; a path: that directory. It keeps the most recently used models within
    ``SPARSEINFER_PACK_CACHE_GB`` gigabytes (default 20), and never writes an entry that would leave less than
    2 % of the disk (1-4 GiB) free. An entry is keyed by the build, the kernel ISA, the
    options, the directory and its weight files' sizes and times; a stale or damaged one is rebuilt, never
    trusted. ``info()["pack_cache"]`` says what this load did (``hit``, ``written``, ``rebuilt``, ``off``).

    ``kv_cache``: how the self-attention caches keep keys and values: ``"f32"``; ``"f16"`` (half the bytes
    every decoded token reads, which dominate long contexts; each value rounded to 11 significant bits,
    saturating at ±65504); or ``"int8"`` (codes with one scale per position and head: a quarter of the bytes,
    at a small cost in accuracy that grows with the size of the attention scores: check a model's outputs
    before relying on it). ``None``: ``"f16"`` where the linear layers take int8 activations (whose own
    rounding is far coarser), else ``"f32"``. ``info()["kv_cache"]`` says which."""
    if model_dir is None or not os.path.exists(model_dir):
        from .models import resolve

        model_dir, preset_weights = resolve(model_dir)
        weights = weights or preset_weights
    return Model(
        model_dir,
        weights=weights,
        threads=threads,
        group_size=group_size,
        asymmetric=asymmetric,
        activations=activations,
        pack_cache=pack_cache,
        kv_cache=kv_cache,
    )


# The options of load() that generate() passes through, read off its signature so the two cannot drift.
_LOAD_OPTIONS = tuple(inspect.signature(load).parameters)[1:]


def generate(
    model_dir: str | os.PathLike[str] | None,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    **kw: Any,
) -> str:
    """Loads ``model_dir`` and returns the completion of ``prompt``. The keyword arguments of :func:`load`
    (``weights``, ``threads``, ``activations``, ...) go to it; the rest to :meth:`Model.generate`."""
    model = load(model_dir, **{k: kw.pop(k) for k in _LOAD_OPTIONS if k in kw})
    return model.generate(
        prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kw
    )


def transcribe(model_dir: str | os.PathLike[str], audio: Any, task: str | None = None, **kw: Any) -> str | list[int]:
    """Loads the Whisper model ``model_dir`` and returns the text of ``audio`` (a WAV path or samples):
    ``task="translate"`` for English text of any language, ``"transcribe"`` (the default) for the spoken
    language's. The keyword arguments of :func:`load` go to it; the rest to :meth:`Model.transcribe`."""
    model = load(model_dir, **{k: kw.pop(k) for k in _LOAD_OPTIONS if k in kw})
    return model.transcribe(audio, task=task, **kw)
