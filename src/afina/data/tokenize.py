"""Turn records into token ids plus a mask of the tokens that are trained.

Chats go through the model's own chat template. By default only assistant answers are trained,
each including its end-of-turn token so the tuned model learns to stop. Trained character spans
are found by rendering the conversation prefix by prefix, then mapped to tokens with the fast
tokenizer's offsets, which works for any template that renders a conversation as an extension
of its prefixes (all common ones do).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from afina.data.records import Record
from afina.errors import AfinaError


@dataclass(frozen=True)
class Example:
    """A tokenized record. `trained[i]` says whether token i is a training target."""

    input_ids: list[int]
    trained: list[bool]
    line: int
    truncated: bool = False

    @property
    def trained_count(self) -> int:
        return sum(self.trained)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The text a model sees before it answers (chat template plus generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def trained_spans(record: Record, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans to train on."""
    eos = tokenizer.eos_token or ""
    if record.kind == "text":
        text = record.text + eos
        return text, [(0, len(text))]
    if record.kind != "chat":
        raise AfinaError("unsupported_record", f"{record.kind} rows cannot be used for supervised fine-tuning",
                         location=f"line {record.line}", hint="use chat, prompt/completion, Alpaca or ShareGPT data")
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if train_on_prompt:
        return text, [(0, len(text))]
    spans = []
    for index, message in enumerate(record.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        prefix = render_prompt(tokenizer, messages[:index])
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not text.startswith(through) or not through.startswith(prefix):
            raise AfinaError("template_not_prefix", "the chat template does not render conversations prefix by prefix",
                             location=f"line {record.line}")
        end = len(prefix) + through[len(prefix):].find(message.content) + len(message.content)
        eos_at = through.find(eos, end) if eos else -1
        spans.append((len(prefix), eos_at + len(eos) if eos_at >= 0 else end))
    return text, spans


def tokenize_record(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    train_on_prompt: bool = False) -> Example:
    """Tokenize one record and mark its trained tokens; truncate to `max_length` tokens."""
    text, spans = trained_spans(record, tokenizer, train_on_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    trained = [any(start < span_end and end > span_start for span_start, span_end in spans)
               for start, end in encoded["offset_mapping"]]
    truncated = len(ids) > max_length
    return Example(ids[:max_length], trained[:max_length], record.line, truncated)


def tokenize_records(records: list[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     train_on_prompt: bool = False, path: str = "") -> list[Example]:
    """Tokenize all records; fail fast on an example left with nothing to train on."""
    examples = []
    for record in records:
        example = tokenize_record(record, tokenizer, max_length, train_on_prompt)
        if example.trained_count == 0:
            code, why = (("assistant_truncated", f"truncation to max_length={max_length} removed every assistant token")
                         if example.truncated else ("no_trainable_tokens", "the example has no token to train on"))
            raise AfinaError(code, why, location=f"{path}:{record.line}",
                             hint="raise data.max_length or shorten the prompt" if example.truncated else None)
        examples.append(example)
    return examples
