import pytest

from afina.data.cpt import chunk_documents, cpt_examples
from afina.data.formats import normalize_row
from afina.data.packing import IGNORE, example_targets

EOS = 0


def documents() -> list[list[int]]:
    return [list(range(100, 123)), list(range(200, 205)), [], list(range(300, 310)), [400]]


def target_coverage(blocks, docs):
    """How often each (document, position) is a training target, found by locating every block in its document."""
    coverage = {}
    for block in blocks:
        doc_index = block.line - 1
        tokens = docs[doc_index] + [EOS]
        start = next(s for s in range(len(tokens)) if tokens[s : s + len(block.input_ids)] == block.input_ids)
        for offset, target in enumerate(example_targets(block)):
            if target != IGNORE:
                position = start + offset + 1
                assert tokens[position] == target
                coverage[(doc_index, position)] = coverage.get((doc_index, position), 0) + 1
    return coverage


@pytest.mark.parametrize("block_length,overlap", [(8, 3), (5, 4), (64, 2), (2, 1), (64, 0)])
def test_with_overlap_every_token_but_a_documents_first_is_trained_exactly_once(block_length, overlap):
    docs = documents()
    blocks = chunk_documents(docs, block_length, overlap, EOS)
    assert all(len(b.input_ids) <= block_length for b in blocks)
    coverage = target_coverage(blocks, docs)
    expected = {(d, p) for d, doc in enumerate(docs) if doc for p in range(1, len(doc) + 1)}  # + EOS at len(doc)
    assert set(coverage) == expected
    assert set(coverage.values()) == {1}


def test_without_overlap_a_blocks_first_token_has_no_context_and_is_no_target():
    docs = [list(range(1, 21))]
    coverage = target_coverage(chunk_documents(docs, 8, 0, EOS), docs)
    assert set(coverage) == {(0, p) for p in range(1, 21)} - {(0, 8), (0, 16)}
    assert set(coverage.values()) == {1}


def test_consecutive_blocks_overlap_by_context_tokens_only():
    blocks = chunk_documents([list(range(1, 21))], 8, 3, EOS)
    assert [b.input_ids for b in blocks] == [list(range(1, 9)), list(range(6, 14)), list(range(11, 19)),
                                             [16, 17, 18, 19, 20, EOS]]
    for previous, block in zip(blocks, blocks[1:]):
        assert block.input_ids[:3] == previous.input_ids[-3:]
        assert block.trained == [False] * 3 + [True] * (len(block.input_ids) - 3)
    assert all(blocks[0].trained)


def test_each_document_ends_with_a_trained_eos_and_no_block_spans_two_documents():
    blocks = chunk_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 4, 0, EOS)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, EOS], [4, 5, 6, 7], [8, 9, EOS]]
    assert [b.line for b in blocks] == [1, 2, 2]
    assert blocks[0].trained[-1] and blocks[-1].trained[-1]


@pytest.mark.parametrize("block_length,overlap", [(1, 0), (8, 8), (8, -1)])
def test_invalid_block_settings_are_refused(block_length, overlap):
    with pytest.raises(ValueError):
        chunk_documents([[1, 2, 3]], block_length, overlap, EOS)


def test_cpt_examples_tokenize_text_records_and_keep_their_lines(tiny_tokenizer):
    records = [normalize_row({"text": "the printer in the office is jammed again"}, 3)[0],
               normalize_row({"text": "hello how are you today"}, 7)[0]]
    blocks = cpt_examples(records, tiny_tokenizer, block_length=6, overlap=2)
    assert {b.line for b in blocks} == {3, 7}
    assert all(len(b.input_ids) <= 6 for b in blocks)
    text = tiny_tokenizer.decode([t for b in blocks if b.line == 7 for t, keep in zip(b.input_ids, b.trained) if keep])
    assert text == "hello how are you today<|im_end|>"
