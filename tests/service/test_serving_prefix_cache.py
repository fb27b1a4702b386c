"""The prefix cache's bookkeeping: longest block-aligned shared start, per key, least recently used
dropped beyond the budget, and never a reuse on a hash alone."""

from __future__ import annotations

import torch

from afina.serving.prefix_cache import PrefixCache


def layers_for(prompt: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers whose keys and values hold the token ids, so a reused prefix shows which tokens it has."""
    keys = torch.tensor(prompt, dtype=torch.float32).view(1, 1, -1, 1)
    return [(keys, -keys), (keys * 2, -keys * 2)]


def test_the_longest_kept_start_is_found_and_gives_its_keys_and_values():
    cache = PrefixCache(max_tokens=1000, block=4)
    system = list(range(100, 110))  # 10 tokens: two whole blocks
    cache.store("m", system + [1, 2, 3], lambda: layers_for(system + [1, 2, 3]))  # keeps 12 tokens
    assert cache.find("m", system + [1, 2, 9, 9, 9])[1] == 12  # three whole blocks shared
    entry, length = cache.find("m", system + [1, 9, 9, 9, 9])
    assert length == 8  # the third block differs (108, 109, 1, 9)
    assert cache.find("m", system[:8] + [7] * 8)[1] == 8
    assert cache.find("other adapter", system + [1, 2, 3]) is None
    assert cache.find("m", [5] + system) is None
    past = entry.cache(length, rows=3)
    assert past.layers[0].keys.shape == (3, 1, 8, 1)
    assert past.layers[1].values[2, 0, :, 0].tolist() == [-2.0 * t for t in system[:8]]
    assert (cache.hits, cache.reused_tokens) == (3, 28)


def test_the_last_prompt_token_is_always_computed_and_short_prompts_are_not_kept():
    cache = PrefixCache(max_tokens=1000, block=4)
    prompt = list(range(8))
    cache.store("m", prompt, lambda: layers_for(prompt))
    assert cache.find("m", prompt)[1] == 4  # 8 tokens keep 4: the 8th is computed for its logits
    cache.store("m", [1, 2, 3], lambda: layers_for([1, 2, 3]))
    assert len(cache.entries) == 1


def test_least_recently_used_prompts_go_beyond_the_budget_and_shared_starts_stay_found():
    cache = PrefixCache(max_tokens=16, block=4)
    system = [9] * 8
    first, second, third = system + [1] * 5, system + [2] * 5, system + [3] * 5  # each keeps 12 tokens
    cache.store("m", first, lambda: layers_for(first))
    cache.store("m", second, lambda: layers_for(second))  # 24 tokens > 16: the first goes
    assert len(cache.entries) == 1 and cache.tokens == 12
    assert cache.find("m", first)[1] == 8  # the system prompt is still found, in the second entry
    assert cache.find("m", second)[1] == 12
    cache.store("m", third, lambda: layers_for(third))
    assert [e.tokens for e in cache.entries.values()] == [third[:12]]


def test_a_hash_collision_is_never_reused(monkeypatch):
    cache = PrefixCache(max_tokens=100, block=4)
    kept = [1, 2, 3, 4, 5]
    cache.store("m", kept, lambda: layers_for(kept))
    monkeypatch.setattr(cache, "chain", lambda tokens, limit: iter([(4, 0)]) if limit else iter(()))
    cache.index[("m", 0)] = next(iter(cache.index.values()))  # another prompt hashing the same
    assert cache.find("m", [7, 7, 7, 7, 7]) is None


def test_a_zero_budget_keeps_nothing():
    cache = PrefixCache(max_tokens=0)
    prompt = list(range(40))
    cache.store("m", prompt, lambda: layers_for(prompt))
    assert not cache.entries and cache.find("m", prompt) is None
