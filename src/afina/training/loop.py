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

import math
import time
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
from afina.training.checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from afina.training.loss import sft_loss_sum
from afina.training.metrics import MetricsLog, plot_loss_curves
from afina.training.precision import resolve_precision
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
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            total += float(sft_loss_sum(model, batch))
        count += batch.trained_tokens
    model.train(was_training)
    return total / max(1, count), count


def train(model, train_examples: list[Example], validation_examples: list[Example], config: TrainingConfig,
          run_dir: Path, pad_id: int, console: Console | None = None) -> TrainResult:
    """Train `model` in place; resumes from the run's newest intact checkpoint if there is one."""
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(train_examples, config)
    scheduler = make_scheduler(optimizer, steps, int(config.warmup_ratio * steps), config.schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints_dir = run_dir / "checkpoints"
    state = {"epoch": 0, "batch": 0, "tokens": 0, "train_loss": float("nan")}
    step, resumed_from = 0, None
    checkpoint = latest_checkpoint(checkpoints_dir)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, trainable, optimizer, scheduler)
        step, resumed_from, state = checkpoint.step, checkpoint.step, checkpoint.state
        console.print(f"resuming from {checkpoint.path} (step {step})")
    metrics = MetricsLog(run_dir)
    validation_loss = None
    model.train()
    started, tokens_this_session = time.perf_counter(), 0
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task("train", total=steps, completed=step, info="")
        while step < steps:
            batches = epoch_batches(train_examples, config.row_length, config.rows_per_batch, config.seed, state["epoch"])
            while step < steps and state["batch"] < len(batches):
                window = batches[state["batch"] : state["batch"] + config.gradient_accumulation]
                micro = [collate_rows(rows, pad_id).to(accelerator.device) for rows in window]
                step_tokens = sum(b.trained_tokens for b in micro)
                loss_total = 0.0
                for batch in micro:
                    with accelerator.autocast():
                        loss = sft_loss_sum(model, batch) / step_tokens
                    accelerator.backward(loss)
                    loss_total += float(loss.detach())
                grad_norm = float(accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                state["batch"] += len(window)
                state["tokens"] += sum(b.tokens for b in micro)
                state["train_loss"] = loss_total
                tokens_this_session += sum(b.tokens for b in micro)
                elapsed = time.perf_counter() - started
                rate = tokens_this_session / elapsed
                metrics.write("train", step, loss=loss_total, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              tokens=sum(b.tokens for b in micro), elapsed=elapsed, tokens_per_second=rate,
                              epoch=state["epoch"])
                if step % config.eval_every == 0 or step == steps:
                    if validation_examples:
                        validation_loss, _ = evaluate_loss(model, validation_examples, config.row_length,
                                                           config.rows_per_batch, pad_id, accelerator.autocast)
                        metrics.write("validation", step, loss=validation_loss)
                if step % config.save_every == 0 or step == steps:
                    save_checkpoint(checkpoints_dir, step, trainable, optimizer, scheduler, state,
                                    config.keep_checkpoints)
                val = f" val {validation_loss:.3f}" if validation_loss is not None else ""
                progress.update(task, completed=step, info=f"loss {loss_total:.3f}{val} · {rate:,.0f} tok/s")
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    metrics.close()
    plot_loss_curves(metrics.path, run_dir / "loss.png")
    seconds = time.perf_counter() - started
    return TrainResult(step, state["train_loss"], validation_loss, state["tokens"],
                       tokens_this_session / max(seconds, 1e-9), seconds, resumed_from)
