"""The real bundled default model (SmolLM2-135M-Instruct from its GGUF), a few steps, on CPU, offline."""

import json

import pytest
from rich.console import Console

from afina.config.loading import validate_config
from afina.pipeline.stages import evaluate_run, run_training

pytestmark = pytest.mark.integration


def test_default_model_fine_tunes_and_evaluates(afina_home):
    config = validate_config({
        "name": "it", "model": "default",
        "data": {"path": "bundled:tickets", "max_length": 256},
        "training": {"max_steps": 3, "row_length": 512, "learning_rate": 2e-3, "eval_every": 3, "save_every": 3},
        "eval": {"max_new_tokens": 24, "max_examples": 6, "batch_size": 6},
    })
    run_dir, result = run_training(config, Console(quiet=True))
    # the GGUF was converted once and cached as safetensors with its tokenizer and chat template
    cached = afina_home / "models" / "smollm2-135m-instruct"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in metrics if m["split"] == "train"]
    assert result.steps == 3 and train_losses[-1] < train_losses[0]
    report = evaluate_run(run_dir, Console(quiet=True))
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert len(report["tuned"]["predictions"]) == 6
