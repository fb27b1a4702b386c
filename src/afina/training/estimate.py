"""Before a run: its tokens and steps, its peak memory, whether it fits, how long it takes, what it costs.

    afina estimate configs/tickets-lora.yaml training.rows_per_batch=2
    estimate = estimate_run(config, train_examples, pad_id)  # everything, time calibrated on this machine
    check_fits(config, train_examples).require_fit()         # the memory check before `afina train` starts

Peak memory is the larger of two moments. Loading: the runtime, the weights, and (on CPU) the
safetensors file mapped while weights are copied out of it into another dtype. Training:

    runtime      CPU: this process's resident memory before the model loads; CUDA: the CUDA context
    weights      every parameter x the bytes of its dtype (bf16 base for frozen-base methods under bf16)
    gradients    every trainable parameter x the bytes of its dtype (kept across micro-batches)
    optimizer    AdamW: two moments per trainable parameter, in its dtype
    activations  what autograd saves for one micro-batch (`afina.training.activations`), the logits at
                 trained positions, and one layer's worth of backward temporaries
    allocator    freed memory the allocator keeps: a share of the activations (glibc heaps on CPU,
                 measured; PyTorch's caching allocator on CUDA, rough)
    shape caches bf16 on CPU: what the matmul kernels keep for each distinct micro-batch shape the run meets

Parameter counts come from the model config built on the meta device and prepared by the method's
own `apply_method` (`afina.training.activations.prepare_on_meta`), so every method counts exactly
what it will train, without any weights loaded. Time per epoch comes from a few real optimizer steps on this machine, or with `calibrate=False`
from a rough throughput table of known GPUs.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console

from afina.config.loading import merge, parse_overrides, validate_config
from afina.config.schema import RunConfig, TrainingConfig
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.models.adapters import apply_method, freezes_base, uses_paged_optimizer
from afina.models.loading import load_model, model_config, resolve_model_dir
from afina.training.activations import (MicroBatch, ModelShape, PreparedModel, activation_bytes,
                                        attention_keeps_scores, prepare_on_meta, weights_dtype)
from afina.training.cost import cost_of, price_per_hour
from afina.training.loop import rows_per_step, total_steps, train
from afina.training.precision import resolve_precision
from afina.training.steps import TokenObjective, objective_for

GiB = 2**30
CALIBRATION_STEPS = 3  # the first step pays for one-time setup (optimizer state, kernel choice); 2 and 3 are timed
# glibc keeps freed activation blocks in its heaps, so resident memory outgrows the live bytes: measured
# 34-44% of the activations for the default model on the development CPU (RSS against mallinfo2's bytes
# in use, LoRA and full, 1 and 2 rows of 384 tokens, bf16 autocast); 30% in fp32.
CPU_ALLOCATOR_SHARE = 0.40
CUDA_ALLOCATOR_SHARE = 0.10  # PyTorch's caching allocator: fragmentation, a rough figure
CUDA_CONTEXT_BYTES = GiB // 2  # the CUDA context and kernels, before any tensor
FIT_HEADROOM = 0.90  # a run fits when its peak is under 90% of the device: the estimate is not exact
# Rough training throughput, tokens/s per billion parameters for a frozen base in bf16 (LoRA), at about
# 30% of each GPU's dense bf16 peak; training every weight costs 6 instead of 4 FLOPs per parameter.
GPU_TOKENS_PER_SECOND_PER_BILLION = {"H200": 80_000, "H100": 75_000, "A100": 24_000, "L40S": 25_000,
                                     "L4": 9_000, "A10G": 7_000}
CACHED_SHAPES = 2  # shapes whose kernels stay cached under the bounded oneDNN caches (measured)
TOKEN_OBJECTIVES = ("sft", "cpt")  # packed rows of tokens; preference pairs are laid out differently


def micro_batch_shapes(examples: list[Example], training: TrainingConfig, objective: TokenObjective) -> int:
    """Distinct (rows, padded length) shapes among the run's micro-batches, counted up to `CACHED_SHAPES`."""
    shapes = set()
    for step in islice(run_steps(examples, training, objective), total_steps(examples, training, objective)):
        lengths = [objective.row_tokens(row) for row in step]
        shapes |= {(len(lengths[i : i + training.rows_per_batch]), max(lengths[i : i + training.rows_per_batch]))
                   for i in range(0, len(lengths), training.rows_per_batch)}
        if len(shapes) >= CACHED_SHAPES:
            break
    return min(len(shapes), CACHED_SHAPES)


