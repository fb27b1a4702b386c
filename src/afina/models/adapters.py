"""Prepare a loaded model for training with the configured method."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from afina.config.schema import LoraMethod


def apply_method(model: PreTrainedModel, method: LoraMethod) -> PeftModel:
    """Freeze the base and attach a LoRA adapter (PEFT)."""
    config = LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                        target_modules=method.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def body_and_head(model):
    """The transformer body (hidden states) and the output projection of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model, base.get_output_embeddings()
