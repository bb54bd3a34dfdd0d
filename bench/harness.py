"""The timing harness the comparison benchmarks share: cases in rounds, each case in its own process, the order
rotated round by round, an optional read-bandwidth probe per round, and ratios judged per round.

A shared machine's DRAM bandwidth drifts from minute to minute, so a ratio of two cases timed minutes apart can
say more about the minute than about the code. Every comparison here runs each case once per round, back to
back, in an order that rotates every round (so no case always runs first, or always after the same one), and
reports each round's ratio and their median next to the bandwidth measured in that round.

Used by bench/ab_builds.py (builds x ISAs), bench/llamacpp_compare.py (sparseinfer against llama.cpp),
bench/seq2seq_paired.py (sparseinfer against transformers) and bench/test_e2e_bench.py's paired test (sparse
against dense in one process). The per-case timing loops stay where the cases are defined (`time_ours`,
`run_ours`, ...): what is shared is how cases are scheduled, run, paired and summarised.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` in the order round ``round_index`` runs them: rotated left by the round number, so over
    ``len(items)`` rounds every case runs once in every position (two cases: ABBA...)."""
    if not items:
        return []
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def interleave(
    cases: Sequence[tuple[str, Any]],
    rounds: int,
    run: Callable[[str, Any], dict],
    probe: Callable[[], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Runs every named case once per round, in :func:`rotated` order; ``probe`` (a read-bandwidth measurement,
    GB/s) runs at the start of each round. Returns one record per round: ``{"round", "order",
    "read_bandwidth_gbs" (with a probe), "results": {name: run(name, case)}}``."""
    out = []
    for r in range(rounds):
        rec: dict[str, Any] = {"round": r + 1}
        if probe is not None:
            rec["read_bandwidth_gbs"] = probe()
        order = rotated(cases, r)
        rec["order"] = [name for name, _ in order]
        rec["results"] = {}
        for name, case in order:
            rec["results"][name] = run(name, case)
            if log:
                log(f"round {r + 1}: {name}: {_brief(rec['results'][name])}")
        out.append(rec)
    return out


def _brief(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))


def run_json(argv: Sequence[str], env: dict | None = None, prefix: str = "", what: str = "") -> dict:
    """Runs one case in its own process and returns the JSON object it printed last (on the last line that starts
    with ``prefix``). A failed process stops the benchmark with the tail of its stderr."""
    out = subprocess.run(list(argv), env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what or argv[0]}: exit {out.returncode}\n{out.stderr[-2000:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip() and line.startswith(prefix)]
    if not lines:
        raise SystemExit(f"{what or argv[0]}: printed no result line\n{out.stdout[-1000:]}{out.stderr[-1000:]}")
    return json.loads(lines[-1][len(prefix) :])


def per_round(rounds: Iterable[dict], name: str, key: str) -> list[float]:
    """``results[name][key]`` of every round."""
    return [r["results"][name][key] for r in rounds]


def ratios(rounds: Iterable[dict], num: str, den: str, key: str) -> list[float]:
    """Per round, case ``num``'s ``key`` over case ``den``'s (both from the same round)."""
    return [r["results"][num][key] / r["results"][den][key] for r in rounds]


def spread(values: Sequence[float]) -> dict:
    """Median, lowest and highest of per-round figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_spread(values: Sequence[float], unit: str = "x", digits: int = 2) -> str:
    """``median (min-max)`` of per-round figures, e.g. ``1.84x (1.79-1.90)``."""
    s = spread(values)
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# Bytes one cached position costs per key/value head and head dimension, keys and values together, by the
# cache's format (`info()["kv_cache"]`; "bf16" for transformers' bf16 runs). int8 adds two f32 scales per head.
CACHE_VALUE_BYTES = {"f32": 8, "bf16": 4, "f16": 4, "int8": 2}


def cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, kv: str, prompt: int, new_tokens: int) -> float:
    """Mean bytes of the attention cache that one decoded token reads (every earlier position's keys and values),
    over the decoded positions ``prompt .. prompt + new_tokens - 1``."""
    per_position = layers * kv_heads * (head_dim * CACHE_VALUE_BYTES[kv] + (8 if kv == "int8" else 0))
    return per_position * (prompt + (new_tokens - 1) / 2)
