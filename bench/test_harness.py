"""The shared benchmark harness (bench/harness.py): rotation, interleaving with a probe per round, running a
case in its own process, and per-round ratios."""

import json
import sys

import harness
import pytest


def test_rotation_puts_every_case_in_every_position():
    cases = ["a", "b", "c"]
    orders = [harness.rotated(cases, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert harness.rotated(cases, 4) == orders[1]
    assert [harness.rotated("AB", r) for r in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert harness.rotated([], 3) == []


def test_interleave_runs_each_case_once_per_round_after_its_probe():
    calls = []
    probes = iter([30.0, 25.0, 35.0])

    def probe():
        calls.append("probe")
        return next(probes)

    def run(name, case):
        calls.append(name)
        return {"tok_s": case * (len(calls))}

    rounds = harness.interleave([("dense", 1.0), ("sparse", 2.0)], 3, run, probe=probe)
    assert calls == ["probe", "dense", "sparse", "probe", "sparse", "dense", "probe", "dense", "sparse"]
    assert [r["read_bandwidth_gbs"] for r in rounds] == [30.0, 25.0, 35.0]
    assert [r["order"] for r in rounds] == [["dense", "sparse"], ["sparse", "dense"], ["dense", "sparse"]]
    # Ratios pair the two cases of the same round.
    assert harness.ratios(rounds, "sparse", "dense", "tok_s") == [2 * 3 / 2, 2 * 5 / 6, 2 * 9 / 8]
    assert harness.per_round(rounds, "dense", "tok_s") == [2.0, 6.0, 8.0]
    assert harness.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert harness.fmt_spread([1.5, 1.25, 2.0]) == "1.50x (1.25-2.00)"


def test_run_json_reads_the_last_result_line_and_stops_on_failure():
    code = "print('noise'); print('RESULT ' + __import__('json').dumps({'x': 1})); print('RESULT {\"x\": 2}')"
    assert harness.run_json([sys.executable, "-c", code], prefix="RESULT ") == {"x": 2}
    assert harness.run_json([sys.executable, "-c", f"print({json.dumps(json.dumps({'y': 3}))})"]) == {"y": 3}
    with pytest.raises(SystemExit, match="case X: exit 3(.|\n)*boom"):
        fail = "import sys; print('boom', file=sys.stderr); sys.exit(3)"
        harness.run_json([sys.executable, "-c", fail], what="case X")
    with pytest.raises(SystemExit, match="no result line"):
        harness.run_json([sys.executable, "-c", "print('nothing')"], prefix="RESULT ")


def test_cache_bytes_count_every_earlier_position_at_the_mean_decoded_one():
    # A 16-layer model with 16 key/value heads of 128: 256 KiB per position in f32, keys and values together.
    per_position = 16 * 16 * 128 * 8
    assert harness.cache_bytes_per_token(16, 16, 128, "f32", 16, 128) == per_position * (16 + 127 / 2)
    assert harness.cache_bytes_per_token(16, 16, 128, "f16", 16, 1) == per_position / 2 * 16
    assert harness.cache_bytes_per_token(16, 16, 128, "bf16", 16, 1) == per_position / 2 * 16
    # int8: a byte per value and two f32 scales per head and position.
    assert harness.cache_bytes_per_token(2, 3, 64, "int8", 10, 1) == 2 * 3 * (2 * 64 + 8) * 10
