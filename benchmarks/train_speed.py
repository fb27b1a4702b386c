"""Training speed and memory: afina against TRL's SFTTrainer + PEFT, side by side, in one run.

    python benchmarks/train_speed.py                 # default model, bundled tickets, all systems
    python benchmarks/train_speed.py --quick         # a smoke run: 1 repeat, 2 steps, a small epoch

Systems, all LoRA r=16 alpha=32 dropout=0 on every linear layer, AdamW at lr 2e-4, about 8 examples
per optimizer step, fp32 weights:
  afina        afina's loop as `afina train` runs it: a step's examples packed into one row, the
               examples after the row's first reading the prefix (system prompt) they share with it
               instead of holding it, loss only at trained positions, bf16 autocast and a bf16 frozen
               base where the CPU has native bf16, under the allocator the `afina` command starts
               under (tcmalloc where installed)
  afina_unshared  the same with every example held in full (speed only): what sharing prefixes gains
  trl_default  SFTTrainer with the settings a user would typically leave alone (its defaults)
  trl_best     the fastest SFTTrainer variant that runs here, chosen by measuring each variant; the
               variants include wrapped packing under the allocator afina runs under (`+allocator`),
               which speeds TRL up too

Each measurement runs in a fresh process so peak resident memory is its own. Speed runs go in
lockstep pairs: afina and one other system (afina_unshared, TRL's defaults, each TRL variant) load side
by side, then take turns, one optimizer step at a time, so a machine whose speed drifts from minute
to minute slows both alike; neither tears down until both have finished their steps (a worker's exit
beside the other's last timed step once slowed that step), and the first turn alternates between
rounds (so keep `--repeats` even). Tokens per second count non-padding tokens over `--steps`
optimizer steps after `--warmup` untimed ones, timed from the start to the end of each of the
system's own steps, median of `--repeats` rounds in which every pair runs once (trl_best is the TRL
setting with the fastest median); afina's ratio to each system is the median of its ratios within a
pair. `--control` adds afina_again, afina paired with itself, whose ratio shows what the pairs
resolve; `--control-env KEY=VALUE` sets environment variables in afina_again's process only, so a
setting such as an allocator option is measured against afina as it is. A TRL
variant named with `+allocator` (`--variants defaults+allocator` is TRL's defaults) runs under the
allocator afina runs under. Each worker records the allocator it ran under. Then
each system trains one epoch alone and its validation loss on assistant tokens is computed by the
same afina function on the same held-out rows. Writes results.md, results.json and chart.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from afina.training.allocator import allocator_environment, running_allocator

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNING_RATE = 2e-4
EXAMPLES_PER_STEP = 8
ROWS_PER_STEP = 1  # afina's default: one packed row per optimizer step
TRL_VARIANTS = {  # changes to SFTConfig's defaults (bf16 autocast, gradient checkpointing, padded batches)
    "no_checkpointing": {"gradient_checkpointing": False},
    "no_checkpointing+completion_only": {"gradient_checkpointing": False, "prompt_completion": True},
    # packing=True packs best-fit-decreasing and turns padding_free on (position ids restart per example)
    "no_checkpointing+packing": {"gradient_checkpointing": False, "packing": True, "prompt_completion": True},
    # wrapped packing cuts examples mid-sequence and lets them attend to each other: fast, not equivalent
    "no_checkpointing+packing_wrapped": {"gradient_checkpointing": False, "packing": True,
                                         "packing_strategy": "wrapped", "prompt_completion": True},
    "fp32": {"bf16": False, "gradient_checkpointing": False},
}
# a variant named with this suffix runs under the allocator afina's workers run under (tcmalloc where installed):
# TRL gains from it too, so TRL at its best is tried with it
ALLOCATOR = "+allocator"
DEFAULT_VARIANTS = [*TRL_VARIANTS, "no_checkpointing+packing_wrapped" + ALLOCATOR]


# ---------------------------------------------------------------- shared data and evaluation

def load_data(model: str, epoch_fraction: float):
    from afina.data.split import split_records
    from afina.data.tokenize import tokenize_records
    from afina.data.validate import load_records
    from afina.models.loading import load_tokenizer
    from afina.pipeline.prepare import quiet_libraries, resolve_data_path

    quiet_libraries()
    records = load_records(resolve_data_path("bundled:tickets")).records
    splits = split_records(records, 0.1, 0.1, seed=0)
    train = splits["train"][: max(EXAMPLES_PER_STEP, int(len(splits["train"]) * epoch_fraction))]
    tokenizer = load_tokenizer(model)
    train_examples = tokenize_records(train, tokenizer, 1024)
    validation_examples = tokenize_records(splits["validation"], tokenizer, 1024)
    return train, train_examples, validation_examples, tokenizer


def validation_loss(model, validation_examples, tokenizer) -> float:
    from afina.training.validation import evaluate_loss
    from afina.training.objectives import token_objective

    loss, _ = evaluate_loss(model, validation_examples, token_objective(4096), 1, tokenizer.pad_token_id)
    return loss


def afina_row_length(examples: list, share_prefixes: bool = True) -> int:
    """Rows that hold a step's EXAMPLES_PER_STEP examples in ROWS_PER_STEP rows, on average: with shared
    prefixes, the examples after a row's first hold only what follows the prefix they share with it."""
    from afina.data.packing import shared_prefix

    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    shared = statistics.mean(shared_prefix(examples[0], e) for e in examples[1:]) if share_prefixes else 0
    per_row = EXAMPLES_PER_STEP / ROWS_PER_STEP
    return int(mean + (per_row - 1) * (mean - shared))


