"""Preference data (DPO, ORPO, reward models, KTO) as token sequences, and their packed batches.

A preference record is a prompt (`messages`) with a `chosen` and a `rejected` answer. Each answer
becomes one sequence: the prompt rendered by the model's chat template with its generation
prompt, then the answer and its end-of-turn token, which are the only trained tokens (so
`sequence_logps` sums log pi(answer | prompt)). Prompt and answer ids are kept apart so an answer
can be put after another prompt, which KTO's reference point needs.

Packed batches carry, for every position, the index of the sequence it belongs to, so per-sequence
log-probs can be summed even when several sequences share a row; position ids restart per
sequence, so attention never crosses sequences (see `afina.data.packing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from afina.data.packing import IGNORE, example_targets, pack_indices
from afina.data.records import Record
from afina.data.tokenize import Example, render_prompt
from afina.errors import AfinaError

# an unpaired row given directly (tests, library use): (prompt messages or a user prompt string, completion, desirable?)
UnpairedRow = tuple[list[dict] | str, str, bool]


@dataclass(frozen=True)
class Completion:
    """A prompt and one answer, tokenized. Every answer token (the answer and its end-of-turn token) is trained."""

    prompt_ids: list[int]
    answer_ids: list[int]
    line: int
    truncated: bool = False  # the prompt lost tokens on the left to fit max_length

    def example(self) -> Example:
        """The sequence prompt + answer, with only the answer trained."""
        return Example(self.prompt_ids + self.answer_ids,
                       [False] * len(self.prompt_ids) + [True] * len(self.answer_ids), self.line, self.truncated)


@dataclass(frozen=True)
class PreferencePair:
    """The chosen and the rejected answer to one prompt (the same prompt tokens in both)."""

    chosen: Completion
    rejected: Completion


@dataclass(frozen=True)
class KtoExample:
    """One completion with KTO's binary label: desirable (True) or undesirable (False)."""

    completion: Completion
    desirable: bool


