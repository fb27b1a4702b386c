import pytest
import torch
import torch.nn.functional as F

from afina.data.formats import normalize_row
from afina.data.packing import IGNORE
from afina.data.preference import (Completion, KtoExample, collate_kto, collate_pairs, collate_sequences,
                                   kto_examples, mismatched_completions, tokenize_preference, tokenize_preferences)
from afina.data.tokenize import render_prompt
from afina.errors import AfinaError
from afina.models.logprobs import last_token_hidden, sequence_logps


def record(row, line=1):
    result, problems = normalize_row(row, line)
    assert not problems
    return result


ROWS = [
    {"prompt": "the printer in the office is jammed again", "chosen": '{"category": "printer"}',
     "rejected": "hello how are you today"},
    {"prompt": [{"role": "system", "content": "classify"}, {"role": "user", "content": "a vpn não conecta"}],
     "chosen": '{"category": "network", "priority": "high"}', "rejected": "la impresora no imprime"},
    {"prompt": "my password expired and my account is locked", "chosen": '{"category": "access"}',
     "rejected": "0123456789"},
]


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, keep in zip(example.input_ids, example.trained) if keep])


def test_only_the_answer_and_its_end_of_turn_token_are_trained(tiny_tokenizer):
    for line, row in enumerate(ROWS, start=1):
        pair = tokenize_preference(record(row, line), tiny_tokenizer, 512)
        prompt = render_prompt(tiny_tokenizer, record(row).prompt_messages())
        for completion, answer in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            example = completion.example()
            assert trained_text(tiny_tokenizer, example) == answer + "<|im_end|>"
            assert tiny_tokenizer.decode(completion.prompt_ids) == prompt
            assert example.input_ids[-1] == tiny_tokenizer.eos_token_id and example.trained[-1]
            assert not completion.truncated
        assert pair.chosen.prompt_ids == pair.rejected.prompt_ids


def test_a_long_prompt_is_cut_from_the_left_and_the_answers_kept(tiny_tokenizer):
    row = {"prompt": "the printer is jammed " * 30 + "END", "chosen": "ok fine", "rejected": "no it is not jammed"}
    full = tokenize_preference(record(row), tiny_tokenizer, 4096)
    pair = tokenize_preference(record(row), tiny_tokenizer, 40)
    longest = max(len(pair.chosen.answer_ids), len(pair.rejected.answer_ids))
    assert pair.chosen.truncated and pair.rejected.truncated
    assert len(pair.chosen.prompt_ids) + longest == 40
    assert max(len(pair.chosen.example().input_ids), len(pair.rejected.example().input_ids)) == 40
    assert pair.chosen.prompt_ids == full.chosen.prompt_ids[-len(pair.chosen.prompt_ids):]  # the end of the prompt
    assert pair.chosen.answer_ids == full.chosen.answer_ids and pair.rejected.answer_ids == full.rejected.answer_ids
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids


def test_an_answer_that_cannot_fit_fails_with_its_line(tiny_tokenizer):
    row = {"prompt": "q", "chosen": "ok", "rejected": "the printer is jammed " * 20}
    with pytest.raises(AfinaError) as error:
        tokenize_preferences([record(ROWS[0], 1), record(row, 9)], tiny_tokenizer, 32, path="prefs.jsonl")
    assert error.value.code == "assistant_truncated" and error.value.location == "prefs.jsonl:9"
    assert "rejected" in error.value.message


def test_chat_records_are_refused_for_preference_training(tiny_tokenizer):
    chat = record({"prompt": "q", "completion": "a"}, 3)
    with pytest.raises(AfinaError) as error:
        tokenize_preference(chat, tiny_tokenizer, 64, path="d.jsonl")
    assert error.value.code == "unsupported_record" and error.value.location == "d.jsonl:3"


def reference_logps(model, example) -> float:
    """log p(answer | prompt) from the full logits of the sequence alone: no packing, no masking tricks."""
    ids = torch.tensor([example.input_ids])
    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    token_logps = logps.gather(1, ids[0, 1:, None])[:, 0]
    return float(sum(lp for lp, trained in zip(token_logps, example.trained[1:]) if trained))


