"""The one internal record type that every supported data format is normalized to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: float | None = None  # OpenAI style: 0 = do not train on this assistant message


@dataclass(frozen=True)
class Record:
    """One example. `kind` says which fields are set:

    - `chat`: `messages` (prompt/completion, Alpaca and ShareGPT rows become chats too)
    - `text`: `text`, for continued pretraining
    - `preference`: `prompt` messages plus `chosen` and `rejected` answers
    - `unpaired`: `prompt` messages plus one `completion` and its KTO `label` (True: desirable)
    """

    kind: str
    source_format: str
    line: int  # physical line (JSONL, JSON, CSV) or row number (Parquet), 1-based
    messages: tuple[Message, ...] = ()
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def content_key(self) -> str:
        """A hash of what the example says (not where it sits in the file): used for duplicates and splits."""
        payload = {"kind": self.kind, "messages": [[m.role, m.content] for m in self.messages],
                   "text": self.text, "chosen": self.chosen, "rejected": self.rejected}
        if self.kind == "unpaired":  # only here, so other kinds keep their keys (and their splits)
            payload |= {"completion": self.completion, "label": self.label}
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        data = asdict(self)
        data["messages"] = [{k: v for k, v in m.items() if v is not None} for m in data["messages"]]
        return {k: v for k, v in data.items() if v not in (None, (), [], {})}

    @staticmethod
    def from_json(data: dict) -> "Record":
        messages = tuple(Message(**m) for m in data.get("messages", ()))
        return Record(kind=data["kind"], source_format=data["source_format"], line=data["line"], messages=messages,
                      text=data.get("text"), chosen=data.get("chosen"), rejected=data.get("rejected"),
                      completion=data.get("completion"), label=data.get("label"))

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the final assistant answer."""
        messages = list(self.messages)
        if self.kind == "chat" and messages and messages[-1].role == "assistant":
            messages = messages[:-1]
        return [{"role": m.role, "content": m.content} for m in messages]

    def reference_answer(self) -> str | None:
        if self.kind == "chat" and self.messages and self.messages[-1].role == "assistant":
            return self.messages[-1].content
        if self.kind == "unpaired":
            return self.completion if self.label else None
        return self.chosen if self.kind == "preference" else None
