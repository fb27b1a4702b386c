"""`torch.compile` of the decoder layers with static shapes, against afina's eager layers, in one process.

    python benchmarks/compile_layers.py                 # default model, bundled tickets
    python benchmarks/compile_layers.py --model path/to/tiny --rounds 1   # smoke run

Compiling the whole model with dynamic shapes never paid for itself here (`speed_levers.py`'s
`+compile`: every new packed-row length recompiles). This measures the version that could: each
decoder layer compiled once (`dynamic=False`; the layers share one graph), rows padded to the row
length so every micro-batch has the same shape, and packed attention left out of the graph (its
blocks take the shape of each row's examples) and run eagerly. The model is built as
`train_speed.py`'s afina, and forward and backward of the same packed row take turns between three
settings, starting from a different one each round, so the machine's drift hits all alike:

  eager         afina as it trains: the row as packed
  eager_padded  the row padded to the row length (the shapes compiling needs), eager
  compiled      the padded row through the compiled layers

Reports the compile time (the first compiled micro-batch, with inductor's on-disk cache as it is),
time per non-padding token, each setting's speed over eager as the median of its ratios within a
round, and the largest relative difference between the compiled and the eager loss on the same rows.
Inductor compiles C++ kernels: it needs a C++ compiler at run time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SETTINGS = ("eager", "eager_padded", "compiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, after one warm-up round")
    args = parser.parse_args()

    import torch
    from transformers import AttentionInterface

    from afina.data.packing import collate_rows, pack_examples
    from afina.models import attention
    from afina.models.methods import unwrap
    from afina.training.losses import sft_loss_sum

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import afina_in_training, afina_row_length

    examples, tokenizer, model, bf16 = afina_in_training(args.model)
    row_length = afina_row_length(examples)
    rows = [row for row in pack_examples(examples, row_length) if sum(len(e.input_ids) for e in row) <= row_length]
    if len(rows) < args.rounds + 1:
        sys.exit(f"needs {args.rounds + 1} packed rows; the data gives {len(rows)}")
    pad = tokenizer.pad_token_id
    layers = unwrap(model).model.layers
    # attention runs eagerly inside the compiled layers: a graph break around it
    AttentionInterface.register(attention.IMPLEMENTATION, torch.compiler.disable(attention.packed_attention))

    def micro_batch(setting: str, row: list) -> tuple[float, float]:
        """Seconds of one forward and backward pass over `row` in `setting`, and its loss."""
        batch = collate_rows([row], pad, length=0 if setting == "eager" else row_length)
        for layer in layers:
            if setting == "compiled":
                layer.compile(dynamic=False)
            else:
                layer._compiled_call_impl = None  # nn.Module.compile's hook: None runs the layer's own forward
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss_sum(model, batch)
        loss.backward()
        return time.perf_counter() - started, float(loss.detach())

    compile_seconds, _ = micro_batch("compiled", rows[0])
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    losses: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    tokens = []
    for round_ in range(args.rounds + 1):
        row = rows[round_]
        tokens.append(sum(len(e.input_ids) for e in row))
        for index in range(len(SETTINGS)):
            setting = SETTINGS[(index + round_) % len(SETTINGS)]
            seconds, loss = micro_batch(setting, row)
            times[setting].append(seconds)
            losses[setting].append(loss)
    print(f"rows of {row_length} tokens; first compiled micro-batch (compiling included): {compile_seconds:.1f} s")
    print(f"forward + backward of one packed row, median of {args.rounds} rounds after one warm-up round:")
    for setting in SETTINGS:
        per_token = statistics.median(t / n for t, n in zip(times[setting][1:], tokens[1:])) * 1000
        ratio = statistics.median(e / t for e, t in zip(times["eager"][1:], times[setting][1:]))
        print(f"  {setting:<13} {per_token:.3f} ms per token, {ratio:.3f}x eager's speed")
    drift = max(abs(c - e) / abs(e) for c, e in zip(losses["compiled"], losses["eager"]))
    print(f"largest relative difference between the compiled and the eager loss: {drift:.1e}")


if __name__ == "__main__":
    main()
