"""The run directory: where a run's inputs, checkpoints, trained weights and reports live.

    RUN/config.json             the validated config, every field spelled out
    RUN/{train,validation,test}.jsonl   the splits, as normalized records (encrypted with a master key)
    RUN/data_report.json        rows read and skipped, formats, duplicates, split sizes
    RUN/checkpoints/            atomic checkpoints (`afina.training.checkpoints`)
    RUN/adapter/                what the method trained, and the tokenizer
    RUN/metrics.jsonl, loss.png, eval.json

A new run directory appears whole or not at all: its inputs are written into a hidden staging
directory under runs/ and renamed into place (`create_run_dir`). Commands that read a run check it
first (`check_run_dir`), so a damaged file is one located error before any model loads.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from pydantic import ValidationError

from afina.config.loading import describe_error
from afina.config.schema import RunConfig
from afina.data.records import Record
from afina.data.validate import DataReport
from afina.errors import AfinaError
from afina.models.artifacts import check_trained
from afina.paths import runs_dir
from afina.pipeline.prepare import PreparedData
from afina.security.encryption import read_bytes, write_bytes


def free_run_path(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = runs_dir() / f"{name}-{stamp}-{suffix}"
    return path


def create_run_dir(config: RunConfig, data: PreparedData) -> Path:
    """A new run directory holding the run's inputs, created atomically: written in a hidden staging
    directory under runs/, then renamed into place, so a failure leaves no half-written run."""
    runs_dir().mkdir(parents=True, exist_ok=True)
    staging = runs_dir() / f".staging-{config.name}-{secrets.token_hex(6)}"
    staging.mkdir()  # hidden, and with the permissions of any directory the user makes
    try:
        write_run_inputs(staging, config, data)
        while True:
            path = free_run_path(config.name)
            try:
                os.rename(staging, path)  # fails, rather than merging, if another run took the name
                return path
            except OSError:
                if not path.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_run_inputs(run_dir: Path, config: RunConfig, data: PreparedData) -> None:
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    for name, rows in data.splits.items():
        write_records(run_dir / f"{name}.jsonl", rows)
    summary = report_summary(data.report, data.splits)
    if data.tasks:  # each task's test split is evaluated on its own
        summary = {"tasks": {task: report_summary(data.reports[task], splits) for task, splits in data.tasks.items()},
                   "drawn": {task: data.train_tasks.count(task) for task in data.tasks}}
        for task, splits in data.tasks.items():
            write_records(run_dir / f"test-{task}.jsonl", splits["test"])
    if data.held_out:  # data.test_path / data.validation_path, used as they are
        summary["held_out"] = {name: {"path": report.path, "rows_read": report.rows_read,
                                      "rows_skipped": report.rows_skipped} for name, report in data.held_out.items()}
    (run_dir / "data_report.json").write_text(json.dumps(summary, indent=2))


def report_summary(report: DataReport, splits: dict[str, list[Record]]) -> dict:
    return {"path": report.path, "rows_read": report.rows_read, "rows_skipped": report.rows_skipped,
            "formats": dict(report.formats), "duplicates": report.duplicates,
            "splits": {name: len(rows) for name, rows in splits.items()}}


def write_records(path: Path, records: list[Record]) -> None:
    """The records as JSON lines, encrypted when a master key is set (`afina.security.encryption`)."""
    lines = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
    write_bytes(path, lines.encode("utf-8"))


def delete_trained(run_dir: Path) -> list[str]:
    """Delete what a run trained (its trained weights and checkpoints), keeping its inputs, metrics and
    reports: a discarded or deleted model's record stays readable. Returns what was deleted."""
    deleted = []
    for name in ("adapter", "checkpoints"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
            deleted.append(name)
    return deleted


def save_run_config(run_dir: Path, config: RunConfig) -> None:
    """Replace the run's config.json atomically (a resume that changed its budgets)."""
    staging = run_dir / ".config.json.tmp"
    staging.write_text(config.model_dump_json(indent=2))
    os.replace(staging, run_dir / "config.json")


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's saved config; a missing directory, or a config.json that is damaged (truncated,
    emptied, edited into an invalid config), is one located error."""
    path = run_dir / "config.json"
    if not run_dir.is_dir() or not path.is_file():
        raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(run_dir))
    try:
        return RunConfig.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = [describe_error(error) if error["type"] != "json_invalid" else f"not valid JSON ({error['msg']})"
                    for error in exc.errors()]
        raise AfinaError("run_damaged", f"the run's config is damaged: {'; '.join(problems[:5])}", location=str(path),
                         hint="the run cannot be used as it is; start a new run") from None


def read_split(run_dir: Path, name: str) -> list[Record]:
    """A split the run wrote; a damaged line is an error at its file:line."""
    path = run_dir / f"{name}.jsonl"
    if not path.is_file():
        raise AfinaError("run_damaged", f"the run's {name} split is missing", location=str(path))
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise AfinaError("run_damaged", "the split is not UTF-8 text", location=str(path)) from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(Record.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise AfinaError("run_damaged", f"not a record written by afina ({type(exc).__name__}: {exc})"[:300],
                             location=f"{path}:{number}", hint="the run's split is damaged; start a new run") from None
    return records


def check_run_dir(run_dir: Path, splits: tuple[str, ...] = (), trained: bool = False) -> RunConfig:
    """Check what a command is about to read from a run, before any model loads: its config, the
    named splits (each line), and with `trained` the trained weights. Returns the config."""
    config = load_run_config(run_dir)
    for name in splits:
        read_split(run_dir, name)
    if trained:
        check_trained(run_dir / "adapter")
    return config