def afina_model(model: str, dropout: float = LORA["dropout"]):
    """The model as afina trains it here: LoRA (LORA's settings) on a frozen base kept in bf16 where the
    CPU computes bf16 natively, as `afina train` does; returns it and whether bf16 is on."""
    import torch

    from afina.config.schema import LoraMethod
    from afina.models.methods import apply_method
    from afina.models.loading import load_model
    from afina.devices import resolve_precision

    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    torch.manual_seed(0)
    base = load_model(model, dtype=torch.bfloat16 if bf16 else torch.float32)
    return apply_method(base, LoraMethod(**{**LORA, "dropout": dropout})), bf16


def afina_in_training(model: str):
    """For the one-process probes: the training examples, the tokenizer, and the model as `afina_model`
    builds it, in training mode, with whether bf16 is on."""
    _, examples, _, tokenizer = load_data(model, 1.0)
    net, bf16 = afina_model(model)
    net.train()
    return examples, tokenizer, net, bf16


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_settings() -> dict:
    """What a worker ran under that its speed and memory depend on: oneDNN's kernel-cache bound and the allocator."""
    return {"onednn_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
            "allocator": running_allocator()}


# ---------------------------------------------------------------- workers (one process each)

class Turns:
    """A worker's optimizer steps, timed each from its start to its end; in a lockstep pair a step
    starts only when the driver hands this worker its turn (a byte on the `go` FIFO) and its end is
    reported on the `done` FIFO. Without FIFOs (epoch runs) steps simply follow each other."""

    def __init__(self, fifos: dict | None):
        self.go = open(fifos["go"], "rb", buffering=0) if fifos else None  # the driver holds both open already
        self.done = open(fifos["done"], "wb", buffering=0) if fifos else None
        self.seconds: list[float] = []
        self.started = 0.0

    def ready(self) -> None:
        """Loaded: tell the driver, then wait for the first turn."""
        if self.done:
            self.done.write(b"r")
        self.take()

    def take(self) -> None:
        if self.go:
            self.go.read(1)
        self.started = time.perf_counter()

    def finish(self, more: bool) -> None:
        """One step ended: record its time, hand the turn back, and wait for the next turn; after the last
        step, wait until the other worker's steps are over too, so that this one's teardown (the end of
        `train`: plotting the loss curve, cleaning up, exiting) does not run beside a step the other is timing."""
        self.seconds.append(time.perf_counter() - self.started)
        if self.done:
            self.done.write(b"s")
        if more:
            self.take()
        elif self.go:
            self.go.read(1)


