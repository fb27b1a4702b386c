"""Prefix and prompt tuning on packed rows: PEFT runs one example per row behind its virtual tokens,
so afina lays each packed example out as its own row, runs the body as PEFT would, and puts the
hidden states back where the packed tokens were. Also repairs PEFT's generation for transformers 5.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from afina.errors import AfinaError
from afina.models.attention import packed_layout
from afina.models.loreft import example_slots


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
        return body(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache,
                    **packed_layout(position_ids, examples))
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

    PEFT up to 0.21 prepares each generation step under the old cache name `past_key_values`, while
    transformers 5 passes and returns the cache as `cache` and ignores the old name when both are
    set: a prefix-tuned model then generated exactly as its base, and prompt tuning re-inserted its
    virtual tokens at every step. Where PEFT still uses the old name, translating it around PEFT's
    preparation fixes both; PEFT 0.22 reads the new name itself.
    PEFT also drops the position ids of prompt tuning, so in a left-padded batch the prompt's
    tokens sat as many positions further from the virtual tokens as the row had padding; they are
    rebuilt from the attention mask, as transformers does for plain models.
    """
    if not (isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning):
        return
    if cache_argument(model.get_base_model().base_model) != "cache":
        return
    prompt_tuning = model.active_peft_config.peft_type == "PROMPT_TUNING"
    translate = peft_cache_name() != "cache"
    if not (translate or prompt_tuning):
        return
    base_prepare = model.base_model_prepare_inputs_for_generation
    peft_prepare = model.prepare_inputs_for_generation

    def base_prepare_old_name(*args, **kwargs) -> dict:
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare_new_name(*args, **kwargs) -> dict:
        if translate:
            model.base_model_prepare_inputs_for_generation = base_prepare_old_name
        try:
            with warnings.catch_warnings():  # PEFT warns that it drops position ids; they are rebuilt below
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if translate and "past_key_values" in inputs:
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


def peft_cache_name() -> str:
    """The cache name PEFT prepares generation under: `cache` from PEFT 0.22, `past_key_values` before."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:
        return "past_key_values"
    return get_transformers_cache_name()
