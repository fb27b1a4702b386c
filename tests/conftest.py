"""Shared fixtures: a tiny random Llama with a locally built tokenizer, and small data files.

Everything is built here, offline, in a second or two: no model hub, no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "the printer in the office is jammed again", "la impresora no imprime", "a vpn não conecta",
    '{"category": "network", "priority": "high", "team": "network_ops"}', "hello how are you today",
    "my password expired and my account is locked", "system user assistant", "0123456789 {}[]\":,.!?",
]


def chat_row(user: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def afina_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "afina-home"
    monkeypatch.setenv("AFINA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (fixed seed) and a byte-level BPE tokenizer with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from afina.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_model(tiny_model_dir):
    from afina.models.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def ticket_rows() -> list[dict]:
    """Forty small chat rows with JSON answers, enough for a split and a short run."""
    rows = []
    for i in range(40):
        category = ["network", "printer", "access", "email"][i % 4]
        rows.append(chat_row(f"ticket {i}: the {category} is broken", json.dumps({"category": category, "n": i % 3}),
                             system="classify"))
    return rows
