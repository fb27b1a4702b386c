"""Attention for packed rows: each example attends to itself only, at the cost of its own length.

afina packs several examples into one row with position ids restarting at each example.
transformers' SDPA path then builds a block-diagonal mask over the whole row, and on a CPU the
masked kernel does the work of the full row (a row of 8 examples costs about 8 times what its
examples cost alone, and more in the backward pass). Here the examples of a batch are gathered
into a padded (examples, heads, longest, head_dim) block and attend causally within it, so the
work grows with each example's own length; the result is the same up to rounding.

Models load with attention implementation `afina_packed`. afina's loss functions pass the layout
of the rows they feed (`packed_layout`); every other call (generation, a cache, rows with an
attention mask) goes through transformers' SDPA attention unchanged.

Small blocks use plain matmul-softmax attention with a hand-written backward that recomputes
the scores instead of keeping them; large ones use SDPA with `is_causal` (its memory-lean kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from afina.models.loreft import example_slots
from afina.training.precision import compute_dtype

IMPLEMENTATION = "afina_packed"
LAYOUT_KEYWORD = "afina_packed_layout"
MATMUL_SCORES_BYTES = 64 * 2**20  # fp32 scores of one layer above this: SDPA's kernel instead


@dataclass(frozen=True)
class PackedLayout:
    """Where the examples of a packed batch lie in its flattened (rows x length) tokens."""

    gather: torch.Tensor  # (examples * longest,) token index of each block slot (padding reads token 0)
    valid: torch.Tensor  # the slot of each token, in token order
    examples: int
    longest: int
    tokens: int  # rows x length of the batch it was made for

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor) -> PackedLayout:
        """Examples split where position ids do not continue by 1, as transformers' packed mask splits them."""
        rows, length = position_ids.shape
        example, offset, examples, longest = example_slots(position_ids, rows, length, position_ids.device)
        valid = (example * longest + offset).flatten()
        gather = torch.zeros(examples * longest, dtype=torch.long, device=position_ids.device)
        gather[valid] = torch.arange(rows * length, device=position_ids.device)
        return cls(gather, valid, examples, longest, rows * length)


def packed_layout(position_ids: torch.Tensor | None) -> dict:
    """The keyword to pass to the model's forward so attention treats each run of restarting position
    ids as one example (transformers hands unknown keywords down to the attention function, and
    gradient checkpointing replays them)."""
    return {} if position_ids is None else {LAYOUT_KEYWORD: PackedLayout.from_positions(position_ids)}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    layout = kwargs.pop(LAYOUT_KEYWORD, None)
    window = getattr(module, "sliding_window", None)
    if (layout is None or dropout or kwargs.get("softcap") is not None or not getattr(module, "is_causal", True)
            or query.shape[2] != key.shape[2] or query.shape[0] * query.shape[2] != layout.tokens
            or (window is not None and layout.longest > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    n, longest = layout.examples, layout.longest
    scale = dim**-0.5 if scaling is None else scaling

    def blocks(states: torch.Tensor) -> torch.Tensor:  # (batch, h, length, dim) -> (examples, h, longest, dim)
        h = states.shape[1]
        flat = states.transpose(1, 2).reshape(batch * length, h, dim)
        return flat[layout.gather].view(n, longest, h, dim).transpose(1, 2)

    dtype = compute_dtype(query)
    q, k, v = blocks(query.to(dtype)), blocks(key.to(dtype)), blocks(value.to(dtype))
    if uses_matmul_kernel(n, heads, longest):
        groups = heads // kv_heads  # query heads sharing a key/value head sit in one matmul
        out = CausalAttention.apply(q.reshape(n, kv_heads, groups * longest, dim), k, v, scale, longest)
        out = out.view(n, heads, longest, dim)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
    out = out.transpose(1, 2).reshape(n * longest, heads, dim)[layout.valid]
    return out.view(batch, length, heads, dim), None


def uses_matmul_kernel(examples: int, heads: int, longest: int) -> bool:
    """Whether blocks this size run the matmul kernel (fp32 scores of one layer within the bound)."""
    return examples * heads * longest * longest * 4 <= MATMUL_SCORES_BYTES


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v over blocks; q holds `groups` query heads per key head, stacked
    along its length. Keeps only q, k and v; the backward pass recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, longest: int):
        with torch.autocast(q.device.type, enabled=False):  # the fp32 scores stay fp32
            out = _probabilities(q, k, scale, longest).to(v.dtype) @ v
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.longest = scale, longest
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        probs = _probabilities(q, k, ctx.scale, ctx.longest)
        grad_v = probs.to(v.dtype).transpose(-1, -2) @ grad_out
        grad_probs = (grad_out @ v.transpose(-1, -2)).float()
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32)
        grad_scores = grad_scores.mul_(ctx.scale).to(q.dtype)
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v, None, None


def _probabilities(q, k, scale: float, longest: int) -> torch.Tensor:
    """fp32 causal softmax of the scores: one batched multiply-add puts the scale and the causal mask
    (an additive -inf triangle, repeated for the stacked query heads) into the scores, then softmax."""
    n, h, stacked, dim = q.shape
    causal = torch.full((longest, longest), float("-inf"), device=q.device).triu_(1).repeat(stacked // longest, 1)
    scores = torch.baddbmm(causal, q.float().reshape(n * h, stacked, dim),
                           k.float().reshape(n * h, longest, dim).transpose(1, 2), alpha=scale)
    return torch.softmax(scores, -1).view(n, h, stacked, longest)


AttentionInterface.register(IMPLEMENTATION, packed_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
