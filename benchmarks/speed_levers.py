"""Where afina's training speed comes from: each lever switched on in turn, measured on its own.

    python benchmarks/speed_levers.py                  # default model, bundled tickets
    python benchmarks/speed_levers.py --steps 2 --model path/to/tiny   # smoke run

LoRA r=16 on every linear layer, 8 examples per optimizer step, the same examples in the same
order for every setting. Settings are cumulative, from the plain path most trainers take to
afina's default; each runs in a fresh process (its own peak RSS), tokens/s counts non-padding
tokens over `--steps` optimizer steps after one untimed warm-up step, median of `--repeats` rounds
in which every setting runs once; "vs previous, same round" is the median of the per-round ratios,
free of the machine's drift between minutes.

  plain            padded batches of 8, logits at every position, fp32
  +packing         the 8 examples packed in one row, positions restart per example
  +trained_logits  vocabulary projection and cross-entropy only at trained positions (chunked)
  +bf16_autocast   bf16 matmuls where the CPU has native bf16 (AVX512-BF16/AMX)
  +bf16_weights    the frozen base kept in bf16 (LoRA weights and optimizer stay fp32)
  +short_rows      rows of 384 tokens accumulated, instead of one long row per step
  +fused_lora      each LoRA layer as one autograd node instead of PEFT's cast, dropout, two linears,
                   scale and add (afina.models.fused_lora)
  +packed_attention  each packed example attends to itself in its own block instead of the row under
                   a block-diagonal mask (afina.models.attention)
  +fused_layers    RMSNorm and the SwiGLU block as one autograd node each (afina.models.fused_layers)
  +fused_cross_entropy  each chunk's head and cross-entropy gradients computed in forward, no logits
                   kept or recomputed (afina.training.losses.LinearCrossEntropy)
  +kept_probabilities  packed attention keeps each layer's probabilities for backward instead of
                   recomputing them from q and k (up to 8 MiB a layer)
  +fused_adamw     PyTorch's fused AdamW (one kernel for all parameters) instead of its per-parameter loop
  +allocator       the process under the allocator the `afina` command starts under (tcmalloc where
                   installed, afina.training.allocator) instead of glibc's malloc
  +shared_prefixes the step's 8 examples in one row again, each after the first reading the prefix
                   (system prompt) it shares with the first instead of holding it (afina.data.packing)
  +compile         torch.compile of the decoder (measured; afina leaves it off if it does not pay)
  threads=1        afina's default on one thread instead of all cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LEVERS = ["plain", "+packing", "+trained_logits", "+bf16_autocast", "+bf16_weights", "+short_rows", "+fused_lora",
          "+packed_attention", "+fused_layers", "+fused_cross_entropy", "+kept_probabilities", "+fused_adamw",
          "+allocator", "+shared_prefixes", "+compile"]
DEFAULT = "+shared_prefixes"  # the last lever afina keeps on
EXAMPLES_PER_STEP = 8


def settings(name: str) -> dict:
    """The flags of a cumulative setting; `threads=1` is afina's default on one thread."""
    if name == "threads=1":
        return {**settings(DEFAULT), "threads": 1}
    on = LEVERS[: LEVERS.index(name) + 1]
    return {lever.strip("+"): lever in on for lever in LEVERS[1:]}


