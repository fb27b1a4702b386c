"""Check a data file before any compute is spent on it: every problem has a code, a line and a field."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from afina.data.formats import Problem, normalize_row
from afina.data.readers import read_rows
from afina.data.records import Record
from afina.errors import AfinaError

# The record kinds one file may mix: chats from different source formats are still chats.
KIND_OF_FORMAT = {"messages": "chat", "sharegpt": "chat", "prompt_completion": "chat", "alpaca": "chat",
                  "text": "text", "preference": "preference",
                  "unpaired": "unpaired"}


@dataclass
class DataReport:
    """What reading and checking a file found. `records` holds only the valid, kept rows."""

    path: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
    rows_skipped: int = 0
    formats: Counter = field(default_factory=Counter)
    duplicates: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def problem_counts(self) -> Counter:
        return Counter(p.code for p in self.problems)

    def first_error(self, hint: str | None = None) -> AfinaError:
        """The first invalid row as the one error a command ends with; the hint says what to do."""
        errors = self.errors
        first = errors[0]
        more = f"; {len(errors) - 1} more invalid rows" if len(errors) > 1 else ""
        hint = hint or (f"run `afina data inspect {self.path}` for the full report, "
                        "or set data.skip_invalid=true to train on the valid rows")
        return AfinaError(first.code, first.message + more, location=first.location(self.path), hint=hint)


def check_file(path: str | Path) -> DataReport:
    """Read and check every row; never raises for bad rows (the report lists them)."""
    report = DataReport(str(path))
    kind_seen: tuple[str, int] | None = None
    seen_keys: set[str] = set()
    for raw in read_rows(path):
        report.rows_read += 1
        report.problems.extend(raw.problems)
        if not raw.readable:
            continue
        record, problems = normalize_row(raw.value, raw.line)
        report.problems.extend(problems)
        if record is None:
            continue
        kind = KIND_OF_FORMAT[record.source_format]
        if kind_seen is None:
            kind_seen = (kind, record.line)
        elif kind != kind_seen[0]:
            report.problems.append(Problem("mixed_formats", record.line, None,
                                           f"a {kind} row in a file of {kind_seen[0]} rows (first at line {kind_seen[1]})"))
            continue
        key = record.content_key()
        if key in seen_keys:
            report.duplicates += 1
            report.problems.append(Problem("duplicate", record.line, None, "exact duplicate of an earlier row",
                                           severity="warning"))
        seen_keys.add(key)
        report.formats[record.source_format] += 1
        report.records.append(record)
    if report.rows_read == 0:
        raise AfinaError("empty_file", "the file holds no rows", location=str(path))
    return report


def load_records(path: str | Path, skip_invalid: bool = False) -> DataReport:
    """Read, check and keep the valid rows. Invalid rows fail the run unless `skip_invalid`."""
    report = check_file(path)
    invalid_lines = {p.line for p in report.errors}
    if invalid_lines and not skip_invalid:
        raise report.first_error()
    report.rows_skipped = len(invalid_lines)
    if not report.records:
        raise AfinaError("no_valid_rows", "no valid rows left to train on", location=str(path))
    return report
