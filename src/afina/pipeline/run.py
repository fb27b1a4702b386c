"""A run from a config: validate the data, split it, tokenize, fine-tune, evaluate against the base.

    afina train configs/tickets-lora.yaml training.max_steps=20
    afina eval ~/.afina/runs/tickets-20261123-101500

Everything that can be wrong with the input (config, data file, rows) is checked before the run
directory is created, so bad input leaves nothing behind in the afina home.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import transformers
from rich.console import Console

from afina.config.schema import RunConfig
from afina.data.cpt import cpt_examples
from afina.data.mixture import mix_examples
from afina.data.preference import kto_examples, tokenize_preferences
from afina.data.records import Record
from afina.data.split import split_records
from afina.data.tokenize import tokenize_records
from afina.data.validate import DataReport, load_records
from afina.errors import AfinaError
from afina.eval.compare import comparison_table, evaluate_model
from afina.eval.preference import evaluate_preferences
from afina.models.adapters import (apply_method, base_model, check_method_supported, freezes_base,
                                   uses_paged_optimizer)
from afina.models.artifacts import load_trained, save_trained
from afina.models.loading import load_model, load_tokenizer
from afina.paths import runs_dir
from afina.training.allocator import missing_allocator_hint
from afina.training.estimate import check_before_launch
from afina.training.loop import TrainResult, train
from afina.training.precision import resolve_precision
from afina.training.reward import attach_reward_head, load_reward_head, save_reward_head
from afina.training.steps import check_objective_supported, objective_for

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
    """The run's rows and tokenized units per split. With `datasets`, `splits` and `examples` hold every
    task together (training examples drawn by the mixture), and `tasks` each task's own splits."""

    report: DataReport  # the first task's with datasets
    splits: dict[str, list[Record]]
    examples: dict[str, list]  # Example (sft, cpt), PreferencePair (dpo, orpo, reward) or KtoExample (kto)
    tokenizer: object
    tasks: dict[str, dict[str, list[Record]]] = field(default_factory=dict)
    reports: dict[str, DataReport] = field(default_factory=dict)
    train_tasks: list[str] = field(default_factory=list)  # the task of each training example (datasets only)