def worker(job: dict) -> dict:
    import torch
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from afina.config.methods import LoraMethod
    from afina.data.packing import collate_rows, pack_examples
    from afina.models import attention, methods
    from afina.models.methods import apply_method, trainable_parameters
    from afina.training.optimizer import make_optimizer
    from afina.models.fused_layers import is_fused
    from afina.models.fused_lora import FusedLoraLinear
    from afina.models.loading import load_model
    from afina.training import losses as loss_module
    from afina.training.allocator import running_allocator
    from afina.training.losses import plain_loss_sum, sft_loss_sum

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import LORA, load_data

    flags = job["flags"]
    if "threads" in flags:
        torch.set_num_threads(flags["threads"])
    _, examples, _, tokenizer = load_data(job["model"], 1.0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if flags["bf16_weights"] else torch.float32
    model = apply_method(load_model(job["model"], dtype=dtype), LoraMethod(**LORA))
    if not flags["fused_lora"]:  # PEFT's own layers
        for module in model.modules():
            if isinstance(module, FusedLoraLinear):
                module.__class__ = PeftLoraLinear
    if not flags["packed_attention"]:  # transformers' SDPA under the block-diagonal mask
        methods.packed_layout = lambda position_ids, examples=None: {}
    if not flags["fused_layers"]:  # transformers' RMSNorm and SwiGLU modules
        for module in model.modules():
            if is_fused(module):
                module.__class__ = type(module).__mro__[1]
    if not flags["fused_cross_entropy"]:  # autograd's cross-entropy on each chunk's logits
        loss_module.fuses_head = lambda head: False
    if not flags["kept_probabilities"]:  # recomputed from q and k in backward
        attention.KEPT_PROBABILITIES_BYTES = 0
    if flags["compile"]:
        model.get_base_model().model = torch.compile(model.get_base_model().model, dynamic=True)
    parameters = trainable_parameters(model).values()
    optimizer = make_optimizer(parameters, 2e-4, 0.0) if flags["fused_adamw"] else \
        torch.optim.AdamW(parameters, lr=2e-4, foreach=False)
    loss_sum = sft_loss_sum if flags["trained_logits"] else plain_loss_sum
    pad = tokenizer.pad_token_id
    groups = [examples[i : i + EXAMPLES_PER_STEP] for i in range(0, len(examples), EXAMPLES_PER_STEP)]
    steps = []
    for group in groups[: job["steps"] + 1]:
        if flags["shared_prefixes"]:
            steps.append([collate_rows([group], pad, share_prefixes=True)])
        elif flags["short_rows"]:
            steps.append([collate_rows([row], pad) for row in pack_examples(group, 384)])
        elif flags["packing"]:
            steps.append([collate_rows([[e for e in group]], pad)])
        else:
            steps.append([collate_rows([[e] for e in group], pad)])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if flags["bf16_autocast"] else None
    times, tokens = [], []
    for micro_batches in steps:
        started = time.perf_counter()
        step_tokens = sum(b.trained_tokens for b in micro_batches)
        for batch in micro_batches:
            if autocast:
                with autocast():
                    loss = loss_sum(model, batch) / step_tokens
            else:
                loss = loss_sum(model, batch) / step_tokens
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        tokens.append(sum(b.tokens for b in micro_batches))
    return {"tokens_per_second": sum(tokens[1:]) / sum(times[1:]), "first_step_seconds": times[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "allocator": running_allocator()}


def measure(job: dict) -> dict:
    from afina.training.allocator import allocator_environment

    # an empty LD_PRELOAD keeps glibc's malloc; the allocator lever starts the worker as the afina command starts
    allocator = allocator_environment() if job["flags"]["allocator"] else {"LD_PRELOAD": ""}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", **allocator})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def paired_ratio(runs: list[dict], before: list[dict]) -> float:
    """Median over rounds of a setting's tokens/s over the previous setting's in the same round."""
    pairs = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(runs, before)
             if "error" not in a and "error" not in b]
    return statistics.median(pairs) if pairs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated settings to run (default: all)")
    parser.add_argument("--out", default="results/speed_levers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    names = args.only.split(",") if args.only else LEVERS + ["threads=1"]
    lines = [f"# Speed levers ({args.model} model, LoRA r=16, {EXAMPLES_PER_STEP} examples per step, "
             f"median of {args.repeats} runs of {args.steps} steps)", "",
             "| setting | tokens/s | vs plain | vs previous | vs previous, same round | peak RSS (MiB) | first step (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):  # rounds of every setting, so the machine's drift hits each alike
        for name in names:
            runs[name].append(measure({"model": args.model, "steps": args.steps, "flags": settings(name)}))
            print("round", round_, name, runs[name][-1].get("tokens_per_second", runs[name][-1].get("error")),
                  flush=True)
    results: dict[str, dict] = {}
    previous = None
    for name in names:
        good = [r for r in runs[name] if "error" not in r]
        if not good:
            results[name] = runs[name][0]
            lines.append(f"| {name} | failed: {runs[name][0]['error'][:80]} | | | | | |")
            continue
        result = {key: statistics.median(r[key] for r in good) for key in good[0] if key != "allocator"}
        result["allocator"] = good[0]["allocator"]
        results[name] = result
        plain = results.get("plain", result)["tokens_per_second"]
        before = previous["tokens_per_second"] if previous else result["tokens_per_second"]
        paired = paired_ratio(runs[name], runs[previous_name]) if previous else 1.0
        lines.append(f"| {name} | {result['tokens_per_second']:,.0f} | {result['tokens_per_second'] / plain:.2f}x | "
                     f"{result['tokens_per_second'] / before:.2f}x | {paired:.2f}x | {result['peak_rss_mib']:,.0f} | "
                     f"{result['first_step_seconds']:.1f} |")
        if name != "threads=1":
            previous, previous_name = result, name
    print("\n".join(lines[4:]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
