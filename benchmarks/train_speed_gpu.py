"""GPU training speed: afina's packed LoRA step against plain HF + PEFT, side by side, per model size.

    python benchmarks/train_speed_gpu.py                            # Llama-3.2-1B and Llama-3.1-8B shapes, CUDA
    python benchmarks/train_speed_gpu.py --sizes 8b --steps 20      # one size, more timed steps
    python benchmarks/train_speed_gpu.py --sizes tiny --device cpu --steps 2 --warmup 1 --seq-len 128  # smoke run

Models are Llama-architecture configs with random weights (nothing is downloaded), built directly on
the GPU in bf16. Both systems train LoRA r=16 alpha=32 dropout=0 on every linear layer (PEFT), AdamW
at lr 2e-4, gradient clipping at 1.0, bf16 autocast on CUDA (fp32 on CPU), no gradient checkpointing:
  hf_peft  the baseline: attn_implementation="sdpa", examples right-padded to --seq-len (or to the
           longest in the micro-batch with --baseline-padding longest), `model(input_ids,
           attention_mask, labels)` with labels -100 on prompt and padding, --micro-batch examples
           per forward, gradient accumulation over the step's examples
  afina    afina's path: the step's examples packed into --micro-batch rows of --seq-len tokens with
           position ids restarting per example (`pack_examples`, `collate_rows`), loss by
           `sft_loss_sum` (vocabulary projection only at trained positions, chunked cross-entropy),
           LoRA by `apply_method`; flash_attention_2 (varlen) when flash_attn is installed, else sdpa;
           Liger's RoPE, RMSNorm and SwiGLU kernels when liger_kernel is installed

Data: seeded random-token examples of seq_len/16..seq_len/2 tokens (128..1024 at 2048), the last 30%
of each trained (the "assistant" answer). One optimizer step is the consecutive examples that fill
--micro-batch packed rows; both systems train on exactly the same steps, so they process the same
tokens and the tokens/s ratio is the inverse ratio of step times.

Measured per system, each in its own process (so memory and patched kernels never leak between
them): non-padding tokens per second over --steps optimizer steps after --warmup untimed ones
(torch.cuda.synchronize around the timed span), peak GPU memory (torch.cuda.max_memory_allocated;
peak resident memory on CPU) and model FLOPs utilization:

    MFU = step FLOPs summed over the timed steps / seconds / peak dense bf16 FLOP/s

    step FLOPs = 4 * N_linear * tokens                     frozen base: forward 2N + activation grads 2N,
                                                           no weight grads (6N would count those)
               + 4 * hidden * vocab * trained_tokens       output projection, only where a loss needs it
               + 12 * layers * hidden * sum_e s_e (s_e + 1) / 2
                                                           attention: QK^T and PV (2 matmuls x 2 FLOPs per
                                                           multiply-add) over a causal context of t + 1 keys
                                                           for the token at position t of an example of
                                                           length s_e; backward twice the forward

N_linear counts the q, k, v, o, gate, up and down weights of the decoder blocks (the embedding is a
lookup, not a matmul); LoRA's own FLOPs (under 1% at r=16) and recomputation are not counted. These
are model FLOPs, the useful work of the examples: padding, projections at untrained positions and
recomputed logits earn nothing, and both systems are credited the same FLOPs for the same steps.
Peak is looked up from the GPU's name (H100 SXM 989, H100 PCIe 756, H200 989, A100 312, L4 121,
A10G 125 TFLOP/s); --peak-tflops overrides. Writes results.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0
ANSWER_SHARE = 0.3  # the trained tail of each example
PAD_ID = 0  # synthetic token ids start at 1, so padding is never a real token
SEED = 0
SYSTEMS = ("hf_peft", "afina")
GOAL_RATIO, GOAL_MFU, GOAL_MFU_SIZE = 1.5, 0.35, "8b"
LLAMA3 = {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
          "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 176, "vocab_size": 512, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True},  # Llama-3.2-1B
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False},  # Llama-3.1-8B
}
# Packed rows (afina) or padded examples (hf_peft) per forward: sized so that hf_peft's full-vocabulary
# fp32 logits and both systems' activations fit an 80 GB GPU without gradient checkpointing.
MICRO_BATCH = {"tiny": 2, "1b": 4, "8b": 2}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = [(r"H200", 989.0), (r"H100.*PCIE", 756.0), (r"H100(?!.*NVL)", 989.0), (r"A100", 312.0),
               (r"A10G", 125.0), (r"\bL4\b", 121.0)]


# ---------------------------------------------------------------- shared: data, FLOPs, peaks

def synthetic_examples(count: int, seq_len: int, vocab: int, seed: int):
    """Random-token examples of seq_len/16..seq_len/2 tokens whose last ANSWER_SHARE is trained."""
    from afina.data.tokenize import Example

    rng = random.Random(seed)
    low, high = max(4, seq_len // 16), max(8, seq_len // 2)
    examples = []
    for index in range(count):
        length = rng.randint(low, high)
        answer = max(1, round(length * ANSWER_SHARE))
        examples.append(Example([rng.randrange(1, vocab) for _ in range(length)],
                                [False] * (length - answer) + [True] * answer, line=index + 1))
    return examples


def step_examples(examples: list, seq_len: int, rows: int, steps: int) -> list[list]:
    """Split consecutive examples into optimizer steps, each as many as `rows` packed rows hold.

    Both systems train on these same steps; a step that is not full (the last) is dropped.
    """
    from afina.data.packing import pack_examples

    groups, current = [], []
    for example in examples:
        if current and len(pack_examples(current + [example], seq_len)) > rows:
            groups.append(current)
            current = []
        current.append(example)
    if len(groups) < steps:
        raise SystemExit(f"only {len(groups)} steps of data for {steps}; generate more examples")
    return groups[:steps]


def linear_parameters(config) -> int:
    """Weights of the q, k, v, o, gate, up and down projections of all decoder blocks."""
    hidden, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config.intermediate_size
    return per_layer * config.num_hidden_layers


def step_flops(config, group: list) -> float:
    """Model FLOPs of one LoRA optimizer step over `group` (the formula in the module docstring)."""
    tokens = sum(len(e.input_ids) for e in group)
    trained = sum(e.trained_count for e in group)
    contexts = sum(len(e.input_ids) * (len(e.input_ids) + 1) / 2 for e in group)
    return (4 * linear_parameters(config) * tokens + 4 * config.hidden_size * config.vocab_size * trained
            + 12 * config.num_hidden_layers * config.hidden_size * contexts)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name, or None when unknown (then MFU needs --peak-tflops)."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name.upper()):
            return tflops
    return None


def llama_config(size: str, attn_implementation: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**SIZES[size], **LLAMA3, pad_token_id=PAD_ID, use_cache=False)
    config._attn_implementation = attn_implementation
    return config


def build_model(config, device, dtype):
    """Random weights allocated straight on `device` in `dtype`: an 8B model never passes through CPU RAM."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=config._attn_implementation)
    return model.train()


