"""API keys: random, shown once, kept only as their SHA-256; each acts as its user until it expires
or is revoked.

    key = new_api_key()                                   # afn-... : printed once, never stored
    store.create_api_key("laptop", hash_api_key(key), utcnow() + parse_duration("30d"), user="alice")
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from afina.errors import AfinaError

KEY_PREFIX = "afn-"


def new_api_key() -> str:
    """A new key: `afn-` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """What the store keeps of a key. A key has enough entropy that a plain SHA-256 cannot be reversed."""
    return hashlib.sha256(key.encode()).hexdigest()


DURATION = re.compile(r"(\d+)\s*([mhdw])")
DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m` or `2w` as a timedelta; AfinaError `bad_duration` for anything else."""
    match = DURATION.fullmatch(text.strip().lower())
    if match is None or int(match[1]) == 0:
        raise AfinaError("bad_duration", f"{text!r} is not a duration", location="--expires-in",
                         hint="write a positive number and a unit: 90m, 12h, 30d or 2w")
    return timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})
