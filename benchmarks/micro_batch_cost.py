"""What a micro-batch costs whatever its size: forward and backward time against tokens, in one process.

    python benchmarks/micro_batch_cost.py                 # default model, bundled tickets
    python benchmarks/micro_batch_cost.py --model path/to/tiny --rounds 2   # smoke run

Builds the model as `train_speed.py`'s afina does (LoRA r=16 on every linear layer, bf16 frozen base
and autocast where the CPU has native bf16) and times forward and backward of micro-batches of four
examples, each cut to its last 8, 32, 64 or 128 tokens with the last quarter of each trained, so the
vocabulary head's work grows with the tokens like the rest. The sizes take turns, starting from a
different one each round, so the machine's drift hits all alike; four sizes need more kernels than
oneDNN's cache holds (64), so each micro-batch builds its kernels again, as a training micro-batch
with new row lengths does. A least-squares line through the medians splits a micro-batch's time into
a fixed part (paid once per micro-batch: every frozen weight read by its matmuls in both directions,
per-operation overhead, kernels built for the new shapes) and a part per token; the report gives the
fixed part's share of a micro-batch as long as one of train_speed's packed rows. That share is why
fewer, longer micro-batches train faster; it is what their extra activation memory buys.
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

    from afina.data.packing import collate_rows
    from afina.training.losses import sft_loss_sum

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import afina_in_training, afina_row_length

    examples, tokenizer, model, bf16 = afina_in_training(args.model)
    long_enough = [e for e in examples if len(e.input_ids) >= max(SIZES)][:EXAMPLES]
    if len(long_enough) < EXAMPLES:
        sys.exit(f"needs {EXAMPLES} examples of at least {max(SIZES)} tokens")
    batches = {size: collate_rows([[cut_example(e, size) for e in long_enough]], tokenizer.pad_token_id)
               for size in SIZES}

    def time_micro_batch(batch) -> float:
        """Seconds of one forward and backward pass (gradients dropped before the clock starts)."""
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss_sum(model, batch)
        loss.backward()
        return time.perf_counter() - started

    times: dict[int, list[float]] = {size: [] for size in SIZES}
    for round_ in range(args.rounds + 2):
        for index in range(len(SIZES)):
            size = SIZES[(index + round_) % len(SIZES)]
            times[size].append(time_micro_batch(batches[size]))
    tokens = [batches[size].tokens for size in SIZES]
    medians = [statistics.median(times[size][2:]) * 1000 for size in SIZES]
    per_token, fixed = statistics.linear_regression(tokens, medians)
    row = afina_row_length(examples)
    print(f"forward + backward of one micro-batch ({EXAMPLES} examples each), median of {args.rounds} rounds:")
    for count, ms in zip(tokens, medians):
        print(f"  {count:>4} tokens: {ms:,.0f} ms")
    print(f"fit: {fixed:,.0f} ms per micro-batch + {per_token:.2f} ms per token; a packed row of {row} tokens: "
          f"{fixed / (fixed + per_token * row):.0%} of its time is the fixed part")


def cut_example(example, size: int):
    """The example's last `size` tokens, the last quarter of them trained."""
    trained = size // 4
    return dataclasses.replace(example, input_ids=example.input_ids[-size:], trained=[False] * (size - trained)
                               + [True] * trained)


if __name__ == "__main__":
    main()
