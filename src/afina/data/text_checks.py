"""Checks that tell text afina can train on from text it cannot: a file in another encoding or not
text at all, and JSON values that parse but cannot be used (nesting, lone surrogates)."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from afina.errors import AfinaError

MAX_DEPTH = 100  # chats nest 3 levels deep; far below Python's recursion limit, so later steps cannot hit it

# A \uD800-\uDFFF escape: only then can json hand back a lone surrogate, which no encoder will write.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_text_head(head: bytes, path: Path, suffix: str) -> None:
    """Refuse a file that is not UTF-8 text at all: UTF-16 or UTF-32, or binary. A stray NUL byte in
    otherwise clean text is not that: the reader reports it on its line."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise AfinaError("invalid_utf8", f"the file is {name} text (it starts with a {name} byte order mark)",
                             location=f"{path}:1", hint="save the file as UTF-8")
    if b"\x00" not in head:
        return
    even, odd = head[0::2], head[1::2]
    nuls = sorted((even.count(0) / len(even), odd.count(0) / max(len(odd), 1)))
    if len(head) >= 4 and nuls[0] < 0.1 and nuls[1] > 0.9:  # ASCII text in UTF-16: a NUL beside every character
        raise AfinaError("invalid_utf8", "the file looks like UTF-16 text (every other byte is NUL)",
                         location=f"{path}:1", hint="save the file as UTF-8")
    text = head.decode("utf-8", errors="replace")
    odd_chars = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v\x1b"))
    if odd_chars > 0.1 * len(text):
        raise AfinaError("binary_file", "the file holds binary data, not text", location=str(path),
                         hint=f"expected {suffix} text")


def unusable_value(value: object, text: str, start: int = 0, end: int | None = None) -> tuple[str, str, str] | None:
    """What JSON accepts but afina cannot use: nesting over MAX_DEPTH, or a lone surrogate (`"\\ud800"`),
    which no encoder can write. Returns (code, message, field) or None; field is "" for the whole value.

    `text[start:end]` is the JSON the value came from: the walk over the value runs only when the
    text holds enough brackets to nest that deep, or a surrogate escape.
    """
    end = len(text) if end is None else end
    deep = text.count("[", start, end) + text.count("{", start, end) > MAX_DEPTH
    if not deep and not _SURROGATE_ESCAPE.search(text, start, end):
        return None
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return "invalid_text", f"a lone surrogate (\\u{ord(found.group()):04x}) is not valid Unicode", where
            continue
        if not isinstance(item, (list, dict)):
            continue
        if depth > MAX_DEPTH:
            return "too_deep", f"nested more than {MAX_DEPTH} levels deep", re.split(r"[.\[]", where)[0]
        if isinstance(item, list):
            stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(item))
            continue
        for key, child in item.items():
            path = f"{where}.{key}" if where else key
            if _SURROGATE.search(key):
                return "invalid_text", "a key holds a lone surrogate, which is not valid Unicode", where
            stack.append((child, depth + 1, path))
    return None