def shape_cache_bytes(model: PreparedModel, shapes: int) -> int:
    """Memory that bf16 matmuls on CPU keep per input shape (oneDNN's kernels and reordered weights;
    measured in-use heap growth per new sequence length, independent of the layer count and of the
    length): about 3.8x the bf16 bytes of a layer's distinct weight shapes on a frozen bf16 base, 2.3x
    with fp32 weights under autocast. afina bounds those caches (`afina/__init__.py`), so only the
    last `CACHED_SHAPES` shapes' worth stays."""
    distinct = {(l.in_features, l.out_features) for l in model.linears}
    factor = 3.8 if model.weight_dtype_bytes == 2 else 2.3
    return int(shapes * factor * 2 * sum(i * o for i, o in distinct))


def largest_micro_batch(examples: list[Example], training: TrainingConfig, objective: TokenObjective) -> MicroBatch:
    """The largest micro-batch the run will see: rows_per_batch rows (fewer if the data has fewer) of
    the longest packed row, with the most trained positions any micro-batch of the first epoch has and
    the examples and longest example of the one whose attention blocks are largest (an example's
    block holds the prefix it shares too)."""
    rows = objective.items(examples)
    longest = max((objective.row_tokens(row) for row in rows), default=1)
    count = min(training.rows_per_batch, len(rows)) or 1
    most_trained, blocks = 0, (0, 0, 0)
    for step in first_epoch(examples, training, objective):
        for start in range(0, len(step), training.rows_per_batch):
            micro = step[start : start + training.rows_per_batch]
            most_trained = max(most_trained, sum(max(0, e.trained_count - e.trained[0]) for row in micro for e in row))
            copied = sum(len(e.input_ids) for row in micro for e in row) - sum(objective.row_tokens(r) for r in micro)
            micro_blocks = (sum(len(row) for row in micro), max(len(e.input_ids) for row in micro for e in row), copied)
            blocks = max(blocks, micro_blocks, key=lambda b: (b[0] * b[1] ** 2, b[2]))
    return MicroBatch(count, longest, most_trained, *blocks)


# --- memory ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    """Predicted bytes at the peak, by what holds them (see the module docstring)."""

    runtime: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    allocator: int
    optimizer_step: int  # temporaries of the AdamW update; activations are freed by then
    loading: int  # the peak while the weights load
    shape_caches: int = 0  # bf16 on CPU: kept per distinct micro-batch shape (see `shape_cache_bytes`)

    @property
    def training(self) -> int:
        work = max(self.activations + self.allocator, self.optimizer_step)
        return self.runtime + self.weights + self.gradients + self.optimizer + self.shape_caches + work

    @property
    def peak(self) -> int:
        return max(self.training, self.loading)


@dataclass(frozen=True)
class Machine:
    """What the estimate knows of the machine it runs on."""

    device: torch.device
    runtime: int  # bytes the process holds before the model loads
    capacity: int  # bytes a run may use: GPU memory, or available RAM plus what this process holds

    @classmethod
    def here(cls, capacity: int | None = None) -> Machine:
        """This machine now; call it before the model loads (the runtime is measured then)."""
        device = training_device()
        if device.type == "cuda":
            return cls(device, CUDA_CONTEXT_BYTES, capacity or torch.cuda.get_device_properties(device).total_memory)
        resident = resident_bytes()
        return cls(device, resident, capacity or available_ram() + resident)


def training_device() -> torch.device:
    """Where the loop trains: accelerate's choice for a single process."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resident_bytes() -> int:
    """This process's resident memory now (what peak RSS will be compared against)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the closest figure
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_ram() -> int:
    """MemAvailable from /proc/meminfo: free memory plus the page cache the kernel can drop."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def mapped_while_loading(model_name: str, dtype: torch.dtype) -> int:
    """Bytes of safetensors file mapped while the weights are copied out of it. transformers maps the
    file and, when it already holds the load dtype, uses its pages as the weights (nothing extra);
    otherwise the converted copy and the mapped shard are resident together."""
    directory = Path(resolve_model_dir(model_name))
    files = sorted(directory.glob("*.safetensors"), key=lambda f: f.stat().st_size) if directory.is_dir() else []
    if not files:
        return 0  # a hub id: nothing local to measure
    largest = files[-1]
    stored = safetensors_dtype(largest)
    wanted = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype)
    return 0 if stored == wanted else largest.stat().st_size


def safetensors_dtype(path: Path) -> str | None:
    """The dtype most tensors of a safetensors file are stored in (`F32`, `BF16`, ...), from its header."""
    from collections import Counter

    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        counts = Counter(handle.get_slice(name).get_dtype() for name in handle.keys())
    return counts.most_common(1)[0][0] if counts else None


@dataclass(frozen=True)
class Plan:
    """One config's memory estimate with the pieces it was made from."""

    memory: Memory
    batch: MicroBatch
    model: PreparedModel
    precision: str
    checkpointing: bool


