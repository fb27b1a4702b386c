"""The model of a run's peak memory: weights, gradients, optimizer state, activations, the allocator's
share and the shape caches, and the moment the weights load (see `afina.estimate`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice

import torch

from afina.config.schema import RunConfig, TrainingConfig
from afina.data.tokenize import Example
from afina.devices import resolve_precision
from afina.estimate.activations import (MicroBatch, ModelShape, PreparedModel, activation_bytes,
                                        attention_keeps_scores, prepare_on_meta, weights_dtype)
from afina.estimate.machine import Machine, mapped_while_loading
from afina.training.loop import total_steps
from afina.training.allocator import running_allocator
from afina.training.objectives import TokenObjective, objective_for

# Allocators keep freed activation blocks, so resident memory outgrows the live bytes. Under tcmalloc or
# jemalloc (which the `afina` command starts under where installed): 34-44% of the activations for the
# default model (RSS against the bytes in use, LoRA and full, 1 and 2 rows of 384 tokens, bf16 autocast;
# 30% in fp32), and the own-data config's 2048-token rows peaked at 2.34 GiB against 2.57 predicted with
# 40%. glibc's malloc keeps far more at long rows: the same run peaked at 3.36 GiB, 1.0 of the activations.
CPU_ALLOCATOR_SHARE = 0.40
CPU_GLIBC_SHARE = 1.0


def cpu_allocator_share() -> tuple[str, float]:
    """The allocator this process (and so `afina train`, started the same way) runs under, and the share
    of the activations it keeps on CPU."""
    allocator = running_allocator()
    return allocator, CPU_GLIBC_SHARE if allocator == "glibc" else CPU_ALLOCATOR_SHARE
CUDA_ALLOCATOR_SHARE = 0.10  # PyTorch's caching allocator: fragmentation, a rough figure
CACHED_SHAPES = 2  # shapes whose kernels stay cached under the bounded oneDNN caches (measured)


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
    paged = config.method.uses_paged_optimizer  # bitsandbytes' 8-bit moments
    optimizer = 2 * model.trainable if paged else 2 * model.trainable_bytes
    # fused AdamW updates in place; bitsandbytes' paged AdamW is counted as a foreach update (a temporary of all)
    step = model.trainable_bytes if paged else 0
    loading = machine.runtime + model.weight_bytes + (mapped_while_loading(config.model, dtype) if cpu else 0)
    share = cpu_allocator_share()[1] if cpu else CUDA_ALLOCATOR_SHARE
    caches = shape_cache_bytes(model, micro_batch_shapes(examples, config.training, objective)) if cpu and bf16 else 0
    memory = Memory(machine.runtime, model.weight_bytes, model.trainable_bytes, optimizer, activations,
                    int(share * activations), step, loading, caches)
    return Plan(memory, batch, model, precision, checkpointing)


def with_quantized_base(model: PreparedModel, method, layers: int) -> PreparedModel:
    """qlora keeps the decoder's linear weights in 4 bits (and about 0.13 bit of constants),
    load_in_8bit in 8; the meta copy counted them unquantized."""
    bits = {4: 4.13, 8: 8}.get(method.base_bits)  # NF4 adds its block constants
    if bits is None:
        return model
    per_layer = sum(l.in_features * l.out_features for l in model.linears if not l.weight_trained)
    saved = per_layer * layers * (model.weight_dtype_bytes - bits / 8)
    return replace(model, weight_bytes=int(model.weight_bytes - saved))


def first_epoch(examples: list[Example], training: TrainingConfig,
                objective: TokenObjective) -> list[list[list[Example]]]:
    return objective.epoch_steps(examples, training, 0)


def padded_tokens(step: list[list[Example]], rows_per_batch: int, objective: TokenObjective) -> int:
    """Positions a step computes: each micro-batch is padded to its longest row (`collate_rows`)."""
    lengths = [objective.row_tokens(row) for row in step]
    return sum(len(lengths[i : i + rows_per_batch]) * max(lengths[i : i + rows_per_batch])
               for i in range(0, len(lengths), rows_per_batch))


def run_steps(examples: list[Example], training: TrainingConfig, objective: TokenObjective) -> Iterator[list]:
    """The optimizer steps the loop takes, epoch after epoch, without end (take what is needed)."""
    for epoch in itertools.count():
        steps = objective.epoch_steps(examples, training, epoch)
        if not steps:
            return
        yield from steps
