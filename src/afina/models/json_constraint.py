"""Constrained decoding for `response_format: {"type": "json_object"}`: the output always parses.

    processor = JsonObjectLogitsProcessor(tokenizer, max_new_tokens=64)
    model.generate(**inputs, logits_processor=[processor], max_new_tokens=64)

At each step only tokens that keep the generated text a prefix of a valid JSON object are allowed.
Near the end of the token budget a token is allowed only if what it leaves open can still be closed
one character per remaining token (every ASCII character is a token of a byte-level vocabulary), and
once the object is complete only the end-of-turn token is. A prefix is checked by a small pushdown
automaton over characters (`advance`); its state is an immutable tuple, so trying a candidate costs
no copy.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

WHITESPACE = " \t\n\r"
ESCAPES = '"\\/bfnrt'
HEX = "0123456789abcdefABCDEF"
DIGITS = "0123456789"
CANDIDATES = 64  # how many of the most likely tokens are tried before the whole vocabulary is

# A state is (stack, mode, detail): stack holds the open containers ('{' or '['), mode says what
# may come next, detail carries the mode's progress (a literal's remaining letters, a number's part,
# whether a string is a key, hex digits left in a \u escape).
START = ("", "start", "")


def advance(state: tuple | None, text: str) -> tuple | None:
    """The state after `text`, or None when `text` cannot continue a JSON object from `state`."""
    for char in text:
        if state is None:
            return None
        state = step(state, char)
    return state


def step(state: tuple, char: str) -> tuple | None:  # noqa: C901 (one branch per grammar state)
    stack, mode, detail = state
    if mode == "string":
        key, escape = detail
        if escape == "\\":
            return (stack, "string", (key, "")) if char in ESCAPES else (
                (stack, "string", (key, "u4")) if char == "u" else None)
        if escape.startswith("u"):
            left = int(escape[1:]) - 1
            return (stack, "string", (key, f"u{left}" if left else "")) if char in HEX else None
        if char == '"':
            return (stack, "colon", "") if key else after_value(stack)
        if char == "\\":
            return stack, "string", (key, "\\")
        return None if ord(char) < 0x20 else state
    if mode == "number":
        return step_number(stack, detail, char)
    if mode == "literal":
        if char != detail[0]:
            return None
        return (stack, "literal", detail[1:]) if len(detail) > 1 else after_value(stack)
    if char in WHITESPACE:
        return state
    if mode == "start":
        return ("{", "key_or_end", "") if char == "{" else None
    if mode == "done":
        return None
    if mode in ("key_or_end", "key"):
        if char == '"':
            return stack, "string", (True, "")
        return close(stack, "{") if char == "}" and mode == "key_or_end" else None
    if mode == "colon":
        return (stack, "value", "") if char == ":" else None
    if mode in ("value", "value_or_end"):
        if char == "]" and mode == "value_or_end":
            return close(stack, "[")
        return start_value(stack, char)
    if mode == "comma_or_end":
        if char == ",":
            return (stack, "key", "") if stack[-1] == "{" else (stack, "value", "")
        return close(stack, stack[-1]) if char == {"{": "}", "[": "]"}[stack[-1]] else None
    return None


def start_value(stack: str, char: str) -> tuple | None:
    if char == "{":
        return stack + "{", "key_or_end", ""
    if char == "[":
        return stack + "[", "value_or_end", ""
    if char == '"':
        return stack, "string", (False, "")
    if char == "-":
        return stack, "number", "sign"
    if char in DIGITS:
        return stack, "number", "zero" if char == "0" else "int"
    for word in ("true", "false", "null"):
        if char == word[0]:
            return stack, "literal", word[1:]
    return None


# number parts: sign -> zero | int -> dot -> frac -> e -> esign -> exp; complete in zero, int, frac, exp
NUMBER_MOVES = {
    "sign": {"0": "zero", "digit": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"digit": "int", ".": "dot", "e": "e"},
    "dot": {"digit": "frac"},
    "frac": {"digit": "frac", "e": "e"},
    "e": {"sign": "esign", "digit": "exp"},
    "esign": {"digit": "exp"},
    "exp": {"digit": "exp"},
}


def step_number(stack: str, part: str, char: str) -> tuple | None:
    moves = NUMBER_MOVES[part]
    kind = ("0" if char == "0" and "0" in moves else "digit" if char in DIGITS else
            "e" if char in "eE" else "sign" if char in "+-" else char)
    if kind in moves:
        return stack, "number", moves[kind]
    if part in ("zero", "int", "frac", "exp"):  # the number ended: the character belongs to what follows
        state = after_value(stack)
        return step(state, char)
    return None


def after_value(stack: str) -> tuple:
    return (stack, "comma_or_end", "") if stack else ("", "done", "")


def close(stack: str, opener: str) -> tuple | None:
    if not stack or stack[-1] != opener:
        return None
    return after_value(stack[:-1])


def closing_text(state: tuple) -> str:
    """The shortest text that completes the object from `state`."""
    stack, mode, detail = state
    text = ""
    if mode == "start":
        return "{}"
    if mode == "string":
        key, escape = detail
        text = {"\\": "n", "": ""}.get(escape, "0" * int(escape[1:] or 0)) + '"' + (":0" if key else "")
    elif mode == "number":
        text = "0" if detail in ("sign", "dot", "e", "esign") else ""
    elif mode == "literal":
        text = detail
    elif mode == "colon":
        text = ":0"
    elif mode == "value":
        text = "0"
    elif mode == "key":
        text = '"":0'
    return text + "".join({"{": "}", "[": "]"}[c] for c in reversed(stack))


@lru_cache(maxsize=8)
def token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, ...]:
    """Each token's text; None for special tokens and for tokens that are partial UTF-8 characters."""
    special = set(tokenizer.all_special_ids)
    texts = []
    for token_id in range(len(tokenizer)):
        text = None if token_id in special else tokenizer.decode([token_id])
        texts.append(None if not text or "\ufffd" in text else text)
    return tuple(texts)


