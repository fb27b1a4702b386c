"""What a micro-batch costs whatever its size: forward and backward time against tokens, in one process.

    python benchmarks/micro_batch_cost.py                 # default model, bundled tickets
    python benchmarks/micro_batch_cost.py --model path/to/tiny --rounds 2   # smoke run

Builds the model as `train_speed.py`'s afina does (LoRA r=16 on every linear layer, bf16 frozen base
and autocast where the CPU has native bf16) and times forward and backward of micro-batches of four
examples, each cut to its last 8, 32, 64 or 128 tokens. The sizes take turns within each round, so
the machine's drift hits all alike. A least-squares line through the medians splits a micro-batch's
time into a fixed part (paid once per micro-batch: every frozen weight read by its matmuls in both
directions, per-operation overhead, kernels built for new shapes) and a part per token; the report
gives the fixed part's share of a micro-batch as long as one of train_speed's packed rows. That share
is why fewer, longer micro-batches train faster, and what they cost in activation memory buys.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

SIZES = (8, 32, 64, 128)
EXAMPLES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, after two warm-up rounds")
    args = parser.parse_args()

    import torch

    from afina.config.methods import LoraMethod
    from afina.data.packing import collate_rows
    from afina.models.adapters import apply_method
    from afina.models.loading import load_model
    from afina.training.loss import sft_loss_sum
    from afina.training.precision import resolve_precision

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import LORA, afina_row_length, load_data

    _, examples, _, tokenizer = load_data(args.model, 1.0)
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    torch.manual_seed(0)
    model = apply_method(load_model(args.model, dtype=torch.bfloat16 if bf16 else torch.float32),
                         LoraMethod(**LORA))
    model.train()
    longest = [e for e in examples if len(e.input_ids) >= max(SIZES) and any(e.trained[-min(SIZES):])]
    if len(longest) < EXAMPLES:
        sys.exit(f"needs {EXAMPLES} examples of at least {max(SIZES)} tokens that train their last {min(SIZES)}")
    batches = {size: collate_rows([[dataclasses.replace(e, input_ids=e.input_ids[-size:], trained=e.trained[-size:])
                                    for e in longest[:EXAMPLES]]], tokenizer.pad_token_id) for size in SIZES}

    def seconds(batch) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss_sum(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(args.rounds + 2):
        for size, batch in batches.items():
            times[size].append(seconds(batch))
    tokens = [batches[size].tokens for size in SIZES]
    medians = [statistics.median(times[size][2:]) * 1000 for size in SIZES]
    per_token, fixed = statistics.linear_regression(tokens, medians)
    row = afina_row_length(examples)
    print(f"forward + backward of one micro-batch ({EXAMPLES} examples each), median of {args.rounds} rounds:")
    for count, ms in zip(tokens, medians):
        print(f"  {count:>4} tokens: {ms:,.0f} ms")
    print(f"fit: {fixed:,.0f} ms per micro-batch + {per_token:.2f} ms per token; a packed row of {row} tokens: "
          f"{fixed / (fixed + per_token * row):.0%} of its time is the fixed part")


if __name__ == "__main__":
    main()
