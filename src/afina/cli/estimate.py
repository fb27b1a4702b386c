"""`afina estimate`: a run's tokens, steps, peak memory, fit, time and cost, before it starts.

    afina estimate configs/tickets-lora.yaml training.rows_per_batch=2
    afina estimate configs/method-full.yaml --no-calibrate --json
    afina estimate configs/method-qlora.yaml --shape llama-70b --gpu-gib 80   # a Llama shape, no data or weights

Reads and tokenizes the data like `afina train` and writes nothing to the afina home (the calibration
steps run in a temporary directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from afina.cli.console import console

GIB = 2**30


def estimate_command(
    config: Path = typer.Argument(..., help="Run config (YAML)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. training.rows_per_batch=2"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="Time a few real optimizer steps here (default), or use a rough GPU table"),
    json_output: bool = typer.Option(False, "--json", help="Print the estimate as JSON"),
    shape: str = typer.Option(None, "--shape", help="Memory per device for a Llama shape (llama-1b, llama-8b, "
                              "llama-70b) from its config alone, with the config's method and training settings, "
                              "rows of training.row_length fully trained: no data, no weights"),
    gpu_gib: float = typer.Option(None, "--gpu-gib", help="Draw the per-device table for GPUs of this many GiB "
                                  "(default: this machine's device)"),
) -> None:
    """Predict peak memory, whether the run fits, time per epoch and cost, before training; and the
    memory per device under DDP and FSDP on 1, 2, 4 and 8 devices."""
    from afina.config import load_config
    from afina.estimate import check_fits, estimate_time
    from afina.pipeline.prepare import prepare_data, quiet_libraries

    run_config = load_config(config, overrides or [])
    quiet_libraries()
    if shape is not None:
        show_shape_table(run_config, shape, gpu_gib, json_output)
        return
    status = Console(stderr=True)  # progress on stderr, so --json output stays parseable
    with status.status("reading and tokenizing the data"):
        data = prepare_data(run_config)
        estimate = check_fits(run_config, data.examples["train"])
    what = "calibrating: loading the model, 3 optimizer steps" if calibrate and estimate.fits else "estimating time"
    with status.status(what):
        estimate.time = estimate_time(run_config, data.examples["train"], data.tokenizer.pad_token_id, estimate,
                                      calibrate)
    devices = per_device_table(run_config, data.examples["train"], gpu_gib)
    if json_output:
        typer.echo(json.dumps({**estimate.to_json(), "devices": [device_row_json(r) for r in devices]}, indent=2))
        return
    console.print(estimate_table(estimate))
    console.print(summary_line(estimate))
    console.print(devices_table(devices, run_config.model))


def target_machine(gpu_gib: float | None):
    """This machine, or GPUs of `gpu_gib` GiB (their CUDA context counted, as on one)."""
    import torch

    from afina.estimate.machine import CUDA_CONTEXT_BYTES, Machine

    if gpu_gib is None:
        return Machine.here()
    return Machine(torch.device("cuda"), CUDA_CONTEXT_BYTES, int(gpu_gib * GIB))


def per_device_table(run_config, examples: list, gpu_gib: float | None) -> list:
    from afina.estimate.parallel import device_memory_table
    from afina.models.loading import model_config

    return device_memory_table(run_config, examples, target_machine(gpu_gib), model_config(run_config.model))


def show_shape_table(run_config, shape: str, gpu_gib: float | None, json_output: bool) -> None:
    """`--shape`: the per-device table of a Llama shape, with the config's method and training."""
    from afina.errors import AfinaError
    from afina.estimate.parallel import (LLAMA_SHAPES, device_memory_table, llama_config,
                                         synthetic_examples)

    if shape not in LLAMA_SHAPES:
        raise AfinaError("unknown_shape", f"no model shape named {shape}", location="--shape",
                         hint="use one of: " + ", ".join(LLAMA_SHAPES))
    # no data to choose `auto` fields from; none but the row length changes the memory of a micro-batch,
    # and an `auto` row is at most LONGEST_ROW tokens
    from afina.training.auto import LONGEST_ROW

    fixed = {"gradient_accumulation": 1, "epochs": 1, "learning_rate": run_config.method.usual_learning_rate,
             "row_length": LONGEST_ROW}
    training = run_config.training.model_copy(update={name: fixed[name] for name in run_config.training.auto_fields()})
    run_config = run_config.model_copy(update={"training": training})
    rows = device_memory_table(run_config, synthetic_examples(run_config), target_machine(gpu_gib),
                               llama_config(shape))
    if json_output:
        typer.echo(json.dumps([device_row_json(r) for r in rows], indent=2))
        return
    console.print(devices_table(rows, f"{shape}, {run_config.method.name}, rows of {run_config.training.row_length} "
                                      "tokens"))


def device_row_json(row) -> dict:
    return {"parallel": row.parallel, "devices": row.devices, "peak": row.peak, "sharded": row.sharded,
            "gathered": row.gathered, "work": row.work, "capacity": row.capacity, "fits": row.fits}