class TurnTaking:
    """afina's objective, ending each timed step's turn when the next step starts collating its
    micro-batches (`micro_batches` a step): the end of a step, its optimizer update included."""

    def __init__(self, objective, turns: Turns, timed: float, micro_batches: int):
        self.objective, self.turns, self.timed, self.micro_batches = objective, turns, timed, micro_batches
        self.collated = 0

    def __getattr__(self, name: str):
        return getattr(self.objective, name)

    def collate(self, items: list, pad_id: int):
        step, starts_a_step = divmod(self.collated, self.micro_batches)
        if starts_a_step == 0 and 0 < step <= self.timed:
            self.turns.finish(more=step < self.timed)
        self.collated += 1
        return self.objective.collate(items, pad_id)


def run_afina(job: dict) -> dict:
    from rich.console import Console

    from afina.config.schema import TrainingConfig
    from afina.training.loop import train
    from afina.training.objectives import token_objective

    records, examples, validation, tokenizer = load_data(job["model"], job["epoch_fraction"])
    # afina's defaults: a step's ~8 examples packed into one row; LoRA weights and optimizer in fp32
    share = job.get("share_prefixes", True)  # afina_unshared: every example held in full
    row_length = afina_row_length(examples, share)
    model, _ = afina_model(job["model"])
    epoch = job["mode"] == "epoch"
    timed = math.inf if epoch else job["warmup"] + job["steps"]
    # a speed run trains one more step, after its timed ones: `train` checkpoints after its last step, a
    # cost paid once per run (the epoch's wall time includes it) that TRL's runs (save_strategy "no") skip
    steps = None if epoch else timed + 1
    config = TrainingConfig(max_steps=steps, epochs=1, row_length=row_length, rows_per_batch=1,
                            gradient_accumulation=ROWS_PER_STEP,
                            learning_rate=LEARNING_RATE, warmup_ratio=0.0, eval_every=10**9, save_every=10**9,
                            keep_checkpoints=1, schedule="linear")
    turns = Turns(job.get("fifos"))
    with tempfile.TemporaryDirectory() as run_dir:
        turns.ready()
        started = time.perf_counter()
        objective = TurnTaking(token_objective(row_length, share), turns, timed, ROWS_PER_STEP)
        train(model, examples, [], config, Path(run_dir), tokenizer.pad_token_id, Console(quiet=True),
              objective=objective)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    result = {"wall_seconds": wall, "peak_rss_mib": peak_rss_mib(), "steps": len(rows), "row_length": row_length,
              **worker_settings()}
    if epoch:
        result["validation_loss"] = validation_loss(model, validation, tokenizer)
    else:
        warm = job["warmup"]
        result["tokens_per_second"] = sum(r["tokens"] for r in rows[warm:timed]) / sum(turns.seconds[warm:])
    return result


