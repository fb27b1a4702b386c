import pytest

from afina.eval.metrics import parse_json_object, rouge_l, score_generations


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("", "x") == 0.0


def test_json_metrics_per_field():
    refs = ['{"category": "network", "priority": "high"}'] * 3
    preds = ['{"category": "network", "priority": "low"}', "```json\n{\"category\": \"email\", \"priority\": \"high\"}\n```",
             "not json"]
    scores = score_generations(preds, refs)
    assert scores["json_valid"] == pytest.approx(2 / 3)
    assert scores["field_accuracy"] == {"category": pytest.approx(1 / 3), "priority": pytest.approx(1 / 3)}
    assert scores["exact_match"] == 0.0
    assert parse_json_object("[1]") is None
