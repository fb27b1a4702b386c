"""An objective's mean loss over held-out examples: validation during training, test loss after."""

from __future__ import annotations

import contextlib

import torch

from afina.devices import free_memory, is_out_of_memory


@torch.no_grad()
def evaluate_loss(model, examples: list, objective, rows_per_batch: int, pad_id: int,
                  autocast=None) -> tuple[float, int]:
    """The `objective`'s mean loss over `examples` (for SFT: cross-entropy per trained token), and the
    count it is averaged over. Out of memory halves the items per batch and retries, down to one."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    items = objective.items(examples)
    device = next(model.parameters()).device
    start = 0
    while start < len(items):
        part = items[start : start + rows_per_batch]
        batch = objective.collate(part, pad_id).to(device)
        try:
            with autocast() if autocast else contextlib.nullcontext():
                total += float(objective.loss_sum(model, batch))
        except Exception as error:
            if not is_out_of_memory(error) or rows_per_batch == 1:
                raise
            del batch
            free_memory()
            rows_per_batch //= 2
            continue
        count += objective.count(batch)
        start += len(part)
    model.train(was_training)
    return total / max(1, count), count
