"""Whether a run fits, and settings that would make it fit (`afina estimate`, and the check before
`afina train` starts)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from afina.config.loading import merge, parse_overrides, validate_config
from afina.config.schema import RunConfig, TrainingConfig
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.estimate.activations import MicroBatch
from afina.estimate.machine import GiB, Machine
from afina.estimate.memory import Memory, first_epoch, padded_tokens, plan_memory
from afina.models.loading import model_config
from afina.training.loop import total_steps
from afina.training.objectives import TokenObjective, objective_for, rows_per_step

FIT_HEADROOM = 0.90  # a run fits when its peak is under 90% of the device: the estimate is not exact


@dataclass(frozen=True)
class Suggestion:
    """Settings (as `key=value` overrides) and the peak memory re-estimated with them."""

    overrides: list[str]
    peak: int
    fits: bool


@dataclass
class DataSummary:
    examples: int
    tokens: int  # tokens of the training split (what packing puts in rows)
    trained_tokens: int
    rows: int  # packed rows of training.row_length
    padding_share: float  # share of the positions a step computes that are padding
    shared_share: float  # share of the tokens read from a prefix shared in their row, not computed again
    steps_per_epoch: int
    total_steps: int


@dataclass
class TimeEstimate:
    seconds_per_epoch: float | None
    total_seconds: float | None
    tokens_per_second: float | None
    source: str
    price_per_hour: float
    cost_per_epoch: float | None
    total_cost: float | None


@dataclass
class Estimate:
    """Everything `afina estimate` reports, and what `afina train` checks before launch."""

    model: str
    method: str
    precision: str
    device: str
    parameters: int
    trainable_parameters: int
    micro_batch: MicroBatch
    gradient_accumulation: int
    gradient_checkpointing: bool
    data: DataSummary
    memory: Memory
    capacity: int
    fits: bool
    recoverable: bool  # fits after the loop's own out-of-memory fallback (1 row, checkpointing)
    suggestions: list[Suggestion] = field(default_factory=list)
    time: TimeEstimate | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["micro_batch"]["tokens"] = self.micro_batch.tokens
        data["memory"].update(training=self.memory.training, peak=self.memory.peak)
        return data

    def require_fit(self) -> str | None:
        """Raise `does_not_fit` for a run that would not fit; return a warning for one that fits only
        after the loop's out-of-memory fallback (CUDA only: on CPU the kernel's out-of-memory killer
        ends the process before Python sees an error, so nothing can recover there)."""
        if self.fits:
            return None
        fitting = next((s for s in self.suggestions if s.fits), None)
        need = (f"predicted peak memory {self.memory.peak / GiB:.1f} GiB, {self.device} has "
                f"{self.capacity / GiB:.1f} GiB")
        if self.recoverable and self.device.startswith("cuda"):
            faster = f"; set {' '.join(fitting.overrides)} to start there" if fitting else ""
            return f"{need}: training will halve the micro-batch on out of memory{faster}"
        raise AfinaError("does_not_fit", f"the run does not fit in memory ({need})", location="training",
                         hint=f"try {' '.join(fitting.overrides)}" if fitting
                         else "use a smaller model or a machine with more memory")


def check_before_launch(config: RunConfig, examples: list) -> str | None:
    """The check `afina train` runs after reading the data and before loading the model: raises
    `does_not_fit` for a run that cannot fit, returns a warning for one that fits only after the
    loop's out-of-memory fallback. Objectives the estimate does not model yet (preference pairs)
    pass unchecked. Under torchrun with FSDP, what must fit is each device's share."""
    from afina.estimate.parallel import fits_sharded
    from afina.training.distributed import launched_world

    if not objective_for(config).packs_tokens:
        return None
    estimate = check_fits(config, examples)
    world = launched_world()
    if not estimate.fits and world > 1 and config.training.parallel == "fsdp" and fits_sharded(config, examples, world):
        return None  # each device holds 1/world of the model (`afina.estimate.parallel`)
    return estimate.require_fit()


