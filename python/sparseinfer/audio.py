"""Audio for speech models, in numpy alone (no torch): reading WAV files, resampling to the model's rate, and
Whisper's log-mel spectrogram.

The spectrogram follows Whisper's front end as transformers' ``WhisperFeatureExtractor`` computes it: a
centred STFT (``n_fft`` 400, hop 160, periodic Hann window, reflect padding), the power spectrum through a
Slaney-normalised mel filter bank over 0-8 kHz, ``log10`` floored at 1e-10, clamped to 8 below its maximum
and mapped by ``(x + 4) / 4``; the last frame is dropped, so 30 s at 16 kHz give 3000 frames.
tests/test_whisper.py holds it to transformers' output.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

__all__ = ["FeatureConfig", "log_mel", "mel_filters", "read_wav", "resample", "load_audio"]

#: Largest WAV file read (about 3.5 hours of 16-bit 16 kHz stereo).
MAX_WAV_BYTES = 1 << 30
#: Sampling rates accepted for input audio (telephone to studio rates).
MIN_RATE, MAX_RATE = 1000, 384000
#: Longest input, in samples after resampling (4 hours at 16 kHz).
MAX_SAMPLES = 4 * 3600 * 16000


@dataclass(frozen=True)
class FeatureConfig:
    """The front end's settings (``preprocessor_config.json`` of a Whisper model)."""

    n_mels: int = 80
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160

    @classmethod
    def from_json(cls, cfg: dict, n_mels: int, where: str) -> FeatureConfig:
        """The settings of a parsed ``preprocessor_config.json`` (``{}``: the defaults), for a model of
        ``n_mels`` bins; values are checked, since the file is untrusted."""

        def get(key: str, default: int, lo: int, hi: int) -> int:
            v = cfg.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidInputError(f"{where}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        out = cls(
            n_mels=get("feature_size", n_mels, 1, 4096),
            sampling_rate=get("sampling_rate", 16000, 1000, 384000),
            n_fft=get("n_fft", 400, 8, 1 << 16),
            hop_length=get("hop_length", 160, 1, 1 << 16),
        )
        if out.n_mels != n_mels:
            raise InvalidInputError(f"{where}: feature_size {out.n_mels} differs from the model's {n_mels} mel bins")
        return out


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + 27.0 * np.log(np.maximum(f, 1e-10) / 1000.0) / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp(np.log(6.4) * (m - 15.0) / 27.0)
    return np.where(m >= 15.0, log, lin)


