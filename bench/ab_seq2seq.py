"""Side-by-side A/B of two builds of the extension on an encoder-decoder, in one process: both `_core` libraries
are loaded and their calls alternate (A B, B A, ...), so the machine's drift over seconds to minutes (tens of
percent on the VMs we run on) falls on both alike. Separate processes run one after the other compare the
machine's phases as much as the builds.

    python bench/ab_seq2seq.py A.so B.so --shape whisper-small --what encoder|example [--rounds 12]

A.so / B.so: copies of `python/sparseinfer/_core.abi3.so` (e.g. `cp python/sparseinfer/_core.abi3.so /tmp/A.so`
before a change, rebuild, then compare with the new one). The model and its input are the seq2seq benchmark's
(bench/test_seq2seq_bench.py: `--shape` at `--sparsity`, built on first use). `encoder`: one encoder pass;
`example`: the encoder and the benchmark's greedy tokens. Prints the lower quartile and the minimum of each
build's times and their ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import test_seq2seq_bench as bench


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--shape", default="whisper-small", choices=sorted(bench.SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--what", choices=["encoder", "example"], default="encoder")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--weights", default="sparse-int8")
    args = ap.parse_args()
    path = bench.model_dir(args.shape, args.sparsity)
    builds = {"A": load_build(args.a), "B": load_build(args.b)}
    # No pack cache (0 bytes): each build packs its own copy.
    models = {k: c.load_model(str(path), args.weights, None, False, None, None, 0, None) for k, c in builds.items()}
    x = bench.encoder_input(args.shape, models["A"].info()["vocab_size"])

    def run(k: str) -> None:
        if args.what == "encoder":
            models[k].encode(x)
        else:
            gen = builds[k].Generator(models[k], x, bench.NEW_TOKENS)
            for _ in range(bench.NEW_TOKENS):
                gen.next_token()

    run("A")
    run("B")
    times: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for k in "AB" if r % 2 else "BA":
            t = time.perf_counter()
            run(k)
            times[k].append(time.perf_counter() - t)
    q1 = {k: sorted(v)[len(v) // 4] for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(
        f"{args.shape} {args.what} ({args.rounds} rounds): A q1 {q1['A']:.3f} s, min {low['A']:.3f} | "
        f"B q1 {q1['B']:.3f} s, min {low['B']:.3f} | B/A q1 {q1['B'] / q1['A']:.3f}, min {low['B'] / low['A']:.3f}"
    )


if __name__ == "__main__":
    main()