def plan_memory(config: RunConfig, examples: list[Example], machine: Machine, hf_config) -> Plan:
    """Predict the peak memory of training `config` on `examples` on `machine`."""
    shape = ModelShape.from_config(hf_config)
    precision = resolve_precision(config.training.precision, machine.device)
    dtype = weights_dtype(config.method, precision)
    model = with_quantized_base(prepare_on_meta(hf_config, config.method, dtype), config.method, shape.layers)
    objective = objective_for(config)
    batch = largest_micro_batch(examples, config.training, objective)
    bf16 = precision == "bf16"
    checkpointing = config.method.gradient_checkpointing
    scores = attention_keeps_scores(machine.device, torch.bfloat16 if bf16 else dtype, shape.heads, shape.head_dim)
    activations = activation_bytes(shape, model, batch, bf16, checkpointing, scores)
    cpu = machine.device.type == "cpu"
    paged = uses_paged_optimizer(config.method)  # bitsandbytes' 8-bit moments
    optimizer = 2 * model.trainable if paged else 2 * model.trainable_bytes
    # fused AdamW updates in place; bitsandbytes' paged AdamW is counted as a foreach update (a temporary of all)
    step = model.trainable_bytes if paged else 0
    loading = machine.runtime + model.weight_bytes + (mapped_while_loading(config.model, dtype) if cpu else 0)
    share = CPU_ALLOCATOR_SHARE if cpu else CUDA_ALLOCATOR_SHARE
    caches = shape_cache_bytes(model, micro_batch_shapes(examples, config.training, objective)) if cpu and bf16 else 0
    memory = Memory(machine.runtime, model.weight_bytes, model.trainable_bytes, optimizer, activations,
                    int(share * activations), step, loading, caches)
    return Plan(memory, batch, model, precision, checkpointing)


def with_quantized_base(model: PreparedModel, method, layers: int) -> PreparedModel:
    """qlora keeps the decoder's linear weights in 4 bits (and about 0.13 bit of constants),
    load_in_8bit in 8; the meta copy counted them unquantized."""
    bits = 4.13 if method.name == "qlora" else 8 if getattr(method, "load_in_8bit", False) else None
    if bits is None:
        return model
    per_layer = sum(l.in_features * l.out_features for l in model.linears if not l.weight_trained)
    saved = per_layer * layers * (model.weight_dtype_bytes - bits / 8)
    return replace(model, weight_bytes=int(model.weight_bytes - saved))


# --- the check and its suggestions ----------------------------------------------------------------

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
    pass unchecked."""
    if config.objective.name not in TOKEN_OBJECTIVES:
        return None
    return check_fits(config, examples).require_fit()


def check_fits(config: RunConfig, examples: list[Example], capacity: int | None = None,
               machine: Machine | None = None) -> Estimate:
    """The memory half of the estimate: data, peak memory, fit, and settings that would fit. Loads no
    weights and writes nothing (except the one-time default-model cache). Call it before the model
    loads: on CPU it measures the runtime then. `capacity` overrides the bytes the machine offers,
    `machine` the whole machine (tests)."""
    if config.objective.name not in TOKEN_OBJECTIVES:
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
    if not freezes_base(config.method):
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


def first_epoch(examples: list[Example], training: TrainingConfig,
                objective: TokenObjective) -> list[list[list[Example]]]:
    return objective.epoch_steps(examples, training, 0)


def padded_tokens(step: list[list[Example]], rows_per_batch: int, objective: TokenObjective) -> int:
    """Positions a step computes: each micro-batch is padded to its longest row (`collate_rows`)."""
    lengths = [objective.row_tokens(row) for row in step]
    return sum(len(lengths[i : i + rows_per_batch]) * max(lengths[i : i + rows_per_batch])
               for i in range(0, len(lengths), rows_per_batch))


# --- time and cost --------------------------------------------------------------------------------

class _CalibrationDone(Exception):
    """Raised from the loop's after-step hook to stop calibration before any checkpoint is written."""