def tokenize_completion(tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict], answer: str,
                        line: int, path: str = "") -> Completion:
    """Render prompt + answer with the chat template and split the tokens where the answer starts.

    The whole text is tokenized at once (as `afina.data.tokenize` does), so the prompt tokens are
    those the model sees in training; the answer runs to its end-of-turn token included, and
    whatever the template adds after that token is dropped, since it is never trained.
    """
    prompt_text = render_prompt(tokenizer, prompt_messages)
    full = tokenizer.apply_chat_template([*prompt_messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt_text):
        raise AfinaError("template_not_prefix", "the chat template does not render the answer after the prompt",
                         location=f"{path}:{line}")
    start = len(prompt_text)
    found = full.find(answer, start)
    content_end = found + len(answer) if found >= 0 else start
    eos = tokenizer.eos_token or ""
    eos_at = full.find(eos, content_end) if eos else -1
    end = eos_at + len(eos) if eos_at >= 0 else (content_end if found >= 0 else len(full))
    encoded = tokenizer(full[:end], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    # first token reaching into the answer; a token straddling the boundary counts as answer
    split = next((i for i, (_, token_end) in enumerate(encoded["offset_mapping"]) if token_end > start), len(ids))
    return Completion(ids[:split], ids[split:], line)


def fit_prompt(prompt_ids: list[int], answer_lengths: dict[str, int], max_length: int, line: int,
               path: str = "") -> tuple[list[int], bool]:
    """Cut the prompt from the left so that the prompt and the longest answer fit in `max_length`.

    Answers are never cut: an answer that cannot fit after at least one prompt token (the first
    answer token is predicted from the last prompt token) fails with `assistant_truncated`.
    Returns the prompt ids kept and whether any were cut.
    """
    for field, length in answer_lengths.items():
        if length + 1 > max_length:
            raise AfinaError("assistant_truncated",
                             f"the {field} answer has {length} tokens with its end-of-turn token and cannot fit in "
                             f"max_length={max_length} after its prompt", location=f"{path}:{line}",
                             hint="raise data.max_length or shorten the answer")
    keep = max_length - max(answer_lengths.values())
    if len(prompt_ids) <= keep:
        return prompt_ids, False
    return prompt_ids[len(prompt_ids) - keep :], True


def tokenize_preference(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int,
                        path: str = "") -> PreferencePair:
    """Tokenize one preference record into its chosen and rejected sequences, both within `max_length`."""
    if record.kind != "preference":
        raise AfinaError("unsupported_record", f"{record.kind} rows cannot be used for preference training",
                         location=f"{path}:{record.line}", hint="use rows with prompt, chosen and rejected")
    prompt = record.prompt_messages()
    chosen = tokenize_completion(tokenizer, prompt, record.chosen, record.line, path)
    rejected = tokenize_completion(tokenizer, prompt, record.rejected, record.line, path)
    # both sequences keep the same prompt tokens: DPO compares the answers to one prompt
    prompt_ids, truncated = fit_prompt(chosen.prompt_ids, {"chosen": len(chosen.answer_ids),
                                                           "rejected": len(rejected.answer_ids)},
                                       max_length, record.line, path)
    return PreferencePair(Completion(prompt_ids, chosen.answer_ids, record.line, truncated),
                          Completion(prompt_ids, rejected.answer_ids, record.line, truncated))


def tokenize_preferences(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
                         path: str = "") -> list[PreferencePair]:
    """Tokenize every preference record; fail fast, with its line, on one whose answer cannot fit."""
    return [tokenize_preference(record, tokenizer, max_length, path) for record in records]


def kto_examples(items: Sequence[Record | UnpairedRow], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 path: str = "") -> list[KtoExample]:
    """KTO examples from preference records (chosen -> desirable, rejected -> undesirable, as TRL's
    `unpair_preference_dataset` does), from `unpaired` records (prompt/completion/label rows) and
    from (prompt, completion, label) tuples.

    A tuple's prompt is a list of messages or a string (one user message); its line in
    error messages is its 1-based position in `items`. Each completion is fitted to `max_length`
    on its own, cutting its prompt from the left.
    """
    examples = []
    for index, item in enumerate(items):
        if isinstance(item, Record) and item.kind == "unpaired":
            labelled = [(item.prompt_messages(), item.completion, bool(item.label), "completion")]
            line = item.line
        elif isinstance(item, Record):
            if item.kind != "preference":
                raise AfinaError("unsupported_record", f"{item.kind} rows cannot be used for KTO",
                                 location=f"{path}:{item.line}", hint="use preference or prompt/completion/label rows")
            labelled = [(item.prompt_messages(), item.chosen, True, "chosen"),
                        (item.prompt_messages(), item.rejected, False, "rejected")]
            line = item.line
        else:
            prompt, completion, label = item
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            labelled = [(messages, completion, bool(label), "completion")]
            line = index + 1
        for messages, answer, desirable, field in labelled:
            completion = tokenize_completion(tokenizer, messages, answer, line, path)
            prompt_ids, truncated = fit_prompt(completion.prompt_ids, {field: len(completion.answer_ids)},
                                               max_length, line, path)
            examples.append(KtoExample(Completion(prompt_ids, completion.answer_ids, line, truncated), desirable))
    return examples


def mismatched_completions(completions: Sequence[Completion], max_length: int) -> list[Completion]:
    """Each prompt with the previous completion's answer (the first with the last's): KTO's KL pairs.

    TRL pairs prompt x_i with answer y_(i-1) within each batch, so the mismatched answers are the
    batch's own answers. Prompts are cut from the left to fit; answers already fit (`fit_prompt`).
    """
    mismatched = []
    for index, completion in enumerate(completions):
        answer = completions[index - 1].answer_ids
        keep = max_length - len(answer)
        prompt = completion.prompt_ids[max(0, len(completion.prompt_ids) - keep):]
        mismatched.append(Completion(prompt, answer, completion.line, len(prompt) < len(completion.prompt_ids)))
    return mismatched


@dataclass
class SequenceBatch:
    """Packed sequences; `sequence_ids[r, t]` is the index (in the collated list) of the sequence at row r,
    position t, or -1 on padding."""

    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length), restarting at 0 for every sequence
    targets: torch.Tensor  # (rows, length); IGNORE where nothing is trained
    sequence_ids: torch.Tensor  # (rows, length)
    num_sequences: int
    trained_tokens: int
    tokens: int  # non-padding tokens

    def to(self, device: torch.device) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                             self.sequence_ids.to(device), self.num_sequences, self.trained_tokens, self.tokens)

    def last_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of each sequence's last token, in sequence order."""
        flat = self.sequence_ids.flatten()
        positions = torch.arange(flat.numel(), device=flat.device)
        real = flat >= 0
        last = torch.full((self.num_sequences,), -1, dtype=torch.long, device=flat.device)
        last = last.scatter_reduce(0, flat[real], positions[real], reduce="amax")
        width = self.sequence_ids.shape[1]
        return last // width, last % width


