"""dpo, orpo, kto and reward through the one training loop: runs, resume, evaluation, refusals."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from afina.config.loading import validate_config
from afina.errors import AfinaError
from afina.models.methods import trainable_parameters
from afina.pipeline import stages as pipeline
from afina.training.checkpoints import latest_checkpoint
from tests.conftest import write_jsonl

QUIET = Console(quiet=True)
CATEGORIES = ["network", "printer", "access", "email"]


def preference_rows(count=40):
    """Learnable pairs: the chosen answer is the ticket's JSON, the rejected one the same JSON cut short,
    which the random base prefers (fewer tokens, so a higher summed log-probability)."""
    rows = []
    for i in range(count):
        category = CATEGORIES[i % 4]
        rows.append({"prompt": f"ticket {i}: the {category} is broken",
                     "chosen": json.dumps({"category": category, "priority": "high"}),
                     "rejected": json.dumps({"category": category})})
    return rows


def unpaired_rows(count=40):
    rows = []
    for i, pair in enumerate(preference_rows(count)):
        answer = pair["chosen"] if i % 2 == 0 else pair["rejected"]
        rows.append({"prompt": pair["prompt"], "completion": answer, "label": i % 2 == 0})
    return rows


def run_config(model_dir, path, objective, method=None, **training):
    values = {"max_steps": 24, "row_length": 256, "rows_per_batch": 4, "gradient_accumulation": 1,
              "learning_rate": 2e-2, "eval_every": 4, "save_every": 4, "keep_checkpoints": 10, "precision": "fp32",
              "warmup_ratio": 0.0}
    return validate_config({"model": str(model_dir), "data": {"path": str(path), "max_length": 128},
                            "method": method or {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                            "objective": objective, "training": values | training,
                            "eval": {"max_new_tokens": 8, "batch_size": 8}})


def data_file(tmp_path, objective):
    rows = unpaired_rows() if objective == "kto" else preference_rows()
    return write_jsonl(tmp_path / f"{objective}.jsonl", rows)


def capture_model(monkeypatch):
    """Keep the model `run_training` builds, and its parameters right after the method was applied."""
    captured = {}
    real = pipeline.apply_method

    def apply_and_keep(model, method):
        prepared = real(model, method)
        captured.update(model=prepared, before={n: p.detach().clone() for n, p in prepared.named_parameters()})
        return prepared

    monkeypatch.setattr(pipeline, "apply_method", apply_and_keep)
    return captured


# a small DPO beta: DPO stops once the margin *relative to the base* is large, and the base's margin
# here starts far below zero
@pytest.mark.parametrize("objective", [{"name": "dpo", "beta": 0.02}, {"name": "orpo", "beta": 0.5},
                                       {"name": "kto", "beta": 0.5}, {"name": "reward"}], ids=lambda o: o["name"])
def test_a_short_run_lowers_the_objective_and_beats_the_base(objective, tiny_model_dir, tmp_path, monkeypatch):
    name = objective["name"]
    config = run_config(tiny_model_dir, data_file(tmp_path, name), objective)
    captured = capture_model(monkeypatch)
    run_dir, result = pipeline.run_training(config, QUIET)
    assert result.status == "completed" and result.steps == 24

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [m["loss"] for m in metrics if m["split"] == "validation"]
    assert len(validation) == 6 and validation[-1] < validation[0]

    model, before = captured["model"], captured["before"]
    trainable = trainable_parameters(model)
    for parameter_name, parameter in model.named_parameters():
        if parameter_name not in before:  # the reward head, attached after the method
            assert name == "reward" and parameter_name in trainable
        elif parameter_name in trainable:
            assert not torch.equal(parameter, before[parameter_name]), f"{parameter_name} did not change"
        else:
            assert torch.equal(parameter, before[parameter_name]), f"frozen {parameter_name} changed"

    report = pipeline.evaluate_run(run_dir, QUIET)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["objective"] == name and saved["tuned"] == report["tuned"]
    base, tuned = report["base"], report["tuned"]
    if name == "kto":  # unpaired rows: no pairs to rank, but the implicit rewards follow the labels
        assert tuned["completion_reward_accuracy"] > 0.5 and tuned["loss"] < base["loss"]
    else:
        assert tuned["preference_accuracy"] > base["preference_accuracy"]
        assert tuned["loss"] < base.get("loss", float("inf"))
    if name in ("dpo", "orpo"):
        assert tuned["reward_accuracy"] > 0.5 and tuned["reward_margin"] > 0
        assert "rouge_l" in tuned and "rouge_l" in base  # generation against the chosen answer
    if name == "reward":
        from afina.training.reward import load_reward_model, score

        scorer = load_reward_model(run_dir)
        good = score(scorer, "ticket 3: the email is broken", json.dumps({"category": "email", "priority": "high"}))
        assert good > score(scorer, "ticket 3: the email is broken", json.dumps({"category": "email"}))


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto", "reward"])
def test_resume_from_a_checkpoint_gives_the_same_weights(name, tiny_model_dir, tmp_path):
    config = run_config(tiny_model_dir, data_file(tmp_path, name), {"name": name}, max_steps=8, eval_every=4,
                        gradient_accumulation=2, rows_per_batch=2)
    straight_dir, _ = pipeline.run_training(config, QUIET)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir / "checkpoints" / "step-0000004", resumed_dir / "checkpoints" / "step-0000004")
    torch.manual_seed(1234)
    _, result = pipeline.run_training(config, QUIET, resume_dir=resumed_dir)
    assert result.resumed_from == 4 and result.steps == 8
    straight = load_file(latest_checkpoint(straight_dir / "checkpoints").path / "trainable.safetensors")
    resumed = load_file(latest_checkpoint(resumed_dir / "checkpoints").path / "trainable.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_dpo_and_kto_need_a_frozen_base_and_kto_two_completions_a_step(tiny_model_dir, tmp_path, afina_home):
    for name in ("dpo", "kto"):
        config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(data_file(tmp_path, name))},
                                  "method": "full", "objective": name})
        with pytest.raises(AfinaError) as error:
            pipeline.run_training(config, QUIET)
        assert error.value.code == "reference_model_unavailable"
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(data_file(tmp_path, "kto"))},
                              "objective": "kto"})
    with pytest.raises(AfinaError) as error:
        pipeline.run_training(config, QUIET)
    assert error.value.code == "batch_too_small" and not (afina_home / "runs").exists()


def test_preference_objectives_refuse_chat_rows(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(10)])
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(path)}, "objective": "dpo"})
    with pytest.raises(AfinaError) as error:
        pipeline.run_training(config, QUIET)
    assert error.value.code == "wrong_data_for_objective"


def test_orpo_trains_a_full_model(tiny_model_dir, tmp_path):
    config = run_config(tiny_model_dir, data_file(tmp_path, "orpo"), {"name": "orpo"}, method={"name": "full"},
                        max_steps=4, learning_rate=1e-3)
    run_dir, result = pipeline.run_training(config, QUIET)
    assert result.status == "completed" and (run_dir / "adapter" / "trained.safetensors").is_file()


def test_objective_settings_are_checked():
    with pytest.raises(AfinaError) as error:
        validate_config({"data": {"path": "x"}, "objective": {"name": "sft", "beta": 0.2}})
    assert "beta" in error.value.message
    with pytest.raises(AfinaError):
        validate_config({"data": {"path": "x"}, "objective": {"name": "dpo", "label_smoothing": 0.7}})
    with pytest.raises(AfinaError):
        validate_config({"data": {"path": "x"}, "objective": {"name": "kto", "desirable_weight": 0}})
    config = validate_config({"data": {"path": "x"}, "objective": {"name": "reward", "margin": 0.5,
                                                                   "center_coefficient": 0.01}})
    assert config.objective.margin == 0.5


def test_a_mixture_draws_tasks_by_weight_and_is_evaluated_per_task(tiny_model_dir, tmp_path, ticket_rows):
    from tests.conftest import chat_row

    tickets = write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    replay = write_jsonl(tmp_path / "replay.jsonl", [chat_row(f"hello how are you {i}", "la impresora no imprime")
                                                     for i in range(40)])
    config = validate_config({
        "model": str(tiny_model_dir), "data": {"max_length": 128},
        "datasets": {"tasks": {"tickets": {"path": str(tickets), "weight": 3}, "replay": {"path": str(replay),
                                                                                            "weight": 1}}},
        "training": {"max_steps": 4, "row_length": 256, "learning_rate": 1e-2, "eval_every": 2, "precision": "fp32"},
        "eval": {"max_new_tokens": 8, "max_examples": 3}})
    run_dir, result = pipeline.run_training(config, QUIET)
    drawn = json.loads((run_dir / "data_report.json").read_text())["drawn"]
    assert result.steps == 4 and 0.6 < drawn["tickets"] / (drawn["tickets"] + drawn["replay"]) < 0.9
    report = pipeline.evaluate_run(run_dir, QUIET)
    assert set(report["tasks"]) == {"tickets", "replay"}
    for task in report["tasks"].values():
        assert {"loss", "rouge_l", "exact_match"} <= set(task["tuned"]) and len(task["tuned"]["predictions"]) == 3
    assert report["tuned"]["loss"] == pytest.approx(sum(t["tuned"]["loss"] for t in report["tasks"].values()) / 2)
    assert "json_valid" in report["tasks"]["tickets"]["tuned"]  # each task keeps its own generation metrics

    for wrong in ({"data": {"path": str(tickets)}}, {"data": {}}):
        with pytest.raises(AfinaError):
            validate_config({**wrong, **({"datasets": config.datasets.model_dump()} if wrong["data"] else {})})
    with pytest.raises(AfinaError):  # weights for some tasks only
        validate_config({"datasets": {"tasks": {"a": {"path": "a", "weight": 1}, "b": {"path": "b"}}}})
