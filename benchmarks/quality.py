"""Quality at the defaults: afina against TRL's SFTTrainer + PEFT LoRA on held-out tasks, side by side in one run.

    python benchmarks/quality.py                                  # default model, every task, 300/30/60 rows
    python benchmarks/quality.py --tasks invoices,intents --train-rows 300 --test-rows 60
    python benchmarks/quality.py --smoke --model PATH_TO_A_TINY_MODEL   # end to end in seconds
    python benchmarks/quality.py --tasks intents --train-rows 100 --settings afina_auto \
        --rule MIN_STEPS=50 --out benchmarks/results/rule-steps50    # a candidate `auto` rule, afina alone

Tasks (benchmarks/tasks.py, deterministic; test rows never trained on): invoices (extraction into JSON,
field accuracy), intents (14 labels, accuracy), replies (free text, ROUGE-L) and the bundled tickets
(JSON, field accuracy). Settings, each trained on the same training rows of the same model (the default
model, SmolLM2-135M-Instruct, loaded as afina loads it):

  afina_1epoch  `afina train configs/own-chat-data.yaml training.epochs=1`: afina's example config for
                users' own data (examples per step and learning rate `auto`), one epoch
  afina_auto    the same config as it ships, with `training.epochs: auto`: afina's best at its defaults
  afina_half    afina_auto within half of trl_tuned's wall time (`training.max_time_minutes`, less
                afina's data and model loading), run only on tasks where afina_auto took longer than that
  trl_defaults  SFTTrainer and LoraConfig(task_type="CAUSAL_LM") at their defaults (r 8 on q/v
                projections, lr 2e-5, batches of 8, bf16 autocast, gradient checkpointing), one epoch
  trl_tuned     the same with r 16, alpha 32, every linear layer, lr 2e-4, batches of 8, and gradient
                checkpointing off (faster here, same result), one epoch

TRL reads the rows as prompt/completion pairs, so it trains on the answers only, as afina does. afina's
runs get the task's validation rows as data.validation_path (its default config validates during
training); TRL's get none. Wall time counts what a user waits for: reading the data, loading the model
and training (afina's also saving the adapter), not evaluation.

Every trained model, and the base model, is evaluated the same way: afina's batched greedy generation
(`afina.eval.generation.generate_answers`) on an fp32 copy of the base with the trained adapter, and
afina's scorer (`afina.eval.metrics.score_generations`): exact match, ROUGE-L, valid JSON and field
accuracy. Only training differs. Each run is a fresh process; on each task the systems take turns
(TRL first on every other task), so a machine whose load drifts slows both alike.

Reported per task: (a) each system at its defaults for one epoch (afina_1epoch, trl_defaults); (b) the
same wall-clock budget: trl_tuned's epoch is the budget, and afina at half of it (afina_auto when it fits,
else afina_half); (c) afina's best (afina_auto). Writes results.json, results.md and chart.png to --out.

Fitting the `auto` rule (afina.training.auto): `--settings` runs only the named settings (afina's alone,
say) and `--rule NAME=VALUE,...` sets constants of afina.training.auto in afina's workers (MIN_STEPS,
MIN_EXAMPLES_PER_STEP, REFERENCE_EXAMPLES_PER_STEP, ...), so a candidate rule is measured exactly as
afina would choose with it; `--afina-overrides` adds config overrides to afina's settings. Each run
reports the row length, epochs, steps and rate it chose.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks import MAIN_METRIC, MAX_NEW_TOKENS, TASKS, make_task, write_task
from train_speed import TRL_ENV, WORKER_ENV, worker_result

ROOT = Path(__file__).resolve().parents[1]
OWN_DATA_CONFIG = ROOT / "configs" / "own-chat-data.yaml"
EVAL_BATCH = 16
SMOKE_NEW_TOKENS = 8  # a smoke run's untrained tiny model never stops on its own
SMOKE_AFINA = ["data.max_length=512", "training.row_length=512"]  # a tiny model's attention over 2048 tokens is slow
TRL_SETTINGS = {  # changes to SFTConfig's and LoraConfig's defaults
    "trl_defaults": ({}, {}),
    "trl_tuned": ({"learning_rate": 2e-4, "gradient_checkpointing": False},
                  {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
}
AFINA_SETTINGS = {"afina_1epoch": ["training.epochs=1"], "afina_auto": []}
ORDER = ["trl_defaults", "afina_1epoch", "trl_tuned", "afina_auto"]  # TRL and afina take turns on a task
METRICS = [("exact_match", "exact"), ("field_accuracy_mean", "field acc."), ("rouge_l", "ROUGE-L"),
           ("json_valid", "valid JSON")]


# ---------------------------------------------------------------- evaluation, the same for every system

def evaluate(model, tokenizer, test_path: str, max_new_tokens: int) -> dict:
    """Greedy answers to the test rows' prompts, scored against their answers; with the time it took."""
    from afina.data.validate import load_records
    from afina.eval.generation import generate_answers
    from afina.eval.metrics import score_generations

    records = load_records(test_path).records
    started = time.perf_counter()
    predictions = generate_answers(model, tokenizer, records, max_new_tokens, EVAL_BATCH)
    scores = score_generations(predictions, [r.reference_answer() for r in records])
    return {**scores, "eval_seconds": time.perf_counter() - started, "samples": predictions[:3]}