def weights_dtype(config: RunConfig) -> torch.dtype:
    """bf16 for a frozen base when the run computes in bf16 (half the memory, and autocast no longer
    re-casts every weight at every step); fp32 for weights that are trained."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_precision(config.training.precision, device) == "bf16" and freezes_base(config.method):
        return torch.bfloat16
    return torch.float32


def load_tuned_model(config: RunConfig, run_dir: Path):
    """The base model with what the run trained put back on it (adapter, modules or weights, and a
    reward model's head)."""
    base = load_model(config.model, dtype=weights_dtype(config))
    if config.objective.name == "reward":
        attach_reward_head(base)  # a full run saved the head among the model's parameters
    model = load_trained(base, run_dir / "adapter")
    if config.objective.name == "reward":
        load_reward_head(model, run_dir / "adapter")
    return model


def prepare_data(config: RunConfig) -> PreparedData:
    """Read, check, split and tokenize. Raises AfinaError on bad input; writes nothing except the
    one-time default-model cache."""
    check_method_supported(config.method)  # a CUDA-only method on a CPU machine: refuse before any work
    check_objective_supported(config)  # dpo/kto on full or freeze: no frozen base to compare with
    sources = {"": config.data.path} if config.datasets is None else {
        name: task.path for name, task in config.datasets.tasks.items()}
    paths, reports, tasks = {}, {}, {}
    for task, source in sources.items():  # every file is checked before any is tokenized
        paths[task] = resolve_data_path(source)
        reports[task] = load_records(paths[task], skip_invalid=config.data.skip_invalid)
        check_data_fits_objective(reports[task].records, config, str(paths[task]))
        tasks[task] = split_records(reports[task].records, config.data.validation, config.data.test,
                                    config.data.split_seed)
        if not tasks[task]["train"]:
            raise AfinaError("no_training_rows", "the split left no training rows", location=str(paths[task]),
                             hint="add rows or lower data.validation / data.test")
    tokenizer = load_tokenizer(config.model)
    examples = {task: {name: tokenize_split(rows, tokenizer, config, str(paths[task])) for name, rows in splits.items()}
                for task, splits in tasks.items()}
    if config.datasets is None:
        return PreparedData(reports[""], tasks[""], examples[""], tokenizer)
    train, train_tasks = mix_examples({task: units["train"] for task, units in examples.items()},
                                      config.datasets.weights(), config.datasets.temperature, config.training.seed)
    together = {name: [row for splits in tasks.values() for row in splits[name]] for name in SPLITS}
    units = {name: [unit for task_units in examples.values() for unit in task_units[name]] for name in SPLITS}
    return PreparedData(next(iter(reports.values())), together, {**units, "train": train}, tokenizer, tasks, reports,
                        train_tasks)


# the record kinds each objective reads, and how to name its rows in an error
PAIRS = (("preference",), "prompt/chosen/rejected")
OBJECTIVE_ROWS = {"cpt": (("text",), "`text`"), "dpo": PAIRS, "orpo": PAIRS, "reward": PAIRS,
                  "kto": (("preference", "unpaired"), "prompt/chosen/rejected or prompt/completion/label")}


def check_data_fits_objective(records: list[Record], config: RunConfig, path: str = "") -> None:
    """Refuse rows the objective cannot read, naming the first one (sft's own check is in tokenization)."""
    kinds, rows = OBJECTIVE_ROWS.get(config.objective.name, (None, ""))
    wrong = next((r for r in records if r.kind not in kinds), None) if kinds else None
    if wrong is not None:
        raise AfinaError("wrong_data_for_objective", f"objective {config.objective.name} reads {rows} rows, not "
                         f"{wrong.kind} rows", location=f"{path}:{wrong.line}",
                         hint="use objective: sft for chat data, cpt for text, dpo/orpo/kto/reward for preferences")


def tokenize_split(records: list[Record], tokenizer, config: RunConfig, path: str = "") -> list:
    """SFT: chat template, answers trained. CPT: raw documents cut into overlapping blocks.
    dpo, orpo, reward: preference pairs. kto: labelled completions (from pairs or unpaired rows)."""
    objective, max_length = config.objective, config.data.max_length
    check_data_fits_objective(records, config, path)
    if objective.name == "cpt":
        return cpt_examples(records, tokenizer, objective.block_length, objective.overlap)
    if objective.name == "kto":
        return kto_examples(records, tokenizer, max_length, path)
    if objective.on_preferences:
        return tokenize_preferences(records, tokenizer, max_length, path)
    return tokenize_records(records, tokenizer, max_length, config.data.train_on_prompt, path)


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


def run_training(config: RunConfig, console: Console, resume_dir: Path | None = None) -> tuple[Path, TrainResult]:
    """Train from a config (or resume the run in `resume_dir`); returns the run directory."""
    quiet_libraries()
    data = prepare_data(config)
    for task, report in (data.reports or {"": data.report}).items():
        splits = data.tasks.get(task, data.splits)
        console.print(f"data{' ' + task if task else ''}: {report.rows_read} rows read, {report.rows_skipped} skipped, "
                      "splits " + ", ".join(f"{n} {len(r)}" for n, r in splits.items()))
    if data.tasks:
        console.print("mixture: training draws " + ", ".join(f"{t} {data.train_tasks.count(t)}" for t in data.tasks))
    warning = check_before_launch(config, data.examples["train"])  # refuses a run that cannot fit
    if warning:
        console.print(f"[yellow]warning[/]: {warning}")
    hint = missing_allocator_hint()
    if hint:
        console.print(f"[yellow]note[/]: {hint}")
    run_dir = resume_dir or new_run_dir(config.name)
    if resume_dir is None:
        write_run_inputs(run_dir, config, data)
    with console.status(f"loading {config.model} (the default model is converted from GGUF on first use)"):
        model = load_model(config.model, dtype=weights_dtype(config))
    torch.manual_seed(config.training.seed)
    model = apply_method(model, config.method)
    if config.objective.name == "reward":
        attach_reward_head(model, config.training.seed)
    result = train(model, data.examples["train"], data.examples["validation"], config.training, run_dir,
                   data.tokenizer.pad_token_id, console, objective=objective_for(config),
                   paged_optimizer=uses_paged_optimizer(config.method))
    if result.status == "interrupted":
        console.print(f"interrupted at step {result.steps}; checkpoint saved. Resume with: afina train --resume {run_dir}")
        return run_dir, result
    save_trained(model, config.method, run_dir / "adapter")
    if config.objective.name == "reward":  # the head beside the method's weights: `load_reward_model(run_dir)`
        save_reward_head(model, run_dir / "adapter", config)
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
    """Compare the tuned model with its base on the run's test split (each task's with `datasets`);
    writes eval.json.

    With a frozen base the base model is the tuned one with its additions switched off (one copy in
    memory); full and freeze runs load a second, untouched copy."""
    quiet_libraries()
    config = load_run_config(run_dir)
    tokenizer = load_tokenizer(config.model)
    names = {"": "test"} if config.datasets is None else {task: f"test-{task}" for task in config.datasets.tasks}
    tasks = {}
    for task, split in names.items():
        records = read_split(run_dir, split)[: config.eval.max_examples or None]
        if not records:
            raise AfinaError("no_test_rows", "the run has an empty test split",
                             location=str(run_dir / f"{split}.jsonl"))
        tasks[task] = (records, tokenize_split(records, tokenizer, config))
    if model is None:
        model = load_tuned_model(config, run_dir)
    results = {task: compare_with_base(config, model, tokenizer, records, units, console)
               for task, (records, units) in tasks.items()}
    report = {"run": str(run_dir), "model": config.model, "objective": config.objective.name}
    if config.datasets is None:
        report.update(base=results[""][0], tuned=results[""][1])
    else:  # per task, and their plain average (each task counts once, whatever its size)
        report.update(base=average_metrics([b for b, _ in results.values()]),
                      tuned=average_metrics([t for _, t in results.values()]),
                      tasks={task: {"base": b, "tuned": t} for task, (b, t) in results.items()})
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for task, (base, tuned) in results.items():
        where = f"task {task}: " if task else ""
        title = f"{where}base vs tuned ({config.objective.name}) on the test split"
        console.print(comparison_table(base, tuned, title))
    return report


def base_scope(config: RunConfig, model):
    """A context-manager factory yielding the base model: `model` with its additions off, or for
    full / freeze a freshly loaded copy (dropped at the end)."""

    @contextlib.contextmanager
    def scope():
        if freezes_base(config.method):
            with base_model(model) as view:
                yield view
        else:
            untouched = load_model(config.model, dtype=weights_dtype(config))
            try:
                yield untouched
            finally:
                del untouched

    return scope


def compare_with_base(config: RunConfig, model, tokenizer, records: list[Record], units: list,
                      console: Console) -> tuple[dict, dict]:
    """(base, tuned) metrics on one test split: loss and generation metrics, or for the preference
    objectives preference accuracy and margins (`afina.eval.preference`)."""
    if config.objective.on_preferences:
        with console.status("evaluating the base and the tuned model on the test pairs"):
            return evaluate_preferences(model, base_scope(config, model), tokenizer, records, units, config)
    row_length = config.training.row_length
    with console.status("evaluating the base model"), base_scope(config, model)() as base_view:
        base = evaluate_model(base_view, tokenizer, records, units, config.eval, row_length)
    with console.status("evaluating the tuned model"):
        tuned = evaluate_model(model, tokenizer, records, units, config.eval, row_length)
    return base, tuned


def average_metrics(results: list[dict]) -> dict:
    """The mean of each number every result has (nested field accuracies left out)."""
    keys = [key for key, value in results[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {key: sum(r[key] for r in results) / len(results) for key in keys if all(key in r for r in results)}
