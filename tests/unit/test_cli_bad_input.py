"""Bad input gets one clear error line with a code and a location, exit status 2, and leaves the
afina home untouched."""

import pytest
from typer.testing import CliRunner

from afina.cli.main import app
from tests.conftest import chat_row, write_jsonl

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, code, location, home):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert any(line.startswith(f"error[{code}] at {location}") for line in lines), result.output
    assert "Traceback" not in result.output
    assert not home.exists() or not any(home.iterdir())


def make_bad_file(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nope.jsonl", "file_not_found", tmp_path / "nope.jsonl"
    if kind == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_bytes(b"")
        return path, "empty_file", path
    if kind == "binary":
        path = tmp_path / "weights.jsonl"
        path.write_bytes(bytes(range(256)) * 10)
        return path, "binary_file", path
    if kind == "huge_line":
        path = tmp_path / "huge.jsonl"
        with path.open("wb") as handle:
            handle.write(b'{"text": "' + b"a" * (50 * 1024 * 1024) + b'"}\n')
        return path, "line_too_long", f"{path}:1"
    if kind == "invalid_utf8":
        path = tmp_path / "latin1.jsonl"
        path.write_bytes(b'{"prompt": "caf\xe9", "completion": "ok"}\n')
        return path, "invalid_utf8", f"{path}:1"
    if kind == "wrong_format":
        path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
        return path, "unknown_format", f"{path}:1"
    raise AssertionError(kind)


KINDS = ["missing", "empty", "binary", "huge_line", "invalid_utf8", "wrong_format"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_rejects_bad_data_before_writing_anything(tmp_path, afina_home, tiny_model_dir, kind):
    path, code, location = make_bad_file(tmp_path, kind)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata:\n  path: {path}\n")
    assert_user_error(run("train", config), code, location, afina_home)


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_reports_bad_data_with_code_and_line(tmp_path, afina_home, tiny_model_dir, kind):
    path, code, location = make_bad_file(tmp_path, kind)
    result = run("data", "inspect", path, "--model", tiny_model_dir)
    assert result.exit_code == 2 and code in result.output and "Traceback" not in result.output
    assert not afina_home.exists()


def test_invalid_config_is_one_line(tmp_path, afina_home):
    config = tmp_path / "run.yaml"
    config.write_text("data: {path: x.jsonl}\ntraining: {learning_rat: 1}\n")
    assert_user_error(run("train", config), "invalid_config", config, afina_home)


def test_missing_config(tmp_path, afina_home):
    assert_user_error(run("train", tmp_path / "none.yaml"), "file_not_found", tmp_path / "none.yaml", afina_home)


def test_inspect_and_preview_on_good_data(tmp_path, tiny_model_dir, ticket_rows):
    path = write_jsonl(tmp_path / "d.jsonl", ticket_rows + [ticket_rows[0]])
    result = run("data", "inspect", path, "--model", tiny_model_dir, "--max-length", "20")
    assert result.exit_code == 0, result.output
    assert "exact duplicates" in result.output and "too_long" in result.output
    result = run("data", "preview", path, "--model", tiny_model_dir, "--index", "1")
    assert result.exit_code == 0 and "trained (highlighted)" in result.output


def test_train_then_eval_on_user_data(tmp_path, afina_home, tiny_model_dir, ticket_rows):
    path = write_jsonl(tmp_path / "d.jsonl", ticket_rows * 2 + [chat_row(f"extra {i}", "ok") for i in range(20)])
    config = tmp_path / "run.yaml"
    config.write_text(f"name: t\nmodel: {tiny_model_dir}\ndata: {{path: d.jsonl, test: 0.2}}\n"
                      "training: {max_steps: 3, row_length: 256, eval_every: 2, save_every: 2}\n"
                      "eval: {max_new_tokens: 8, max_examples: 4}\n")
    result = run("train", config)
    assert result.exit_code == 0, result.output
    (run_dir,) = (afina_home / "runs").iterdir()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    result = run("eval", run_dir)
    assert result.exit_code == 0, result.output
    assert "base vs tuned" in result.output and (run_dir / "eval.json").is_file()


def test_resume_from_the_command_line(tmp_path, afina_home, tiny_model_dir, ticket_rows):
    import shutil

    path = write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"name: r\nmodel: {tiny_model_dir}\ndata: {{path: d.jsonl}}\n"
                      "training: {max_steps: 4, row_length: 128, save_every: 2, keep_checkpoints: 5}\n")
    assert run("train", config).exit_code == 0
    (run_dir,) = (afina_home / "runs").iterdir()
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")  # as if killed before the last checkpoint
    result = run("train", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and (run_dir / "checkpoints" / "step-0000004").is_dir()
    assert_user_error(run("train"), "missing_config", "command line", afina_home / "none")
