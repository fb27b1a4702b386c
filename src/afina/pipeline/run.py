"""A run from a config: validate the data, split it, tokenize, fine-tune, evaluate against the base.

    afina train configs/tickets-lora.yaml training.max_steps=20
    afina eval ~/.afina/runs/tickets-20261123-101500

Everything that can be wrong with the input (config, data file, rows) is checked before the run
directory is created, so bad input leaves nothing behind in the afina home.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers
from rich.console import Console

from afina.config.schema import RunConfig
from afina.data.records import Record
from afina.data.split import split_records
from afina.data.tokenize import Example, tokenize_records
from afina.data.validate import DataReport, load_records
from afina.errors import AfinaError
from afina.eval.compare import comparison_table, evaluate_model
from afina.models.adapters import apply_method, base_model, check_method_supported, freezes_base
from afina.models.artifacts import load_trained, save_trained
from afina.models.loading import load_model, load_tokenizer
from afina.paths import runs_dir
from afina.training.loop import TrainResult, train
from afina.training.precision import resolve_precision

SPLITS = ("train", "validation", "test")


def quiet_libraries() -> None:
    """Library chatter (deprecation notices, per-file progress bars) hides afina's own progress."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def resolve_data_path(path: str) -> Path:
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        bundled = resources.files("afina.data.example") / f"{name}.jsonl"
        if not bundled.is_file():
            raise AfinaError("file_not_found", f"no bundled dataset {name!r}", location="data.path",
                             hint="the bundled dataset is bundled:tickets")
        return Path(str(bundled))
    return Path(path).expanduser()


@dataclass
class PreparedData:
    report: DataReport
    splits: dict[str, list[Record]]
    examples: dict[str, list[Example]]
    tokenizer: object


def weights_dtype(config: RunConfig) -> torch.dtype:
    """bf16 for a frozen base when the run computes in bf16 (half the memory, and autocast no longer
    re-casts every weight at every step); fp32 for weights that are trained."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_precision(config.training.precision, device) == "bf16" and freezes_base(config.method):
        return torch.bfloat16
    return torch.float32


def load_tuned_model(config: RunConfig, run_dir: Path):
    """The base model with what the run trained put back on it (adapter, modules or weights)."""
    return load_trained(load_model(config.model, dtype=weights_dtype(config)), run_dir / "adapter")


def prepare_data(config: RunConfig) -> PreparedData:
    """Read, check, split and tokenize. Raises AfinaError on bad input; writes nothing except the
    one-time default-model cache."""
    check_method_supported(config.method)  # a CUDA-only method on a CPU machine: refuse before any work
    path = resolve_data_path(config.data.path)
    report = load_records(path, skip_invalid=config.data.skip_invalid)
    splits = split_records(report.records, config.data.validation, config.data.test, config.data.split_seed)
    if not splits["train"]:
        raise AfinaError("no_training_rows", "the split left no training rows", location=str(path),
                         hint="add rows or lower data.validation / data.test")
    tokenizer = load_tokenizer(config.model)
    examples = {name: tokenize_records(rows, tokenizer, config.data.max_length, config.data.train_on_prompt, str(path))
                for name, rows in splits.items()}
    return PreparedData(report, splits, examples, tokenizer)


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
        with (run_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for record in rows:
                handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    summary = {"path": data.report.path, "rows_read": data.report.rows_read, "rows_skipped": data.report.rows_skipped,
               "formats": dict(data.report.formats), "duplicates": data.report.duplicates,
               "splits": {name: len(rows) for name, rows in data.splits.items()}}
    (run_dir / "data_report.json").write_text(json.dumps(summary, indent=2))


def run_training(config: RunConfig, console: Console, resume_dir: Path | None = None) -> tuple[Path, TrainResult]:
    """Train from a config (or resume the run in `resume_dir`); returns the run directory."""
    quiet_libraries()
    data = prepare_data(config)
    console.print(f"data: {data.report.rows_read} rows read, {data.report.rows_skipped} skipped, "
                  f"splits " + ", ".join(f"{n} {len(r)}" for n, r in data.splits.items()))
    run_dir = resume_dir or new_run_dir(config.name)
    if resume_dir is None:
        write_run_inputs(run_dir, config, data)
    with console.status(f"loading {config.model} (the default model is converted from GGUF on first use)"):
        model = load_model(config.model, dtype=weights_dtype(config))
    torch.manual_seed(config.training.seed)
    model = apply_method(model, config.method)
    result = train(model, data.examples["train"], data.examples["validation"], config.training, run_dir,
                   data.tokenizer.pad_token_id, console)
    if result.status == "interrupted":
        console.print(f"interrupted at step {result.steps}; checkpoint saved. Resume with: afina train --resume {run_dir}")
        return run_dir, result
    save_trained(model, config.method, run_dir / "adapter")
    data.tokenizer.save_pretrained(run_dir / "adapter")
    notes = {"early_stopped": f"; stopped early, keeping the best step {result.best_step}",
             "time_limit": "; stopped at training.max_time_minutes",
             "cost_limit": "; stopped at training.max_cost",
             "diverged": f"; stopped after repeated non-finite losses ({result.skipped_steps} steps skipped): "
                         "lower training.learning_rate"}
    cost = f", ${result.cost:,.2f}" if result.cost else ""
    console.print(f"trained {result.steps} steps in {result.seconds:.0f}s ({result.tokens_per_second:,.0f} tok/s{cost})"
                  f"{notes.get(result.status, '')}; run directory {run_dir}")
    return run_dir, result


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(run_dir))
    return RunConfig.model_validate_json(path.read_text())


def read_split(run_dir: Path, name: str) -> list[Record]:
    path = run_dir / f"{name}.jsonl"
    return [Record.from_json(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evaluate_run(run_dir: Path, console: Console, model=None) -> dict:
    """Compare the tuned model with its base on the run's test split; writes eval.json.

    With a frozen base the base model is the tuned one with its additions switched off (one copy in
    memory); full and freeze runs load a second, untouched copy."""
    quiet_libraries()
    config = load_run_config(run_dir)
    tokenizer = load_tokenizer(config.model)
    records = read_split(run_dir, "test")
    if config.eval.max_examples:
        records = records[: config.eval.max_examples]
    if not records:
        raise AfinaError("no_test_rows", "the run has an empty test split", location=str(run_dir / "test.jsonl"))
    examples = tokenize_records(records, tokenizer, config.data.max_length, config.data.train_on_prompt)
    if model is None:
        model = load_tuned_model(config, run_dir)
    row_length = config.training.row_length
    with console.status("evaluating the base model"):
        if freezes_base(config.method):
            with base_model(model) as base_view:
                base = evaluate_model(base_view, tokenizer, records, examples, config.eval, row_length)
        else:
            untouched = load_model(config.model, dtype=weights_dtype(config))
            base = evaluate_model(untouched, tokenizer, records, examples, config.eval, row_length)
            del untouched
    with console.status("evaluating the tuned model"):
        tuned = evaluate_model(model, tokenizer, records, examples, config.eval, row_length)
    report = {"run": str(run_dir), "model": config.model, "base": base, "tuned": tuned}
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    console.print(comparison_table(base, tuned))
    return report
