"""A run directory appears whole or not at all; a damaged one is one located error before any model
loads; a resume changes only what it may (more steps or epochs, budgets) and refuses the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.user_errors import assert_user_error, home_files, run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One short finished run (2 steps, a checkpoint at each), trained once for the module."""
    from tests.conftest import chat_row

    root = tmp_path_factory.mktemp("trained")
    rows = [chat_row(f"ticket {i}: the {c} is broken", c) for i, c in enumerate(["vpn", "printer", "mail"] * 14)]
    write_jsonl(root / "d.jsonl", rows)
    (root / "run.yaml").write_text(f"name: r\nmodel: {tiny_model_dir}\ndata: {{path: d.jsonl}}\n"
                                   "training: {max_steps: 2, row_length: 128, save_every: 1, keep_checkpoints: 5}\n"
                                   "eval: {max_new_tokens: 4, max_examples: 2}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AFINA_HOME", str(root / "home"))
        result = run("train", root / "run.yaml")
    assert result.exit_code == 0, result.output
    (run_dir,) = (root / "home" / "runs").iterdir()
    return run_dir


@pytest.fixture
def run_dir(trained_run, afina_home) -> Path:
    """A copy of the trained run in this test's afina home."""
    copy = afina_home / "runs" / trained_run.name
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the run was checked")

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(f"afina.pipeline.stages.{name}", refuse)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, afina_home,
                                                                    tiny_model_dir, ticket_rows):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{path: d.jsonl}}\ntraining: {{max_steps: 1, row_length: 128}}\n")

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr("afina.pipeline.stages.train", crash)
    result = run("train", config)
    assert isinstance(result.exception, RuntimeError)
    assert home_files(afina_home / "runs") == set()


def test_run_inputs_are_written_atomically(monkeypatch, afina_home, tiny_model_dir, ticket_rows, tmp_path):
    from afina.config import load_config
    from afina.pipeline import run_dir as run_dir_module
    from afina.pipeline.prepare import prepare_data

    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(f"model: {tiny_model_dir}\ndata: {{path: d.jsonl}}\n")
    config = load_config(config_path)
    data = prepare_data(config)

    def full_disk(path, records):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(run_dir_module, "write_records", full_disk)
        with pytest.raises(OSError):
            run_dir_module.create_run_dir(config, data)
    assert home_files(afina_home / "runs") == set()  # no staging directory left either
    made = run_dir_module.create_run_dir(config, data)
    assert sorted(p.name for p in (afina_home / "runs").iterdir()) == [made.name]
    assert {"config.json", "train.jsonl", "test.jsonl", "data_report.json"} <= {p.name for p in made.iterdir()}


DAMAGES = {
    "config_truncated": lambda run: (run / "config.json").write_text((run / "config.json").read_text()[:100]),
    "config_empty_object": lambda run: (run / "config.json").write_text("{}"),
    "test_garbage_line": lambda run: (run / "test.jsonl").write_text(
        (run / "test.jsonl").read_text() + "\x00garbage\n"),
}


def damaged_location(run: Path, damage: str) -> str:
    if damage.startswith("config"):
        return str(run / "config.json")
    return f"{run / 'test.jsonl'}:{len((run / 'test.jsonl').read_text().splitlines())}"


@pytest.mark.parametrize("command", ["eval", "resume"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_run_is_one_located_error_before_any_model_loads(run_dir, afina_home, no_model_load, command, damage):
    DAMAGES[damage](run_dir)
    before = home_files(afina_home)
    result = run("eval", run_dir) if command == "eval" else run("train", "--resume", run_dir)
    assert_user_error(result, "run_damaged", damaged_location(run_dir, damage), afina_home, before)


def test_truncated_adapter_is_refused_before_any_model_loads(run_dir, afina_home, no_model_load):
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    before = home_files(afina_home)
    assert_user_error(run("eval", run_dir), "artifact_invalid", weights, afina_home, before)


def test_resume_refuses_any_other_override(run_dir, afina_home, no_model_load):
    before = home_files(afina_home)
    line = assert_user_error(run("train", "--resume", run_dir, "training.max_steps=4", "training.learning_rate=1"),
                             "resume_override_refused", "training.learning_rate", afina_home, before)
    assert "training.max_steps" in line  # the hint says what a resume may change
    assert_user_error(run("train", "--resume", run_dir, "training.max_steps=1"), "resume_override_refused",
                      "training.max_steps", afina_home, before)


def test_resume_with_a_config_is_refused(run_dir, afina_home, tmp_path, no_model_load):
    before = home_files(afina_home)
    config = tmp_path / "other.yaml"
    config.write_text("data: {path: d.jsonl}\n")
    assert_user_error(run("train", config, "--resume", run_dir), "resume_with_config", "command line", afina_home,
                      before)


def test_resume_extends_the_run_and_saves_the_change(run_dir):
    result = run("train", "--resume", run_dir, "training.max_steps=3", "training.max_time_minutes=30")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and (run_dir / "checkpoints" / "step-0000003").is_dir()
    saved = json.loads((run_dir / "config.json").read_text())["training"]
    assert saved["max_steps"] == 3 and saved["max_time_minutes"] == 30
