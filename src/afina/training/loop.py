"""afina's training loop: one loop for every run and every objective, read top to bottom.

    for each optimizer step (rows_per_batch x gradient_accumulation items: packed rows, pairs or completions):
        cut the items into micro-batches; for each: loss = the objective's loss sum / the count of
        the whole step (trained tokens, pairs or completions: exact accumulation), backward
        out of memory? halve the micro-batch, turn on checkpointing, redo the step (same items)
        clip, AdamW (skipped for a non-finite loss or gradient), schedule
        every eval_every steps: validation loss (the objective's);  every save_every steps: atomic checkpoint
        a signal, the time or cost budget, early stopping: checkpoint and stop

What an objective groups, collates and minimizes is in `afina.training.objectives`. Under torchrun
every process runs this loop on its share of each step (`afina.training.distributed`: DDP or FSDP).
The batches of an epoch are a pure function of (examples, seed, epoch), and checkpoints hold the
position inside the epoch (`TrainState`), the optimizer, the schedule and the RNG state, so a
resumed run takes exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import errno
import math
import signal
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from afina.config.schema import TrainingConfig
from afina.devices import autocast_for, free_memory, is_out_of_memory, resolve_precision
from afina.errors import AfinaError
from afina.training.validation import evaluate_loss
from afina.models.methods import model_shares_prefixes, trainable_parameters
from afina.training.checkpoints import latest_checkpoint, restore_checkpoint, restore_weights, save_checkpoint
from afina.training.cost import cost_of, price_per_hour
from afina.training.cpu_share import share_cpu
from afina.training.distributed import (NoMetrics, Ranks, agreed_status, all_reduce_sum, barrier, current_ranks,
                                        discard_abandoned_step, full_norm, gather_full_weights, gradient_sync,
                                        is_sharded, micro_batches_per_rank, parallel_of, rank_share,
                                        restore_sharded_checkpoint, restore_whole_into_shards,
                                        save_sharded_checkpoint, wrap_for_parallel)
from afina.training.metrics import MetricsLog, plot_loss_curves
from afina.training.objectives import rows_per_step, token_objective
from afina.training.oom import (MicroBatching, RankOutOfMemory, agreed_out_of_memory, checkpointing_enabled,
                               set_gradient_checkpointing)
from afina.training.optimizer import make_optimizer
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
    cost: float = 0.0
    events: list = field(default_factory=list)


def total_steps(train: list, config: TrainingConfig, objective=None) -> int:
    if config.max_steps:
        return config.max_steps
    objective = objective or token_objective(config.row_length)
    steps_per_epoch = math.ceil(len(objective.items(train)) / rows_per_step(config))
    return max(1, math.ceil(config.epochs * steps_per_epoch))


_stop_event: ContextVar[threading.Event | None] = ContextVar("afina_stop_event", default=None)


@contextmanager
def stop_when(event: threading.Event):
    """Training started inside this block (in this thread) stops after the optimizer step during which
    `event` is set, with a checkpoint, as on a signal. A worker thread cancels its job this way:
    signals reach only the main thread."""
    token = _stop_event.set(event)
    try:
        yield
    finally:
        _stop_event.reset(token)


class StopRequest:
    """SIGINT/SIGTERM during training (or the event of `stop_when`): finish the current optimizer
    step, checkpoint, stop.

    A spot instance gets a SIGTERM two minutes before it is reclaimed; one step plus a checkpoint
    fits in that. A second signal aborts at once (the last checkpoint still stands).
    """

    def __init__(self):
        self._signal: str | None = None
        self.previous: dict = {}
        self.event = _stop_event.get()

    @property
    def signal(self) -> str | None:
        if self._signal is None and self.event is not None and self.event.is_set():
            return "cancel"
        return self._signal

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainState:
    """Where a run stands. Saved in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    train_loss: float = float("nan")
    best_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0  # training time across resumes (the time and cost budgets read it)
    rows_per_micro_batch: int = 1
    gradient_checkpointing: bool = False

    @classmethod
    def restored(cls, saved: dict, default: "TrainState") -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{**asdict(default), **{k: v for k, v in saved.items() if k in known}})


