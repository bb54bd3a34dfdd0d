"""The ``sparseinfer`` command line.

- ``sparseinfer generate [-m MODEL] PROMPT``: stream a completion (default model: SmolLM2-135M-Instruct).
- ``sparseinfer info [MODEL]``: the build and CPU, or a model's architecture, formats and bytes per token.
- ``sparseinfer convert model.gguf OUT_DIR``: import a llama.cpp GGUF as a Hugging Face directory.
- ``sparseinfer bench [MODEL] [-o json]``: decode tokens/s of a model in each requested weight format.
- ``sparseinfer prune|finetune|quantize|export|train RECIPE``: the training pipeline from a YAML recipe
  (``training/recipes/``; needs ``sparseinfer[train]``).
- ``sparseinfer demo``: every kernel format against numpy's dense f32 ``W @ x`` on a Llama-1B layer.

A model is a local Hugging Face directory or a preset name (``sparseinfer.models``); nothing is downloaded. User
errors (a bad path, a bad recipe, a missing optional package) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


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
    bw = kernels.measure_read_bandwidth(repeats=3)
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


#: ``org/name``: how a Hugging Face Hub id looks (a local path would exist, or start with ``.`` or ``/``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str) -> Path | None:
    """A snapshot of ``repo_id`` already in the local Hugging Face cache, if any."""
    cache = os.environ.get("HF_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    snapshots = Path(cache).expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        found = sorted((d for d in snapshots.iterdir() if (d / "config.json").is_file()), key=os.path.getmtime)
    except OSError:
        return None
    return found[-1] if found else None


def _check_model(model: str | None) -> None:
    """Refuses, with a hint, a model argument that names no local model directory: a GGUF file (convert it
    first) or a Hugging Face Hub id (download it first). Presets and directories pass."""
    from .errors import InvalidInputError

    if model is None:
        return
    path = Path(model)
    if path.is_dir():
        return
    if model.lower().endswith(".gguf"):
        if path.is_file():
            raise InvalidInputError(
                f"{model} is a GGUF file; import it first with: sparseinfer convert {model} OUT_DIR (then -m OUT_DIR)"
            )
        raise InvalidInputError(f"{model} does not exist")
    if path.exists():
        raise InvalidInputError(f"{model} is a file; a model is a directory (config.json, model.safetensors, ...)")
    from .models import presets

    names = presets()
    if model in names:
        return
    if _HUB_ID.match(model):
        snapshot = _hub_snapshot(model)
        if snapshot is not None:
            hint = f"a copy is in the Hugging Face cache: -m {snapshot}"
        else:
            hint = f"download it first, e.g. hf download {model} --local-dir DIR (huggingface_hub), then -m DIR"
        raise InvalidInputError(f"{model} is not a local directory and sparseinfer does not download models; {hint}")
    raise InvalidInputError(f"model directory {model!r} does not exist (presets: {', '.join(names)})")


def _generate(args: argparse.Namespace) -> int:
    from . import load

    _check_model(args.model)
    model = load(
        args.model,
        weights=args.weights,
        threads=args.threads or None,
        activations=args.activations,
        kv_cache=args.kv_cache,
    )
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


def _transcribe(args: argparse.Namespace) -> int:
    from . import load

    _check_model(args.model)
    model = load(args.model, weights=args.weights, threads=args.threads or None, activations=args.activations)
    out = model.transcribe(
        args.audio,
        task=args.task,
        language=args.language,
        return_ids=args.ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(json.dumps(out) if args.ids else out)
    info, st = model.info(), model.last_stats
    lang = f", language {st.extra['language']}" if "language" in st.extra else ""
    print(
        f"[{info['arch']} {info['format']} {info['isa']} x{info['threads']}] {st.extra['windows']} window(s){lang}: "
        f"encoder + first token {st.prefill_s:.2f} s, {st.summary()}",
        file=sys.stderr,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import build_info, load

    if args.model is None:
        json.dump(build_info(), sys.stdout, indent=2)
    else:
        _check_model(args.model)
        info = load(args.model, weights=args.weights).info()
        if not args.layers:
            info.pop("linear")
        json.dump(info, sys.stdout, indent=2)
    print()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite, keep_grid=args.keep_grid)
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import build_info, load
    from .kernels import measure_read_bandwidth

    _check_model(args.model)
    as_json = args.output == "json"
    bw = measure_read_bandwidth(repeats=3)
    prompt = list(range(10, 10 + args.prompt_tokens))
    if not as_json:
        print(f"measured read bandwidth {bw:.1f} GB/s; prompt {len(prompt)} tokens, {args.new_tokens} new tokens")
        print(f"{'format':<14}{'MB/token':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'GB/s':>8}{'% bw':>7}")
    rows = []
    for fmt in args.formats:
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
        rows.append(
            {
                "format": fmt,
                "packed_format": info["format"],
                "activations": info.get("activations"),
                "kernel": info.get("kernel"),
                "threads": info["threads"],
                "bytes_per_token": nbytes,
                "prompt_tokens": best.prompt_tokens,
                "decode_tokens": best.decode_tokens,
                "prefill_tokens_per_s": best.prefill_tokens_per_s,
                "decode_tokens_per_s": best.decode_tokens_per_s,
                "decode_gb_per_s": gbs,
                "fraction_of_bandwidth": gbs / bw,
            }
        )
        if not as_json:
            print(
                f"{fmt:<14}{nbytes / 1e6:>10.1f}{best.prefill_tokens_per_s:>15.1f}{best.decode_tokens_per_s:>14.1f}"
                f"{gbs:>8.1f}{gbs / bw:>7.0%}"
            )
    if as_json:
        out = {
            "model": args.model,
            "read_bandwidth_gb_per_s": bw,
            "prompt_tokens": len(prompt),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "build": build_info(),
            "results": rows,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
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


#: The optional package behind a missing module, for the one-line error.
_EXTRAS = {
    "torch": "sparseinfer[train]",
    "transformers": "sparseinfer[train]",
    "safetensors": "sparseinfer[train]",
    "yaml": "sparseinfer[train]",
    "compressed_tensors": "sparseinfer[train]",
    "gguf": "sparseinfer[convert]",
    "jinja2": "sparseinfer[chat]",
    "tokenizers": "tokenizers",
}

ACTIVATIONS = ("f32", "int8", "int8-token")
ACT_HELP = (
    "how linear layers meet their inputs: f32, int8 (one scale per 64-column block) or int8-token (one scale per "
    "token); default: the weight format's own"
)
THREADS_HELP = "worker threads; 0: SPARSEINFER_NUM_THREADS, else one per core"
MODEL_HELP = (
    "a local Hugging Face model directory or a preset (dense, dense-bf16, dense-int8, dense-int4, study-*); "
    "default: SmolLM2-135M-Instruct, converted from its GGUF on first use. Hub ids are not downloaded"
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help, unless it is None or False (said in words instead)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and not any(default is v for v in (None, False, argparse.SUPPRESS))
        ):
            text += " (default: %(default)s)"
        return text


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _format_list(formats):
    def parse(text: str) -> list[str]:
        items = [f.strip() for f in text.split(",") if f.strip()]
        bad = [f for f in items if f not in formats]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown format {bad[0] if bad else text!r}; choose from {', '.join(formats)}"
            )
        return items

    parse.__name__ = "format list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .kernels import FORMATS

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="sparseinfer", description=__doc__.replace("``", ""), formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"sparseinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    weights_help = (
        f"pack every linear layer into this kernel format (zeros become the sparsity pattern): {', '.join(FORMATS)}; "
        "default: as stored"
    )

    g = sub.add_parser("generate", help="stream a completion of PROMPT", formatter_class=fmt)
    g.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    g.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    g.add_argument("--weights", default=None, choices=FORMATS, metavar="FORMAT", help=weights_help)
    g.add_argument("--activations", default=None, choices=ACTIVATIONS, help=ACT_HELP)
    g.add_argument(
        "--kv-cache",
        default=None,
        choices=("f32", "f16", "int8"),
        help="how the attention cache keeps keys and values (default: f16 with int8 activations, else f32); f16 "
        "reads half the bytes of f32, int8 a quarter (long prompts)",
    )
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument(
        "--top-k", type=_positive(int), default=None, help="sample from the k likeliest tokens; default: all"
    )
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default: off")
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalize tokens already in the context; 1 is off"
    )
    g.add_argument("--seed", type=int, default=None, help="sampling seed; default: random")
    g.add_argument("--stop", action="append", default=None, help="stop at this string (repeatable); default: EOS only")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)

    t = sub.add_parser("transcribe", help="transcribe or translate speech with a Whisper model", formatter_class=fmt)
    t.add_argument("audio", help="a WAV file (any rate and channel count; resampled to the model's)")
    t.add_argument("-m", "--model", required=True, help="a Whisper model directory")
    t.add_argument(
        "--task", default=None, choices=("transcribe", "translate"), help="translate: English text of any language"
    )
    t.add_argument("--language", default=None, help="the spoken language's code (e.g. de); default: detect it")
    t.add_argument("--weights", default=None, choices=FORMATS, metavar="FORMAT", help=weights_help)
    t.add_argument("--activations", default=None, choices=ACTIVATIONS, help=ACT_HELP)
    t.add_argument("--max-new-tokens", type=_non_negative_int, default=None, help="tokens per 30 s window at most")
    t.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    t.add_argument("--seed", type=int, default=None, help="sampling seed; default: random")
    t.add_argument("--ids", action="store_true", help="print the generated token ids (JSON) instead of text")
    t.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)

    i = sub.add_parser("info", help="the build and CPU, or a model's architecture and formats", formatter_class=fmt)
    i.add_argument("model", nargs="?", default=None, help="a model directory or preset; default: the build and CPU")
    i.add_argument("--weights", default=None, choices=FORMATS, metavar="FORMAT", help=weights_help)
    i.add_argument("--layers", action="store_true", help="list every linear layer")

    c = sub.add_parser("convert", help="import a llama.cpp GGUF file as a Hugging Face directory", formatter_class=fmt)
    c.add_argument("gguf", help="the .gguf file (llama architecture)")
    c.add_argument("out_dir", help="the Hugging Face directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    c.add_argument(
        "--keep-grid",
        action="store_true",
        help="keep the linear layers' Q4_0/Q4_1/Q8_0 codes and scales exactly (a compressed checkpoint that "
        "loads on the same grid) instead of dequantizing to float32",
    )

    b = sub.add_parser("bench", help="decode tokens/s of a model in each weight format", formatter_class=fmt)
    b.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    bench_formats = ("stored", *FORMATS)
    b.add_argument(
        "--formats",
        type=_format_list(bench_formats),
        default="stored,dense-int8,dense-int4,sparse-int8,sparse-int4",
        help=f"comma-separated weight formats from: {', '.join(bench_formats)} ('stored': as saved)",
    )
    b.add_argument("--prompt-tokens", type=_positive(int), default=16, help="prompt length")
    b.add_argument("--new-tokens", type=_positive(int), default=64, help="tokens decoded per run")
    b.add_argument("--repeats", type=_positive(int), default=2, help="runs per format; the fastest is reported")
    b.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)
    b.add_argument("--activations", default=None, choices=ACTIVATIONS, help=ACT_HELP)
    b.add_argument(
        "-o", "--output", default="table", choices=("table", "json"), help="a table, or one JSON object on stdout"
    )

    for stage, text in [
        ("prune", "one-shot prune the recipe's model (magnitude, wanda, sparsegpt)"),
        ("finetune", "sparse fine-tune with fixed masks (CE / KD / SquareHead); runs under torchrun too"),
        ("quantize", "quantize (RTN / GPTQ) and export the compressed checkpoint"),
        ("export", "export the latest stage's model as a compressed checkpoint"),
        ("train", "every stage of the recipe in order"),
    ]:
        t = sub.add_parser(stage, help=f"{text} (needs sparseinfer[train])", description=text, formatter_class=fmt)
        t.add_argument("recipe", help="a YAML recipe (see training/recipes/)")
        t.add_argument("--work-dir", default=None, help="override the recipe's work_dir")
        if stage in ("quantize", "export", "train"):
            t.add_argument(
                "--dense",
                action="store_true",
                help="export without sparse-bitmask compression (the form stacks that cannot read sparsity load)",
            )

    demo = sub.add_parser(
        "demo", help="time every kernel format against numpy dense f32 on one layer", formatter_class=fmt
    )
    demo.add_argument("--rows", type=_positive(int), default=5632, help="output features of the layer")
    demo.add_argument("--cols", type=_positive(int), default=2048, help="input features of the layer")
    demo.add_argument("--sparsity", type=_fraction, default=0.7, help="fraction of weights set to zero")
    demo.add_argument(
        "--copies", type=_positive(int), default=24, help="matrices rotated per timing (defeats the cache)"
    )
    demo.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)
    return parser


TRAINING = ("prune", "finetune", "quantize", "export", "train")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import SparseInferError

    handlers = {
        "generate": _generate,
        "transcribe": _transcribe,
        "info": _info,
        "convert": _convert,
        "bench": _bench,
        "demo": _demo,
    }
    handlers.update(dict.fromkeys(TRAINING, _train))

    def fail(message: str) -> int:
        print(f"sparseinfer: error: {message}", file=sys.stderr)
        return 2

    try:
        return handlers[args.command](args)
    except SparseInferError as e:
        return fail(str(e))
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        need = "sparseinfer[train]" if args.command in TRAINING else _EXTRAS[top]
        return fail(f"the {args.command!r} command needs the {top!r} package: pip install '{need}'")
    except ImportError as e:
        if args.command not in TRAINING or "sparseinfer[train]" not in str(e):
            raise
        return fail(str(e))
    except (ValueError, OSError) as e:
        # Bad recipes, files that are missing or unreadable; the training stack's own bad-input errors.
        if isinstance(e, ValueError) and args.command not in TRAINING:
            raise
        return fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
