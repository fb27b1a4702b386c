"""Prompt prefixes whose KV cache is kept for reuse: a shared system prompt is computed once.

    cache = PrefixCache(max_tokens=8192)
    cache.store(key, prompt_ids, lambda: per_layer_keys_and_values)   # after a prompt was computed
    found = cache.find(key, other_prompt_ids)                          # (entry, length) or None
    past = found[0].cache(found[1], rows=2)                            # a DynamicCache holding that prefix

A prompt is kept up to the last whole block of `block` tokens before its last token (the last token
is always computed, since its logits choose the first answer token). Every block boundary of a kept
prompt is indexed by a hash chained over its blocks, as vLLM's prefix caching does, so a later prompt
finds the longest kept prefix it starts with, even one that continues differently. `key` separates
what must not be shared: the loaded model and the adapter (an adapter changes the keys and values).
The least recently used prompts are dropped beyond `max_tokens` kept tokens.

The kept tensors are never written to: a cache built from them grows by concatenation, which copies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, [1, heads, tokens, dim]


@dataclass
class PrefixEntry:
    """A kept prompt prefix and its keys and values."""

    key: Hashable
    tokens: list[int]
    layers: Layers

    def cache(self, length: int, rows: int) -> DynamicCache:
        """A cache holding this entry's first `length` tokens for `rows` rows."""
        return DynamicCache(ddp_cache_data=[(k[:, :, :length].expand(rows, -1, -1, -1),
                                             v[:, :, :length].expand(rows, -1, -1, -1)) for k, v in self.layers])


class PrefixCache:
    """Kept prompt prefixes, found by their longest shared block-aligned start."""

    def __init__(self, max_tokens: int, block: int = 16):
        self.max_tokens, self.block = max_tokens, block
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # id -> entry, least recently used first
        self.index: dict[tuple[Hashable, int], tuple[PrefixEntry, int]] = {}  # (key, chain hash) -> (entry, length)
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def keepable(self, prompt: list[int]) -> int:
        """How many of the prompt's tokens would be kept (or may be reused): whole blocks, last token out."""
        return (len(prompt) - 1) // self.block * self.block

    def find(self, key: Hashable, prompt: list[int]) -> tuple[PrefixEntry, int] | None:
        """The entry holding the longest block-aligned prefix of `prompt`, and that prefix's length."""
        if not self.max_tokens:
            return None
        found = None
        for length, chained in self.chain(prompt, self.keepable(prompt)):
            hit = self.index.get((key, chained))
            if hit is None:
                break
            found = (hit[0], length)
        if found is not None and found[0].tokens[:found[1]] != prompt[:found[1]]:
            found = None  # a hash collision: never reuse on a hash alone
        if found is not None:
            self.entries.move_to_end(id(found[0]))
            self.hits += 1
            self.reused_tokens += found[1]
        return found

    def store(self, key: Hashable, prompt: list[int], layers: Callable[[], Layers]) -> None:
        """Keep `prompt`'s keepable prefix, unless it is kept already; `layers()` gives its keys and
        values (called only when the prefix is kept)."""
        length = self.keepable(prompt)
        if not self.max_tokens or length < self.block or length > self.max_tokens:
            return
        found = self.find_quietly(key, prompt)
        if found is not None and found[1] >= length:
            return
        entry = PrefixEntry(key, prompt[:length], [(k[:, :, :length].clone(), v[:, :, :length].clone())
                                                   for k, v in layers()])
        self.entries[id(entry)] = entry
        self.tokens += length
        for boundary, chained in self.chain(entry.tokens, length):
            self.index[(key, chained)] = (entry, boundary)
        while self.tokens > self.max_tokens:
            self.evict(next(iter(self.entries.values())))

    def find_quietly(self, key: Hashable, prompt: list[int]) -> tuple[PrefixEntry, int] | None:
        hits, reused = self.hits, self.reused_tokens
        found = self.find(key, prompt)
        self.hits, self.reused_tokens = hits, reused
        return found

    def evict(self, entry: PrefixEntry) -> None:
        """Drop an entry; the boundaries it shared with kept entries are indexed to those again."""
        del self.entries[id(entry)]
        self.tokens -= len(entry.tokens)
        self.index = {where: hit for where, hit in self.index.items() if hit[0] is not entry}
        for kept in self.entries.values():
            if kept.key == entry.key:
                for boundary, chained in self.chain(kept.tokens, len(kept.tokens)):
                    self.index.setdefault((kept.key, chained), (kept, boundary))

    def chain(self, tokens: list[int], limit: int):
        """(length, hash of the first `length` tokens) at every block boundary of `tokens` up to `limit`."""
        chained = 0
        for end in range(self.block, limit + 1, self.block):
            chained = hash((chained, tuple(tokens[end - self.block:end])))
            yield end, chained
