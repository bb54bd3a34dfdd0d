"""Kernel benchmark: every format against numpy's dense f32 ``W @ x`` (and torch, if installed), in one run.

Decoding is memory-bound, so each case rotates over enough copies of the matrix that the working set is
``SPARSEINFER_BENCH_BYTES`` (default 1.2 GB: 4x a 300 MB L3, the largest of the machines we run on; set it higher
on a CPU with more), and each timed round reads the next 256 MB of that rotation: the reads come from DRAM, as in a
real decode step. Each case records its time per matvec, effective GB/s (packed bytes / time) and that as a
fraction of the read bandwidth probed before and after each round. Correctness is asserted before timing. The
rounds are timed by the test itself: pytest-benchmark's own statistics (its terminal table) time an empty call and
mean nothing.

    make bench      # timings on: JSON in bench/results/, table and plot in docs/benchmarks/

With timing disabled (the default in `make test`) every case runs once on a single copy, as a correctness test.
"""

import functools
import os
import statistics
import time

import numpy as np
import pytest

import sparseinfer
from sparseinfer import kernels

SHAPES = {
    "1b-attn 2048x2048": (2048, 2048),
    "1b-up 5632x2048": (5632, 2048),
    "1b-down 2048x5632": (2048, 5632),
    "7b-attn 4096x4096": (4096, 4096),
    "7b-up 11008x4096": (11008, 4096),
}
SPARSITIES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9]
SPARSE = ["sparse-f32", "sparse-bf16", "sparse-int8", "sparse-int4"]
DENSE = ["dense-f32", "dense-bf16", "dense-int8", "dense-int4"]
INT = {"dense-int8", "dense-int4", "sparse-int8", "sparse-int4"}
WORKING_SET = int(float(os.environ.get("SPARSEINFER_BENCH_BYTES", 1.2e9)))
# Bytes of the rotation each timed round reads (as many as a bandwidth probe), the rounds a case keeps, the most
# it runs, and how far apart (relative) the probes before and after a kept round may be.
SEGMENT_BYTES = 256 << 20
KEEP_ROUNDS = 9
MAX_ROUNDS = 40
STABLE = 0.1

CASES = [(s, "numpy-f32", 0.0) for s in SHAPES]
CASES += [(s, "torch-f32", 0.0) for s in SHAPES]
CASES += [(s, f, 0.0) for s in SHAPES for f in DENSE]
CASES += [(s, f, p) for s in SHAPES for f in SPARSE for p in SPARSITIES]


@functools.lru_cache(maxsize=2)
def weights(shape, sparsity):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(SHAPES[shape], dtype=np.float32)
    w[rng.random(w.shape, dtype=np.float32) < sparsity] = 0.0
    return w


