"""Base-vs-tuned evaluation for the preference objectives (dpo, orpo, kto, reward) on the test split.

For each pair, a model prefers the chosen answer when its log-probability margin
log p(chosen | prompt) - log p(rejected | prompt) is positive: `preference_accuracy` is the share of
such pairs, `logp_margin` the mean margin. The tuned model is also measured against its base as
reference: the implicit reward margin beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)),
positive when tuning moved probability towards the chosen answer (`reward_accuracy`, TRL's
rewards/accuracies). A reward model's `preference_accuracy` uses its scores instead; its base, which
has no reward head, is measured by log-probabilities. Generation metrics compare greedy answers with
the chosen (or desirable) answer. Each objective adds its own loss and implicit rewards to these
(`Objective.add_test_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from afina.config.schema import EvalConfig
from afina.data.preference import collate_pairs, collate_sequences, mismatched_completions, tokenize_preferences
from afina.data.records import Record
from afina.eval.generation import generate_answers
from afina.eval.metrics import per_example_scores, score_generations
from afina.models.logprobs import reward_scores, sequence_logps
from afina.training.objectives import share


@torch.no_grad()
def pair_measures(model, pairs: list, row_length: int, pad_id: int, batch_size: int, scores: bool = False) -> dict:
    """Summed answer log-probs and answer token counts of every pair (and reward scores if asked)."""
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list] = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": [], "score": []}
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], row_length, pad_id).to(device)
        sums, counts = sequence_logps(model, batch)
        values = (*sums.chunk(2), *counts.chunk(2))
        for key, value in zip(("chosen", "rejected", "chosen_tokens", "rejected_tokens"), values):
            parts[key].append(value.cpu())
        if scores:
            parts["score"].append(reward_scores(model, batch).cpu())
    return {key: torch.cat(values) for key, values in parts.items() if values}


@torch.no_grad()
def completion_measures(model, examples: list, row_length: int, pad_id: int, max_length: int,
                        batch_size: int) -> dict:
    """Summed answer log-probs of KTO completions and of their mismatched completions."""
    model.eval()
    device = next(model.parameters()).device
    mismatched = mismatched_completions([e.completion for e in examples], max_length)
    logps, other = [], []
    for start in range(0, len(examples), batch_size):
        part = [e.completion.example() for e in examples[start : start + batch_size]]
        logps.append(sequence_logps(model, collate_sequences(part, row_length, pad_id).to(device))[0].cpu())
        part = [c.example() for c in mismatched[start : start + batch_size]]
        other.append(sequence_logps(model, collate_sequences(part, row_length, pad_id).to(device))[0].cpu())
    return {"logps": torch.cat(logps), "mismatched": torch.cat(other),
            "desirable": torch.tensor([e.desirable for e in examples], dtype=torch.bool)}


@dataclass
class PreferenceMeasures:
    """What `measure_preferences` measured of the base and the tuned model, for the objectives' own metrics."""

    pairs: int
    base_pairs: dict | None = None  # chosen, rejected, chosen_tokens, rejected_tokens (tuned reward model: score)
    tuned_pairs: dict | None = None
    base_completions: dict | None = None  # logps, mismatched, desirable (KTO completions)
    tuned_completions: dict | None = None


def measure_preferences(model, base_scope: Callable[[], AbstractContextManager], tokenizer, records: list[Record],
                        units: list, config: EvalConfig, row_length: int, max_length: int, scores: bool = False,
                        completions: bool = False, generate: bool = True) -> tuple[dict, dict, PreferenceMeasures]:
    """(base, tuned) metrics common to the preference objectives, and the measures behind them.

    `base_scope()` yields the base model (the tuned model with its additions off, or a second copy).
    Pairs give preference accuracy and log-prob margins; `scores` also reads the tuned model's reward
    scores, `completions` measures `units` as KTO examples, `generate` scores greedy answers."""
    pad_id, size = tokenizer.pad_token_id, config.batch_size
    pair_records = [r for r in records if r.kind == "preference"]
    pairs = tokenize_preferences(pair_records, tokenizer, max_length) if pair_records else []
    measures = PreferenceMeasures(len(pairs))
    with base_scope() as base_view:
        base = {"examples": len(records)}
        if pairs:
            measures.base_pairs = pair_measures(base_view, pairs, row_length, pad_id, size)
        if completions:
            measures.base_completions = completion_measures(base_view, units, row_length, pad_id, max_length, size)
        if generate:
            base.update(generation_metrics(base_view, tokenizer, records, config))
    tuned = {"examples": len(records)}
    if pairs:
        measures.tuned_pairs = pair_measures(model, pairs, row_length, pad_id, size, scores=scores)
    if completions:
        measures.tuned_completions = completion_measures(model, units, row_length, pad_id, max_length, size)
    if generate:
        tuned.update(generation_metrics(model, tokenizer, records, config))
    if pairs:
        for result, measured in ((base, measures.base_pairs), (tuned, measures.tuned_pairs)):
            margin = measured["chosen"] - measured["rejected"]
            result.update(margin_metrics(measured["chosen"], measured["rejected"]), pairs=len(pairs))
            result.setdefault("per_example", {}).update(preference_accuracy=(margin > 0).float().tolist(),
                                                        logp_margin=margin.tolist())
    return base, tuned, measures


def margin_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    margin = chosen - rejected
    return {"preference_accuracy": share(margin > 0), "logp_margin": float(margin.mean())}


def generation_metrics(model, tokenizer, records: list[Record], config: EvalConfig) -> dict:
    """Greedy answers scored against the chosen (or desirable) answer of each record that has one."""
    answered = [r for r in records if r.reference_answer()]
    if not answered:
        return {}
    predictions = generate_answers(model, tokenizer, answered, config.max_new_tokens, config.batch_size,
                                   json_mode=config.json_mode)
    references = [r.reference_answer() for r in answered]
    scores = score_generations(predictions, references)
    scores["generated"] = scores.pop("examples")
    return {**scores, "predictions": predictions, "references": references,
            "per_example": per_example_scores(predictions, references)}
