"""What is trained: one config model per method, joined in a union tagged by `name`.

    method: lora                          # shorthand for {name: lora}
    method: {name: dora, r: 8}
    method: {name: loreft, r: 4, positions: prompt_ends, first: 3, last: 3}

Methods fall in three groups. `full` and `freeze` change the base weights themselves. The PEFT
methods (`lora`, `dora`, `rslora`, `qlora`, `ia3`, `prefix`, `prompt`) and afina's own small modules
(`loreft`, `adapter`) freeze the base and train something beside it, so the base can be kept in
bf16 or quantized (`qlora`, `load_in_8bit`, CUDA only) and compared with the tuned model in one copy.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodConfig(Strict):
    """Options every method has, and what the method implies for the rest of afina (class variables,
    not config keys): the one place that says how methods differ."""

    kind: ClassVar[Literal["weights", "peft", "module"]] = "peft"
    """weights: the base weights themselves are trained (full, freeze); peft: a PEFT adapter beside a
    frozen base; module: one of afina's own modules beside a frozen base (loreft, adapter)."""
    shares_prefixes: ClassVar[bool] = True
    """Whether packed rows may share prefixes between examples (`afina.data.packing`): not where the
    method acts at each example's own positions (LoReFT's prompt positions, virtual tokens)."""
    merges: ClassVar[bool] = True
    """Whether the trained update can be folded into the base weights (`afina merge`)."""
    usual_learning_rate: ClassVar[float] = 2e-4
    """The method's usual peak AdamW rate at 8 examples per step (its paper's or PEFT's examples), from
    which `learning_rate: auto` starts (`afina.training.auto`): adapters beside a frozen base take far
    larger rates than the base weights themselves."""

    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass: less memory, ~30% slower.")

    @property
    def freezes_base(self) -> bool:
        """True when the base weights are frozen (they may then be kept in bf16 or quantized)."""
        return self.kind != "weights"

    @property
    def base_bits(self) -> int | None:
        """Bits per weight of a quantized frozen base (bitsandbytes); None for an unquantized base."""
        return 8 if getattr(self, "load_in_8bit", False) else None

    @property
    def needs_cuda(self) -> bool:
        """A quantized base runs on bitsandbytes kernels, which exist for CUDA only."""
        return self.base_bits is not None

    @property
    def uses_paged_optimizer(self) -> bool:
        """Whether the optimizer is bitsandbytes' paged 8-bit AdamW (qlora's `paged_optimizer`)."""
        return False


class FrozenBaseConfig(MethodConfig):
    """Options of the methods that leave the base weights untouched."""

    load_in_8bit: bool = Field(
        False, description="Load the frozen base in 8-bit (bitsandbytes LLM.int8); CUDA only.")


