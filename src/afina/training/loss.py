"""Losses computed only where they count.

The vocabulary projection (hidden -> 49k logits for the default model) is a large share of the
cost; prompt tokens carry no loss, so the projection and cross-entropy run only on the positions
that are trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afina.data.packing import IGNORE, Batch
from afina.models.adapters import body_and_head


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of token cross-entropies over the trained positions of a packed batch.

    Summed, not averaged, so gradient accumulation can divide by the trained tokens of the whole
    optimizer step: packed, unpacked and accumulated batches then give the same loss.
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    mask = batch.targets != IGNORE
    logits = head(hidden[mask]).float()
    return F.cross_entropy(logits, batch.targets[mask], reduction="sum")
