"""Each preference objective family on the real default model (SmolLM2-135M-Instruct), a few steps, CPU, offline.

All tests share one afina home, so the GGUF is converted once for the module.
"""

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from afina.config.loading import validate_config
from afina.pipeline.stages import evaluate_run, run_training

pytestmark = pytest.mark.integration

QUIET = Console(quiet=True)
CATEGORIES = ["printer", "network", "access", "email"]


def write_rows(path: Path, unpaired: bool) -> Path:
    """Short rows (CPU time grows with tokens): a JSON answer preferred to a prose one."""
    rows = []
    for i in range(20):
        category = CATEGORIES[i % 4]
        prompt, good, bad = f"ticket {i}: {category} broken", json.dumps({"category": category}), "hello there"
        rows += ([{"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)}] if unpaired
                 else [{"prompt": prompt, "chosen": good, "rejected": bad}])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    return tmp_path_factory.mktemp("afina-home-objectives")


@pytest.fixture(autouse=True)
def one_home_for_the_module(afina_home, shared_home, monkeypatch):
    monkeypatch.setenv("AFINA_HOME", str(shared_home))


def config_for(objective: dict, path: Path):
    return validate_config({
        "name": objective["name"], "model": "default",
        "data": {"path": str(path), "max_length": 128, "validation": 0.1, "test": 0.15},
        "objective": objective,
        "training": {"max_steps": 1, "row_length": 256, "rows_per_batch": 2, "gradient_accumulation": 1,
                     "learning_rate": 1e-3, "eval_every": 1, "save_every": 1, "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 4, "max_examples": 2, "batch_size": 2},  # CPU time grows with tokens
    })


@pytest.mark.parametrize("objective", [{"name": "dpo", "beta": 0.5}, {"name": "kto"}, {"name": "reward"}],
                         ids=lambda o: o["name"])
def test_preference_objectives_train_and_evaluate_on_the_default_model(objective, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", unpaired=objective["name"] == "kto")
    run_dir, result = run_training(config_for(objective, path), QUIET)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["split"] == "train"]
    assert result.status == "completed" and result.steps == 1 and len(losses) == 1
    # the adapter starts as the identity, so the first step's policy is its reference
    at_start = {"dpo": math.log(2), "kto": 0.5}.get(objective["name"])
    if at_start is not None:
        assert losses[0] == pytest.approx(at_start, abs=1e-3)
    report = evaluate_run(run_dir, QUIET)
    assert report["objective"] == objective["name"] and report["tuned"]["loss"] != report["base"].get("loss")
    if objective["name"] != "kto":  # a share of the test pairs ranked right
        pairs = report["tuned"]["pairs"]
        assert pairs > 0 and (report["tuned"]["preference_accuracy"] * pairs) % 1 == pytest.approx(0, abs=1e-6)
    if objective["name"] == "reward":
        assert report["tuned"]["accuracy_from"] == "reward scores"
    if objective["name"] == "dpo":
        assert report["base"]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference


def test_continued_pretraining_on_the_default_model(tmp_path):
    """Raw domain text: every token trained, the tuned model's perplexity on held-out text drops."""
    source = Path(__file__).resolve().parents[2] / "examples" / "domain-text.jsonl"
    config = validate_config({
        "name": "it-cpt", "model": "default", "data": {"path": str(source), "test": 0.2, "validation": 0.1},
        "objective": {"name": "cpt", "block_length": 64, "overlap": 8},
        "training": {"max_steps": 4, "row_length": 256, "learning_rate": 1e-3, "eval_every": 4, "save_every": 4},
    })
    run_dir, result = run_training(config, QUIET)
    assert result.steps == 4
    report = evaluate_run(run_dir, QUIET)
    assert report["tuned"]["loss"] < report["base"]["loss"]