def run_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from afina.models.loading import load_model

    records, examples, validation, tokenizer = load_data(job["model"], job["epoch_fraction"])
    variant = dict(TRL_VARIANTS.get(job["variant"].removesuffix(ALLOCATOR), {}))
    prompt_completion = variant.pop("prompt_completion", False)
    if prompt_completion:
        rows = [{"prompt": r.prompt_messages(), "completion": [{"role": "assistant", "content": r.reference_answer()}]}
                for r in records]
    else:
        rows = [{"messages": [{"role": m.role, "content": m.content} for m in r.messages]} for r in records]
    mean_length = sum(len(e.input_ids) for e in examples) / len(examples)
    torch.manual_seed(0)
    model = load_model(job["model"])
    steps = -1 if job["mode"] == "epoch" else job["warmup"] + job["steps"]
    packing = variant.get("packing", False)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, num_train_epochs=1, learning_rate=LEARNING_RATE,
                     per_device_train_batch_size=1 if packing else EXAMPLES_PER_STEP,
                     max_length=int(mean_length * EXAMPLES_PER_STEP) if packing else 1024,
                     save_strategy="no", report_to=[], logging_steps=1, seed=0, use_cpu=True,
                     dataloader_num_workers=0, **variant)
    turns = Turns(job.get("fifos"))

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **__):
            turns.finish(more=state.global_step < state.max_steps)

    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft, callbacks=[StepTimes()])
    counts: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    turns.ready()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    result = {"wall_seconds": wall, "peak_rss_mib": peak_rss_mib(), "steps": len(turns.seconds), **worker_settings()}
    if job["mode"] == "epoch":
        result["validation_loss"] = validation_loss(trainer.model, validation, tokenizer)
    else:
        warm = job["warmup"]
        result["tokens_per_second"] = sum(counts[warm : warm + job["steps"]]) / sum(turns.seconds[warm:])
    return result


# ---------------------------------------------------------------- driver

WORKER_ENV = {"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
# TRL's workers import afina (for the shared data and model loading), and importing afina bounds oneDNN's
# kernel caches at 64 entries; TRL's users run with oneDNN's and PyTorch's own bounds, so its workers do too
TRL_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}


def worker_command(job: dict) -> dict:
    """Popen's arguments for a worker process running `job` (its own "env" on top of this one's). afina's
    workers start under the allocator the `afina` command runs under (`allocator_environment`)."""
    allocator = allocator_environment() if job["system"] == "afina" else {}
    return {"args": [sys.executable, __file__, "--worker", json.dumps(job)], "text": True,
            "env": {**os.environ, **WORKER_ENV, **allocator, **job.get("env", {})}}


def measure(job: dict) -> dict:
    """Run one job in a fresh Python process; returns its JSON result (or the error it died with)."""
    done = subprocess.run(**worker_command(job), capture_output=True)
    return worker_result(done.returncode, done.stdout, done.stderr)


