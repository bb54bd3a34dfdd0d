"""Writing model directories: a small safetensors writer and atomic directory and file creation.

Readers live in Rust (the runtime reads safetensors itself); Python only writes, for the GGUF import and
the training export. Every write goes to a temporary sibling directory that takes the target's place at the
end (atomically swapped with an existing one on Linux), so a crash leaves either the old or the new model,
never a partial one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

_DTYPES = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("int32"): "I32",
    np.dtype("int64"): "I64",
    np.dtype("bool"): "BOOL",
}


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` (numpy arrays of the dtypes above; numpy has no bf16, so floats are f32 or f16) to
    ``path`` in the safetensors format, little-endian, tensors sorted by name."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _DTYPES:
            raise InvalidInputError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        header[name] = {
            "dtype": _DTYPES[a.dtype.newbyteorder("=")],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to ``final``; on success its files are fsynced and it takes the place
    of ``final``. On an exception it is removed and ``final`` is untouched.

    Replacing an existing ``final`` is atomic on Linux: one ``renameat2(RENAME_EXCHANGE)`` swaps the new
    directory with the old one, so at every instant ``final`` is either the complete old or the complete new
    directory; the old one is then deleted. Where the exchange is unavailable (another OS, or a filesystem
    without it) the old directory is renamed aside and the new one renamed in, which leaves nothing at
    ``final`` if the process dies between the two renames.

    Temporaries are named ``.<name>.tmp-<pid>-*``; the ones whose writer process is gone (a killed write) are
    removed when the next write to ``final`` starts. The pid check assumes writers share this host's pids."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise InvalidInputError(f"{final} already exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model directory gets the usual permissions
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            if _exchange(tmp, final):
                _remove(tmp)  # now the old directory
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-old-", dir=final.parent))
                os.rmdir(old)
                final.rename(old)
                tmp.rename(final)
                _remove(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path next to ``final`` to write one file to; on success it is fsynced and renamed onto
    ``final`` (atomic), on an exception removed. Temporaries of dead writers are removed as in ``atomic_dir``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# renameat2(2) flag that swaps two existing paths in one step (Linux >= 3.15; ext4, xfs, btrfs, tmpfs, ...).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# The renameat2 syscall number, for a libc without the wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def _renameat2():
    """libc's renameat2, or a wrapper around syscall(2); None where neither exists (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _SYS_RENAMEAT2.get(platform.machine())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def via_syscall(olddirfd, old, newdirfd, new, flags):
        return syscall(
            ctypes.c_long(number),
            ctypes.c_int(olddirfd),
            ctypes.c_char_p(old),
            ctypes.c_int(newdirfd),
            ctypes.c_char_p(new),
            ctypes.c_uint(flags),
        )

    return via_syscall


_RENAMEAT2 = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the paths ``a`` and ``b`` (both must exist). False when this system or filesystem
    cannot (the caller falls back to two renames); other failures raise OSError."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} with {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    """Deletes a directory tree, or a file or link in its place (never following a link)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Removes ``.<name>.tmp-<pid>-*`` siblings of ``final`` (and ``.<name>.old-<pid>`` ones, which earlier
    versions left) whose writer process no longer exists."""
    for kind in ("tmp", "old"):
        for p in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            pid = p.name[len(f".{final.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(p)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsyncs every regular file under ``root`` and every directory, so the rename publishes data on disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))
