"""Memory per device when several devices train one run, and whether a run needs FSDP or more devices.

    rows = device_memory_table(config, examples, machine, hf_config)   # ddp and fsdp on 1, 2, 4, 8 devices
    afina estimate configs/tickets-lora.yaml --devices 8
    afina estimate --shape llama-70b --method qlora --gpu-gib 80          # from the model's config alone

Under DDP every device holds what one device would (`afina.estimate.memory`), plus DDP's gradient
buckets (a second copy of the gradients, for the all-reduce). Under FSDP each device holds 1/N of the
weights, gradients and optimizer state (a LoRA's frozen base too), plus the units gathered whole
while they compute: the root unit (embeddings, final norm, output projection) for the whole step and
two decoder layers (the one computing and the one prefetched), with the gradients of the layer
being reduced. Activations are per micro-batch, the same on every device. Loading: afina loads the
whole model in each process's CPU memory before sharding it, so FSDP needs that much host memory
per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from afina.data.tokenize import Example
from afina.estimate.machine import GiB, Machine
from afina.estimate.memory import Memory, plan_memory

DEVICE_COUNTS = (1, 2, 4, 8)
HEADROOM = 0.90  # as `afina.estimate.fit.FIT_HEADROOM`

# The shapes of Meta's Llama 3 models, as their config.json files give them (no weights needed).
LLAMA_SHAPES = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
    "llama-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
}


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted bytes on each device for `parallel` over `devices` devices."""

    parallel: str
    devices: int
    sharded: int  # weights + gradients + optimizer state this device holds
    gathered: int  # DDP: gradient buckets; FSDP: units gathered whole while they compute
    work: int  # runtime, activations, allocator share, shape caches
    capacity: int

    @property
    def peak(self) -> int:
        return self.sharded + self.gathered + self.work

    @property
    def fits(self) -> bool:
        return self.peak <= HEADROOM * self.capacity


def llama_config(shape: str):
    """A transformers LlamaConfig of one of `LLAMA_SHAPES`."""
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=131072)


def device_memory(memory: Memory, plan_model, layers: int, parallel: str, devices: int,
                  capacity: int) -> DeviceMemory:
    """One device's memory under `parallel` from the single-device `memory` of a run."""
    states = memory.weights + memory.gradients + memory.optimizer
    work = memory.training - states
    if parallel == "ddp" or devices == 1:
        buckets = memory.gradients if devices > 1 else 0
        return DeviceMemory(parallel, devices, states, buckets, work, capacity)
    layer = layer_weight_bytes(plan_model)
    root = max(0, memory.weights - layers * layer)
    trained_layer = memory.gradients // max(1, layers)
    gathered = root + 2 * layer + trained_layer
    return DeviceMemory(parallel, devices, -(-states // devices), gathered, work, capacity)


def layer_weight_bytes(plan_model) -> int:
    """Bytes of one decoder layer's weights (its linear layers; norms are a rounding error)."""
    return sum(l.in_features * l.out_features * l.weight_bytes for l in plan_model.linears)


def device_memory_table(config, examples: list[Example], machine: Machine, hf_config,
                        counts: tuple[int, ...] = DEVICE_COUNTS) -> list[DeviceMemory]:
    """DDP and FSDP on each of `counts` devices of `machine`'s kind."""
    from afina.estimate.activations import ModelShape

    plan = plan_memory(config, examples, machine, hf_config)
    layers = ModelShape.from_config(hf_config).layers
    return [device_memory(plan.memory, plan.model, layers, parallel, n, machine.capacity)
            for parallel in ("ddp", "fsdp") for n in counts]


def synthetic_examples(config) -> list[Example]:
    """One micro-batch of examples as long as a row, every token trained: what a table from the
    model's config alone assumes of the data (accumulating more micro-batches, or `auto`, adds no
    memory)."""
    length, count = config.training.row_length, config.training.rows_per_batch
    return [Example([(i * 7 + j) % 1000 + 1 for j in range(length)], [True] * length, i + 1) for i in range(count)]


def fits_sharded(config, examples: list[Example], world: int) -> bool:
    """Whether a run under FSDP on `world` devices like this one fits each of them."""
    from afina.models.loading import model_config

    return device_memory_table(config, examples, Machine.here(), model_config(config.model), (world,))[-1].fits


def advice(table: list[DeviceMemory]) -> str:
    """What the table means: one device is enough, DDP on N, FSDP on N, or not even FSDP on 8."""
    single = next(r for r in table if r.devices == 1)
    if single.fits:
        return "fits one device: DDP on more devices only adds speed"
    fsdp = next((r for r in table if r.parallel == "fsdp" and r.fits), None)
    if fsdp is None:
        return (f"does not fit even with FSDP on {max(r.devices for r in table)} devices of "
                f"{single.capacity / GiB:.0f} GiB: turn on method.gradient_checkpointing, use shorter rows, a method "
                "that trains less (lora, qlora), or more devices")
    return f"needs FSDP (training.parallel: fsdp) on {fsdp.devices} or more devices"


def choose_parallel_for(config, world: int) -> str:
    """`training.parallel` for `world` processes: as set, or for auto ddp when the weights, gradients
    and optimizer state of the run fit one device (activations aside), else fsdp."""
    if config.training.parallel != "auto" or world <= 1:
        return config.training.parallel
    from afina.devices import resolve_precision
    from afina.estimate.activations import prepare_on_meta, weights_dtype
    from afina.models.loading import model_config

    machine = Machine.here()
    dtype = weights_dtype(config.method, resolve_precision(config.training.precision, machine.device))
    model = prepare_on_meta(model_config(config.model), config.method, dtype)
    states = model.weight_bytes + model.trainable_bytes * 3
    return "ddp" if machine.runtime + states <= HEADROOM * machine.capacity else "fsdp"
