"""quality.py's options for fitting afina's `auto` rule run end to end on a tiny model (opt-in:
`pytest -m benchmark`): afina's settings alone, a candidate rule and config overrides applied."""

import json

import pytest

from tests.unit.test_speed_levers import ROOT, run_script

pytestmark = pytest.mark.benchmark


def test_a_candidate_rule_runs_afina_alone_and_changes_its_choice(tiny_model_dir, tmp_path, afina_home):
    done = run_script(ROOT / "benchmarks" / "quality.py", "--model", tiny_model_dir, "--smoke", "--tasks", "intents",
                      "--settings", "afina_auto", "--rule", "MAX_EPOCHS=2", "--afina-overrides",
                      "training.learning_rate=0.001", "--out", tmp_path, env={"AFINA_HOME": str(afina_home)},
                      timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    task = json.loads((tmp_path / "results.json").read_text())["tasks"]["intents"]
    assert set(task["runs"]) == {"afina_auto"} and task["base"] is None
    run = task["runs"]["afina_auto"]
    # 8 rows make an epoch of a step or two: the rule wants 100 steps, the candidate caps epochs at 2
    assert run["epochs"] == 2.0 and 2 <= run["steps"] <= 4 and run["learning_rate"] == 0.001
    assert f"| intents | afina_auto | 512 | 2 | {run['steps']} |" in (tmp_path / "results.md").read_text()


def test_an_unknown_rule_or_setting_is_refused(tmp_path):
    done = run_script(ROOT / "benchmarks" / "quality.py", "--rule", "MIN_STEP=50", "--out", tmp_path)
    assert done.returncode != 0 and "MIN_STEP is not a numeric constant" in done.stderr
    done = run_script(ROOT / "benchmarks" / "quality.py", "--settings", "afina_best", "--out", tmp_path)
    assert done.returncode != 0 and "unknown afina_best" in done.stderr
