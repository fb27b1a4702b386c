"""`auto` training values: the documented rule for small, medium and large data (rows shortened for
small data first), explicit values kept, and a run directory that holds numbers."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from afina.config.methods import FullMethod, LoraMethod
from afina.config.schema import TrainingConfig
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.training.auto import LONGEST_ROW, choose_hyperparameters, count_items, resolve_auto

AUTO = {"epochs": "auto", "learning_rate": "auto", "gradient_accumulation": "auto"}
ALL_AUTO = {**AUTO, "row_length": "auto"}


def pairs(count: int) -> list:
    """Units that are one item each, as preference pairs are."""
    return [object() for _ in range(count)]


def examples(count: int, length: int) -> list[Example]:
    """Chat examples of `length` tokens with nothing shared, the last half trained."""
    return [Example([1000 + i] + [7] * (length - 1), [False] * (length // 2) + [True] * (length - length // 2), i)
            for i in range(count)]


def prompted(count: int, prompt: int = 60, own: int = 40) -> list[Example]:
    """Chat examples that all start with the same untrained `prompt` tokens (a system prompt), then
    `own` tokens of their own, the last half trained: a packed row holds the prompt once."""
    return [Example([5] * prompt + [1000 + i] + [7] * (own - 1), [False] * (prompt + own // 2) + [True] * (own - own // 2), i)
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


def test_small_data_sharing_a_prompt_gets_rows_of_one_step_then_enough_epochs():
    """100 examples behind one long prompt: 2048-token rows would hold about 50 (2 steps an epoch, 20
    in 10 epochs); `row_length: auto` packs about 8 a row, one row a step, and 100 steps in 8 epochs."""
    units, lora = prompted(100), LoraMethod()
    longest_rows = count_items(units, lora, TrainingConfig(row_length=LONGEST_ROW))
    assert longest_rows <= 3
    values, reasons = choose_hyperparameters(units, lora, TrainingConfig(**ALL_AUTO))
    rows = count_items(units, lora, TrainingConfig(row_length=values["row_length"]))
    assert values["row_length"] % 64 == 0 and values["row_length"] < LONGEST_ROW
    assert 100 / rows <= 8 < 100 / count_items(units, lora, TrainingConfig(row_length=values["row_length"] + 64))
    assert values["gradient_accumulation"] == 1 and values["learning_rate"] == 2e-4
    assert values["epochs"] == -(-100 // rows) and values["epochs"] * rows >= 100 and values["epochs"] <= 10
    assert f"{LONGEST_ROW}-token rows give only {longest_rows}" in reasons["row_length"]


def test_auto_rows_are_never_shorter_than_the_longest_example():
    units = prompted(99) + prompted(1, own=700)
    values, _ = choose_hyperparameters(units, LoraMethod(), TrainingConfig(**ALL_AUTO))
    assert values["row_length"] == 768  # 760 tokens rounded up to a multiple of 64
    few, _ = choose_hyperparameters(prompted(5), LoraMethod(), TrainingConfig(**ALL_AUTO))
    assert few["row_length"] == LONGEST_ROW and few["epochs"] == 10.0  # 5 examples: one row holds a step


def test_auto_rows_for_medium_data_give_100_steps_in_3_epochs():
    """1,000 examples: a step of 3% of them (30) gives 100 steps in 3 epochs, more than the 0.2% step
    rule's 8; rows hold about 30 examples, one a step, at a rate raised for 30 examples."""
    units, lora = prompted(1_000), LoraMethod()
    values, _ = choose_hyperparameters(units, lora, TrainingConfig(**ALL_AUTO))
    rows = count_items(units, lora, TrainingConfig(row_length=values["row_length"]))
    assert 3 * rows >= 100 and values["row_length"] < LONGEST_ROW
    assert values["gradient_accumulation"] == 1 and values["epochs"] == 3.0
    assert values["learning_rate"] == pytest.approx(2e-4 * (1_000 / rows / 8) ** 0.5, rel=0.03)


def test_auto_rows_stay_longest_where_they_give_enough_steps():
    """Large data, or examples that fill rows on their own: the longest row, as before."""
    values, _ = choose_hyperparameters(prompted(10_000), LoraMethod(), TrainingConfig(**ALL_AUTO))
    assert values["row_length"] == LONGEST_ROW and values["epochs"] == 2.0
    long_examples = examples(200, 600)  # 3 to a row: 67 rows, 22 steps of 3 rows an epoch
    values, _ = choose_hyperparameters(long_examples, LoraMethod(), TrainingConfig(**ALL_AUTO))
    assert values["row_length"] == LONGEST_ROW and values["gradient_accumulation"] == 3
    pairs_values, pair_reasons = choose_hyperparameters(pairs(60), LoraMethod(), TrainingConfig(**ALL_AUTO))
    assert pairs_values["row_length"] == LONGEST_ROW and "not packed" in pair_reasons["row_length"]


def test_auto_rows_follow_a_given_step():
    """gradient_accumulation given as 2: a step is two rows, so each row holds about half of it."""
    units = prompted(100)
    values, _ = choose_hyperparameters(units, LoraMethod(), TrainingConfig(**{**ALL_AUTO, "gradient_accumulation": 2}))
    rows = count_items(units, LoraMethod(), TrainingConfig(row_length=values["row_length"]))
    assert 100 / rows <= 4 and "gradient_accumulation" not in values
    assert values["epochs"] == min(10, -(-100 // -(-rows // 2)))


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
    given = TrainingConfig(epochs=2, learning_rate=1e-3, gradient_accumulation=4, row_length=2048)
    assert choose_hyperparameters(pairs(60), LoraMethod(), given) == ({}, {})
    assert choose_hyperparameters(prompted(100), LoraMethod(), TrainingConfig(**AUTO, row_length=2048))[0][
        "epochs"] == 10.0  # a row length given stays, however few steps it leaves
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
                              "training": {**ALL_AUTO, "max_steps": 2, "precision": "fp32"}})
    console = Console(record=True, width=200)
    run_dir, result = run_training(config, console)
    saved = json.loads((run_dir / "config.json").read_text())["training"]
    assert all(isinstance(saved[name], (int, float)) for name in ALL_AUTO), saved
    printed = console.export_text()
    assert "training.epochs: auto -> " in printed and f"training.row_length: auto -> {saved['row_length']} " in printed
    assert result.steps == 2
    resumed = load_run_config(run_dir)  # what --resume starts from: numbers, nothing chosen again
    assert resumed.training.auto_fields() == [] and prepare_data(resumed).choices == []
    assert resumed.training.model_dump() == {**config.training.model_dump(), **{k: saved[k] for k in ALL_AUTO}}


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


def test_a_shape_estimate_reads_an_auto_row_as_the_longest(tmp_path, afina_home):
    """`afina estimate --shape` has no data to choose from: an `auto` row is taken at its longest."""
    from typer.testing import CliRunner

    from afina.cli.main import app

    config = tmp_path / "run.yaml"
    rows = {}
    for length in ("auto", LONGEST_ROW, 512):
        config.write_text(f"model: x\ndata: {{path: d.jsonl}}\ntraining: {{row_length: {length}, epochs: auto}}\n")
        result = CliRunner().invoke(app, ["estimate", str(config), "--shape", "llama-1b", "--gpu-gib", "24", "--json"])
        assert result.exit_code == 0, result.output
        rows[length] = json.loads(result.output)
    assert rows["auto"] == rows[LONGEST_ROW] != rows[512]
