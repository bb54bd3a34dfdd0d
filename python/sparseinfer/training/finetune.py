"""``finetune(student, teacher, data, ...)``: sparse fine-tuning with fixed masks and CE / KD / SquareHead losses.

The thin driver around the pure losses (``distill.losses``) and mask keeping (``masks.MaskKeeper``): AdamW with
linear warmup and decay, gradient accumulation, optional bf16 autocast, checkpoint + resume, seeded, and DDP when
launched under ``torchrun`` / ``accelerate launch`` (one process per rank; the data is sharded by rank), or FSDP
(``parallel="fsdp"``: FSDP2 ``fully_shard`` per transformer block, so gradients and optimizer state are sharded).
Causal LMs and encoder-decoders (T5, Whisper, BART): for the latter SquareHead compares the encoder's and the
decoder's block outputs, each over its own non-padding tokens, and CE/KD are over the decoder's labels.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import collate, seq2seq_ids
from .distill.losses import ce_loss, kd_loss, squarehead_loss, total_loss
from .masks import MaskKeeper, masks_from_zeros, prunable_linears


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the ``finetune`` section of a recipe)."""

    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    w_ce: float = 1.0
    w_kd: float = 0.0
    w_sq: float = 1.0
    temperature: float = 2.0
    seed: int = 0
    bf16: bool = False
    log_every: int = 10
    save_every: int = 0
    out_dir: str | None = None
    keep_masks: bool = True
    parallel: str = "ddp"  # under torchrun: "ddp", or "fsdp" (FSDP2 fully_shard; torch >= 2.6); one process: unused
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {unknown}; known: {sorted(names - {'extra'})}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps must be >= 0, batch_size and grad_accum >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if min(self.w_ce, self.w_kd, self.w_sq) < 0 or self.w_ce + self.w_kd + self.w_sq == 0:
            raise ValueError("loss weights must be >= 0 and not all zero")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def loss_terms(out_s, out_t, batch: dict[str, torch.Tensor], cfg: FinetuneConfig, seq2seq: bool = False):
    """``(ce, kd, sq)`` for one batch from the student's and teacher's outputs (None for a term whose weight is
    zero). Causal LM: shifted CE, KD over ``attention_mask``, SquareHead over ``hidden_states[1:]``.
    Encoder-decoder: unshifted CE on the decoder's labels, KD over ``decoder_attention_mask``, and SquareHead
    summed over the encoder's blocks (``encoder_hidden_states[1:]``, encoder mask) and the decoder's
    (``decoder_hidden_states[1:]``, decoder mask)."""
    dec_mask = batch.get("decoder_attention_mask") if seq2seq else batch.get("attention_mask")
    ce = ce_loss(out_s.logits, batch["labels"], shift=not seq2seq) if cfg.w_ce else None
    kd = kd_loss(out_s.logits, out_t.logits, cfg.temperature, dec_mask) if cfg.w_kd else None
    sq = None
    if cfg.w_sq:
        if seq2seq:
            enc_mask = batch.get("attention_mask")
            sq = squarehead_loss(out_s.encoder_hidden_states[1:], out_t.encoder_hidden_states[1:], enc_mask)
            sq = sq + squarehead_loss(out_s.decoder_hidden_states[1:], out_t.decoder_hidden_states[1:], dec_mask)
        else:
            sq = squarehead_loss(out_s.hidden_states[1:], out_t.hidden_states[1:], dec_mask)
    return ce, kd, sq


def _dist(device: torch.device):
    """torch.distributed under torchrun (initialized here if needed): nccl when the model is on CUDA, else gloo
    (a visible GPU does not make a CPU model's process group nccl)."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist if dist.is_initialized() else None


def _fully_shard(student: nn.Module) -> nn.Module:
    """An FSDP2-sharded copy of ``student``: each transformer block is one FSDP unit, the rest (embeddings, head,
    final norm) the root's. The copy is trained; ``_gather_into`` writes its weights back into ``student``."""
    import copy

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise RuntimeError("parallel='fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
    from .pruning.calibrate import block_stacks

    model = copy.deepcopy(student)
    for blocks in block_stacks(model):
        for block in blocks:
            fully_shard(block)
    fully_shard(model)
    return model


def _full_state(model: nn.Module, opt, fsdp: bool, rank0_only: bool = True):
    """The model's (and optimizer's) full, unsharded state dicts. Under FSDP every rank must call this (it
    gathers); with ``rank0_only`` only rank 0 gets the tensors."""
    if not fsdp:
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    if opt is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, opt, options=options)


