"""Read raw rows, with their physical line numbers, from JSONL, JSON, CSV and Parquet files.

Problems with a single row (bad JSON, bad UTF-8, a line too long to be a real example, a lone
surrogate, nesting no example needs) come back with the row so the caller can report or skip it;
problems with the whole file raise AfinaError with the file and, where there is one, the line.
Nothing else escapes: whatever the bytes, the outcome is rows or one located error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from afina.data.formats import Problem
from afina.data.text_checks import MAX_DEPTH, check_text_head, unusable_value
from afina.errors import AfinaError

MAX_LINE_BYTES = 4 * 1024 * 1024  # no real training example comes close; a longer line is a broken file
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
JSON_COLUMNS = ("messages", "conversations")  # CSV columns whose cells hold a JSON list


@dataclass(frozen=True)
class RawRow:
    """One row as read: the physical line it starts on, its value, and what reading it found.

    A row with an error-severity problem has no usable value; warnings leave it usable.
    """

    line: int
    value: object = None
    problems: tuple[Problem, ...] = ()

    @property
    def readable(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a data file; raise AfinaError for a file that cannot be read at all."""
    path = Path(path)
    try:
        yield from _read_rows(path)
    except OSError as exc:  # unreadable, a name too long, a disk error: the user's to fix, not a traceback
        raise AfinaError("unreadable_file", f"cannot read the file ({exc.strerror or exc})",
                         location=str(path)) from exc


def _read_rows(path: Path) -> Iterator[RawRow]:
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
    check_text_head(head, path, suffix)
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
            yield _bad(number, "line_too_long", f"line is over {MAX_LINE_BYTES // (1024 * 1024)} MiB")
            continue
        if number == 1 and raw.startswith(codecs.BOM_UTF8):  # as JSON and CSV files may start with one
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _bad(number, "invalid_utf8", f"byte {exc.start} is not valid UTF-8")
            continue
        if not text.strip():
            continue
        yield _json_row(number, text)


def _json_row(line: int, text: str, field: str | None = None) -> RawRow:
    """Decode one JSON value: a JSONL line, or a CSV cell named `field`."""
    if "\x00" in text:
        return _bad(line, "invalid_text", f"a NUL byte at column {text.index(chr(0)) + 1}: the text is damaged",
                    field)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if field:  # a CSV cell: say where in the cell, which may run over several lines
            where = f"line {exc.lineno}, column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
            return _bad(line, "invalid_json", f"the cell is not valid JSON: {exc.msg} ({where} of the cell)", field)
        return _bad(line, "invalid_json", f"{exc.msg} (column {exc.colno})")
    except RecursionError:
        return _bad(line, "too_deep", f"nested more than {MAX_DEPTH} levels deep", field)
    problem = unusable_value(value, text)
    if problem:
        code, message, where = problem
        return _bad(line, code, message, _join(field, where))
    return RawRow(line, value)


def _bad(line: int, code: str, message: str, field: str | None = None) -> RawRow:
    return RawRow(line, problems=(Problem(code, line, field, message),))


def _join(field: str | None, where: str) -> str | None:
    """A CSV cell's column name joined to a field inside the JSON it holds."""
    if not field or not where:
        return field or where or None
    return f"{field}{where}" if where.startswith("[") else f"{field}.{where}"


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AfinaError("invalid_utf8", f"byte {exc.start} is not valid UTF-8", location=f"{path}:{line}",
                         hint="save the file as UTF-8") from exc
    return text


