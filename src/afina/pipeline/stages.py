"""The stages of a run: train from a config (or resume), then compare the tuned model with its base.

    afina train configs/tickets-lora.yaml training.max_steps=20
    afina eval ~/.afina/runs/tickets-20261123-101500
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from rich.console import Console

from afina.config.schema import RunConfig
from afina.data.records import Record
from afina.errors import AfinaError
from afina.estimate import check_before_launch
from afina.eval.compare import comparison_table, evaluate_objective
from afina.models.artifacts import check_trained, load_trained, save_trained
from afina.models.loading import load_model, load_tokenizer
from afina.models.methods import apply_method, base_model, check_method_supported, quantization_config
from afina.paths import check_afina_home
from afina.pipeline.prepare import (PreparedData, general_units, prepare_data, quiet_libraries, read_data,
                                   tokenize_split, weights_dtype)
from afina.pipeline.run_dir import create_run_dir, load_run_config, read_split, save_run_config
from afina.security.encryption import encrypt_tree, use_encryption, write_bytes
from afina.training.allocator import missing_allocator_hint
from afina.training.checkpoints import list_checkpoints
from afina.training.distributed import current_ranks, from_main, is_main_process, load_qlora_base_for_sharding
from afina.training.loop import TrainResult, train
from afina.training.objectives import objective_for
from afina.training.validation import evaluate_loss


def load_tuned_model(config: RunConfig, run_dir: Path):
    """The base model with what the run trained put back on it (adapter, modules or weights, and a
    reward model's head)."""
    use_encryption()  # the run's files are read through it (afina.sealing)
    objective = objective_for(config)
    base = load_model(config.model, dtype=weights_dtype(config))
    objective.prepare_model(base, config.training.seed)  # a full run saved its additions among the parameters
    model = load_trained(base, run_dir / "adapter")
    objective.load_extras(model, run_dir / "adapter")
    return model


def run_training(config: RunConfig, console: Console, resume_dir: Path | None = None) -> tuple[Path, TrainResult]:
    """Train from a config (or resume the run in `resume_dir` with `config`, its saved config with any
    changed budgets); returns the run directory. Everything is checked and the model loaded before a
    new run directory appears, and one that fails before its first checkpoint is removed again."""
    use_encryption()  # checkpoints and trained weights are sealed through it (afina.sealing)
    data = prepare_run(config, console)
    if resume_dir is not None:
        saved = resume_dir / "config.json"
        if saved.is_file() and saved.read_text() != config.model_dump_json(indent=2):  # budgets changed
            save_run_config(resume_dir, config)
        return resume_dir, train_run(config, data, resume_dir, console)
    model = load_training_model(config, console)
    run_dir = from_main(create_run_dir(config, data) if is_main_process() else None)  # one for all processes
    try:
        return run_dir, train_run(config, data, run_dir, console, model)
    except BaseException:
        if not list_checkpoints(run_dir / "checkpoints"):  # nothing to resume from: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def prepare_run(config: RunConfig, console: Console) -> PreparedData:
    """Read, check, split and tokenize the data, and refuse a run that cannot fit; writes nothing."""
    check_afina_home()  # a run is written there: refuse an unusable home before any work
    quiet_libraries()
    data = prepare_data(config)
    for line in data.warnings:
        console.print(line, markup=False, highlight=False, style="yellow", soft_wrap=True)
    for task, report in (data.reports or {"": data.report}).items():
        splits = data.tasks.get(task, data.splits)
        console.print(f"data{' ' + task if task else ''}: {report.rows_read} rows read, {report.rows_skipped} skipped, "
                      "splits " + ", ".join(f"{n} {len(r)}" for n, r in splits.items()))
    for line in data.choices:  # the `auto` training values, saved as numbers in the run's config.json
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if data.tasks:
        console.print("mixture: training draws " + ", ".join(f"{t} {data.train_tasks.count(t)}" for t in data.tasks))
    warning = check_before_launch(config, data.examples["train"])  # refuses a run that cannot fit
    if warning:
        console.print(f"[yellow]warning[/]: {warning}")
    hint = missing_allocator_hint()
    if hint:
        console.print(f"[yellow]note[/]: {hint}")
    return data


def load_training_model(config: RunConfig, console: Console):
    """The base model with the run's method applied, ready for `train_run`."""
    with console.status(f"loading {config.model} (the default model is converted from GGUF on first use)"):
        model = load_base_for_training(config)
    torch.manual_seed(config.training.seed)
    return apply_method(model, config.method)


def load_base_for_training(config: RunConfig):
    """The base as the method trains it: quantized as it loads for a k-bit method (qlora's 4-bit base;
    stored in the compute dtype where FSDP shards it), else in `weights_dtype`."""
    method = config.method
    if not method.base_bits:
        return load_model(config.model, dtype=weights_dtype(config))
    check_method_supported(method)  # bitsandbytes and CUDA, before any weight is read
    if current_ranks().distributed and config.training.parallel == "fsdp":
        return load_qlora_base_for_sharding(config.model, method)
    return load_model(config.model, dtype=weights_dtype(config), quantization_config=quantization_config(method))


def train_run(config: RunConfig, data: PreparedData, run_dir: Path, console: Console, model=None) -> TrainResult:
    """Load the model (unless given, from `load_training_model`), apply the method, train (resuming
    from the run's last good checkpoint), and save what was trained in `run_dir/adapter`."""
    if model is None:
        model = load_training_model(config, console)
    objective = objective_for(config)
    objective.prepare_model(model, config.training.seed)
    result = train(model, data.examples["train"], data.examples["validation"], config.training, run_dir,
                   data.tokenizer.pad_token_id, console, objective=objective,
                   paged_optimizer=config.method.uses_paged_optimizer)
    if result.status == "interrupted":
        console.print(f"interrupted at step {result.steps}; checkpoint saved. Resume with: afina train --resume {run_dir}")
        return result
    if not is_main_process():  # under torchrun, rank 0 saves what every process trained
        return result
    save_trained(model, config.method, run_dir / "adapter")
    objective.save_extras(model, run_dir / "adapter", config)
    data.tokenizer.save_pretrained(run_dir / "adapter")
    encrypt_tree(run_dir / "adapter")  # with a master key: what was trained is kept encrypted
    notes = {"early_stopped": f"; stopped early, keeping the best step {result.best_step}",
             "time_limit": "; stopped at training.max_time_minutes",
             "cost_limit": "; stopped at training.max_cost",
             "diverged": f"; stopped after repeated non-finite losses ({result.skipped_steps} steps skipped): "
                         "lower training.learning_rate"}
    cost = f", ${result.cost:,.2f}" if result.cost else ""
    console.print(f"trained {result.steps} steps in {result.seconds:.0f}s ({result.tokens_per_second:,.0f} tok/s{cost})"
                  f"{notes.get(result.status, '')}; run directory {run_dir}")
    return result


def evaluate_run(run_dir: Path, console: Console, model=None, data_file: Path | None = None) -> dict:
    """Compare the tuned model with its base on the run's test split (each task's with `datasets`), or
    on `data_file`; writes eval.json (eval-FILE.json for a file). With `gate.general_data` the report
    also holds both models' loss on that general-purpose file (the forgetting check).

    With a frozen base the base model is the tuned one with its additions switched off (one copy in
    memory); full and freeze runs load a second, untouched copy."""
    use_encryption()
    quiet_libraries()
    config = load_run_config(run_dir)  # the run is checked before any model loads
    if data_file is not None:
        report = read_data(data_file, config)
        objective_for(config).check_rows(report.records, str(data_file))
        splits = {"": report.records[: config.eval.max_examples or None]}
        target = run_dir / f"eval-{data_file.stem}.json"
    else:
        names = {"": "test"} if config.datasets is None else {task: f"test-{task}" for task in config.datasets.tasks}
        splits = {task: read_split(run_dir, split)[: config.eval.max_examples or None] for task, split in names.items()}
        for task, records in splits.items():
            if not records:
                raise AfinaError("no_test_rows", "the run has an empty test split",
                                 location=str(run_dir / f"{names[task]}.jsonl"))
        target = run_dir / "eval.json"
    if model is None:
        check_trained(run_dir / "adapter")
    tokenizer = load_tokenizer(config.model)
    tasks = {task: (records, tokenize_split(records, tokenizer, config)) for task, records in splits.items()}
    general = general_units(config, tokenizer)
    if model is None:
        model = load_tuned_model(config, run_dir)
    results = {task: compare_with_base(config, model, tokenizer, records, units, console)
               for task, (records, units) in tasks.items()}
    report = {"run": str(run_dir), "model": config.model, "objective": config.objective.name,
              "data": str(data_file) if data_file is not None else "test split"}
    if len(results) == 1:
        report.update(base=results[""][0], tuned=results[""][1])
    else:  # per task, and their plain average (each task counts once, whatever its size)
        report.update(base=average_metrics([b for b, _ in results.values()]),
                      tuned=average_metrics([t for _, t in results.values()]),
                      tasks={task: {"base": b, "tuned": t} for task, (b, t) in results.items()})
    if general is not None:
        report["general"] = general_losses(config, model, tokenizer, *general)
    write_bytes(target, json.dumps(report, indent=2, ensure_ascii=False).encode())  # holds test rows: encrypted
    for task, (base, tuned) in results.items():
        where = f"task {task}: " if task else ""
        title = f"{where}base vs tuned ({config.objective.name}) on {report['data']}"
        console.print(comparison_table(base, tuned, title))
    if general is not None:
        console.print(f"general data ({config.gate.general_data}): loss base {report['general']['base_loss']:.3f}, "
                      f"tuned {report['general']['tuned_loss']:.3f}")
    return report


def general_losses(config: RunConfig, model, tokenizer, objective, units: list) -> dict:
    """Base and tuned loss on the gate's general-purpose data: how much tuning forgot."""
    pad = tokenizer.pad_token_id
    with base_scope(config, model)() as base_view:
        base_loss = evaluate_loss(base_view, units, objective, 1, pad)[0]
    return {"path": config.gate.general_data, "base_loss": base_loss,
            "tuned_loss": evaluate_loss(model, units, objective, 1, pad)[0]}


def base_scope(config: RunConfig, model):
    """A context-manager factory yielding the base model: `model` with its additions off, or for
    full / freeze a freshly loaded copy (dropped at the end)."""

    @contextlib.contextmanager
    def scope():
        if config.method.freezes_base:
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
    """(base, tuned) metrics on one test split, as the run's objective measures them
    (`afina.eval.compare.evaluate_objective`): loss and generation metrics, or preference accuracy and margins."""
    with console.status("evaluating the base and the tuned model on the test split"):
        return evaluate_objective(objective_for(config), model, base_scope(config, model), tokenizer, records, units,
                                  config)


def average_metrics(results: list[dict]) -> dict:
    """The mean of each number every result has (nested field accuracies left out)."""
    keys = [key for key, value in results[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {key: sum(r[key] for r in results) / len(results) for key in keys if all(key in r for r in results)}
