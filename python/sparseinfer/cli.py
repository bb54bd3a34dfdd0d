"""The ``sparseinfer`` command line.

``sparseinfer info`` prints the build and CPU; ``sparseinfer demo`` packs a Llama-1B-shaped layer in every
format and times matvec against numpy's dense f32 ``W @ x``. Text generation arrives with the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from . import build_info, kernels

    if args.threads:
        kernels.set_num_threads(args.threads)
    info = build_info()
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    w[rng.random((rows, cols)) < args.sparsity] = 0.0
    x = rng.standard_normal(cols, dtype=np.float32)
    print(f"sparseinfer {info['version']} ({info['profile']}), isa={info['isa']}, threads={info['threads']}")
    bw = kernels.measure_read_bandwidth(nbytes=512 << 20, repeats=3)
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    print(f"W: {rows}x{cols}, sparsity {args.sparsity:.0%}; {args.copies} copies rotated so reads come from DRAM")

    def timed(fn, mats, nbytes):
        for m in mats[:2]:
            fn(m)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for m in mats:
                fn(m)
            best = min(best, (time.perf_counter() - t) / len(mats))
        return best, nbytes / best / 1e9

    dense = [w.copy() for _ in range(args.copies)]
    base, base_gbs = timed(lambda m: m @ x, dense, w.nbytes)
    del dense
    print(f"{'format':<14}{'bytes/weight':>13}{'time (us)':>11}{'GB/s':>8}{'% of bw':>9}{'vs numpy':>10}  max|err|")
    print(f"{'numpy f32':<14}{4.0:>13.3f}{base * 1e6:>11.1f}{base_gbs:>8.1f}{base_gbs / bw:>9.0%}{1.0:>9.2f}x")
    want = w @ x
    for fmt in kernels.FORMATS:
        m0 = kernels.pack(w, format=fmt)
        mats = [m0] + [m0.copy() for _ in range(args.copies - 1)]
        t, gbs = timed(lambda m: m.matvec(x), mats, m0.nbytes)
        err = float(np.max(np.abs(m0.matvec(x) - want)))
        print(
            f"{fmt:<14}{m0.nbytes / (rows * cols):>13.3f}{t * 1e6:>11.1f}{gbs:>8.1f}{gbs / bw:>9.0%}"
            f"{base / t:>9.2f}x  {err:.2e}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build, the CPU features and the kernel ISA in use")
    demo = sub.add_parser("demo", help="time every kernel format against numpy dense f32 on one layer")
    demo.add_argument("--rows", type=int, default=5632)
    demo.add_argument("--cols", type=int, default=2048)
    demo.add_argument("--sparsity", type=float, default=0.7)
    demo.add_argument("--copies", type=int, default=24, help="matrices rotated per timing (defeats the cache)")
    demo.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import build_info

        json.dump(build_info(), sys.stdout, indent=2)
        print()
        return 0
    return _demo(args)
