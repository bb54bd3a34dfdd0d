"""Load time: packing from the checkpoint against reading the load cache (`sparseinfer.load(pack_cache=...)`).

The random Llama-shaped 1B model (`llama_models.py`, f16 safetensors), loaded as sparse-int8 and sparse-int4 (70 %
sparse copy) and dense-int4; each round loads once without the cache and once from it, in an order rotated round by
round (bench/harness.py), and records both times, the cache entry's size and the read rate it implies against the
read bandwidth measured in the same round. The entry sits in the page cache after the first load (as on a second
load in practice); a cold disk adds its own read time.

    make bench-load   # JSON in bench/results/, table in docs/benchmarks/load.md

With timing disabled (`make test`), the tiny model runs one round as a smoke test.
"""

from __future__ import annotations

import statistics
import time

import pytest

import sparseinfer
from sparseinfer import kernels

llama_models = pytest.importorskip("llama_models")

import harness  # noqa: E402  (bench/harness.py, beside this file)

CASES = [("sparse-int8", 0.7), ("sparse-int4", 0.7), ("dense-int4", 0.0)]
ROUNDS = 3


def timed_load(path, fmt, cache):
    t = time.perf_counter()
    m = sparseinfer.load(path, weights=fmt, pack_cache=cache)
    dt = time.perf_counter() - t
    return dt, m.info()["pack_cache"]


@pytest.mark.parametrize("fmt,sparsity", CASES, ids=[f"{f}-{s:.0%}" for f, s in CASES])
def test_load(benchmark, tmp_path, fmt, sparsity):
    disabled = benchmark.disabled
    size = "tiny" if disabled else "1b"
    rounds = 1 if disabled else ROUNDS
    path = llama_models.model_dir(size, sparsity)
    cache = tmp_path / "packed"
    # The first load writes the entry (and pages in the checkpoint for both sides).
    write_s, outcome = timed_load(path, fmt, cache)
    assert outcome == "written"
    (entry,) = cache.glob("*.pack")

    def run(name, cached):
        dt, outcome = timed_load(path, fmt, cache if cached else False)
        assert outcome == ("hit" if cached else "off")
        return {"s": dt}

    probe = kernels.BandwidthProbe(1 << 22 if disabled else None)
    records = harness.interleave(
        [("packing", False), ("cached", True)],
        rounds,
        run,
        probe=lambda: probe.measure(repeats=3),
    )
    results = [
        {
            "read_bandwidth_gbs": rec["read_bandwidth_gbs"],
            "order": rec["order"],
            "packing_s": rec["results"]["packing"]["s"],
            "cached_s": rec["results"]["cached"]["s"],
        }
        for rec in records
    ]
    packing = statistics.median(r["packing_s"] for r in results)
    cached = statistics.median(r["cached_s"] for r in results)
    benchmark.group = f"load {size}"
    benchmark.extra_info.update(
        size=size,
        format=fmt,
        sparsity=sparsity,
        threads=kernels.num_threads(),
        isa=sparseinfer.build_info()["isa"],
        checkpoint_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors")),
        entry_bytes=entry.stat().st_size,
        first_load_s=write_s,
        rounds=results,
        packing_s=packing,
        cached_s=cached,
        speedup=packing / cached,
        cached_read_gbs=entry.stat().st_size / cached / 1e9,
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert packing > 0 and cached > 0