class LoraFields(BaseModel):
    """The low-rank update shared by lora, dora, rslora and qlora."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale of the update (alpha / r; alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the output head.")


class FullMethod(MethodConfig):
    """Every weight is trained (needs fp32 weights and optimizer state for the whole model)."""

    name: Literal["full"] = "full"
    kind: ClassVar = "weights"
    usual_learning_rate: ClassVar = 2e-5


class FreezeMethod(MethodConfig):
    """The base is frozen except its last decoder layers and chosen modules."""

    name: Literal["freeze"] = "freeze"
    kind: ClassVar = "weights"
    usual_learning_rate: ClassVar = 5e-5
    train_last_layers: int = Field(2, ge=0, description="Train the last N decoder layers (0: none).")
    train_modules: list[str] = Field(
        default_factory=list,
        description="Also train these: `embeddings`, `norms`, `lm_head`, or glob patterns over parameter names "
                    "such as `model.layers.*.mlp.*`. With tied embeddings, lm_head and embeddings are one weight.")

    @model_validator(mode="after")
    def _trains_something(self) -> "FreezeMethod":
        if self.train_last_layers == 0 and not self.train_modules:
            raise ValueError("freeze trains nothing: set train_last_layers or train_modules")
        return self


class LoraMethod(FrozenBaseConfig, LoraFields):
    """LoRA (Hu et al. 2021): a trained low-rank update beside each targeted linear layer."""

    name: Literal["lora"] = "lora"


class DoraMethod(FrozenBaseConfig, LoraFields):
    """DoRA (Liu et al. 2024): LoRA on the direction of each weight plus a trained magnitude per output."""

    name: Literal["dora"] = "dora"


class RsloraMethod(FrozenBaseConfig, LoraFields):
    """rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha / sqrt(r), which keeps high ranks learning."""

    name: Literal["rslora"] = "rslora"
    usual_learning_rate: ClassVar = 1e-4  # scaled by alpha / sqrt(r): sqrt(r) times LoRA's update at one rate


class QloraMethod(MethodConfig, LoraFields):
    """QLoRA (Dettmers et al. 2023): LoRA on a base quantized to 4-bit NF4 (bitsandbytes, CUDA only)."""

    name: Literal["qlora"] = "qlora"
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/weight).")
    compute_dtype: Literal["bf16", "fp16"] = Field("bf16", description="Dtype the 4-bit weights are dequantized to.")
    paged_optimizer: bool = Field(
        False, description="Paged 8-bit AdamW (bitsandbytes): optimizer state pages to CPU on memory spikes.")

    @property
    def base_bits(self) -> int | None:
        return 4

    @property
    def uses_paged_optimizer(self) -> bool:
        return self.paged_optimizer


class Ia3Method(FrozenBaseConfig):
    """IA3 (Liu et al. 2022): trained vectors that rescale keys, values and feed-forward activations."""

    name: Literal["ia3"] = "ia3"
    usual_learning_rate: ClassVar = 3e-3
    target_modules: list[str] | None = Field(
        None, description="Modules to rescale; default: PEFT's choice for the architecture (k, v, down projections).")
    feedforward_modules: list[str] | None = Field(
        None, description="Those of target_modules that are feed-forward (scaled on their input, not output).")

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> "Ia3Method":
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules needs target_modules")
            if not set(self.feedforward_modules) <= set(self.target_modules):
                raise ValueError("feedforward_modules must be a subset of target_modules")
        return self


class PrefixMethod(FrozenBaseConfig):
    """Prefix tuning (Li & Liang 2021): trained keys and values that every layer attends to first."""

    name: Literal["prefix"] = "prefix"
    shares_prefixes: ClassVar = False
    usual_learning_rate: ClassVar = 5e-3
    merges: ClassVar = False
    num_virtual_tokens: int = Field(20, ge=1, description="Trained key/value positions per layer.")
    projection: bool = Field(False, description="Produce the prefix through a trained MLP (steadier training).")
    projection_size: int = Field(512, ge=1, description="Hidden size of that MLP.")

    @model_validator(mode="after")
    def _no_checkpointing(self) -> "PrefixMethod":
        # The prefix reaches the attention through the key/value cache, and transformers drops the
        # cache from layers that it recomputes in the backward pass: the prefix would be lost.
        if self.gradient_checkpointing:
            raise ValueError("prefix tuning cannot use gradient_checkpointing (transformers drops the key/value "
                             "cache that carries the prefix from checkpointed layers); use prompt or lora instead")
        return self


class PromptMethod(FrozenBaseConfig):
    """Prompt tuning (Lester et al. 2021): trained embeddings placed before every input."""

    name: Literal["prompt"] = "prompt"
    shares_prefixes: ClassVar = False
    usual_learning_rate: ClassVar = 3e-2
    merges: ClassVar = False
    num_virtual_tokens: int = Field(20, ge=1, description="Trained embeddings put before each example.")
    init: Literal["sample_vocab", "random", "text"] = Field(
        "sample_vocab", description="Start from embeddings of random vocabulary tokens, random vectors, or init_text.")
    init_text: str | None = Field(None, description="Text whose token embeddings start the prompt (init: text).")

    @model_validator(mode="after")
    def _text_given(self) -> "PromptMethod":
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init_text is needed with init: text, and only then")
        return self


class LoreftMethod(FrozenBaseConfig):
    """LoReFT (Wu et al. 2024): h + R^T(W h + b - R h) on the hidden states of chosen layers and positions."""

    name: Literal["loreft"] = "loreft"
    kind: ClassVar = "module"
    usual_learning_rate: ClassVar = 1e-3
    shares_prefixes: ClassVar = False
    merges: ClassVar = False
    r: int = Field(4, ge=1, description="Rank of the intervened subspace (rows of R).")
    layers: list[int] | Literal["all"] = Field("all", description="Decoder layers whose output is intervened on.")
    positions: Literal["prompt_ends", "all"] = Field(
        "prompt_ends", description="prompt_ends: the first and last prompt tokens of each example, as in the paper "
                                   "(generated tokens cost nothing extra); all: every position.")
    first: int = Field(3, ge=0, description="With prompt_ends: intervene on this many first prompt tokens.")
    last: int = Field(3, ge=0, description="With prompt_ends: intervene on this many last prompt tokens.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the intervention's edit.")

    @model_validator(mode="after")
    def _some_positions(self) -> "LoreftMethod":
        if self.positions == "prompt_ends" and self.first + self.last == 0:
            raise ValueError("positions: prompt_ends needs first or last above 0")
        return self


class AdapterMethod(FrozenBaseConfig):
    """Bottleneck adapters (Houlsby et al. 2019) after the attention and MLP blocks of each decoder layer."""

    name: Literal["adapter"] = "adapter"
    kind: ClassVar = "module"
    usual_learning_rate: ClassVar = 5e-4
    merges: ClassVar = False
    bottleneck: int = Field(64, ge=1, description="Width of the down-projection.")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Nonlinearity between the projections.")
    layers: list[int] | Literal["all"] = Field("all", description="Decoder layers that get adapters.")


Method = Annotated[
    Union[FullMethod, FreezeMethod, LoraMethod, DoraMethod, RsloraMethod, QloraMethod, Ia3Method, PrefixMethod,
          PromptMethod, LoreftMethod, AdapterMethod],
    Field(discriminator="name"),
]
"""Any method config; pydantic picks the model from `name`."""

AnyMethod = Union[FullMethod, FreezeMethod, LoraMethod, DoraMethod, RsloraMethod, QloraMethod, Ia3Method,
                  PrefixMethod, PromptMethod, LoreftMethod, AdapterMethod]
"""The same union without the discriminator, for type hints."""
