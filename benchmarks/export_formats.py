"""Export formats side by side: each export of one run, checked by afina's round trip, then timed.

    python benchmarks/export_formats.py                               # the latest demo run, 4 formats
    python benchmarks/export_formats.py RUN --formats safetensors f16 q8_0 q4_k_m --prompts 16

For each format `afina export` runs as users run it (merge, write, load back in the target runtime,
answer the run's first `--prompts` test prompts greedily, compare with the tuned model in afina).
Then every export is loaded and timed in its runtime (transformers for safetensors, llama.cpp for
GGUF): load time, and greedy tokens/s generating `--new-tokens` tokens after each of two test
prompts, the formats interleaved round by round (`--rounds`, medians) so that a machine whose speed
drifts slows them alike. The script prints one table: the export's size, its agreement with the
tuned model (identical answers, and stops where the tuned model stops), the run's task metric on
those prompts for the tuned model and for the export, load time, tokens/s, and tokens/s as a ratio to
the safetensors export's (the same merged model in transformers). Results go to a JSON file (`--out`).

The exports are written to a temporary folder and removed afterwards. Both runtimes use every core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

FORMATS = {"safetensors": ("safetensors", None), "f32": ("gguf", "f32"), "f16": ("gguf", "f16"),
           "bf16": ("gguf", "bf16"), "q8_0": ("gguf", "q8_0"), "q6_k": ("gguf", "q6_k"),
           "q5_k_m": ("gguf", "q5_k_m"), "q4_k_m": ("gguf", "q4_k_m")}


def latest_demo_run() -> Path:
    from afina.paths import afina_home

    runs = sorted((afina_home() / "runs").glob("demo-*"))
    if not runs:
        sys.exit("no demo run in the afina home: run `afina demo` first, or name a run directory")
    return runs[-1]


def export_and_check(run: Path, name: str, prompts: int, scratch: Path) -> tuple[dict, Path]:
    """One export of `run` as `name`, with its round trip's figures, and the exported artifact."""
    from afina.export.export import export_model

    export_format, quant = FORMATS[name]
    result = export_model(str(run), export_format, quant, out=scratch / name, prompts=prompts, min_agreement=0.0)
    check = result.check
    row = {"format": name, "size_mib": round(result.size_bytes / 2**20, 1), "answers": check.answers,
           "identical": check.identical, "near_ties": check.near_ties, "stops_expected": check.stops_expected,
           "stops_matched": check.stops_matched, "metric": check.metric, "tuned_metric": check.tuned_metric,
           "export_metric": check.export_metric, "runtime": check.runtime,
           "round_trip_tokens_per_s": round(check.tokens_per_second, 1),
           "passes_default_floor": check.agreement >= default_floor(quant)
                                   and check.stop_agreement >= default_floor(quant)}
    return row, result.path


def timing_prompts(run: Path) -> list[str]:
    """Two test prompts of the run, rendered with its chat template."""
    from afina.export.export import test_rows
    from afina.export.source import resolve_source
    from afina.models.loading import load_tokenizer

    source = resolve_source(str(run))
    tokenizer = load_tokenizer(source.config.model)
    return [tokenizer.apply_chat_template(row.prompt_messages(), tokenize=False, add_generation_prompt=True)
            for row in test_rows(source, 2)]


def time_transformers(directory: Path, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """Load seconds, and greedy tokens/s over `new_tokens` tokens after each prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    load = time.perf_counter() - start
    seconds = 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        tick = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        seconds += time.perf_counter() - tick
    return load, new_tokens * len(prompts) / seconds


def time_llama_cpp(path: Path, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """Load seconds, and greedy tokens/s over `new_tokens` tokens after each prompt (past any stop)."""
    import os

    import llama_cpp

    from afina.export.gguf_file import quiet_native_stderr

    start = time.perf_counter()
    with quiet_native_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False, seed=0)
    load = time.perf_counter() - start
    seconds = 0.0
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        tick = time.perf_counter()
        for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), 1):
            if count >= new_tokens:
                break
        seconds += time.perf_counter() - tick
    llm.close()
    return load, new_tokens * len(prompts) / seconds


def time_exports(artifacts: dict[str, Path], prompts: list[str], new_tokens: int, rounds: int) -> dict[str, dict]:
    """Each export's median load time and tokens/s, the formats interleaved round by round."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in artifacts}
    for _ in range(rounds):
        for name, artifact in artifacts.items():
            timer = time_transformers if name == "safetensors" else time_llama_cpp
            samples[name].append(timer(artifact, prompts, new_tokens))
    return {name: {"load_s": round(statistics.median(s[0] for s in runs), 3),
                   "tokens_per_s": round(statistics.median(s[1] for s in runs), 1)} for name, runs in samples.items()}


def default_floor(quant: str | None) -> float:
    from afina.export.export import default_min_agreement

    return default_min_agreement(quant)


def print_table(rows: list[dict]) -> None:
    reference = next((r["tokens_per_s"] for r in rows if r["format"] == "safetensors"), None)
    metric = rows[0]["metric"]
    print(f"| format | size | identical answers | stops where tuned stops | {metric}: tuned / export | runtime "
          "| load | tokens/s | tokens/s vs safetensors |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        near = f", {r['near_ties']} at a near tie" if r["near_ties"] else ""
        passes = "" if r["passes_default_floor"] else " (under the default floor)"
        ratio = f"{r['tokens_per_s'] / reference:.2f}x" if reference and r["format"] != "safetensors" else "–"
        print(f"| {r['format']} | {r['size_mib']:,.1f} MiB | {r['identical']}/{r['answers']}{near}{passes} | "
              f"{r['stops_matched']}/{r['stops_expected']} | {r['tuned_metric']:.3f} / {r['export_metric']:.3f} | "
              f"{r['runtime']} | {r['load_s']:.2f} s | {r['tokens_per_s']:.1f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="run directory (default: the latest demo run)")
    parser.add_argument("--formats", nargs="+", default=["safetensors", "f16", "q8_0", "q4_k_m"],
                        choices=sorted(FORMATS))
    parser.add_argument("--prompts", type=int, default=16, help="test prompts each round trip answers")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt when timing")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (medians reported)")
    parser.add_argument("--out", type=Path, default=Path("export_formats.json"))
    args = parser.parse_args()
    run = args.run or latest_demo_run()
    print(f"run: {run}, {args.prompts} test prompts per format", flush=True)
    rows, artifacts = [], {}
    with tempfile.TemporaryDirectory(prefix="afina-export-formats-") as scratch:
        for name in args.formats:
            row, artifacts[name] = export_and_check(run, name, args.prompts, Path(scratch))
            rows.append(row)
            print(f"{name}: {json.dumps(row)}", flush=True)
        speeds = time_exports(artifacts, timing_prompts(run), args.new_tokens, args.rounds)
    for row in rows:
        row |= speeds[row["format"]]
    args.out.write_text(json.dumps({"run": str(run), "prompts": args.prompts, "new_tokens": args.new_tokens,
                                    "rounds": args.rounds, "formats": rows}, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
