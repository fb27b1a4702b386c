"""The optimizer of a training run."""

from __future__ import annotations

import torch


def make_optimizer(parameters, learning_rate: float, weight_decay: float, paged: bool = False) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW where qlora asks for it (`paged_optimizer`).

    PyTorch's fused AdamW where every parameter allows it: one kernel for all parameters instead of
    a dozen small ops per parameter (on a CPU, 5 instead of 20 ms a step for LoRA on the default model).
    """
    parameters = list(parameters)
    if paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