def _load_full_state(model: nn.Module, opt, model_state: dict, opt_state: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        opt,
        model_state_dict=model_state,
        optim_state_dict=opt_state,
        options=StateDictOptions(full_state_dict=True),
    )


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Sequence[dict[str, torch.Tensor]],
    config: FinetuneConfig | dict[str, Any] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fine-tunes ``student`` in place on ``data`` (a sequence of examples ``{"input_ids": 1-D, "labels": 1-D}``,
    labels -100 where the loss does not count; ``data`` describes encoder-decoder examples), distilling from
    ``teacher`` when KD or SquareHead weights are set. Pruned weights (zeros of the prunable linears, or ``masks``)
    stay exactly zero. Returns metrics: the loss terms over training and the final ones.

    >>> finetune(student, teacher, examples, {"steps": 200, "lr": 1e-4, "w_ce": 1, "w_sq": 1})
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict({**(config or {}), **kwargs})
    if (cfg.w_kd or cfg.w_sq) and teacher is None:
        raise ValueError("KD and SquareHead need a teacher model")
    if not data:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dist = _dist(next(student.parameters()).device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if masks is None and cfg.keep_masks:
        masks = masks_from_zeros(student, prunable_linears(student))
    fsdp = dist is not None and cfg.parallel == "fsdp"
    model: nn.Module = student
    if fsdp:
        model = _fully_shard(student)
    elif dist:
        model = nn.parallel.DistributedDataParallel(student)
    # Under FSDP the sharded copy is trained: its weights are DTensors, and MaskKeeper shards the masks to match.
    trained = model if fsdp else student
    keeper = MaskKeeper(trained, masks) if masks else None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, max(cfg.steps, 1)))
    step = 0
    ckpt = Path(cfg.out_dir) / "checkpoint.pt" if cfg.out_dir else None
    ckpt_format = "fsdp-full" if fsdp else "plain"  # FSDP's full optimizer state is keyed by parameter name
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("format", "plain") != ckpt_format:
            raise ValueError(f"{ckpt} holds {state.get('format', 'plain')!r} state; this run needs {ckpt_format!r}")
        _load_full_state(trained, opt, state["model"], state["optimizer"], fsdp)
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
    need_hidden = cfg.w_sq > 0
    history: list[dict[str, float]] = []
    per_step = cfg.batch_size * cfg.grad_accum * world
    s2s = seq2seq_ids(student)
    pad_id, start_id = s2s if s2s else (getattr(getattr(student, "config", None), "pad_token_id", None) or 0, None)

    def batches():
        epoch = 0
        while True:
            idx = list(range(len(data)))
            random.Random(cfg.seed + epoch).shuffle(idx)
            idx = idx[rank::world]
            for i in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size):
                yield collate([data[j] for j in idx[i : i + cfg.batch_size]], pad_id, start_id)
            if len(idx) < cfg.batch_size:
                yield collate([data[j] for j in idx], pad_id, start_id)
            epoch += 1

    stream = batches()
    # Skip the batches a resumed run has already consumed, so the data order is the same as an unbroken run.
    for _ in range(step * cfg.grad_accum):
        next(stream)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step")
        except ImportError:  # pragma: no cover
            bar = None
    model.train()
    t0 = time.time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else _Null()
    while step < cfg.steps:
        terms = {"ce": 0.0, "kd": 0.0, "sq": 0.0, "loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            inputs = {k: v for k, v in batch.items() if k != "labels"}  # the loss is computed here, not by the model
            with autocast:
                out_s = model(**inputs, output_hidden_states=need_hidden, use_cache=False)
                out_t = None
                if teacher is not None and (cfg.w_kd or cfg.w_sq):
                    with torch.no_grad():
                        out_t = teacher(**inputs, output_hidden_states=need_hidden, use_cache=False)
                ce, kd, sq = loss_terms(out_s, out_t, batch, cfg, seq2seq=s2s is not None)
                loss = total_loss(ce, kd, sq, cfg.w_ce, cfg.w_kd, cfg.w_sq)
            (loss / cfg.grad_accum).backward()
            for k, v in (("ce", ce), ("kd", kd), ("sq", sq), ("loss", loss)):
                if v is not None:
                    terms[k] += float(v.detach()) / cfg.grad_accum
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"loss became {terms['loss']} at step {step}; lower the learning rate")
        if keeper:
            keeper.before_step()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if keeper:
            keeper.after_step()
        step += 1
        history.append({"step": step, **terms, "lr": sched.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            if step % max(cfg.log_every, 1) == 0 or step == cfg.steps:
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items() if v})
        if ckpt is not None and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            model_state, opt_state = _full_state(trained, opt, fsdp)  # under FSDP: a gather every rank joins
        if ckpt is not None and rank == 0 and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(
                {
                    "model": model_state,
                    "optimizer": opt_state,
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "torch_rng": torch.get_rng_state(),
                    "format": ckpt_format,
                    "config": asdict(cfg),
                },
                ckpt,
            )
    if bar is not None:
        bar.close()
    if fsdp:
        # Every rank gets the full trained weights back into the caller's (unsharded) model.
        full, _ = _full_state(trained, None, fsdp, rank0_only=False)
        student.load_state_dict(full)
    student.eval()
    last = history[-1] if history else {}
    return {
        "steps": step,
        "tokens_per_step": per_step,
        "seconds": time.time() - t0,
        "final": last,
        "history": history,
        "world_size": world,
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
