"""Turns a pytest-benchmark JSON of bench/test_train_bench.py into a markdown table.

python bench/report_train.py bench/results/train.json docs/benchmarks
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(src: str, out_dir: str) -> None:
    data = json.loads(Path(src).read_text())
    info = next(b["extra_info"] for b in data["benchmarks"] if "rows" in b["extra_info"])
    m = info["model"]
    lines = [
        f"# Training-step throughput: SmolLM2-135M on {cpu_name()}, {info['threads']} threads",
        "",
        "Produced by `make bench-train` (bench/test_train_bench.py, torch "
        f"{info['torch']}). One fine-tuning step (forward, backward, AdamW) per case and round; the rounds "
        "alternate between the cases; each figure is the median over the rounds. *plain fp32*: fp32 student and "
        "teacher, the model's own logits and losses, the per-tensor AdamW loop. *fast bf16*: bf16 autocast with "
        "fp32 master weights, the teacher in bf16 under inference_mode, the head's CE/KD in token chunks "
        "(`head_losses`), fused AdamW. GFLOPS count the work a step needs: 6 x linear parameters per student "
        "token plus attention, 2 x for the teacher's forward, the head only where a loss reads logits "
        f"({m['linear_params'] / 1e6:.0f}M linear parameters, {m['head_params'] / 1e6:.0f}M in the head, "
        f"{m['layers']} layers).",
        "",
        "| micro-batch | loss | path | s / step | training tokens/s | GFLOPS | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['batch']} x {r['seq_len']} | {r['loss']} | {r['path']} | {r['seconds_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['gflops']:.0f} | {r['speedup']:.2f}x |"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.md").write_text("\n".join(lines) + "\n")
    (out / "train.json").write_text(json.dumps(info, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
