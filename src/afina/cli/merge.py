"""`afina merge`: fold a run's adapter into its base and save a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console


def merge_command(run: Path = typer.Argument(..., help="Run directory from `afina train`"),
                  out: Path = typer.Option(None, "--out", help="Where to write the merged model "
                                                               "(default: $AFINA_HOME/models/RUN-merged)")) -> None:
    """Fold the run's adapter into its base and save a plain Hugging Face model (LoRA, DoRA, rsLoRA, IA3)."""
    from afina.models.artifacts import merge_trained
    from afina.models.loading import load_tokenizer
    from afina.paths import models_cache_dir
    from afina.pipeline.prepare import quiet_libraries
    from afina.pipeline.run_dir import load_run_config
    from afina.pipeline.stages import load_tuned_model
    from afina.security.encryption import encrypt_tree

    quiet_libraries()
    config = load_run_config(run)
    merged = merge_trained(load_tuned_model(config, run), config.method)
    target = out or models_cache_dir() / f"{run.name}-merged"
    merged.save_pretrained(target)
    load_tokenizer(config.model).save_pretrained(target)
    encrypt_tree(target)  # with a master key, kept encrypted like the adapter it comes from
    console.print(f"merged model: {target}")