def worker_result(returncode: int, stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def measure_pair(first: dict, second: dict) -> tuple[dict, dict]:
    """Run two speed jobs (the same warm-up and timed steps) side by side, each in its own process,
    taking turns one optimizer step at a time once both have loaded (see `Turns`); returns their results."""
    steps = first["warmup"] + first["steps"]
    with tempfile.TemporaryDirectory() as fifo_dir:
        workers = []
        for index, job in enumerate((first, second)):
            fifos = {name: str(Path(fifo_dir) / f"{name}{index}") for name in ("go", "done")}
            for path in fifos.values():
                os.mkfifo(path)
            # read-write opens never block, so a worker that dies before opening its end cannot hang the driver
            go, done = (os.open(fifos[name], os.O_RDWR) for name in ("go", "done"))
            logs = [open(Path(fifo_dir) / f"{name}{index}", "w+") for name in ("stdout", "stderr")]  # no pipe to fill
            process = subprocess.Popen(**worker_command({**job, "fifos": fifos}), stdout=logs[0], stderr=logs[1])
            workers.append((process, go, done, logs))
        alive = [receive(process, done) == b"r" for process, _, done, _ in workers]  # both loaded
        for _ in range(steps):
            for index, (process, go, done, _) in enumerate(workers):
                if alive[index]:
                    os.write(go, b"g")
                    alive[index] = receive(process, done) == b"s"
        for process, go, done, _ in workers:  # both are done timing: let them tear down
            os.write(go, b"e")
        results = []
        for process, go, done, logs in workers:
            process.wait()
            os.close(go)
            os.close(done)
            stdout, stderr = (log.seek(0) or log.read() for log in logs)
            for log in logs:
                log.close()
            results.append(worker_result(process.returncode, stdout, stderr))
    return results[0], results[1]


def receive(process: subprocess.Popen, fifo: int) -> bytes:
    """The next byte a worker reports, or b"" once it has exited without one."""
    while True:
        if select.select([fifo], [], [], 1.0)[0]:
            return os.read(fifo, 1)
        if process.poll() is not None:
            return b""


def summarize(runs: list[dict]) -> dict:
    """Medians of a system's speed runs (the first error when every run failed)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    return {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in good),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in good), "runs": runs}


def environment(settings: list[str]) -> dict:
    """KEY=VALUE arguments as a worker's environment additions."""
    return dict(item.split("=", 1) for item in settings)


def pair_ratios(results: dict, other: str) -> list[float]:
    """afina's tokens/s over other's within each of their lockstep pairs, round by round: this machine's
    speed drifts between minutes, and runs measured minutes apart would carry that drift into the ratio."""
    return [run["afina_tokens_per_second"] / run["tokens_per_second"] for run in results[other].get("runs", [])
            if "error" not in run and "afina_tokens_per_second" in run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4, help="rounds; even, so each side takes the first turn "
                        "equally often")
    parser.add_argument("--epoch-fraction", type=float, default=1.0, help="share of the training split in the epoch")
    parser.add_argument("--skip-epoch", action="store_true", help="only measure speed and memory")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="TRL variants tried for trl_best "
                        f"(a name ending in {ALLOCATOR}: that variant under afina's allocator)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 steps, 5%% of the epoch")
    parser.add_argument("--control", action="store_true", help="also pair afina with itself (afina_again)")
    parser.add_argument("--control-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for afina_again's process only (implies --control)")
    parser.add_argument("--out", default="results/train_speed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_afina(job) if job["system"] == "afina" else run_trl(job)))
        return
    if args.quick:
        args.repeats, args.steps, args.epoch_fraction = 1, 2, 0.05
    base = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "epoch_fraction": args.epoch_fraction}
    systems = {"afina": {"system": "afina"},
               "afina_unshared": {"system": "afina", "share_prefixes": False},
               "trl_default": {"system": "trl", "variant": "defaults", "env": TRL_ENV}}
    if args.control or args.control_env:
        systems["afina_again"] = {"system": "afina", "env": environment(args.control_env)}
    systems |= {f"trl:{name}": {**systems["trl_default"], "variant": name} for name in args.variants.split(",")}
    for job in systems.values():
        if job.get("variant", "").endswith(ALLOCATOR):
            job["env"] = {**job["env"], **allocator_environment()}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for round_ in range(args.repeats):  # rounds of every pair: afina in lockstep with each other system
        for name, job in systems.items():
            if name == "afina":
                continue
            pair = [{**base, **systems["afina"], "mode": "speed"}, {**base, **job, "mode": "speed"}]
            swapped = round_ % 2 == 1  # each system takes the first turn in every other round
            mine, theirs = measure_pair(*pair[::-1])[::-1] if swapped else measure_pair(*pair)
            if "tokens_per_second" in mine:
                theirs["afina_tokens_per_second"] = mine["tokens_per_second"]
            runs["afina"].append(mine)
            runs[name].append(theirs)
            print("round", round_, "afina", mine.get("tokens_per_second", mine.get("error")), name,
                  theirs.get("tokens_per_second", theirs.get("error")), flush=True)
    measured = {name: summarize(runs[name]) for name in systems}
    variants = {"defaults": measured["trl_default"]} | {k[4:]: v for k, v in measured.items() if k.startswith("trl:")}
    ranked = sorted((v["tokens_per_second"], k) for k, v in variants.items() if "tokens_per_second" in v)
    best = ranked[-1][1] if ranked else "defaults"  # TRL at its best: the setting with the fastest median
    results = {name: measured[name] for name in ("afina", "afina_unshared", "afina_again", "trl_default")
               if name in measured}
    if "afina_again" in results and args.control_env:
        results["afina_again"]["variant"] = " ".join(args.control_env)
    if best != "defaults":  # else (c) is (b)
        results["trl_best"] = measured[f"trl:{best}"]
        systems["trl_best"] = systems[f"trl:{best}"]
    if not args.skip_epoch:
        for name in ("afina", "trl_default", "trl_best"):
            if name in results:
                results[name]["epoch"] = measure({**base, **systems[name], "mode": "epoch"})
                print(name, "epoch", results[name]["epoch"], flush=True)
    results["trl_best"] = {**results.get("trl_best", results["trl_default"]), "variant": best}
    write_report(results, variants, args, Path(args.out))


