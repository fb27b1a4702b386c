"""benchmarks/eval_speed.py runs end to end on a tiny model (opt-in: `pytest -m benchmark`); it
measures nothing here, it keeps the script working between real benchmark runs."""

import pytest

from tests.unit.test_speed_levers import ROOT, run_script

pytestmark = pytest.mark.benchmark


def test_eval_speed_benchmark_runs_on_a_tiny_model(tiny_model_dir):
    done = run_script(ROOT / "benchmarks" / "eval_speed.py", "--model", tiny_model_dir, "--rows", "3",
                      "--max-new-tokens", "6", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"old", "afina", "afina_engine", "afina_one_pass"} <= set(rows)
    assert all("3/3, 3/3" in rows[path] for path in ("afina", "afina_engine", "afina_one_pass"))  # same answers
