"""A/B of kernel builds and ISAs on the 1B Llama-shaped model (bench/llama_models.py): decode and prefill per
format, timed by the llama.cpp comparison's own per-case runner (`llamacpp_compare.py --one`: 16-token prompt,
128 new tokens, best of 2; one pass over a 512-token prompt, best of 2), each case in its own process. Within a
round every variant runs back to back, their order rotated round by round, so ratios compare runs minutes apart
on a machine whose bandwidth drifts. Pause anything else that runs (the study) first.

    python bench/ab_builds.py --variant A=/tmp/old:avx2 --variant B=/tmp/new:avx2 --variant V=/tmp/new:avxvnni \\
        --formats sparse-int4,dense-int4 --rounds 2

A variant is NAME=PKGDIR:ISA: PKGDIR holds a `sparseinfer` package with its built extension (a copy of
python/sparseinfer after `make develop`), ISA goes to SPARSEINFER_ISA. The first variant is the baseline of the
ratios; the markdown tables go to stdout.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness
import llama_models

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME=PKGDIR:ISA (two or more)")
    ap.add_argument("--formats", default="sparse-int4,dense-int4,sparse-int8,dense-int8")
    ap.add_argument("--sparsity", type=float, default=0.7, help="of the sparse formats' model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pack-cache", default=None, help="packed-layer cache (default: a temporary one per run)")
    a = ap.parse_args()
    # Each build's entries are keyed by the build, so a shared cache only grows: one per run, removed after it.
    tmp = None if a.pack_cache else tempfile.TemporaryDirectory(prefix="sparseinfer-ab-packed-")
    pack_cache = a.pack_cache or tmp.name
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
            # The variants of one format back to back, so each ratio compares runs seconds apart.
            for name, pkg, isa in harness.rotated(variants, rnd):
                env = dict(os.environ, SPARSEINFER_ISA=isa, PYTHONPATH=pkg, SPARSEINFER_PACK_CACHE=pack_cache)
                case = {"runtime": "ours", "model_dir": str(path), "fmt": fmt}
                argv = [sys.executable, str(HERE / "llamacpp_compare.py"), "--one", json.dumps(case)]
                t = harness.run_json(argv, env=env, what=f"{name} {fmt}")
                if t["kernel_isa"] != isa:
                    raise SystemExit(f"{name} {fmt}: ran on {t['kernel_isa']}, not {isa}")
                r = {"decode": t["tok_s"], "prefill": t["prefill_tok_s"]}
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
    print(
        "| format | ratio | decode, per round | decode, median (range) | prefill, per round | prefill, median (range) |"
    )
    print("|---|---|---|---|---|---|")
    base = names[0]
    for fmt in formats:
        for n in names[1:]:
            pairs = list(zip(res[(fmt, base)], res[(fmt, n)]))
            rd = [b["decode"] / a["decode"] for a, b in pairs]
            rp = [b["prefill"] / a["prefill"] for a, b in pairs]
            print(
                f"| {fmt} | {n} / {base} | {', '.join(f'{x:.2f}' for x in rd)} | {harness.fmt_spread(rd)} | "
                f"{', '.join(f'{x:.2f}' for x in rp)} | {harness.fmt_spread(rp)} |"
            )


if __name__ == "__main__":
    main()
