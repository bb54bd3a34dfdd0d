"""Training data from local files (no hub access): plain text files or folders of them cut into fixed-length
sequences, JSONL prompt/answer pairs with answer-only labels, and ``datasets`` objects when installed.

An example is ``{"input_ids": LongTensor[S], "labels": LongTensor[S]}`` with -100 where the loss does not count.
"""

from __future__ import annotations

import json
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


def load_jsonl(tokenizer, path, seq_len: int, answer_only: bool = True) -> list[dict]:
    """Examples from JSONL lines ``{"prompt": ..., "answer": ...}``; with ``answer_only`` the prompt tokens get
    label -100 so only the answer is learned. Truncated to ``seq_len``."""
    out = []
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
            ids = (p + a)[:seq_len]
            labels = ([-100] * len(p) + a)[:seq_len] if answer_only else list(ids)
            out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def from_datasets(dataset, tokenizer, seq_len: int, text_field: str = "text") -> list[dict]:
    """Fixed-length examples from a ``datasets.Dataset`` with a text column."""
    return chunk_text(tokenizer, (row[text_field] for row in dataset), seq_len)


def calibration_batches(examples: Sequence[dict], n: int, batch_size: int = 4) -> list[dict]:
    """The first ``n`` examples as model-input batches for pruning and GPTQ."""
    ex = list(examples[:n])
    if not ex:
        raise ValueError("no calibration examples")
    return [
        {"input_ids": torch.stack([e["input_ids"] for e in ex[i : i + batch_size]])}
        for i in range(0, len(ex), batch_size)
    ]


@torch.no_grad()
def perplexity(model, examples: Sequence[dict], batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the labelled tokens of ``examples``."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size]
        ids = torch.stack([e["input_ids"] for e in ex])
        labels = torch.stack([e.get("labels", e["input_ids"]) for e in ex])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum", ignore_index=-100
        )
        nll += float(loss)
        count += int((tgt != -100).sum())
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return float(torch.exp(torch.tensor(nll / count)))
