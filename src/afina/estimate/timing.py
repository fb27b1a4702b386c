"""How long a run takes and what it costs: a few real optimizer steps timed on this machine, or a rough
throughput table of known GPUs."""

from __future__ import annotations

import gc
import tempfile
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console

from afina.config.schema import RunConfig
from afina.data.tokenize import Example
from afina.devices import resolve_precision
from afina.estimate.activations import weights_dtype
from afina.estimate.fit import Estimate, TimeEstimate
from afina.estimate.memory import first_epoch, padded_tokens, run_steps
from afina.estimate.machine import training_device
from afina.models.loading import load_model
from afina.models.methods import apply_method
from afina.training.cost import cost_of, price_per_hour
from afina.training.loop import train
from afina.training.metrics import read_metrics
from afina.training.objectives import objective_for

CALIBRATION_STEPS = 3  # the first step pays for one-time setup (optimizer state, kernel choice); 2 and 3 are timed
# Rough training throughput, tokens/s per billion parameters for a frozen base in bf16 (LoRA), at about
# 30% of each GPU's dense bf16 peak; training every weight costs 6 instead of 4 FLOPs per parameter.
GPU_TOKENS_PER_SECOND_PER_BILLION = {"H200": 80_000, "H100": 75_000, "A100": 24_000, "L40S": 25_000,
                                     "L4": 9_000, "A10G": 7_000}


def calibrate_seconds_per_token(config: RunConfig, examples: list[Example], pad_id: int,
                                steps: int = CALIBRATION_STEPS) -> float:
    """Seconds per computed position (padding included), from `steps` real optimizer steps of afina's
    own loop on the run's first packed rows at the configured micro-batch; the first step is not timed.
    Runs in a temporary directory, never in the afina home."""
    precision = resolve_precision(config.training.precision, training_device())
    model = load_model(config.model, weights_dtype(config.method, precision))
    torch.manual_seed(config.training.seed)
    model = apply_method(model, config.method)
    training = config.training.model_copy(update={"max_steps": steps, "eval_every": 10**9, "save_every": 10**9,
                                                  "max_time_minutes": None, "max_cost": None})
    with tempfile.TemporaryDirectory(prefix="afina-estimate-") as run_dir:
        train(model, examples, [], training, Path(run_dir), pad_id, Console(quiet=True), objective_for(config),
              config.method.uses_paged_optimizer)
        # each step's end, from the start of the loop: the metrics the loop writes anyway
        ends = [row["elapsed"] for row in read_metrics(Path(run_dir) / "metrics.jsonl") if row["split"] == "train"]
    del model
    gc.collect()
    objective = objective_for(config)
    timed = list(islice(run_steps(examples, config.training, objective), 1, steps))  # the first step is not timed
    return (ends[steps - 1] - ends[0]) / sum(padded_tokens(step, config.training.rows_per_batch, objective)
                                          for step in timed)


def table_tokens_per_second(parameters: int, trains_base: bool, machine: str | None) -> tuple[float, str] | None:
    """Rough tokens/s from `GPU_TOKENS_PER_SECOND_PER_BILLION` for one GPU (`afina train` runs one
    process): the GPU here, or the GPU of `training.machine` in the price table, to estimate a cloud
    run from a laptop."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else machine_gpu(machine)
    name = next((key for key in GPU_TOKENS_PER_SECOND_PER_BILLION if gpu and key.lower() in gpu.lower()), None)
    if name is None:
        return None
    rate = GPU_TOKENS_PER_SECOND_PER_BILLION[name] * 1e9 / parameters * (4 / 6 if trains_base else 1)
    return rate, f"throughput table: one {name} (rough)"


def machine_gpu(machine: str | None) -> str | None:
    """The `gpus` entry (e.g. `8xH100-80GB`) of a machine in the shipped price table."""
    from importlib import resources

    import yaml

    if machine is None:
        return None
    table = yaml.safe_load((resources.files("afina.training") / "prices.yaml").read_text(encoding="utf-8"))
    return table["machines"].get(machine, {}).get("gpus")


def estimate_time(config: RunConfig, examples: list[Example], pad_id: int, estimate: Estimate,
                  calibrate: bool = True) -> TimeEstimate:
    """Seconds per epoch and in all, with their cost: calibrated on this machine, or from the table."""
    hourly = price_per_hour(config.training.machine, config.training.price_per_hour)
    objective = objective_for(config)
    epoch_tokens = sum(padded_tokens(step, config.training.rows_per_batch, objective)
                       for step in first_epoch(examples, config.training, objective))
    seconds_per_token, source = None, "unknown: no throughput figure for this device (calibrate instead)"
    if calibrate and not estimate.fits:
        source = "not calibrated: the run does not fit (calibrate a setting that does)"
    elif calibrate:
        seconds_per_token = calibrate_seconds_per_token(config, examples, pad_id)
        source = f"calibrated: steps 2-{CALIBRATION_STEPS} of {CALIBRATION_STEPS} on this machine"
    else:
        looked_up = table_tokens_per_second(estimate.parameters, not config.method.freezes_base,
                                            config.training.machine)
        if looked_up:
            seconds_per_token, source = 1 / looked_up[0], looked_up[1]
    if seconds_per_token is None:
        return TimeEstimate(None, None, None, source, hourly, None, None)
    epoch = seconds_per_token * epoch_tokens
    total = epoch * estimate.data.total_steps / max(1, estimate.data.steps_per_epoch)
    tokens = estimate.data.tokens / epoch if epoch else None
    return TimeEstimate(epoch, total, tokens, source, hourly, cost_of(epoch, hourly), cost_of(total, hourly))
