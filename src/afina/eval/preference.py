"""Base-vs-tuned evaluation for the preference objectives (dpo, orpo, kto, reward) on the test split.

For each pair, a model prefers the chosen answer when its log-probability margin
log p(chosen | prompt) - log p(rejected | prompt) is positive: `preference_accuracy` is the share of
such pairs, `logp_margin` the mean margin. The tuned model is also measured against its base as
reference: the implicit reward margin beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)),
positive when tuning moved probability towards the chosen answer (`reward_accuracy`, TRL's
rewards/accuracies). A reward model's `preference_accuracy` uses its scores instead; its base, which
has no reward head, is measured by log-probabilities. Generation metrics compare greedy answers with
the chosen (or desirable) answer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from afina.config.schema import RunConfig
from afina.data.preference import collate_pairs, collate_sequences, mismatched_completions, tokenize_preferences
from afina.data.records import Record
from afina.eval.generation import generate_answers
from afina.eval.metrics import score_generations
from afina.training.objectives import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, reward_loss, sequence_logps
from afina.training.steps import reward_scores


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


def evaluate_preferences(model, base_scope: Callable[[], AbstractContextManager], tokenizer, records: list[Record],
                         units: list, config: RunConfig) -> tuple[dict, dict]:
    """(base, tuned) metrics of a preference run. `base_scope()` yields the base model (the tuned
    model with its additions off, or a second copy); `units` are the test split tokenized for the
    objective (pairs, or KTO examples)."""
    objective, name = config.objective, config.objective.name
    row_length, pad_id, size = config.training.row_length, tokenizer.pad_token_id, config.eval.batch_size
    pair_records = [r for r in records if r.kind == "preference"]
    pairs = tokenize_preferences(pair_records, tokenizer, config.data.max_length) if pair_records else []
    with base_scope() as base_view:
        base_pairs = pair_measures(base_view, pairs, row_length, pad_id, size) if pairs else None
        base_kto = (completion_measures(base_view, units, row_length, pad_id, config.data.max_length, size)
                    if name == "kto" else None)
        base = {"examples": len(records)}
        if name != "reward":  # a reward model answers with scores, not text
            base.update(generation_metrics(base_view, tokenizer, records, config))
    tuned_pairs = pair_measures(model, pairs, row_length, pad_id, size, scores=name == "reward") if pairs else None
    tuned_kto = (completion_measures(model, units, row_length, pad_id, config.data.max_length, size)
                 if name == "kto" else None)
    tuned = {"examples": len(records)}
    if name != "reward":
        tuned.update(generation_metrics(model, tokenizer, records, config))
    if base_pairs is not None:
        base.update(margin_metrics(base_pairs["chosen"], base_pairs["rejected"]), pairs=len(pairs))
        tuned.update(margin_metrics(tuned_pairs["chosen"], tuned_pairs["rejected"]), pairs=len(pairs))
        if name in ("dpo", "orpo", "kto"):
            implicit = objective.beta * ((tuned_pairs["chosen"] - base_pairs["chosen"])
                                         - (tuned_pairs["rejected"] - base_pairs["rejected"]))
            tuned.update(reward_accuracy=share(implicit > 0), reward_margin=float(implicit.mean()))
    count = len(pairs)
    if name == "dpo":
        base["loss"] = float(dpo_loss(base_pairs["chosen"], base_pairs["rejected"], base_pairs["chosen"],
                                      base_pairs["rejected"], objective.beta, objective.label_smoothing)[0]) / count
        tuned["loss"] = float(dpo_loss(tuned_pairs["chosen"], tuned_pairs["rejected"], base_pairs["chosen"],
                                       base_pairs["rejected"], objective.beta, objective.label_smoothing)[0]) / count
    elif name == "orpo":
        for result, measured in ((base, base_pairs), (tuned, tuned_pairs)):
            means = [measured[k] / measured[f"{k}_tokens"].clamp(min=1) for k in ("chosen", "rejected")]
            result["loss"] = float(orpo_loss(*means, beta=objective.beta)[0]) / count
    elif name == "reward":
        chosen, rejected = tuned_pairs["score"].chunk(2)
        margin = torch.full_like(chosen, objective.margin) if objective.margin else None
        tuned.update(loss=float(reward_loss(chosen, rejected, margin, objective.center_coefficient)) / count,
                     preference_accuracy=share(chosen > rejected), score_margin=float((chosen - rejected).mean()),
                     accuracy_from="reward scores")
        base["accuracy_from"] = "log-prob margin (the base has no reward head)"
    elif name == "kto":
        for result, measured in ((base, base_kto), (tuned, tuned_kto)):
            kl = kto_kl_estimate(measured["mismatched"], base_kto["mismatched"])
            result["loss"] = float(kto_loss(measured["logps"], base_kto["logps"], measured["desirable"], kl,
                                            objective.beta, objective.desirable_weight,
                                            objective.undesirable_weight)[0]) / len(units)
        rewards = objective.beta * (tuned_kto["logps"] - base_kto["logps"])
        desirable = tuned_kto["desirable"]
        tuned.update(completion_reward_accuracy=share(torch.where(desirable, rewards > 0, rewards < 0)),
                     completions=len(units))
    return base, tuned


def margin_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    margin = chosen - rejected
    return {"preference_accuracy": share(margin > 0), "logp_margin": float(margin.mean())}


def generation_metrics(model, tokenizer, records: list[Record], config: RunConfig) -> dict:
    """Greedy answers scored against the chosen (or desirable) answer of each record that has one."""
    answered = [r for r in records if r.reference_answer()]
    if not answered:
        return {}
    predictions = generate_answers(model, tokenizer, answered, config.eval.max_new_tokens, config.eval.batch_size)
    references = [r.reference_answer() for r in answered]
    scores = score_generations(predictions, references)
    scores["generated"] = scores.pop("examples")
    return {**scores, "predictions": predictions, "references": references}


def share(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0
