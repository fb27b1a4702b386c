"""One lever measured on its own: tokens per micro-batch (packed row length) in afina's loop.

    python benchmarks/row_length.py 850:1 384:2 256:3 128:6     # row_length:gradient_accumulation

Each setting runs in a fresh process (its own peak RSS): LoRA r=16 on the default model and the
bundled tickets, 4 optimizer steps, tokens/s over steps 2-4. Similar tokens per optimizer step,
so the result the optimizer sees is comparable; only the micro-batch size changes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(row_length: int, accumulation: int) -> dict:
    import torch
    from rich.console import Console

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import LORA, load_data

    from afina.config.schema import LoraMethod, TrainingConfig
    from afina.models.adapters import apply_method
    from afina.models.loading import load_model
    from afina.training.loop import train

    _, examples, _, tokenizer = load_data("default", 1.0)
    torch.manual_seed(0)
    model = apply_method(load_model("default"), LoraMethod(**LORA))
    config = TrainingConfig(max_steps=4, row_length=row_length, gradient_accumulation=accumulation,
                            eval_every=10**9, save_every=10**9, warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, examples, [], config, Path(run_dir), tokenizer.pad_token_id, Console(quiet=True))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_second = sum(r["tokens"] for r in rows[1:]) / (rows[-1]["elapsed"] - rows[0]["elapsed"])
    return {"row_length": row_length, "accumulation": accumulation, "tokens_per_second": tokens_per_second,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]))))
        return
    print("| row_length x accumulation | tokens/s | peak RSS (MiB) |\n| --- | ---: | ---: |")
    for setting in sys.argv[1:]:
        row_length, accumulation = setting.split(":")
        done = subprocess.run([sys.executable, __file__, "--worker", row_length, accumulation], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        print(f"| {row_length} x {accumulation} | {result['tokens_per_second']:.0f} | {result['peak_rss_mib']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
