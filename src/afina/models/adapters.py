"""Prepare a loaded model for the configured method, and give the loop, the loss and evaluation the
views of it they need.

    check_method_supported(method)            # before anything loads: qlora / 8-bit need CUDA
    model = load_model(..., quantization_config=quantization_config(method))
    model = apply_method(model, method)       # freeze, attach, enable gradient checkpointing
    body, head = body_and_head(model)         # hidden states aligned with input_ids; output projection
    with base_model(model): ...               # the same model computing exactly what its base computes

`full` and `freeze` train the base weights; every other method freezes them (`freezes_base`) and
trains a PEFT adapter or one of afina's modules (`loreft`, `adapter`) attached beside them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from afina.config.methods import AnyMethod
from afina.errors import AfinaError
from afina.models.attention import packed_layout
from afina.models.bottleneck import BottleneckAdapters
from afina.models.fused_layers import fuse_layers
from afina.models.fused_lora import fuse_lora_layers
from afina.models.loreft import LoreftInterventions, example_slots

LOREFT_ATTR = "afina_loreft"  # where afina's own modules hang on the model
ADAPTERS_ATTR = "afina_adapters"
TRAINS_BASE = ("full", "freeze")


# --- what the machine must offer ------------------------------------------------------------------

def needs_cuda(method: AnyMethod) -> bool:
    """qlora and 8-bit bases run on bitsandbytes kernels, which exist for CUDA only."""
    return method.name == "qlora" or getattr(method, "load_in_8bit", False)


def check_method_supported(method: AnyMethod) -> None:
    """Refuse, before anything loads, a method this machine cannot run."""
    if not needs_cuda(method):
        return
    what = "qlora (a 4-bit base)" if method.name == "qlora" else "load_in_8bit (an 8-bit base)"
    if not torch.cuda.is_available():
        raise AfinaError("cuda_required", f"{what} needs a CUDA GPU and none is available", location="method",
                         hint="use method: lora, which trains the same adapter on an unquantized base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AfinaError("cuda_required", f"{what} needs the bitsandbytes package", location="method",
                         hint="pip install bitsandbytes, or use method: lora")


def quantization_config(method: AnyMethod):
    """The `quantization_config` to load the base with (None: load it unquantized)."""
    from transformers import BitsAndBytesConfig

    if method.name == "qlora":
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[method.compute_dtype]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=method.double_quant, bnb_4bit_compute_dtype=compute)
    if getattr(method, "load_in_8bit", False):
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def freezes_base(method: AnyMethod) -> bool:
    """True when the base weights are frozen (they may then be kept in bf16 or quantized)."""
    return method.name not in TRAINS_BASE


def uses_paged_optimizer(method: AnyMethod) -> bool:
    """Whether the method asks for bitsandbytes' paged 8-bit AdamW (qlora's `paged_optimizer`)."""
    return getattr(method, "paged_optimizer", False)


def make_optimizer(parameters, learning_rate: float, weight_decay: float, paged: bool = False) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW where qlora asks for it (`paged_optimizer`).

    PyTorch's fused AdamW where every parameter allows it: one kernel for all parameters instead of
    a dozen small ops per parameter (on a CPU, 5 instead of 20 ms a step for LoRA on the default model).
    """
    parameters = list(parameters)
    if paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)


# --- preparing the model --------------------------------------------------------------------------

def apply_method(model: PreTrainedModel, method: AnyMethod) -> nn.Module:
    """Freeze what the method leaves alone and attach what it trains; returns the model to train."""
    check_method_supported(method)
    if is_quantized(model):  # norms and head to fp32, base frozen: PEFT's recipe for k-bit bases
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method.gradient_checkpointing:
        enable_checkpointing(model)
    fuse_layers(model)
    if method.name == "full":
        model.requires_grad_(True)
        return model
    if method.name == "freeze":
        return freeze_all_but(model, method)
    if method.name in PEFT_CONFIGS:
        model = get_peft_model(model, PEFT_CONFIGS[method.name](method, model))
        fuse_lora_layers(model)
        repair_prompt_learning_generation(model)
        return model
    model.requires_grad_(False)
    return attach_modules(model, method)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in the backward pass. Non-reentrant, so it works although the
    layer inputs of a frozen base need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_config(method, model) -> LoraConfig:
    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=method.target_modules, use_dora=method.name == "dora",
                      use_rslora=method.name == "rslora", task_type="CAUSAL_LM")


