"""``finetune(student, teacher, data, ...)``: sparse fine-tuning with fixed masks and CE / KD / SquareHead losses.

The thin driver around the pure losses (``distill.losses``) and mask keeping (``masks.MaskKeeper``): AdamW with
linear warmup and decay, gradient accumulation, checkpoint + resume, seeded, and DDP when launched under
``torchrun`` / ``accelerate launch`` (one process per rank; the data is sharded by rank), or FSDP
(``parallel="fsdp"``: FSDP2 ``fully_shard`` per transformer block, so gradients and optimizer state are sharded).
Causal LMs and encoder-decoders (T5, Whisper, BART): for the latter SquareHead compares the encoder's and the
decoder's block outputs, each over its own non-padding tokens, and CE/KD are over the decoder's labels.

The pieces: ``Parallel`` (the distributed setup), ``train_step`` (one micro-batch forward + backward),
``save_checkpoint`` / ``load_checkpoint``, and ``finetune`` tying them into the loop.

Speed (``bf16=True``): the student runs under bf16 autocast with fp32 master weights, the teacher is cast to bf16
and runs under ``inference_mode``. On a causal LM whose head is a plain bias-free linear (checked against the
model's own logits on the first step), the output head's CE and KD are computed by ``head_losses`` in token
chunks, so no [tokens, vocab] logits tensor is ever held whole, and a model that only needs hidden states (the
SquareHead teacher, or every model of a CE-free cell) skips its head entirely.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_file
from .data import collate, seq2seq_ids
from .distill.losses import ce_loss, head_losses, kd_loss, squarehead_loss, total_loss
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
    bf16: bool = False  # student under bf16 autocast (fp32 master weights), teacher cast to bf16 in place
    fused_head: bool = True  # CE / KD of a causal LM's head in token chunks (``head_losses``) where it applies
    head_chunk: int = 1024  # tokens per chunk of the fused head losses
    fused_optimizer: bool = True  # torch's fused AdamW kernel (one pass over every parameter) where it applies
    compile: bool = False  # torch.compile the student's and teacher's forward (fuses the casts and elementwise ops)
    log_every: int = 10
    save_every: int = 0
    out_dir: str | None = None
    keep_masks: bool = True
    parallel: str = "ddp"  # under torchrun: "ddp", or "fsdp" (FSDP2 fully_shard; torch >= 2.6); one process: unused
    resume: str = "check"  # "check": a checkpoint saved with other training settings is refused; "force": resumed
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
        if self.resume not in ("check", "force"):
            raise ValueError(f"resume must be 'check' or 'force', got {self.resume!r}")
        if self.head_chunk < 1:
            raise ValueError(f"head_chunk must be >= 1, got {self.head_chunk}")


# Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_CHANGES = {"log_every", "save_every", "out_dir", "resume", "extra", "head_chunk", "compile"}


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run natively on ``device``, so that ``bf16=True`` speeds training up.

    A CPU without AVX512-BF16 or AMX emulates bf16 GEMMs, dozens of times slower than fp32 (an AVX2 CPU does),
    so there the fp32 path is the fast one."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


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


# -- distributed setup -------------------------------------------------------------------------------------------


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
    final norm) the root's. The copy is trained; ``Parallel.finish`` writes its weights back into ``student``."""
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


