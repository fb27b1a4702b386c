"""Pack tokenized examples into fixed-budget rows without letting examples see each other.

Inside a packed row, position ids restart at 0 for every example. transformers reads those
restarts as sequence boundaries and builds a block-diagonal causal mask, so attention never
crosses examples, and targets are shifted inside each example, so no example is trained to
predict the first token of the next one.

Shared prefixes: most fine-tuning data repeats one system prompt or instruction in front of every
example (54 of the bundled tickets' 115 tokens on average). In a causal model the hidden states of a
prefix depend on its tokens alone, so with `share_prefixes` an example stores only what follows the
prefix it shares with its row's first example, with its position ids continuing from there, and
attention reads the shared tokens from the first example (`Batch.examples` says where each example
lies and what it reads; `afina.models.attention` uses it). The loss and the gradients are those of
the examples laid out in full; the row holds and computes fewer positions. Only untrained positions
are shared: a prefix ends before the first position whose target either example trains.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from afina.data.tokenize import Example

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length)
    targets: torch.Tensor  # (rows, length); IGNORE where nothing is trained
    trained_tokens: int
    tokens: int  # the examples' tokens, shared prefixes counted in every example reading them
    # (examples, 4): for each example of the rows, padding runs included, in flattened (row * length
    # + offset) token indices: where its own tokens start, how many there are, where the shared
    # prefix it reads starts, and how many tokens that prefix has (0: none)
    examples: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                     self.trained_tokens, self.tokens, self.examples.to(device))

    @property
    def shares_prefixes(self) -> bool:
        return bool((self.examples[:, 3] > 0).any())


def example_targets(example: Example) -> list[int]:
    """Targets aligned with inputs: position t predicts token t+1 when token t+1 is trained."""
    ids, trained = example.input_ids, example.trained
    return [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def shared_prefix(first: Example, example: Example) -> int:
    """How many leading tokens `example` can read from `first` (its row's first example) instead of
    holding them: their common prefix, cut before the first position whose target either of them
    trains, so no shared position carries a loss. At least one token of `example` stays its own."""
    return common_prefix(first.input_ids, example.input_ids, min(untrained_lead(first), untrained_lead(example)))


def common_prefix(first: list[int], other: list[int], limit: int) -> int:
    """How many leading tokens the two share, up to `limit`."""
    count = 0
    while count < limit and first[count] == other[count]:
        count += 1
    return count


def untrained_lead(example: Example) -> int:
    """Leading positions whose targets are not trained: position t predicts token t + 1."""
    first_trained = next((i for i in range(1, len(example.trained)) if example.trained[i]), len(example.trained))
    return first_trained - 1


def row_sizes(row: list[Example], share_prefixes: bool) -> list[int]:
    """The tokens each example of a row holds: all of its own, less the prefix it shares with the row's first."""
    return [len(e.input_ids) - (shared_prefix(row[0], e) if share_prefixes and i else 0) for i, e in enumerate(row)]


def pack_indices(lengths: list[int], row_length: int, least: list[int] | None = None,
                 held: Callable[[list[int], int], int] | None = None) -> list[list[int]]:
    """Greedy first-fit in the given order: indices of sequences whose lengths total <= row_length
    per row (a sequence longer than a row gets a row of its own). With `held(row, index)`, the
    tokens sequence `index` would hold in `row` (at least `least[index]`) count instead of its length."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, size in enumerate(lengths):
        for row, free in enumerate(room):
            if held is None:
                need = size
            elif least[index] > free:  # cannot fit even sharing all it could: skip the comparison
                continue
            else:
                need = held(rows[row], index)
            if need <= free:
                rows[row].append(index)
                room[row] -= need
                break
        else:
            rows.append([index])
            room.append(row_length - size)
    return rows


def pack_examples(examples: list[Example], row_length: int, share_prefixes: bool = False) -> list[list[Example]]:
    """Each row holds whole examples totalling <= row_length tokens (first-fit, in the given order);
    with `share_prefixes`, an example counts only the tokens it holds after the prefix it shares
    with its row's first example."""
    lengths = [len(e.input_ids) for e in examples]
    if not share_prefixes:
        return [[examples[i] for i in row] for row in pack_indices(lengths, row_length)]
    leads = [untrained_lead(e) for e in examples]  # `shared_prefix`'s limits, once per example
    least = [n - lead for n, lead in zip(lengths, leads)]

    def held(row: list[int], index: int) -> int:
        first = row[0]
        return lengths[index] - common_prefix(examples[first].input_ids, examples[index].input_ids,
                                              min(leads[first], leads[index]))

    return [[examples[i] for i in row] for row in pack_indices(lengths, row_length, least, held)]


def collate_rows(rows: list[list[Example]], pad_id: int, length: int = 0, share_prefixes: bool = False) -> Batch:
    """Concatenate each row's examples and right-pad rows to the longest (or to `length`, if longer);
    padding is never trained. With `share_prefixes`, each example after a row's first holds only
    what follows the prefix it shares with the first (see the module docstring)."""
    ids, positions, targets, layouts = [], [], [], []
    for row in rows:
        r_ids, r_pos, r_tgt, layout = [], [], [], []
        for example, size in zip(row, row_sizes(row, share_prefixes)):
            shared = len(example.input_ids) - size
            layout.append((len(r_ids), size, 0, shared))  # a shared prefix always starts the row
            r_ids.extend(example.input_ids[shared:])
            r_pos.extend(range(shared, len(example.input_ids)))
            r_tgt.extend(example_targets(example)[shared:])
        ids.append(r_ids)
        positions.append(r_pos)
        targets.append(r_tgt)
        layouts.append(layout)
    length = max(length, *(len(r) for r in ids))
    tokens = sum(len(e.input_ids) for row in rows for e in row)
    table = []
    for row, (r_ids, r_pos, r_tgt, layout) in enumerate(zip(ids, positions, targets, layouts)):
        pad = length - len(r_ids)
        if pad:  # padding forms its own block; it attends only to itself
            layout.append((len(r_ids), pad, 0, 0))
        r_ids.extend([pad_id] * pad)
        r_pos.extend(range(pad))
        r_tgt.extend([IGNORE] * pad)
        table.extend((row * length + start, size, row * length + prefix, shared)
                     for start, size, prefix, shared in layout)
    target_tensor = torch.tensor(targets)
    return Batch(torch.tensor(ids), torch.tensor(positions), target_tensor,
                 int((target_tensor != IGNORE).sum()), tokens, torch.tensor(table, dtype=torch.long).view(-1, 4))


def epoch_steps(examples: list[Example], row_length: int, rows_per_step: int, seed: int,
                epoch: int, share_prefixes: bool = False) -> list[list[list[Example]]]:
    """The optimizer steps of one epoch, each a list of packed rows: examples shuffled by
    (seed, epoch), packed, grouped `rows_per_step` at a time.

    Fixed by its arguments alone, so a resumed run rebuilds exactly the steps it would have seen;
    how a step's rows are cut into micro-batches is the loop's business and never changes them.
    """
    order = list(examples)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    rows = pack_examples(order, row_length, share_prefixes)
    return [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]
