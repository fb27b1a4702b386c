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

An example may also read a prefix it shares with its row's first example instead of holding it
(`afina.data.packing`, `Batch.examples`): its block starts with the first example's tokens, whose
keys and values then serve both, and their gradients add up; the result is that of the examples
laid out in full.

Small blocks use plain matmul-softmax attention with a hand-written backward; it keeps the
probabilities (in the compute dtype, as the forward multiplies them into v) where a layer's take at
most `KEPT_PROBABILITIES_BYTES`, and forms them again from q and k otherwise. Large blocks use SDPA
with `is_causal` (its memory-lean kernel). Tokens move into blocks and back by row selection both
ways (`ToBlocks`, `FromBlocks`): autograd's own backward of an index is a scatter-add, which on a CPU
cost as much as the attention arithmetic of the default model's examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from afina.models.loreft import example_slots
from afina.devices import compute_dtype

IMPLEMENTATION = "afina_packed"
LAYOUT_KEYWORD = "afina_packed_layout"
MATMUL_SCORES_BYTES = 64 * 2**20  # fp32 scores of one layer above this: SDPA's kernel instead
KEPT_PROBABILITIES_BYTES = 8 * 2**20  # a layer's probabilities up to this are kept for backward, not recomputed


@dataclass(frozen=True)
class PackedLayout:
    """Where the examples of a packed batch lie in its flattened (rows x length) tokens.

    Block slots read token rows by index; padding slots read row `tokens`, one past the last token
    (a zero row). An example that shares a prefix (`afina.data.packing`) reads it from the example
    holding it: those slots are copies, their outputs are dropped and the gradients of their keys
    and values are added to the tokens they copy."""

    gather: torch.Tensor  # (examples * longest,) the token each block slot reads
    owned: torch.Tensor  # the same with copied prefix slots reading the zero row: where outputs go back
    valid: torch.Tensor  # the slot of each token, in token order
    copies: torch.Tensor  # the slots that copy a shared prefix token
    copied: torch.Tensor  # the token each of them copies
    examples: int
    longest: int
    tokens: int  # rows x length of the batch it was made for

    @classmethod
    def from_table(cls, table: torch.Tensor, tokens: int) -> PackedLayout:
        """From `Batch.examples`: per example, (start, length, shared prefix start, shared prefix length)."""
        start, length, prefix, shared = (column[:, None] for column in table.unbind(1))
        examples, longest = table.shape[0], int((shared + length).max())
        slot = torch.arange(longest, device=table.device)
        read = torch.where(slot < shared, prefix + slot, start + slot - shared)
        own = (slot >= shared) & (slot < shared + length)
        copy = slot < shared
        gather = torch.where(own | copy, read, tokens).flatten()
        owned = torch.where(own, read, tokens).flatten()
        flat_slot = torch.arange(examples * longest, device=table.device).view(examples, longest)
        valid = torch.empty(tokens, dtype=torch.long, device=table.device)
        valid[read[own]] = flat_slot[own]
        return cls(gather, owned, valid, flat_slot[copy], read[copy], examples, longest, tokens)

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor) -> PackedLayout:
        """Examples split where position ids do not continue by 1, as transformers' packed mask splits them."""
        return cls.from_table(table_from_positions(position_ids), position_ids.numel())

    @property
    def shares_prefixes(self) -> bool:
        return self.copies.numel() > 0

    def mask(self, rows: int, window: int | None) -> torch.Tensor:
        """(rows, 1, length, length) bool: what each token attends to, shared prefixes included (for
        SDPA where the blocks cannot run: attention dropout, a sliding window shorter than an example)."""
        slot = torch.arange(self.longest, device=self.gather.device)
        seen = slot[None, :] <= slot[:, None]  # causal within a block, by slot
        if window is not None:
            seen &= slot[:, None] - slot[None, :] < window
        queries, keys = self.owned.view(self.examples, self.longest), self.gather.view(self.examples, self.longest)
        pairs = seen[None] & (queries[:, :, None] < self.tokens) & (keys[:, None, :] < self.tokens)
        full = torch.zeros(self.tokens, self.tokens, dtype=torch.bool, device=slot.device)
        full[queries[:, :, None].expand_as(pairs)[pairs], keys[:, None, :].expand_as(pairs)[pairs]] = True
        length = self.tokens // rows
        return torch.stack([full[r * length : (r + 1) * length, r * length : (r + 1) * length]
                            for r in range(rows)])[:, None]


def table_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """`Batch.examples` for rows without shared prefixes: an example starts where its offset is 0
    (`example_slots`: wherever the position id does not continue the previous one by 1)."""
    _, offset, _, _ = example_slots(position_ids, *position_ids.shape, position_ids.device)
    starts = (offset.flatten() == 0).nonzero().squeeze(1)
    sizes = torch.diff(starts, append=starts.new_full((1,), position_ids.numel()))
    return torch.stack([starts, sizes, starts, torch.zeros_like(starts)], 1)


