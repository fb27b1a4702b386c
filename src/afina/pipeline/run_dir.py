"""The run directory: where a run's inputs, checkpoints, trained weights and reports live.

    RUN/config.json             the validated config, every field spelled out
    RUN/{train,validation,test}.jsonl   the splits, as normalized records
    RUN/data_report.json        rows read and skipped, formats, duplicates, split sizes
    RUN/checkpoints/            atomic checkpoints (`afina.training.checkpoints`)
    RUN/adapter/                what the method trained, and the tokenizer
    RUN/metrics.jsonl, loss.png, eval.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from afina.config.schema import RunConfig
from afina.data.records import Record
from afina.data.validate import DataReport
from afina.errors import AfinaError
from afina.paths import runs_dir
from afina.pipeline.prepare import PreparedData


def new_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = runs_dir() / f"{name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


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
    (run_dir / "data_report.json").write_text(json.dumps(summary, indent=2))


def report_summary(report: DataReport, splits: dict[str, list[Record]]) -> dict:
    return {"path": report.path, "rows_read": report.rows_read, "rows_skipped": report.rows_skipped,
            "formats": dict(report.formats), "duplicates": report.duplicates,
            "splits": {name: len(rows) for name, rows in splits.items()}}


def write_records(path: Path, records: list[Record]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(run_dir))
    return RunConfig.model_validate_json(path.read_text())


def read_split(run_dir: Path, name: str) -> list[Record]:
    path = run_dir / f"{name}.jsonl"
    return [Record.from_json(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
