"""What fraction of the read bandwidth each format's decode uses, over alternated rounds: the 1B Llama-shaped
model (bench/llama_models.py) loaded once per format, then every round decodes 128 tokens after a 16-token prompt
with each format in turn (the order rotated round by round), each run between two read-bandwidth probes of its
own. A run's fraction is (weight bytes + the cache bytes its decoded tokens read) x tokens/s over the mean of its
two probes; the table gives each format's median over the rounds and their range. `make bench-e2e` times each
case once, minutes from the others, on a VM whose bandwidth drifts by tens of percent: this asks the same
question ("every format's decode >= 75 % of the bandwidth") of many runs. Pause anything else that runs (the
study) first.

    python bench/bandwidth_rounds.py --rounds 5 --report docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import harness
import llama_models
import numpy as np
from report_train import cpu_name

import sparseinfer
from sparseinfer import kernels

FORMATS = [("dense-int8", 0.0), ("dense-int4", 0.0)]
FORMATS += [(f, s) for f in ("sparse-int8", "sparse-int4") for s in (0.5, 0.7, 0.8)]
PROMPT_TOKENS, NEW_TOKENS = 16, 128
GOAL = 0.75


def name(fmt: str, sparsity: float) -> str:
    return f"{fmt} {sparsity:.0%}" if sparsity else fmt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b", choices=["134m", "1b"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", default=None, help="comma-separated case names (default: every format)")
    ap.add_argument("--report", default=None, help="directory for bandwidth-rounds.md and .json")
    a = ap.parse_args()
    cases = [(name(f, s), (f, s)) for f, s in FORMATS]
    if a.formats:
        cases = [c for c in cases if c[0] in a.formats.split(",")]
    c = llama_models.config(a.size)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    shape = (c["num_hidden_layers"], c["num_key_value_heads"], head_dim)
    models = {}
    for n, (fmt, s) in cases:
        t = time.perf_counter()
        models[n] = sparseinfer.load(llama_models.model_dir(a.size, s), weights=fmt)
        print(f"loaded {n} in {time.perf_counter() - t:.1f} s", flush=True)
    ids = [int(t) for t in np.random.default_rng(0).integers(10, c["vocab_size"], PROMPT_TOKENS)]
    for m in models.values():
        m.eos_token_ids = frozenset()
        m.generate_ids(ids, max_new_tokens=4)  # warm up
    probe = kernels.BandwidthProbe()

    def run(n: str, _case) -> dict:
        m = models[n]
        before = probe.measure(repeats=1)
        m.generate_ids(ids, max_new_tokens=NEW_TOKENS)
        after = probe.measure(repeats=1)
        info, tok_s = m.info(), m.last_stats.decode_tokens_per_s
        cache = harness.cache_bytes_per_token(*shape, info["kv_cache"], PROMPT_TOKENS, NEW_TOKENS)
        gbs = (info["bytes_per_token"] + cache) * tok_s / 1e9
        return {
            "decode_tok_s": tok_s,
            "gbs": gbs,
            "probes_gbs": [before, after],
            "fraction": gbs / ((before + after) / 2),
            "bytes_per_token": info["bytes_per_token"],
            "cache_bytes_per_token": cache,
            "kv_cache": info["kv_cache"],
            "kernel": info["kernel"],
        }

    rounds = harness.interleave(cases, a.rounds, run, log=lambda s: print(s, flush=True))
    cpu = cpu_name()
    rows = []
    for n, _ in cases:
        fr = harness.per_round(rounds, n, "fraction")
        first = rounds[0]["results"][n]
        rows.append(
            {
                "case": n,
                "mb_per_token": (first["bytes_per_token"] + first["cache_bytes_per_token"]) / 1e6,
                "decode_tok_s": statistics.median(harness.per_round(rounds, n, "decode_tok_s")),
                "gbs": statistics.median(harness.per_round(rounds, n, "gbs")),
                "fraction": harness.spread(fr),
                "kernel": first["kernel"],
            }
        )
    probes = [p for r in rounds for res in r["results"].values() for p in res["probes_gbs"]]
    lines = [
        "# Decode's fraction of the read bandwidth, over alternated rounds",
        "",
        f"Machine: {cpu}, {kernels.num_threads()} threads, ISA {sparseinfer.build_info()['isa']}; model {a.size}; "
        f"{a.rounds} rounds, the formats' order rotated each round; probes {min(probes):.1f}-{max(probes):.1f} GB/s "
        f"(each run between two of its own). `python bench/bandwidth_rounds.py --size {a.size} --rounds {a.rounds}`. "
        "A run's "
        "fraction: (weight + cache bytes per decoded token) x tokens/s over the mean of its two probes; median "
        "over the rounds (range).",
        "",
        "| format | MB/token (weights + cache) | decode tok/s (median) | GB/s (median) | % of bandwidth | kernel |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fraction"]
        lines.append(
            f"| {r['case']} | {r['mb_per_token']:.0f} | {r['decode_tok_s']:.1f} | {r['gbs']:.1f} | "
            f"{f['median']:.0%} ({f['min']:.0%}-{f['max']:.0%}) | {r['kernel']} |"
        )
    below = [r["case"] for r in rows if r["fraction"]["median"] < GOAL]
    lines += [
        "",
        f"Every format at >= {GOAL:.0%} (median): " + ("yes." if not below else f"no: {', '.join(below)}."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        out = Path(a.report)
        (out / "bandwidth-rounds.md").write_text(text, encoding="utf-8")
        record = {"cpu": cpu, "size": a.size, "rounds": rounds, "summary": rows, "goal": GOAL}
        (out / "bandwidth-rounds.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
