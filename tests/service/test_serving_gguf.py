"""A GGUF file as a served MODEL: converted for the transformers engine, run as it is by llama.cpp;
both answer as the model it was written from, through the same OpenAI routes."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from afina.errors import AfinaError
from afina.service.app import create_app
from afina.serving.engine import Engine, SamplingParams
from afina.serving.loading import ModelSource, load_served_models, resolve_source
from tests.service.test_serving_api import MESSAGES, Server
from tests.service.test_serving_engine import PROMPTS

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama written as an f32 GGUF (weights exactly as in safetensors)."""
    from afina.export.gguf_file import write_gguf
    from afina.models.loading import load_model, load_tokenizer

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), path, "f32")


@pytest.fixture(scope="module")
def directory_answers(tiny_model_dir) -> list[list[int]]:
    """Greedy answers of the model directory the GGUF was written from."""
    engine = Engine(load_served_models([ModelSource("dir", str(tiny_model_dir))], device=torch.device("cpu")))
    engine.start()
    try:
        tokenizer = engine.models.get("dir").tokenizer
        return [engine.generate("dir", tokenizer(p)["input_ids"], GREEDY)[0] for p in PROMPTS]
    finally:
        engine.stop()


def answers(engine: Engine, name: str) -> list[list[int]]:
    tokenizer = engine.models.get(name).tokenizer
    return [engine.generate(name, tokenizer(p)["input_ids"], GREEDY)[0] for p in PROMPTS]


def test_a_gguf_file_is_served_by_its_name_through_transformers(tiny_gguf, directory_answers):
    source = resolve_source(str(tiny_gguf))
    assert (source.name, source.base) == ("tiny", str(tiny_gguf))
    engine = Engine(load_served_models([source], device=torch.device("cpu")))
    engine.start()
    try:
        assert answers(engine, "tiny") == directory_answers
    finally:
        engine.stop()


def test_llama_cpp_serves_the_gguf_as_the_model_answers_through_the_api(tiny_gguf, directory_answers):
    pytest.importorskip("llama_cpp", reason="--engine llama.cpp needs llama-cpp-python (dev extra)")
    from afina.serving.llama_cpp_engine import LlamaCppEngine, load_gguf_models

    engine = LlamaCppEngine(load_gguf_models([resolve_source(str(tiny_gguf))]))
    with Server(create_app(engine)) as running:
        running.wait_ready()
        assert answers(engine, "tiny") == directory_answers
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                               logprobs=True, top_logprobs=2)
        chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert "".join(e.token for e in whole.choices[0].logprobs.content) == whole.choices[0].message.content
        seeded = [client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=1, seed=5, n=2)
                  for _ in range(2)]
        assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]


def test_llama_cpp_serves_gguf_files_only(tiny_model_dir):
    pytest.importorskip("llama_cpp", reason="--engine llama.cpp needs llama-cpp-python (dev extra)")
    from afina.serving.llama_cpp_engine import load_gguf_models

    with pytest.raises(AfinaError) as caught:
        load_gguf_models([ModelSource("dir", str(tiny_model_dir))])
    assert caught.value.code == "bad_option" and caught.value.location == "--engine"


@pytest.mark.integration
def test_the_default_models_gguf_answers_in_llama_cpp_as_in_transformers():
    """The bundled GGUF (4-bit) served by llama.cpp starts its greedy answer as the transformers engine
    does on the same file converted."""
    pytest.importorskip("llama_cpp", reason="--engine llama.cpp needs llama-cpp-python (dev extra)")
    from afina.models.loading import default_gguf_path
    from afina.serving.llama_cpp_engine import LlamaCppEngine, load_gguf_models

    source = resolve_source(str(default_gguf_path()))
    llama, plain = LlamaCppEngine(load_gguf_models([source])), Engine(load_served_models([source]))
    tokenizer = plain.models.get(source.name).tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "My printer is jammed, what should I do?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for engine in (llama, plain):
        engine.start()
    try:
        first, second = (engine.generate(source.name, ids, SamplingParams(max_tokens=6, temperature=0))[0]
                         for engine in (llama, plain))
    finally:
        for engine in (llama, plain):
            engine.stop()
    assert tokenizer.decode(first).strip() and first[:3] == second[:3]


def test_the_command_refuses_an_unknown_engine_or_a_directory_for_llama_cpp_before_loading(tiny_model_dir):
    from typer.testing import CliRunner

    from afina.cli.main import app

    unknown = CliRunner().invoke(app, ["serve", "--no-auth", "--engine", "vllm"])
    assert unknown.exit_code == 2 and "unknown engine 'vllm'" in unknown.output
    pytest.importorskip("llama_cpp", reason="--engine llama.cpp needs llama-cpp-python (dev extra)")
    directory = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--no-auth", "--engine", "llama.cpp"])
    assert directory.exit_code == 2 and "GGUF files only" in directory.output
