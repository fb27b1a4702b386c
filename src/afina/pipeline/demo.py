"""`afina demo`: the same path as `afina train` + `afina eval`, on the bundled model and data."""

from __future__ import annotations

from rich.console import Console

from afina.config.schema import RunConfig
from afina.eval.compare import examples_table
from afina.paths import models_cache_dir
from afina.models.artifacts import merge_trained
from afina.models.loading import load_tokenizer
from afina.pipeline.run_dir import read_split
from afina.pipeline.stages import evaluate_run, load_tuned_model, run_training


def run_demo(config: RunConfig, console: Console) -> dict:
    console.rule("afina demo: IT-ticket triage on SmolLM2-135M-Instruct")
    run_dir, _ = run_training(config, console)
    model = load_tuned_model(config, run_dir)
    report = evaluate_run(run_dir, console, model=model)
    console.print(examples_table(read_split(run_dir, "test"), report["base"], report["tuned"]))
    merged_dir = models_cache_dir() / f"{run_dir.name}-merged"
    merge_trained(model, config.method).save_pretrained(merged_dir)
    load_tokenizer(config.model).save_pretrained(merged_dir)
    console.print(f"adapter: {run_dir / 'adapter'}\nmerged model: {merged_dir}\n"
                  f"loss curves: {run_dir / 'loss.png'}\nreport: {run_dir / 'eval.json'}")
    return report
