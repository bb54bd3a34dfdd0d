"""Turns a pytest-benchmark JSON of bench/test_load_bench.py into a markdown table.

python bench/report_load.py bench/results/load.json docs/benchmarks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(data) -> str:
    rows = [b["extra_info"] for b in data["benchmarks"]]
    if not rows:
        return "# Load time\n"
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    r0 = rows[0]
    out = [
        "# Load time: packing against the load cache",
        "",
        f"Machine: {cpu}, {r0['threads']} threads, ISA {r0['isa']}. Random Llama-shaped {r0['size']} model "
        f"(f16 safetensors, {r0['checkpoint_bytes'] / 1e9:.2f} GB). Each round loads once packing from the "
        "checkpoint (`pack_cache=False`) and once from the cache entry the first load wrote, in alternating order; "
        "both read files the page cache holds. A load from the cache also copies the embedding table from the "
        "checkpoint and checks every record's digest and invariants, so its time is more than the entry's bytes at "
        "the read bandwidth. Made by `make bench-load`.",
        "",
        "| format | first load, writing the entry (s) | packing (s, median) | from the cache (s, median) | speedup "
        "| entry (GB) | entry / load time (GB/s) | read bandwidth (GB/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bw = sorted(x["read_bandwidth_gbs"] for x in r["rounds"])[len(r["rounds"]) // 2]
        label = r["format"] + (f" {r['sparsity']:.0%}" if r["sparsity"] else "")
        out.append(
            f"| {label} | {r['first_load_s']:.2f} | {r['packing_s']:.2f} | {r['cached_s']:.2f} | "
            f"{r['speedup']:.1f}x | {r['entry_bytes'] / 1e9:.2f} | {r['cached_read_gbs']:.1f} | {bw:.1f} |"
        )
    out += ["", "Every round:", "", "| format | round | packing (s) | from the cache (s) | read bandwidth (GB/s) |"]
    out.append("|---|---|---|---|---|")
    for r in rows:
        for i, x in enumerate(r["rounds"]):
            out.append(
                f"| {r['format']} | {i + 1} | {x['packing_s']:.2f} | {x['cached_s']:.2f} | "
                f"{x['read_bandwidth_gbs']:.1f} |"
            )
    return "\n".join(out) + "\n"


def main(src, dst):
    data = json.loads(Path(src).read_text())
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "load.md").write_text(table(data))
    print((dst / "load.md").read_text())


if __name__ == "__main__":
    main(*sys.argv[1:3])