@dataclass
class KtoBatch:
    """A KTO micro-batch: its completions, the same prompts with mismatched answers, and the labels."""

    completions: SequenceBatch
    mismatched: SequenceBatch
    desirable: torch.Tensor  # (num_sequences,) bool

    def to(self, device: torch.device) -> "KtoBatch":
        return KtoBatch(self.completions.to(device), self.mismatched.to(device), self.desirable.to(device))

    @property
    def tokens(self) -> int:
        return self.completions.tokens + self.mismatched.tokens


def collate_sequences(examples: Sequence[Example], row_length: int, pad_id: int) -> SequenceBatch:
    """Pack `examples` into rows and pad rows to the longest; sequence i of the batch is `examples[i]`."""
    if not examples:
        raise ValueError("collate_sequences needs at least one sequence")
    ids, positions, targets, owners = [], [], [], []
    for row in pack_indices([len(e.input_ids) for e in examples], row_length):
        ids.append([t for i in row for t in examples[i].input_ids])
        positions.append([p for i in row for p in range(len(examples[i].input_ids))])
        targets.append([t for i in row for t in example_targets(examples[i])])
        owners.append([i for i in row for _ in examples[i].input_ids])
    length = max(len(r) for r in ids)
    tokens = sum(len(r) for r in ids)
    for r_ids, r_pos, r_tgt, r_own in zip(ids, positions, targets, owners):
        pad = length - len(r_ids)
        r_ids.extend([pad_id] * pad)
        r_pos.extend(range(pad))  # padding forms its own block, attending only to itself
        r_tgt.extend([IGNORE] * pad)
        r_own.extend([-1] * pad)
    target_tensor = torch.tensor(targets)
    return SequenceBatch(torch.tensor(ids), torch.tensor(positions), target_tensor, torch.tensor(owners),
                         len(examples), int((target_tensor != IGNORE).sum()), tokens)


def collate_pairs(pairs: Sequence[PreferencePair], row_length: int, pad_id: int) -> SequenceBatch:
    """All chosen sequences, then all rejected ones: sequence k is pair k's chosen answer and
    sequence len(pairs) + k its rejected one, so `logps.chunk(2)` gives (chosen, rejected)."""
    return collate_sequences([p.chosen.example() for p in pairs] + [p.rejected.example() for p in pairs],
                             row_length, pad_id)


def collate_kto(examples: Sequence[KtoExample], row_length: int, pad_id: int, max_length: int,
                mismatched: Sequence[Completion] | None = None) -> KtoBatch:
    """A KTO micro-batch with its mismatched completions for the KL estimate: built from the batch's
    own answers (needs two examples or more), or given (the training loop builds them per optimizer
    step, so a micro-batch of one still has a real mismatch)."""
    completions = [e.completion for e in examples]
    if mismatched is None:
        mismatched = mismatched_completions(completions, max_length)
    return KtoBatch(collate_sequences([c.example() for c in completions], row_length, pad_id),
                    collate_sequences([c.example() for c in mismatched], row_length, pad_id),
                    torch.tensor([e.desirable for e in examples], dtype=torch.bool))
