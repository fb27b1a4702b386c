"""`afina demo`: the whole `afina run` path on the bundled model and data, then three tickets answered
by both models and the merged model."""

from __future__ import annotations

import json

from rich.console import Console

from afina.config.schema import RunConfig
from afina.eval.compare import comparison_table, examples_table
from afina.models.artifacts import merge_trained
from afina.models.loading import load_tokenizer
from afina.paths import models_cache_dir
from afina.pipeline.run_dir import read_split
from afina.pipeline.stages import load_tuned_model
from afina.pipeline.workflow import WorkflowResult, start_workflow
from afina.security.encryption import encrypt_tree, read_bytes
from afina.store import open_store


def run_demo(config: RunConfig, console: Console) -> WorkflowResult:
    console.rule("afina demo: IT-ticket triage on SmolLM2-135M-Instruct")
    with open_store() as store:
        result = start_workflow(config, store, console)
    report = json.loads(read_bytes(result.run_dir / "eval.json"))
    console.print(examples_table(read_split(result.run_dir, "test"), report["base"], report["tuned"]))
    if result.status != "succeeded":
        console.print(comparison_table(report["base"], report["tuned"]))
        return result
    merged_dir = models_cache_dir() / f"{result.run_dir.name}-merged"
    merge_trained(load_tuned_model(config, result.run_dir), config.method).save_pretrained(merged_dir)
    load_tokenizer(config.model).save_pretrained(merged_dir)
    encrypt_tree(merged_dir)  # with a master key
    console.print(f"registered model: {result.model} (afina models show {result.model})\n"
                  f"adapter: {result.run_dir / 'adapter'}\nmerged model: {merged_dir}\n"
                  f"loss curves: {result.run_dir / 'loss.png'}\nreport: {result.run_dir / 'eval.json'}")
    return result