def _read_json(path: Path) -> Iterator[RawRow]:
    """A JSON array of objects (or an object holding one such array under `data`), decoded element
    by element so each row keeps the line it starts on. Nothing may follow the array but space."""
    text = _decode_whole(path)
    lines = _Lines(text)
    nul = text.find("\x00")
    if nul >= 0:  # json would call it an invalid control character
        raise AfinaError("invalid_text", "a NUL byte: the text is damaged", location=f"{path}:{lines.at(nul)}")
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    wrapped = text.startswith("{", position)
    if wrapped:
        position = _members(text, position + 1, path, decoder, lines, until_data=True)
    elif not text.startswith("[", position):
        raise AfinaError("not_an_array", "expected a JSON array of examples", location=f"{path}:1")
    position = _skip_space(text, position + 1)
    while position < len(text) and text[position] != "]":
        line, start = lines.at(position), position
        value, position = _decode_at(decoder, text, position, path, line)
        problem = unusable_value(value, text, start, position)
        yield RawRow(line, value) if problem is None else _bad(line, problem[0], problem[1], problem[2] or None)
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position >= len(text) or text[position] != "]":
            raise AfinaError("invalid_json", "expected ',' or ']' between examples",
                             location=f"{path}:{lines.at(position)}")
    if position >= len(text):
        raise AfinaError("invalid_json", "the array is not closed with ']'", location=f"{path}:{lines.at(len(text))}")
    position += 1
    if wrapped:
        position = _members(text, position, path, decoder, lines, until_data=False)
    position = _skip_space(text, position)
    if position < len(text):
        raise AfinaError("invalid_json", f"text after the end of the {'object' if wrapped else 'array'}",
                         location=f"{path}:{lines.at(position)}", hint="a file holds one array of examples")


def _members(text: str, position: int, path: Path, decoder: json.JSONDecoder, lines: _Lines, until_data: bool) -> int:
    """Move over an object's members, from just after its `{` (until_data: stop at the `[` of the
    `data` array and return where it is) or just after the `data` array (return where the object ends)."""
    first = until_data
    while True:
        position = _skip_space(text, position)
        if position >= len(text):
            raise AfinaError("invalid_json", "the object is not closed with '}'",
                             location=f"{path}:{lines.at(position)}")
        if text.startswith("}", position):
            if not until_data:
                return position + 1
            raise AfinaError("not_an_array", "expected a JSON array of examples (or {\"data\": [...]})",
                             location=f"{path}:1")
        if not first:
            if not text.startswith(",", position):
                raise AfinaError("invalid_json", "expected ',' or '}' after a value",
                                 location=f"{path}:{lines.at(position)}")
            position = _skip_space(text, position + 1)
        first = False
        line = lines.at(position)
        key, position = _decode_at(decoder, text, position, path, line)
        position = _skip_space(text, position)
        if not isinstance(key, str) or not text.startswith(":", position):
            raise AfinaError("invalid_json", "expected a \"key\": value pair", location=f"{path}:{line}")
        position = _skip_space(text, position + 1)
        if until_data and key == "data" and text.startswith("[", position):
            return position
        _, position = _decode_at(decoder, text, position, path, lines.at(position))


class _Lines:
    """The line of a position in a text, counted on from the last position asked about (the
    readers move forward), so a long file is not counted from its start for every row."""

    def __init__(self, text: str):
        self.text, self.position, self.line = text, 0, 1

    def at(self, position: int) -> int:
        if position < self.position:
            self.position, self.line = 0, 1
        self.line += self.text.count("\n", self.position, position)
        self.position = position
        return self.line


def _decode_at(decoder: json.JSONDecoder, text: str, position: int, path: Path, line: int) -> tuple[object, int]:
    """One JSON value starting at `position` (on `line`), and where it ends."""
    try:
        return decoder.raw_decode(text, position)
    except json.JSONDecodeError as exc:
        raise AfinaError("invalid_json", exc.msg, location=f"{path}:{exc.lineno}") from exc
    except RecursionError as exc:
        raise AfinaError("too_deep", f"nested more than {MAX_DEPTH} levels deep", location=f"{path}:{line}") from exc


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path) -> Iterator[RawRow]:
    """CSV with a header row, its quoting read strictly: a stray or unterminated quote is a located
    error rather than rows silently merged. A `messages` or `conversations` cell holds JSON."""
    rows = _parse_csv(_decode_whole(path), path)
    if not rows:
        return
    (header_line, _, header), *body = rows
    repeated = [name for name, count in Counter(header).items() if name and count > 1]
    if repeated:
        raise AfinaError("invalid_csv", f"column {repeated[0]!r} appears twice in the header",
                         location=f"{path}:{header_line}")
    for first, last, cells in body:
        yield _csv_row(header, first, last, cells)


