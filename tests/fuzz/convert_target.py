"""Coverage-guided fuzzing of GGUF conversion (``sparseinfer convert``), the loader written in Python, with
atheris (libFuzzer for Python). A GGUF file is untrusted input: every input must convert, or fail with a
typed ``ValueError`` subclass, and a converted model must load and run, or refuse the same way.

    python tests/fuzz/convert_target.py seeds DIR       # tiny GGUFs written by the gguf package's GGUFWriter
    python tests/fuzz/convert_target.py fuzz CORPUS... [libFuzzer flags]    # the campaign (needs atheris)

``make fuzz-convert`` runs the campaign on the committed corpus (tests/fuzz/corpus/convert: the seeds and the
inputs a campaign kept, copied from FUZZ_WORK/convert); tests/test_convert_untrusted.py replays that corpus
through :func:`one_input` without atheris. At nice 19 the campaign gets almost no CPU beside a training run:
pause the training while it runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "convert"


def one_input(data: bytes) -> None:
    """Converts ``data`` as a GGUF file and runs the result. Raises only for a finding: anything that is not
    a ``ValueError`` (the base of every typed sparseinfer input error), except that keeping the grid of a valid
    file whose linears have no integer grid (F16, K-quants) is an ``UnsupportedError``."""
    import sparseinfer
    from sparseinfer.convert import convert_gguf

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        path.write_bytes(data)
        # Dequantized to float32, and (keep_grid) with the linears' own integer grid.
        for keep_grid in (False, True):
            try:
                out = convert_gguf(path, Path(d) / f"out-{keep_grid}", keep_grid=keep_grid)
            except ValueError:
                continue
            except sparseinfer.UnsupportedError as e:
                if keep_grid and "keeping the grid" in str(e):
                    continue
                raise
            try:
                sparseinfer.load(out, pack_cache=False).logits([0, 1])
            except ValueError:
                continue


def write_seeds(directory: Path) -> list[Path]:
    """The valid tiny Llama as f32, f16, Q8_0, Q4_0 and Q4_1 GGUFs, and one without its tokenizer merges."""
    sys.path.insert(0, str(HERE.parent))
    import gguf
    import numpy as np
    import tiny_models
    from hostile_models import VOCAB, llama_tensors
    from test_convert_untrusted import gguf_name, tiny_gguf

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tok:
        tok = Path(tok)
        tiny_models.tokenizer_json(tok, VOCAB)
        written = [tiny_gguf(directory / "seed-f32.gguf", tok)]
        # Quantized matrices as the gguf package quantizes them (the embedding and norms stay f32).
        for name, qtype in [
            ("f16", gguf.GGMLQuantizationType.F16),
            ("q8_0", gguf.GGMLQuantizationType.Q8_0),
            ("q4_0", gguf.GGMLQuantizationType.Q4_0),
            ("q4_1", gguf.GGMLQuantizationType.Q4_1),
        ]:
            tensors = {}
            for hf, a in llama_tensors().items():
                if a.ndim == 2 and "embed" not in hf:
                    q = gguf.quants.quantize(a.astype(np.float32), qtype)
                    tensors[gguf_name(hf)] = {"tensor": q, "raw_dtype": qtype}
            written.append(tiny_gguf(directory / f"seed-{name}.gguf", tok, tensors=tensors))
        written.append(tiny_gguf(directory / "seed-no-merges.gguf", tok, drop=("tokenizer.ggml.merges",)))
    return written


def main(argv: list[str]) -> None:
    if argv[:1] == ["seeds"]:
        for p in write_seeds(Path(argv[1]) if len(argv) > 1 else CORPUS):
            print(p, p.stat().st_size)
        return
    if argv[:1] != ["fuzz"]:
        raise SystemExit(__doc__)
    import atheris
    import numpy  # noqa: F401  (imported first: only the parsers below are instrumented)

    import sparseinfer  # noqa: F401

    with atheris.instrument_imports(include=["gguf", "sparseinfer.convert"]):
        import gguf  # noqa: F401  (the GGUF reader the conversion drives)

        import sparseinfer.convert  # noqa: F401
    atheris.Setup([sys.argv[0], *argv[1:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
