"""Multi-task mixtures: the order in which examples are drawn from several datasets.

Each draw picks a dataset at random with the mixture's probabilities, then takes that dataset's
next example in a shuffled order; a dataset that runs out starts a new pass, reshuffled, so small
datasets are repeated (upsampled) and large ones need not be seen whole. Probabilities come from
explicit weights, or from temperature sampling p_i ∝ n_i^(1/T) (Arivazhagan et al. 2019; T5 and
mT5 call it examples-proportional mixing at T = 1): T = 1 follows dataset sizes, larger T moves
towards uniform, favouring small datasets.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator

from afina.errors import AfinaError


def mixture_proportions(sizes: dict[str, int], weights: dict[str, float] | None = None,
                        temperature: float | None = None) -> dict[str, float]:
    """The probability of drawing from each dataset, summing to 1.

    `weights` (any non-negative scale) or `temperature` (> 0), not both; with neither, proportional
    to size. An empty dataset with a non-zero probability is an error: nothing could be drawn from it.
    """
    if weights is not None and temperature is not None:
        raise AfinaError("invalid_mixture", "give either weights or a temperature, not both", location="data.mixture")
    if not sizes:
        raise AfinaError("invalid_mixture", "the mixture has no dataset", location="data.mixture")
    if weights is not None:
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise AfinaError("invalid_mixture", f"weights name unknown datasets: {', '.join(unknown)}",
                             location="data.mixture.weights", hint=f"datasets are {', '.join(sorted(sizes))}")
        raw = {name: float(weights.get(name, 0.0)) for name in sizes}
        if any(w < 0 for w in raw.values()):
            raise AfinaError("invalid_mixture", "weights must not be negative", location="data.mixture.weights")
    else:
        if temperature is not None and temperature <= 0:
            raise AfinaError("invalid_mixture", f"temperature must be positive, got {temperature}",
                             location="data.mixture.temperature")
        exponent = 1.0 / (temperature or 1.0)
        raw = {name: float(size) ** exponent if size > 0 else 0.0 for name, size in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        raise AfinaError("invalid_mixture", "every dataset has zero weight or no examples", location="data.mixture")
    empty = sorted(name for name, w in raw.items() if w > 0 and sizes[name] <= 0)
    if empty:
        raise AfinaError("invalid_mixture", f"datasets with a weight but no examples: {', '.join(empty)}",
                         location="data.mixture")
    return {name: w / total for name, w in raw.items()}


def mixture_order(sizes: dict[str, int], weights: dict[str, float] | None, temperature: float | None, total: int,
                  seed: int) -> list[tuple[str, int]]:
    """`total` draws of (dataset name, example index), fixed by the arguments alone.

    Datasets are picked independently with `mixture_proportions`; within a dataset, indices follow
    a permutation reshuffled at every pass, so each example is drawn once per pass. Each dataset's
    order depends only on (seed, name, pass), and the picks only on the seed and the proportions,
    so a resumed run rebuilds exactly the same order.
    """
    proportions = mixture_proportions(sizes, weights, temperature)
    names = sorted(name for name, p in proportions.items() if p > 0)  # sorted: key order in a config must not matter
    cumulative = list(itertools.accumulate(proportions[name] for name in names))
    picker = random.Random(seed)
    streams = {name: _dataset_order(name, sizes[name], seed) for name in names}
    order = []
    for _ in range(total):
        # bisect on cumulative probabilities: one uniform number per draw, the last bucket absorbs rounding
        name = names[min(bisect.bisect_right(cumulative, picker.random() * cumulative[-1]), len(names) - 1)]
        order.append((name, next(streams[name])))
    return order


def _dataset_order(name: str, size: int, seed: int) -> Iterator[int]:
    """A dataset's indices, pass after pass, each pass a fresh permutation."""
    for passes in itertools.count():
        permutation = list(range(size))
        # a string seed is hashed with SHA-512 by `random`: stable across processes, unlike hash()
        random.Random(f"{seed}/{name}/{passes}").shuffle(permutation)
        yield from permutation


def mix_examples(examples: dict[str, list], weights: dict[str, float] | None, temperature: float | None,
                 seed: int, total: int | None = None) -> tuple[list, list[str]]:
    """The training examples of a multi-task run: `total` draws (default: all tasks' sizes added up)
    following `mixture_order`, and the task of each draw. Small tasks are repeated, large ones
    subsampled, to reach the mixture's proportions."""
    sizes = {name: len(items) for name, items in examples.items()}
    order = mixture_order(sizes, weights, temperature, total if total is not None else sum(sizes.values()), seed)
    return [examples[name][index] for name, index in order], [name for name, _ in order]
