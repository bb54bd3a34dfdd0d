"""Training data from local files (no hub access): plain text files or folders of them cut into fixed-length
sequences, JSONL prompt/answer pairs with answer-only labels, and ``datasets`` objects when installed.

A causal LM example is ``{"input_ids": LongTensor[S], "labels": LongTensor[S]}`` with -100 where the loss does not
count. An encoder-decoder (seq2seq) example is ``{"input_ids": LongTensor[S_enc], "labels": LongTensor[S_dec]}``:
the prompt goes to the encoder and the answer is the decoder's target (``input_features`` [mel, frames] instead of
``input_ids`` for Whisper). ``collate`` pads either kind into model inputs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with a transformers tokenizer or a ``tokenizers.Tokenizer`` (no special tokens)."""
    if hasattr(tokenizer, "encode") and type(tokenizer).__module__.startswith("tokenizers"):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_files(path: str | os.PathLike[str], suffixes: Sequence[str] = (".txt", ".md")) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    if not files:
        raise ValueError(f"{p} holds no {'/'.join(suffixes)} files")
    return files


def chunk_text(tokenizer, texts: Iterable[str], seq_len: int, eos_id: int | None = None) -> list[dict]:
    """Concatenates the token ids of ``texts`` (separated by ``eos_id`` when given) and cuts them into
    ``seq_len``-token examples (the last partial chunk is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    for t in texts:
        ids.extend(encode(tokenizer, t))
        if eos_id is not None:
            ids.append(eos_id)
    out = []
    for i in range(0, len(ids) - seq_len + 1, seq_len):
        x = torch.tensor(ids[i : i + seq_len], dtype=torch.long)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def load_text(tokenizer, path, seq_len: int, eos_id: int | None = None) -> list[dict]:
    """Fixed-length examples from a text file or a folder of ``.txt``/``.md`` files."""
    return chunk_text(tokenizer, (f.read_text(encoding="utf-8") for f in text_files(path)), seq_len, eos_id)


def load_jsonl(
    tokenizer,
    path,
    seq_len: int,
    answer_only: bool = True,
    seq2seq: bool = False,
    eos_id: int | None = None,
) -> list[dict]:
    """Examples from JSONL lines ``{"prompt": ..., "answer": ...}``; with ``answer_only`` the prompt tokens get
    label -100 so only the answer is learned. Truncated to ``seq_len``.

    With ``seq2seq`` the prompt is the encoder input and the answer the labels, each ending in ``eos_id`` when
    given (T5 and BART expect it) and truncated to ``seq_len`` separately."""
    out = []
    eos = [] if eos_id is None else [eos_id]
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt, answer = rec["prompt"], rec["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and 'answer' ({e})") from e
            p, a = encode(tokenizer, prompt), encode(tokenizer, answer)
            if seq2seq:
                ids, labels = (p[: seq_len - len(eos)] + eos), (a[: seq_len - len(eos)] + eos)
                if not labels:
                    raise ValueError(f"{path}:{n}: empty answer")
            else:
                ids = (p + a)[:seq_len]
                labels = ([-100] * len(p) + a)[:seq_len] if answer_only else list(ids)
            out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``labels`` [B, S] shifted one step right behind ``start_id``, with the
    -100 of ignored positions read as ``pad_id``."""
    out = torch.full_like(labels, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return out


def collate(examples: Sequence[dict], pad_id: int = 0, decoder_start_id: int | None = None) -> dict:
    """Right-pads a list of examples into one batch of model inputs.

    Causal LM (``decoder_start_id`` None): ``input_ids``, ``attention_mask`` [B, S] and ``labels`` (-100 on
    padding), the labels aligned with the inputs. Encoder-decoder: the encoder side (``input_ids`` +
    ``attention_mask``, or stacked ``input_features``), ``labels`` [B, T] (-100 on padding), and the decoder side
    ``decoder_input_ids`` (``shift_right`` of the labels) and ``decoder_attention_mask`` [B, T]."""
    if decoder_start_id is not None:
        batch = {}
        if "input_features" in examples[0]:
            batch["input_features"] = torch.stack([torch.as_tensor(e["input_features"]) for e in examples])
        else:
            enc = _pad([e["input_ids"] for e in examples], pad_id)
            batch["input_ids"], batch["attention_mask"] = enc, _pad_mask([e["input_ids"] for e in examples])
        labels = _pad([e["labels"] for e in examples], -100)
        batch["labels"] = labels
        batch["decoder_input_ids"] = shift_right(labels, decoder_start_id, pad_id)
        batch["decoder_attention_mask"] = _pad_mask([e["labels"] for e in examples])
        return batch
    ids = _pad([e["input_ids"] for e in examples], pad_id)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        lab = torch.as_tensor(e.get("labels", e["input_ids"]))
        labels[i, : len(lab)] = lab
    return {"input_ids": ids, "attention_mask": _pad_mask([e["input_ids"] for e in examples]), "labels": labels}


def _pad(seqs: Sequence, value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


def _pad_mask(seqs: Sequence) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        mask[i, : len(s)] = 1
    return mask


def seq2seq_ids(model) -> tuple[int, int] | None:
    """``(pad id, decoder start id)`` of an encoder-decoder model; None for a causal LM."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "is_encoder_decoder", False):
        return None
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else pad
    return pad, start


def from_datasets(dataset, tokenizer, seq_len: int, text_field: str = "text") -> list[dict]:
    """Fixed-length examples from a ``datasets.Dataset`` with a text column."""
    return chunk_text(tokenizer, (row[text_field] for row in dataset), seq_len)


def calibration_batches(
    examples: Sequence[dict], n: int, batch_size: int = 4, seq2seq: tuple[int, int] | None = None
) -> list[dict]:
    """The first ``n`` examples as model-input batches for pruning and GPTQ. For an encoder-decoder pass
    ``seq2seq=(pad id, decoder start id)`` (``seq2seq_ids(model)``): the batches then carry the decoder inputs.
    Examples of different lengths are padded, and the padding positions count in the calibration statistics;
    ``batch_size=1`` avoids that."""
    ex = list(examples[:n])
    if not ex:
        raise ValueError("no calibration examples")
    if seq2seq is not None:
        batches = [collate(ex[i : i + batch_size], seq2seq[0], seq2seq[1]) for i in range(0, len(ex), batch_size)]
        return [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    return [
        {"input_ids": torch.stack([e["input_ids"] for e in ex[i : i + batch_size]])}
        for i in range(0, len(ex), batch_size)
    ]


@torch.no_grad()
def example_nll(model, examples: Sequence[dict], batch_size: int = 4) -> list[tuple[float, int]]:
    """``(summed next-token NLL, labelled tokens)`` of each example (for an encoder-decoder: of the decoder's
    labels given the encoder input), on the model's device; the unit a bootstrap over examples resamples."""
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    s2s = seq2seq_ids(model)
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size]
        if s2s is not None:
            batch = {k: v.to(device) for k, v in collate(ex, *s2s).items()}
            tgt = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()
        else:
            ids = torch.stack([e["input_ids"] for e in ex]).to(device)
            labels = torch.stack([e.get("labels", e["input_ids"]) for e in ex]).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tgt = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none", ignore_index=-100
        ).view(tgt.shape)  # [B, S]; flat rows: the [B, V, S] layout is ~4x slower on CPU
        for row, t in zip(nll.double().sum(1).tolist(), (tgt != -100).sum(1).tolist()):
            out.append((float(row), int(t)))
    return out


