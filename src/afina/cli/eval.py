"""`afina eval`: compare the tuned model with its base on the run's test split, or on any data file."""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console


def eval_command(run: Path = typer.Argument(..., help="Run directory from `afina train` or `afina run`"),
                 data: Path = typer.Option(None, "--data", help="Compare on this data file instead of the run's "
                                                                "test split (same formats and checks as data.path)")
                 ) -> None:
    """Compare the tuned model with its base on the run's test split, or on --data FILE."""
    from afina.pipeline.stages import evaluate_run

    evaluate_run(run, console, data_file=data)
    console.print(f"report: {run / (f'eval-{data.stem}.json' if data else 'eval.json')}")
