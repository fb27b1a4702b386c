"""Training beside a busy process: how much slower a step gets when another CPU-bound process
(`yes > /dev/null`) shares the machine, afina and TRL side by side.

    python benchmarks/busy_machine.py                       # default model, bundled tickets
    python benchmarks/busy_machine.py --systems afina,afina_fixed --steps 2   # afina only, quicker

Systems (each trains as in train_speed.py, whose workers this reuses):

- `afina`: afina's loop as the `afina` command runs it: OpenMP's default wait (threads spin a while
  before they sleep) and as many threads as the cores other processes leave
  (`afina.training.cpu_share`).
- `afina_fixed`: the same with the threads fixed (`OMP_NUM_THREADS` = the cores, which turns the
  share off): what afina did before either lever.
- `afina_passive`: OpenMP's passive wait (`OMP_WAIT_POLICY=PASSIVE`: threads sleep at once), fixed
  threads: afina's earlier answer to a busy machine.
- `trl_default`: TRL `SFTTrainer` + PEFT at the settings a user would leave alone, under OpenMP's
  default wait, as TRL's users run it.
- `--try KEY=VALUE[,KEY=VALUE]` (repeatable) adds afina with those settings, named by them, e.g.
  `--try GOMP_SPINCOUNT=10000` (shorter spins; a wait setting turns the share off).

Every system runs `--warmup` untimed and `--steps` timed optimizer steps in a fresh process, once
alone and once with one `yes` process started beside it (alone first in even rounds, busy first in
odd ones). The slowdown is the system's tokens/s alone over its tokens/s beside the busy process;
on a machine with N cores a fair share would be about N / (N - 1) of the time alone, and the goal on
2 cores is at most 2.2x. `afina` alone over `afina_fixed` alone is what the share costs an idle
machine. The machine should otherwise be quiet: other work adds to both conditions unevenly.
Writes `results.md` and `results.json` to `--out` (default `results/busy_machine/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import TRL_ENV, worker_command, worker_result

from afina.training.cpu_share import USER_SETTINGS

CORES = str(len(os.sched_getaffinity(0)))
SYSTEMS = {"afina": {"system": "afina"}, "afina_fixed": {"system": "afina", "env": {"OMP_NUM_THREADS": CORES}},
           "afina_passive": {"system": "afina", "env": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": CORES}},
           "trl_default": {"system": "trl", "variant": "defaults", "env": TRL_ENV}}


def measure(job: dict, busy: bool) -> dict:
    """One job in a fresh process, beside a `yes` process when `busy`; its result, or the error it died with."""
    competitor = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        done = subprocess.run(**worker_command(job), capture_output=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return worker_result(done.returncode, done.stdout, done.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also afina with these environment settings (OpenMP's, say)")
    parser.add_argument("--out", default="results/busy_machine")
    args = parser.parse_args()
    for key in USER_SETTINGS:  # every system starts from OpenMP's defaults and afina's thread share
        os.environ.pop(key, None)
    base = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "epoch_fraction": 1.0, "mode": "speed"}
    jobs = {name: {**base, **SYSTEMS[name]} for name in args.systems.split(",")}
    for settings in args.tries:
        jobs[f"afina[{settings}]"] = {**base, "system": "afina",
                                      "env": dict(pair.split("=", 1) for pair in settings.split(","))}
    runs: dict[str, dict[str, list[float]]] = {name: {"alone": [], "busy": []} for name in jobs}
    for round_ in range(args.rounds):
        for name, job in jobs.items():
            for condition in (("alone", "busy") if round_ % 2 == 0 else ("busy", "alone")):
                result = measure(job, busy=condition == "busy")
                speed = result.get("tokens_per_second")
                print(f"round {round_} {name} {condition}: {speed or result.get('error')}", flush=True)
                if speed:
                    runs[name][condition].append(speed)
    results = {}
    for name, speeds in runs.items():
        if speeds["alone"] and speeds["busy"]:
            alone, busy = statistics.median(speeds["alone"]), statistics.median(speeds["busy"])
            results[name] = {"alone_tokens_per_second": alone, "busy_tokens_per_second": busy,
                             "slowdown": alone / busy, "runs": speeds}
    if "afina" in results and "afina_fixed" in results:
        results["afina"]["idle_speed_vs_fixed"] = (results["afina"]["alone_tokens_per_second"]
                                                   / results["afina_fixed"]["alone_tokens_per_second"])
    write_report(results, args, Path(args.out))


def write_report(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "results": results},
                                                 indent=2))
    lines = [f"{os.cpu_count()} CPUs; {args.warmup} + {args.steps} steps per run, {args.rounds} round(s)", "",
             "| system | tokens/s alone | tokens/s beside `yes` | slowdown |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['alone_tokens_per_second']:.0f} | {r['busy_tokens_per_second']:.0f} | "
              f"{r['slowdown']:.2f}x |" for name, r in results.items()]
    if "idle_speed_vs_fixed" in results.get("afina", {}):
        lines += ["", f"afina alone / afina_fixed alone: {results['afina']['idle_speed_vs_fixed']:.2f}x"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
