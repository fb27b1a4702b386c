"""A Hugging Face model directory: safetensors weights, tokenizer, chat template, generation config."""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from afina.errors import AfinaError


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the tuned model ends an answer with: afina trains every answer to end in eos."""
    if tokenizer.eos_token_id is None:
        raise AfinaError("export_unsupported", "the tokenizer has no end-of-turn (eos) token", location="tokenizer",
                         hint="a model without an eos token never stops; use a chat model's tokenizer")
    return tokenizer.eos_token_id


def write_hf_directory(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """Write `model` (merged) and `tokenizer` to `directory` as a model transformers, vLLM and TGI load.

    generation_config.json names the end-of-turn token as eos, so every runtime that reads it stops
    where the tuned model stops; greedy decoding is the default, as in afina's evaluation."""
    if not tokenizer.chat_template:
        raise AfinaError("export_unsupported", "the tokenizer has no chat template", location="tokenizer",
                         hint="export a chat model; a base model's answers depend on how a runtime formats prompts")
    directory.mkdir(parents=True, exist_ok=True)
    model.config.name_or_path = model.name_or_path
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    eos = end_of_turn_id(tokenizer)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                     else eos, bos_token_id=tokenizer.bos_token_id, do_sample=False).save_pretrained(directory)
    return directory