def devices_table(rows: list, title: str) -> Table:
    """Peak memory per device, DDP and FSDP, by device count; and what that means for the run."""
    from afina.estimate.parallel import advice

    counts = sorted({r.devices for r in rows})
    table = Table(title=f"memory per device: {title} (devices of {gib(rows[0].capacity)})", title_justify="left")
    table.add_column("")
    for n in counts:
        table.add_column(f"{n} device{'s' if n > 1 else ''}", justify="right")
    for parallel in ("ddp", "fsdp"):
        cells = [(gib(r.peak), r.fits) for r in rows if r.parallel == parallel]
        table.add_row(parallel, *(text if fits else f"[red]{text}[/]" for text, fits in cells))
    table.caption = advice(rows)
    return table


def gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def money(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.1 else f"${value:.4f}"


def allocator_note(device: str) -> str:
    """What the allocator row counts, naming the allocator this process (and so `afina train`) runs under."""
    from afina.estimate.memory import CPU_ALLOCATOR_SHARE, CPU_GLIBC_SHARE, cpu_allocator_share

    if device != "cpu":
        return "freed memory the allocator keeps"
    allocator, share = cpu_allocator_share()
    if allocator == "glibc":
        return f"freed memory glibc's malloc keeps (tcmalloc keeps {CPU_ALLOCATOR_SHARE} of the activations, not {share})"
    return (f"freed memory {Path(allocator).name} keeps (glibc's malloc would keep {CPU_GLIBC_SHARE} of the "
            f"activations, not {share})")


def estimate_table(estimate) -> Table:
    """One table: the run, its data, its memory by component, what would fit, time and cost."""
    memory, data, batch = estimate.memory, estimate.data, estimate.micro_batch
    table = Table(title=f"estimate: {estimate.model}, {estimate.method}, {estimate.precision} on {estimate.device}",
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("parameters", f"{estimate.parameters:,}", f"{estimate.trainable_parameters:,} trained")
    table.add_row("micro-batch", f"{batch.rows} x {batch.length}",
                  f"rows x tokens, x {estimate.gradient_accumulation} accumulated"
                  + (", gradient checkpointing" if estimate.gradient_checkpointing else ""))
    table.add_section()
    table.add_row("examples", f"{data.examples:,}", "training split")
    table.add_row("tokens", f"{data.tokens:,}", f"{data.trained_tokens:,} trained")
    table.add_row("packed rows", f"{data.rows:,}", f"{data.padding_share:.1%} of computed positions are padding; "
                  f"{data.shared_share:.1%} of tokens read from a prefix shared in their row")
    table.add_row("optimizer steps", f"{data.total_steps:,}", f"{data.steps_per_epoch:,} per epoch")
    table.add_section()
    notes = {"runtime": "this process before the model loads" if estimate.device == "cpu" else "CUDA context",
             "weights": "parameters x dtype bytes", "gradients": "trained parameters",
             "optimizer": "AdamW moments", "activations": "one micro-batch, logits at trained positions",
             "allocator": allocator_note(estimate.device)}
    for name, note in notes.items():
        table.add_row(name, gib(getattr(memory, name)), note)
    if memory.shape_caches:
        table.add_row("shape caches", gib(memory.shape_caches), "bf16 kernels keep some per micro-batch shape")
    if memory.optimizer_step > memory.activations + memory.allocator:
        table.add_row("optimizer step", gib(memory.optimizer_step), "AdamW temporaries (replace activations)")
    table.add_row("loading", gib(memory.loading), "weights copied out of the mapped file")
    verdict = "[green]fits[/]" if estimate.fits else "[red]does not fit[/]"
    table.add_row("peak", gib(memory.peak), f"{verdict} in {gib(estimate.capacity)} ({estimate.device})")
    if estimate.suggestions:
        table.add_section()
        for suggestion in estimate.suggestions:
            mark = "[green]fits[/]" if suggestion.fits else "[red]too big[/]"
            table.add_row("try", gib(suggestion.peak), f"{' '.join(suggestion.overrides)}: {mark}")
    if estimate.time is not None:
        time = estimate.time
        table.add_section()
        table.add_row("time per epoch", duration(time.seconds_per_epoch), time.source)
        table.add_row("training time", duration(time.total_seconds),
                      f"{time.tokens_per_second:,.0f} tokens/s" if time.tokens_per_second else "")
        if time.price_per_hour and time.total_cost is not None:
            table.add_row("cost", money(time.total_cost),
                          f"{money(time.cost_per_epoch)} per epoch at {money(time.price_per_hour)}/h")
    return table


def summary_line(estimate) -> str:
    peak = f"predicted peak {gib(estimate.memory.peak)} of {gib(estimate.capacity)}"
    if estimate.fits:
        return f"[green]fits[/]: {peak}; start it with afina train and the same arguments"
    fitting = next((s for s in estimate.suggestions if s.fits), None)
    advice = f"; try {' '.join(fitting.overrides)}" if fitting else "; use a smaller model or a larger machine"
    return f"[red]does not fit[/]: {peak}{advice}"
