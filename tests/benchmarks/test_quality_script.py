"""quality.py's smoke mode, in the test suite: the whole benchmark (afina and TRL on every task) and its
options for fitting afina's `auto` rule (afina's settings alone, a candidate rule and config overrides)
run end to end on a tiny model. They measure nothing here; they keep the script working."""

import json

import pytest

from tests.unit.test_speed_levers import ROOT, run_script


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


def test_quality_benchmark_runs_on_a_tiny_model_against_trl(tiny_model_dir, tmp_path, afina_home):
    pytest.importorskip("trl", reason="the benchmark compares against TRL (installed with the dev extras)")
    done = run_script(ROOT / "benchmarks" / "quality.py", "--model", tiny_model_dir, "--smoke", "--out", tmp_path,
                      env={"AFINA_HOME": str(afina_home)}, timeout=600)  # seconds on a quiet machine; minutes on a busy one
    assert done.returncode == 0, done.stderr[-2000:]
    tasks = json.loads((tmp_path / "results.json").read_text())["tasks"]
    assert set(tasks) == {"invoices", "intents", "replies", "tickets"}
    for name, task in tasks.items():
        runs = task["runs"]
        assert {"afina_1epoch", "afina_auto", "trl_defaults", "trl_tuned"} <= set(runs), (name, runs)
        for setting, run in runs.items():
            assert "error" not in run, (name, setting, run)
            # every system is scored on the same held-out rows by the same scorer
            assert run["examples"] == 2 and run["steps"] >= 1 and run["wall_seconds"] > 0, (name, setting, run)
            assert 0 <= run[task["main_metric"]] <= 1
        assert task["base"]["examples"] == 2
        # afina's defaults with epochs auto train more steps than one epoch of the same config
        assert runs["afina_auto"]["steps"] > runs["afina_1epoch"]["steps"]
    assert "json_valid" in tasks["invoices"]["runs"]["trl_tuned"] and "json_valid" not in tasks["intents"]["base"]
    report = (tmp_path / "results.md").read_text()
    assert "| invoices | trl_tuned |" in report and "(c) afina's best" in report
    assert (tmp_path / "chart.png").stat().st_size > 0
