"""Losses computed only where they count.

The vocabulary projection (hidden -> 49k logits for the default model) is a large share of the
cost; prompt tokens carry no loss, so the projection and cross-entropy run only on the positions
that are trained. Those positions are projected in chunks whose logits are recomputed during the
backward pass instead of being kept, so a step never holds more than one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from afina.data.packing import IGNORE, Batch
from afina.models.adapters import body_and_head
from afina.models.loreft import prompt_mask_from_targets

CHUNK_TOKENS = 1024  # trained positions projected at once: 1024 x 49k fp32 logits is 200 MB


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of token cross-entropies over the trained positions of a packed batch.

    Summed, not averaged, so gradient accumulation can divide by the trained tokens of the whole
    optimizer step: packed, unpacked and accumulated batches then give the same loss.
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  prompt_mask=prompt_mask_from_targets(batch.targets, batch.position_ids)).last_hidden_state
    mask = batch.targets != IGNORE
    return chunked_cross_entropy_sum(hidden[mask], batch.targets[mask], head)


def chunked_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                              chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """sum(cross_entropy(head(hidden), targets)), one chunk of positions at a time.

    With gradients on, each chunk's logits are dropped after its loss and recomputed in backward
    (one extra head projection of the trained positions, in exchange for never holding them all).
    """
    if hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return sum((_chunk_loss(hidden[i : i + chunk], targets[i : i + chunk], head)
                    for i in range(0, max(1, hidden.shape[0]), chunk)), torch.zeros((), device=hidden.device))
    total = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], head,
                                   use_reentrant=False)
    return total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def plain_loss_sum(model, batch: Batch) -> torch.Tensor:
    """The same sum computed the way most trainers do: logits for every position, then
    cross-entropy with the untrained ones ignored. The reference every speed lever is checked
    against, and the baseline of `benchmarks/speed_levers.py`."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
