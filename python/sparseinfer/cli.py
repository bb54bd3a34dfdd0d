"""The ``sparseinfer`` command line.

- ``sparseinfer generate [-m MODEL] PROMPT``: stream a completion (default model: SmolLM2-135M-Instruct).
- ``sparseinfer info [MODEL]``: the build and CPU, or a model's architecture, formats and bytes per token.
- ``sparseinfer convert model.gguf OUT_DIR``: import a llama.cpp GGUF as a Hugging Face directory.
- ``sparseinfer bench [MODEL]``: decode tokens/s of a model in each requested weight format.
- ``sparseinfer prune|finetune|quantize|export|train RECIPE``: the training pipeline from a YAML recipe
  (``training/recipes/``; needs ``sparseinfer[train]``).
- ``sparseinfer demo``: every kernel format against numpy's dense f32 ``W @ x`` on a Llama-1B layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from . import build_info, kernels

    if args.threads:
        kernels.set_num_threads(args.threads)
    info = build_info()
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    w[rng.random((rows, cols)) < args.sparsity] = 0.0
    x = rng.standard_normal(cols, dtype=np.float32)
    print(f"sparseinfer {info['version']} ({info['profile']}), isa={info['isa']}, threads={info['threads']}")
    bw = kernels.measure_read_bandwidth(nbytes=512 << 20, repeats=3)
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    print(f"W: {rows}x{cols}, sparsity {args.sparsity:.0%}; {args.copies} copies rotated so reads come from DRAM")

    def timed(fn, mats, nbytes):
        for m in mats[:2]:
            fn(m)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for m in mats:
                fn(m)
            best = min(best, (time.perf_counter() - t) / len(mats))
        return best, nbytes / best / 1e9

    dense = [w.copy() for _ in range(args.copies)]
    base, base_gbs = timed(lambda m: m @ x, dense, w.nbytes)
    del dense
    print(f"{'format':<14}{'bytes/weight':>13}{'time (us)':>11}{'GB/s':>8}{'% of bw':>9}{'vs numpy':>10}  max|err|")
    print(f"{'numpy f32':<14}{4.0:>13.3f}{base * 1e6:>11.1f}{base_gbs:>8.1f}{base_gbs / bw:>9.0%}{1.0:>9.2f}x")
    want = w @ x
    for fmt in kernels.FORMATS:
        m0 = kernels.pack(w, format=fmt)
        mats = [m0] + [m0.copy() for _ in range(args.copies - 1)]
        t, gbs = timed(lambda m: m.matvec(x), mats, m0.nbytes)
        err = float(np.max(np.abs(m0.matvec(x) - want)))
        print(
            f"{fmt:<14}{m0.nbytes / (rows * cols):>13.3f}{t * 1e6:>11.1f}{gbs:>8.1f}{gbs / bw:>9.0%}"
            f"{base / t:>9.2f}x  {err:.2e}"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import load

    model = load(args.model, weights=args.weights, threads=args.threads or None, activations=args.activations)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    stream = model.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    info = model.info()
    print(
        f"[{info['arch']} {info['format']} {info['isa']} x{info['threads']}] {stream.stats.summary()}",
        file=sys.stderr,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import build_info, load

    if args.model is None:
        json.dump(build_info(), sys.stdout, indent=2)
    else:
        info = load(args.model, weights=args.weights).info()
        if not args.layers:
            info.pop("linear")
        json.dump(info, sys.stdout, indent=2)
    print()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import load
    from .kernels import measure_read_bandwidth

    bw = measure_read_bandwidth(nbytes=512 << 20, repeats=3)
    prompt = list(range(10, 10 + args.prompt_tokens))
    print(f"measured read bandwidth {bw:.1f} GB/s; prompt {len(prompt)} tokens, {args.new_tokens} new tokens")
    print(f"{'format':<14}{'MB/token':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'GB/s':>8}{'% bw':>7}")
    for fmt in args.formats.split(","):
        weights = None if fmt == "stored" else fmt
        model = load(args.model, weights=weights, threads=args.threads or None, activations=args.activations)
        info = model.info()
        nbytes = info["bytes_per_token"]
        ids = [t % info["vocab_size"] for t in prompt]
        best = None
        for _ in range(args.repeats):
            stream = model.stream(ids, max_new_tokens=args.new_tokens)
            for _ in stream:
                pass
            st = stream.stats
            if best is None or st.decode_tokens_per_s > best.decode_tokens_per_s:
                best = st
        gbs = nbytes * best.decode_tokens_per_s / 1e9
        print(
            f"{fmt:<14}{nbytes / 1e6:>10.1f}{best.prefill_tokens_per_s:>15.1f}{best.decode_tokens_per_s:>14.1f}"
            f"{gbs:>8.1f}{gbs / bw:>7.0%}"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import recipe as R
    from .training.run import STAGES, run

    recipe = R.load(args.recipe)
    if args.work_dir:
        recipe["work_dir"] = args.work_dir
    if getattr(args, "dense", False):
        recipe["export"] = {**(recipe.get("export") or {}), "sparse": False}
    stages = STAGES if args.command == "train" else (args.command,)
    metrics = run(recipe, stages)
    print(json.dumps(metrics, indent=2, default=float))
    return 0


ACT_HELP = "f32, int8 (per 64-column block) or int8-token (per token); default: the format's own"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion of PROMPT")
    g.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    g.add_argument("-m", "--model", default=None, help="model directory or preset (default: SmolLM2-135M-Instruct)")
    g.add_argument("--weights", default=None, help="pack linear layers into this kernel format (e.g. sparse-int8)")
    g.add_argument("--activations", default=None, help=ACT_HELP)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--threads", type=int, default=0)
    i = sub.add_parser("info", help="the build and CPU, or a model's architecture and formats")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--weights", default=None)
    i.add_argument("--layers", action="store_true", help="list every linear layer")
    c = sub.add_parser("convert", help="import a llama.cpp GGUF file as a Hugging Face directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")
    c.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("bench", help="decode tokens/s of a model in each weight format")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--formats", default="stored,dense-int8,dense-int4,sparse-int8,sparse-int4")
    b.add_argument("--prompt-tokens", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--activations", default=None, help=ACT_HELP)
    for stage, text in [
        ("prune", "one-shot prune the recipe's model (magnitude, wanda, sparsegpt)"),
        ("finetune", "sparse fine-tune with fixed masks (CE / KD / SquareHead); runs under torchrun too"),
        ("quantize", "quantize (RTN / GPTQ) and export the compressed checkpoint"),
        ("export", "export the latest stage's model as a compressed checkpoint"),
        ("train", "every stage of the recipe in order"),
    ]:
        t = sub.add_parser(stage, help=text)
        t.add_argument("recipe", help="a YAML recipe (see training/recipes/)")
        t.add_argument("--work-dir", default=None, help="override the recipe's work_dir")
        if stage in ("quantize", "export", "train"):
            t.add_argument(
                "--dense",
                action="store_true",
                help="export without sparse-bitmask compression (the form stacks that cannot read sparsity load)",
            )
    demo = sub.add_parser("demo", help="time every kernel format against numpy dense f32 on one layer")
    demo.add_argument("--rows", type=int, default=5632)
    demo.add_argument("--cols", type=int, default=2048)
    demo.add_argument("--sparsity", type=float, default=0.7)
    demo.add_argument("--copies", type=int, default=24, help="matrices rotated per timing (defeats the cache)")
    demo.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    from .errors import SparseInferError

    handlers = {"generate": _generate, "info": _info, "convert": _convert, "bench": _bench, "demo": _demo}
    handlers.update({s: _train for s in ("prune", "finetune", "quantize", "export", "train")})
    try:
        return handlers[args.command](args)
    except SparseInferError as e:
        print(f"sparseinfer: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if args.command not in ("prune", "finetune", "quantize", "export", "train"):
            raise
        print(f"sparseinfer: error: {e}", file=sys.stderr)
        return 2
