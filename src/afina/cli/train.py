"""`afina train`, `afina eval` and `afina demo`."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import typer

from afina.errors import AfinaError


def train_command(
    config: Path = typer.Argument(None, help="Run config (YAML); not needed with --resume"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. training.max_steps=20"),
    resume: Path = typer.Option(None, "--resume", help="Run directory to resume from its last good checkpoint"),
) -> None:
    """Validate the data, fine-tune, and save the adapter in a run directory."""
    from afina.cli.main import console
    from afina.config import load_config
    from afina.pipeline.run import load_run_config, run_training

    if resume is not None:
        if not (resume / "config.json").is_file():
            raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(resume))
        run_config = load_run_config(resume)
    elif config is None:
        raise AfinaError("missing_config", "give a run config, or --resume RUN_DIR", location="command line")
    else:
        run_config = load_config(config, overrides or [])
    run_dir, result = run_training(run_config, console, resume_dir=resume)
    if result.status == "interrupted":
        raise typer.Exit(130)
    if result.status == "diverged":
        raise typer.Exit(1)
    console.print(f"next: afina eval {run_dir}")


def eval_command(run: Path = typer.Argument(..., help="Run directory from `afina train`")) -> None:
    """Compare the tuned model with its base on the run's test split."""
    from afina.cli.main import console
    from afina.pipeline.run import evaluate_run

    evaluate_run(run, console)
    console.print(f"report: {run / 'eval.json'}")


def demo_command() -> None:
    """The whole path on the bundled model and data: validate, split, fine-tune, compare, save."""
    from afina.cli.main import console
    from afina.config.loading import load_config
    from afina.pipeline.demo import run_demo

    started = time.perf_counter()
    config = load_config(Path(str(resources.files("afina.data.example") / "demo.yaml")))
    run_demo(config, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


def merge_command(run: Path = typer.Argument(..., help="Run directory from `afina train`"),
                  out: Path = typer.Option(None, "--out", help="Where to write the merged model "
                                                               "(default: $AFINA_HOME/models/RUN-merged)")) -> None:
    """Fold the run's adapter into its base and save a plain Hugging Face model (LoRA, DoRA, rsLoRA, IA3)."""
    from afina.cli.main import console
    from afina.models.artifacts import merge_trained
    from afina.models.loading import load_tokenizer
    from afina.paths import models_cache_dir
    from afina.pipeline.run import load_run_config, load_tuned_model, quiet_libraries

    quiet_libraries()
    config = load_run_config(run)
    merged = merge_trained(load_tuned_model(config, run), config.method)
    target = out or models_cache_dir() / f"{run.name}-merged"
    merged.save_pretrained(target)
    load_tokenizer(config.model).save_pretrained(target)
    console.print(f"merged model: {target}")
