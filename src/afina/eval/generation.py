"""Batched greedy generation for evaluation."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from afina.data.records import Record
from afina.data.tokenize import render_prompt
from afina.models.json_constraint import JsonObjectLogitsProcessor


class RowJsonObjects(LogitsProcessor):
    """JSON-object constrained decoding for a batch: one `JsonObjectLogitsProcessor` per row."""

    def __init__(self, tokenizer, rows: int, max_new_tokens: int):
        self.rows = [JsonObjectLogitsProcessor(tokenizer, max_new_tokens) for _ in range(rows)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return torch.cat([row(input_ids[i : i + 1], scores[i : i + 1]) for i, row in enumerate(self.rows)])


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int,
                     on_batch=None, json_mode: bool = False) -> list[str]:
    """Greedy answers to each record's prompt (the conversation before its final answer); with
    `json_mode` each answer is constrained to a JSON object."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [render_prompt(tokenizer, r.prompt_messages()) for r in records[start : start + batch_size]]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        constraint = [RowJsonObjects(tokenizer, len(prompts), max_new_tokens)] if json_mode else None
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                logits_processor=constraint)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        if on_batch:
            on_batch(len(prompts))
    model.train(was_training)
    return [a.strip() for a in answers]
