"""A/B of kernel builds and ISAs on the 1B Llama-shaped model (bench/llama_models.py): decode (16-token prompt,
64 new tokens, best of 2) and prefill (512-token prompt, best of 2) per format, each case in its own process.
Within a round every variant runs back to back, their order rotated round by round, so ratios compare runs
minutes apart on a machine whose bandwidth drifts. Pause anything else that runs (the study) first.

    python bench/ab_builds.py --variant A=/tmp/old:avx2 --variant B=/tmp/new:avx2 --variant V=/tmp/new:avxvnni \\
        --formats sparse-int4,dense-int4 --rounds 2

A variant is NAME=PKGDIR:ISA: PKGDIR holds a `sparseinfer` package with its built extension (a copy of
python/sparseinfer after `make develop`, or the installed one's parent), ISA goes to SPARSEINFER_ISA. The first
variant is the baseline of the ratios; the markdown tables go to stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import llama_models

CHILD = r"""
import json, sys, numpy as np, sparseinfer
path, fmt = sys.argv[1], sys.argv[2]
m = sparseinfer.load(path, weights=fmt, threads=2)
rng = np.random.default_rng(0)
prompt, long = rng.integers(100, 30000, 16).tolist(), rng.integers(100, 30000, 512).tolist()
m.generate_ids(prompt, max_new_tokens=8)
dec = max((m.generate_ids(prompt, max_new_tokens=64), m.last_stats.decode_tokens_per_s)[1] for _ in range(2))
pre = max((m.generate_ids(long, max_new_tokens=1), m.last_stats.prefill_tokens_per_s)[1] for _ in range(2))
print(json.dumps({"decode": dec, "prefill": pre, "isa": sparseinfer.build_info()["isa"], "file": sparseinfer.__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME=PKGDIR:ISA (two or more)")
    ap.add_argument("--formats", default="sparse-int4,dense-int4,sparse-int8,dense-int8")
    ap.add_argument("--sparsity", type=float, default=0.7, help="of the sparse formats' model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pack-cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "sparseinfer-ab-packed"))
    a = ap.parse_args()
    variants = []
    for v in a.variant:
        name, spec = v.split("=", 1)
        pkg, isa = spec.rsplit(":", 1)
        variants.append((name, str(Path(pkg).resolve()), isa))
    formats = a.formats.split(",")
    res = {}
    for rnd in range(a.rounds):
        for fmt in formats:
            path = llama_models.model_dir("1b", a.sparsity if fmt.startswith("sparse") else 0.0)
            k = rnd % len(variants)
            for name, pkg, isa in variants[k:] + variants[:k]:
                env = dict(os.environ, SPARSEINFER_ISA=isa, PYTHONPATH=pkg, SPARSEINFER_PACK_CACHE=a.pack_cache)
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), fmt], env=env, capture_output=True, text=True
                )
                if out.returncode:
                    raise SystemExit(f"{name} {fmt}: {out.stderr[-2000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r["isa"] != isa or not r["file"].startswith(pkg):
                    raise SystemExit(f"{name} {fmt}: ran {r}, not {pkg} on {isa}")
                res.setdefault((fmt, name), []).append(r)
                print(
                    f"round {rnd + 1} {fmt} {name}: decode {r['decode']:.1f} prefill {r['prefill']:.1f}",
                    file=sys.stderr,
                )
    names = [n for n, _, _ in variants]
    print("| format | " + " | ".join(f"{n} decode tok/s | {n} prefill tok/s" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for fmt in formats:
        row = []
        for n in names:
            d, p = ([r[key] for r in res[(fmt, n)]] for key in ("decode", "prefill"))
            row += [f"{min(d):.1f}-{max(d):.1f}", f"{min(p):.1f}-{max(p):.1f}"]
        print(f"| {fmt} | " + " | ".join(row) + " |")
    print()
    print("| format | ratio | decode, per round | prefill, per round | prefill, median |")
    print("|---|---|---|---|---|")
    base = names[0]
    for fmt in formats:
        for n in names[1:]:
            pairs = list(zip(res[(fmt, base)], res[(fmt, n)]))
            rd = [b["decode"] / a["decode"] for a, b in pairs]
            rp = [b["prefill"] / a["prefill"] for a, b in pairs]
            print(
                f"| {fmt} | {n} / {base} | {', '.join(f'{x:.2f}' for x in rd)} | "
                f"{', '.join(f'{x:.2f}' for x in rp)} | {statistics.median(rp):.2f} |"
            )


if __name__ == "__main__":
    main()
