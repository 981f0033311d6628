"""Optimizer and learning-rate schedule shared by both sides of the cut."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splitft.config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at global optimizer step ``step`` of ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def step(optimizer: torch.optim.Optimizer, lr: float, max_grad_norm: float) -> None:
    """Clip (this side's adapters only), set the LR, step and clear gradients."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