@dataclass
class Trainer:
    """What one call of `train` works with: the model and its optimizer, the objective, the state,
    and where metrics, events and checkpoints go."""

    model: torch.nn.Module
    objective: object
    config: TrainingConfig
    pad_id: int
    accelerator: Accelerator
    autocast: object
    trainable: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpoints_dir: Path
    metrics: MetricsLog
    console: Console
    state: TrainState
    batching: MicroBatching
    total_steps: int
    hourly: float | None
    ranks: Ranks = field(default_factory=Ranks)
    loss: torch.nn.Module | None = None  # the DDP- or FSDP-wrapped loss under several processes
    step: int = 0
    resumed_from: int | None = None
    nonfinite_in_a_row: int = 0
    validation_loss: float | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0
    session_tokens: int = 0
    events: list = field(default_factory=list)

    def record_event(self, kind: str, message: str, **details) -> None:
        self.events.append({"kind": kind, "step": self.step, "message": message, **details})
        self.metrics.event(kind, self.step, message, **details)
        self.console.print(f"[yellow]{message}[/]")


def train(model, train_examples: list, validation_examples: list, config: TrainingConfig,
          run_dir: Path, pad_id: int, console: Console | None = None, objective=None,
          paged_optimizer: bool = False) -> TrainResult:
    """Train `model` in place; resumes from the run's newest intact checkpoint if there is one.

    `objective` (from `afina.training.objectives.objective_for`; SFT by default) says what the
    examples are, how a step's micro-batches are collated and what is minimized. `paged_optimizer`
    (qlora's option) trains with bitsandbytes' paged 8-bit AdamW.

    Ends with a status: completed, interrupted (signal), early_stopped (validation loss stopped
    improving; the model then holds the best checkpoint's weights), time_limit, cost_limit or
    diverged (repeated non-finite losses; their updates were skipped, so the weights are the last
    good ones).
    """
    t = setup(model, train_examples, config, run_dir, pad_id, console or Console(), objective, paged_optimizer)
    status = "completed"
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=t.console, transient=False,
                        disable=not t.ranks.main)
    sharing = not t.ranks.distributed and t.accelerator.device.type == "cpu"  # processes in lockstep keep theirs
    with progress, StopRequest() as stop, share_cpu(model, sharing):
        task = progress.add_task("train", total=t.total_steps, completed=t.step, info="")
        while t.step < t.total_steps and status == "completed":
            epoch = t.objective.epoch_steps(train_examples, config, t.state.epoch)
            while t.step < t.total_steps and t.state.step_in_epoch < len(epoch) and status == "completed":
                status, info = train_step(t, epoch[t.state.step_in_epoch], validation_examples, stop)
                progress.update(task, completed=t.step, info=info)
            if t.state.step_in_epoch >= len(epoch):
                t.state.epoch += 1
                t.state.step_in_epoch = 0
    return finish(t, status, run_dir)