# ---------------------------------------------------------------- workers

def run_afina(job: dict) -> dict:
    """`afina train` with the example config for own data and the setting's overrides, then evaluation
    of the tuned model (and, with job["base"], of the base model through the same adapter switched off)."""
    import torch
    from rich.console import Console

    from afina.config import load_config
    from afina.models.artifacts import load_trained
    from afina.models.loading import load_model, load_tokenizer
    from afina.models.methods import base_model
    from afina.pipeline.run_dir import load_run_config
    from afina.pipeline.stages import run_training
    from afina.training.objectives import objective_for

    paths = job["paths"]
    overrides = [f"model={job['model']}", f"data.path={paths['train']}", f"data.validation_path={paths['validation']}",
                 f"data.test_path={paths['test']}", f"name=quality-{job['task']}", *job["overrides"]]
    config = load_config(OWN_DATA_CONFIG, overrides)
    set_rule(job.get("rule", {}))
    started = time.perf_counter()
    run_dir, result = run_training(config, Console(quiet=True))
    wall = time.perf_counter() - started
    trained = load_run_config(run_dir)  # the `auto` values as numbers
    base = load_model(trained.model, dtype=torch.float32)
    objective_for(trained).prepare_model(base, trained.training.seed)
    model = load_trained(base, run_dir / "adapter")
    tokenizer = load_tokenizer(trained.model)
    outcome = {"wall_seconds": wall, "train_seconds": result.seconds, "steps": result.steps, "status": result.status,
               "epochs": trained.training.epochs, "learning_rate": trained.training.learning_rate,
               "row_length": trained.training.row_length,
               "gradient_accumulation": trained.training.gradient_accumulation,
               "examples_per_step": examples_per_step(paths["train"], trained.training.epochs, result.steps, result.status),
               **evaluate(model, tokenizer, paths["test"], job["max_new_tokens"])}
    if job.get("base"):
        with base_model(model) as untuned:
            outcome["base"] = evaluate(untuned, tokenizer, paths["test"], job["max_new_tokens"])
    shutil.rmtree(run_dir, ignore_errors=True)
    return outcome


def set_rule(rule: dict[str, str]) -> None:
    """A candidate `auto` rule: the named constants of afina.training.auto set, each in its own type."""
    import afina.training.auto as auto

    for name, value in rule.items():
        setattr(auto, name, type(getattr(auto, name))(float(value)))


def parse_rule(text: str) -> dict[str, str]:
    """`--rule NAME=VALUE,...` checked against afina.training.auto's numeric constants."""
    import afina.training.auto as auto

    rule = dict(part.split("=", 1) for part in text.split(",") if part) if text else {}
    unknown = [name for name in rule if not isinstance(getattr(auto, name, None), (int, float))]
    if unknown:
        raise SystemExit(f"--rule: {', '.join(unknown)} is not a numeric constant of afina.training.auto")
    return rule


