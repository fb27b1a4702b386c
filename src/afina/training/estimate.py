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
    activations  what autograd saves for one micro-batch (see `layer_activation_bytes`), the logits at
                 trained positions, and one layer's worth of backward temporaries
    allocator    freed memory the allocator keeps: a share of the activations (glibc heaps on CPU,
                 measured; PyTorch's caching allocator on CUDA, rough)
    shape caches bf16 on CPU: what the matmul kernels keep for each distinct micro-batch shape the run meets

Parameter counts come from the model config built on the meta device and prepared by the method's
own `apply_method`, so every method counts exactly what it will train, without any weights loaded.
Time per epoch comes from a few real optimizer steps on this machine, or with `calibrate=False`
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
from torch import nn

from afina.config.loading import merge, parse_overrides, validate_config
from afina.config.schema import RunConfig, TrainingConfig
from afina.data.packing import epoch_steps, pack_examples
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.models.adapters import apply_method, decoder_layers, freezes_base, is_prompt_learning, unwrap
from afina.models.attention import uses_matmul_kernel
from afina.models.fused_layers import is_fused
from afina.models.fused_lora import FusedLoraLinear
from afina.models.loading import load_model, model_config, resolve_model_dir
from afina.training.cost import cost_of, price_per_hour
from afina.training.loop import rows_per_step, total_steps, train
from afina.training.loss import CHUNK_TOKENS, fuses_head
from afina.training.precision import resolve_precision
from afina.training.steps import objective_for

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
# How the inputs of a Llama block's linear layers are shared: q, k and v read one tensor, gate and up another.
INPUT_GROUPS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention_output",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp_output"}


# --- what the model is and what the method trains -------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its activations."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config()
        heads = text.num_attention_heads
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                   getattr(text, "num_key_value_heads", None) or heads,
                   getattr(text, "head_dim", None) or text.hidden_size // heads, text.vocab_size)


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, as the method left it."""

    name: str
    in_features: int
    out_features: int
    weight_trained: bool
    weight_bytes: int  # bytes per element of its weight
    lora_rank: int = 0
    lora_dropout: bool = False
    extra: int = 0  # elements per token its adapter keeps besides: DoRA's two scaled outputs, IA3's scaled tensor
    fused: bool = False  # afina's one-node LoRA (`afina.models.fused_lora`): keeps its input, never a copy

    @property
    def keeps_input(self) -> bool:
        """Backward needs this layer's input: for its weight's gradient or for a LoRA branch (PEFT's
        without dropout; the fused one always)."""
        return self.weight_trained or self.fused or (self.lora_rank > 0 and not self.lora_dropout)


@dataclass(frozen=True)
class PreparedModel:
    """Parameter counts and trained parts of the model as the method prepares it (read off a meta copy)."""

    parameters: int
    weight_bytes: int
    trainable: int
    trainable_bytes: int
    largest_trainable_bytes: int
    layers_on_path: int  # decoder layers that backward goes through (and so keep activations)
    linears: tuple[Linear, ...]  # those of the last decoder layer
    attached: int  # elements per token and layer that afina's bottleneck adapters keep
    norms_trained: bool
    head_trained: bool
    fused_head: bool  # the loss computes the head's gradients chunk by chunk (`afina.training.loss`)
    embeddings_trained: bool
    weight_dtype_bytes: int
    packed_attention: bool  # afina's per-example attention (`afina.models.attention`) runs the packed rows
    fused_norms: bool  # RMSNorm as one node (`afina.models.fused_layers`): keeps its input as it came
    fused_mlp: bool  # the SwiGLU block's forward from `afina.models.fused_layers`


def weights_dtype(method, precision: str) -> torch.dtype:
    """The dtype the pipeline loads the base in: bf16 for a frozen base under bf16, else fp32 (trained
    weights and their AdamW updates need fp32)."""
    return torch.bfloat16 if precision == "bf16" and freezes_base(method) else torch.float32


def prepare_on_meta(hf_config, method, dtype: torch.dtype) -> PreparedModel:
    """Build the model on the meta device (no memory, no weights read) and apply the method to it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = apply_method(AutoModelForCausalLM.from_config(hf_config, dtype=dtype), method)
    parameters = dict(model.named_parameters())  # tied weights appear once
    trainable = [p for p in parameters.values() if p.requires_grad]
    layers = decoder_layers(model)
    trained_layers = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    hf_model = unwrap(model)
    embeddings_trained = hf_model.get_input_embeddings().weight.requires_grad
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    head = {id(p) for p in hf_model.get_output_embeddings().parameters()}
    # prompt/prefix embeddings and embeddings feed every layer; a method without any trained layer but
    # with something outside them (loreft interventions) is counted from the first layer, to be safe
    outside = any(id(p) not in in_layers and id(p) not in head for p in trainable)
    first = 0 if embeddings_trained or outside else (trained_layers[0] if trained_layers else len(layers))
    last = layers[-1]
    return PreparedModel(
        parameters=sum(p.numel() for p in parameters.values()),
        weight_bytes=sum(p.numel() * p.element_size() for p in parameters.values()),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        largest_trainable_bytes=max((p.numel() * p.element_size() for p in trainable), default=0),
        layers_on_path=len(layers) - first,
        linears=tuple(describe_linears(last)),
        attached=attached_elements(model) // max(1, len(layers) - first),
        norms_trained=any(p.requires_grad for n, p in last.named_parameters() if "norm" in n),
        head_trained=any(p.requires_grad for p in hf_model.get_output_embeddings().parameters()),
        fused_head=fuses_head(hf_model.get_output_embeddings()),
        embeddings_trained=embeddings_trained,
        weight_dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        packed_attention=not is_prompt_learning(model),  # prefix / prompt tuning run SDPA on masked rows
        fused_norms=any(is_fused(m) and "Norm" in type(m).__name__ for m in last.modules()),
        fused_mlp=any(is_fused(m) and "MLP" in type(m).__name__ for m in last.modules()),
    )