class Parallel:
    """How ``student`` is run: alone, under DDP, or as an FSDP2-sharded copy. ``model`` is what forward calls
    go through; ``trained`` owns the parameters the optimizer and the mask keeper see."""

    def __init__(self, student: nn.Module, mode: str):
        self.student = student
        self.dist = _dist(next(student.parameters()).device)
        self.rank, self.world = (self.dist.get_rank(), self.dist.get_world_size()) if self.dist else (0, 1)
        self.fsdp = self.dist is not None and mode == "fsdp"
        if self.fsdp:
            self.model: nn.Module = _fully_shard(student)
        elif self.dist:
            self.model = nn.parallel.DistributedDataParallel(student)
        else:
            self.model = student
        # Under FSDP the sharded copy is trained: its weights are DTensors, and MaskKeeper shards the masks to match.
        self.trained = self.model if self.fsdp else student
        self.checkpoint_format = "fsdp-full" if self.fsdp else "plain"  # FSDP's optimizer state is keyed by name

    def full_state(self, opt, rank0_only: bool = True):
        """The model's (and optimizer's) full, unsharded state dicts. Under FSDP every rank must call this (it
        gathers); with ``rank0_only`` only rank 0 gets the tensors."""
        if not self.fsdp:
            return self.trained.state_dict(), (opt.state_dict() if opt is not None else None)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
        if opt is None:
            return get_model_state_dict(self.trained, options=options), None
        return get_state_dict(self.trained, opt, options=options)

    def load_full_state(self, opt, model_state: dict, opt_state: dict) -> None:
        if not self.fsdp:
            self.trained.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.trained,
            opt,
            model_state_dict=model_state,
            optim_state_dict=opt_state,
            options=StateDictOptions(full_state_dict=True),
        )

    def finish(self) -> None:
        """Under FSDP every rank gets the full trained weights back into the caller's (unsharded) model."""
        if self.fsdp:
            full, _ = self.full_state(None, rank0_only=False)
            self.student.load_state_dict(full)


# -- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path, par: Parallel, opt, sched, step: int, cfg: FinetuneConfig, stopped: bool = False
) -> None:
    """Writes the full training state atomically (rank 0; under FSDP every rank joins the gather). ``stopped``:
    the run ended early here (``on_step`` asked it to), so a resumption trains no further."""
    model_state, opt_state = par.full_state(opt)
    if par.rank != 0:
        return
    with atomic_file(path) as tmp:
        torch.save(
            {
                "model": model_state,
                "optimizer": opt_state,
                "scheduler": sched.state_dict(),
                "step": step,
                "stopped": stopped,
                "world_size": par.world,
                "torch_rng": torch.get_rng_state(),
                "format": par.checkpoint_format,
                "config": asdict(cfg),
            },
            tmp,
        )


def load_checkpoint(path: Path, par: Parallel, opt, sched, cfg: FinetuneConfig) -> tuple[int, bool]:
    """Restores a checkpoint into the model, optimizer and schedule; returns its step (0 when there is none)
    and whether the run had stopped early there. A checkpoint saved with other training settings is refused
    unless ``cfg.resume == "force"``."""
    if not path.is_file():
        return 0, False
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format", "plain") != par.checkpoint_format:
        held = state.get("format", "plain")
        raise ValueError(f"{path} holds {held!r} state; this run needs {par.checkpoint_format!r}")
    saved, now = dict(state.get("config") or {}), asdict(cfg)
    # The data order depends on the number of ranks (each skips its own share of the batches on resume).
    saved["world_size"], now["world_size"] = state.get("world_size", par.world), par.world
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and k in saved and saved[k] != now[k])
    if changed and cfg.resume != "force":
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{path} was saved with other fine-tuning settings ({diffs}); remove it to start over, or pass "
            "resume='force' to continue anyway"
        )
    par.load_full_state(opt, state["model"], state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), bool(state.get("stopped", False))


# -- one step ----------------------------------------------------------------------------------------------------


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head when it is a bias-free ``nn.Linear`` applied to the last hidden state with nothing after
    it (no logit soft-capping or scaling), else None."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or not _takes_logits_to_keep(model):
        return None
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale")):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return head


_NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the head runs on no position