def packed_layout(position_ids: torch.Tensor | None, examples: torch.Tensor | None = None) -> dict:
    """The keyword to pass to the model's forward so attention treats each example of the rows on its
    own: as `examples` (`Batch.examples`) lays them out, else each run of restarting position ids
    (transformers hands unknown keywords down to the attention function, and gradient checkpointing
    replays them)."""
    if position_ids is None:
        return {}
    if examples is None:
        return {LAYOUT_KEYWORD: PackedLayout.from_positions(position_ids)}
    return {LAYOUT_KEYWORD: PackedLayout.from_table(examples, position_ids.numel())}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    layout = kwargs.pop(LAYOUT_KEYWORD, None)
    window = getattr(module, "sliding_window", None)
    if (layout is None or dropout or kwargs.get("softcap") is not None or not getattr(module, "is_causal", True)
            or query.shape[2] != key.shape[2] or query.shape[0] * query.shape[2] != layout.tokens
            or (window is not None and layout.longest > window)):
        if layout is not None and layout.shares_prefixes and query.shape[0] * query.shape[2] == layout.tokens:
            attention_mask = layout.mask(query.shape[0], window)  # transformers' mask would not see shared prefixes
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    n, longest = layout.examples, layout.longest
    scale = dim**-0.5 if scaling is None else scaling
    dtype = compute_dtype(query)
    q, k, v = (ToBlocks.apply(states.to(dtype), layout) for states in (query, key, value))
    if uses_matmul_kernel(n, heads, longest):
        groups = heads // kv_heads  # query heads sharing a key/value head sit in one matmul
        keep = keeps_probabilities(n, heads, longest, torch.finfo(dtype).bits // 8)
        out = CausalAttention.apply(q.reshape(n, kv_heads, groups * longest, dim), k, v, scale, longest, keep)
        out = out.view(n, heads, longest, dim)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
    return FromBlocks.apply(out, layout, query.shape[0]), None


def uses_matmul_kernel(examples: int, heads: int, longest: int) -> bool:
    """Whether blocks this size run the matmul kernel (fp32 scores of one layer within the bound)."""
    return examples * heads * longest * longest * 4 <= MATMUL_SCORES_BYTES


def keeps_probabilities(examples: int, heads: int, longest: int, dtype_bytes: int) -> bool:
    """Whether the matmul kernel keeps a layer's probabilities for backward rather than recomputing them."""
    return examples * heads * longest * longest * dtype_bytes <= KEPT_PROBABILITIES_BYTES


class ToBlocks(torch.autograd.Function):
    """(batch, heads, length, dim) tokens -> (examples, heads, longest, dim) blocks, padding slots zero."""

    @staticmethod
    def forward(ctx, states, layout: PackedLayout):
        ctx.layout, ctx.shape = layout, states.shape
        return _blocks(states.transpose(1, 2), layout.gather, layout)

    @staticmethod
    def backward(ctx, grad):
        batch, heads, length, dim = ctx.shape
        layout = ctx.layout
        tokens = _tokens(grad, layout)
        if layout.shares_prefixes:  # a shared prefix token's keys and values served every example reading it
            slots = grad.transpose(1, 2).reshape(layout.examples * layout.longest, heads, dim)
            tokens.index_add_(0, layout.copied, slots.index_select(0, layout.copies))
        return tokens.view(batch, length, heads, dim).transpose(1, 2), None


class FromBlocks(torch.autograd.Function):
    """(examples, heads, longest, dim) blocks -> (batch, length, heads, dim) tokens (transformers' output layout)."""

    @staticmethod
    def forward(ctx, blocks, layout: PackedLayout, batch: int):
        ctx.layout = layout
        return _tokens(blocks, layout).view(batch, layout.tokens // batch, blocks.shape[1], blocks.shape[3])

    @staticmethod
    def backward(ctx, grad):  # padding and copied slots get no gradient: their outputs were dropped
        return _blocks(grad, ctx.layout.owned, ctx.layout), None, None


def _blocks(tokens: torch.Tensor, slots: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(batch, length, heads, dim) tokens, any strides -> (examples, heads, longest, dim) blocks whose
    slots read the token rows `slots` names (index `tokens`: a zero row): the tokens are copied once
    behind a zero row, then the block slots select their rows."""
    heads, dim = tokens.shape[2], tokens.shape[3]
    flat = tokens.new_empty(layout.tokens + 1, heads, dim)
    flat[:-1].view(tokens.shape).copy_(tokens)
    flat[-1].zero_()
    return flat.index_select(0, slots).view(layout.examples, layout.longest, heads, dim).transpose(1, 2)


def _tokens(blocks: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(examples, heads, longest, dim) blocks -> (tokens, heads, dim): each token's row, in token order."""
    examples, heads, longest, dim = blocks.shape
    return blocks.transpose(1, 2).reshape(examples * longest, heads, dim).index_select(0, layout.valid)


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v over blocks; q holds `groups` query heads per key head, stacked
    along its length. Keeps q, k, v and, with `keep`, the probabilities in v's dtype; without, the
    backward pass recomputes them in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, longest: int, keep: bool):
        with torch.autocast(q.device.type, enabled=False):  # the fp32 scores stay fp32
            probs = _probabilities(q, k, scale, longest).to(v.dtype)
            out = probs @ v
        ctx.save_for_backward(q, k, v, probs if keep else None)
        ctx.scale, ctx.longest = scale, longest
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        if probs is None:
            exact = _probabilities(q, k, ctx.scale, ctx.longest)
            probs = exact.to(v.dtype)
        else:  # kept in v's dtype: softmax's backward runs in it (accumulating in fp32), no fp32 copies
            exact = probs
        grad_out = grad_out.contiguous()
        grad_v = probs.transpose(-1, -2) @ grad_out
        grad_probs = (grad_out @ v.transpose(-1, -2)).to(exact.dtype)
        grad_scores = torch._softmax_backward_data(grad_probs, exact, -1, exact.dtype).to(q.dtype)
        n, h, stacked, longest = grad_scores.shape
        flat = grad_scores.view(n * h, stacked, longest)
        grad_q = torch.baddbmm(flat.new_empty(()), flat, k.reshape(n * h, longest, -1), beta=0, alpha=ctx.scale)
        grad_k = torch.baddbmm(flat.new_empty(()), flat.transpose(1, 2), q.reshape(n * h, stacked, -1), beta=0,
                               alpha=ctx.scale)
        return grad_q.view(q.shape), grad_k.view(k.shape), grad_v, None, None, None


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