def describe_linears(layer: nn.Module) -> list[Linear]:
    """The linear layers of a decoder block, with what the method attached to them. A PEFT layer keeps
    the original as `base_layer` and a LoRA branch in `lora_A` / `lora_dropout`; modules inside a
    wrapped layer are part of it, not layers of their own."""
    found, wrapped = [], []
    for name, module in layer.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear):
            wrapped.append(name)
            found.append(peft_linear(name, module, base))
        elif isinstance(module, nn.Linear):
            found.append(Linear(name.rsplit(".", 1)[-1], module.in_features, module.out_features,
                                module.weight.requires_grad, module.weight.element_size()))
    return found


def peft_linear(name: str, module: nn.Module, base: nn.Linear) -> Linear:
    """A PEFT-wrapped linear layer: LoRA (rank, dropout; DoRA also keeps its two scaled outputs) or
    IA3 (keeps the tensor it scales: the input of a feed-forward layer, else the output)."""
    lora = getattr(module, "lora_A", None) or {}
    adapter = next(iter(lora), None)
    rank = lora[adapter].out_features if adapter else 0
    dropout = adapter is not None and isinstance(module.lora_dropout[adapter], nn.Dropout)
    dora = bool(adapter and getattr(module, "use_dora", {}).get(adapter))
    extra = 2 * base.out_features if dora else 0
    if getattr(module, "ia3_l", None):
        extra = base.in_features if module.is_feedforward else base.out_features
    return Linear(name.rsplit(".", 1)[-1], base.in_features, base.out_features, base.weight.requires_grad,
                  base.weight.element_size(), rank, dropout, extra, isinstance(module, FusedLoraLinear) and not dora)


def attached_elements(model: nn.Module) -> int:
    """Elements per token that afina's bottleneck adapters keep, all layers together: each keeps its
    input and the bottleneck before and after the nonlinearity."""
    from afina.models.adapters import attached_module
    from afina.models.bottleneck import BottleneckAdapter

    module = attached_module(model)
    adapters = [m for m in module.modules() if isinstance(m, BottleneckAdapter)] if module is not None else []
    return sum(a.down.in_features + 2 * a.down.out_features for a in adapters)


