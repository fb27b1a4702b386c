"""Greedy answers for evaluation, decoded by afina's serving engine (`afina.serving.engine`).

    answers = generate_answers(model, tokenizer, records, max_new_tokens=96, batch_size=16)
    base, tuned = generate_base_and_tuned(lora_model, tokenizer, records, 96, 16)   # shared batches

The engine keeps one running batch of up to `batch_size` rows: a row leaves as soon as its answer
ends and the next prompt takes its place, so no row decodes past its end and no batch waits for its
longest answer. Prompts are submitted shortest first (a prefill group holds prompts of about one
length, little padding), after one prompt per model computed alone: the start every prompt shares
(the system prompt) is then in the engine's prefix cache and computed once per model.

`generate_base_and_tuned` lets a PEFT LoRA model answer as its base and as itself in the same
batches, each row with its own adapter (`adapter_names`), as the engine batches several adapters
when serving. Evaluation (`afina.eval.compare`) still runs base and tuned one after the other: on a
CPU, where a decode step costs about in proportion to its rows, shared batches were not measurably
faster (benchmarks/eval_speed.py, `afina_one_pass`), and afina's fused SwiGLU layers, which a
trained LoRA model has, do not take per-row adapters.

Greedy answers equal those of `model.generate(do_sample=False)` one prompt at a time, stopping at
any of the model's end tokens (`afina.serving.loading.end_token_ids`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from afina.data.records import Record
from afina.data.tokenize import render_prompt
from afina.models.fused_layers import fused_mlp_forward
from afina.serving.engine import Engine, Finished, GenerationRequest, SamplingParams
from afina.serving.loading import LoadedModel, ServedModels, context_length, end_token_ids

POLL_SECONDS = 0.05  # how often the caller's thread reports progress and checks the engine is alive


def generate_answers(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None, json_mode: bool = False) -> list[str]:
    """Greedy answers to each record's prompt (the conversation before its final answer), in record
    order, from `model` as it is (inside `base_model(...)`, its base); with `json_mode` each answer is
    constrained to a JSON object. `on_batch(n)` hears of every n rows answered since its last call."""
    prompts = prompt_ids(tokenizer, records)
    generated = generate_ids(model, tokenizer, {"model": ""}, [("model", p) for p in prompts], max_new_tokens,
                             batch_size, on_batch, json_mode)
    return decode_answers(tokenizer, generated)


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
