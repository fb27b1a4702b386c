"""The lean decode step: the same tokens as transformers' forward, per row and across adapters, and a
KV cache whose rows join and leave in place without mixing up their keys and values."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from afina.serving.decode import COLUMN_ROOM, ROW_ROOM, LeanDecoder, SlotCache
from afina.serving.engine import Engine, Finished, GenerationRequest, SamplingParams
from afina.serving.loading import ModelSource, load_served_models

PROMPTS = ["hello how are you", "the printer", "la impresora no imprime hoy", "vpn", "my password expired again"]


def make_adapter(base_dir: Path, directory: Path, seed: int) -> Path:
    """A LoRA adapter with random (not zero) B matrices, on every projection, so it changes the answers."""
    from peft import LoraConfig, get_peft_model

    from afina.models.loading import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(str(base_dir)), LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = str(tiny_model_dir)
    return load_served_models([ModelSource("base", base),
                               ModelSource("a", base, adapter_dir=make_adapter(tiny_model_dir, root / "a", 1)),
                               ModelSource("b", base, adapter_dir=make_adapter(tiny_model_dir, root / "b", 2))],
                              device=torch.device("cpu"))


def generate_together(engine: Engine, jobs: list[tuple[str, list[int], SamplingParams]]) -> list[list[int]]:
    requests = [GenerationRequest(model, ids, params) for model, ids, params in jobs]
    remaining = threading.Semaphore(0)
    for request in requests:
        request.deliver = lambda event: remaining.release() if isinstance(event, Finished) else None
    engine.submit_many(requests)
    for _ in requests:
        assert remaining.acquire(timeout=60)
    return [r.sequences[0].generated for r in requests]


def test_lean_decoding_generates_what_transformers_forward_generates_across_adapters(served):
    tokenizer = served.get("base").tokenizer
    jobs = [(model, tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=6 + 3 * i, temperature=0))
            for model in ("base", "a", "b") for i, prompt in enumerate(PROMPTS)]
    results = []
    for lean in (True, False):
        engine = Engine(served, lean_decode=lean)
        assert all((decoder is not None) == lean for decoder in engine.decoders.values())
        engine.start()
        try:
            together = generate_together(engine, jobs)  # rows finish at different steps and leave
            alone = [engine.generate(model, ids, params)[0] for model, ids, params in jobs]
        finally:
            engine.stop()
        assert together == alone
        results.append(together)
    assert results[0] == results[1]
    assert not any("forward" in vars(module) for module in served.get("base").model.modules())  # prefill's own
    assert results[0][:5] != results[0][5:10] != results[0][10:]  # the adapters act


def test_rows_joining_and_leaving_keep_their_own_keys_and_values():
    cache = SlotCache(layers=2, kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"))
    expected: list[list[float]] = []  # each row's cached values, oldest first

    def join(values: list[list[float]]) -> None:
        width = max(len(v) for v in values)
        keys = torch.zeros((len(values), 1, width, 1))
        mask = torch.zeros((len(values), width), dtype=torch.long)
        for row, v in enumerate(values):
            keys[row, 0, width - len(v):, 0] = torch.tensor(v)
            mask[row, width - len(v):] = 1
        cache.join([(keys, -keys), (keys * 2, -keys * 2)], mask)
        expected.extend(values)

    def step(value: float) -> None:
        cache.open_column()
        for layer in range(2):
            new = torch.tensor([[[value * (layer + 1)]]] * cache.rows)
            cache.write(layer, new, -new)
        for row in expected:
            row.append(value)

    def check() -> None:
        mask = cache.live_mask()
        assert mask.shape[0] == len(expected) == cache.rows
        for row, values in enumerate(expected):
            kept = mask[row].nonzero().squeeze(1)
            assert cache.layers[0].keys[row, 0, kept, 0].tolist() == values
            assert cache.layers[1].values[row, 0, kept, 0].tolist() == [-2 * v for v in values]
            assert mask[row, :mask.shape[1] - len(values)].sum() == 0  # left padding only
        assert bool(mask.any(0)[0])  # no leading column that no row uses

    join([[1.0, 2.0, 3.0], [4.0]])
    step(10.0)
    check()
    join([[5.0] * 9, [6.0, 7.0]])  # longer than the running rows: they get more padding
    step(11.0)
    check()
    order = cache.keep([1, 3])  # rows 0 and 2 leave; the last row moves into a hole
    expected[:] = [expected[row] for row in order]
    check()
    join([[float(i)] for i in range(ROW_ROOM + 2)])  # more rows than the first buffer holds
    for value in range(COLUMN_ROOM + 3):  # more columns than it holds
        step(float(value))
    check()
    assert cache.reallocations >= 3
    width = cache.live_mask().shape[1]
    order = cache.keep(list(range(2, cache.rows)))  # the two longest rows go: their leading columns too
    expected[:] = [expected[row] for row in order]
    check()
    assert cache.live_mask().shape[1] == width - 2

    def round_of_newcomers() -> None:  # as many join as the oldest rows, which then leave
        old = [row for row, values in enumerate(expected) if len(values) > COLUMN_ROOM // 2]
        join([[7.0] * 3 for _ in old] or [[7.0]])
        for value in range(COLUMN_ROOM // 2):
            step(float(value))
        order = cache.keep([row for row in range(cache.rows) if row not in old])
        expected[:] = [expected[row] for row in order]
        check()

    round_of_newcomers()
    reallocations = cache.reallocations
    for _ in range(8):  # the batch keeps its size: the live columns move back in place, no new buffers
        round_of_newcomers()
    assert cache.reallocations == reallocations


def test_models_whose_forward_does_more_are_left_to_transformers(tiny_model):
    assert LeanDecoder.for_model(tiny_model) is not None
    handle = tiny_model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 2)
    try:
        assert LeanDecoder.for_model(tiny_model) is None
    finally:
        handle.remove()
    from transformers import GPT2Config, GPT2LMHeadModel

    assert LeanDecoder.for_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))) is None
