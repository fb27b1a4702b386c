"""Evaluation's generation: batched greedy answers equal one-at-a-time ones, and json_mode makes
every answer a JSON object even from a model that never learned to write one."""

import json

import torch

from afina.data.formats import normalize_row
from afina.eval.generation import generate_answers
from afina.models.loading import load_model


def records(rows):
    return [normalize_row(row, i + 1)[0] for i, row in enumerate(rows)]


def test_batched_answers_equal_one_at_a_time(tiny_model_dir, tiny_tokenizer, ticket_rows):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir))
    test = records(ticket_rows[:6])
    batched = generate_answers(model, tiny_tokenizer, test, max_new_tokens=12, batch_size=6)
    alone = [generate_answers(model, tiny_tokenizer, [record], max_new_tokens=12, batch_size=1)[0] for record in test]
    assert batched == alone


def test_json_mode_answers_always_parse(tiny_model_dir, tiny_tokenizer, ticket_rows):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir))
    test = records(ticket_rows[:6])
    free = generate_answers(model, tiny_tokenizer, test, max_new_tokens=24, batch_size=6)
    constrained = generate_answers(model, tiny_tokenizer, test, max_new_tokens=24, batch_size=6, json_mode=True)
    assert not any(isinstance(_parse(a), dict) for a in free)  # a random model writes no JSON of itself
    assert all(isinstance(_parse(a), dict) for a in constrained), constrained


def _parse(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
