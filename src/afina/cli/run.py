"""`afina run`: validate, split, train, compare with the base, keep or discard, register, notify.

    afina run config.yaml
    afina run config.yaml --devices 4      # the training stage on four GPUs of this machine

With --devices N only the training stage runs on N processes (afina starts torchrun for it, as
`afina train --devices N` does); validating, splitting, evaluating, the gate, registering and
notifying stay in this one process, which alone talks to the store.
"""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console
from afina.errors import AfinaError


def run_command(
    config: Path = typer.Argument(None, help="Run config (YAML); not needed with --resume"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. gate.min_improvement=0.05"),
    resume: Path = typer.Option(None, "--resume", help="Run directory of an attempt to continue where it stopped"),
    devices: int = typer.Option(1, "--devices", min=1, help="Processes of the training stage on this machine, one "
                                "per GPU (on CPU: gloo); afina starts them with torchrun"),
) -> None:
    """The whole path in one command, each stage recorded in the store; ends with the gate's decision."""
    from afina.config import load_config
    from afina.pipeline.workflow import resume_workflow, start_workflow
    from afina.store import open_store
    from afina.training.distributed import check_parallel_supported, launched_world

    if launched_world() > 1:
        raise AfinaError("run_under_torchrun", "afina run starts its own training processes and is not run "
                         "under torchrun", location="command line",
                         hint="afina run CONFIG --devices N on one machine; across machines, afina train under "
                              "torchrun, then afina eval")

    if resume is not None and (config is not None or overrides):
        raise AfinaError("resume_with_config", "--resume continues a run with the config it started with",
                         location="command line", hint="drop the config and overrides, or start a new run")
    if resume is None and config is None:
        raise AfinaError("missing_config", "give a run config, or --resume RUN_DIR", location="command line")
    run_config = None if resume is not None else load_config(config, overrides or [])
    if run_config is not None:  # a method the processes cannot run: refused before any work
        check_parallel_supported(run_config.method, run_config.training, devices)
    with open_store() as store:
        if resume is not None:
            if not (resume / "config.json").is_file():
                raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(resume))
            result = resume_workflow(resume, store, console, devices)
        else:
            result = start_workflow(run_config, store, console, devices)
    if result.status == "interrupted":
        console.print(f"interrupted; continue with: afina run --resume {result.run_dir}")
        raise typer.Exit(130)