def copies(benchmark, nbytes):
    return 1 if benchmark.disabled else max(2, -(-WORKING_SET // nbytes))


@pytest.mark.parametrize("shape,fmt,sparsity", CASES, ids=[f"{s}-{f}-{p:.0%}" for s, f, p in CASES])
def test_matvec(benchmark, bandwidth, shape, fmt, sparsity):
    w = weights(shape, sparsity)
    x = np.random.default_rng(1).standard_normal(w.shape[1], dtype=np.float32)
    want = w.astype(np.float64) @ x
    if fmt == "numpy-f32":
        nbytes, n = w.nbytes, copies(benchmark, w.nbytes)
        mats = [w] + [w.copy() for _ in range(n - 1)]
        assert np.allclose(w @ x, want, rtol=1e-3, atol=1e-3)
        call, kernel = (lambda m: m @ x), "numpy"
    elif fmt == "torch-f32":
        torch = pytest.importorskip("torch")
        tw = torch.from_numpy(w)
        nbytes, n = w.nbytes, copies(benchmark, w.nbytes)
        mats = [tw] + [tw.clone() for _ in range(n - 1)]
        tx = torch.from_numpy(x)
        assert np.allclose((tw @ tx).numpy(), want, rtol=1e-3, atol=1e-3)
        call, kernel = (lambda m: m @ tx), f"torch {torch.__version__}"
    else:
        m0 = kernels.pack(w, fmt)
        nbytes, n = m0.nbytes, copies(benchmark, m0.nbytes)
        # Correctness first: the kernel against numpy on the dequantized weights (and x̂ for int8 activations:
        # bounded here by the activation budget, tested exactly in tests/).
        got = m0.matvec(x)
        dense = m0.to_dense().astype(np.float64)
        x_err = np.zeros(x.size)
        if fmt in INT:  # int8 activations by default: each x within act_round of its 64-block scale
            blocks = np.abs(x).reshape(-1, 64).max(axis=1) / 127
            x_err = np.repeat(blocks * (kernels.ERROR_BUDGETS["act_round"] + 2e-5), 64)
        tol = 1e-4 * (np.abs(dense) @ np.abs(x)) + np.abs(dense) @ x_err + 1e-4
        assert np.all(np.abs(got - dense @ x) <= tol)
        mats = [m0] + [m0.copy() for _ in range(n - 1)]
        call, kernel = (lambda m: m.matvec(x)), m0.kernel()
    benchmark.group = shape
    if benchmark.disabled:  # `make test`: the correctness checks above, and one call on every copy
        for m in mats:
            call(m)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    # A round runs the next SEGMENT_BYTES of the rotation (every matrix still comes from DRAM) between two
    # bandwidth probes (each over four times the last-level caches). A VM's read bandwidth can jump by tens of
    # percent for seconds to minutes at a time: a round counts only if its two probes agree within STABLE (the bandwidth
    # did not jump during it), and the case is judged on its GB/s over the mean of its two probes, the median
    # over KEEP_ROUNDS rounds.
    per_round = min(n, -(-SEGMENT_BYTES // nbytes))
    for j in range(per_round):  # warm-up
        call(mats[j])
    kept, everything, seen, cursor = [], [], 0, per_round % n
    before = bandwidth.probe()
    while len(kept) < KEEP_ROUNDS and seen < MAX_ROUNDS:
        t = time.perf_counter()
        for j in range(cursor, cursor + per_round):
            call(mats[j % n])
        dt = (time.perf_counter() - t) / per_round
        cursor = (cursor + per_round) % n
        after = bandwidth.probe()
        seen += 1
        mean = (before + after) / 2
        everything.append((dt, nbytes / dt / 1e9 / mean, mean))
        if abs(before - after) <= STABLE * mean:
            kept.append(everything[-1])
        before = after
    unsteady = len(kept) < 3
    if unsteady:  # the bandwidth never held still: report every round, marked as such
        kept = everything
    times, fractions, probes = zip(*kept)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        shape=shape,
        format=fmt,
        sparsity=sparsity,
        nbytes=nbytes,
        copies=n,
        per_round=per_round,
        kernel=kernel,
        time_us=statistics.median(times) * 1e6,
        read_bandwidth_gbs=bandwidth.at_start(),
        case_read_bandwidth_gbs=statistics.median(probes),
        bandwidth_fraction=statistics.median(fractions),
        bandwidth_fraction_range=[min(fractions), max(fractions)],
        rounds_kept=len(kept),
        rounds_seen=seen,
        unsteady=unsteady,
        threads=kernels.num_threads(),
        isa=sparseinfer.build_info()["isa"],
    )


PAIRED_SHAPES = ["1b-attn 2048x2048", "1b-up 5632x2048", "1b-down 2048x5632"]
# (format, sparsity, activations): None is the format's default (int8 per 64-column block for integer formats).
PAIRED_FORMATS = [("dense-int8", 0.0, None), ("sparse-int8", 0.7, None), ("sparse-int4", 0.7, None)]
PAIRED_FORMATS += [("sparse-int8", 0.7, "int8-token"), ("sparse-int4", 0.7, "int8-token")]
PAIRED_ROUNDS = 5


@pytest.mark.parametrize("shape", PAIRED_SHAPES)
def test_paired_vs_numpy(benchmark, shape):
    """The acceptance ratios against numpy, interleaved: every round times numpy and each format back to back
    (one pass over its DRAM-sized rotation each), with a bandwidth probe per round. Cases timed minutes apart
    see different bandwidth on this VM; memory-bound numpy follows it and the compute-bound sparse kernels do
    not, so only interleaved ratios compare like with like."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPES[shape][1], dtype=np.float32)
    w = weights(shape, 0.0)
    rotations = {"numpy-f32": [w] + [w.copy() for _ in range(copies(benchmark, w.nbytes) - 1)]}
    acts = {}
    for fmt, sparsity, act in PAIRED_FORMATS:
        m0 = kernels.pack(weights(shape, sparsity), fmt)
        name = f"{fmt}{'+token' if act == 'int8-token' else ''} {sparsity:.0%}"
        rotations[name] = [m0] + [m0.copy() for _ in range(copies(benchmark, m0.nbytes) - 1)]
        acts[name] = act

    def per_matvec(name):
        mats = rotations[name]
        # numpy's OpenBLAS threads keep spinning for a while after a call, on the cores our pool needs: let
        # them go to sleep before anything is timed.
        time.sleep(0.5)
        t = time.perf_counter()
        if name == "numpy-f32":
            for m in mats:
                m @ x
        else:
            for m in mats:
                m.matvec(x, acts[name])
        return (time.perf_counter() - t) / len(mats)

    for name in rotations:
        per_matvec(name)  # warm up: page everything in
    rounds = []
    probe = kernels.BandwidthProbe(1 << 22 if benchmark.disabled else None)
    for _ in range(1 if benchmark.disabled else PAIRED_ROUNDS):
        bw = probe.measure(repeats=3)
        rounds.append({"read_bandwidth_gbs": bw, "time_us": {n: per_matvec(n) * 1e6 for n in rotations}})
    speedups = {n: statistics.median(r["time_us"]["numpy-f32"] / r["time_us"][n] for r in rounds) for n in rotations}
    benchmark.group = f"paired {shape}"
    benchmark.extra_info.update(kind="paired", shape=shape, rounds=rounds, median_speedup=speedups)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(s > 0 for s in speedups.values())