def setup(model, train_examples: list, config: TrainingConfig, run_dir: Path, pad_id: int, console: Console,
          objective, paged_optimizer: bool) -> Trainer:
    """Optimizer, schedule and state for `model`, restored from the newest intact checkpoint if any.
    Under several processes the model is wrapped for DDP or sharded for FSDP first."""
    objective = objective or token_objective(config.row_length, model_shares_prefixes(model))
    ranks = current_ranks(parallel_of(config))
    if not ranks.main:
        console = Console(quiet=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    autocast = autocast_for(resolve_precision(config.precision, accelerator.device), accelerator.device)
    loss = None
    if ranks.distributed:  # before the optimizer: FSDP replaces the parameters by their shards
        loss, objective = wrap_for_parallel(model, objective, ranks, accelerator.device,
                                            config.fsdp_activation_checkpointing, config.fsdp_cpu_offload)
    trainable = trainable_parameters(model)
    optimizer = make_optimizer(trainable.values(), config.learning_rate, config.weight_decay, paged_optimizer)
    steps = total_steps(train_examples, config, objective)
    scheduler = make_scheduler(optimizer, steps, int(config.warmup_ratio * steps), config.schedule)
    if not ranks.distributed:
        model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints_dir = run_dir / "checkpoints"
    state = TrainState(rows_per_micro_batch=config.rows_per_batch, gradient_checkpointing=checkpointing_enabled(model))
    step, resumed_from = 0, None
    checkpoint = latest_checkpoint(checkpoints_dir)
    if checkpoint is not None:
        restore(checkpoint, model, trainable, optimizer, scheduler, ranks)
        step, resumed_from, state = checkpoint.step, checkpoint.step, TrainState.restored(checkpoint.state, state)
        console.print(f"resuming from {checkpoint.path} (step {step})")
    batching = MicroBatching(state.rows_per_micro_batch, state.gradient_checkpointing)
    set_gradient_checkpointing(model, batching.gradient_checkpointing)
    model.train()
    metrics = MetricsLog(run_dir) if ranks.main else NoMetrics(run_dir)
    return Trainer(model, objective, config, pad_id, accelerator, autocast, trainable, optimizer, scheduler,
                   checkpoints_dir, metrics, console, state, batching, steps,
                   price_per_hour(config.machine, config.price_per_hour), ranks, loss, step, resumed_from,
                   seconds_before=state.seconds)


def restore(checkpoint, model, trainable: dict, optimizer, scheduler, ranks: Ranks) -> None:
    """Put a checkpoint back, whatever the number of processes that wrote it: a sharded (FSDP) one
    into the model as it is split now, a whole one as it is, or split into this run's shards."""
    if is_sharded(checkpoint.path):
        restore_sharded_checkpoint(checkpoint.path, model, optimizer, scheduler)
    elif ranks.parallel == "fsdp":
        restore_whole_into_shards(checkpoint.path, model, optimizer, scheduler, trainable)
    else:
        restore_checkpoint(checkpoint, trainable, optimizer, scheduler)


def train_step(t: Trainer, rows: list, validation_examples: list, stop: StopRequest) -> tuple[str, str]:
    """One optimizer step over `rows`, then its metrics, validation, stop conditions and checkpoint.
    Returns the run's status after it and the progress bar's text."""
    state, config = t.state, t.config
    loss, grad_norm, tokens = forward_backward(t, rows)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        t.optimizer.step()
        t.nonfinite_in_a_row = 0
    else:  # a loss spike to inf/nan: skip the update rather than poison the weights
        state.skipped_steps += 1
        t.nonfinite_in_a_row += 1
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    state.step_in_epoch += 1
    state.tokens += tokens
    t.session_tokens += tokens
    elapsed = time.perf_counter() - t.started
    state.seconds = t.seconds_before + elapsed
    rate = t.session_tokens / elapsed
    cost = cost_of(state.seconds, t.hourly)
    if t.nonfinite_in_a_row > config.max_nonfinite_steps:
        t.record_event("diverged", STOP_MESSAGES["diverged"].format(step=t.step, cost=cost))
        return "diverged", ""
    state.train_loss = loss if finite else state.train_loss
    t.metrics.write("train", t.step, loss=loss, lr=t.scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens=tokens,
                    elapsed=elapsed, tokens_per_second=rate, epoch=state.epoch, cost=cost)
    validating = bool(validation_examples) and (t.step % config.eval_every == 0 or t.step == t.total_steps)
    improved = validate(t, validation_examples) if validating else False
    status = agreed_status(stop_reason(t, stop, cost, validating), t.ranks)
    if t.nonfinite_in_a_row == 0 and (t.step % config.save_every == 0 or t.step == t.total_steps or improved
                                      or status != "completed"):
        save(t)
    if status != "completed":
        t.record_event(status, STOP_MESSAGES[status].format(step=t.step, cost=cost), cost=cost)
    val = f" val {t.validation_loss:.3f}" if t.validation_loss is not None else ""
    spent = f" · ${cost:,.2f}" if t.hourly else ""
    return status, f"loss {loss:.3f}{val} · {rate:,.0f} tok/s{spent}"


def forward_backward(t: Trainer, rows: list) -> tuple[float, float, int]:
    """Forward and backward over one optimizer step's items (rows, pairs, completions), gradients
    clipped; shrinks the micro-batch on out of memory and redoes the step with the same items.
    Under several processes, over this rank's share, divided by the count of the whole step, and an
    out of memory on any rank makes every rank shrink and redo (`agreed_out_of_memory`).
    Returns (loss, grad norm, tokens) of the whole step."""
    ranks = t.ranks
    while True:
        micro = micro_batches(t, rows)
        step_count = all_reduce_sum(sum(t.objective.count(b) for b, weight in micro if weight), ranks)
        loss_total, error = run_micro_batches(t, micro, step_count)
        if error is None:
            grad_norm = full_norm(t.accelerator.clip_grad_norm_(list(t.trainable.values()), t.config.max_grad_norm))
            tokens = sum(b.tokens for b, weight in micro if weight)
            return all_reduce_sum(loss_total, ranks), grad_norm, int(all_reduce_sum(tokens, ranks))
        del micro
        t.optimizer.zero_grad(set_to_none=True)
        discard_abandoned_step(t.loss, ranks)
        free_memory()
        shrink_micro_batches(t, len(rows), error)


def run_micro_batches(t: Trainer, micro: list[tuple], step_count: float) -> tuple[float, BaseException | None]:
    """This rank's forwards and backwards of a step: (the sum of its losses, None), or (_, the out-of-
    memory error) that stopped them here or on another rank. Ranks agree after each forward and each
    backward, so all stop at the same micro-batch."""
    ranks, total = t.ranks, 0.0
    for i, (batch, weight) in enumerate(micro):
        with gradient_sync(t.loss, ranks, i == len(micro) - 1):
            loss, error = out_of_memory_of(forward, t, batch, step_count)
            error = agreed_out_of_memory(error, ranks)
            if error is None:
                # DDP and FSDP average gradients over ranks: x ranks makes their sum one device's
                _, error = out_of_memory_of(t.accelerator.backward, loss * (weight * ranks.world))
                error = agreed_out_of_memory(error, ranks)
        if error is not None:
            return total, error
        total += weight * float(loss.detach())
        del loss
    return total, None


def forward(t: Trainer, batch, step_count: float) -> torch.Tensor:
    with t.autocast():
        return t.objective.loss_sum(t.model, batch) / step_count


def out_of_memory_of(work, *args) -> tuple[object, BaseException | None]:
    """(what `work(*args)` returns, None), or (None, the out-of-memory error it raised, without its
    traceback, whose frames would keep the failed step's tensors alive); other errors propagate."""
    try:
        return work(*args), None
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return None, error.with_traceback(None)


def micro_batches(t: Trainer, rows: list) -> list[tuple]:
    """This rank's micro-batches of a step with their weights: 1 for its own items; 0 for the copies
    of the step's first item that let a rank short of items run as many micro-batches as the others."""
    size = t.batching.rows_per_micro_batch
    mine = rank_share(rows, t.ranks.rank, t.ranks.world)
    micro = [(t.objective.collate(mine[i : i + size], t.pad_id).to(t.accelerator.device), 1)
             for i in range(0, len(mine), size)]
    if t.ranks.distributed:
        missing = micro_batches_per_rank(len(rows), t.ranks.world, size) - len(micro)
        micro += [(t.objective.collate(rows[:1], t.pad_id).to(t.accelerator.device), 0)] * missing
    return micro


def shrink_micro_batches(t: Trainer, rows: int, error: BaseException) -> None:
    """After an out-of-memory error: half the micro-batch, checkpointing on (same effective batch)."""
    smaller = t.batching.smaller()
    if smaller is None:
        raise AfinaError("out_of_memory", "a step does not fit in memory even with one row per micro-batch "
                         "and gradient checkpointing", location="training.row_length",
                         hint="lower training.row_length or data.max_length, or use a smaller model "
                              "or method (qlora on CUDA)") from error
    t.batching = smaller
    t.state.rows_per_micro_batch, t.state.gradient_checkpointing = smaller.rows_per_micro_batch, True
    set_gradient_checkpointing(t.model, True)
    micro_batches = micro_batches_per_rank(rows, t.ranks.world, smaller.rows_per_micro_batch)
    where = f" on rank {error.rank}" if isinstance(error, RankOutOfMemory) else ""
    t.record_event("out_of_memory", f"step {t.step + 1} ran out of memory{where}: now {smaller.rows_per_micro_batch} "
                   f"row(s) per micro-batch x {micro_batches} accumulated, gradient checkpointing on "
                   "(same effective batch)", rows_per_micro_batch=smaller.rows_per_micro_batch,
                   gradient_accumulation=micro_batches, gradient_checkpointing=True)


def validate(t: Trainer, validation_examples: list) -> bool:
    """The objective's validation loss; True when it improved on the best so far."""
    state, config = t.state, t.config
    t.validation_loss, _ = evaluate_loss(t.model, validation_examples, t.objective, t.batching.rows_per_micro_batch,
                                         t.pad_id, t.autocast)
    t.metrics.write("validation", t.step, loss=t.validation_loss)
    if state.best_loss is None or t.validation_loss < state.best_loss - config.early_stopping_min_delta:
        state.best_loss, state.best_step, state.evals_without_improvement = t.validation_loss, t.step, 0
        return True
    state.evals_without_improvement += 1
    return False


def stop_reason(t: Trainer, stop: StopRequest, cost: float, validated: bool) -> str:
    """Why the run stops after this step ("completed" to go on): a signal, a budget, or early stopping
    (judged at validations only)."""
    config, state = t.config, t.state
    if stop.signal:
        return "interrupted"
    if config.max_cost is not None and cost >= config.max_cost:
        return "cost_limit"
    # stops before a step that would end past the limit: the run's mean step (validations included) foretells it
    if config.max_time_minutes is not None and state.seconds * (1 + 1 / t.step) > config.max_time_minutes * 60:
        return "time_limit"
    patience = config.early_stopping_patience
    if validated and patience is not None and state.evals_without_improvement >= patience:
        return "early_stopped"
    return "completed"


def save(t: Trainer) -> None:
    """An atomic checkpoint of this step, keeping the best one besides the newest: under FSDP every
    rank writes its shards; under DDP rank 0 writes the (identical) weights while the others wait."""
    best = t.checkpoints_dir / f"step-{t.state.best_step:07d}" if t.state.best_step else None
    try:
        if t.ranks.parallel == "fsdp":
            save_sharded_checkpoint(t.checkpoints_dir, t.step, t.model, t.optimizer, t.scheduler, asdict(t.state),
                                    t.config.keep_checkpoints, t.ranks, keep_also=best)
        elif t.ranks.main:
            save_checkpoint(t.checkpoints_dir, t.step, t.trainable, t.optimizer, t.scheduler, asdict(t.state),
                            t.config.keep_checkpoints, keep_also=best)
        barrier(t.ranks)
    except OSError as error:  # the staging directory is gone; the previous checkpoint still stands
        code = "disk_full" if error.errno == errno.ENOSPC else "checkpoint_write_failed"
        raise AfinaError(code, f"writing the step-{t.step} checkpoint failed: {error.strerror or error}",
                         location=str(t.checkpoints_dir),
                         hint="free disk space, then resume with afina train --resume") from error


def finish(t: Trainer, status: str, run_dir: Path) -> TrainResult:
    """Close the metrics, plot the loss curves, put the best weights back after early stopping;
    under FSDP, gather the shards into whole weights on rank 0."""
    t.metrics.close()
    if t.ranks.main:
        plot_loss_curves(t.metrics.path, run_dir / "loss.png")
    state = t.state
    if status == "early_stopped":  # the run returns its best weights, not the ones it ended with
        best = t.checkpoints_dir / f"step-{state.best_step:07d}"
        if is_sharded(best):
            restore_sharded_checkpoint(best, t.model, t.optimizer, t.scheduler)
        else:
            restore_weights(best, t.trainable)
    if t.ranks.parallel == "fsdp":
        gather_full_weights(t.model, t.ranks)
    seconds = time.perf_counter() - t.started
    return TrainResult(t.step, state.train_loss, t.validation_loss, state.tokens,
                       t.session_tokens / max(seconds, 1e-9), seconds, t.resumed_from, status, state.best_step,
                       state.best_loss, state.skipped_steps, cost_of(state.seconds, t.hourly), t.events)


STOP_MESSAGES = {
    "interrupted": "stopped by a signal at step {step}; checkpoint written",
    "early_stopped": "validation loss stopped improving: stopping early at step {step}, keeping the best checkpoint",
    "time_limit": "training.max_time_minutes reached at step {step}; checkpoint written",
    "cost_limit": "training.max_cost reached at step {step} (${cost:,.2f}); checkpoint written",
    "diverged": "repeated non-finite losses: stopping at step {step}",
}
