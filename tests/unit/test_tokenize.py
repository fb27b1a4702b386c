import pytest
import torch

from afina.data.formats import normalize_row
from afina.data.packing import IGNORE, collate_rows, example_targets, pack_examples
from afina.data.tokenize import tokenize_record, tokenize_records
from afina.errors import AfinaError
from afina.training.losses import sft_loss_sum


def record(row, line=1):
    result, problems = normalize_row(row, line)
    assert not problems
    return result


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, keep in zip(example.input_ids, example.trained) if keep])


def test_only_assistant_tokens_and_eos_are_trained(tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": "classify"}, {"role": "user", "content": "vpn is down"},
                        {"role": "assistant", "content": '{"category": "network"}'},
                        {"role": "user", "content": "and the printer?"},
                        {"role": "assistant", "content": '{"category": "printer"}'}]}
    example = tokenize_record(record(row), tiny_tokenizer, max_length=512)
    assert trained_text(tiny_tokenizer, example) == '{"category": "network"}<|im_end|>{"category": "printer"}<|im_end|>'
    eos_positions = [i for i, t in enumerate(example.input_ids) if t == tiny_tokenizer.eos_token_id]
    assert [example.trained[i] for i in eos_positions] == [False, False, True, False, True]


def test_weight_zero_answers_are_not_trained(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "old answer", "weight": 0},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "new answer"}]}
    example = tokenize_record(record(row), tiny_tokenizer, max_length=512)
    assert trained_text(tiny_tokenizer, example) == "new answer<|im_end|>"


def test_train_on_prompt_trains_everything(tiny_tokenizer):
    row = {"prompt": "q", "completion": "a"}
    example = tokenize_record(record(row), tiny_tokenizer, max_length=512, train_on_prompt=True)
    assert all(example.trained)


def test_no_trainable_token_fails_with_line(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}
    with pytest.raises(AfinaError) as error:
        tokenize_records([record(row, line=7)], tiny_tokenizer, 512, path="d.jsonl")
    assert error.value.code == "no_trainable_tokens" and error.value.location == "d.jsonl:7"


def test_truncation_that_removes_the_answer_fails_with_line(tiny_tokenizer):
    row = {"prompt": "the printer is jammed " * 20, "completion": "ok"}
    with pytest.raises(AfinaError) as error:
        tokenize_records([record(row, line=4)], tiny_tokenizer, 32, path="d.jsonl")
    assert error.value.code == "assistant_truncated" and error.value.location == "d.jsonl:4"


def test_packing_fits_rows_and_restarts_positions(tiny_tokenizer, ticket_rows):
    examples = tokenize_records([record(r) for r in ticket_rows], tiny_tokenizer, 512)
    rows = pack_examples(examples, 256)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert all(sum(len(e.input_ids) for e in row) <= 256 for row in rows)
    batch = collate_rows(rows[:2], tiny_tokenizer.pad_token_id)
    first = rows[0]
    starts = [sum(len(e.input_ids) for e in first[:k]) for k in range(len(first))]
    assert all(batch.position_ids[0, s] == 0 for s in starts)
    # the last token of an example never targets the first token of the next one
    assert all(batch.targets[0, s - 1] == IGNORE for s in starts[1:])
    assert batch.trained_tokens == sum(sum(1 for t in example_targets(e) if t != IGNORE) for row in rows[:2] for e in row)


def test_packed_loss_equals_unpacked_loss(tiny_model, tiny_tokenizer, ticket_rows):
    examples = tokenize_records([record(r) for r in ticket_rows[:8]], tiny_tokenizer, 512)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        packed = collate_rows(pack_examples(examples, 2048), pad)
        assert packed.input_ids.shape[0] == 1
        packed_loss = sft_loss_sum(tiny_model, packed) / packed.trained_tokens
        singles = [collate_rows([[e]], pad) for e in examples]
        unpacked_loss = sum(sft_loss_sum(tiny_model, b) for b in singles) / sum(b.trained_tokens for b in singles)
        # and padded rows (several rows of unequal length in one batch) agree too
        padded = collate_rows([[e] for e in examples], pad)
        padded_loss = sft_loss_sum(tiny_model, padded) / padded.trained_tokens
    assert abs(packed_loss.item() - unpacked_loss.item()) < 1e-5
    assert abs(padded_loss.item() - unpacked_loss.item()) < 1e-5
    # padded past the longest row (one length for every batch): a block of its own, still never trained
    longer = collate_rows(pack_examples(examples, 2048), pad, length=packed.input_ids.shape[1] + 9)
    assert longer.input_ids.shape[1] == packed.input_ids.shape[1] + 9
    assert (longer.trained_tokens, longer.tokens) == (packed.trained_tokens, packed.tokens)
    with torch.no_grad():
        assert abs(sft_loss_sum(tiny_model, longer).item() / longer.trained_tokens - unpacked_loss.item()) < 1e-5
