"""Paths typed on the command line resolve against the current directory; paths written in a config
file against the config's folder. The README's own-data commands work as written."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from afina.config import load_config
from tests.conftest import write_jsonl
from tests.user_errors import assert_user_error, run

ROOT = Path(__file__).resolve().parents[2]


def make_layout(tmp_path: Path) -> tuple[Path, Path]:
    """tmp/project/configs/run.yaml (paths written relative to configs/) and tmp/work, the user's directory."""
    configs = tmp_path / "project" / "configs"
    configs.mkdir(parents=True)
    config = configs / "run.yaml"
    config.write_text("data:\n  path: ../data/train.jsonl\n  test_path: held/test.jsonl\n"
                      "  validation_path: ~/val.jsonl\n")
    work = tmp_path / "work"
    work.mkdir()
    return config, work


def test_paths_in_the_config_resolve_against_its_folder(tmp_path, monkeypatch):
    config, work = make_layout(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    loaded = load_config(config)
    assert loaded.data.path == str(tmp_path / "project" / "data" / "train.jsonl")
    assert loaded.data.test_path == str(tmp_path / "project" / "configs" / "held" / "test.jsonl")
    assert loaded.data.validation_path == str(tmp_path / "user" / "val.jsonl")


def test_paths_on_the_command_line_resolve_against_the_current_directory(tmp_path, monkeypatch, tiny_model_dir):
    config, work = make_layout(tmp_path)
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)
    loaded = load_config(config, ["data.path=my-data.jsonl", "data.test_path=sub/test.jsonl",
                                  "data.validation_path=val.jsonl", "model=models/tiny"])
    assert loaded.data.path == str(work / "my-data.jsonl")
    assert loaded.data.test_path == str(work / "sub" / "test.jsonl")
    assert loaded.data.validation_path == str(work / "val.jsonl")
    assert loaded.model == str(work / "models" / "tiny")
    hub = load_config(config, ["model=org/name"])  # not a folder here: a hub id, as written
    assert hub.model == "org/name"


def test_task_paths_follow_the_same_rule(tmp_path, monkeypatch):
    config = tmp_path / "configs" / "mix.yaml"
    config.parent.mkdir()
    config.write_text("datasets:\n  tasks:\n    a: {path: a.jsonl}\n    b: {path: b.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config, ["datasets.tasks.b.path=b.jsonl"])
    assert loaded.datasets.tasks["a"].path == str(tmp_path / "configs" / "a.jsonl")
    assert loaded.datasets.tasks["b"].path == str(tmp_path / "b.jsonl")


def test_a_missing_file_typed_on_the_command_line_is_named_where_the_user_is(tmp_path, monkeypatch, afina_home):
    config, work = make_layout(tmp_path)
    monkeypatch.chdir(work)
    assert_user_error(run("train", config, "data.path=nope.jsonl", "data.test_path=null",
                          "data.validation_path=null"), "file_not_found", work / "nope.jsonl", afina_home)


def readme_commands(prefix: str) -> list[list[str]]:
    """The README's command lines that start with `prefix`, split as a shell would (comments dropped)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith(prefix)]


def test_readme_own_data_commands_work_from_the_users_directory(tmp_path, monkeypatch, afina_home, tiny_model_dir,
                                                                ticket_rows):
    (inspect,) = readme_commands("afina data inspect ")
    (train,) = readme_commands("afina train configs/own-chat-data.yaml ")
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "own-chat-data.yaml", tmp_path / "configs" / "own-chat-data.yaml")
    write_jsonl(tmp_path / "my-data.jsonl", ticket_rows)
    monkeypatch.chdir(tmp_path)
    result = run(*inspect)
    assert result.exit_code == 0, result.output
    assert "rows read" in result.output and "Traceback" not in result.output
    # the tiny model and one step keep it fast; everything the README wrote is used as written
    result = run(*train, f"model={tiny_model_dir}", "training.max_steps=1", "training.row_length=256",
                 "eval.max_new_tokens=8")
    assert result.exit_code == 0, result.output
    (run_dir,) = (afina_home / "runs").iterdir()
    assert re.fullmatch(r"my-model-\d{8}-\d{6}", run_dir.name)
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["path"] == str(tmp_path / "my-data.jsonl")
    assert (run_dir / "adapter").is_dir()
