"""Model output made safe to hand on: personal data redacted, optionally markup and control characters
removed, in whole answers and in streams alike (`afina serve --redact-output --sanitize-output`).

    cleaner = OutputFilter(redact=True, sanitize=False)
    cleaner.push("Pay to ES91 2100 04")   # ""  (held back: the value may go on)
    cleaner.push("18 4502 0005 1332 now, thanks")  # "Pay to <IBAN_1> "
    cleaner.flush()                         # "now, thanks"
    cleaner.redactions                      # {"IBAN": 1}

Redaction uses the detectors of `afina data scan` (`afina.data.pii`) and its typed placeholders,
numbered within one answer (the same value gets the same placeholder). A stream is cleaned as it
goes: the last `hold` characters are held back, and text is let out only up to a whitespace, so a
value split across chunks is whole before it is looked at. Detected values have no whitespace in
them, or are shorter than `hold` (an IBAN written in groups, a phone number), so none straddles the
point where text is let out. Past `max_hold` characters without whitespace the text is let out anyway.

Sanitizing removes what a client might render or execute rather than show: HTML/XML tags, markdown
images (which make a browser fetch a URL that can carry data away), terminal escape sequences, and
control, bidirectional-override and zero-width characters (newlines and tabs stay).
"""

from __future__ import annotations

import re

from afina.data.pii import Finding, find_pii

ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
TAGS = re.compile(r"<\s*/?\s*[A-Za-z][^<>]*>|<!--.*?-->", re.DOTALL)
MARKDOWN_IMAGES = re.compile(r"!\[[^\]]*\]\([^)]*\)")
OPENERS = re.compile(r"<[^>]*$|!\[[^)]*$|\x1b[^A-Za-z\x07]*$", re.DOTALL)  # markup not yet closed
CONTEXT = 24  # characters let out before that detectors still read (a "tel.:" before a number)


def sanitize_text(text: str) -> str:
    """`text` without tags, markdown images, escape sequences and invisible or control characters."""
    for pattern in (ESCAPES, MARKDOWN_IMAGES, TAGS, CONTROLS):
        text = pattern.sub("", text)
    return text


class OutputFilter:
    """Cleans one answer, pushed in pieces; counts what it redacted by type."""

    def __init__(self, redact: bool, sanitize: bool, hold: int = 64, max_hold: int = 1024):
        self.redact, self.sanitize, self.hold, self.max_hold = redact, sanitize, hold, max_hold
        self.buffer = ""
        self.context = ""  # the end of the raw text already let out
        self.placeholders: dict[tuple[str, str], str] = {}
        self.redactions: dict[str, int] = {}

    def push(self, text: str) -> str:
        """The cleaned text that may be let out now (possibly empty); the rest is held back."""
        self.buffer += text
        return self.let_out(self.cut_point())

    def flush(self) -> str:
        """Everything still held, cleaned: the answer ended."""
        return self.let_out(len(self.buffer))

    def let_out(self, cut: int) -> str:
        piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
        if not piece:
            return ""
        context, self.context = self.context, (self.context + piece)[-CONTEXT:]
        if self.sanitize:
            piece = sanitize_text(piece)
        return self.redacted(piece, context) if self.redact else piece

    def cut_point(self) -> int:
        """How much of the buffer may go: not the last `hold` characters, only up to a whitespace, never
        into unclosed markup or a value detected across the cut."""
        buffer = self.buffer
        if len(buffer) <= self.hold:
            return 0
        cut = len(buffer) - self.hold
        spaces = [m.end() for m in re.finditer(r"\s", buffer[:cut])]
        if spaces:
            cut = spaces[-1]
        elif len(buffer) <= self.max_hold:
            return 0
        if self.sanitize:
            opened = OPENERS.search(buffer[:cut])
            if opened and len(buffer) <= self.max_hold:
                cut = opened.start()
        if self.redact:
            for finding in self.findings(buffer, self.context):
                if finding.start < cut < finding.end:
                    cut = finding.start
        return cut

    def findings(self, text: str, context: str) -> list[Finding]:
        """Values in `text`, read after the `context` let out before it (positions within `text`)."""
        return [Finding(f.type, f.start - len(context), f.end - len(context), f.value)
                for f in find_pii(context + text) if f.start >= len(context)]

    def redacted(self, text: str, context: str) -> str:
        pieces, last = [], 0
        for finding in self.findings(text, context):
            key = (finding.type, finding.value)
            if key not in self.placeholders:
                number = sum(1 for kind, _ in self.placeholders if kind == finding.type) + 1
                self.placeholders[key] = f"<{finding.type}_{number}>"
            self.redactions[finding.type] = self.redactions.get(finding.type, 0) + 1
            pieces += [text[last:finding.start], self.placeholders[key]]
            last = finding.end
        return "".join(pieces) + text[last:]