# --- activations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch of a run: rows x length tokens (padding included), trained positions."""

    rows: int
    length: int
    trained_tokens: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def attention_keeps_scores(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> bool:
    """Whether SDPA, given a packed (block-diagonal) mask, falls back to the math kernel, which keeps
    heads x L x L softmax scores per row. Asked of PyTorch itself on a tiny input: the flash (CPU) and
    memory-efficient (CUDA) kernels keep only their output and log-sum-exp."""
    from torch.nn.attention import SDPBackend

    query = torch.zeros(1, heads, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(1, 1, 8, 8, device=device, dtype=torch.bool)
    try:
        return torch._fused_sdp_choice(query, query, query, mask, 0.0, False) == SDPBackend.MATH.value
    except (RuntimeError, AttributeError):  # a build without the dispatcher: assume the worst
        return True


def layer_activation_bytes(shape: ModelShape, model: PreparedModel, batch: MicroBatch, bf16: bool,
                           keeps_scores: bool) -> int:
    """Bytes autograd saves for one decoder layer of a Llama-style block, term by term as saved-tensor
    hooks show them (`tests/unit/test_estimate.py` checks the sum against the hooks). Per token, with
    c the compute dtype's bytes (2 under bf16 autocast, else 4):

        norms      the two RMSNorm inputs: as they came (2 x hidden x r, r the bytes of the residual
                   stream's dtype) and their inverse RMS (2 x 4) with afina's fused norm; else upcast to
                   fp32 (2 x hidden x 4) with the rsqrt, and the normalized outputs when the weights train
        attention  afina's packed attention: q, k and v gathered into per-example blocks
                   ((heads + 2 kv_heads) x head_dim x c; block padding is not counted); with blocks
                   too large for its matmul kernel SDPA keeps the output and the log-sum-exp (heads x 4)
                   too. Prefix / prompt tuning run SDPA with a mask instead: q, k, v and the
                   output (4 x heads x head_dim x c, k and v repeated to every head), the log-sum-exp,
                   the mask cast to c per layer (L x c), with the math kernel the scores (heads x L x c)
        mlp        gate, SiLU(gate) and up outputs (3 x intermediate x c); gate and up only when the
                   fused down projection forms SiLU(gate) * up itself (it then keeps no input either)
        inputs     of each linear whose weight trains or that carries LoRA: one tensor per shared input
                   (q/k/v share one, gate/up another; o's is the attention output, which SDPA keeps
                   anyway); under autocast an fp32 norm output is cast to bf16 for each layer reading it,
                   and each PEFT LoRA layer keeps a copy of its input (cast to the adapter's fp32 first)
        adapters   LoRA's rank-r down-projection; with dropout, the fused layer's bool mask (in x 1),
                   PEFT's fp32 mask and its output instead of the input (in x (4 + c)); DoRA's two
                   scaled outputs (2 x out x c); IA3's scaled tensor; afina's bottleneck adapters
    and once per micro-batch, under autocast, the bf16 copies of fp32 weights (trained base weights,
    LoRA's A and B) that backward multiplies by.
    """
    c = 2 if bf16 else 4
    heads_dim = shape.heads * shape.head_dim
    down = next((linear for linear in model.linears if linear.name == "down_proj"), None)
    gated = model.fused_mlp and down is not None and down.fused
    per_token = 2 * 4 + (2 if gated else 3) * shape.intermediate * c
    per_token += 2 * shape.hidden * (model.weight_dtype_bytes if model.fused_norms else 4)
    if model.packed_attention:
        per_token += (shape.heads + 2 * shape.kv_heads) * shape.head_dim * c
        output_kept = not uses_matmul_kernel(batch.rows, shape.heads, batch.length)  # else SDPA keeps it
        per_token += (heads_dim * c + shape.heads * 4) if output_kept else 0
    else:
        output_kept = True
        per_token += 4 * heads_dim * c + shape.heads * 4 + batch.length * c * (1 + (shape.heads if keeps_scores else 0))
    if model.norms_trained and not model.fused_norms:
        per_token += 2 * shape.hidden * 4
    not_counted = {"attention_output"} if output_kept else set()
    not_counted |= {"mlp_output"} if gated else set()
    per_token += linear_input_bytes(model.linears, c, bf16, not_counted) + model.attached * c
    return per_token * batch.tokens + (weight_copy_bytes(model.linears) if bf16 else 0)


def linear_input_bytes(linears: tuple[Linear, ...], c: int, bf16: bool, not_counted: set[str]) -> int:
    """Per token: what backward needs from the linear layers and their adapters (see
    `layer_activation_bytes`); inputs of the groups in `not_counted` are kept elsewhere (o's input by
    the attention kernel) or formed again in backward (the fused SwiGLU product)."""
    total, groups = 0, set()
    for linear in linears:
        group = INPUT_GROUPS.get(linear.name, linear.name)
        total += linear.extra * c
        if linear.lora_rank:
            total += linear.lora_rank * c
            if linear.fused:
                total += linear.in_features if linear.lora_dropout else 0  # the bool mask
            elif linear.lora_dropout:  # dropout's mask (fp32, like the adapter) and its output, lora_A's input
                total += linear.in_features * (4 + c)
                continue
            elif bf16:  # PEFT casts the input to the adapter's fp32 and autocast back to bf16: a copy per layer
                total += linear.in_features * c
                continue
        if not linear.keeps_input:
            continue
        if bf16 and linear.weight_bytes == 4 and group in ("attention", "mlp"):  # an fp32 norm output is cast
            # to bf16 for each layer that reads it
            total += linear.in_features * c
        elif group not in groups and group not in not_counted:
            groups.add(group)
            total += linear.in_features * c
    return total


def weight_copy_bytes(linears: tuple[Linear, ...]) -> int:
    """Under bf16 autocast: the bf16 copies of fp32 weights (trained base weights, LoRA's A and B) that
    backward multiplies by, one set per micro-batch and layer."""
    total = 0
    for linear in linears:
        if linear.weight_bytes == 4:
            total += linear.in_features * linear.out_features * 2
        total += (linear.in_features + linear.out_features) * linear.lora_rank * 2
    return total


def activation_bytes(shape: ModelShape, model: PreparedModel, batch: MicroBatch, bf16: bool, checkpointing: bool,
                     keeps_scores: bool) -> int:
    """Peak activation memory of one micro-batch: the layers backward goes through, the loss at the
    trained positions, and one layer's worth of backward temporaries. With gradient checkpointing the
    layers keep only their inputs, and one layer at a time is recomputed in full."""
    layer = layer_activation_bytes(shape, model, batch, bf16, keeps_scores)
    layers = model.layers_on_path
    if checkpointing and layers:
        body = layers * batch.tokens * shape.hidden * model.weight_dtype_bytes + layer
    else:
        body = layers * layer
    return body + layer * (layers > 0) + loss_bytes(shape, model, batch, bf16)


def loss_bytes(shape: ModelShape, model: PreparedModel, batch: MicroBatch, bf16: bool) -> int:
    """The final norm and the logits of trained positions. A plain head (`LinearCrossEntropy`) holds one
    chunk's fp32 logits and a temporary of their size at a time, and keeps the gradients it computed:
    the hidden states' and, where the head trains, its weight's (fp32). Any other head keeps its input
    where it trains and the fp32 log-softmax while the trained positions fit in one chunk (larger ones
    are recomputed), plus the logits and their gradient alive at once during backward; under autocast
    also the bf16 logits. Under autocast, an fp32 head weight's bf16 copy."""
    c = 2 if bf16 else 4
    head_copy = shape.vocab * shape.hidden * 2 if bf16 and model.weight_dtype_bytes == 4 else 0
    norm_input = shape.hidden * (model.weight_dtype_bytes if model.fused_norms else 4)
    norm = batch.tokens * (norm_input + 4) if model.layers_on_path or model.norms_trained else 0
    trained = batch.trained_tokens
    chunk = min(trained, CHUNK_TOKENS)
    if model.fused_head:
        head_input = 0
        logits = 2 * chunk * shape.vocab * 4 + trained * shape.hidden * c
        logits += shape.vocab * shape.hidden * 4 if model.head_trained else 0
    else:
        head_input = trained * shape.hidden * c if model.head_trained else 0
        kept = trained * shape.vocab * 4 if trained <= CHUNK_TOKENS else 0
        logits = kept + 2 * chunk * shape.vocab * 4 + (chunk * shape.vocab * 2 if bf16 else 0)
    indices = batch.tokens * 8 if model.embeddings_trained else 0
    return norm + head_input + head_copy + logits + indices


def micro_batch_shapes(examples: list[Example], training: TrainingConfig) -> int:
    """Distinct (rows, padded length) shapes among the run's micro-batches, counted up to `CACHED_SHAPES`."""
    shapes = set()
    for step in islice(run_steps(examples, training), total_steps(examples, training)):
        lengths = [sum(len(e.input_ids) for e in row) for row in step]
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


def largest_micro_batch(examples: list[Example], training: TrainingConfig) -> MicroBatch:
    """The largest micro-batch the run will see: rows_per_batch rows (fewer if the data has fewer) of
    the longest packed row, with the most trained positions any micro-batch of the first epoch has."""
    rows = pack_examples(examples, training.row_length)
    longest = max((sum(len(e.input_ids) for e in row) for row in rows), default=1)
    count = min(training.rows_per_batch, len(rows)) or 1
    most_trained = 0
    for step in epoch_steps(examples, training.row_length, rows_per_step(training), training.seed, 0):
        for start in range(0, len(step), training.rows_per_batch):
            micro = step[start : start + training.rows_per_batch]
            most_trained = max(most_trained, sum(max(0, e.trained_count - e.trained[0]) for row in micro for e in row))
    return MicroBatch(count, longest, most_trained)


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
    def here(cls, capacity: int | None = None) -> "Machine":
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
    batch = largest_micro_batch(examples, config.training)
    bf16 = precision == "bf16"
    checkpointing = config.method.gradient_checkpointing
    scores = attention_keeps_scores(machine.device, torch.bfloat16 if bf16 else dtype, shape.heads, shape.head_dim)
    activations = activation_bytes(shape, model, batch, bf16, checkpointing, scores)
    cpu = machine.device.type == "cpu"
    paged = getattr(config.method, "paged_optimizer", False)  # bitsandbytes' 8-bit moments
    optimizer = 2 * model.trainable if paged else 2 * model.trainable_bytes
    # single-tensor AdamW on CPU makes two temporaries of one parameter; foreach AdamW on CUDA one of all
    step = 2 * model.largest_trainable_bytes if cpu else model.trainable_bytes
    loading = machine.runtime + model.weight_bytes + (mapped_while_loading(config.model, dtype) if cpu else 0)
    share = CPU_ALLOCATOR_SHARE if cpu else CUDA_ALLOCATOR_SHARE
    caches = shape_cache_bytes(model, micro_batch_shapes(examples, config.training)) if cpu and bf16 else 0
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
                        summarize_data(examples, config.training), plan.memory, machine.capacity, fits, fits)
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


def summarize_data(examples: list[Example], training: TrainingConfig) -> DataSummary:
    rows = pack_examples(examples, training.row_length)
    tokens = sum(len(e.input_ids) for e in examples)
    computed = sum(padded_tokens(step, training.rows_per_batch) for step in first_epoch(examples, training))
    return DataSummary(len(examples), tokens, sum(max(0, e.trained_count - e.trained[0]) for e in examples),
                       len(rows), 1 - tokens / computed if computed else 0.0,
                       math.ceil(len(rows) / rows_per_step(training)), total_steps(examples, training))


def first_epoch(examples: list[Example], training: TrainingConfig) -> list[list[list[Example]]]:
    return epoch_steps(examples, training.row_length, rows_per_step(training), training.seed, 0)


def padded_tokens(step: list[list[Example]], rows_per_batch: int) -> int:
    """Positions a step computes: each micro-batch is padded to its longest row (`collate_rows`)."""
    lengths = [sum(len(e.input_ids) for e in row) for row in step]
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
                  objective_for(config))
        except _CalibrationDone:
            pass
    del model
    gc.collect()
    timed = list(islice(run_steps(examples, config.training), 1, steps))  # the first step is not timed
    return (stamps[-1] - stamps[0]) / sum(padded_tokens(step, config.training.rows_per_batch) for step in timed)


def run_steps(examples: list[Example], training: TrainingConfig) -> Iterator[list]:
    """The optimizer steps the loop takes, epoch after epoch, without end (take what is needed)."""
    for epoch in itertools.count():
        steps = epoch_steps(examples, training.row_length, rows_per_step(training), training.seed, epoch)
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
    epoch_tokens = sum(padded_tokens(step, config.training.rows_per_batch)
                       for step in first_epoch(examples, config.training))
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
