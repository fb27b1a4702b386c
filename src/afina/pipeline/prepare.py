"""Read, check, split and tokenize a run's data, before anything is written or loaded.

Everything that can be wrong with the input (config, data file, rows) is checked here, before the
run directory is created, so bad input leaves nothing behind in the afina home.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import transformers

from afina.config.schema import RunConfig
from afina.data.mixture import mix_examples
from afina.data.pii import mask_record
from afina.data.records import Record
from afina.data.split import overlapping_records, split_records
from afina.data.validate import DataReport, load_records
from afina.devices import resolve_precision
from afina.errors import AfinaError, render_warning
from afina.models.loading import check_model_available, load_tokenizer
from afina.models.methods import check_method_supported
from afina.security.encryption import decrypted_copy
from afina.training.auto import resolve_auto
from afina.training.cost import load_price_table, price_per_hour
from afina.training.objectives import CptObjective, SftObjective, objective_for

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
    held_out: dict[str, DataReport] = field(default_factory=dict)  # data.test_path / validation_path, by split
    warnings: list[str] = field(default_factory=list)  # rendered `warning[code] at ...` lines
    choices: list[str] = field(default_factory=list)  # the `auto` training values chosen, with their reasons


def weights_dtype(config: RunConfig) -> torch.dtype:
    """bf16 for a frozen base when the run computes in bf16 (half the memory, and autocast no longer
    re-casts every weight at every step); fp32 for weights that are trained."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_precision(config.training.precision, device) == "bf16" and config.method.freezes_base:
        return torch.bfloat16
    return torch.float32


def prepare_data(config: RunConfig) -> PreparedData:
    """Read, check, split and tokenize, and choose the `auto` training values from the training
    examples: `config.training` is replaced by one holding numbers (`afina.training.auto`), so the
    run directory and the loop see only numbers. Raises AfinaError on bad input; writes nothing except
    the one-time default-model cache."""
    check_method_supported(config.method)  # a CUDA-only method on a CPU machine: refuse before any work
    objective = objective_for(config)
    if not config.training.auto_fields():  # with `auto`, checked once the values are chosen (below)
        objective.check(config)  # e.g. dpo/kto on full or freeze: no frozen base to compare with
    load_price_table()  # a broken $AFINA_HOME/prices.yaml or an unknown training.machine fails here,
    price_per_hour(config.training.machine, config.training.price_per_hour)  # not after the model loads
    check_model_available(config.model)
    sources = {"": config.data.path} if config.datasets is None else {
        name: task.path for name, task in config.datasets.tasks.items()}
    general_units(config, None)  # gate.general_data: checked now, measured after training
    held_out_sources = {} if config.datasets is not None else {
        name: source for name, source in (("validation", config.data.validation_path),
                                          ("test", config.data.test_path)) if source}
    paths, reports, tasks = {}, {}, {}
    for task, source in sources.items():  # every file is checked before any is tokenized
        paths[task] = resolve_data_path(source)
        reports[task] = read_data(paths[task], config)
        objective.check_rows(reports[task].records, str(paths[task]))
        tasks[task] = split_records(reports[task].records,
                                    0.0 if "validation" in held_out_sources else config.data.validation,
                                    0.0 if "test" in held_out_sources else config.data.test, config.data.split_seed)
    held_out = {}
    for name, source in held_out_sources.items():
        path = resolve_data_path(source)
        held_out[name] = read_data(path, config)
        objective.check_rows(held_out[name].records, str(path))
        tasks[""][name] = held_out[name].records
    warnings = [line for task in tasks for line in check_split_sizes(tasks[task], config, held_out_sources,
                                                                     str(paths[task]))]
    for name, report in held_out.items():
        shared = overlapping_records(report.records, tasks[""]["train"])
        if shared:
            warnings.append(render_warning(
                "test_overlap", f"{len(shared)} of {len(report.records)} {name} rows also appear in the training "
                f"rows (first at line {shared[0].line}); they measure memory, not generalization", report.path))
    tokenizer = load_tokenizer(config.model)
    examples = {task: {name: tokenize_split(rows, tokenizer, config, str(paths[task])) for name, rows in splits.items()}
                for task, splits in tasks.items()}
    if config.datasets is None:
        data = PreparedData(reports[""], tasks[""], examples[""], tokenizer, held_out=held_out, warnings=warnings)
    else:
        train, train_tasks = mix_examples({task: units["train"] for task, units in examples.items()},
                                          config.datasets.weights(), config.datasets.temperature, config.training.seed)
        together = {name: [row for splits in tasks.values() for row in splits[name]] for name in SPLITS}
        units = {name: [unit for task_units in examples.values() for unit in task_units[name]] for name in SPLITS}
        data = PreparedData(next(iter(reports.values())), together, {**units, "train": train}, tokenizer, tasks,
                            reports, train_tasks, warnings=warnings)
    if config.training.auto_fields():
        config.training, data.choices = resolve_auto(config.training, data.examples["train"], config.method)
        objective.check(config)
    return data