def check_fits(config: RunConfig, examples: list[Example], capacity: int | None = None,
               machine: Machine | None = None) -> Estimate:
    """The memory half of the estimate: data, peak memory, fit, and settings that would fit. Loads no
    weights and writes nothing (except the one-time default-model cache). Call it before the model
    loads: on CPU it measures the runtime then. `capacity` overrides the bytes the machine offers,
    `machine` the whole machine (tests)."""
    if not objective_for(config).packs_tokens:
        raise AfinaError("estimate_unsupported", f"the estimate models packed-token objectives (sft, cpt), not "
                         f"{config.objective.name}", location="objective",
                         hint="estimate the same data and model with objective: sft for a lower bound")
    machine = machine or Machine.here(capacity)
    hf_config = model_config(config.model)
    plan = plan_memory(config, examples, machine, hf_config)
    fits = plan.memory.peak <= FIT_HEADROOM * machine.capacity
    estimate = Estimate(config.model, config.method.name, plan.precision, str(machine.device), plan.model.parameters,
                        plan.model.trainable, plan.batch, config.training.gradient_accumulation, plan.checkpointing,
                        summarize_data(examples, config.training, objective_for(config)), plan.memory, machine.capacity, fits, fits)
    if not fits:
        # where the loop's out-of-memory recovery ends up: one row per micro-batch, checkpointing on
        fallback = variant(config, ["training.rows_per_batch=1"] + checkpointing_override(config))
        estimate.recoverable = plan_memory(fallback, examples, machine, hf_config).memory.peak \
            <= FIT_HEADROOM * machine.capacity
        estimate.suggestions = suggest(config, examples, machine, hf_config)
    return estimate


def variant(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`config` with `key=value` overrides applied, validated like a config file."""
    raw = merge(config.model_dump(exclude_unset=True), parse_overrides(overrides))
    return validate_config(raw, source="suggestion")


def checkpointing_override(config: RunConfig) -> list[str]:
    """The override that turns gradient checkpointing on, if it is off and the method allows it
    (prefix tuning does not: its prefix rides on the key/value cache that recomputation drops)."""
    if config.method.gradient_checkpointing or config.method.name == "prefix":
        return []
    return ["method.gradient_checkpointing=true"]


def levers(config: RunConfig, examples: list[Example]) -> list[list[str]]:
    """The settings that lower peak memory, cheapest in speed first: a smaller micro-batch with more
    accumulation (same effective batch), gradient checkpointing, shorter rows, a frozen base."""
    training = config.training
    found = []
    if training.rows_per_batch > 1:
        found.append([f"training.rows_per_batch={training.rows_per_batch // 2}",
                      f"training.gradient_accumulation={training.gradient_accumulation * 2}"])
    if checkpointing_override(config):
        found.append(checkpointing_override(config))
    longest = max((len(e.input_ids) for e in examples), default=training.row_length)
    shorter = max(longest, training.row_length // 2, 16)  # never shorter than an example: no truncation
    if shorter < training.row_length:
        found.append([f"training.row_length={shorter}"])
    if not config.method.freezes_base:
        found.append(["method=lora"])
    return found


def suggest(config: RunConfig, examples: list[Example], machine: Machine, hf_config) -> list[Suggestion]:
    """Each lever on its own, re-estimated (the micro-batch halved until it fits); all of them
    together when none is enough alone."""
    def evaluate(overrides: list[str]) -> Suggestion:
        peak = plan_memory(variant(config, overrides), examples, machine, hf_config).memory.peak
        return Suggestion(overrides, peak, peak <= FIT_HEADROOM * machine.capacity)

    found = []
    for lever in levers(config, examples):
        suggestion = evaluate(lever)
        while not suggestion.fits and lever[0].startswith("training.rows_per_batch="):
            rows = int(lever[0].split("=")[1])
            if rows == 1:
                break
            accumulation = config.training.rows_per_batch * config.training.gradient_accumulation // (rows // 2)
            lever = [f"training.rows_per_batch={rows // 2}", f"training.gradient_accumulation={accumulation}"]
            suggestion = evaluate(lever)
        found.append(suggestion)
    if found and not any(s.fits for s in found) and len(found) > 1:
        found.append(evaluate([o for s in found for o in s.overrides]))
    return found


def summarize_data(examples: list[Example], training: TrainingConfig, objective: TokenObjective) -> DataSummary:
    epoch = first_epoch(examples, training, objective)
    rows = [row for step in epoch for row in step]
    tokens = sum(len(e.input_ids) for e in examples)
    held = sum(objective.row_tokens(row) for row in rows)
    computed = sum(padded_tokens(step, training.rows_per_batch, objective) for step in epoch)
    return DataSummary(len(examples), tokens, sum(max(0, e.trained_count - e.trained[0]) for e in examples),
                       len(rows), 1 - held / computed if computed else 0.0, 1 - held / tokens if tokens else 0.0,
                       math.ceil(len(rows) / rows_per_step(training)), total_steps(examples, training, objective))


