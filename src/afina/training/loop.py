"""afina's training loop: one loop for every run and every objective, read top to bottom.

    for each optimizer step (rows_per_batch x gradient_accumulation items: packed rows, pairs or completions):
        cut the items into micro-batches; for each: loss = the objective's loss sum / the count of
        the whole step (trained tokens, pairs or completions: exact accumulation), backward
        out of memory? halve the micro-batch, turn on checkpointing, redo the step (same items)
        clip, AdamW (skipped for a non-finite loss or gradient), schedule
        every eval_every steps: validation loss (the objective's);  every save_every steps: atomic checkpoint
        a signal, the time or cost budget, early stopping: checkpoint and stop

What an objective groups, collates and minimizes is in `afina.training.steps`.
The batches of an epoch are a pure function of (examples, seed, epoch), and checkpoints hold the
position inside the epoch, the optimizer, the schedule and the RNG state, so a resumed run takes
exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from afina.config.schema import TrainingConfig
from afina.models.adapters import make_optimizer, model_shares_prefixes, trainable_parameters
from afina.errors import AfinaError
from afina.training.checkpoints import latest_checkpoint, restore_checkpoint, restore_weights, save_checkpoint
from afina.training.loss import sft_loss_sum  # noqa: F401  (the sft objective calls it through this module)
from afina.training.cost import cost_of, price_per_hour
from afina.training.memory import (MicroBatching, checkpointing_enabled, free_memory, is_out_of_memory,
                                   set_gradient_checkpointing)
from afina.training.metrics import MetricsLog, plot_loss_curves
from afina.training.precision import autocast_for, resolve_precision
from afina.training.schedule import make_scheduler
from afina.training.steps import rows_per_step, token_objective  # rows_per_step: re-exported for estimate.py


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    validation_loss: float | None
    trained_tokens: int
    tokens_per_second: float
    seconds: float
    resumed_from: int | None
    status: str = "completed"
    best_step: int | None = None
    best_validation_loss: float | None = None
    skipped_steps: int = 0
    cost: float = 0.0
    events: list = field(default_factory=list)


def total_steps(train: list, config: TrainingConfig, objective=None) -> int:
    if config.max_steps:
        return config.max_steps
    objective = objective or token_objective(config.row_length)
    steps_per_epoch = math.ceil(len(objective.items(train)) / rows_per_step(config))
    return max(1, math.ceil(config.epochs * steps_per_epoch))


@torch.no_grad()
def evaluate_loss(model, examples: list, row_length: int, rows_per_batch: int, pad_id: int,
                  autocast=None, objective=None) -> tuple[float, int]:
    """The objective's mean loss over `examples` (SFT by default: cross-entropy per trained token),
    and the count it is averaged over. Out of memory halves the items per batch and retries, down to one."""
    was_training = model.training
    model.eval()
    objective = objective or token_objective(row_length, model_shares_prefixes(model))
    total, count = 0.0, 0
    items = objective.items(examples)
    device = next(model.parameters()).device
    start = 0
    while start < len(items):
        part = items[start : start + rows_per_batch]
        batch = objective.collate(part, pad_id).to(device)
        try:
            with autocast() if autocast else contextlib.nullcontext():
                total += float(objective.loss_sum(model, batch))
        except Exception as error:
            if not is_out_of_memory(error) or rows_per_batch == 1:
                raise
            del batch
            free_memory()
            rows_per_batch //= 2
            continue
        count += objective.count(batch)
        start += len(part)
    model.train(was_training)
    return total / max(1, count), count


class StopRequest:
    """SIGINT/SIGTERM during training: finish the current optimizer step, checkpoint, stop.

    A spot instance gets a SIGTERM two minutes before it is reclaimed; one step plus a checkpoint
    fits in that. A second signal aborts at once (the last checkpoint still stands).
    """

    def __init__(self):
        self.signal: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(model, train_examples: list, validation_examples: list, config: TrainingConfig,
          run_dir: Path, pad_id: int, console: Console | None = None,
          after_step: Callable[[int], None] | None = None, objective=None,
          paged_optimizer: bool = False) -> TrainResult:
    """Train `model` in place; resumes from the run's newest intact checkpoint if there is one.

    `objective` (from `afina.training.steps.objective_for`; SFT by default) says what the examples
    are, how a step's micro-batches are collated and what is minimized. `paged_optimizer` (qlora's
    option) trains with bitsandbytes' paged 8-bit AdamW.

    Ends with a status: completed, interrupted (signal), early_stopped (validation loss stopped
    improving; the model then holds the best checkpoint's weights), time_limit, cost_limit or
    diverged (repeated non-finite losses; their updates were skipped, so the weights are the last
    good ones). `after_step` is called after every optimizer step (tests use it to inject signals).
    """
    console = console or Console()
    objective = objective or token_objective(config.row_length, model_shares_prefixes(model))
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    autocast = autocast_for(resolve_precision(config.precision, accelerator.device), accelerator.device)
    hourly = price_per_hour(config.machine, config.price_per_hour)
    trainable = trainable_parameters(model)
    optimizer = make_optimizer(trainable.values(), config.learning_rate, config.weight_decay, paged_optimizer)
    steps = total_steps(train_examples, config, objective)
    scheduler = make_scheduler(optimizer, steps, int(config.warmup_ratio * steps), config.schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints_dir = run_dir / "checkpoints"
    state = {"epoch": 0, "step_in_epoch": 0, "tokens": 0, "train_loss": float("nan"), "best_loss": None,
             "best_step": None, "evals_without_improvement": 0, "skipped_steps": 0, "seconds": 0.0,
             "rows_per_micro_batch": config.rows_per_batch, "gradient_checkpointing": checkpointing_enabled(model)}
    step, resumed_from = 0, None
    checkpoint = latest_checkpoint(checkpoints_dir)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, trainable, optimizer, scheduler)
        step, resumed_from, state = checkpoint.step, checkpoint.step, {**state, **checkpoint.state}
        console.print(f"resuming from {checkpoint.path} (step {step})")
    batching = MicroBatching(state["rows_per_micro_batch"], state["gradient_checkpointing"])
    set_gradient_checkpointing(model, batching.gradient_checkpointing)
    metrics = MetricsLog(run_dir)
    events: list[dict] = []

    def record_event(kind: str, message: str, **details) -> None:
        events.append({"kind": kind, "step": step, "message": message, **details})
        metrics.event(kind, step, message, **details)
        console.print(f"[yellow]{message}[/]")

    def save() -> None:
        best = checkpoints_dir / f"step-{state['best_step']:07d}" if state["best_step"] else None
        try:
            save_checkpoint(checkpoints_dir, step, trainable, optimizer, scheduler, state, config.keep_checkpoints,
                            keep_also=best)
        except OSError as error:  # the staging directory is gone; the previous checkpoint still stands
            code = "disk_full" if error.errno == errno.ENOSPC else "checkpoint_write_failed"
            raise AfinaError(code, f"writing the step-{step} checkpoint failed: {error.strerror or error}",
                             location=str(checkpoints_dir),
                             hint="free disk space, then resume with afina train --resume") from error

    def run_step(rows: list) -> tuple[float, float, int]:
        """Forward and backward over one optimizer step's items (rows, pairs, completions); shrinks the
        micro-batch on out of memory and redoes the step with the same items. Returns (loss, grad norm, tokens)."""
        nonlocal batching
        while True:
            size = batching.rows_per_micro_batch
            micro = [objective.collate(rows[i : i + size], pad_id).to(accelerator.device)
                     for i in range(0, len(rows), size)]
            step_count = sum(objective.count(b) for b in micro)
            loss_total = 0.0
            try:
                for batch in micro:
                    with autocast():
                        loss = objective.loss_sum(model, batch) / step_count
                    accelerator.backward(loss)
                    loss_total += float(loss.detach())
                    del loss
                grad_norm = float(accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm))
                return loss_total, grad_norm, sum(b.tokens for b in micro)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                del micro
                optimizer.zero_grad(set_to_none=True)
                free_memory()
                smaller = batching.smaller()
                if smaller is None:
                    raise AfinaError("out_of_memory", "a step does not fit in memory even with one row per micro-batch "
                                     "and gradient checkpointing", location="training.row_length",
                                     hint="lower training.row_length or data.max_length, or use a smaller model "
                                          "or method (qlora on CUDA)") from error
                batching = smaller
                state.update(rows_per_micro_batch=batching.rows_per_micro_batch, gradient_checkpointing=True)
                set_gradient_checkpointing(model, True)
                micro_batches = math.ceil(len(rows) / batching.rows_per_micro_batch)
                record_event("out_of_memory", f"step {step + 1} ran out of memory: now {batching.rows_per_micro_batch} "
                             f"row(s) per micro-batch x {micro_batches} accumulated, gradient checkpointing on "
                             "(same effective batch)", rows_per_micro_batch=batching.rows_per_micro_batch,
                             gradient_accumulation=micro_batches, gradient_checkpointing=True)

    validation_loss = None
    status = "completed"
    bad_in_a_row = 0
    model.train()
    started, tokens_this_session = time.perf_counter(), 0
    seconds_before = state["seconds"]
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
    with progress, StopRequest() as stop:
        task = progress.add_task("train", total=steps, completed=step, info="")
        while step < steps and status == "completed":
            epoch = objective.epoch_steps(train_examples, config, state["epoch"])
            while step < steps and state["step_in_epoch"] < len(epoch):
                loss_total, grad_norm, tokens = run_step(epoch[state["step_in_epoch"]])
                finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    bad_in_a_row = 0
                else:  # a loss spike to inf/nan: skip the update rather than poison the weights
                    state["skipped_steps"] += 1
                    bad_in_a_row += 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                state["step_in_epoch"] += 1
                state["tokens"] += tokens
                tokens_this_session += tokens
                elapsed = time.perf_counter() - started
                state["seconds"] = seconds_before + elapsed
                rate = tokens_this_session / elapsed
                cost = cost_of(state["seconds"], hourly)
                if bad_in_a_row > config.max_nonfinite_steps:
                    status = "diverged"
                    record_event(status, STOP_MESSAGES[status].format(step=step, cost=cost))
                    break
                state["train_loss"] = loss_total if finite else state["train_loss"]
                metrics.write("train", step, loss=loss_total, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              tokens=tokens, elapsed=elapsed, tokens_per_second=rate, epoch=state["epoch"], cost=cost)
                improved = False
                if validation_examples and (step % config.eval_every == 0 or step == steps):
                    validation_loss, _ = evaluate_loss(model, validation_examples, config.row_length,
                                                       batching.rows_per_micro_batch, pad_id, autocast, objective)
                    metrics.write("validation", step, loss=validation_loss)
                    if state["best_loss"] is None or validation_loss < state["best_loss"] - config.early_stopping_min_delta:
                        state.update(best_loss=validation_loss, best_step=step, evals_without_improvement=0)
                        improved = True
                    else:
                        state["evals_without_improvement"] += 1
                        patience = config.early_stopping_patience
                        if patience is not None and state["evals_without_improvement"] >= patience:
                            status = "early_stopped"
                if config.max_time_minutes is not None and state["seconds"] >= config.max_time_minutes * 60:
                    status = "time_limit"
                if config.max_cost is not None and cost >= config.max_cost:
                    status = "cost_limit"
                if stop.signal:
                    status = "interrupted"
                if bad_in_a_row == 0 and (step % config.save_every == 0 or step == steps or improved
                                          or status != "completed"):
                    save()
                if status != "completed":
                    record_event(status, STOP_MESSAGES[status].format(step=step, cost=cost), cost=cost)
                val = f" val {validation_loss:.3f}" if validation_loss is not None else ""
                spent = f" · ${cost:,.2f}" if hourly else ""
                progress.update(task, completed=step, info=f"loss {loss_total:.3f}{val} · {rate:,.0f} tok/s{spent}")
                if after_step:
                    after_step(step)
                if status != "completed":
                    break
            if state["step_in_epoch"] >= len(epoch):
                state["epoch"] += 1
                state["step_in_epoch"] = 0
    metrics.close()
    plot_loss_curves(metrics.path, run_dir / "loss.png")
    if status == "early_stopped":  # the run returns its best weights, not the ones it ended with
        restore_weights(checkpoints_dir / f"step-{state['best_step']:07d}", trainable)
    seconds = time.perf_counter() - started
    return TrainResult(step, state["train_loss"], validation_loss, state["tokens"],
                       tokens_this_session / max(seconds, 1e-9), seconds, resumed_from, status,
                       state["best_step"], state["best_loss"], state["skipped_steps"],
                       cost_of(state["seconds"], hourly), events)


STOP_MESSAGES = {
    "interrupted": "stopped by a signal at step {step}; checkpoint written",
    "early_stopped": "validation loss stopped improving: stopping early at step {step}, keeping the best checkpoint",
    "time_limit": "training.max_time_minutes reached at step {step}; checkpoint written",
    "cost_limit": "training.max_cost reached at step {step} (${cost:,.2f}); checkpoint written",
    "diverged": "repeated non-finite losses: stopping at step {step}",
}
