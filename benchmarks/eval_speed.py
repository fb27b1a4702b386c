"""How long evaluating the base and the tuned model takes: one `generate()` per batch against afina's engine.

    python benchmarks/eval_speed.py                                  # 100 invoice rows, default model
    python benchmarks/eval_speed.py --rows 16 --paths old,afina      # a shorter run
    python benchmarks/eval_speed.py --model path/to/tiny --rows 8 --max-new-tokens 8   # smoke run

The default model in fp32 with afina's LoRA (r=16 on every linear layer, as a run trains it) whose B
matrices are freshly drawn non-zero (seeded), so the tuned model answers differently from its base
without a training run. The rows are `tasks.py`'s invoice test rows (JSON answers up to ~96 tokens).
Each path answers every row greedily as the base (adapter off) and as the tuned model:

- `old`: evaluation as it was: rows in file order, `eval.batch_size` rows per `model.generate()`
  (left padding; a batch decodes until its longest answer ends), base then tuned.
- `afina`: `afina.eval.generation.generate_answers` (what evaluation runs), base then tuned: one
  `generate()` per batch of prompts sorted by length, answers back in record order.
- `afina_engine`: `generate_ids` through afina's serving engine, base then tuned: rows leave as
  they finish and the next prompt takes their place, the shared system prompt computed once per model.
- `afina_one_pass`: `generate_base_and_tuned` on the same adapter through PEFT's own LoRA layers
  (afina's fused SwiGLU does not take per-row adapters): base and tuned rows in one batch, each row
  with its own adapter. Evaluation itself keeps two passes unless this is measurably faster.

Reports each path's seconds, its ratio to `old`, the answers' agreement with `old`, and its ratio to
the wall time of one default training epoch (`--epoch-seconds`, measured elsewhere: `afina train
configs/own-chat-data.yaml data.path=... training.epochs=1` on 600 invoice rows). Paths take turns in
the order given; the load average before and after is printed, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def invoice_records(rows: int) -> list:
    from tasks import make_task

    from afina.data.formats import normalize_row

    test = make_task("invoices", train=10, validation=2, test=rows, seed=0)["test"]
    return [normalize_row(row, i + 1)[0] for i, row in enumerate(test)]


def tuned_models(name: str, plain: bool, seed: int = 0) -> dict:
    """The base with afina's default LoRA (afina's fused layers, as a run trains it), B drawn non-zero;
    with `plain`, also the same adapter through PEFT's own layers (for `afina_one_pass`)."""
    import torch
    from peft import get_peft_model

    from afina.config.methods import LoraMethod
    from afina.models.loading import load_model
    from afina.models.methods import PEFT_CONFIGS, apply_method

    method = LoraMethod()
    fused = apply_method(load_model(name), method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in fused.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    models = {"fused": fused.eval()}
    if plain:
        base = load_model(name)
        models["plain"] = get_peft_model(base, PEFT_CONFIGS["lora"](method, base)).eval()
        models["plain"].load_state_dict(fused.state_dict())
    return models


def old_answers(model, tokenizer, records, max_new_tokens: int, batch_size: int) -> list[str]:
    """Evaluation's generation as it was: one left-padded `generate()` per batch, in record order."""
    import torch

    from afina.data.tokenize import render_prompt
    from afina.serving.loading import end_token_ids

    tokenizer.padding_side = "left"
    answers = []
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            prompts = [render_prompt(tokenizer, r.prompt_messages()) for r in records[start:start + batch_size]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=list(end_token_ids(tokenizer, model)))
            answers += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def run_path(path: str, models: dict, tokenizer, records, args) -> tuple[float, list[str], list[str]]:
    from afina.eval.generation import decode_answers, generate_answers, generate_base_and_tuned, generate_ids, prompt_ids
    from afina.models.methods import base_model

    model = models["plain" if path == "afina_one_pass" else "fused"]
    started = time.perf_counter()
    if path == "afina_one_pass":
        base, tuned = generate_base_and_tuned(model, tokenizer, records, args.max_new_tokens, args.batch_size)
    else:
        def engine(model, tokenizer, records, max_new_tokens, batch_size):
            rows = [("model", p) for p in prompt_ids(tokenizer, records)]
            return decode_answers(tokenizer, generate_ids(model, tokenizer, {"model": ""}, rows, max_new_tokens,
                                                          batch_size))

        answer = {"old": old_answers, "afina": generate_answers, "afina_engine": engine}[path]
        with base_model(model):
            base = answer(model, tokenizer, records, args.max_new_tokens, args.batch_size)
        tuned = answer(model, tokenizer, records, args.max_new_tokens, args.batch_size)
    return time.perf_counter() - started, base, tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, default=100, help="invoice test rows, each answered by base and tuned")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size")
    parser.add_argument("--paths", default="old,afina,afina_engine,afina_one_pass")
    parser.add_argument("--epoch-seconds", type=float, default=190.0,
                        help="wall time of one default training epoch on 600 invoice rows, this machine")
    args = parser.parse_args()

    import torch

    from afina.models.loading import load_tokenizer

    torch.manual_seed(0)
    paths = args.paths.split(",")
    tokenizer = load_tokenizer(args.model)
    records = invoice_records(args.rows)
    models = tuned_models(args.model, plain="afina_one_pass" in paths)
    with contextlib.redirect_stdout(sys.stderr):  # warm-up: first-call costs out of the timed runs
        for path in paths:
            small = argparse.Namespace(**{**vars(args), "max_new_tokens": 2})
            run_path(path, models, tokenizer, records[:2], small)
    print(f"load average before: {os.getloadavg()[0]:.1f}; {torch.get_num_threads()} threads; "
          f"{args.rows} rows x (base, tuned), max_new_tokens {args.max_new_tokens}, batch {args.batch_size}")
    results = {}
    for path in paths:
        results[path] = run_path(path, models, tokenizer, records, args)
        print(f"  {path}: {results[path][0]:.1f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    reference = results.get("old")
    print(f"\n| path | seconds | vs old | vs one epoch ({args.epoch_seconds:.0f} s) | answers equal to old (base, tuned) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, (seconds, base, tuned) in results.items():
        ratio = f"{reference[0] / seconds:.2f}x faster" if reference and path != "old" else ""
        same = (f"{sum(a == b for a, b in zip(base, reference[1]))}/{len(base)}, "
                f"{sum(a == b for a, b in zip(tuned, reference[2]))}/{len(tuned)}") if reference else ""
        print(f"| {path} | {seconds:.1f} | {ratio} | {seconds / args.epoch_seconds:.2f} | {same} |")


if __name__ == "__main__":
    main()
