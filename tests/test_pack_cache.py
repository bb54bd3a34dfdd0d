"""The load cache of packed layers: a second load reads what the first packed, and gives the same model; a
stale, damaged or hostile entry is never trusted; the cache can never make a load fail."""

import os
from pathlib import Path

import numpy as np
import pytest
import tiny_models

import sparseinfer

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_models.build("llama", path, sparsity=0.7, scale=4.0)
    return path


TOKENS = [3, 17, 5, 42, 9]


def logits(model):
    return model._core.logits(TOKENS)


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pack"))


@pytest.mark.parametrize("weights", ["sparse-int8", "sparse-int4", "dense-int8", "dense-int4"])
@pytest.mark.parametrize("activations", [None, "f32"])  # tiled (on AVX-512 VNNI) and row layouts
def test_a_second_load_reads_the_cache_and_gives_the_same_model(llama, tmp_path, weights, activations):
    cache = tmp_path / "cache"
    ref = sparseinfer.load(llama, weights=weights, activations=activations, pack_cache=False)
    assert ref.info()["pack_cache"] == "off"
    first = sparseinfer.load(llama, weights=weights, activations=activations, pack_cache=cache)
    assert first.info()["pack_cache"] == "written"
    assert len(entries(cache)) == 1
    second = sparseinfer.load(llama, weights=weights, activations=activations, pack_cache=cache)
    assert second.info()["pack_cache"] == "hit"
    for m in (first, second):
        np.testing.assert_array_equal(logits(m), logits(ref))
        assert m.info()["linear"] == ref.info()["linear"]
    # Other options are another entry.
    other = sparseinfer.load(llama, weights="sparse-int8", group_size=64, pack_cache=cache)
    assert other.info()["pack_cache"] == "written"
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_encoder_decoders_and_convolutions_are_cached(kind, tmp_path):
    path = tmp_path / kind
    tiny_models.build(kind, path, sparsity=0.7, scale=3.0)
    cache = tmp_path / "cache"
    x = [3, 4, 5] if kind == "t5" else np.random.default_rng(0).standard_normal((16, 20)).astype(np.float32)
    ref = sparseinfer.load(path, weights="sparse-int8", pack_cache=False)._core.logits(x, [0, 5, 6])
    for want in ("written", "hit"):
        m = sparseinfer.load(path, weights="sparse-int8", pack_cache=cache)
        assert m.info()["pack_cache"] == want
        np.testing.assert_array_equal(m._core.logits(x, [0, 5, 6]), ref)


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
def test_a_damaged_entry_is_detected_and_rebuilt(llama, tmp_path, where):
    cache = tmp_path / "cache"
    ref = logits(sparseinfer.load(llama, weights="sparse-int8", pack_cache=False))
    sparseinfer.load(llama, weights="sparse-int8", pack_cache=cache)
    (entry,) = entries(cache)
    flip_byte(entry, int(entry.stat().st_size * where))
    m = sparseinfer.load(llama, weights="sparse-int8", pack_cache=cache)
    # A flipped value is caught by its record's digest, a flipped index by the index's.
    assert m.info()["pack_cache"] in ("rebuilt", "written")
    np.testing.assert_array_equal(logits(m), ref)
    again = sparseinfer.load(llama, weights="sparse-int8", pack_cache=cache)
    assert again.info()["pack_cache"] == "hit"
    np.testing.assert_array_equal(logits(again), ref)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "directory", "fifo", "symlink"])
