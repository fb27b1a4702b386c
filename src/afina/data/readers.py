"""Read raw rows, with their physical line numbers, from JSONL, JSON, CSV and Parquet files.

Problems with a single row (bad JSON, bad UTF-8, a line too long to be a real example) come back
with the row so the caller can report or skip it; problems with the whole file raise AfinaError.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from afina.errors import AfinaError

MAX_LINE_BYTES = 4 * 1024 * 1024  # no real training example comes close; a longer line is a broken file
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class RawRow:
    line: int
    value: object = None
    problem: tuple[str, str] | None = None  # (code, message)


def read_rows(path: str | Path) -> Iterator[RawRow]:
    path = Path(path)
    if not path.exists():
        raise AfinaError("file_not_found", "no such file", location=str(path))
    if not path.is_file():
        raise AfinaError("file_not_found", "not a regular file", location=str(path))
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AfinaError("unsupported_file_type", f"cannot read {suffix or 'files without a suffix'}",
                         location=str(path), hint="use .jsonl, .json, .csv or .parquet")
    if path.stat().st_size == 0:
        raise AfinaError("empty_file", "the file is empty", location=str(path))
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with path.open("rb") as handle:
        head = handle.read(8192)
    if b"\x00" in head:
        raise AfinaError("binary_file", "the file holds binary data, not text", location=str(path),
                         hint=f"expected {suffix} text")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    yield from readers[suffix](path)


def _physical_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes) per line; bytes is None for a line over MAX_LINE_BYTES, never held whole."""
    with path.open("rb") as handle:
        number = 0
        while True:
            chunk = handle.readline(MAX_LINE_BYTES + 1)
            if not chunk:
                return
            number += 1
            if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):  # skip the rest of the oversized line
                    chunk = handle.readline(MAX_LINE_BYTES)
                yield number, None
                continue
            yield number, chunk


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for number, raw in _physical_lines(path):
        if raw is None:
            yield RawRow(number, problem=("line_too_long", f"line is over {MAX_LINE_BYTES // (1024 * 1024)} MiB"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(number, problem=("invalid_utf8", f"byte {exc.start} is not valid UTF-8"))
            continue
        if not text.strip():
            continue
        try:
            yield RawRow(number, json.loads(text))
        except json.JSONDecodeError as exc:
            yield RawRow(number, problem=("invalid_json", f"{exc.msg} (column {exc.colno})"))


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AfinaError("invalid_utf8", f"byte {exc.start} is not valid UTF-8", location=f"{path}:{line}") from exc


def _read_json(path: Path) -> Iterator[RawRow]:
    """A JSON array of objects (or an object holding one such array under `data`), decoded element
    by element so each row keeps the line it starts on."""
    text = _decode_whole(path)
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if text.startswith("{", position):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AfinaError("invalid_json", exc.msg, location=f"{path}:{exc.lineno}") from exc
        rows = document.get("data") if isinstance(document, dict) else None
        if not isinstance(rows, list):
            raise AfinaError("not_an_array", "expected a JSON array of examples (or {\"data\": [...]})",
                             location=f"{path}:1")
        for index, value in enumerate(rows):
            yield RawRow(index + 1, value)
        return
    if not text.startswith("[", position):
        raise AfinaError("not_an_array", "expected a JSON array of examples", location=f"{path}:1")
    position = _skip_space(text, position + 1)
    while position < len(text) and text[position] != "]":
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise AfinaError("invalid_json", exc.msg, location=f"{path}:{exc.lineno}") from exc
        yield RawRow(line, value)
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position >= len(text) or text[position] != "]":
            raise AfinaError("invalid_json", "expected ',' or ']' between examples",
                             location=f"{path}:{text.count(chr(10), 0, position) + 1}")
    if position >= len(text):
        raise AfinaError("invalid_json", "the array is not closed with ']'", location=f"{path}:{text.count(chr(10)) + 1}")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path) -> Iterator[RawRow]:
    """CSV with a header row; a cell holding a JSON list (a `messages` column) is decoded."""
    text = _decode_whole(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    for row in reader:
        if None in row:
            yield RawRow(start, problem=("invalid_csv", "more cells than header columns"))
        else:
            yield RawRow(start, {key: _maybe_json(value) for key, value in row.items()})
        start = reader.line_num + 1


def _maybe_json(cell: str | None) -> object:
    if cell and cell.lstrip().startswith(("[", "{")):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise AfinaError("invalid_parquet", f"cannot read Parquet: {exc}", location=str(path)) from exc
    for index, row in enumerate(table.to_pylist()):
        yield RawRow(index + 1, row)
