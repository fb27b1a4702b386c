"""Evaluation's generation through the serving engine: greedy answers equal `generate()` run on one
prompt at a time, token for token, whatever the prompts' lengths, the batch size or the JSON
constraint; base and tuned rows share batches and still answer as their own model."""

import json

import pytest
import torch

from afina.data.formats import normalize_row
from afina.data.tokenize import render_prompt
from afina.eval.generation import (generate_answers, generate_base_and_tuned, generate_ids, prompt_ids,
                                   shares_batch_with_base)
from afina.models.json_constraint import JsonObjectLogitsProcessor
from afina.models.loading import load_model
from afina.serving.loading import end_token_ids
from tests.conftest import chat_row

WORDS = "the printer in the office is jammed again la impresora no imprime a vpn não conecta".split()


def mixed_records(count: int = 7) -> list:
    """Chat rows whose prompts differ in length (2 to 14 words), some with a system prompt."""
    rows = [chat_row(" ".join(WORDS[: 2 + (5 * i) % 13]), json.dumps({"n": i}), system="classify" if i % 2 else None)
            for i in range(count)]
    return [normalize_row(row, i + 1)[0] for i, row in enumerate(rows)]


def one_at_a_time(model, tokenizer, records, max_new_tokens: int, json_mode: bool = False) -> list[list[int]]:
    """`model.generate()` greedy on each prompt alone: no padding, no batch."""
    ends = list(end_token_ids(tokenizer, model))
    answers = []
    for record in records:
        ids = tokenizer(render_prompt(tokenizer, record.prompt_messages()), return_tensors="pt",
                        add_special_tokens=False)["input_ids"]
        constraint = [JsonObjectLogitsProcessor(tokenizer, max_new_tokens, ends[0])] if json_mode else None
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id,
                                    logits_processor=constraint)
        answer = output[0, ids.shape[1]:].tolist()
        answers.append([t for t in answer if t not in ends])
    return answers


def ending_model(tiny_model_dir, tokenizer):
    """The tiny model with its end-of-turn token made likelier (its output row scaled up), so that
    greedy answers end at different steps instead of all running to the token limit."""
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] *= 1.6
    return model


def lora_model(tiny_model_dir, seed: int = 1):
    """The tiny model with a PEFT LoRA whose B is non-zero, so the tuned model differs from its base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.mark.parametrize("json_mode", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_answers_equal_generate_one_prompt_at_a_time(tiny_model_dir, tiny_tokenizer, json_mode, batch_size):
    model = ending_model(tiny_model_dir, tiny_tokenizer)
    records = mixed_records()
    assert len({len(p) for p in prompt_ids(tiny_tokenizer, records)}) >= 5  # lengths really differ
    expected = one_at_a_time(model, tiny_tokenizer, records, 20, json_mode)
    rows = [("model", p) for p in prompt_ids(tiny_tokenizer, records)]
    assert generate_ids(model, tiny_tokenizer, {"model": ""}, rows, 20, batch_size, json_mode=json_mode) == expected
    assert len({len(answer) for answer in expected}) > 1  # rows finish at different steps
    decoded = [tiny_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    assert generate_answers(model, tiny_tokenizer, records, 20, batch_size, json_mode=json_mode) == decoded


def test_base_and_tuned_share_batches_and_answer_as_their_own_model(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    records = mixed_records(6)
    assert shares_batch_with_base(model) == "default"
    with model.disable_adapter():
        base_expected = one_at_a_time(model, tiny_tokenizer, records, 16)
    tuned_expected = one_at_a_time(model, tiny_tokenizer, records, 16)
    assert base_expected != tuned_expected  # the adapter changes the answers
    base, tuned = generate_base_and_tuned(model, tiny_tokenizer, records, 16, batch_size=4)
    decode = [[tiny_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
              for answers in (base_expected, tuned_expected)]
    assert (base, tuned) == tuple(decode)
    prompts = prompt_ids(tiny_tokenizer, records)
    rows = [("base", p) for p in prompts] + [("tuned", p) for p in prompts]
    assert generate_ids(model, tiny_tokenizer, {"base": "", "tuned": "default"}, rows, 16, 4) == base_expected + tuned_expected


def test_json_mode_answers_parse_in_one_pass_for_base_and_tuned(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    base, tuned = generate_base_and_tuned(model, tiny_tokenizer, mixed_records(5), 24, batch_size=3, json_mode=True)
    assert all(isinstance(json.loads(answer), dict) for answer in base + tuned), base + tuned


def test_models_whose_layers_ignore_row_adapters_answer_in_two_passes(tiny_model_dir):
    from afina.config.methods import LoraMethod
    from afina.models.methods import apply_method

    fused = apply_method(load_model(str(tiny_model_dir)), LoraMethod())  # afina's fused SwiGLU
    assert shares_batch_with_base(fused) is None
    assert shares_batch_with_base(load_model(str(tiny_model_dir))) is None  # no adapter at all
    with pytest.raises(ValueError):
        generate_base_and_tuned(fused, None, [], 4, 1)


def test_progress_hears_of_every_row_and_answers_keep_record_order(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir)).train()
    records = mixed_records()
    heard = []
    answers = generate_answers(model, tiny_tokenizer, records, 8, batch_size=2, on_batch=heard.append)
    assert sum(heard) == len(records)
    assert model.training  # the mode it came in
    assert answers == [generate_answers(model, tiny_tokenizer, [r], 8, batch_size=1)[0] for r in records]
