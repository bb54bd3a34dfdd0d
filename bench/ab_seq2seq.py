"""Side-by-side A/B of two builds of the extension on an encoder-decoder, in one process: both `_core` libraries
are loaded and their calls alternate (A B, B A, ...), so the machine's drift over seconds to minutes (tens of
percent on the VMs we run on) falls on both alike. Separate processes run one after the other compare the
machine's phases as much as the builds.

    python bench/ab_seq2seq.py A.so B.so MODEL_DIR --what encoder|example [--rounds 12] [--weights sparse-int8]

A.so / B.so: copies of `python/sparseinfer/_core.abi3.so` (e.g. `cp python/sparseinfer/_core.abi3.so /tmp/A.so`
before a change, rebuild, then compare with the new one). MODEL_DIR: an encoder-decoder checkpoint (the benchmark's
`~/.cache/sparseinfer/bench-models/whisper-small-s70`). `encoder`: one encoder pass over the benchmark's input;
`example`: the encoder and 64 greedy tokens. Prints the lower quartile and the minimum of each build's times and
their ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encoder_input(model_dir: Path, vocab: int):
    """The seq2seq benchmark's input: 64 token ids (T5) or 30 s of Whisper features."""
    config = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(0)
    if config.get("model_type") == "whisper":
        return rng.uniform(-1.0, 1.5, (config["num_mel_bins"], 2 * config["max_source_positions"])).astype(np.float32)
    return [int(t) for t in rng.integers(2, vocab, 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--what", choices=["encoder", "example"], default="encoder")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--weights", default="sparse-int8")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    builds = {"A": load_build(args.a), "B": load_build(args.b)}
    models = {
        k: core.load_model(str(args.model_dir), args.weights, None, False, None, None, 0, None)
        for k, core in builds.items()
    }
    x = encoder_input(args.model_dir, models["A"].info()["vocab_size"])

    def run(k: str) -> None:
        if args.what == "encoder":
            models[k].encode(x)
        else:
            gen = builds[k].Generator(models[k], x, args.new_tokens)
            for _ in range(args.new_tokens):
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
        f"{args.model_dir.name} {args.what} ({args.rounds} rounds): A q1 {q1['A']:.3f} s, min {low['A']:.3f} | "
        f"B q1 {q1['B']:.3f} s, min {low['B']:.3f} | B/A q1 {q1['B'] / q1['A']:.3f}, min {low['B'] / low['A']:.3f}"
    )


if __name__ == "__main__":
    main()