# ---------------------------------------------------------------- the two systems

def hf_peft_steps(groups: list, seq_len: int, micro_batch: int, padding: str, device) -> list[list[tuple]]:
    """Each step's examples as padded micro-batches (input_ids, attention_mask, labels, trained)."""
    import torch

    steps = []
    for group in groups:
        micro = []
        for start in range(0, len(group), micro_batch):
            chunk = group[start : start + micro_batch]
            length = seq_len if padding == "max-length" else max(len(e.input_ids) for e in chunk)
            ids, mask, labels = [], [], []
            for e in chunk:
                pad = length - len(e.input_ids)
                ids.append(e.input_ids + [PAD_ID] * pad)
                mask.append([1] * len(e.input_ids) + [0] * pad)
                # HF shifts labels inside the loss: label t is predicted at position t - 1.
                labels.append([t if trained else -100 for t, trained in zip(e.input_ids, e.trained)] + [-100] * pad)
            label_tensor = torch.tensor(labels, device=device)
            micro.append((torch.tensor(ids, device=device), torch.tensor(mask, device=device), label_tensor,
                          int((label_tensor != -100).sum())))
        steps.append(micro)
    return steps


def hf_peft_step(model, micro: list[tuple], autocast) -> "torch.Tensor":
    """One optimizer step's forward and backward passes; the loss is the mean over the step's trained tokens."""
    step_trained = sum(m[3] for m in micro)
    total = 0.0
    for input_ids, attention_mask, labels, trained in micro:
        with autocast():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss = loss * (trained / step_trained)  # HF averages per micro-batch; reweight to the step's mean
        loss.backward()
        total = total + loss.detach()
    return total


