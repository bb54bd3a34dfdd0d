"""Data helpers: encoder-decoder examples from JSONL, their collation (decoder inputs shifted right, masks), and
causal collation unchanged."""

import json

import pytest

torch = pytest.importorskip("torch")
from sparseinfer.training import data as D  # noqa: E402


class CharTokenizer:
    """One token per character (ord), enough to check lengths and order."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_seq2seq_jsonl_and_collate(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in ({"prompt": "abcd", "answer": "xy"}, {"prompt": "ef", "answer": "z"}))
    )
    ex = D.load_jsonl(CharTokenizer(), path, seq_len=4, seq2seq=True, eos_id=1)
    # Prompt to the encoder, answer as labels, each ending in eos and cut to seq_len.
    assert ex[0]["input_ids"].tolist() == [97, 98, 99, 1] and ex[0]["labels"].tolist() == [120, 121, 1]
    assert ex[1]["input_ids"].tolist() == [101, 102, 1] and ex[1]["labels"].tolist() == [122, 1]
    b = D.collate(ex, pad_id=0, decoder_start_id=5)
    assert b["input_ids"].tolist() == [[97, 98, 99, 1], [101, 102, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[120, 121, 1], [122, 1, -100]]
    assert b["decoder_input_ids"].tolist() == [[5, 120, 121], [5, 122, 1]]
    assert b["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # Causal: prompt and answer in one sequence, the prompt's labels masked.
    causal = D.load_jsonl(CharTokenizer(), path, seq_len=8)
    assert causal[0]["input_ids"].tolist() == [97, 98, 99, 100, 120, 121]
    assert causal[0]["labels"].tolist() == [-100] * 4 + [120, 121]
    c = D.collate(causal, pad_id=0)
    assert set(c) == {"input_ids", "attention_mask", "labels"}
    assert c["labels"][1].tolist() == [-100, -100, 122, -100, -100, -100]


def test_shift_right_reads_ignored_labels_as_padding():
    labels = torch.tensor([[7, 8, -100, -100]])
    assert D.shift_right(labels, start_id=2, pad_id=0).tolist() == [[2, 7, 8, 0]]


def test_example_nll_matches_perplexity_and_bootstrap_brackets_it(tmp_path):
    import math

    tiny_models = pytest.importorskip("tiny_models")
    model = tiny_models.build("llama", tmp_path, scale=1.0)
    g = torch.Generator().manual_seed(0)
    ex = [{"input_ids": torch.randint(2, tiny_models.VOCAB, (12,), generator=g)} for _ in range(10)]
    nll = D.example_nll(model, ex, batch_size=3)
    assert len(nll) == 10 and all(n == 11 for _, n in nll)
    # The same figure as the model's own mean loss over the shifted tokens.
    ids = torch.stack([e["input_ids"] for e in ex])
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
    assert D.perplexity_of(nll) == pytest.approx(math.exp(float(ref)), rel=1e-5)
    assert D.perplexity(model, ex) == pytest.approx(D.perplexity_of(nll), rel=1e-6)
    lo, hi = D.bootstrap_interval(nll)
    assert lo < D.perplexity_of(nll) < hi
    # Paired against itself the ratio is exactly 1; against a uniformly worse model it excludes 1.
    assert D.bootstrap_interval(nll, nll) == pytest.approx((1.0, 1.0))
    worse = [(x + 0.5 * n, n) for x, n in nll]
    lo, hi = D.bootstrap_interval(worse, nll)
    assert lo > 1.0 and hi == pytest.approx(math.exp(0.5), rel=1e-6)
    with pytest.raises(ValueError):
        D.bootstrap_interval(nll, nll[:3])
