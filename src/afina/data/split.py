"""Deterministic train/validation/test split.

Each record goes to a split by a hash of its content and the seed, not by its position, so rows
added to a file later never move existing rows between splits (and duplicates stay together,
which keeps a test row from leaking into training).
"""

from __future__ import annotations

import hashlib

from afina.data.records import Record


def split_fraction(record: Record, seed: int) -> float:
    """A number in [0, 1) fixed by the record's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{record.content_key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: list[Record], validation: float, test: float, seed: int) -> dict[str, list[Record]]:
    """Split into {"train", "validation", "test"}; each keeps the file's order."""
    splits: dict[str, list[Record]] = {"train": [], "validation": [], "test": []}
    for record in records:
        fraction = split_fraction(record, seed)
        if fraction < test:
            splits["test"].append(record)
        elif fraction < test + validation:
            splits["validation"].append(record)
        else:
            splits["train"].append(record)
    return splits