class JsonObjectLogitsProcessor(LogitsProcessor):
    """Allow only tokens that keep the generated text a prefix of a JSON object, and close it in time.

    One processor follows one sequence: it reads the tokens generated since its first call (the
    prompt's length is taken then) and keeps the automaton's state between calls.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, end_token_id: int | None = None):
        self.texts = token_texts(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.end_token_id = tokenizer.eos_token_id if end_token_id is None else end_token_id
        self.prompt_length: int | None = None
        self.seen = 0
        self.state: tuple | None = START

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError("a JsonObjectLogitsProcessor follows one sequence; use one per row")
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[0, self.prompt_length:].tolist()
        for token_id in generated[self.seen:]:
            self.state = advance(self.state, self.texts[token_id] or "") if token_id != self.end_token_id else self.state
        self.seen = len(generated)
        allowed = self.allowed(scores[0], self.max_new_tokens - len(generated))
        masked = torch.full_like(scores, float("-inf"))
        masked[0, allowed] = scores[0, allowed]
        return masked

    def allowed(self, scores: torch.Tensor, remaining: int) -> list[int]:
        """Token ids allowed now: the valid ones among the likeliest, else the first valid one at all."""
        if self.state is None or self.state[1] == "done":
            return [self.end_token_id]
        closing = closing_text(self.state)
        if remaining <= len(closing):  # no room left to wander: write the closing text
            return [self.forced_token(closing)]
        likeliest = torch.topk(scores, min(CANDIDATES, scores.shape[-1])).indices.tolist()  # not a full sort
        chosen = [t for t in likeliest if self.fits(t, remaining)]
        if chosen:
            return chosen
        order = torch.argsort(scores, descending=True).tolist()
        for token_id in order[len(likeliest):]:
            if self.fits(token_id, remaining):
                return [token_id]
        return [self.forced_token(closing)]

    def fits(self, token_id: int, remaining: int) -> bool:
        text = self.texts[token_id]
        if text is None:
            return False
        closing = closing_length_after(self.state, text)
        return closing is not None and closing <= remaining - 1

    def forced_token(self, closing: str) -> int:
        """The single-character token of the closing text's first character."""
        return forced_ids(self.texts)[closing[0]]


@lru_cache(maxsize=1 << 16)
def closing_length_after(state: tuple, text: str) -> int | None:
    """How long the closing text is after `text` continues `state`; None when `text` cannot continue
    it. States recur (inside a string, after a key), so a candidate token is checked once per state."""
    after = advance(state, text)
    return None if after is None else len(closing_text(after))


@lru_cache(maxsize=8)
def forced_ids(texts: tuple[str | None, ...]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token_id, text in enumerate(texts):
        if text is not None and len(text) == 1 and text not in ids:
            ids[text] = token_id
    return ids