def write_report(results: dict, variants: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "variants": variants, "args": vars(args)},
                                                 indent=2))
    afina = results["afina"]
    faster = max(results["trl_default"].get("tokens_per_second", 0), results["trl_best"].get("tokens_per_second", 0))
    lines = [f"# Training speed: afina vs TRL SFTTrainer + PEFT ({args.model} model, bundled tickets)", "",
             f"median of {args.repeats} runs of {args.steps} optimizer steps after {args.warmup} warm-up step(s), "
             "each system in lockstep with afina (steps alternating)", "",
             "| system | tokens/s | peak RSS (MiB) | epoch wall (s) | validation loss | afina / system (tokens/s, "
             "median within pairs) | afina / system (memory) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in results.items():
        label = f"{name} ({result['variant']})" if "variant" in result else name
        tps, rss = result.get("tokens_per_second"), result.get("peak_rss_mib")
        epoch = result.get("epoch", {})
        ratios = pair_ratios(results, name) if name != "afina" else []
        ratio_t = f"{statistics.median(ratios):.2f}x" if ratios else f"{afina['tokens_per_second'] / tps:.2f}x" if tps else "-"
        ratio_m = f"{afina['peak_rss_mib'] / rss:.2f}x" if rss else "-"
        lines.append(f"| {label} | {tps or 0:,.0f} | {rss or 0:,.0f} | {epoch.get('wall_seconds', 0):,.0f} | "
                     f"{epoch.get('validation_loss', float('nan')):.4f} | {ratio_t} | {ratio_m} |")
    paired = {other: pair_ratios(results, other)
              for other in ("afina_unshared", "afina_again", "trl_default", "trl_best") if other in results}
    lines += ["", f"ratio of the medians, afina over the faster TRL setting: {afina['tokens_per_second'] / faster:.2f}x "
              "(afina's median is over its runs in every pair; the ratios within pairs are the ones free of drift)"
              if faster else "", "", "afina tokens/s over each system run in lockstep with it (median of rounds): "
              + ", ".join(f"{k} {statistics.median(v):.2f}x (pairs: {', '.join(f'{r:.2f}' for r in v)})"
                          for k, v in paired.items() if v), "", "allocators: " + ", ".join(f"{name} {result['runs'][0].get('allocator')}" for name, result in results.items()
                                             if result.get("runs")),
              "", "TRL variants tried for trl_best:", ""]
    lines += [f"- {k}: " + (f"{v['tokens_per_second']:,.0f} tokens/s, {v['peak_rss_mib']:,.0f} MiB (median of "
                            f"{len([r for r in v['runs'] if 'error' not in r])})"
                            if "tokens_per_second" in v else f"failed: {v['error']}") for k, v in variants.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    draw_chart(results, out / "chart.png")
    print("\n".join(lines))


def draw_chart(results: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [results[n].get("tokens_per_second", 0) for n in names], color="tab:blue")
    left.set_title("tokens / second (higher is better)")
    right.bar(names, [results[n].get("peak_rss_mib", 0) for n in names], color="tab:orange")
    right.set_title("peak resident memory, MiB (lower is better)")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
