"""benchmarks/export_formats.py runs end to end on a tiny run (opt-in: `pytest -m benchmark`): it
keeps the script working between real benchmark runs and measures nothing here."""

import json

import pytest

from tests.training.test_export import make_run
from tests.unit.test_speed_levers import ROOT, run_script

pytestmark = pytest.mark.benchmark


def test_export_formats_benchmark_runs_on_a_tiny_run(tiny_model_dir, ticket_rows, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (dev extra) runs the GGUF round trip")
    run = make_run(tmp_path / "tickets-lora", tiny_model_dir, ticket_rows[:4], {"name": "lora", "r": 4})
    done = run_script(ROOT / "benchmarks" / "export_formats.py", run, "--formats", "safetensors", "f16", "q8_0",
                      "--prompts", "2", "--new-tokens", "4", "--rounds", "1", "--out", tmp_path / "formats.json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "formats.json").read_text())["formats"]
    assert [r["format"] for r in rows] == ["safetensors", "f16", "q8_0"]
    assert all(r["answers"] == 2 and r["metric"] == "field_accuracy_mean" and r["tokens_per_s"] > 0 for r in rows)
    assert "| q8_0 |" in done.stdout
