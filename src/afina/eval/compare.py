"""Evaluate a model on a test split and compare the tuned model with its base."""

from __future__ import annotations

import math

from rich.table import Table

from collections.abc import Callable
from contextlib import AbstractContextManager

from afina.config.gate import metric_base_name
from afina.config.schema import EvalConfig, RunConfig
from afina.data.records import Record
from afina.data.tokenize import Example
from afina.eval.generation import generate_answers
from afina.eval.metrics import per_example_scores, score_generations
from afina.eval.preference import measure_preferences
from afina.training.validation import evaluate_loss


def evaluate_model(model, tokenizer, records: list[Record], examples: list[Example], config: EvalConfig,
                   objective, on_batch=None, loss_per_example: bool = False) -> dict:
    """Loss and perplexity on the test examples (the token `objective`'s), then generation metrics on
    their prompts. `loss_per_example` also measures each example's loss on its own (one forward pass
    each, so only when a gate compares losses)."""
    loss, tokens = evaluate_loss(model, examples, objective, 1, tokenizer.pad_token_id)
    per_example = {}
    if loss_per_example:
        per_example["loss"] = [evaluate_loss(model, [example], objective, 1, tokenizer.pad_token_id)[0]
                               for example in examples]
    if not any(r.reference_answer() for r in records):  # raw text (continued pretraining): nothing to answer
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "predictions": [],
                "references": [], "per_example": per_example}
    references = [r.reference_answer() or "" for r in records]
    predictions = generate_answers(model, tokenizer, records, config.max_new_tokens, config.batch_size, on_batch,
                                   config.json_mode)
    scores = score_generations(predictions, references)
    per_example.update(per_example_scores(predictions, references))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, **scores,
            "predictions": predictions, "references": references, "per_example": per_example}


def evaluate_objective(objective, model, base_scope: Callable[[], AbstractContextManager], tokenizer,
                       records: list[Record], units: list, config: RunConfig) -> tuple[dict, dict]:
    """(base, tuned) metrics on one test split, as the run's objective measures them: loss, perplexity
    and generation metrics for packed-token objectives; preference accuracy, margins and the
    objective's own test metrics (`Objective.add_test_metrics`) for the others. `base_scope()` yields
    the base model (the tuned model with its additions off, or a second copy)."""
    if objective.packs_tokens:
        gated = [config.gate.metric, *(guard.metric for guard in config.gate.guards)]
        per_example = any(metric_base_name(metric) == "loss" for metric in gated)  # one pass per row: only if gated
        with base_scope() as base_view:
            base = evaluate_model(base_view, tokenizer, records, units, config.eval, objective,
                                  loss_per_example=per_example)
        return base, evaluate_model(model, tokenizer, records, units, config.eval, objective,
                                    loss_per_example=per_example)
    base, tuned, measures = measure_preferences(model, base_scope, tokenizer, records, units, config.eval,
                                                config.training.row_length, config.data.max_length,
                                                **objective.measures)
    objective.add_test_metrics(base, tuned, measures)
    return base, tuned


METRIC_ROWS = [("loss", "test loss", False), ("perplexity", "perplexity", False),
               ("preference_accuracy", "preference accuracy", True), ("logp_margin", "log-prob margin", None),
               ("reward_accuracy", "implicit reward accuracy", True), ("reward_margin", "implicit reward margin", None),
               ("completion_reward_accuracy", "kto: reward sign = label", True),
               ("score_margin", "reward score margin", None), ("exact_match", "exact match", True),
               ("json_valid", "valid JSON", True), ("field_accuracy_mean", "field accuracy (mean)", True),
               ("rouge_l", "ROUGE-L", True)]
# (key, label, kind): kind True is a share, higher better; None a number, higher better; False lower is better


def comparison_table(base: dict, tuned: dict, title: str = "base vs tuned on the test split") -> Table:
    """Side-by-side metrics; higher is better except for loss and perplexity. A metric only the
    tuned model has (the implicit reward against its base) shows in the tuned column alone."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    rows = list(METRIC_ROWS) + [(f"field:{key}", f"  {key}", True) for key in tuned.get("field_accuracy", {})]
    for key, label, kind in rows:
        b, t = _metric(base, key), _metric(tuned, key)
        if t is None:
            continue
        fmt, change_fmt = ("{:.1%}", "{:+.1%}") if kind is True else ("{:.3f}", "{:+.3f}")
        if b is None:
            table.add_row(label, "", fmt.format(t), "")
            continue
        better = t < b if kind is False else t > b
        style = "green" if better else ("red" if t != b else "")
        change = change_fmt.format(t - b)
        table.add_row(label, fmt.format(b), fmt.format(t), f"[{style}]{change}[/]" if style else change)
    return table


def _metric(result: dict, key: str) -> float | None:
    if key.startswith("field:"):
        return result.get("field_accuracy", {}).get(key[6:])
    return result.get(key)


def examples_table(records: list[Record], base: dict, tuned: dict, count: int = 3) -> Table:
    table = Table(title=f"{count} test examples", show_lines=True)
    table.add_column("input", max_width=48)
    table.add_column("expected", max_width=30)
    table.add_column("base", max_width=30)
    table.add_column("tuned", max_width=30)
    for index, record in enumerate(records[:count]):
        prompt = record.prompt_messages()[-1]["content"] if record.prompt_messages() else ""
        table.add_row(prompt, tuned["references"][index], base["predictions"][index], tuned["predictions"][index])
    return table