def test_a_hostile_entry_never_fails_a_load(llama, tmp_path, damage):
    cache = tmp_path / "cache"
    ref = logits(sparseinfer.load(llama, weights="sparse-int4", pack_cache=False))
    sparseinfer.load(llama, weights="sparse-int4", pack_cache=cache)
    (entry,) = entries(cache)
    size = entry.stat().st_size
    if damage == "truncate":
        os.truncate(entry, size // 2)
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "garbage":
        entry.write_bytes(os.urandom(size))
    else:
        entry.unlink()
        if damage == "directory":
            entry.mkdir()
        elif damage == "fifo":
            os.mkfifo(entry)
        else:
            secret = tmp_path / "elsewhere.pack"
            secret.write_bytes(b"not yours")
            entry.symlink_to(secret)
    m = sparseinfer.load(llama, weights="sparse-int4", pack_cache=cache)
    np.testing.assert_array_equal(logits(m), ref)
    if damage == "directory":
        assert m.info()["pack_cache"].startswith("failed: renaming")
    else:
        assert m.info()["pack_cache"] == "written"
    if damage == "symlink":
        assert (tmp_path / "elsewhere.pack").read_bytes() == b"not yours"


def test_a_changed_checkpoint_is_a_new_entry(tmp_path):
    path, cache = tmp_path / "model", tmp_path / "cache"
    tiny_models.build("llama", path, seed=1, sparsity=0.5, scale=4.0)
    before = logits(sparseinfer.load(path, weights="sparse-int8", pack_cache=cache))
    # Same size, same names, other values: the weight file's times change.
    tiny_models.build("llama", path, seed=2, sparsity=0.5, scale=4.0)
    m = sparseinfer.load(path, weights="sparse-int8", pack_cache=cache)
    assert m.info()["pack_cache"] == "written"
    fresh = logits(sparseinfer.load(path, weights="sparse-int8", pack_cache=False))
    np.testing.assert_array_equal(logits(m), fresh)
    assert not np.array_equal(fresh, before)


def test_the_cache_keeps_the_most_recently_used_entries_within_its_budget(llama, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    sparseinfer.load(llama, weights="sparse-int8", pack_cache=cache)
    (one,) = entries(cache)
    # A budget of one entry and a bit: writing a second evicts the first.
    monkeypatch.setenv("SPARSEINFER_PACK_CACHE_GB", str(one.stat().st_size * 1.5 / 1e9))
    sparseinfer.load(llama, weights="sparse-int4", pack_cache=cache)
    (two,) = entries(cache)
    assert two != one
    assert not list(cache.glob("*.tmp-*"))


def test_environment_and_unusable_directories(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEINFER_PACK_CACHE", "0")
    assert sparseinfer.load(llama, weights="sparse-int8").info()["pack_cache"] == "off"
    monkeypatch.setenv("SPARSEINFER_PACK_CACHE", str(tmp_path / "env-cache"))
    assert sparseinfer.load(llama, weights="sparse-int8").info()["pack_cache"] == "written"
    assert len(entries(tmp_path / "env-cache")) == 1
    # A file where the directory should be: the load goes on without a cache and says why.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    m = sparseinfer.load(llama, weights="sparse-int8", pack_cache=blocker / "cache")
    assert m.info()["pack_cache"].startswith("failed: creating")
    # Other users' directories are not trusted with entries.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    m = sparseinfer.load(llama, weights="sparse-int8", pack_cache=shared)
    assert m.info()["pack_cache"].startswith("failed:") and "only this user" in m.info()["pack_cache"]
    assert not list(shared.iterdir())
    # An entry over the budget is not kept; a bad budget turns the cache off, with a warning.
    monkeypatch.setenv("SPARSEINFER_PACK_CACHE_GB", "0")
    m = sparseinfer.load(llama, weights="sparse-int4", pack_cache=tmp_path / "small")
    assert "over the cache's budget" in m.info()["pack_cache"]
    assert not list((tmp_path / "small").iterdir())
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("SPARSEINFER_PACK_CACHE_GB", bad)
        with pytest.warns(UserWarning, match="SPARSEINFER_PACK_CACHE_GB"):
            assert sparseinfer.load(llama, weights="sparse-int8").info()["pack_cache"] == "off"
    monkeypatch.setenv("SPARSEINFER_PACK_CACHE_GB", "inf")
    assert sparseinfer.load(llama, weights="sparse-int8").info()["pack_cache"] == "hit"
    with pytest.raises(sparseinfer.InvalidInputError, match="pack_cache"):
        sparseinfer.load(llama, weights="sparse-int8", pack_cache=0)


def test_one_model_is_one_entry_however_its_directory_is_named(llama, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    link = tmp_path / "link"
    link.symlink_to(llama)
    monkeypatch.chdir(llama.parent)
    outcomes = [
        sparseinfer.load(p, weights="sparse-int8", pack_cache=cache).info()["pack_cache"]
        for p in (llama, llama.name, link)
    ]
    assert outcomes == ["written", "hit", "hit"]
    assert len(entries(cache)) == 1
