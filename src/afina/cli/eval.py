"""`afina eval`: compare the tuned model with its base on the run's test split."""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console


def eval_command(run: Path = typer.Argument(..., help="Run directory from `afina train`")) -> None:
    """Compare the tuned model with its base on the run's test split."""
    from afina.pipeline.stages import evaluate_run

    evaluate_run(run, console)
    console.print(f"report: {run / 'eval.json'}")
