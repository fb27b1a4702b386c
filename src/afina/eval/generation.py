"""Greedy answers for evaluation.

    answers = generate_answers(model, tokenizer, records, max_new_tokens=96, batch_size=16)
    base, tuned = generate_base_and_tuned(lora_model, tokenizer, records, 96, 16)   # shared batches

`generate_answers` runs one left-padded `model.generate()` per batch of prompts sorted by length
(little padding; rows that end together), answers returned in record order.

`generate_ids` decodes through afina's serving engine (`afina.serving.engine`) instead: one running
batch where a row leaves as soon as its answer ends and the next prompt takes its place, the start
every prompt shares (the system prompt) computed once per model through the engine's prefix cache.
`generate_base_and_tuned` uses it to let a PEFT LoRA model answer as its base and as itself in the
same batches, each row with its own adapter (`adapter_names`), as the engine batches several
adapters when serving. Evaluation uses `generate_answers`: on an idle CPU the engine was not faster
(benchmarks/eval_speed.py compares them), and afina's fused SwiGLU layers, which a trained LoRA
model has, do not take per-row adapters.

Greedy answers of every path equal those of `model.generate(do_sample=False)` one prompt at a
time, stopping at any of the model's end tokens (`afina.serving.loading.end_token_ids`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from transformers import LogitsProcessor

from afina.data.records import Record
from afina.data.tokenize import render_prompt
from afina.models.fused_layers import fused_mlp_forward
from afina.models.json_constraint import JsonObjectLogitsProcessor
from afina.serving.engine import Engine, Finished, GenerationRequest, SamplingParams
from afina.serving.loading import LoadedModel, ServedModels, context_length, end_token_ids
from afina.training.cpu_share import share_cpu

POLL_SECONDS = 0.05  # how often the caller's thread reports progress and checks the engine is alive


def generate_answers(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None, json_mode: bool = False) -> list[str]:
    """Greedy answers to each record's prompt (the conversation before its final answer), in record
    order, from `model` as it is (inside `base_model(...)`, its base); with `json_mode` each answer is
    constrained to a JSON object. `on_batch(n)` hears of every n rows answered since its last call.

    One left-padded `model.generate()` per `batch_size` prompts of about the same length (sorted by
    length, so a batch holds little padding and its rows tend to end together)."""
    prompts = prompt_ids(tokenizer, records)
    ends = list(end_token_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with share_cpu(model, device.type == "cpu"):  # keeps its share of a busy CPU
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                longest = max(len(prompts[i]) for i in rows)
                ids = torch.tensor([[pad] * (longest - len(prompts[i])) + prompts[i] for i in rows], device=device)
                mask = torch.tensor([[0] * (longest - len(prompts[i])) + [1] * len(prompts[i]) for i in rows],
                                    device=device)
                constraint = [RowJsonObjects(tokenizer, len(rows), max_new_tokens, ends[0])] if json_mode else None
                with torch.no_grad():
                    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=pad, eos_token_id=ends,
                                            logits_processor=constraint)
                for row, index in enumerate(rows):
                    answers[index] = [t for t in output[row, longest:].tolist() if t not in ends and t != pad]
                if on_batch:
                    on_batch(len(rows))
    finally:
        model.train(was_training)
    return decode_answers(tokenizer, [answers[i] for i in range(len(prompts))])


class RowJsonObjects(LogitsProcessor):
    """JSON-object constrained decoding for a batch: one `JsonObjectLogitsProcessor` per row."""

    def __init__(self, tokenizer, rows: int, max_new_tokens: int, end_token_id: int):
        self.rows = [JsonObjectLogitsProcessor(tokenizer, max_new_tokens, end_token_id) for _ in range(rows)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return torch.cat([row(input_ids[i : i + 1], scores[i : i + 1]) for i, row in enumerate(self.rows)])


def generate_base_and_tuned(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int,
                            on_batch: Callable[[int], None] | None = None,
                            json_mode: bool = False) -> tuple[list[str], list[str]]:
    """(base answers, tuned answers), in record order, from one engine run where base and tuned rows
    share batches. Only for a model `shares_batch_with_base` accepts."""
    adapter = shares_batch_with_base(model)
    if adapter is None:
        raise ValueError("the model cannot answer as its base in the same batch; use generate_answers twice")
    prompts = prompt_ids(tokenizer, records)
    rows = [("base", p) for p in prompts] + [("tuned", p) for p in prompts]
    answers = decode_answers(tokenizer, generate_ids(model, tokenizer, {"base": "", "tuned": adapter}, rows,
                                                     max_new_tokens, batch_size, on_batch, json_mode))
    return answers[:len(prompts)], answers[len(prompts):]


def shares_batch_with_base(model) -> str | None:
    """The adapter name when `model` is a PEFT model with one plain LoRA adapter whose every layer
    honours per-row adapter names (base rows and tuned rows in one batch); else None."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(model, PeftModel) or len(model.peft_config) != 1:
        return None
    name, config = next(iter(model.peft_config.items()))
    if getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False):
        return None
    for module in model.modules():
        if isinstance(module, LoraLayer) and (module.merged or name in module.lora_variant):
            return None
        if type(module).forward is fused_mlp_forward:  # calls its down projection's LoRA node without row names
            return None
    return name