def examples_per_step(train_path: str, epochs: float, steps: int, status: str) -> float | None:
    """Training examples per optimizer step of a run that trained its epochs to the end (None for one
    stopped by its time limit)."""
    rows = sum(1 for line in Path(train_path).read_text().splitlines() if line.strip())
    return rows * epochs / steps if status == "completed" and steps else None


def run_trl(job: dict) -> dict:
    """SFTTrainer + PEFT LoRA with the setting's changes to their defaults, one epoch, then the same evaluation."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    from afina.models.loading import load_model, load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    quiet_libraries()
    args_changes, lora_changes = TRL_SETTINGS[job["setting"]]
    started = time.perf_counter()
    rows = [json.loads(line) for line in Path(job["paths"]["train"]).read_text().splitlines()]
    pairs = [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows]
    torch.manual_seed(0)
    model = load_model(job["model"])
    tokenizer = load_tokenizer(job["model"])
    with tempfile.TemporaryDirectory() as output:
        args = SFTConfig(output_dir=output, num_train_epochs=1, save_strategy="no", report_to=[], seed=0,
                         use_cpu=True, disable_tqdm=True, **args_changes)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **lora_changes))
        state = trainer.train()
        wall = time.perf_counter() - started
        # evaluated as afina's runs are: the saved adapter on a freshly loaded fp32 base (the trainer's own
        # model generates without its KV cache while gradient checkpointing is on)
        trainer.model.save_pretrained(Path(output) / "adapter")
        tuned = PeftModel.from_pretrained(load_model(job["model"], dtype=torch.float32), Path(output) / "adapter")
    return {"wall_seconds": wall, "train_seconds": state.metrics["train_runtime"], "steps": state.global_step,
            "epochs": 1.0, "learning_rate": args.learning_rate, "examples_per_step": args.per_device_train_batch_size,
            **evaluate(tuned, tokenizer, job["paths"]["test"], job["max_new_tokens"])}


def run_job(job: dict) -> dict:
    return run_afina(job) if job["system"] == "afina" else run_trl(job)


# ---------------------------------------------------------------- driver

def measure(job: dict, in_process: bool, out: str) -> dict:
    """Run one setting in a fresh process (afina's under the allocator the `afina` command starts under,
    TRL's with oneDNN's own cache bounds, as its users run it); in the driver itself for a smoke run."""
    if in_process:
        return run_job(job)
    from afina.training.allocator import allocator_environment

    extra = allocator_environment() if job["system"] == "afina" else TRL_ENV
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--out", out], capture_output=True, text=True,
                          env={**os.environ, **WORKER_ENV, **extra}, check=False)
    return worker_result(done.returncode, done.stdout, done.stderr)


def job_for(setting: str, task: str, paths: dict, args) -> dict:
    answer_tokens = min(MAX_NEW_TOKENS[task], SMOKE_NEW_TOKENS) if args.smoke else MAX_NEW_TOKENS[task]
    job = {"setting": setting, "task": task, "model": args.model, "max_new_tokens": answer_tokens,
           "rule": parse_rule(args.rule), "paths": {split: str(path) for split, path in paths.items()}}
    if setting in TRL_SETTINGS:
        return {**job, "system": "trl"}
    overrides = AFINA_SETTINGS.get(setting, []) + (SMOKE_AFINA if args.smoke else []) + args.afina_overrides.split()
    return {**job, "system": "afina", "overrides": overrides, "base": setting == "afina_1epoch"}


def run_task(task: str, first: str, paths: dict, args) -> dict:
    """The settings asked for on one task, TRL and afina taking turns (`first` starts), then afina_half if needed."""
    order = ORDER if first == "trl" else [ORDER[1], ORDER[0], ORDER[3], ORDER[2]]
    runs: dict[str, dict] = {}
    for setting in [s for s in order if s in args.settings.split(",")]:
        runs[setting] = measure(job_for(setting, task, paths, args), args.smoke, args.out)
        print(task, setting, summary_line(runs[setting], MAIN_METRIC[task]), flush=True)
    budget = runs.get("trl_tuned", {}).get("wall_seconds")
    auto = runs.get("afina_auto", {})
    if budget and "wall_seconds" in auto and auto["wall_seconds"] > budget / 2:
        loading = auto["wall_seconds"] - auto["train_seconds"]  # reading data, loading the model, saving
        minutes = max(budget / 2 - loading, 1.0) / 60
        job = job_for("afina_half", task, paths, args)
        job["overrides"] += [f"training.max_time_minutes={minutes:.4f}"]
        runs["afina_half"] = measure(job, args.smoke, args.out)
        print(task, "afina_half", summary_line(runs["afina_half"], MAIN_METRIC[task]), flush=True)
    base = runs.get("afina_1epoch", {}).pop("base", None)
    return {"main_metric": MAIN_METRIC[task], "budget_seconds": budget, "base": base, "runs": runs}


def summary_line(run: dict, metric: str) -> str:
    if "error" in run:
        return f"failed: {run['error']}"
    return f"{metric} {run.get(metric, 0):.3f}, {run['wall_seconds']:.0f}s, {run['steps']} steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--train-rows", type=int, default=300)
    parser.add_argument("--validation-rows", type=int, default=30)
    parser.add_argument("--test-rows", type=int, default=60)
    parser.add_argument("--settings", default=",".join(ORDER), help="the settings to run, of " + ", ".join(ORDER))
    parser.add_argument("--rule", default="", help="a candidate auto rule for afina's runs: NAME=VALUE,... constants "
                        "of afina.training.auto (MIN_STEPS=50,MIN_EXAMPLES_PER_STEP=4)")
    parser.add_argument("--afina-overrides", default="", help="key=value overrides added to afina's settings, "
                        "space-separated (training.row_length=2048: the config before row_length auto)")
    parser.add_argument("--smoke", action="store_true", help="8 training rows and 2 test rows per task, short rows and "
                        "answers, every setting in this process")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    parser.add_argument("--report", action="store_true", help="only rewrite the report from --out's runs.jsonl (the "
                        "settings a stopped run finished; give that run's --train-rows and --test-rows)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = run_job(job)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with (Path(args.out) / "runs.jsonl").open("a") as runs:  # kept should a long run stop before its report
            runs.write(json.dumps({"task": job["task"], "setting": job["setting"], **result}, ensure_ascii=False) + "\n")
        print(json.dumps(result))
        return
    unknown = set(args.settings.split(",")) - set(ORDER)
    if unknown:
        parser.error(f"--settings: unknown {', '.join(sorted(unknown))}; use some of {', '.join(ORDER)}")
    parse_rule(args.rule)
    if args.report:
        write_report(results_from_runs(Path(args.out) / "runs.jsonl"), args, Path(args.out))
        return
    if args.smoke:
        args.train_rows, args.validation_rows, args.test_rows = 8, 2, 2
    (Path(args.out) / "runs.jsonl").unlink(missing_ok=True)  # the workers append this run's settings to it
    results = {}
    with tempfile.TemporaryDirectory() as data_dir:
        for index, task in enumerate(args.tasks.split(",")):
            splits = make_task(task, args.train_rows, args.validation_rows, args.test_rows)
            paths = write_task(splits, Path(data_dir) / task)
            results[task] = run_task(task, "trl" if index % 2 == 0 else "afina", paths, args)
            write_report(results, args, Path(args.out))  # after every task, so a long run's finished tasks are kept


# ---------------------------------------------------------------- report

def results_from_runs(path: Path) -> dict:
    """The per-task results of the settings the workers recorded in runs.jsonl, as `run_task` returns them."""
    results: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        run = json.loads(line)
        task, setting = run.pop("task"), run.pop("setting")
        entry = results.setdefault(task, {"main_metric": MAIN_METRIC[task], "budget_seconds": None, "base": None,
                                          "runs": {}})
        entry["base"] = run.pop("base", entry["base"])
        entry["runs"][setting] = run
        if setting == "trl_tuned":
            entry["budget_seconds"] = run.get("wall_seconds")
    return results


def budget_entry(task: dict) -> str:
    """The afina run that answers (b): afina_auto if it took at most half the budget, else afina_half."""
    runs, budget = task["runs"], task["budget_seconds"] or 0
    auto = runs.get("afina_auto", {}).get("wall_seconds")
    return "afina_half" if "afina_half" in runs else "afina_auto" if auto and auto <= budget / 2 else ""


def write_report(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "tasks": results}
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    lines = [f"# Quality at the defaults: afina vs TRL SFTTrainer + PEFT LoRA ({args.model} model)", "",
             (f"{args.train_rows} training rows, {args.test_rows} held-out test rows per task; greedy answers "
              "scored by afina's scorer for every system"), "",
             "| task | setting | row | epochs | steps | examples/step | lr | wall (s) | " +
             " | ".join(label for _, label in METRICS) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" +
             " ---: |" * len(METRICS)]
    for task, result in results.items():
        rows = {"base": result["base"] or {}} | result["runs"]
        for setting, run in rows.items():
            if "error" in run:
                lines.append(f"| {task} | {setting} | failed: {run['error'][:80]} |" + " |" * (6 + len(METRICS)))
                continue
            cells = [f"{run[key]:.1%}" if key in run else "-" for key, _ in METRICS]
            main = next(i for i, (key, _) in enumerate(METRICS) if key == result["main_metric"])
            cells[main] = f"**{cells[main]}**"
            per_step = f"{run['examples_per_step']:.1f}" if run.get("examples_per_step") else "-"
            numbers = ([str(run.get("row_length", "-")), f"{run['epochs']:g}", str(run["steps"]), per_step,
                        f"{run['learning_rate']:g}", f"{run['wall_seconds']:.0f}"] if setting != "base" else ["-"] * 6)
            lines.append(f"| {task} | {setting} | " + " | ".join(numbers + cells) + " |")
    lines += ["", "main metric in bold. Per task:", ""] + [verdict_line(task, result) for task, result in results.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    draw_chart(results, out / "chart.png")
    print("\n".join(lines))


def verdict_line(task: str, result: dict) -> str:
    """(a), (b) and (c) for one task, on its main metric."""
    metric, runs = result["main_metric"], result["runs"]

    def score(setting: str) -> str:
        run = runs.get(setting, {})
        return f"{run[metric]:.1%} in {run['wall_seconds']:.0f}s" if metric in run else "failed" if run else "not run"

    half = budget_entry(result)
    budget = f"{result['budget_seconds']:.0f}s" if result["budget_seconds"] else "?"
    return (f"- {task} ({metric}): (a) one epoch at the defaults: afina {score('afina_1epoch')}, TRL "
            f"{score('trl_defaults')}; (b) TRL tuned {score('trl_tuned')} (the budget, {budget}), afina at half "
            f"of it {score(half) if half else 'not run'}; (c) afina's best {score('afina_auto')}")


def draw_chart(results: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = ["base", "trl_defaults", "afina_1epoch", "trl_tuned", "afina_half", "afina_auto"]
    colors = {"base": "lightgray", "trl_defaults": "tab:orange", "trl_tuned": "tab:red", "afina_1epoch": "lightblue",
              "afina_half": "tab:cyan", "afina_auto": "tab:blue"}
    figure, axes = plt.subplots(1, len(results), figsize=(max(5.0, 3.2 * len(results)), 3.6), squeeze=False)
    for axis, (task, result) in zip(axes[0], results.items()):
        rows = {"base": result["base"] or {}} | result["runs"]
        shown = [s for s in settings if result["main_metric"] in rows.get(s, {})]
        values = [rows[s][result["main_metric"]] for s in shown]
        bars = axis.bar(range(len(shown)), values, color=[colors[s] for s in shown])
        for bar, setting in zip(bars, shown):
            wall = rows[setting].get("wall_seconds")
            if wall:
                axis.annotate(f"{wall:.0f}s", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                              va="bottom", fontsize=7)
        axis.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=7)
        axis.set_ylim(0, 1.1)
        axis.set_title(f"{task}: {result['main_metric']}", fontsize=9)
    figure.suptitle("held-out quality (bars) and training wall time (labels)", fontsize=10)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
