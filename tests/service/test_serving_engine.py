"""The batching engine: requests served together generate exactly what they generate alone, across
adapters, and json_object output always parses."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from afina.serving.engine import Engine, Finished, GenerationRequest, SamplingParams
from afina.serving.loading import ModelSource, load_served_models

PROMPTS = ["hello how are you", "the printer", "la impresora no imprime hoy", "vpn", "my password expired again"]


def make_adapter(base_dir: Path, directory: Path, seed: int) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so it changes what the model says."""
    from peft import LoraConfig, get_peft_model

    from afina.models.loading import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(str(base_dir)), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model_dir, root / "a", 1), make_adapter(tiny_model_dir, root / "b", 2)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir, tiny_adapters):
    base = str(tiny_model_dir)
    served = load_served_models([ModelSource("base", base), ModelSource("a", base, adapter_dir=tiny_adapters[0]),
                                 ModelSource("b", base, adapter_dir=tiny_adapters[1])], device=torch.device("cpu"))
    engine = Engine(served)
    engine.start()
    yield engine
    engine.stop()


def encode(engine: Engine, model: str, text: str) -> list[int]:
    return engine.models.get(model).tokenizer(text)["input_ids"]


def generate_together(engine: Engine, jobs: list[tuple[str, list[int], SamplingParams]]) -> list[list[int]]:
    """Submit every job at once (so they share batches) and wait for all."""
    requests = [GenerationRequest(model, ids, params) for model, ids, params in jobs]
    remaining = threading.Semaphore(0)
    for request in requests:
        request.deliver = lambda event: remaining.release() if isinstance(event, Finished) else None
    engine.submit_many(requests)
    for _ in requests:
        assert remaining.acquire(timeout=60)
    return [r.sequences[0].generated for r in requests]


def test_one_adapter_per_row_in_one_batch_equals_one_request_at_a_time(tiny_engine):
    greedy = SamplingParams(max_tokens=12, temperature=0)
    jobs = [(model, encode(tiny_engine, model, prompt), greedy)
            for model in ("base", "a", "b") for prompt in PROMPTS]
    alone = [tiny_engine.generate(model, ids, params)[0] for model, ids, params in jobs]
    tiny_engine.largest_batch = 0
    together = generate_together(tiny_engine, jobs)
    assert tiny_engine.largest_batch == len(jobs)  # all in one batch
    assert together == alone
    by_model = {model: alone[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i, model in enumerate(("base", "a", "b"))}
    assert by_model["a"] != by_model["b"] != by_model["base"]  # the adapters really act


def test_requests_joining_a_running_batch_generate_what_they_generate_alone(tiny_engine):
    long = SamplingParams(max_tokens=40, temperature=0)
    short = SamplingParams(max_tokens=5, temperature=0)
    first = encode(tiny_engine, "a", PROMPTS[0])
    later = [encode(tiny_engine, "b", p) for p in PROMPTS[1:]]
    alone = [tiny_engine.generate("a", first, long)[0]] + [tiny_engine.generate("b", ids, short)[0] for ids in later]
    started = threading.Event()
    running = GenerationRequest("a", first, long, deliver=lambda event: started.set())
    tiny_engine.submit(running)
    assert started.wait(30)
    tiny_engine.largest_batch = 0
    joined = [tiny_engine.generate("b", ids, short)[0] for ids in later]  # each joins the running batch
    while not running.sequences[0].finish_reason:
        threading.Event().wait(0.01)
    assert tiny_engine.largest_batch == 2
    assert [running.sequences[0].generated] + joined == alone


def test_seeded_sampling_repeats_and_n_gives_distinct_samples(tiny_engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    ids = encode(tiny_engine, "base", PROMPTS[1])
    first, second = tiny_engine.generate("base", ids, params), tiny_engine.generate("base", ids, params)
    assert first == second
    assert len({tuple(s) for s in first}) > 1


def test_stop_strings_cut_the_text_and_finish_with_stop(tiny_engine):
    ids = encode(tiny_engine, "base", PROMPTS[0])
    tokens = tiny_engine.generate("base", ids, SamplingParams(max_tokens=20, temperature=0))[0]
    text = tiny_engine.models.get("base").tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[3:5]
    events = []
    done = threading.Event()
    request = GenerationRequest("base", ids, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)),
                                deliver=lambda e: (events.append(e), isinstance(e, Finished) and done.set()))
    tiny_engine.submit(request)
    assert done.wait(30)
    delivered = "".join(e.text for e in events if not isinstance(e, Finished))
    assert delivered == text[:text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_json_object_output_always_parses_on_the_tiny_model(tiny_engine):
    tokenizer = tiny_engine.models.get("base").tokenizer
    for max_tokens in (3, 8, 30):
        for prompt in PROMPTS:
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3, json_object=True)
            tokens = tiny_engine.generate("base", encode(tiny_engine, "base", prompt), params)[0]
            assert isinstance(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), dict)


