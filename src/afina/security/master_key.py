"""The master key that wraps every file's data key, read from the environment.

    AFINA_MASTER_KEY=<64 hex digits, or base64 of 32 bytes>
    AFINA_MASTER_KEY_FILE=/etc/afina/master.key      # the same text in a file of mode 600

    key = master_key()          # None: no key set, nothing is encrypted

A key file that its group or other users can read is refused: a key anyone on the machine can read
protects nothing. The key itself never appears in an error, a repr or a log; files and messages
name it by its key id, a short fingerprint that does not reveal it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from afina.errors import AfinaError
from afina.sealing import KEY_FILE_VARIABLE, KEY_VARIABLE

NEW_KEY_VARIABLE = "AFINA_NEW_MASTER_KEY"
KEY_BYTES = 32


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit master key and where it came from (a variable's name or a file's path)."""

    secret: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> bytes:
        """8 bytes that identify the key (stored in every file it wraps) without revealing it."""
        return hashlib.sha256(b"afina master key id\0" + self.secret).digest()[:8]


def master_key() -> MasterKey | None:
    """The master key from AFINA_MASTER_KEY or AFINA_MASTER_KEY_FILE; None when neither is set."""
    text, path = os.environ.get(KEY_VARIABLE, ""), os.environ.get(KEY_FILE_VARIABLE, "")
    if text and path:
        raise AfinaError("master_key_ambiguous", f"both {KEY_VARIABLE} and {KEY_FILE_VARIABLE} are set",
                         location=KEY_VARIABLE, hint="set only one of them")
    if path:
        return read_key_file(Path(path).expanduser(), KEY_FILE_VARIABLE)
    if text:
        return parse_key(text.encode(), KEY_VARIABLE)
    return None


def new_master_key(key_file: Path | None) -> MasterKey:
    """The key a rotation moves to: from `key_file`, or AFINA_NEW_MASTER_KEY."""
    if key_file is not None:
        return read_key_file(key_file.expanduser(), "--new-key-file")
    text = os.environ.get(NEW_KEY_VARIABLE, "")
    if not text:
        raise AfinaError("master_key_missing", "no new master key given", location="--new-key-file",
                         hint=f"pass --new-key-file PATH or set {NEW_KEY_VARIABLE} (e.g. from `openssl rand -hex 32`)")
    return parse_key(text.encode(), NEW_KEY_VARIABLE)


def read_key_file(path: Path, location: str) -> MasterKey:
    """A key file readable by its owner only; AfinaError `key_file_exposed` when group or others can read it."""
    try:
        status = path.stat()
    except OSError as exc:
        raise AfinaError("master_key_missing", f"cannot read the key file ({exc.strerror})", location=str(path),
                         hint=f"check {location}") from None
    if not stat.S_ISREG(status.st_mode):
        raise AfinaError("bad_master_key", "the key file is not a regular file", location=str(path))
    if status.st_mode & 0o077:
        raise AfinaError("key_file_exposed", f"the key file can be used by other users (mode "
                                             f"{stat.S_IMODE(status.st_mode):04o})", location=str(path),
                         hint=f"make it readable by its owner only: chmod 600 {path}")
    return parse_key(path.read_bytes(), str(path))


def parse_key(raw: bytes, source: str) -> MasterKey:
    """32 bytes written as 64 hex digits or as base64 (standard or URL-safe alphabet)."""
    text = raw.strip()
    for decode in (binascii.unhexlify,
                   lambda t: base64.b64decode(t.replace(b"-", b"+").replace(b"_", b"/"), validate=True)):
        try:
            secret = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(secret) == KEY_BYTES:
            return MasterKey(secret, source)
    raise AfinaError("bad_master_key", f"the master key is not {KEY_BYTES} bytes as hex or base64", location=source,
                     hint="make one with: openssl rand -hex 32")
