"""Pack tokenized examples into fixed-budget rows without letting examples see each other.

Inside a packed row, position ids restart at 0 for every example. transformers reads those
restarts as sequence boundaries and builds a block-diagonal causal mask, so attention never
crosses examples, and targets are shifted inside each example, so no example is trained to
predict the first token of the next one.
"""

from __future__ import annotations

import random
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
    tokens: int  # non-padding tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                     self.trained_tokens, self.tokens)


def example_targets(example: Example) -> list[int]:
    """Targets aligned with inputs: position t predicts token t+1 when token t+1 is trained."""
    ids, trained = example.input_ids, example.trained
    return [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def pack_indices(lengths: list[int], row_length: int) -> list[list[int]]:
    """Greedy first-fit in the given order: indices of sequences whose lengths total <= row_length
    per row (a sequence longer than a row gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, size in enumerate(lengths):
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(index)
                room[row] -= size
                break
        else:
            rows.append([index])
            room.append(row_length - size)
    return rows


def pack_examples(examples: list[Example], row_length: int) -> list[list[Example]]:
    """Each row holds whole examples totalling <= row_length tokens (first-fit, in the given order)."""
    return [[examples[i] for i in row] for row in pack_indices([len(e.input_ids) for e in examples], row_length)]


def collate_rows(rows: list[list[Example]], pad_id: int, length: int = 0) -> Batch:
    """Concatenate each row's examples and right-pad rows to the longest (or to `length`, if longer);
    padding is never trained."""
    ids, positions, targets = [], [], []
    for row in rows:
        ids.append([t for e in row for t in e.input_ids])
        positions.append([p for e in row for p in range(len(e.input_ids))])
        targets.append([t for e in row for t in example_targets(e)])
    length = max(length, *(len(r) for r in ids))
    tokens = sum(len(r) for r in ids)
    for r_ids, r_pos, r_tgt in zip(ids, positions, targets):
        pad = length - len(r_ids)
        r_ids.extend([pad_id] * pad)
        r_pos.extend(range(pad))  # padding forms its own block; it attends only to itself
        r_tgt.extend([IGNORE] * pad)
    target_tensor = torch.tensor(targets)
    return Batch(torch.tensor(ids), torch.tensor(positions), target_tensor,
                 int((target_tensor != IGNORE).sum()), tokens)


def epoch_steps(examples: list[Example], row_length: int, rows_per_step: int, seed: int,
                epoch: int) -> list[list[list[Example]]]:
    """The optimizer steps of one epoch, each a list of packed rows: examples shuffled by
    (seed, epoch), packed, grouped `rows_per_step` at a time.

    Fixed by its arguments alone, so a resumed run rebuilds exactly the steps it would have seen;
    how a step's rows are cut into micro-batches is the loop's business and never changes them.
    """
    order = list(examples)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    rows = pack_examples(order, row_length)
    return [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]