def ia3_config(method, model) -> IA3Config:
    # PEFT fills in feed-forward modules for its default targets only; with explicit targets an
    # unset list means none of them is feed-forward.
    feedforward = method.feedforward_modules
    if feedforward is None and method.target_modules is not None:
        feedforward = []
    return IA3Config(target_modules=method.target_modules, feedforward_modules=feedforward, task_type="CAUSAL_LM")


def prefix_config(method, model) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, prefix_projection=method.projection,
                              encoder_hidden_size=method.projection_size if method.projection else None,
                              task_type="CAUSAL_LM")


def prompt_config(method, model) -> PromptTuningConfig:
    init = {"sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[method.init]
    return PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init=init,
                              prompt_tuning_init_text=method.init_text,
                              tokenizer_name_or_path=model.name_or_path if method.init == "text" else None,
                              task_type="CAUSAL_LM")


PEFT_CONFIGS = {"lora": lora_config, "dora": lora_config, "rslora": lora_config, "qlora": lora_config,
                "ia3": ia3_config, "prefix": prefix_config, "prompt": prompt_config}


def freeze_all_but(model: PreTrainedModel, method) -> PreTrainedModel:
    """Freeze everything, then unfreeze the last decoder layers and the named modules."""
    model.requires_grad_(False)
    for parameter in freeze_targets(model, method):
        parameter.requires_grad_(True)
    return model


def freeze_targets(model: PreTrainedModel, method) -> list[nn.Parameter]:
    """The parameters `freeze` trains: those of the last decoder layers and of `train_modules`."""
    layers = decoder_layers(model)
    if method.train_last_layers > len(layers):
        raise AfinaError("invalid_method", f"train_last_layers is {method.train_last_layers} but the model has "
                         f"{len(layers)} decoder layers", location="method.train_last_layers")
    targets = [p for layer in list(layers)[len(layers) - method.train_last_layers:] for p in layer.parameters()]
    for entry in method.train_modules:
        parameters = module_parameters(model, entry)
        if not parameters:
            raise AfinaError("invalid_method", f"train_modules entry {entry!r} matches no parameter",
                             location="method.train_modules",
                             hint="use embeddings, norms, lm_head, or a glob such as model.layers.*.mlp.*")
        targets.extend(parameters)
    return targets


def module_parameters(model: PreTrainedModel, entry: str) -> list[nn.Parameter]:
    """The parameters a `train_modules` entry names: a group keyword or a glob over parameter names."""
    if entry == "embeddings":
        return list(model.get_input_embeddings().parameters())
    if entry == "lm_head":
        return list(model.get_output_embeddings().parameters())
    if entry == "norms":  # RMSNorm, LayerNorm, ... whatever the architecture calls its norms
        return [p for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)]
    return [p for name, p in model.named_parameters() if fnmatch.fnmatchcase(name, entry)]


def attach_modules(model: PreTrainedModel, method) -> PreTrainedModel:
    """Attach afina's LoReFT interventions or bottleneck adapters (fp32, on the model's device)."""
    layers = decoder_layers(model)
    indices = layer_indices(method.layers, len(layers))
    hidden_size = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    if method.name == "loreft":
        module = LoreftInterventions(hidden_size, indices, method.r, method.dropout, method.positions,
                                     method.first, method.last).to(device)
        module.attach(model.base_model, layers)
        model.add_module(LOREFT_ATTR, module)
    elif method.name == "adapter":
        module = BottleneckAdapters(hidden_size, indices, method.bottleneck, method.activation).to(device)
        module.attach(layers)
        model.add_module(ADAPTERS_ATTR, module)
    else:
        raise AfinaError("invalid_method", f"method {method.name!r} attaches no afina module", location="method")
    return model


