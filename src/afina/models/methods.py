"""Prepare a loaded model for the configured method, and give the loop, the loss and evaluation the
views of it they need.

    check_method_supported(method)            # before anything loads: qlora / 8-bit need CUDA
    model = load_model(..., quantization_config=quantization_config(method))
    model = apply_method(model, method)       # freeze, attach, enable gradient checkpointing
    body, head = body_and_head(model)         # hidden states aligned with input_ids; output projection
    with base_model(model): ...               # the same model computing exactly what its base computes

What a method implies (frozen base, shared prefixes, CUDA, merging) is a property of its config
class (`afina.config.methods`). `full` and `freeze` train the base weights; every other method
freezes them and trains a PEFT adapter or one of afina's modules (`loreft`, `adapter`) beside them.
prefix and prompt tuning run packed rows through `afina.models.prompt_learning`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
from collections.abc import Iterator
from functools import partial

import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from afina.config.methods import AdapterMethod, AnyMethod, LoreftMethod
from afina.errors import AfinaError
from afina.models.attention import packed_layout
from afina.models.bottleneck import BottleneckAdapters
from afina.models.fused_layers import fuse_layers
from afina.models.fused_lora import fuse_lora_layers
from afina.models.loreft import LoreftInterventions
from afina.models.prompt_learning import (prompt_learning_body, refuse_shared_prefixes,
                                          repair_prompt_learning_generation)

LOREFT_ATTR = "afina_loreft"  # where afina's own modules hang on the model
ADAPTERS_ATTR = "afina_adapters"


# --- what the machine must offer ------------------------------------------------------------------

def check_method_supported(method: AnyMethod) -> None:
    """Refuse, before anything loads, a method this machine cannot run."""
    if not method.needs_cuda:
        return
    what = f"{method.name} (a {method.base_bits}-bit base)"
    if not torch.cuda.is_available():
        raise AfinaError("cuda_required", f"{what} needs a CUDA GPU and none is available", location="method",
                         hint="use method: lora, which trains the same adapter on an unquantized base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AfinaError("cuda_required", f"{what} needs the bitsandbytes package", location="method",
                         hint="pip install bitsandbytes, or use method: lora")


def quantization_config(method: AnyMethod):
    """The `quantization_config` to load the base with (None: load it unquantized)."""
    from transformers import BitsAndBytesConfig

    if method.base_bits == 4:
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[method.compute_dtype]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=method.double_quant, bnb_4bit_compute_dtype=compute)
    if method.base_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None
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
    if method.kind == "weights":
        return freeze_all_but(model, method) if method.name == "freeze" else model.requires_grad_(True)
    if method.kind == "peft":
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
    if isinstance(method, LoreftMethod):
        module = LoreftInterventions(hidden_size, indices, method.r, method.dropout, method.positions,
                                     method.first, method.last).to(device)
        module.attach(model.base_model, layers)
        model.add_module(LOREFT_ATTR, module)
    elif isinstance(method, AdapterMethod):
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
def model_shares_prefixes(model: nn.Module) -> bool:
    """`shares_prefixes` for a prepared model."""
    return not is_prompt_learning(model) and getattr(unwrap(model), LOREFT_ATTR, None) is None
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