def _parse_csv(text: str, path: Path) -> list[tuple[int, int, list[str]]]:
    """Every non-blank row as (first line, last line, cells). Parsed in one go, so that the raised
    field size limit (a long document in a cell is ordinary data) is process state only meanwhile."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, first = [], 1
    limit = csv.field_size_limit(MAX_LINE_BYTES)
    try:
        for cells in reader:
            if cells:
                rows.append((first, reader.line_num, cells))
            first = reader.line_num + 1
    except csv.Error as exc:
        raise _csv_error(str(exc), path, first, reader.line_num) from exc
    finally:
        csv.field_size_limit(limit)
    return rows


def _csv_error(reason: str, path: Path, first: int, last: int) -> AfinaError:
    if "field limit" in reason:
        return AfinaError("cell_too_large", f"a cell in the row starting here is over "
                          f"{MAX_LINE_BYTES // (1024 * 1024)} MiB", location=f"{path}:{first}",
                          hint="an unclosed quote makes the rest of the file one cell; otherwise split the document")
    if "unexpected end of data" in reason:
        return AfinaError("unterminated_quote", f"a quote opened in the row starting here is never closed: the "
                          f"cell runs to the end of the file (line {last})", location=f"{path}:{first}",
                          hint="close the quote, and double any quote inside a quoted cell (\"\")")
    if "expected after" in reason:
        return AfinaError("stray_quote", "text follows the quote that closes a cell"
                          + (f" (the row starts at line {first})" if first != last else ""),
                          location=f"{path}:{last}", hint="quote the whole cell and double any quote inside it (\"\")")
    return AfinaError("invalid_csv", reason, location=f"{path}:{last}")


def _csv_row(header: list[str], first: int, last: int, cells: list[str]) -> RawRow:
    span = f" (the row runs over lines {first}-{last}: look for a stray quote)" if last > first else ""
    if len(cells) != len(header):
        return _bad(first, "invalid_csv", f"{len(cells)} cells where the header has {len(header)} columns{span}")
    row: dict[str, object] = {}
    warnings = []
    for name, cell in zip(header, cells):
        if "\x00" in cell:
            return _bad(first, "invalid_text", "a NUL byte: the text is damaged", name or None)
        if name in JSON_COLUMNS and cell.strip():
            decoded = _json_row(first, cell, name)
            if not decoded.readable:
                return decoded
            row[name] = decoded.value
        else:
            row[name] = _cell_value(name, cell)
        if last > first and _looks_like_rows(cell, len(header)):
            warnings.append(Problem("merged_rows", first, name or None, f"the cell runs over lines {first}-{last} "
                                    "and each line in it reads like a row: a stray quote may have merged rows",
                                    severity="warning"))
    return RawRow(first, row, tuple(warnings))


def _cell_value(name: str, cell: str) -> object:
    """A CSV cell is text, except a `label` of true/false and a `prompt` that is a JSON list of messages."""
    if name == "label" and cell.strip().lower() in ("true", "false"):
        return cell.strip().lower() == "true"
    if name == "prompt" and cell.lstrip().startswith("[") and '"role"' in cell:
        try:
            value = json.loads(cell)
        except (json.JSONDecodeError, RecursionError):
            return cell
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return value if unusable_value(value, cell) is None else cell
    return cell


def _looks_like_rows(cell: str, columns: int) -> bool:
    """Whether every line after the first in a multi-line cell has exactly a row's number of commas."""
    inner = cell.splitlines()[1:]
    return columns > 1 and bool(inner) and all(line.count(",") == columns - 1 for line in inner)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield RawRow(number, row)
    except Exception as exc:  # pyarrow raises several types for a file that is not (quite) Parquet
        after = f" after row {number}" if number else ""
        raise AfinaError("invalid_parquet", f"cannot read Parquet{after}: {exc}", location=str(path)) from exc