def perplexity_of(nll: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens) of ``example_nll`` pairs."""
    count = sum(n for _, n in nll)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return math.exp(sum(x for x, _ in nll) / count)


def bootstrap_interval(
    nll: Sequence[tuple[float, int]],
    baseline: Sequence[tuple[float, int]] | None = None,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile bootstrap interval over examples: of the perplexity of ``nll``, or, given the
    ``baseline``'s NLL on the same examples, of the ratio ppl / ppl_baseline (paired: both resample the same
    examples, so the shared difficulty of an example cancels)."""
    import numpy as np

    a = np.asarray(nll, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64) if baseline is not None else None
    if b is not None and b.shape != a.shape:
        raise ValueError("a paired bootstrap needs the NLL of the same examples")
    idx = np.random.default_rng(seed).integers(0, len(a), (samples, len(a)))
    stat = np.exp(a[idx, 0].sum(1) / a[idx, 1].sum(1))
    if b is not None:
        stat = stat / np.exp(b[idx, 0].sum(1) / b[idx, 1].sum(1))
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return float(lo), float(hi)


def perplexity(model, examples: Sequence[dict], batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the labelled tokens of ``examples`` (for an encoder-decoder: of the
    decoder's labels given the encoder input)."""
    return perplexity_of(example_nll(model, examples, batch_size))