def test_per_sequence_logps_in_a_packed_batch_equal_each_sequence_alone(tiny_model, tiny_tokenizer):
    pairs = tokenize_preferences([record(r, i) for i, r in enumerate(ROWS, start=1)], tiny_tokenizer, 512)
    batch = collate_pairs(pairs, 4096, tiny_tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 1 and batch.num_sequences == 6  # all six sequences share one row
    examples = [p.chosen.example() for p in pairs] + [p.rejected.example() for p in pairs]
    with torch.no_grad():
        packed, counts = sequence_logps(tiny_model, batch)
        alone = [sequence_logps(tiny_model, collate_sequences([e], 4096, tiny_tokenizer.pad_token_id))[0].item()
                 for e in examples]
        reference = [reference_logps(tiny_model, e) for e in examples]
        # several padded rows in one batch agree too
        padded = sequence_logps(tiny_model, collate_pairs(pairs, 1, tiny_tokenizer.pad_token_id))[0]
    # sums of about a hundred fp32 log-probabilities: agreement to a few units in the last place
    assert torch.allclose(packed, torch.tensor(alone), atol=1e-5, rtol=1e-6)
    assert torch.allclose(packed, torch.tensor(reference), atol=1e-5, rtol=1e-6)
    assert torch.allclose(padded, packed, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [float(sum(e.trained)) for e in examples]  # the prompt's last token is never trained
    assert batch.trained_tokens == sum(sum(e.trained) for e in examples)


def test_packed_sequences_never_target_the_next_sequence(tiny_tokenizer):
    pairs = tokenize_preferences([record(r) for r in ROWS], tiny_tokenizer, 512)
    batch = collate_pairs(pairs, 4096, tiny_tokenizer.pad_token_id)
    owners = batch.sequence_ids[0]
    boundaries = [t for t in range(1, owners.numel()) if owners[t] != owners[t - 1]]
    assert all(batch.position_ids[0, t] == 0 for t in boundaries)
    assert all(batch.targets[0, t - 1] == IGNORE for t in boundaries)
    assert sorted(set(owners.tolist())) == list(range(6))


def test_last_positions_point_at_each_sequences_end_of_turn_token(tiny_tokenizer):
    pairs = tokenize_preferences([record(r) for r in ROWS], tiny_tokenizer, 512)
    batch = collate_pairs(pairs, 60, tiny_tokenizer.pad_token_id)  # several rows, with padding
    rows, columns = batch.last_positions()
    assert (batch.input_ids[rows, columns] == tiny_tokenizer.eos_token_id).all()
    assert (batch.sequence_ids[rows, columns] == torch.arange(6)).all()
    hidden = torch.randn(*batch.input_ids.shape, 4)
    assert torch.equal(last_token_hidden(hidden, batch), hidden[rows, columns])


def test_kto_examples_from_pairs_and_from_unpaired_rows(tiny_tokenizer):
    items = [record(ROWS[0], 5), ([{"role": "user", "content": "la impresora no imprime"}], "printer", True),
             ("a vpn não conecta", "hello how are you", False)]
    examples = kto_examples(items, tiny_tokenizer, 512, path="kto.jsonl")
    assert [e.desirable for e in examples] == [True, False, True, False]
    assert [e.completion.line for e in examples] == [5, 5, 2, 3]
    answers = [trained_text(tiny_tokenizer, e.completion.example()) for e in examples]
    assert answers == [ROWS[0]["chosen"] + "<|im_end|>", ROWS[0]["rejected"] + "<|im_end|>",
                       "printer<|im_end|>", "hello how are you<|im_end|>"]
    with pytest.raises(AfinaError) as error:
        kto_examples([("q", "the printer is jammed " * 20, True)], tiny_tokenizer, 16, path="kto.jsonl")
    assert error.value.code == "assistant_truncated" and error.value.location == "kto.jsonl:1"


def test_mismatched_completions_pair_each_prompt_with_the_previous_answer():
    completions = [Completion([1, 2, 3, 4], [10, 11], 1), Completion([5, 6], [12, 13, 14, 15], 2),
                   Completion([7], [16], 3)]
    mismatched = mismatched_completions(completions, max_length=6)
    assert [(c.prompt_ids, c.answer_ids) for c in mismatched] == [([1, 2, 3, 4], [16]), ([5, 6], [10, 11]),
                                                                 ([7], [12, 13, 14, 15])]
    cut = mismatched_completions([Completion([1, 2, 3, 4], [9], 1), Completion([5], [10, 11, 12], 2)], max_length=5)
    assert cut[0].prompt_ids == [3, 4] and cut[0].truncated and not cut[1].truncated


def test_collate_kto_keeps_labels_and_builds_the_kl_batch(tiny_tokenizer):
    examples = kto_examples([record(r) for r in ROWS[:2]], tiny_tokenizer, 512)
    batch = collate_kto(examples, 4096, tiny_tokenizer.pad_token_id, 512)
    assert batch.desirable.tolist() == [True, False, True, False]
    assert batch.completions.num_sequences == batch.mismatched.num_sequences == 4
    assert isinstance(examples[0], KtoExample)
    # the mismatched batch trains exactly the same answers, each after another prompt
    assert batch.mismatched.trained_tokens == batch.completions.trained_tokens


def test_unpaired_kto_rows_are_detected_and_their_label_must_be_a_boolean(tiny_tokenizer):
    from afina.data.records import Record

    good = record({"prompt": "the printer is jammed", "completion": '{"category": "printer"}', "label": False}, 3)
    assert (good.kind, good.source_format, good.completion, good.label) == ("unpaired", "unpaired",
                                                                           '{"category": "printer"}', False)
    assert Record.from_json(good.to_json()) == good and good.reference_answer() is None
    listed = record({"prompt": [{"role": "user", "content": "vpn"}], "completion": "network", "label": True})
    assert listed.prompt_messages() == [{"role": "user", "content": "vpn"}] and listed.reference_answer() == "network"
    for label in ("yes", 1, None):
        result, problems = normalize_row({"prompt": "q", "completion": "a", "label": label}, 7)
        assert result is None and [(p.code, p.line, p.field) for p in problems] == [("invalid_label", 7, "label")]
    # without a label the same keys are an ordinary prompt/completion chat row
    assert record({"prompt": "q", "completion": "a"}).kind == "chat"
    examples = kto_examples([good, listed], tiny_tokenizer, 512, path="kto.jsonl")
    assert [e.desirable for e in examples] == [False, True] and [e.completion.line for e in examples] == [3, 1]
