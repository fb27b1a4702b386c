"""`afina train`: validate the data, fine-tune, save what was trained in a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console
from afina.errors import AfinaError


def train_command(
    config: Path = typer.Argument(None, help="Run config (YAML); not needed with --resume"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. training.max_steps=20"),
    resume: Path = typer.Option(None, "--resume", help="Run directory to resume from its last good checkpoint"),
) -> None:
    """Validate the data, fine-tune, and save the adapter in a run directory."""
    from afina.config import load_config
    from afina.pipeline.run_dir import load_run_config
    from afina.pipeline.stages import run_training

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