def afina_steps(groups: list, seq_len: int, flatten: bool, device) -> list[list]:
    """Each step's examples packed into rows; one micro-batch per step (rows never exceed --micro-batch)."""
    from afina.data.packing import Batch, collate_rows, pack_examples

    steps = []
    for group in groups:
        batch = collate_rows(pack_examples(group, seq_len), PAD_ID)
        if flatten:
            # transformers runs flash-attention varlen from position ids only for batch size 1
            # (`_is_packed_sequence`); with several rows it would attend causally across examples.
            # Rows restart positions per example, so laying them end to end changes nothing else (the
            # examples table already counts tokens end to end).
            batch = Batch(batch.input_ids.reshape(1, -1), batch.position_ids.reshape(1, -1),
                          batch.targets.reshape(1, -1), batch.trained_tokens, batch.tokens, batch.examples)
        steps.append([batch.to(device)])
    return steps


def afina_step(model, micro: list, autocast) -> "torch.Tensor":
    """afina's loop body: summed loss over the trained positions divided by the step's trained tokens."""
    from afina.training.losses import sft_loss_sum

    step_trained = sum(b.trained_tokens for b in micro)
    total = 0.0
    for batch in micro:
        with autocast():
            loss = sft_loss_sum(model, batch) / step_trained
        loss.backward()
        total = total + loss.detach()
    return total


def packing_check(model, row: list, autocast) -> dict:
    """Does a packed example see only itself? Compares the hidden states of a row's last example, packed
    behind the others (positions restart), with those of the example alone, against the change when the
    row's examples are simply concatenated (positions continue, so attention crosses). With RoPE only
    the extra keys differ, so an isolated example changes by rounding noise and a crossing one by a lot."""
    import torch

    from afina.data.packing import collate_rows
    from afina.data.tokenize import Example
    from afina.models.methods import body_and_head

    body, _ = body_and_head(model)
    device = next(model.parameters()).device
    last = row[-1]
    joined = Example([t for e in row for t in e.input_ids], [False] * sum(len(e.input_ids) for e in row), line=0)

    def last_hidden(examples: list) -> torch.Tensor:
        batch = collate_rows([examples], PAD_ID).to(device)
        with torch.no_grad(), autocast():
            hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        return hidden[0, batch.tokens - len(last.input_ids) : batch.tokens].float()

    alone = last_hidden([last])
    packed = float((last_hidden(row) - alone).norm() / alone.norm())
    crossing = float((last_hidden([joined]) - alone).norm() / alone.norm())
    return {"examples_in_row": len(row), "packed_change": packed, "crossing_change": crossing,
            "isolated": packed < 0.2 * crossing}


def apply_liger() -> str | None:
    """Liger's fused RoPE, RMSNorm and SwiGLU for Llama; returns why not, if it cannot be applied.

    It patches transformers' classes, so it runs before the model is built, in the afina worker only.
    The loss stays afina's (trained positions only, chunked), so Liger's cross-entropy and fused
    linear cross-entropy stay off.
    """
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    except Exception as exc:  # an installed Liger built for another transformers should not sink the run
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- worker (one process per system)

