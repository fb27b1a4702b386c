"""Loading a model or trained weights never unpickles a file: a pickle that would run code is refused
before it is opened."""

import pickle
import shutil

import pytest
from typer.testing import CliRunner

from afina.cli.main import app
from afina.errors import AfinaError
from afina.models.loading import load_model
from tests.conftest import write_jsonl


class WritesAMarker:
    """Unpickling this calls `open(marker, "w")`: code run by loading a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker):
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": WritesAMarker(marker)}))


def test_a_model_directory_with_pickled_weights_is_refused_unopened(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, model / name)
    marker = tmp_path / "pwned"
    plant_pickle(model / "pytorch_model.bin", marker)
    with pytest.raises(AfinaError) as error:
        load_model(str(model))
    assert error.value.code == "unsafe_model_file"
    assert not marker.exists()

    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]}] * 20)
    (tmp_path / "run.yaml").write_text(f"model: {model}\ndata: {{path: d.jsonl}}\ntraining: {{max_steps: 1}}\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2 and "error[unsafe_model_file]" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_a_run_whose_adapter_is_a_pickle_is_refused_by_eval(tiny_model_dir, ticket_rows, tmp_path, afina_home):
    write_jsonl(tmp_path / "d.jsonl", ticket_rows)
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\ndata: {{path: d.jsonl}}\n"
                                       "training: {max_steps: 1, row_length: 256}\n")
    assert CliRunner().invoke(app, ["train", str(tmp_path / "run.yaml")]).exit_code == 0
    (run_dir,) = (afina_home / "runs").iterdir()
    adapter = run_dir / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant_pickle(adapter / "adapter_model.bin", marker)
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 2 and "error[unsafe_model_file]" in result.output, result.output
    assert not marker.exists()
