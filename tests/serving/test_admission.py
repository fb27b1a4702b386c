"""Between two decode steps the engine prefills at most `max_prefill_tokens` prompt tokens: a crowd of
newcomers joins over several steps, and each still generates what it generates alone."""

from __future__ import annotations

import threading

import torch

from afina.serving.engine import Engine, Finished, GenerationRequest, SamplingParams
from afina.serving.loading import ModelSource, load_served_models


def test_newcomers_join_within_the_prefill_budget_and_answer_as_alone(tiny_model_dir):
    served = load_served_models([ModelSource("base", str(tiny_model_dir))], device=torch.device("cpu"))
    tokenizer = served.get("base").tokenizer
    prompts = [tokenizer(f"ticket {i}: the printer on floor {i} is jammed")["input_ids"] for i in range(6)]
    size = len(prompts[0])
    params = SamplingParams(max_tokens=8, temperature=0)
    engine = Engine(served, max_prefill_tokens=2 * size + 1)  # two prompts' worth
    requests = [GenerationRequest("base", ids, params) for ids in prompts]
    engine.submit_many(requests)
    engine._admit([])  # the engine's thread is not running: one admission, by hand
    assert [len(r.sequences) for r in requests] == [1, 1, 0, 0, 0, 0]
    assert engine.queued_requests() == 4

    finished = threading.Semaphore(0)
    for request in requests:
        request.deliver = lambda event: finished.release() if isinstance(event, Finished) else None
    engine.start()
    try:
        for _ in requests:
            assert finished.acquire(timeout=60)
        alone = [engine.generate("base", ids, params)[0] for ids in prompts]
    finally:
        engine.stop()
    assert [r.sequences[0].generated for r in requests] == alone


def test_a_prompt_longer_than_the_budget_is_still_admitted(tiny_model_dir):
    served = load_served_models([ModelSource("base", str(tiny_model_dir))], device=torch.device("cpu"))
    ids = served.get("base").tokenizer("a long ticket about the vpn " * 8)["input_ids"]
    engine = Engine(served, max_prefill_tokens=4)
    engine.start()
    try:
        assert len(engine.generate("base", ids, SamplingParams(max_tokens=3, temperature=0), timeout=60)[0]) == 3
    finally:
        engine.stop()
