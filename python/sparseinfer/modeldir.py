"""Reading the small files of a model directory (JSON configs, tokenizer.json) as untrusted input.

A file is read only if it resolves inside the model directory (symbolic links included), is a regular file
(never a FIFO or a device, which would block or never end) and is under a size cap. The Rust core applies the
same rules to config.json and the weights (``rust/sparseinfer-core/src/runtime/files.rs``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

__all__ = ["MAX_JSON_BYTES", "MAX_TOKENIZER_BYTES", "read_json", "read_model_file"]

#: Largest JSON config read (config.json, generation_config.json, tokenizer_config.json).
MAX_JSON_BYTES = 16 << 20
#: Largest tokenizer.json read (big vocabularies with merges reach tens of MB).
MAX_TOKENIZER_BYTES = 256 << 20


#: Folder prefixes of a Hugging Face hub cache repository (``<cache>/models--org--name/{blobs,snapshots}``).
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def hub_blobs(model_dir: Path) -> Path | None:
    """For a Hugging Face hub cache snapshot (``.../models--org--name/snapshots/<revision>``, whose files link
    into ``.../blobs``), that blobs folder; otherwise None. Only that exact layout qualifies, so a directory
    that merely sits in some folder called ``snapshots`` gains no second root."""
    root = _resolve(model_dir, ".", model_dir)
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith(HUB_REPO_PREFIXES) and (repo / "blobs").is_dir():
        return (repo / "blobs").resolve()
    return None


def resolve_inside(model_dir: Path, name: str) -> Path:
    """The real path of ``name`` inside ``model_dir``; raises if it is absolute, climbs out with ``..`` or is
    a link that resolves outside (a hub snapshot's links may resolve to a file directly in its blobs folder)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise InvalidInputError(f"{model_dir}: {name!r} is not a path inside the model directory")
    real = _resolve(model_dir, name, model_dir / rel)
    check_inside(model_dir, name, real)
    return real


def _resolve(model_dir: Path, name: str, path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a link loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        raise InvalidInputError(f"{model_dir / name}: cannot be resolved ({type(e).__name__}: a link loop?)") from None


def check_inside(model_dir: Path, name: str, real: Path) -> None:
    """Raises if the real path ``real`` of ``name`` is outside ``model_dir`` (and its hub blobs folder)."""
    root = _resolve(model_dir, name, model_dir)
    blobs = hub_blobs(model_dir)
    if not (root in real.parents or (blobs is not None and real.parent == blobs)):
        raise InvalidInputError(f"{model_dir / name}: resolves to {real}, outside the model directory")


def check_opened(model_dir: Path, name: str, fd: int) -> None:
    """Raises if the open ``fd`` (for ``name``) is not a file inside ``model_dir``: the path the kernel resolved
    for the handle (Linux ``/proc/self/fd``), which catches a directory swapped for a link after the checks."""
    try:
        actual = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # no /proc (not Linux, or a bare container): the checks before the open are what there is
        return
    check_inside(model_dir, name, actual)


def read_model_file(model_dir: Path, name: str, limit: int) -> bytes | None:
    """The bytes of ``model_dir/name``, or None when it does not exist."""
    shown = model_dir / name
    path = resolve_inside(model_dir, name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidInputError(f"{shown}: cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{shown}: not a regular file")
    # O_NONBLOCK: if the file was swapped for a FIFO since the stat, opening it must not wait for a writer.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InvalidInputError(f"{shown}: cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"{shown}: not a regular file")
        check_opened(model_dir, name, fd)
        if st.st_size > limit:
            raise InvalidInputError(f"{shown}: {st.st_size} bytes is over the limit of {limit}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InvalidInputError(f"{shown}: more than the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(model_dir: Path, name: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``model_dir/name``; ``{}`` when the file does not exist."""
    raw = read_model_file(model_dir, name, limit)
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also an int of > 4300 digits
        raise InvalidInputError(f"{model_dir / name}: not valid JSON: {type(e).__name__} at {_where(e)}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{model_dir / name}: expected a JSON object, got {type(value).__name__}")
    return value


def _where(e: Exception) -> str:
    # Where the parse failed, without echoing the file's bytes.
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno} column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"byte {e.start}"
    if isinstance(e, RecursionError):
        return "nesting depth"
    return "a number too long to convert"