def layer_indices(spec: list[int] | str, count: int) -> list[int]:
    """`all` or a list of layer indices (negative counts from the end) -> sorted indices."""
    if spec == "all":
        return list(range(count))
    bad = [i for i in spec if not -count <= i < count]
    if bad:
        raise AfinaError("invalid_method", f"layers {bad} do not exist (the model has {count} decoder layers)",
                         location="method.layers")
    return sorted({i % count for i in spec})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM (Llama-style `model.layers` or any
    ModuleList as long as the configured layer count)."""
    model = unwrap(model)
    body = model.base_model
    if isinstance(getattr(body, "layers", None), nn.ModuleList):
        return body.layers
    count = model.config.get_text_config().num_hidden_layers
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise AfinaError("unsupported_architecture", "cannot find the decoder layers of this model", location="model",
                     hint="use lora, which adapts any architecture with linear layers")


def is_quantized(model: nn.Module) -> bool:
    model = unwrap(model)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --- views of a prepared model --------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything the optimizer updates (and checkpoints save)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def attached_module(model: nn.Module) -> LoreftInterventions | BottleneckAdapters | None:
    model = unwrap(model)
    module = getattr(model, LOREFT_ATTR, None)
    return module if module is not None else getattr(model, ADAPTERS_ATTR, None)


def is_prompt_learning(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def body_and_head(model: nn.Module):
    """The transformer body and the output projection of a causal LM prepared by `apply_method`.

    `body(input_ids=..., position_ids=..., use_cache=False, prompt_mask=None, examples=None).last_hidden_state` is
    aligned with input_ids for every method, packed rows (restarting position ids) included.
    `prompt_mask` (bool, like input_ids: True on prompt tokens) is needed by loreft with
    `positions: prompt_ends` only; see `afina.models.loreft.prompt_mask_from_targets`.
    `examples` (`Batch.examples`) lays out the packed examples, shared prefixes included; without it
    examples are read off the position ids.
    """
    hf_model = unwrap(model)
    head = hf_model.get_output_embeddings()
    if is_prompt_learning(model):
        return partial(prompt_learning_body, model), head
    return partial(plain_body, hf_model.base_model, getattr(hf_model, LOREFT_ATTR, None)), head


def plain_body(body: nn.Module, interventions: LoreftInterventions | None, input_ids: torch.Tensor,
               position_ids: torch.Tensor | None = None, use_cache: bool = False,
               prompt_mask: torch.Tensor | None = None, examples: torch.Tensor | None = None):
    if interventions is not None and interventions.enabled:
        refuse_shared_prefixes(examples, "loreft")
        interventions.set_prompt_mask(prompt_mask)
    return body(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache,
                **packed_layout(position_ids, examples))


def shares_prefixes(method) -> bool:
    """Whether rows for this method may share prefixes between examples (`afina.data.packing`): not
    where the method acts at each example's own positions (LoReFT's prompt positions, the virtual
    tokens of prefix and prompt tuning)."""
    return method.name not in ("loreft", "prefix", "prompt")


def model_shares_prefixes(model: nn.Module) -> bool:
    """`shares_prefixes` for a prepared model."""
    return not is_prompt_learning(model) and getattr(unwrap(model), LOREFT_ATTR, None) is None


def refuse_shared_prefixes(examples: torch.Tensor | None, method: str) -> None:
    if examples is not None and bool((examples[:, 3] > 0).any()):
        raise AfinaError("shared_prefixes_unsupported", f"{method} needs each example laid out in full, but the "
                         "batch shares prefixes between examples", hint="collate its rows with share_prefixes off")


@dataclass
class UnpackedRows:
    """Packed examples laid out one per row (right-padded), and where each packed token went."""

    input_ids: torch.Tensor  # (examples, longest)
    valid: torch.Tensor  # (examples, longest) False on padding
    row: torch.Tensor  # (rows, length) the example row of each packed token
    offset: torch.Tensor  # (rows, length) its position inside that row


def unpack_rows(input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> UnpackedRows:
    row, offset, examples, longest = example_slots(position_ids, *input_ids.shape, input_ids.device)
    unpacked = input_ids.new_zeros(examples, longest)  # id 0 on padding: masked out, never read
    unpacked[row, offset] = input_ids
    valid = torch.zeros(examples, longest, dtype=torch.bool, device=input_ids.device)
    valid[row, offset] = True
    return UnpackedRows(unpacked, valid, row, offset)


def prompt_learning_body(peft_model: PeftModel, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                         use_cache: bool = False, prompt_mask: torch.Tensor | None = None,
                         examples: torch.Tensor | None = None) -> BaseModelOutput:
    """prefix / prompt tuning: each packed example runs as its own row behind the virtual tokens,
    exactly as PEFT runs a single example, and the hidden states of the virtual tokens are dropped.

    PEFT's own forward cannot take packed rows: prompt tuning drops position ids (so examples would
    attend to each other) and prefix tuning's cache disables transformers' packed-sequence mask.
    """
    body = peft_model.get_base_model().base_model
    if getattr(peft_model, "_adapters_disabled", False):  # inside base_model() / disable_adapter()
        return plain_body(body, None, input_ids, position_ids, use_cache, examples=examples)
    refuse_shared_prefixes(examples, peft_model.active_peft_config.peft_type.lower())
    rows = unpack_rows(input_ids, position_ids)
    count, longest = rows.input_ids.shape
    virtual = peft_model.active_peft_config.num_virtual_tokens
    attention = torch.cat([rows.valid.new_ones(count, virtual), rows.valid], dim=1)
    if peft_model.active_peft_config.peft_type == "PREFIX_TUNING":
        positions = torch.arange(virtual, virtual + longest, device=input_ids.device).expand(count, -1)
        hidden = body(input_ids=rows.input_ids, attention_mask=attention, position_ids=positions, use_cache=False,
                      **{cache_argument(body): peft_model.get_prompt(count)}).last_hidden_state
    else:
        embeddings = body.get_input_embeddings()(rows.input_ids)
        prompts = peft_model.get_prompt(count).to(embeddings.dtype)
        hidden = body(inputs_embeds=torch.cat([prompts, embeddings], dim=1), attention_mask=attention,
                      use_cache=False).last_hidden_state[:, virtual:]
    return BaseModelOutput(last_hidden_state=hidden[rows.row, rows.offset])


def repair_prompt_learning_generation(model: nn.Module) -> None:
    """Make `generate` of prefix / prompt tuning compute what training computed (transformers 5).

    PEFT (0.21) prepares each generation step under the old cache name `past_key_values`, while
    transformers 5 passes and returns the cache as `cache` and ignores the old name when both are
    set: a prefix-tuned model then generated exactly as its base, and prompt tuning re-inserted its
    virtual tokens at every step. Translating the name around PEFT's preparation fixes both.
    PEFT also drops the position ids of prompt tuning, so in a left-padded batch the prompt's
    tokens sat as many positions further from the virtual tokens as the row had padding; they are
    rebuilt from the attention mask, as transformers does for plain models.
    """
    if not is_prompt_learning(model):
        return
    if cache_argument(model.get_base_model().base_model) != "cache":
        return
    prompt_tuning = model.active_peft_config.peft_type == "PROMPT_TUNING"
    base_prepare = model.base_model_prepare_inputs_for_generation
    peft_prepare = model.prepare_inputs_for_generation

    def base_prepare_old_name(*args, **kwargs) -> dict:
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare_new_name(*args, **kwargs) -> dict:
        model.base_model_prepare_inputs_for_generation = base_prepare_old_name
        try:
            with warnings.catch_warnings():  # PEFT warns that it drops position ids; they are rebuilt below
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        if prompt_tuning:
            positions_from_mask(inputs)
        return inputs

    model.prepare_inputs_for_generation = prepare_new_name


def positions_from_mask(inputs: dict) -> None:
    """Position ids that skip left padding: 0 at each row's first attended token."""
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    tokens = inputs["inputs_embeds"] if inputs.get("inputs_embeds") is not None else inputs["input_ids"]
    positions = mask.long().cumsum(-1) - 1
    inputs["position_ids"] = positions.masked_fill(mask == 0, 1)[:, -tokens.shape[1]:]


def cache_argument(body: nn.Module) -> str:
    """transformers 5 renames `past_key_values` to `cache` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


@contextlib.contextmanager
def base_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block `model` computes exactly what its base computes (logits and generation).

    Raises AfinaError `base_model_unavailable` for full / freeze, whose training changed the base
    weights themselves: load a second copy of the base to compare with.
    """
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
        return
    module = attached_module(model)
    if module is None:
        raise AfinaError("base_model_unavailable", "this model's own weights were trained (full or freeze), so it "
                         "cannot compute its base model", location="method",
                         hint="load a second copy of the base model to compare with")
    enabled, module.enabled = module.enabled, False
    try:
        yield model
    finally:
        module.enabled = enabled
