"""afina's training loop: one loop for every run, read top to bottom.

    for each optimizer step:
        take `gradient_accumulation` packed micro-batches
        loss = summed token cross-entropy / trained tokens of the whole step   (exact accumulation)
        backward, clip, AdamW, schedule
        every eval_every steps: validation loss;  every save_every steps: atomic checkpoint

The batches of an epoch are a pure function of (examples, seed, epoch), and checkpoints hold the
position inside the epoch, the optimizer, the schedule and the RNG state, so a resumed run takes
exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from afina.config.schema import TrainingConfig
from afina.data.packing import collate_rows, epoch_batches, pack_examples
from afina.data.tokenize import Example
from afina.models.adapters import trainable_parameters
from afina.training.checkpoints import latest_checkpoint, restore_checkpoint, restore_weights, save_checkpoint
from afina.training.loss import sft_loss_sum
from afina.training.metrics import MetricsLog, plot_loss_curves
from afina.training.precision import autocast_for, resolve_precision
from afina.training.schedule import make_scheduler


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


def total_steps(train: list[Example], config: TrainingConfig) -> int:
    if config.max_steps:
        return config.max_steps
    micro_batches = math.ceil(len(pack_examples(train, config.row_length)) / config.rows_per_batch)
    return max(1, math.ceil(config.epochs * micro_batches / config.gradient_accumulation))


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], row_length: int, rows_per_batch: int, pad_id: int,
                  autocast=None) -> tuple[float, int]:
    """Mean cross-entropy over the trained tokens of `examples` (and their count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = pack_examples(examples, row_length)
    device = next(model.parameters()).device
    for start in range(0, len(rows), rows_per_batch):
        batch = collate_rows(rows[start : start + rows_per_batch], pad_id).to(device)
        with autocast() if autocast else contextlib.nullcontext():
            total += float(sft_loss_sum(model, batch))
        count += batch.trained_tokens
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


def train(model, train_examples: list[Example], validation_examples: list[Example], config: TrainingConfig,
          run_dir: Path, pad_id: int, console: Console | None = None,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train `model` in place; resumes from the run's newest intact checkpoint if there is one.

    Ends with a status: completed, interrupted (signal), early_stopped (validation loss stopped
    improving; the model then holds the best checkpoint's weights), time_limit or diverged
    (repeated non-finite losses; their updates were skipped, so the weights are the last good ones).
    `after_step` is called after every optimizer step (tests use it to inject signals).
    """
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator()
    autocast = autocast_for(precision, accelerator.device)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(train_examples, config)
    scheduler = make_scheduler(optimizer, steps, int(config.warmup_ratio * steps), config.schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints_dir = run_dir / "checkpoints"
    state = {"epoch": 0, "batch": 0, "tokens": 0, "train_loss": float("nan"), "best_loss": None, "best_step": None,
             "evals_without_improvement": 0, "skipped_steps": 0, "seconds": 0.0}
    step, resumed_from = 0, None
    checkpoint = latest_checkpoint(checkpoints_dir)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, trainable, optimizer, scheduler)
        step, resumed_from, state = checkpoint.step, checkpoint.step, {**state, **checkpoint.state}
        console.print(f"resuming from {checkpoint.path} (step {step})")

    def save(protect_best: bool = True) -> None:
        best = checkpoints_dir / f"step-{state['best_step']:07d}" if protect_best and state["best_step"] else None
        save_checkpoint(checkpoints_dir, step, trainable, optimizer, scheduler, state, config.keep_checkpoints,
                        keep_also=best)

    metrics = MetricsLog(run_dir)
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
            batches = epoch_batches(train_examples, config.row_length, config.rows_per_batch, config.seed, state["epoch"])
            while step < steps and state["batch"] < len(batches):
                window = batches[state["batch"] : state["batch"] + config.gradient_accumulation]
                micro = [collate_rows(rows, pad_id).to(accelerator.device) for rows in window]
                step_tokens = sum(b.trained_tokens for b in micro)
                loss_total = 0.0
                for batch in micro:
                    with autocast():
                        loss = sft_loss_sum(model, batch) / step_tokens
                    accelerator.backward(loss)
                    loss_total += float(loss.detach())
                grad_norm = float(accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm))
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
                state["batch"] += len(window)
                state["tokens"] += sum(b.tokens for b in micro)
                tokens_this_session += sum(b.tokens for b in micro)
                elapsed = time.perf_counter() - started
                state["seconds"] = seconds_before + elapsed
                rate = tokens_this_session / elapsed
                if bad_in_a_row > config.max_nonfinite_steps:
                    status = "diverged"
                    break
                state["train_loss"] = loss_total if finite else state["train_loss"]
                metrics.write("train", step, loss=loss_total, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              tokens=sum(b.tokens for b in micro), elapsed=elapsed, tokens_per_second=rate,
                              epoch=state["epoch"])
                improved = False
                if validation_examples and (step % config.eval_every == 0 or step == steps):
                    validation_loss, _ = evaluate_loss(model, validation_examples, config.row_length,
                                                       config.rows_per_batch, pad_id, autocast)
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
                if stop.signal:
                    status = "interrupted"
                if bad_in_a_row == 0 and (step % config.save_every == 0 or step == steps or improved
                                          or status != "completed"):
                    save()
                val = f" val {validation_loss:.3f}" if validation_loss is not None else ""
                progress.update(task, completed=step, info=f"loss {loss_total:.3f}{val} · {rate:,.0f} tok/s")
                if after_step:
                    after_step(step)
                if status != "completed":
                    break
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    metrics.close()
    plot_loss_curves(metrics.path, run_dir / "loss.png")
    if status == "early_stopped":  # the run returns its best weights, not the ones it ended with
        restore_weights(checkpoints_dir / f"step-{state['best_step']:07d}", trainable)
    seconds = time.perf_counter() - started
    return TrainResult(step, state["train_loss"], validation_loss, state["tokens"],
                       tokens_this_session / max(seconds, 1e-9), seconds, resumed_from, status,
                       state["best_step"], state["best_loss"], state["skipped_steps"])
