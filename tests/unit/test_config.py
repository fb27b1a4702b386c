from importlib import resources
from pathlib import Path

import pytest

from afina.config import load_config
from afina.config.loading import parse_overrides
from afina.errors import AfinaError

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")) + [
    Path(str(resources.files("afina.data.example") / "demo.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    expected = path.stem.removeprefix("method-") if path.stem.startswith("method-") else "lora"
    assert config.method.name == expected


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_all_errors_are_reported_at_once_with_suggestions(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\n  max_lenght: 10\ntraining:\n  learnin_rate: 1\n  epochs: -1\n"
                           "method: {name: lora, rank: 8}\n")
    with pytest.raises(AfinaError) as error:
        load_config(path)
    message = error.value.message
    assert error.value.code == "invalid_config" and error.value.location == str(path)
    assert "4 problem(s)" in message
    assert "data.max_lenght: unknown key, did you mean 'max_length'?" in message
    assert "training.learnin_rate: unknown key, did you mean 'learning_rate'?" in message
    assert "training.epochs" in message and "method.rank: unknown key" in message


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\n")
    config = load_config(path, ["training.learning_rate=1e-4", "method.r=4", "name=x1"])
    assert config.training.learning_rate == 1e-4 and config.method.r == 4 and config.name == "x1"
    assert config.data.path == str(tmp_path / "d.jsonl")
    with pytest.raises(AfinaError) as error:
        load_config(path, ["training.max_stpes=3"])
    assert "did you mean 'max_steps'" in error.value.message
    with pytest.raises(AfinaError) as error:
        parse_overrides(["novalue"])
    assert error.value.code == "invalid_override"


def test_bad_yaml_names_its_line(tmp_path):
    path = write(tmp_path, "data:\n  path: [unclosed\nname: x\n")
    with pytest.raises(AfinaError) as error:
        load_config(path)
    assert error.value.code == "invalid_yaml" and error.value.location.startswith(f"{path}:")


def test_held_out_fractions_must_leave_training_rows(tmp_path):
    with pytest.raises(AfinaError) as error:
        load_config(write(tmp_path, "data: {path: d.jsonl, validation: 0.5, test: 0.45}\n"))
    assert "validation + test" in error.value.message
