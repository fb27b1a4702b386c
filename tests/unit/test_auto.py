"""`auto` training values: the documented rule for small, medium and large data, explicit values kept,
and a run directory that holds numbers."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from afina.config.methods import FullMethod, LoraMethod
from afina.config.schema import TrainingConfig
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.training.auto import choose_hyperparameters, count_items, resolve_auto

AUTO = {"epochs": "auto", "learning_rate": "auto", "gradient_accumulation": "auto"}


def pairs(count: int) -> list:
    """Units that are one item each, as preference pairs are."""
    return [object() for _ in range(count)]


def examples(count: int, length: int) -> list[Example]:
    """Chat examples of `length` tokens with nothing shared, the last half trained."""
    return [Example([1000 + i] + [7] * (length - 1), [False] * (length // 2) + [True] * (length - length // 2), i)
            for i in range(count)]


def test_small_data_gets_the_smallest_step_and_more_epochs_for_enough_steps():
    values, reasons = choose_hyperparameters(pairs(60), LoraMethod(), TrainingConfig(**AUTO))
    # 8 examples per step at least; 8 steps an epoch; 100 steps want 13 epochs, capped at 10
    assert values == {"gradient_accumulation": 8, "epochs": 10.0, "learning_rate": 2e-4}
    assert "at most 10 epochs" in reasons["epochs"]


def test_packed_rows_count_as_many_examples_per_step():
    """The issue's case: short examples, ~11 to a 2048-token row. One row per step, and 3 epochs
    once the data gives 100 steps in them; fewer examples, more epochs."""
    training = TrainingConfig(**AUTO, row_length=2048)
    units = examples(480, 180)
    items = count_items(units, LoraMethod(), training)
    assert items == 480 // (2048 // 180) + 1  # 11 examples a row
    values, _ = choose_hyperparameters(units, LoraMethod(), training)
    assert values["gradient_accumulation"] == 1 and values["epochs"] == 3.0
    assert values["learning_rate"] == pytest.approx(2e-4 * (480 / items / 8) ** 0.5, rel=0.03)
    fewer = examples(200, 180)
    values, _ = choose_hyperparameters(fewer, LoraMethod(), training)
    steps = count_items(fewer, LoraMethod(), training)
    assert values["epochs"] == -(-100 // steps) > 3


def test_medium_and_large_data():
    values, _ = choose_hyperparameters(pairs(5_000), LoraMethod(), TrainingConfig(**AUTO))
    assert values == {"gradient_accumulation": 10, "epochs": 3.0, "learning_rate": 2.2e-4}  # 0.2% per step
    values, reasons = choose_hyperparameters(pairs(100_000), LoraMethod(), TrainingConfig(**AUTO, rows_per_batch=4))
    # 200 examples per step (4 x 50); one epoch trains 25,000 examples at most; rate capped at 5x
    assert values == {"gradient_accumulation": 50, "epochs": 1.0, "learning_rate": 1e-3}
    assert "at most 25,000" in reasons["epochs"]
    values, _ = choose_hyperparameters(pairs(1_000_000), LoraMethod(), TrainingConfig(**AUTO))
    assert values["gradient_accumulation"] == 256  # at most 256 examples a step


def test_full_fine_tuning_gets_a_lower_rate():
    lora, _ = choose_hyperparameters(pairs(5_000), LoraMethod(), TrainingConfig(**AUTO))
    full, _ = choose_hyperparameters(pairs(5_000), FullMethod(), TrainingConfig(**AUTO))
    assert full["learning_rate"] == pytest.approx(lora["learning_rate"] / 10)


def test_explicit_values_are_never_overridden():
    given = TrainingConfig(epochs=2, learning_rate=1e-3, gradient_accumulation=4)
    assert choose_hyperparameters(pairs(60), LoraMethod(), given) == ({}, {})
    assert resolve_auto(given, pairs(60), LoraMethod()) == (given, [])
    partly = TrainingConfig(epochs=2, learning_rate="auto", gradient_accumulation=4)
    values, reasons = choose_hyperparameters(pairs(5_000), LoraMethod(), partly)
    assert values == {"learning_rate": 2e-4}  # 4 examples a step: never below LoRA's usual rate
    resolved, lines = resolve_auto(partly, pairs(5_000), LoraMethod())
    assert (resolved.epochs, resolved.gradient_accumulation, resolved.learning_rate) == (2.0, 4, 2e-4)
    assert lines == [f"training.learning_rate: auto -> 0.0002 ({reasons['learning_rate']})"]


def test_a_bad_value_is_one_error_naming_auto(tmp_path):
    from afina.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("data: {path: d.jsonl}\ntraining: {epochs: -1, gradient_accumulation: many}\n")
    with pytest.raises(AfinaError) as error:
        load_config(path)
    assert "2 problem(s)" in error.value.message
    assert "training.epochs: Input should be greater than 0, or auto" in error.value.message
    config = load_config(path, ["training.epochs=auto", "training.gradient_accumulation=auto"])
    assert config.training.auto_fields() == ["epochs", "gradient_accumulation"]


def test_the_run_directory_holds_the_chosen_numbers(tiny_model_dir, tmp_path, ticket_rows):
    from afina.config.loading import validate_config
    from afina.pipeline.prepare import prepare_data
    from afina.pipeline.run_dir import load_run_config
    from afina.pipeline.stages import run_training
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(path)},
                              "training": {**AUTO, "max_steps": 2, "row_length": 64, "precision": "fp32"}})
    console = Console(record=True, width=200)
    run_dir, result = run_training(config, console)
    saved = json.loads((run_dir / "config.json").read_text())["training"]
    assert all(isinstance(saved[name], (int, float)) for name in AUTO), saved
    assert "training.epochs: auto -> " in console.export_text()
    assert result.steps == 2
    resumed = load_run_config(run_dir)  # what --resume starts from: numbers, nothing chosen again
    assert resumed.training.auto_fields() == [] and prepare_data(resumed).choices == []
    assert resumed.training.model_dump() == {**config.training.model_dump(), **{k: saved[k] for k in AUTO}}


def test_objective_checks_still_refuse_once_the_values_are_chosen(tiny_model_dir, tmp_path):
    from afina.config.loading import validate_config
    from afina.pipeline.prepare import prepare_data
    from tests.conftest import write_jsonl

    rows = [{"prompt": f"ticket {i}", "chosen": "network", "rejected": "printer"} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(path)}, "method": "full",
                              "objective": "dpo", "training": AUTO})
    with pytest.raises(AfinaError) as error:
        prepare_data(config)
    assert error.value.code == "reference_model_unavailable"
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(path)}, "objective": "kto",
                              "training": AUTO})
    assert prepare_data(config).choices and config.training.gradient_accumulation == 8  # kto's two a step: met