@torch.no_grad()
def _head_input_is_last_hidden(model: nn.Module, head: nn.Linear, batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``hidden_states[-1] @ head.weight.T`` reproduces the model's own logits (on a few positions of the
    first example), i.e. whether the fused head losses see what the model's head sees. The tolerance (1 % of the
    largest logit) passes bf16 rounding and fails any missing projection, scaling or bias."""
    ids = batch["input_ids"][:1, :16].to(head.weight.device)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    mine = out.hidden_states[-1].float() @ head.weight.float().t()
    ref = out.logits.float()
    return bool((mine - ref).abs().max() <= 1e-2 * ref.abs().max().clamp_min(1e-6))


class _Step:
    """What ``train_step`` needs to know about the models, decided once per run."""

    def __init__(self, par: Parallel, teacher: nn.Module | None, cfg: FinetuneConfig, seq2seq: bool):
        self.cfg = cfg
        self.seq2seq = seq2seq
        self.device = next(par.trained.parameters()).device
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
        self.head = None if (par.fsdp or not cfg.fused_head) else _plain_head(par.student)
        self.teacher_head = _plain_head(teacher) if (teacher is not None and self.head is not None) else None
        self.checked = False
        self.teacher_skips_head = (
            teacher is not None and not cfg.w_kd and not seq2seq and _takes_logits_to_keep(teacher)
        )

    def check(self, model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor]) -> None:
        if self.checked:
            return
        self.checked = True
        if self.head is None:
            return
        ok = _head_input_is_last_hidden(self.student_module(model), self.head, batch)
        if ok and self.cfg.w_kd:
            ok = self.teacher_head is not None and _head_input_is_last_hidden(teacher, self.teacher_head, batch)
        if not ok:
            warnings.warn(
                "the output head does not read the last hidden state; using the plain (unfused) losses", stacklevel=3
            )
            self.head = None

    @staticmethod
    def student_module(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], step: _Step, scale: float):
    """Forward + backward of one micro-batch; the loss is scaled by ``scale`` (1 / grad_accum) before backward.
    Returns the loss terms as floats (``ce``, ``kd``, ``sq``, ``loss``; absent terms 0)."""
    cfg = step.cfg
    batch = {k: v.to(step.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    mask = batch.get("attention_mask")
    if not step.seq2seq and mask is not None and bool(mask.all()):
        batch.pop("attention_mask")  # no padding: plain causal attention (SDPA's is_causal path)
    need_hidden = cfg.w_sq > 0 or step.head is not None
    fused = step.head is not None
    skip_head = {"logits_to_keep": _NO_LOGITS} if fused else {}
    with step.autocast():
        out_s = model(**batch, output_hidden_states=need_hidden, use_cache=False, **skip_head)
    out_t = None
    if teacher is not None and (cfg.w_kd or cfg.w_sq):
        t_skip = {"logits_to_keep": _NO_LOGITS} if (fused or step.teacher_skips_head) else {}
        with torch.inference_mode(), step.autocast():
            out_t = teacher(**batch, output_hidden_states=need_hidden, use_cache=False, **t_skip)
    with step.autocast():
        if fused:
            keep = mask.bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)
            target = torch.full_like(labels, -100)
            target[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
            h_t = out_t.hidden_states[-1][keep].clone() if cfg.w_kd else None
            head_loss, ce, kd = head_losses(
                out_s.hidden_states[-1][keep],
                step.head.weight,
                target[keep],
                h_t,
                step.teacher_head.weight if cfg.w_kd else None,
                w_ce=cfg.w_ce,
                w_kd=cfg.w_kd,
                temperature=cfg.temperature,
                chunk=cfg.head_chunk,
                dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            )
            ce = ce if cfg.w_ce else None
            kd = kd if cfg.w_kd else None
            sq = None
            if cfg.w_sq:
                hs_t = [h.clone() for h in out_t.hidden_states[1:]]
                sq = squarehead_loss(out_s.hidden_states[1:], hs_t, mask)
            loss = head_loss + cfg.w_sq * sq if sq is not None else head_loss
        else:
            if out_t is not None:
                out_t = _clone_outputs(out_t)
            full = {**batch, "labels": labels, "attention_mask": mask}
            ce, kd, sq = loss_terms(out_s, out_t, full, cfg, step.seq2seq)
            loss = total_loss(ce, kd, sq, cfg.w_ce, cfg.w_kd, cfg.w_sq)
    (loss * scale).backward()
    terms = {"ce": 0.0, "kd": 0.0, "sq": 0.0, "loss": float(loss.detach())}
    for k, v in (("ce", ce), ("kd", kd), ("sq", sq)):
        if v is not None:
            terms[k] = float(v.detach())
    return terms


def _clone_outputs(out):
    """The teacher's outputs as ordinary tensors (``inference_mode`` tensors cannot be saved for backward)."""
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            out[k] = tuple(t.clone() for t in v)
    return out


