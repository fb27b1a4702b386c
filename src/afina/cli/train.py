"""`afina train`: validate the data, fine-tune, save what was trained in a run directory.

    afina train config.yaml                          # one device
    afina train config.yaml --devices 4              # four GPUs of this machine (afina starts torchrun)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint head:29500 $(which afina) train config.yaml

Under torchrun every process runs this command: rank 0 creates the run directory and saves what was
trained, and `training.parallel` (auto: ddp when the run fits one device, else fsdp) says how the
processes share the model (`afina.training.distributed`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from afina.cli.console import console
from afina.errors import AfinaError


def train_command(
    config: Path = typer.Argument(None, help="Run config (YAML); not needed with --resume"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. training.max_steps=20"),
    resume: Path = typer.Option(None, "--resume", help="Run directory to resume from its last good checkpoint"),
    devices: int = typer.Option(1, "--devices", min=1, help="Processes on this machine, one per GPU (on CPU: "
                                "gloo); afina starts them with torchrun"),
) -> None:
    """Validate the data, fine-tune, and save the adapter in a run directory.

    With --resume, only more steps or epochs and other time or cost budgets may be given
    (`training.max_steps=N`); they are saved in the run's config.json."""
    from afina.training.distributed import (check_parallel_supported, launch_devices, launched_world,
                                            report_to_launcher, start_process_group)

    launching = devices > 1 and launched_world() == 1
    if not launching:
        start_process_group()
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
    if launching:  # a config or method the processes cannot run is refused once, before they start
        check_parallel_supported(run_config.method, run_config.training, devices)
        raise typer.Exit(launch_devices(devices, command_without_devices(sys.argv[1:])))
    run_config = with_parallel_chosen(run_config)
    run_dir, result = run_training(run_config, console, resume_dir=resume)
    report_to_launcher(result)  # to `afina run --devices N`, which started these processes
    if result.status == "interrupted":
        raise typer.Exit(130)
    if result.status == "diverged":
        raise typer.Exit(1)
    console.print(f"next: afina eval {run_dir}")


def command_without_devices(argv: list[str]) -> list[str]:
    """This command's arguments as each process gets them: without --devices."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            kept.append(arg)
    return kept


def with_parallel_chosen(config):
    """Under several processes: `training.parallel: auto` made ddp or fsdp by rank 0's estimate (every
    rank must take the same), and only rank 0 prints."""
    from afina.estimate.parallel import choose_parallel_for
    from afina.training.distributed import check_parallel_supported, current_ranks, from_main, parallel_of

    ranks = current_ranks()
    if not ranks.distributed:
        return config
    console.quiet = not ranks.main
    check_parallel_supported(config.method, config.training, ranks.world)  # launched by torchrun itself
    if parallel_of(config.training) == "fsdp":  # set, or auto with an fsdp option
        parallel = "fsdp"
    else:
        parallel = from_main(choose_parallel_for(config, ranks.world) if ranks.main else None, ranks)
    console.print(f"{ranks.world} processes, training.parallel: {parallel}")
    return config.model_copy(update={"training": config.training.model_copy(update={"parallel": parallel})})
