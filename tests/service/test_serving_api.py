"""The inference service through the official `openai` client, against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time

import urllib.error
import urllib.request
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

    def __enter__(self) -> Server:
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
                                           ({"messages": []}, "messages"), ({"logprobs": True}, "logprobs")])
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