def run_worker(job: dict) -> dict:
    """Build one system, train warm-up then timed steps, and measure them."""
    import torch

    device = torch.device(job["device"])
    if device.type == "cpu":
        # The CPU run checks the code path on a tiny model, it measures nothing: one thread spares it
        # OpenMP's spinning on a busy shared CPU (twice as fast there).
        torch.set_num_threads(1)
    autocast = autocast_for_device(device)
    afina = job["system"] == "afina"
    # Kernels first: Liger patches the classes the model is built from, and the attention
    # implementation is fixed in the config.
    liger = afina and device.type == "cuda" and _installed("liger_kernel")
    liger_error = apply_liger() if liger else None
    flash = afina and device.type == "cuda" and _flash_attention_available()
    config = llama_config(job["size"], "flash_attention_2" if flash else "sdpa")
    examples = synthetic_examples(job["examples"], job["seq_len"], config.vocab_size, SEED)
    groups = step_examples(examples, job["seq_len"], job["micro_batch"], job["warmup"] + job["steps"])
    model, steps, run_step = prepare_system(job, config, groups, flash, device)
    seconds, loss = time_steps(model, steps, run_step, job["warmup"], autocast, device)
    timed, last = groups[job["warmup"] :], steps[-1][0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attn_implementation": config._attn_implementation, "liger": liger and liger_error is None,
        "batching": "packed rows" if afina else f"padded to {job['padding']}", "seconds": seconds,
        "tokens": sum(len(e.input_ids) for g in timed for e in g),
        "trained_tokens": sum(e.trained_count for g in timed for e in g),
        "examples": sum(len(g) for g in timed), "forwards_per_step": len(steps[-1]),
        "forward_shape": list((last.input_ids if afina else last[0]).shape),
        "flops": sum(step_flops(config, g) for g in timed), "last_loss": loss,
        "trainable_parameters": trainable,
        "frozen_parameters": sum(p.numel() for p in model.parameters()) - trainable,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                            else _peak_rss_bytes()) / 2**30,
        "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident memory",
    }
    result["tokens_per_second"] = result["tokens"] / seconds
    if liger_error:
        result["liger_error"] = liger_error
    if afina:
        from afina.data.packing import pack_examples

        row = next(r for g in groups for r in pack_examples(g, job["seq_len"]) if len(r) >= 2)
        result["packing_check"] = packing_check(model, row, autocast)
    return result


def prepare_system(job: dict, config, groups: list, flash: bool, device) -> tuple:
    """The LoRA model on `device`, each step's micro-batches, and the function that runs one step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from afina.config.methods import LoraMethod
    from afina.models.methods import apply_method

    model = build_model(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if job["system"] == "afina":
        return (apply_method(model, LoraMethod(**LORA)), afina_steps(groups, job["seq_len"], flash, device),
                afina_step)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return (get_peft_model(model, lora),
            hf_peft_steps(groups, job["seq_len"], job["micro_batch"], job["padding"], device), hf_peft_step)


def time_steps(model, steps: list, run_step, warmup: int, autocast, device) -> tuple[float, float]:
    """Seconds for the steps after `warmup` (the GPU drained at both ends) and the last step's loss.

    The same optimizer step for both systems: AdamW on the LoRA weights, clipping, zeroed gradients.
    No value is read back inside the timed span, so no step waits for the GPU.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def train_step(micro) -> torch.Tensor:
        loss = run_step(model, micro, autocast)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for micro in steps[:warmup]:  # kernel selection, allocator growth, optimizer state
        train_step(micro)
    _sync(device)
    started = time.perf_counter()
    for micro in steps[warmup:]:
        loss = train_step(micro)
    _sync(device)
    return time.perf_counter() - started, float(loss)