# -- the loop ----------------------------------------------------------------------------------------------------


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Sequence[dict[str, torch.Tensor]],
    config: FinetuneConfig | dict[str, Any] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fine-tunes ``student`` in place on ``data`` (a sequence of examples ``{"input_ids": 1-D, "labels": 1-D}``,
    labels -100 where the loss does not count; ``data`` describes encoder-decoder examples), distilling from
    ``teacher`` when KD or SquareHead weights are set (with ``bf16`` the teacher is cast to bf16 in place).
    Pruned weights (zeros of the prunable linears, or ``masks``) stay exactly zero. ``on_step(step, terms)`` is
    called after every optimizer step (e.g. to evaluate on a schedule); a true return value stops the run there
    (early stopping). Returns metrics: the loss terms over training and the final ones.

    >>> finetune(student, teacher, examples, {"steps": 200, "lr": 1e-4, "w_ce": 1, "w_sq": 1})
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict({**(config or {}), **kwargs})
    if (cfg.w_kd or cfg.w_sq) and teacher is None:
        raise ValueError("KD and SquareHead need a teacher model")
    if not data:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if masks is None and cfg.keep_masks:
        masks = masks_from_zeros(student, prunable_linears(student))
    par = Parallel(student, cfg.parallel)
    keeper = MaskKeeper(par.trained, masks) if masks else None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if cfg.bf16 and (cfg.w_kd or cfg.w_sq):
            teacher.to(torch.bfloat16)
    params = [p for p in par.trained.parameters() if p.requires_grad]
    opt = _adamw(params, cfg, fused=cfg.fused_optimizer and not par.fsdp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, max(cfg.steps, 1)))
    ckpt = Path(cfg.out_dir) / "checkpoint.pt" if cfg.out_dir else None
    step, stopped = load_checkpoint(ckpt, par, opt, sched, cfg) if ckpt is not None else (0, False)
    history: list[dict[str, float]] = []
    per_step = cfg.batch_size * cfg.grad_accum * par.world
    s2s = seq2seq_ids(student)
    pad_id, start_id = s2s if s2s else (getattr(getattr(student, "config", None), "pad_token_id", None) or 0, None)
    stream = _batches(data, cfg, par.rank, par.world, pad_id, start_id)
    # Skip the batches a resumed run has already consumed, so the data order is the same as an unbroken run.
    for _ in range(step * cfg.grad_accum):
        next(stream)
    bar = _progress_bar(cfg.steps, step) if progress and par.rank == 0 else None
    state = _Step(par, teacher, cfg, seq2seq=s2s is not None)
    par.model.train()
    # Compiled wrappers share the modules' parameters: masks, the optimizer and checkpoints see the same tensors.
    model, teacher_fwd = (par.model, teacher) if not cfg.compile else _compiled(par.model, teacher)
    t0 = time.time()
    while step < cfg.steps and not stopped:
        terms = {"ce": 0.0, "kd": 0.0, "sq": 0.0, "loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            state.check(par.model, teacher, batch)
            for k, v in train_step(model, teacher_fwd, batch, state, 1.0 / cfg.grad_accum).items():
                terms[k] += v / cfg.grad_accum
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
        # The callback runs before the checkpoint: a run killed inside it resumes from the last checkpoint and
        # calls it again for this step.
        stopped = bool(on_step(step, terms)) if on_step is not None else False
        if ckpt is not None and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or stopped):
            save_checkpoint(ckpt, par, opt, sched, step, cfg, stopped=stopped)
    if bar is not None:
        bar.close()
    par.finish()
    student.eval()
    last = history[-1] if history else {}
    return {
        "steps": step,
        "stopped_early": stopped,
        "tokens_per_step": per_step,
        "seconds": time.time() - t0,
        "final": last,
        "history": history,
        "world_size": par.world,
        "fused_head": state.head is not None,
    }


def _compiled(model: nn.Module, teacher: nn.Module | None):
    """``torch.compile`` of the student and teacher forwards. It fuses what bf16 autocast leaves between the
    matrix products (casts, norms, activations, rotary embeddings); the first step pays the compilation."""
    return torch.compile(model), (torch.compile(teacher) if teacher is not None else None)


def _adamw(params, cfg: FinetuneConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; the fused kernel (one pass over all parameters) when asked and the parameters' device has one
    (CPU and CUDA, torch >= 2.4); see docs/benchmarks/train.md."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batches(data, cfg: FinetuneConfig, rank: int, world: int, pad_id: int, start_id: int | None):
    """An endless stream of collated batches: each epoch a seeded shuffle, this rank's share of it."""
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


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="finetune", unit="step")
