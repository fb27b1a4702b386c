"""Detect which format a row is in and normalize it to a Record, collecting problems on the way."""

from __future__ import annotations

import json
from dataclasses import dataclass

from afina.data.records import ROLES, Message, Record

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

# Checked in order: the first format whose keys are all present wins.
FORMATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preference", ("chosen", "rejected")),
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("unpaired", ("prompt", "completion", "label")),  # KTO: one answer, labelled desirable (true) or not
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: a stable code, the physical line and the field."""

    code: str
    line: int | None
    field: str | None
    message: str
    severity: str = "error"  # "error" makes a row invalid; "warning" is reported only

    def location(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        return f"{where} field {self.field}" if self.field else where


def detect_format(row: dict) -> str | None:
    for name, keys in FORMATS:
        if all(key in row for key in keys):
            return name
    return None


def normalize_row(row: object, line: int) -> tuple[Record | None, list[Problem]]:
    """Turn one raw row into a Record, or report why it cannot be one."""
    if not isinstance(row, dict):
        return None, [Problem("not_an_object", line, None, f"expected a JSON object, got {type(row).__name__}")]
    fmt = detect_format(row)
    if fmt is None:
        names = sorted(map(str, row))
        keys = ", ".join(names[:10]) + (f", ... ({len(names)} keys)" if len(names) > 10 else "") or "none"
        return None, [Problem("unknown_format", line, None,
                              f"no known format has these keys ({keys}); expected messages, prompt/completion, "
                              "instruction/output, conversations, text, prompt/chosen/rejected or "
                              "prompt/completion/label")]
    problems: list[Problem] = []
    if fmt == "text":
        text = _string(row, "text", line, problems)
        record = Record("text", fmt, line, text=text)
    elif fmt == "preference":
        record = Record("preference", fmt, line, messages=_prompt(row, line, problems),
                        chosen=_string(row, "chosen", line, problems), rejected=_string(row, "rejected", line, problems))
    elif fmt == "unpaired":
        label = row["label"]
        if not isinstance(label, bool):
            problems.append(Problem("invalid_label", line, "label",
                                    f"expected true (desirable) or false (undesirable), got {json_type(label)}"))
        record = Record("unpaired", fmt, line, messages=_prompt(row, line, problems),
                        completion=_string(row, "completion", line, problems), label=label is True)
    else:
        if fmt == "messages":
            messages = _messages(row["messages"], "messages", line, problems)
        elif fmt == "sharegpt":
            messages = _sharegpt(row["conversations"], line, problems)
        elif fmt == "prompt_completion":
            messages = (Message("user", _string(row, "prompt", line, problems)),
                        Message("assistant", _string(row, "completion", line, problems)))
        else:
            instruction = _string(row, "instruction", line, problems)
            extra = row.get("input") or ""
            prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
            system = [Message("system", row["system"])] if isinstance(row.get("system"), str) else []
            messages = (*system, Message("user", prompt), Message("assistant", _string(row, "output", line, problems)))
        if messages and not any(m.role == "assistant" for m in messages):
            problems.append(Problem("missing_assistant_message", line, "messages",
                                    "the conversation has no assistant message to learn from"))
        record = Record("chat", fmt, line, messages=messages)
    if any(p.severity == "error" for p in problems):
        return None, problems
    return record, problems


def _prompt(row: dict, line: int, problems: list[Problem]) -> tuple[Message, ...]:
    """A preference or unpaired row's prompt: a string (one user message) or a list of messages."""
    prompt = row.get("prompt", "")
    if isinstance(prompt, list):
        return _messages(prompt, "prompt", line, problems)
    return (Message("user", _string(row, "prompt", line, problems)),)


def json_type(value: object) -> str:
    """How a JSON value's type reads in an error message (`"yes"` is a string, 1 a number)."""
    if value is None:
        return "null"
    try:
        shown = json.dumps(value, default=repr)[:40]
    except (ValueError, RecursionError):  # a value that nests itself, or too deep to show
        shown = "..."
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__) + f" ({shown})"


def _string(row: dict, key: str, line: int, problems: list[Problem]) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        problems.append(Problem("invalid_field_type", line, key, f"expected a string, got {json_type(value)}"))
        return ""
    if not value.strip():
        problems.append(Problem("empty_content", line, key, "the field is empty"))
    return value


def _messages(value: object, field: str, line: int, problems: list[Problem]) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        problems.append(Problem("invalid_field_type", line, field, "expected a non-empty list of messages"))
        return ()
    messages = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            problems.append(Problem("not_an_object", line, where, "each message must be an object"))
            continue
        role = item.get("role")
        if role not in ROLES:
            problems.append(Problem("unknown_role", line, f"{where}.role",
                                    f"role {role!r} is not one of system, user, assistant"))
            continue
        content = item.get("content")
        if not isinstance(content, str):
            problems.append(Problem("invalid_field_type", line, f"{where}.content", "content must be a string"))
            continue
        if not content.strip():
            problems.append(Problem("empty_content", line, f"{where}.content", "the message is empty"))
        weight = item.get("weight")
        if weight is not None and (role != "assistant" or weight not in (0, 1)):
            problems.append(Problem("invalid_weight", line, f"{where}.weight",
                                    "weight must be 0 or 1, and only on assistant messages"))
        messages.append(Message(role, content, weight))
    return tuple(messages)


def _sharegpt(value: object, line: int, problems: list[Problem]) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        problems.append(Problem("invalid_field_type", line, "conversations", "expected a non-empty list of turns"))
        return ()
    converted = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            problems.append(Problem("not_an_object", line, f"conversations[{index}]", "each turn must be an object"))
            continue
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            problems.append(Problem("unknown_role", line, f"conversations[{index}].from",
                                    f"speaker {turn.get('from')!r} is not human, gpt or system"))
            continue
        converted.append({"role": role, "content": turn.get("value")})
    return _messages(converted, "conversations", line, problems) if converted else ()