def check_split_sizes(splits: dict[str, list[Record]], config: RunConfig, held_out: dict[str, str],
                      path: str) -> list[str]:
    """Refuse a split that leaves nothing to train on or nothing to test on (the comparison with the
    base is the point of a run); an empty validation split only costs the validation loss, so it is a
    warning. Both say how many rows each split got and what to change."""
    sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    if not splits["train"]:
        raise AfinaError("no_training_rows", f"the split left no training rows ({sizes})", location=path,
                         hint="add rows or lower data.validation / data.test")
    if not splits["test"] and config.data.test > 0 and "test" not in held_out:
        raise AfinaError("too_few_rows", f"{sum(map(len, splits.values()))} rows split into {sizes}: no test rows to "
                         "compare the tuned model with its base", location=path,
                         hint=f"add rows (data.test={config.data.test:g} holds out about 1 in "
                              f"{round(1 / config.data.test)}), give a test file as data.test_path, "
                              "or set data.test=0 to train without a test")
    if not splits["validation"] and config.data.validation > 0 and "validation" not in held_out:
        return [render_warning("too_few_rows", f"{sum(map(len, splits.values()))} rows split into {sizes}: no "
                               "validation rows, so no validation loss and no early stopping", path)]
    return []


def tokenize_split(records: list[Record], tokenizer, config: RunConfig, path: str = "") -> list:
    """The units the run's objective trains on (`Objective.tokenize`): examples, pairs or completions."""
    return objective_for(config).tokenize(records, tokenizer, path)


def read_data(path: Path, config: RunConfig) -> DataReport:
    """A data file's valid rows, with `data.mask_pii` its personal data replaced by typed placeholders
    (`afina.data.pii`) before anything else sees them: splits, tokens, checkpoints, the store. An
    encrypted file (an upload kept by `afina server`) is read from a private decrypted copy."""
    with decrypted_copy(path) as plain:
        try:
            report = load_records(plain, skip_invalid=config.data.skip_invalid)
        except AfinaError as error:
            if plain != path and error.location:  # name the file the user knows, not the private copy
                error = AfinaError(error.code, error.message, error.location.replace(str(plain), str(path)),
                                   error.hint)
            raise error from None
    report.path = str(path)
    if config.data.mask_pii:
        report.records = [mask_record(record) for record in report.records]
    return report


def general_units(config: RunConfig, tokenizer) -> tuple[object, list] | None:
    """The `gate.general_data` file as (objective, units) for the forgetting check: chat rows are read
    as supervised examples, `text` rows as continued-pretraining blocks. Without a tokenizer the file
    is only read and checked. None when the gate has no general data."""
    if config.gate.general_data is None:
        return None
    path = resolve_data_path(config.gate.general_data)
    records = read_data(path, config).records
    kinds = {record.kind for record in records}
    objective = next((candidate for candidate in (SftObjective, CptObjective) if kinds <= set(candidate.reads)), None)
    if objective is None:
        raise AfinaError("wrong_data_for_objective", f"gate.general_data holds {', '.join(sorted(kinds))} rows; the "
                         "forgetting check reads chat or text rows", location=str(path))
    objective = objective.from_config(config)
    return objective, objective.tokenize(records, tokenizer, str(path)) if tokenizer is not None else []