def prompt_ids(tokenizer, records: list[Record]) -> list[list[int]]:
    """Each record's prompt as the model reads it before answering."""
    texts = [render_prompt(tokenizer, r.prompt_messages()) for r in records]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def decode_answers(tokenizer, generated: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]


@torch.no_grad()
def generate_ids(model, tokenizer, routes: dict[str, str], rows: list[tuple[str, list[int]]], max_new_tokens: int,
                 batch_size: int, on_batch: Callable[[int], None] | None = None,
                 json_mode: bool = False) -> list[list[int]]:
    """The greedy answer's token ids (its end token left out) for each of `rows` ((route, prompt
    ids), `routes` naming each route's adapter: "" for the model as it is), in row order, from one
    engine run over `model`."""
    if not rows:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loaded = LoadedModel(model=model, tokenizer=tokenizer, end_ids=end_token_ids(tokenizer, model),
                         pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                         context_length=context_length(model), device=device,
                         adapters={route: adapter for route, adapter in routes.items() if adapter})
    served = ServedModels([loaded], {route: (0, adapter) for route, adapter in routes.items()})
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, json_object=json_mode)
    requests = [GenerationRequest(route, prompt, params) for route, prompt in rows]
    finished = threading.Semaphore(0)
    heard: set[int] = set()  # requests that delivered an event: their prompt was prefilled

    def listener(index: int):
        def deliver(event):
            heard.add(index)
            if isinstance(event, Finished):
                finished.release()
        return deliver

    for index, request in enumerate(requests):
        request.deliver = listener(index)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
    first = [next(i for i in order if rows[i][0] == route) for route in routes if any(r == route for r, _ in rows)]
    engine = Engine(served, max_batch_size=batch_size)
    engine.start()
    try:
        engine.submit_many([requests[i] for i in first])  # computed alone: their shared start is cached
        _wait(engine, lambda: engine.running_sequences() >= len(first) or all(i in heard for i in first))
        engine.submit_many([requests[i] for i in order if i not in first])
        done = 0
        while done < len(rows):
            newly = 0
            while finished.acquire(timeout=POLL_SECONDS if newly == 0 else 0):
                newly += 1
            if newly:
                done += newly
                if on_batch:
                    on_batch(newly)
            else:
                _check_alive(engine)
    finally:
        engine.stop()
        model.train(was_training)
    return [list(request.sequences[0].generated) for request in requests]


def _wait(engine: Engine, condition: Callable[[], bool]) -> None:
    event = threading.Event()
    while not condition():
        _check_alive(engine)
        event.wait(POLL_SECONDS / 10)


def _check_alive(engine: Engine) -> None:
    thread = getattr(engine, "_thread", None)
    if thread is not None and not thread.is_alive():
        raise RuntimeError("the generation engine stopped before every answer was finished")
