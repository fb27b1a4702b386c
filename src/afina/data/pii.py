"""Personal data in text: find it, and replace it with typed placeholders before training.

    find_pii("Escríbeme a ana@example.es o al +34 612 345 678")
        -> [Finding("EMAIL", 12, 26, ...), Finding("PHONE", 29, 44, ...)]
    mask_record(record)  # the same record with <EMAIL_1>, <PHONE_1>, ... in every text field

Detectors are patterns, confirmed by the value's own check digits where it has them: IBAN (ISO 7064
mod 97), payment cards (Luhn), Spanish DNI and NIE (check letter), Portuguese NIF (mod 11),
Brazilian CPF (two check digits), US SSN (the ranges the SSA never issues are excluded). E-mail
addresses, IPv4 and IPv6 addresses and phone numbers (Spanish, Portuguese, Brazilian, US and
international formats) are patterns alone. Checksummed types are matched first, so a card or an IBAN
is never also reported as a phone number. Person names and postal addresses need a named-entity
model and are not found here (`NER_TYPES`).

Pure functions: no I/O. A value is never logged or reported as it is (`mask_value`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from afina.data.records import Message, Record

NER_TYPES = ("PERSON", "ADDRESS")  # need a named-entity backend (Presidio, spaCy); not detected by patterns

DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
PHONE_WORDS = re.compile(r"(tel|tlf|phone|móvil|movil|telemóvel|telemovel|celular|whats|fone|ligue|llame|call)\w*"
                         r"[\s.:]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One piece of personal data: its type and where it is in the text (end exclusive)."""

    type: str
    start: int
    end: int
    value: str


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def luhn_valid(number: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(number)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def dni_valid(value: str) -> bool:
    compact = value.replace("-", "").upper()
    number = compact[:-1].translate(str.maketrans("XYZ", "012"))
    return number.isdigit() and DNI_LETTERS[int(number) % 23] == compact[-1]


def nif_pt_valid(number: str) -> bool:
    if len(number) != 9 or number[0] not in "1235689":
        return False
    remainder = sum(int(d) * w for d, w in zip(number[:8], range(9, 1, -1))) % 11
    return int(number[8]) == (0 if remainder < 2 else 11 - remainder)


def cpf_valid(number: str) -> bool:
    if len(number) != 11 or len(set(number)) == 1:
        return False
    for length in (9, 10):
        total = sum(int(d) * w for d, w in zip(number[:length], range(length + 1, 1, -1)))
        if (total * 10 % 11) % 10 != int(number[length]):
            return False
    return True


def ssn_valid(value: str) -> bool:
    area, group, serial = value.split("-")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def ip_valid(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# (type, pattern, check on the matched text): earlier types claim their spans first
DETECTORS: list[tuple[str, re.Pattern, object]] = [
    ("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?!\w)"),
     None),
    ("IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"),
     iban_valid),
    ("CARD", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
     lambda m: 13 <= len(digits(m)) <= 19 and digits(m)[0] in "3456" and luhn_valid(digits(m))),
    ("CPF", re.compile(r"(?<![\d.])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\d-])|(?<!\d)\d{11}(?!\d)"),
     lambda m: cpf_valid(digits(m))),
    ("DNI", re.compile(r"(?<![A-Za-z0-9])(?:\d{8}|[XYZ]-?\d{7})-?[A-Z](?![A-Za-z0-9])"), dni_valid),
    ("SSN", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), ssn_valid),
    ("NIF", re.compile(r"(?<![\d.+-])\d{9}(?![\d-])"), nif_pt_valid),
    ("IP", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)"
                      r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:{1,2}){2,7}[0-9a-fA-F]{1,4}(?![\w:])"), ip_valid),
    ("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,5}(?:[\s.-]?\d{2,5}){1,4}"
                         r"(?![\w-])"), lambda m: 9 <= len(digits(m)) <= 15),
]
TYPES = tuple(name for name, _, _ in DETECTORS)


def find_pii(text: str) -> list[Finding]:
    """Every piece of personal data in `text`, in order. A 9-digit number right after a word for a
    phone ("tel.", "móvil") is a phone number even when it would pass as a Portuguese NIF."""
    taken = [False] * len(text)
    found: list[Finding] = []
    for name, pattern, check in DETECTORS:
        for match in pattern.finditer(text):
            start, end = match.span()
            value = match.group()
            if any(taken[start:end]) or (check is not None and not check(value)):
                continue
            if name == "NIF" and PHONE_WORDS.search(text[max(0, start - 20) : start]):
                name_here = "PHONE"
            else:
                name_here = name
            if name_here == "PHONE" and not phone_shaped(value, text[max(0, start - 20) : start]):
                continue
            found.append(Finding(name_here, start, end, value))
            for i in range(start, end):
                taken[i] = True
    return sorted(found, key=lambda f: f.start)


ID_SHAPES = re.compile(r"\d{3}\.\d{3}\.\d{3}-\d{2}|\d{3}-\d{2}-\d{4}")  # CPF and SSN layouts


def phone_shaped(value: str, before: str) -> bool:
    """Whether a run of digits reads as a phone number: written as one (a country code, an area code in
    parentheses, or digits in groups), or right after a word for a phone. A plain run of digits is
    more often a case or order number; a CPF or SSN layout with wrong check digits is an identifier."""
    if ID_SHAPES.fullmatch(value):
        return False
    written_as_phone = value.startswith("+") or "(" in value or bool(re.search(r"\d[\s.-]\d", value))
    return written_as_phone or bool(PHONE_WORDS.search(before))


def mask_value(value: str) -> str:
    """A value as a report may show it: its first and last characters, the rest starred."""
    if len(value) <= 4:
        return "*" * len(value)
    return value[:2] + "*" * (len(value) - 4) + value[-2:]


class Placeholders:
    """Typed placeholders numbered within one record: the same value gets the same placeholder."""

    def __init__(self):
        self.assigned: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def replace(self, text: str) -> str:
        pieces, last = [], 0
        for finding in find_pii(text):
            key = (finding.type, finding.value)
            if key not in self.assigned:
                self.counts[finding.type] = self.counts.get(finding.type, 0) + 1
                self.assigned[key] = f"<{finding.type}_{self.counts[finding.type]}>"
            pieces += [text[last : finding.start], self.assigned[key]]
            last = finding.end
        return "".join(pieces) + text[last:]


def mask_record(record: Record) -> Record:
    """`record` with its personal data replaced by typed placeholders in every text it holds, numbered
    consistently across its messages and answers (`<EMAIL_1>` is the same address everywhere)."""
    placeholders = Placeholders()

    def mask(text: str | None) -> str | None:
        return None if text is None else placeholders.replace(text)

    messages = tuple(Message(m.role, mask(m.content), m.weight) for m in record.messages)
    return replace(record, messages=messages, text=mask(record.text), chosen=mask(record.chosen),
                   rejected=mask(record.rejected), completion=mask(record.completion))


def record_texts(record: Record) -> list[tuple[str, str]]:
    """(field, text) for every text a record holds: `messages[2].content`, `chosen`, ..."""
    fields = [(f"messages[{i}].content", m.content) for i, m in enumerate(record.messages)]
    fields += [(name, getattr(record, name)) for name in ("text", "chosen", "rejected", "completion")]
    return [(name, text) for name, text in fields if text]