def mel_filters(n_mels: int, n_fft: int, sampling_rate: int, f_max: float = 8000.0) -> np.ndarray:
    """``[n_fft // 2 + 1, n_mels]`` triangular filters, equally spaced on the Slaney mel scale over
    ``0..f_max`` Hz, each scaled to unit area (Slaney normalisation)."""
    freqs = np.linspace(0.0, sampling_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
    width = np.diff(edges)
    dist = edges[None, :] - freqs[:, None]
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def log_mel(audio: np.ndarray, cfg: FeatureConfig, frames: int) -> np.ndarray:
    """The ``[n_mels, frames]`` float32 log-mel spectrogram of mono ``audio`` at ``cfg.sampling_rate``,
    zero-padded or cut to ``frames · hop_length`` samples first (Whisper's 30 s window)."""
    n = frames * cfg.hop_length
    x = np.zeros(n, dtype=np.float64)
    a = np.asarray(audio, dtype=np.float64)[:n]
    x[: len(a)] = a
    pad = cfg.n_fft // 2
    if n <= pad:
        raise InvalidInputError(f"a window of {n} samples is too short for n_fft {cfg.n_fft}")
    x = np.pad(x, pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
    n_frames = 1 + (len(x) - cfg.n_fft) // cfg.hop_length
    filters = mel_filters(cfg.n_mels, cfg.n_fft, cfg.sampling_rate)
    mel = np.empty((n_frames, cfg.n_mels))
    # Frames in chunks of about 16M samples, so a large n_fft never builds one [frames, n_fft] matrix.
    step = max(1, (1 << 24) // cfg.n_fft)
    for f0 in range(0, n_frames, step):
        f = np.arange(f0, min(f0 + step, n_frames))
        idx = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * f[:, None]
        spec = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** 2  # [frames, n_fft // 2 + 1]
        mel[f] = spec @ filters
    logm = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    logm = np.maximum(logm, logm.max() - 8.0)
    out = ((logm + 4.0) / 4.0).astype(np.float32)
    return np.ascontiguousarray(out[:, :frames])


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` at ``rate`` Hz resampled to ``target`` Hz, band-limited (by the FFT: the spectrum is cut or
    zero-extended, so nothing above the lower Nyquist frequency survives)."""
    if rate == target or len(audio) == 0:
        return np.asarray(audio, dtype=np.float32)
    n_out = int(round(len(audio) * target / rate))
    if n_out < 1:
        raise InvalidInputError(f"{len(audio)} samples at {rate} Hz make no sample at {target} Hz")
    spec = np.fft.rfft(np.asarray(audio, dtype=np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out[:keep] = spec[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(audio))).astype(np.float32)


# The WAV reader is written here rather than taken from the standard library: ``wave`` reads only integer PCM
# (no float WAVs, no WAVE_FORMAT_EXTENSIBLE before Python 3.12), and soundfile needs the C libsndfile.
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """``(samples, rate)`` of a RIFF/WAVE file: integer PCM of 8, 16, 24 or 32 bits or IEEE float of 32 or 64,
    any channel count (averaged to mono), as float32 in ``[-1, 1]``."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise InvalidInputError(f"{p}: not a regular file")
        if size > MAX_WAV_BYTES:
            raise InvalidInputError(f"{p}: {size} bytes is over the limit of {MAX_WAV_BYTES}")
        data = p.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{p}: cannot be read: {e.strerror}") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InvalidInputError(f"{p}: not a WAV file (no RIFF/WAVE header)")
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        cid, clen = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + clen]
        if cid == b"fmt ":
            if len(body) < 16:
                raise InvalidInputError(f"{p}: the fmt chunk is {len(body)} bytes, under 16")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # the sub-format GUID's first two bytes
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise InvalidInputError(f"{p}: the data chunk comes before the fmt chunk")
            return _decode(p, body, *fmt)
        pos += 8 + clen + (clen & 1)  # chunks are padded to even sizes
    raise InvalidInputError(f"{p}: no {'data' if fmt else 'fmt'} chunk")


def _decode(p: Path, body: bytes, tag: int, channels: int, rate: int, bits: int) -> tuple[np.ndarray, int]:
    if channels < 1 or not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInputError(f"{p}: {channels} channels at {rate} Hz (rates {MIN_RATE} to {MAX_RATE} are read)")
    kinds = {(_PCM, 8): "u1", (_PCM, 16): "<i2", (_PCM, 32): "<i4", (_FLOAT, 32): "<f4", (_FLOAT, 64): "<f8"}
    width = bits // 8
    frame = width * channels
    n = len(body) // frame if frame else 0
    body = body[: n * frame]
    if (tag, bits) == (_PCM, 24):
        b = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float64) / (1 << 23)
    elif (tag, bits) in kinds:
        x = np.frombuffer(body, dtype=kinds[(tag, bits)]).astype(np.float64)
        if tag == _PCM:
            x = (x - 128.0) / 128.0 if bits == 8 else x / float(1 << (bits - 1))
    else:
        raise InvalidInputError(f"{p}: WAV format {tag} with {bits} bits per sample is not supported")
    x = x.reshape(n, channels).mean(axis=1).astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{p}: holds non-finite samples")
    return x, rate


def load_audio(audio, sampling_rate: int | None, target: int) -> np.ndarray:
    """Mono float32 samples at ``target`` Hz from a WAV path, or from an array of samples at
    ``sampling_rate`` (default: ``target``; 2-D arrays are ``[samples, channels]``)."""
    if isinstance(audio, (str, os.PathLike)):
        x, rate = read_wav(audio)
        if sampling_rate is not None and sampling_rate != rate:
            raise InvalidInputError(f"{audio}: the file is at {rate} Hz, not the sampling_rate {sampling_rate} given")
    else:
        try:
            x = np.asarray(audio, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"audio must be a WAV path or an array of samples: {e}") from None
        if x.ndim == 2:
            if x.shape[1] > x.shape[0]:
                raise InvalidInputError(f"a 2-D audio array is [samples, channels]; got shape {x.shape}")
            x = x.mean(axis=1)
        if x.ndim != 1:
            raise InvalidInputError(f"audio must be 1-D (or [samples, channels]), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise InvalidInputError("audio holds non-finite samples (or values beyond float32)")
        rate = target if sampling_rate is None else sampling_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidInputError(f"sampling_rate must be an int from {MIN_RATE} to {MAX_RATE}, got {rate!r}")
    if len(x) == 0:
        raise InvalidInputError("the audio has no samples")
    if len(x) * target / rate > MAX_SAMPLES:
        raise InvalidInputError(f"the audio is over {MAX_SAMPLES // (3600 * 16000)} hours long")
    return resample(x, rate, target)
