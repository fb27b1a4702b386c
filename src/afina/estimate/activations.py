"""What autograd keeps for one micro-batch, counted from the model's config without loading weights.

`prepare_on_meta` builds the model on the meta device and prepares it with the method's own
`apply_method`, so the count covers exactly the layers the method trains, fuses or wraps;
`layer_activation_bytes` and `loss_bytes` then give, per decoder layer and for the loss, the bytes
saved for backward by the kernels afina runs (fused LoRA, norms and SwiGLU, packed attention,
fused cross-entropy) or by PyTorch's and PEFT's own where those do not apply.
`test_layer_formula_equals_what_autograd_saves` holds the formula to autograd's saved tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from afina.models.methods import apply_method, decoder_layers, is_prompt_learning, unwrap
from afina.models.attention import keeps_probabilities, uses_matmul_kernel
from afina.models.fused_layers import is_fused
from afina.models.fused_lora import FusedLoraLinear
from afina.training.losses import CHUNK_TOKENS, fuses_head

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
    def from_config(cls, config) -> ModelShape:
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
    layers_on_path: int  # decoder layers that backward goes through (and so keep activations)
    linears: tuple[Linear, ...]  # those of the last decoder layer
    attached: int  # elements per token and layer that afina's bottleneck adapters keep
    norms_trained: bool
    head_trained: bool
    fused_head: bool  # the loss computes the head's gradients chunk by chunk (`afina.training.losses`)
    embeddings_trained: bool
    weight_dtype_bytes: int
    packed_attention: bool  # afina's per-example attention (`afina.models.attention`) runs the packed rows
    fused_norms: bool  # RMSNorm as one node (`afina.models.fused_layers`): keeps its input as it came
    fused_mlp: bool  # the SwiGLU block's forward from `afina.models.fused_layers`


def weights_dtype(method, precision: str) -> torch.dtype:
    """The dtype the pipeline loads the base in: bf16 for a frozen base under bf16, else fp32 (trained
    weights and their AdamW updates need fp32)."""
    return torch.bfloat16 if precision == "bf16" and method.freezes_base else torch.float32


def prepare_on_meta(hf_config, method, dtype: torch.dtype) -> PreparedModel:
    """Build the model on the meta device (no memory, no weights read) and apply the method to it."""
    from transformers import AutoModelForCausalLM

    if method.base_bits:  # the meta copy is never quantized (`with_quantized_base` counts that): its LoRA twin
        from afina.config.methods import LoraMethod

        method = LoraMethod(**{k: v for k, v in method.model_dump().items() if k in LoraMethod.model_fields
                               and k != "name"})
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
    from afina.models.methods import attached_module
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
    examples: int = 0  # packed examples in the micro-batch whose attention blocks are largest (0: one per row)
    longest: int = 0  # that micro-batch's longest example (0: the row length)
    copied: int = 0  # shared prefix tokens its attention blocks copy (`afina.data.packing`)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def attention_blocks(self) -> tuple[int, int]:
        """(examples, longest example): the per-example attention blocks of afina's packed attention."""
        return self.examples or self.rows, self.longest or self.length


def attention_keeps_scores(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> bool:
    """Whether SDPA, given a packed (block-diagonal) mask, falls back to the math kernel, which keeps
    heads x L x L softmax scores per row. Asked of PyTorch itself on a tiny input: the flash (CPU) and
    memory-efficient (CUDA) kernels keep only their output and log-sum-exp."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda" and not torch.cuda.is_available():  # a GPU table drawn without a GPU
        return False  # CUDA's memory-efficient kernel takes the packed mask
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
                   ((heads + 2 kv_heads) x head_dim x c, also for each shared prefix token copied into
                   a block that reads it; block padding is not counted), and once per
                   layer the probabilities (examples x heads x longest^2 x c) where its matmul kernel
                   keeps them; with blocks too large for that kernel SDPA keeps the output and the
                   log-sum-exp (heads x 4) too. Prefix / prompt tuning run SDPA with a mask instead: q, k, v and the
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
    per_layer = 0
    if model.packed_attention:
        per_token += (shape.heads + 2 * shape.kv_heads) * shape.head_dim * c
        per_layer += batch.copied * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * c  # the blocks' copies
        examples, longest = batch.attention_blocks
        output_kept = not uses_matmul_kernel(examples, shape.heads, longest)  # else SDPA keeps it
        per_token += (heads_dim * c + shape.heads * 4) if output_kept else 0
        if not output_kept and keeps_probabilities(examples, shape.heads, longest, c):
            per_layer += examples * shape.heads * longest * longest * c
    else:
        output_kept = True
        per_token += 4 * heads_dim * c + shape.heads * 4 + batch.length * c * (1 + (shape.heads if keeps_scores else 0))
    if model.norms_trained and not model.fused_norms:
        per_token += 2 * shape.hidden * 4
    not_counted = {"attention_output"} if output_kept else set()
    not_counted |= {"mlp_output"} if gated else set()
    per_token += linear_input_bytes(model.linears, c, bf16, not_counted) + model.attached * c
    return per_token * batch.tokens + per_layer + (weight_copy_bytes(model.linears) if bf16 else 0)


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