@pytest.mark.integration
def test_json_object_makes_the_default_model_answer_in_parseable_json():
    """The base model answers these in prose; constrained, every answer is a JSON object."""
    served = load_served_models([ModelSource("default", "default")], device=torch.device("cpu"))
    engine = Engine(served)
    engine.start()
    try:
        tokenizer = served.get("default").tokenizer
        questions = ["Tell me about the sea.", "Why is the sky blue?", "My printer is jammed, what do I do?",
                     "Write a short greeting for a new colleague."]
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for q in questions]
        free = SamplingParams(max_tokens=24, temperature=0)
        constrained = SamplingParams(max_tokens=24, temperature=0.7, seed=0, json_object=True, n=2)
        prose = [tokenizer.decode(engine.generate("default", ids, free)[0], skip_special_tokens=True) for ids in prompts]
        answers = [tokenizer.decode(tokens, skip_special_tokens=True)
                   for ids in prompts for tokens in engine.generate("default", ids, constrained)]
    finally:
        engine.stop()
    assert not any(answer.lstrip().startswith("{") for answer in prose)
    assert all(isinstance(json.loads(answer), dict) for answer in answers)


SYSTEM = "you answer tickets about the printer, the vpn and passwords in english, spanish and portuguese. " * 3


def chat_ids(engine: Engine, model: str, user: str) -> list[int]:
    tokenizer = engine.models.get(model).tokenizer
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_shared_system_prompt_is_computed_once_and_answers_stay_the_same(tiny_model_dir, tiny_adapters):
    """Prompts starting with the same system prompt reuse its KV cache (per adapter), alone and in one
    batch, and every answer equals the one computed without any cache."""
    base = str(tiny_model_dir)
    served = load_served_models([ModelSource("base", base), ModelSource("a", base, adapter_dir=tiny_adapters[0])],
                                device=torch.device("cpu"))
    plain, cached = Engine(served, prefix_cache_tokens=0), Engine(served)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    jobs = [(model, chat_ids(cached, model, user), greedy) for model in ("base", "a") for user in PROMPTS]
    for engine in (plain, cached):
        engine.start()
    try:
        expected = [plain.generate(model, ids, params)[0] for model, ids, params in jobs]
        first = [cached.generate(model, ids, params)[0] for model, ids, params in jobs[:1] + jobs[5:6]]
        assert cached.prefix_cache.hits == 0 and len(cached.prefix_cache.entries) == 2  # one per adapter
        alone = [cached.generate(model, ids, params)[0] for model, ids, params in jobs]
        together = generate_together(cached, jobs)
    finally:
        for engine in (plain, cached):
            engine.stop()
    assert first == [expected[0], expected[5]]
    assert alone == expected and together == expected
    assert cached.prefix_cache.hits >= 2 * len(jobs) - 2
    assert cached.prefix_cache.reused_tokens >= len(tiny_tokenizer_ids(cached, SYSTEM)) * (2 * len(jobs) - 2)
    assert plain.prefix_cache.hits == 0


def tiny_tokenizer_ids(engine: Engine, text: str) -> list[int]:
    return engine.models.get("base").tokenizer(text, add_special_tokens=False)["input_ids"][:-16]


def test_logprobs_are_the_models_log_softmax_with_the_likeliest_tokens(tiny_engine):
    ids = encode(tiny_engine, "a", PROMPTS[2])
    events = []
    done = threading.Event()
    request = GenerationRequest("a", ids, SamplingParams(max_tokens=6, temperature=0, logprobs=3),
                                deliver=lambda e: (events.append(e), isinstance(e, Finished) and done.set()))
    tiny_engine.submit(request)
    assert done.wait(30)
    entries = [entry for e in events if not isinstance(e, Finished) for entry in e.logprobs]
    assert [e.token for e in entries] == request.sequences[0].generated
    model = tiny_engine.models.get("a").model
    full = torch.tensor([ids + request.sequences[0].generated])
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=full, adapter_names=["adapter0"]).logits[0].float(), -1)
    for step, entry in enumerate(entries):
        row = expected[len(ids) - 1 + step]
        assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token  # greedy picks the likeliest


@pytest.mark.integration
def test_the_default_models_answers_are_the_same_with_and_without_the_prefix_cache():
    """Its chat template starts every conversation with the same system prompt: later prompts reuse it."""
    served = load_served_models([ModelSource("default", "default")], device=torch.device("cpu"))
    tokenizer = served.get("default").tokenizer
    questions = ["Why is the sky blue?", "My printer is jammed, what do I do?", "¿Cómo cambio mi contraseña?"]
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for q in questions]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    results = []
    for budget in (0, 8192):
        engine = Engine(served, prefix_cache_tokens=budget)
        engine.start()
        try:
            results.append([engine.generate("default", ids, greedy)[0] for ids in prompts])
        finally:
            engine.stop()
    assert engine.prefix_cache.hits == len(prompts) - 1
    assert results[0] == results[1]