def calibrate_seconds_per_token(config: RunConfig, examples: list[Example], pad_id: int,
                                steps: int = CALIBRATION_STEPS) -> float:
    """Seconds per computed position (padding included), from `steps` real optimizer steps of afina's
    own loop on the run's first packed rows at the configured micro-batch; the first step is not timed.
    Runs in a temporary directory, never in the afina home."""
    precision = resolve_precision(config.training.precision, training_device())
    model = load_model(config.model, weights_dtype(config.method, precision))
    torch.manual_seed(config.training.seed)
    model = apply_method(model, config.method)
    training = config.training.model_copy(update={"max_steps": steps + 1, "eval_every": 10**9,
                                                  "save_every": 10**9, "max_time_minutes": None, "max_cost": None})
    stamps: list[float] = []

    def after_step(step: int) -> None:
        stamps.append(time.perf_counter())
        if step == steps:
            raise _CalibrationDone

    with tempfile.TemporaryDirectory(prefix="afina-estimate-") as run_dir:
        try:
            train(model, examples, [], training, Path(run_dir), pad_id, Console(quiet=True), after_step,
                  objective_for(config), uses_paged_optimizer(config.method))
        except _CalibrationDone:
            pass
    del model
    gc.collect()
    objective = objective_for(config)
    timed = list(islice(run_steps(examples, config.training, objective), 1, steps))  # the first step is not timed
    return (stamps[-1] - stamps[0]) / sum(padded_tokens(step, config.training.rows_per_batch, objective)
                                          for step in timed)


def run_steps(examples: list[Example], training: TrainingConfig, objective: TokenObjective) -> Iterator[list]:
    """The optimizer steps the loop takes, epoch after epoch, without end (take what is needed)."""
    for epoch in itertools.count():
        steps = objective.epoch_steps(examples, training, epoch)
        if not steps:
            return
        yield from steps


def table_tokens_per_second(parameters: int, trains_base: bool, machine: str | None) -> tuple[float, str] | None:
    """Rough tokens/s from `GPU_TOKENS_PER_SECOND_PER_BILLION` for one GPU (`afina train` runs one
    process): the GPU here, or the GPU of `training.machine` in the price table, to estimate a cloud
    run from a laptop."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else machine_gpu(machine)
    name = next((key for key in GPU_TOKENS_PER_SECOND_PER_BILLION if gpu and key.lower() in gpu.lower()), None)
    if name is None:
        return None
    rate = GPU_TOKENS_PER_SECOND_PER_BILLION[name] * 1e9 / parameters * (4 / 6 if trains_base else 1)
    return rate, f"throughput table: one {name} (rough)"


def machine_gpu(machine: str | None) -> str | None:
    """The `gpus` entry (e.g. `8xH100-80GB`) of a machine in the shipped price table."""
    from importlib import resources

    import yaml

    if machine is None:
        return None
    table = yaml.safe_load((resources.files("afina.training") / "prices.yaml").read_text(encoding="utf-8"))
    return table["machines"].get(machine, {}).get("gpus")


def estimate_time(config: RunConfig, examples: list[Example], pad_id: int, estimate: Estimate,
                  calibrate: bool = True) -> TimeEstimate:
    """Seconds per epoch and in all, with their cost: calibrated on this machine, or from the table."""
    hourly = price_per_hour(config.training.machine, config.training.price_per_hour)
    objective = objective_for(config)
    epoch_tokens = sum(padded_tokens(step, config.training.rows_per_batch, objective)
                       for step in first_epoch(examples, config.training, objective))
    seconds_per_token, source = None, "unknown: no throughput figure for this device (calibrate instead)"
    if calibrate and not estimate.fits:
        source = "not calibrated: the run does not fit (calibrate a setting that does)"
    elif calibrate:
        seconds_per_token = calibrate_seconds_per_token(config, examples, pad_id)
        source = f"calibrated: steps 2-{CALIBRATION_STEPS} of {CALIBRATION_STEPS} on this machine"
    else:
        looked_up = table_tokens_per_second(estimate.parameters, not freezes_base(config.method),
                                            config.training.machine)
        if looked_up:
            seconds_per_token, source = 1 / looked_up[0], looked_up[1]
    if seconds_per_token is None:
        return TimeEstimate(None, None, None, source, hourly, None, None)
    epoch = seconds_per_token * epoch_tokens
    total = epoch * estimate.data.total_steps / max(1, estimate.data.steps_per_epoch)
    tokens = estimate.data.tokens / epoch if epoch else None
    return TimeEstimate(epoch, total, tokens, source, hourly, cost_of(epoch, hourly), cost_of(total, hourly))


def estimate_run(config: RunConfig, examples: list[Example], pad_id: int, calibrate: bool = True,
                 capacity: int | None = None, machine: Machine | None = None) -> Estimate:
    """The whole pre-launch estimate: `check_fits`, then time and cost."""
    estimate = check_fits(config, examples, capacity, machine)
    estimate.time = estimate_time(config, examples, pad_id, estimate, calibrate)
    return estimate
