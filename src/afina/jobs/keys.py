"""API keys of the jobs service: random, shown once, kept only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "afn-"


def new_api_key() -> str:
    """A new key: `afn-` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """What the store keeps of a key. A key has enough entropy that a plain SHA-256 cannot be reversed."""
    return hashlib.sha256(key.encode()).hexdigest()
