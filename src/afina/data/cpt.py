"""Continued pretraining: raw documents cut into blocks that train each token at most once.

Each document is followed by the end-of-sequence token (so the model learns where documents end,
and packed rows show it between documents) and cut into blocks of at most `block_length` tokens.
Consecutive blocks of one document overlap by `overlap` tokens: those tokens were trained at the
end of the previous block, so in the next one they are context only, giving its first trained
tokens something to condition on instead of starting cold. Blocks never span two documents; the
last, shorter block of each document is filled up by packing, whose position ids keep documents
from attending to each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from afina.data.records import Record
from afina.data.tokenize import Example


def chunk_documents(token_id_lists: Sequence[Sequence[int]], block_length: int, overlap: int, eos_id: int,
                    lines: Sequence[int] | None = None) -> list[Example]:
    """Cut each document (+ EOS) into blocks that train each token at most once.

    Block k of a document covers tokens [k * stride, k * stride + block_length) with
    stride = block_length - overlap; its first `overlap` tokens are context (untrained) for k > 0.
    With overlap >= 1 every token but a document's first is a target exactly once. A block's
    first token is marked trained but, with nothing before it in the block, is never a target:
    a document's first token always, and with overlap = 0 the first token of every block too
    (the usual cost of plain chunking, which one token of overlap removes).
    `lines` gives each document's line for error messages (default: its 1-based index).
    Empty documents are skipped.
    """
    if block_length < 2:
        raise ValueError(f"block_length must be at least 2, got {block_length}")
    if not 0 <= overlap < block_length:
        raise ValueError(f"overlap must be in [0, block_length), got {overlap} with block_length={block_length}")
    stride = block_length - overlap
    blocks = []
    for index, document in enumerate(token_id_lists):
        if not document:
            continue
        tokens = [*document, eos_id]
        line = lines[index] if lines is not None else index + 1
        start = 0
        while True:
            end = min(start + block_length, len(tokens))
            context = overlap if start > 0 else 0  # already trained at the end of the previous block
            blocks.append(Example(tokens[start:end], [False] * context + [True] * (end - start - context), line))
            if end == len(tokens):
                break
            start += stride
    return blocks


def cpt_examples(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, block_length: int,
                 overlap: int = 0) -> list[Example]:
    """Tokenize `text` records (no special tokens added) and cut them with `chunk_documents`."""
    documents = [tokenizer(record.text or "", add_special_tokens=False)["input_ids"] for record in records]
    return chunk_documents(documents, block_length, overlap, tokenizer.eos_token_id, [r.line for r in records])
