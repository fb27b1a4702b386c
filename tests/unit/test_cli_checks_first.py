"""Everything that can be checked is checked before any work: the machine and its price table, the
afina home, the model's reachability, split sizes and the user's own held-out files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from afina.data.records import Message, Record
from afina.data.split import overlapping_records
from tests.conftest import chat_row, write_jsonl
from tests.user_errors import assert_user_error, home_files, run


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr("afina.pipeline.stages.load_model", refuse)


def write_config(tmp_path: Path, model, body: str = "data: {path: d.jsonl}\n") -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"name: t\nmodel: {model}\n{body}"
                      "training: {max_steps: 1, row_length: 256}\neval: {max_new_tokens: 8, max_examples: 2}\n")
    return config


def test_unknown_machine_fails_before_the_model_loads(tmp_path, afina_home, tiny_model_dir, ticket_rows,
                                                      no_model_load):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    result = run("train", write_config(tmp_path, tiny_model_dir), "training.machine=nonexistent-gpu")
    assert_user_error(result, "unknown_machine", "training.machine", afina_home)


def test_broken_price_table_fails_before_the_model_loads(tmp_path, afina_home, tiny_model_dir, ticket_rows,
                                                         no_model_load):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    afina_home.mkdir()
    (afina_home / "prices.yaml").write_text("machines: {a: {price_per_hour: [1, 2}\n")
    before = home_files(afina_home)
    result = run("train", write_config(tmp_path, tiny_model_dir))
    assert_user_error(result, "invalid_price_table", afina_home / "prices.yaml", afina_home, before)


def test_afina_home_that_is_a_file_is_refused_first(tmp_path, monkeypatch, tiny_model_dir, ticket_rows, no_model_load):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("AFINA_HOME", str(home))
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    result = run("train", write_config(tmp_path, tiny_model_dir))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error[afina_home_unusable] at {home}")
    assert home.read_text() == "not a folder"


def test_read_only_afina_home_is_refused_first(tmp_path, monkeypatch, afina_home, tiny_model_dir, ticket_rows,
                                               no_model_load):
    afina_home.mkdir()
    afina_home.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders; what a user sees is what os.access says
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != afina_home and access(path, mode))
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    try:
        result = run("train", write_config(tmp_path, tiny_model_dir))
        assert_user_error(result, "afina_home_unusable", afina_home, afina_home)
    finally:
        afina_home.chmod(0o755)


def test_one_row_refused_with_the_split_sizes(tmp_path, afina_home, tiny_model_dir, ticket_rows, no_model_load):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows[:1])
    line = assert_user_error(run("train", write_config(tmp_path, tiny_model_dir)), "too_few_rows",
                             tmp_path / "d.jsonl", afina_home)
    assert "1 rows split into train 1, validation 0, test 0" in line and "data.test=0" in line


def test_without_validation_rows_training_goes_on_with_a_warning(tmp_path, afina_home, tiny_model_dir, ticket_rows):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows[:1])
    result = run("train", write_config(tmp_path, tiny_model_dir), "data.test=0")
    assert result.exit_code == 0, result.output
    assert f"warning[too_few_rows] at {tmp_path / 'd.jsonl'}: 1 rows split into train 1, validation 0" in result.output


def test_hub_id_without_network_fails_at_once(tmp_path, monkeypatch, afina_home, ticket_rows, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    started = time.perf_counter()
    line = assert_user_error(run("train", write_config(tmp_path, "afina-tests/no-such-model")), "model_not_found",
                             "model", afina_home)
    assert time.perf_counter() - started < 10
    assert "HF_HUB_OFFLINE" in line and "local" in line


def test_test_file_used_as_is_with_overlap_warned(tmp_path, monkeypatch, afina_home, tiny_model_dir, ticket_rows):
    monkeypatch.chdir(tmp_path)  # the files are typed on the command line
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    shared = [json.loads(json.dumps(row).replace("ticket", "ticket ").replace(": the", ":  the"))
              for row in ticket_rows[:2]]  # the same rows, whitespace changed
    write_jsonl(tmp_path / "test.jsonl", shared + [chat_row(f"held {i}", "ok") for i in range(3)])
    write_jsonl(tmp_path / "val.jsonl", [chat_row("validation", "ok")])
    result = run("train", write_config(tmp_path, tiny_model_dir),
                 "data.test_path=test.jsonl", "data.validation_path=val.jsonl")
    assert result.exit_code == 0, result.output
    assert f"warning[test_overlap] at {tmp_path / 'test.jsonl'}: 2 of 5 test rows" in result.output
    (run_dir,) = (afina_home / "runs").iterdir()
    count = {name: len((run_dir / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "validation", "test")}
    assert count == {"train": 40, "validation": 1, "test": 5}
    assert json.loads((run_dir / "data_report.json").read_text())["held_out"]["test"]["rows_read"] == 5


def test_test_file_gets_the_same_checks(tmp_path, monkeypatch, afina_home, tiny_model_dir, ticket_rows,
                                        no_model_load):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    write_jsonl(tmp_path / "test.jsonl", [ticket_rows[0], "{not json"])
    result = run("train", write_config(tmp_path, tiny_model_dir), "data.test_path=test.jsonl")
    assert_user_error(result, "invalid_json", f"{tmp_path / 'test.jsonl'}:2", afina_home)


def test_test_file_is_for_one_data_file(tmp_path, afina_home, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, "datasets: {tasks: {a: {path: a.jsonl}}}\n")
    line = assert_user_error(run("train", config, "data.test_path=t.jsonl"), "invalid_config", config, afina_home)
    assert "data.test_path" in line


def test_overlap_ignores_whitespace_and_format():
    def chat(user, answer, source="chat", line=1):
        return Record("chat", source, line, (Message("user", user), Message("assistant", answer)))

    train = [chat("the printer  is\tjammed", "printer"), chat("vpn down", "network")]
    held = [chat(" the printer is jammed ", "printer", "prompt_completion", 7), chat("vpn down", "access")]
    assert overlapping_records(held, train) == [held[0]]
