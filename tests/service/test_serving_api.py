"""The inference service through the official `openai` client, against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Self

import openai
import pytest
import torch
import uvicorn

from afina.service.app import ServeSettings, create_app
from afina.serving.engine import Engine
from afina.serving.loading import ModelSource, load_served_models
from tests.service.test_serving_engine import make_adapter

MESSAGES = [{"role": "user", "content": "the printer is jammed"}]


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when `body` is given."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = str(tiny_model_dir)
    return load_served_models([ModelSource("base", base),
                               ModelSource("a", base, adapter_dir=make_adapter(tiny_model_dir, root / "a", 1)),
                               ModelSource("b", base, adapter_dir=make_adapter(tiny_model_dir, root / "b", 2))],
                              device=torch.device("cpu"))


class Server:
    """uvicorn on a free loopback port in a thread."""

    def __init__(self, app):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while http(f"{self.url}/ready")[0] != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(served):
    engine = Engine(served)
    with Server(create_app(engine, ServeSettings(max_concurrent_requests=2, max_request_tokens=200))) as running:
        running.engine = engine
        running.wait_ready()
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_every_served_name(client):
    assert sorted(m.id for m in client.models.list()) == ["a", "b", "base"]


def test_chat_answers_with_usage_and_finish_reason(client):
    answer = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    many = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=8, temperature=1, seed=1, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_streaming_gives_the_same_text_as_one_answer_and_usage_last(client):
    whole = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streaming_and_not(client):
    whole = client.completions.create(model="b", prompt="hello how", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="b", prompt="hello how", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text and whole.object == "text_completion"


def test_two_adapters_answer_differently_in_one_batch_as_they_do_alone(client, server):
    def ask(model):
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                              temperature=0).choices[0].message.content

    alone = {model: ask(model) for model in ("a", "b")}
    together = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, ask(m))) for m in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone and alone["a"] != alone["b"]


def test_unknown_model_is_404_listing_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in ("a", "b", "base"))


@pytest.mark.parametrize("fields, param", [({"temperature": 5}, "temperature"), ({"max_tokens": 500}, "max_tokens"),
                                           ({"n": 0}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                                           ({"messages": []}, "messages"), ({"top_logprobs": 2}, "top_logprobs"),
                                           ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")])
def test_bad_parameters_are_400_naming_the_parameter(client, fields, param):
    arguments = {"model": "base", "messages": MESSAGES, "max_tokens": 4} | fields
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**arguments)
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_the_limit_is_400_with_the_lengths(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="hello " * 300, max_tokens=4)
    assert caught.value.body["param"] == "prompt" and "at most 200 tokens" in caught.value.body["message"]


def test_requests_beyond_the_cap_get_429_with_retry_after(client, server, monkeypatch):
    release = threading.Event()
    step = server.engine._step
    monkeypatch.setattr(server.engine, "_step", lambda key: (release.wait(30), step(key)))
    held = [threading.Thread(target=client.completions.create,
                             kwargs={"model": "base", "prompt": "hello", "max_tokens": 4}) for _ in range(2)]
    for thread in held:
        thread.start()
    deadline = time.monotonic() + 10
    while http(f"{server.url}/v1/completions", {"model": "nope", "prompt": "x"})[0] != 429:
        assert time.monotonic() < deadline, "the two held requests never filled the cap"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="base", prompt="hello", max_tokens=4)
    assert caught.value.response.headers["retry-after"] == "1"
    release.set()
    for thread in held:
        thread.join()
    assert client.completions.create(model="base", prompt="hello", max_tokens=2).choices


def test_ready_is_false_until_the_warm_up_generation_ran(served):
    engine = Engine(served)
    gate = threading.Event()
    warm_up = engine.warm_up
    engine.warm_up = lambda: (gate.wait(30), warm_up())
    with Server(create_app(engine)) as running:
        assert http(f"{running.url}/health")[1] == {"status": "ok"}
        assert http(f"{running.url}/ready")[0] == 503
        gate.set()
        running.wait_ready()
        assert http(f"{running.url}/ready")[1] == {"ready": True}


def test_json_object_through_the_api_parses(client):
    answer = client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=20, temperature=0.8, seed=4,
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def metric(url: str, name: str) -> float:
    """A sample's value in /metrics (`name` with its labels, as exposed), 0 when absent."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_chat_logprobs_streaming_and_not_in_openais_shape(client):
    whole = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_with_n_choices(client):
    answer = client.completions.create(model="b", prompt="hello how", max_tokens=8, temperature=0.9, seed=3, n=2,
                                       logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        logprobs = choice.logprobs
        assert "".join(logprobs.tokens) == choice.text
        assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
        assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6
                   for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
        assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    streamed, offsets, finished = {0: "", 1: ""}, {0: [], 1: []}, set()
    for chunk in client.completions.create(model="b", prompt="hello how", max_tokens=8, temperature=0.9, seed=3,
                                           n=2, logprobs=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            offsets[choice.index] += choice.logprobs.text_offset if choice.logprobs else []
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and streamed == {c.index: c.text for c in answer.choices}
    assert offsets == {c.index: c.logprobs.text_offset for c in answer.choices}


def test_a_client_that_goes_away_mid_stream_frees_its_rows_and_slot_at_once(client, server, monkeypatch):
    step = server.engine._step
    monkeypatch.setattr(server.engine, "_step", lambda key: (time.sleep(0.05), step(key)))  # 150 tokens: 7 s or more
    before = metric(server.url, "afina_client_disconnects_total")
    stream = client.completions.create(model="base", prompt="hello", max_tokens=150, temperature=0.8, seed=1,
                                       stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received == 3:
            break
    assert server.engine.running_sequences() == 1
    stream.close()
    closed = time.monotonic()
    while server.engine.running_sequences() or metric(server.url, "afina_running_requests"):
        assert time.monotonic() - closed < 1.0, "the abandoned request kept its row or its slot"
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while metric(server.url, "afina_client_disconnects_total") != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_client_that_goes_away_before_a_whole_answer_frees_its_rows_and_slot(server, monkeypatch):
    step = server.engine._step
    monkeypatch.setattr(server.engine, "_step", lambda key: (time.sleep(0.05), step(key)))
    before = metric(server.url, "afina_client_disconnects_total")
    body = json.dumps({"model": "base", "prompt": "hello", "max_tokens": 150, "temperature": 0.8, "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not server.engine.running_sequences():
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    closed = time.monotonic()
    while server.engine.running_sequences() or metric(server.url, "afina_running_requests"):
        assert time.monotonic() - closed < 1.5, "the abandoned request kept its row or its slot"
        time.sleep(0.01)
    assert metric(server.url, "afina_client_disconnects_total") == before + 1


def test_metrics_count_requests_tokens_and_time_to_first_token(client, server):
    counted = 'afina_requests_total{route="chat",model="base",status="200"}'
    before, tokens = metric(server.url, counted), metric(server.url, "afina_output_tokens_total")
    answer = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=6, temperature=0)
    assert metric(server.url, counted) == before + 1
    assert metric(server.url, "afina_output_tokens_total") == tokens + answer.usage.completion_tokens
    assert metric(server.url, "afina_time_to_first_token_seconds_count") >= 1
    deadline = time.monotonic() + 5  # the engine drops a finished row right after delivering its last token
    while metric(server.url, "afina_batch_size") or metric(server.url, "afina_queue_depth"):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_shutdown_finishes_the_running_requests_first(served):
    engine = Engine(served)
    step = engine._step
    engine._step = lambda key: (time.sleep(0.02), step(key))
    with Server(create_app(engine)) as running:
        running.wait_ready()
        local = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = local.completions.create(model="base", prompt="hello", max_tokens=60, temperature=0.8, seed=2,
                                          stream=True, stream_options={"include_usage": True})
        chunks = [next(stream)]
        running.server.should_exit = True  # what SIGTERM does
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 60
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not engine._thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        http(f"{running.url}/health")
