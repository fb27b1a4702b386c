"""Deterministic train/validation/test split.

Each record goes to a split by a hash of its content and the seed, not by its position, so rows
added to a file later never move existing rows between splits (and duplicates stay together,
which keeps a test row from leaking into training).
"""

from __future__ import annotations

import hashlib
import json

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


def overlap_key(record: Record) -> str:
    """What a record says, every run of whitespace in its text collapsed to one space: two rows with
    the same key are the same example, whatever their format or place in a file."""
    content = {k: v for k, v in record.to_json().items() if k not in ("line", "source_format", "extra")}
    return json.dumps(collapse_whitespace(content), ensure_ascii=False, sort_keys=True)


def collapse_whitespace(value):
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {key: collapse_whitespace(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [collapse_whitespace(item) for item in value]
    return value


def overlapping_records(held_out: list[Record], train: list[Record]) -> list[Record]:
    """The held-out records that also appear among the training records (exact duplicates after
    normalizing whitespace)."""
    seen = {overlap_key(record) for record in train}
    return [record for record in held_out if overlap_key(record) in seen]
