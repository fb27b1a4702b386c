"""Batched greedy generation for evaluation."""

from __future__ import annotations

import torch

from afina.data.records import Record
from afina.data.tokenize import render_prompt


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int,
                     on_batch=None) -> list[str]:
    """Greedy answers to each record's prompt (the conversation before its final answer)."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [render_prompt(tokenizer, r.prompt_messages()) for r in records[start : start + batch_size]]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        if on_batch:
            on_batch(len(prompts))
    model.train(was_training)
    return [a.strip() for a in answers]
