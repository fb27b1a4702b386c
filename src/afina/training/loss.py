"""Losses computed only where they count.

The vocabulary projection (hidden -> 49k logits for the default model) is a large share of the
cost; prompt tokens carry no loss, so the projection and cross-entropy run only on the positions
that are trained. Those positions are projected a chunk at a time, and the gradient of each chunk
is computed right after its loss (`LinearCrossEntropy`), so no logits outlive their chunk: a step
holds one chunk of logits whatever its trained tokens, and nothing is recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from afina.data.packing import IGNORE, Batch
from afina.models.adapters import body_and_head
from afina.models.loreft import prompt_mask_from_targets
from afina.training.precision import compute_dtype

CHUNK_TOKENS = 256  # trained positions projected at once: 256 x 49k fp32 logits is 50 MB


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of token cross-entropies over the trained positions of a packed batch.

    Summed, not averaged, so gradient accumulation can divide by the trained tokens of the whole
    optimizer step: packed, unpacked and accumulated batches then give the same loss.
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  prompt_mask=prompt_mask_from_targets(batch.targets, batch.position_ids),
                  examples=batch.examples).last_hidden_state
    mask = batch.targets != IGNORE
    return chunked_cross_entropy_sum(hidden[mask], batch.targets[mask], head)


def chunked_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                              chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """sum(cross_entropy(head(hidden), targets)), one chunk of positions at a time.

    A plain linear head (every model afina trains unless the head itself carries an adapter) runs
    `LinearCrossEntropy`; any other head keeps autograd's path, each chunk's logits recomputed in
    backward when there are several.
    """
    if not torch.is_grad_enabled():
        return sum((_chunk_loss(hidden[i : i + chunk], targets[i : i + chunk], head)
                    for i in range(0, hidden.shape[0], chunk)), torch.zeros((), device=hidden.device))
    if fuses_head(head):
        return LinearCrossEntropy.apply(hidden, head.weight, targets, chunk)
    if hidden.shape[0] <= chunk:
        return _chunk_loss(hidden, targets, head)
    total = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], head,
                                   use_reentrant=False)
    return total


def fuses_head(head: torch.nn.Module) -> bool:
    """Whether the loss runs `LinearCrossEntropy` on this output projection (a plain bias-free linear)."""
    return type(head) is torch.nn.Linear and head.bias is None


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden W^T, targets)) with its gradients computed in the forward pass.

    Each chunk's logits (fp32, as autocast's cross-entropy computes them) become its gradient in
    place, softmax minus the one-hot target, and are multiplied into the gradients of `hidden` and,
    when the head trains, of W; the backward pass only scales what was kept. Matmuls run in the
    autocast dtype when autocast is on, as `head(hidden)` would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        dtype = compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, -1, keepdim=True)
                total += (lse.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
                grad = logits.sub_(lse).exp_()  # softmax, then minus the one-hot target
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1
                grad = grad.to(dtype)
                torch.mm(grad, w, out=grad_hidden[start : start + chunk])
                if grad_weight is not None:
                    grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_hidden * grad_total).to(hidden_dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def plain_loss_sum(model, batch: Batch) -> torch.Tensor:
    """The same sum computed the way most trainers do: logits for every position, then
    cross-entropy with the untrained ones ignored. The reference every speed lever is checked
    against, and the baseline of `benchmarks/speed_levers.py`."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
