"""Paired rounds of the seq2seq benchmark's goal case: transformers fp32 and sparseinfer (sparse-int8 at 70 % by
default) on the same random-weight model, one after the other in each round, each case in its own process, the
order alternating round by round. The single-pass report (`make bench-seq2seq`) runs every case once; on a
machine whose speed drifts by tens of percent over minutes, the per-round ratios and their median are the
figures to judge a goal by. Pause anything else that runs (the study) first.

    python bench/seq2seq_paired.py --shapes whisper-small,whisper-base,t5-small,t5-base --rounds 3 \\
        > docs/benchmarks/seq2seq-paired.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

ONE = """
import json, sys
sys.path.insert(0, {here!r})
import test_seq2seq_bench as b
shape, runtime, fmt, sparsity = {shape!r}, {runtime!r}, {fmt!r}, {sparsity!r}
path = b.model_dir(shape, sparsity if runtime == "sparseinfer" else 0.0)
if runtime == "transformers":
    r = b.run_transformers(shape, path, b.NEW_TOKENS)
else:
    r = b.run_ours(shape, path, fmt, b.NEW_TOKENS)
print("RESULT " + json.dumps(r))
"""


def one(shape: str, runtime: str, fmt: str, sparsity: float) -> dict:
    code = ONE.format(here=str(HERE), shape=shape, runtime=runtime, fmt=fmt, sparsity=sparsity)
    return harness.run_json([sys.executable, "-c", code], prefix="RESULT ", what=f"{shape} {runtime}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="whisper-small,whisper-base,t5-small,t5-base")
    ap.add_argument("--format", default="sparse-int8")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    from conftest import cpu_details

    cpu = cpu_details()
    ours = f"{a.format} {a.sparsity:.0%}"
    lines = [
        f"# Encoder-decoders: transformers fp32 against sparseinfer {ours}, paired rounds",
        "",
        f"Machine: family {cpu.get('cpu_family', '?')} model {cpu.get('model', '?')}, L3 {cpu.get('l3_mib', '?')} "
        "MiB, 2 threads on both sides. Each round runs both cases of a shape one after the other (the order "
        "alternating by round), each in its own process, each the best of 2 examples after a warm-up (the "
        "inputs and timing of bench/test_seq2seq_bench.py). `python bench/seq2seq_paired.py --rounds "
        f"{a.rounds}`.",
        "",
        "| shape | round | transformers decode tok/s | ours decode tok/s | decode ratio | transformers example s "
        "| ours example s | example ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for shape in shapes:
        cases = [("transformers", "fp32"), ("sparseinfer", a.format)]
        run = lambda runtime, fmt, shape=shape: one(shape, runtime, fmt, a.sparsity)  # noqa: E731
        rounds = harness.interleave(cases, a.rounds, run)
        dec = harness.ratios(rounds, "sparseinfer", "transformers", "decode_tok_s")
        # Example time: lower is better, so transformers' over ours.
        ex = harness.ratios(rounds, "transformers", "sparseinfer", "example_s")
        for r, d, e in zip(rounds, dec, ex):
            t, o = r["results"]["transformers"], r["results"]["sparseinfer"]
            lines.append(
                f"| {shape} | {r['round']} | {t['decode_tok_s']:.1f} | {o['decode_tok_s']:.1f} | {d:.2f}x | "
                f"{t['example_s']:.3f} | {o['example_s']:.3f} | {e:.2f}x |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        summary.append(f"| {shape} | {harness.fmt_spread(dec)} | {harness.fmt_spread(ex)} |")
    lines += [
        "",
        f"Median (range) over the rounds, sparseinfer {ours} against transformers fp32:",
        "",
        "| shape | decode tok/s ratio | example time ratio |",
        "|---|---|---|",
        *summary,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
