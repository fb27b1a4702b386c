"""Export formats side by side: each export of one run, checked by afina's round trip.

    python benchmarks/export_formats.py                               # the latest demo run, 4 formats
    python benchmarks/export_formats.py RUN --formats safetensors f16 q8_0 q4_k_m --prompts 16

For each format `afina export` runs as users run it (merge, write, load back in the target runtime,
answer the run's first `--prompts` test prompts greedily, compare with the tuned model in afina), and
the script prints one table: the export's size, its agreement with the tuned model (identical
answers, and stops where the tuned model stops), the run's task metric on those prompts for the
tuned model and for the export, and the runtime's load time and tokens/s (transformers for
safetensors, llama.cpp for GGUF). The tokens/s of a GGUF are also given as a ratio to the
safetensors export's, the same merged model in transformers. Results go to a JSON file (`--out`).

The exports are written to a temporary folder and removed afterwards. tokens/s come from the round
trip's few greedy answers on whatever else the machine runs: noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def measure(run: Path, name: str, prompts: int, scratch: Path) -> dict:
    """One export of `run` as `name`, with its round trip's figures."""
    from afina.export.export import export_model

    export_format, quant = FORMATS[name]
    result = export_model(str(run), export_format, quant, out=scratch / name, prompts=prompts, min_agreement=0.0)
    check = result.check
    return {"format": name, "size_mib": round(result.size_bytes / 2**20, 1), "answers": check.answers,
            "identical": check.identical, "near_ties": check.near_ties, "stops_expected": check.stops_expected,
            "stops_matched": check.stops_matched, "metric": check.metric, "tuned_metric": check.tuned_metric,
            "export_metric": check.export_metric, "runtime": check.runtime,
            "load_s": round(check.load_seconds, 3), "tokens_per_s": round(check.tokens_per_second, 1),
            "passes_default_floor": check.agreement >= default_floor(quant)
                                    and check.stop_agreement >= default_floor(quant)}


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
    parser.add_argument("--out", type=Path, default=Path("export_formats.json"))
    args = parser.parse_args()
    run = args.run or latest_demo_run()
    print(f"run: {run}, {args.prompts} test prompts per format", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="afina-export-formats-") as scratch:
        for name in args.formats:
            rows.append(measure(run, name, args.prompts, Path(scratch)))
            print(f"{name}: {json.dumps(rows[-1])}", flush=True)
    args.out.write_text(json.dumps({"run": str(run), "prompts": args.prompts, "formats": rows}, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
