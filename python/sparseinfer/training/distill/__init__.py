"""Distillation losses for sparse fine-tuning (pure functions)."""

from .losses import ce_loss, kd_loss, squarehead_loss, total_loss

__all__ = ["ce_loss", "kd_loss", "squarehead_loss", "total_loss"]