def autocast_for_device(device):
    """bf16 autocast on CUDA, as afina's loop does there (precision auto); fp32 on CPU."""
    from afina.devices import autocast_for

    return autocast_for("bf16" if device.type == "cuda" else "fp32", device)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- driver

def measure(job: dict) -> dict:
    """Run one system in a fresh Python process; returns its JSON result (or the error it died with)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def examples_needed(seq_len: int, micro_batch: int, steps: int) -> int:
    """Enough examples for `steps` full steps: rows hold about seq_len / mean length examples each."""
    mean_length = (max(4, seq_len // 16) + max(8, seq_len // 2)) / 2
    return int((steps + 2) * micro_batch * seq_len / mean_length * 1.5) + 8


def check_arguments(args) -> str | None:
    """What is wrong with the command line, in words a user can act on, or None."""
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        return f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}"
    if args.device == "cpu" and args.sizes != ["tiny"]:
        return "--device cpu is only for the smoke run: use it with --sizes tiny"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return ("no CUDA GPU found: this benchmark needs one (for a CPU smoke run: "
                    "--sizes tiny --device cpu --steps 2 --warmup 1 --seq-len 128)")
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 32:
        return "--steps must be >= 1, --warmup >= 0 and --seq-len >= 32"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,8b", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--seq-len", type=int, default=2048, help="packed row length and padded length")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing")
    parser.add_argument("--micro-batch", type=int, help="packed rows (afina) or padded examples (hf_peft) per "
                        f"forward; default per size {MICRO_BATCH}")
    parser.add_argument("--baseline-padding", choices=["max-length", "longest"], default="max-length",
                        help="pad hf_peft examples to --seq-len or to the longest in each micro-batch")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, overriding the lookup")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="results/train_speed_gpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    problem = check_arguments(args)
    if problem:
        print(f"train_speed_gpu: {problem}", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    for size in args.sizes:
        micro_batch = args.micro_batch or MICRO_BATCH[size]
        job = {"size": size, "device": args.device, "seq_len": args.seq_len, "steps": args.steps,
               "warmup": args.warmup, "micro_batch": micro_batch, "padding": args.baseline_padding,
               "examples": examples_needed(args.seq_len, micro_batch, args.warmup + args.steps)}
        results[size] = {}
        for system in SYSTEMS:
            print(f"{size} {system}: building the model, {args.warmup} warm-up + {args.steps} timed steps ...",
                  flush=True)
            results[size][system] = measure({**job, "system": system})
            outcome = results[size][system]
            print(f"{size} {system}: " + (f"{outcome['tokens_per_second']:,.0f} tokens/s, "
                                          f"{outcome['peak_memory_gib']:.1f} GiB" if "error" not in outcome
                                          else f"failed: {outcome['error']}"), flush=True)
    report = write_report(results, args, Path(args.out))
    print(report)
    print(f"results in {args.out}/results.md and results.json")
    return 0 if all("error" not in r for size in results.values() for r in size.values()) else 1


# ---------------------------------------------------------------- report

def add_derived(results: dict, args) -> str:
    """Add MFU and ratios to the results; return the GPU's name."""
    names = [r["device_name"] for size in results.values() for r in size.values() if "device_name" in r]
    device_name = names[0] if names else args.device
    peak = args.peak_tflops or (peak_tflops(device_name) if args.device == "cuda" else None)
    for size in results.values():
        base = size.get("hf_peft", {}).get("tokens_per_second")
        for result in size.values():
            if "error" in result:
                continue
            result["peak_tflops"] = peak
            result["mfu"] = result["flops"] / result["seconds"] / (peak * 1e12) if peak else None
            result["flops_per_token"] = result["flops"] / result["tokens"]
            result["ratio_to_hf_peft"] = result["tokens_per_second"] / base if base else None
    return device_name


