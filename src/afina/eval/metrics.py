"""Generation metrics: exact match, JSON validity and per-field accuracy, ROUGE-L."""

from __future__ import annotations

import json


def parse_json_object(text: str) -> dict | None:
    """The JSON object in `text`, tolerating surrounding whitespace or a fenced code block."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence)."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generations(predictions: list[str], references: list[str]) -> dict:
    """Aggregate metrics; JSON metrics are computed over the rows whose reference is a JSON object."""
    exact = [p.strip() == r.strip() for p, r in zip(predictions, references)]
    scores: dict = {"examples": len(references), "exact_match": _mean(exact),
                    "rouge_l": _mean([rouge_l(p, r) for p, r in zip(predictions, references)])}
    pairs = [(parse_json_object(p), parse_json_object(r)) for p, r in zip(predictions, references)]
    json_pairs = [(p, r) for p, r in pairs if r is not None]
    if json_pairs:
        scores["json_valid"] = _mean([p is not None for p, _ in json_pairs])
        fields = sorted({key for _, r in json_pairs for key in r})
        per_field = {key: _mean([p is not None and p.get(key) == r.get(key) for p, r in json_pairs if key in r])
                     for key in fields}
        scores["field_accuracy"] = per_field
        scores["field_accuracy_mean"] = _mean(list(per_field.values()))
    return scores


def _mean(values: list) -> float:
    return sum(float(v) for v in values) / len(values) if values else 0.0


def per_example_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each metric's score per test row, in row order: what the gate compares pair by pair.

    JSON metrics cover the rows whose reference is a JSON object (the same rows for base and tuned);
    `field:<key>` the rows whose reference has that key; `field_accuracy_mean` is a row's share of
    its reference's fields answered right."""
    scores: dict[str, list[float]] = {
        "exact_match": [float(p.strip() == r.strip()) for p, r in zip(predictions, references)],
        "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)]}
    pairs = [(parse_json_object(p), parse_json_object(r)) for p, r in zip(predictions, references)]
    json_pairs = [(p, r) for p, r in pairs if r is not None]
    if json_pairs:
        scores["json_valid"] = [float(p is not None) for p, _ in json_pairs]
        scores["field_accuracy_mean"] = [_mean([p is not None and p.get(k) == v for k, v in r.items()])
                                         for p, r in json_pairs]
        for key in sorted({key for _, r in json_pairs for key in r}):
            scores[f"field:{key}"] = [float(p is not None and p.get(key) == r[key]) for p, r in json_pairs if key in r]
    return scores
