"""LoRA dropout's cost: afina's keep masks against `bernoulli_` masks, in one process, steps alternating.

    python benchmarks/dropout_masks.py                 # default model, bundled tickets, dropout 0.05
    python benchmarks/dropout_masks.py --model path/to/tiny --steps 2   # smoke run

Trains the default model with LoRA r=16 on every linear layer at the given dropout, as `afina train`
does (one packed row per optimizer step, shared prefixes read once, bf16 where the CPU has it), and alternates
optimizer steps between the two ways of drawing each layer's keep mask: PyTorch's `bernoulli_` (one
Mersenne Twister draw per element, what `nn.Dropout` does on a CPU) and afina's `keep_mask` (four
16-bit uniforms per 64-bit draw). Alternating steps of one model puts the machine's drift on both
alike. Prints the median tokens/s of each and the median of their per-step ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind, after one warm-up each")
    args = parser.parse_args()

    import torch

    from afina.data.packing import collate_rows, epoch_steps
    from afina.models import fused_lora
    from afina.models.methods import trainable_parameters
    from afina.training.optimizer import make_optimizer
    from afina.training.losses import sft_loss_sum

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import ROWS_PER_STEP, afina_model, afina_row_length, load_data

    _, examples, _, tokenizer = load_data(args.model, 1.0)
    row_length = afina_row_length(examples)
    model, bf16 = afina_model(args.model, args.dropout)
    optimizer = make_optimizer(trainable_parameters(model).values(), 2e-4, 0.0)
    afina_masks = fused_lora.keep_mask

    def step(rows, masks) -> float:
        fused_lora.keep_mask = masks
        micro = [collate_rows([row], tokenizer.pad_token_id, share_prefixes=True) for row in rows]
        trained = sum(b.trained_tokens for b in micro)
        started = time.perf_counter()
        for batch in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = sft_loss_sum(model, batch) / trained
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(b.tokens for b in micro) / (time.perf_counter() - started)

    steps = epoch_steps(examples, row_length, ROWS_PER_STEP, 0, 0, share_prefixes=True)
    speeds: dict[str, list[float]] = {"bernoulli_": [], "afina": []}
    for index, rows in enumerate(steps[: args.steps + 1]):
        order = [("bernoulli_", fused_lora.bernoulli_mask), ("afina", afina_masks)]
        for name, masks in order if index % 2 else order[::-1]:
            speeds[name].append(step(rows, masks))
    ratios = [a / b for a, b in zip(speeds["afina"][1:], speeds["bernoulli_"][1:])]
    fused_lora.keep_mask = afina_masks
    print(f"LoRA dropout {args.dropout}, {args.steps} steps of each after one warm-up:")
    for name, values in speeds.items():
        print(f"  {name} masks: {statistics.median(values[1:]):,.0f} tokens/s")
    print(f"  afina / bernoulli_: {statistics.median(ratios):.2f}x (median of per-step ratios)")


if __name__ == "__main__":
    main()
