"""How close `afina estimate` comes: predicted peak memory and time per epoch beside what afina's own
training measures, per setting, on this machine.

    python benchmarks/estimate_accuracy.py                                   # lora/full x 1/2 rows, 8 steps
    python benchmarks/estimate_accuracy.py --settings lora:1 --steps 3       # a quick look at one setting

Default model (SmolLM2-135M) on the bundled tickets, packed rows of 384 tokens, 4 rows per optimizer
step (rows_per_batch 1 x 4 accumulated, or 2 x 2), precision auto. For each setting, two fresh
processes, one after the other:
  estimate  what `afina estimate` does for the same run (max_steps --steps): read and tokenize the data,
            `check_fits` (the runtime measured in-process before any weights load), then calibrate the
            time per epoch on 3 real optimizer steps
  train     what `afina train` does: load the weights in the pipeline's dtype, apply the method,
            train --steps optimizer steps with afina's loop in a temporary run directory; measured:
            peak RSS (ru_maxrss) and seconds per step over steps 2..N (the metrics' elapsed, taken
            before any checkpoint is written) x steps per epoch
The ratios are predicted / measured; the target is within 25% (0.75-1.25). Writes results.md and
results.json to --out. Run it on a quiet machine: time is measured, and other work skews it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROWS_PER_STEP = 4


def run_config(method: str, rows: int, steps: int | None = None):
    from afina.config.loading import validate_config

    training = {"row_length": 384, "rows_per_batch": rows, "gradient_accumulation": ROWS_PER_STEP // rows,
                "eval_every": 10**9, "save_every": 10**9, "warmup_ratio": 0.0}
    if steps:
        training["max_steps"] = steps
    return validate_config({"name": "accuracy", "model": "default", "method": {"name": method},
                            "data": {"path": "bundled:tickets", "max_length": 256}, "training": training})


def estimate_worker(method: str, rows: int, steps: int) -> dict:
    """`afina estimate` in this process for the run that is then trained (`steps` steps: memory
    depends on how many micro-batch shapes a run meets): data, memory, calibrated time per epoch."""
    from afina.pipeline.prepare import prepare_data, quiet_libraries
    from afina.estimate import estimate_run

    quiet_libraries()
    config = run_config(method, rows, steps)
    data = prepare_data(config)
    estimate = estimate_run(config, data.examples["train"], data.tokenizer.pad_token_id)
    return estimate.to_json()


def train_worker(method: str, rows: int, steps: int) -> dict:
    """`afina train` in this process, for `steps` optimizer steps."""
    import torch
    from rich.console import Console

    from afina.data.packing import pack_examples
    from afina.models.methods import apply_method
    from afina.models.loading import load_model
    from afina.pipeline.prepare import prepare_data, quiet_libraries, weights_dtype
    from afina.training.loop import train
    from afina.training.objectives import rows_per_step

    quiet_libraries()
    config = run_config(method, rows, steps)
    data = prepare_data(config)
    model = load_model(config.model, dtype=weights_dtype(config))
    torch.manual_seed(config.training.seed)
    model = apply_method(model, config.method)
    with tempfile.TemporaryDirectory(prefix="afina-accuracy-") as run_dir:
        train(model, data.examples["train"], [], config.training, Path(run_dir), data.tokenizer.pad_token_id,
              Console(quiet=True))
        metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed"] for row in metrics if row["split"] == "train"]
    seconds_per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)  # the first step pays for setup
    rows_in_epoch = len(pack_examples(data.examples["train"], config.training.row_length))
    steps_per_epoch = math.ceil(rows_in_epoch / rows_per_step(config.training))
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds_per_step": seconds_per_step,
            "steps_per_epoch": steps_per_epoch, "seconds_per_epoch": seconds_per_step * steps_per_epoch}


def in_fresh_process(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def measure(setting: str, steps: int) -> dict:
    method, rows = setting.split(":")
    predicted = in_fresh_process("--estimate", method, rows, str(steps))
    measured = in_fresh_process("--train", method, rows, str(steps))
    return {"setting": f"{method}, {rows} x 384 rows x {ROWS_PER_STEP // int(rows)} accumulated",
            "precision": predicted["precision"],
            "predicted_peak": predicted["memory"]["peak"], "measured_peak": measured["peak_rss"],
            "predicted_epoch_seconds": predicted["time"]["seconds_per_epoch"],
            "measured_epoch_seconds": measured["seconds_per_epoch"],
            "predicted": predicted, "measured": measured}


def markdown(results: list[dict], steps: int) -> str:
    mib = 2**20
    lines = [f"Predicted (`afina estimate`) against measured (afina's loop, {steps} optimizer steps, a fresh process "
             "each); ratio = predicted / measured.", "",
             "| setting | precision | peak predicted | peak RSS measured | ratio | epoch predicted | epoch measured "
             "| ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        memory = r["predicted_peak"] / r["measured_peak"]
        time = r["predicted_epoch_seconds"] / r["measured_epoch_seconds"]
        lines.append(f"| {r['setting']} | {r['precision']} | {r['predicted_peak'] / mib:,.0f} MiB | "
                     f"{r['measured_peak'] / mib:,.0f} MiB | {memory:.2f} | {r['predicted_epoch_seconds']:,.0f} s | "
                     f"{r['measured_epoch_seconds']:,.0f} s | {time:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--estimate"]:
        print(json.dumps(estimate_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    if sys.argv[1:2] == ["--train"]:
        print(json.dumps(train_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["lora:1", "lora:2", "full:1", "full:2"],
                        help="method:rows_per_batch")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps trained per setting")
    parser.add_argument("--out", type=Path, default=Path("results/estimate_accuracy"))
    args = parser.parse_args()
    results = []
    for setting in args.settings:
        results.append(measure(setting, args.steps))
        print(markdown(results[-1:], args.steps).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, args.steps)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table + f"\nwritten to {args.out}/results.md and results.json")


if __name__ == "__main__":
    main()