def write_report(results: dict, args, out: Path) -> str:
    device_name = add_derived(results, args)
    peak = next((r["peak_tflops"] for s in results.values() for r in s.values() if r.get("peak_tflops")), None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device_name": device_name, "peak_tflops": peak,
                                                  "results": results, "args": vars(args)}, indent=2))
    lines = [f"# GPU training speed: afina vs HF + PEFT (LoRA r={LORA['r']}, sequence length {args.seq_len})", "",
             f"Device: {device_name}; dense bf16 peak: " + (f"{peak:,.0f} TFLOP/s" if peak else
                                                           "unknown (pass --peak-tflops for MFU)") + ".",
             f"{args.steps} timed optimizer steps after {args.warmup} warm-up steps, each system in its own "
             "process, both on the same synthetic examples and steps; tokens are non-padding tokens.", ""]
    for size, systems in results.items():
        lines += [f"## {size}", "", "| system | tokens/s | MFU | peak memory (GiB) | afina / system (tokens/s) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in systems.items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | |")
                continue
            label = f"{name} ({r['batching']}, {r['attn_implementation']}{', liger' if r['liger'] else ''}, " \
                    f"{r['forwards_per_step']} x {tuple(r['forward_shape'])} per step)"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            ratio = f"{systems['afina']['tokens_per_second'] / r['tokens_per_second']:.2f}x" \
                if "tokens_per_second" in systems.get("afina", {}) else "-"
            lines.append(f"| {label} | {r['tokens_per_second']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} | {ratio} |")
        lines += ["", *goal_lines(size, systems), ""]
    lines += ["MFU counts model FLOPs only (formula in the module docstring): 4 x decoder linear weights per token, "
              "4 x hidden x vocab per trained token, causal attention 12 x layers x hidden x context."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


ATTENTION_NOTES = {
    "flash_attention_2": "flash-attention varlen from position ids; the step's rows are laid end to end as one "
                         "sequence, because transformers takes the varlen path from position ids only at batch "
                         "size 1 and would otherwise attend causally across the examples of a row",
    "sdpa": "SDPA with the block-diagonal causal mask that transformers builds from restarting position ids "
            "(a dense boolean rows x length x length mask: correct, but SDPA cannot use its flash kernel with it "
            "and computes every row's full length x length scores)",
}


def goal_lines(size: str, systems: dict) -> list[str]:
    """The goals next to a size's table, and how afina's packed attention stayed inside each example."""
    afina = systems.get("afina", {})
    if "tokens_per_second" not in afina:
        return ["afina did not run."]
    lines = [f"- afina attention: {ATTENTION_NOTES[afina['attn_implementation']]}"]
    if afina.get("liger_error"):
        lines.append(f"- Liger is installed but could not be applied: {afina['liger_error']}")
    ratio = afina.get("ratio_to_hf_peft")
    if size == "tiny":
        lines.append("- smoke run: the goals apply to 1b and 8b")
    elif ratio is not None:
        lines.append(f"- goal afina >= {GOAL_RATIO}x hf_peft tokens/s: {'met' if ratio >= GOAL_RATIO else 'NOT met'} "
                     f"({ratio:.2f}x)")
    else:
        lines.append(f"- goal afina >= {GOAL_RATIO}x hf_peft tokens/s: unknown, hf_peft failed "
                     "(out of memory? try a smaller --micro-batch)")
    if size == GOAL_MFU_SIZE and afina.get("mfu") is not None:
        lines.append(f"- goal afina MFU >= {GOAL_MFU:.0%} at {GOAL_MFU_SIZE}: "
                     f"{'met' if afina['mfu'] >= GOAL_MFU else 'NOT met'} ({afina['mfu']:.1%})")
    check = afina["packing_check"]
    lines.append(f"- packed examples attend only to themselves: {'yes' if check['isolated'] else 'NO'} (relative "
                 f"hidden-state change packed {check['packed_change']:.2e}, crossing {check['crossing_change']:.2e})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
