"""Learning-rate schedules: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - progress
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, total, warmup, kind))
