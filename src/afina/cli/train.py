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
    """Validate the data, fine-tune, and save the adapter in a run directory.

    With --resume, only more steps or epochs and other time or cost budgets may be given
    (`training.max_steps=N`); they are saved in the run's config.json."""
    from afina.config import load_config
    from afina.config.loading import apply_resume_overrides
    from afina.pipeline.run_dir import check_run_dir
    from afina.pipeline.stages import run_training

    if resume is not None:
        given = ([str(config)] if config is not None else []) + list(overrides or [])
        if given and "=" not in given[0]:  # typer takes the first word for the config
            raise AfinaError("resume_with_config", f"--resume continues a run with its own config, not {given[0]}",
                             location="command line", hint="drop the config, or start a new run without --resume")
        saved = check_run_dir(resume, splits=("train", "validation", "test"))  # damaged: fails before any work
        run_config = apply_resume_overrides(saved, given, source=str(resume / "config.json"))
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
