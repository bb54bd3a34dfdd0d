"""Tiny random models of every supported architecture (and T5 / Whisper for training), built locally with
transformers configs (no hub).

Each builder saves a Hugging Face directory (config.json + model.safetensors + a small byte-level BPE
tokenizer.json) and returns the torch model in eval mode, so tests compare sparseinfer against transformers on
the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 320
SEQ2SEQ = ("t5", "mt5", "umt5", "whisper")  # encoder-decoders; the rest are causal LMs
CORPUS = (
    "Once upon a time there was a tiny model. It read every weight once per token, and the weights were sparse. "
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer the slings and arrows. "
    "The quick brown fox jumps over the lazy dog. Sparse fine-tuning keeps accuracy at high sparsity. "
) * 4


def tokenizer_json(path: Path, vocab: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a short corpus, with <s> (0) and </s> (1) special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(path / "tokenizer.json"))


def config(kind: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind]
        kw = dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    elif kind == "opt":
        cls = tf.OPTConfig
        kw = dict(
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            pad_token_id=2,
        )
    elif kind == "gpt2":
        cls = tf.GPT2Config
        kw = dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)
    elif kind == "mpt":
        cls = tf.MptConfig
        kw = dict(d_model=64, n_layers=3, n_heads=4, max_seq_len=256, expansion_ratio=4)
    elif kind in ("t5", "mt5", "umt5"):
        cls = {"t5": tf.T5Config, "mt5": tf.MT5Config, "umt5": tf.UMT5Config}[kind]
        kw = dict(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    elif kind == "whisper":
        cls = tf.WhisperConfig
        kw = dict(
            num_mel_bins=16,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=16,
            max_target_positions=160,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    else:
        raise ValueError(kind)
    kw.update(common)
    kw.update(overrides)
    return cls(**kw)


def build(kind: str, path: Path, seed: int = 0, sparsity: float = 0.0, scale: float = 1.0, **overrides):
    """Saves a random `kind` model into `path` and returns it. `sparsity` zeroes that fraction of each
    linear weight inside the blocks (by magnitude, per matrix); `scale` multiplies every weight so that logits
    are not all near zero."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.AutoModelForSeq2SeqLM
    auto = {"t5": text, "mt5": text, "umt5": text, "whisper": tf.AutoModelForSpeechSeq2Seq}.get(
        kind, tf.AutoModelForCausalLM
    )
    model = auto.from_config(config(kind, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(scale)
                inside_blocks = any(k in name for k in (".layers.", ".h.", ".blocks.", ".block."))
                if sparsity > 0 and inside_blocks:
                    k = int(p.numel() * sparsity)
                    thresh = p.abs().flatten().kthvalue(k).values
                    p[p.abs() <= thresh] = 0.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer_json(path)
    if kind in SEQ2SEQ:
        # Without this AutoTokenizer would look for the architecture's own tokenizer (T5's is a Unigram model).
        special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<s>"}
        (path / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special})
        )
    return model


def block_quantize_acts(x, token=False):
    """The runtime's int8 activations, in torch: per 64-column block (per row with `token`), s = max|x|/127,
    x̂ = s·round_half_away(x/s)."""
    import torch

    *lead, cols = x.shape
    pad = (-cols) % 64
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(*lead, -1, 64)
    s = (xp.abs().amax((-2, -1), keepdim=True) if token else xp.abs().amax(-1, keepdim=True)) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    r = (xp * inv).clamp(-127, 127)
    q = torch.sign(r) * torch.floor(r.abs() + 0.5)
    return (q * s).reshape(*lead, -1)[..., :cols]


def quantize_linear_inputs(model, skip=(), token=False):
    """Adds forward pre-hooks that give every nn.Linear (but those named in `skip`) int8 block activations (per
    row with `token`)."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in skip:
            mod.register_forward_pre_hook(lambda m, args: (block_quantize_acts(args[0], token),))
    return model
