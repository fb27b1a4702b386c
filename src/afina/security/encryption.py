"""Encryption at rest: every file afina keeps that holds data or trained weights, sealed with AES-256-GCM.

    export AFINA_MASTER_KEY=$(openssl rand -hex 32)     # or AFINA_MASTER_KEY_FILE=/path (mode 600)

    encrypt_file(run_dir / "train.jsonl")                # in place, atomically; a no-op without a key
    data = read_bytes(run_dir / "train.jsonl")           # decrypted in memory (plain files as they are)
    with decrypted_copy(run_dir / "adapter") as adapter: # for libraries that need a path
        PeftModel.from_pretrained(base, adapter)

Envelope encryption: each file gets its own random 256-bit data key, which encrypts the content; the
data key is wrapped (AES-GCM) by the master key and kept in the file's fixed-size header. Rotating
the master key therefore rewrites headers only (`afina.security.rotation`), never the data.

    header  AFINAENC | version (1) | chunk size (4) | key id (8) | nonce (12) | wrapped data key (48)
    chunks  nonce (12) | ciphertext | tag (16)       each of `chunk size` plaintext bytes, the last shorter

The wrapped key is authenticated together with the rest of the header; each chunk together with the
header's fixed part, its index and whether it is the last one, so chunks cannot be reordered,
dropped or the file cut short without decryption failing. The key id (a fingerprint of the master
key) tells a wrong key from a damaged file. Any failure is one `AfinaError("decryption_failed")`
naming the file: never partial or garbled plaintext.

Without a master key nothing is encrypted and every function here reads and writes plain files, so
afina behaves exactly as before. Encrypted and plain files are told apart by the magic header, which
lets a store that was started without a key be encrypted later.

The lower layers (models, training) never import this module: they read and write through the
`afina.sealing.SealedFiles` protocol, and the layers that compose afina hand them this
implementation once per process:

    use_encryption()                     # afina.sealing.sealed_files() is now ENCRYPTED_FILES
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from afina.errors import AfinaError
from afina.sealing import MAGIC, is_sealed, looks_sealed, use_sealed_files
from afina.security.master_key import MasterKey, master_key

VERSION = 1
CHUNK_SIZE = 1 << 20
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER = struct.Struct(">8sBI8s12s48s")  # magic, version, chunk size, key id, wrap nonce, wrapped data key
FIXED = struct.Struct(">8sBI")  # the part of the header a rotation never changes
MAX_CHUNK_SIZE = 64 << 20


@dataclass(frozen=True)
class Header:
    """A sealed file's header: which master key wrapped its data key, and the wrapped key."""

    chunk_size: int
    key_id: bytes
    nonce: bytes = field(repr=False)
    wrapped_key: bytes = field(repr=False)

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.chunk_size, self.key_id, self.nonce, self.wrapped_key)

    def fixed(self) -> bytes:
        return FIXED.pack(MAGIC, VERSION, self.chunk_size)

    def wrap_aad(self) -> bytes:
        return self.fixed() + self.key_id


is_encrypted = is_sealed  # True when a file starts with afina's magic header


def decryption_failed(path: str | Path, reason: str) -> AfinaError:
    return AfinaError("decryption_failed", f"cannot decrypt the file: {reason}", location=str(path),
                      hint="check that AFINA_MASTER_KEY (or AFINA_MASTER_KEY_FILE) is the key the file was written "
                           "with; a file that fails with the right key was damaged or altered: restore it from a backup")


# --- the header: a data key wrapped by the master key ---------------------------------------------

def seal_data_key(data_key: bytes, key: MasterKey, chunk_size: int = CHUNK_SIZE) -> Header:
    """A header holding `data_key` wrapped by `key`."""
    nonce = os.urandom(NONCE_SIZE)
    unsealed = Header(chunk_size, key.key_id, nonce, b"")
    return Header(chunk_size, key.key_id, nonce, AESGCM(key.secret).encrypt(nonce, data_key, unsealed.wrap_aad()))


def open_data_key(header: Header, key: MasterKey, path: str | Path) -> bytes:
    """The data key in `header`, unwrapped with `key`; `decryption_failed` for another key or a damaged header."""
    if header.key_id != key.key_id:
        raise decryption_failed(path, f"it was encrypted under another master key (key id {header.key_id.hex()}, "
                                      f"the key given has {key.key_id.hex()})")
    try:
        return AESGCM(key.secret).decrypt(header.nonce, header.wrapped_key, header.wrap_aad())
    except InvalidTag:
        raise decryption_failed(path, "its header fails authentication (damaged or altered)") from None


def parse_header(raw: bytes, path: str | Path) -> Header:
    if len(raw) < HEADER.size:
        raise decryption_failed(path, "the file is shorter than its header (truncated)")
    magic, version, chunk_size, key_id, nonce, wrapped = HEADER.unpack(raw[:HEADER.size])
    if magic != MAGIC:
        raise decryption_failed(path, "it does not start with afina's encryption header")
    if version != VERSION or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise decryption_failed(path, f"unknown format version {version} or chunk size {chunk_size} (damaged?)")
    return Header(chunk_size, key_id, nonce, wrapped)


def read_header(path: str | Path) -> Header:
    with open(path, "rb") as handle:
        return parse_header(handle.read(HEADER.size), path)


# --- the content: chunks sealed with the data key --------------------------------------------------

def chunk_aad(header: Header, index: int, final: bool) -> bytes:
    return header.fixed() + struct.pack(">QB", index, final)


def encrypt_stream(source: BinaryIO, out: BinaryIO, key: MasterKey, chunk_size: int = CHUNK_SIZE) -> None:
    """Write `source`'s bytes to `out` sealed under a new data key wrapped by `key`."""
    data_key = AESGCM.generate_key(bit_length=256)
    header = seal_data_key(data_key, key, chunk_size)
    out.write(header.pack())
    cipher = AESGCM(data_key)
    index, chunk = 0, source.read(chunk_size)
    while True:
        following = source.read(chunk_size) if len(chunk) == chunk_size else b""
        nonce = os.urandom(NONCE_SIZE)
        out.write(nonce + cipher.encrypt(nonce, chunk, chunk_aad(header, index, not following)))
        if not following:
            return
        index, chunk = index + 1, following


def decrypt_stream(handle: BinaryIO, path: str | Path, key: MasterKey | None = None) -> Iterator[bytes]:
    """The plaintext of the sealed file open as `handle`, chunk by chunk, each authenticated before it
    is yielded; `decryption_failed` at the first chunk that fails, or when the file ends too early."""
    key = require_key(path, key)
    header = parse_header(handle.read(HEADER.size), path)
    cipher = AESGCM(open_data_key(header, key, path))
    sealed = header.chunk_size + NONCE_SIZE + TAG_SIZE
    index, block = 0, handle.read(sealed)
    while True:
        following = handle.read(sealed) if len(block) == sealed else b""
        if len(block) < NONCE_SIZE + TAG_SIZE:
            raise decryption_failed(path, f"it ends inside chunk {index} (truncated)")
        try:
            yield cipher.decrypt(block[:NONCE_SIZE], block[NONCE_SIZE:], chunk_aad(header, index, not following))
        except InvalidTag:
            raise decryption_failed(path, f"chunk {index} fails authentication (damaged, altered, reordered or "
                                          "truncated)") from None
        if not following:
            return
        index, block = index + 1, following


def require_key(path: str | Path, key: MasterKey | None) -> MasterKey:
    key = key or master_key()
    if key is None:
        raise AfinaError("master_key_missing", "the file is encrypted and no master key is set", location=str(path),
                         hint="set AFINA_MASTER_KEY or AFINA_MASTER_KEY_FILE to the key it was written with")
    return key


# --- files: written sealed, read back plain --------------------------------------------------------

def encrypt_file(path: str | Path, key: MasterKey | None = None) -> bool:
    """Seal `path` in place (atomically: a sealed copy beside it replaces it). A no-op, returning
    False, without a master key or for a file that is already sealed."""
    path = Path(path)
    key = key or master_key()
    if key is None or is_encrypted(path):
        return False
    with path.open("rb") as source, atomic_writer(path) as out:
        encrypt_stream(source, out, key)
    return True


def encrypt_copy(source: str | Path, target: str | Path, key: MasterKey) -> None:
    """Write `source` sealed to `target`, which it replaces atomically (on any file system)."""
    with open(source, "rb") as plain, atomic_writer(Path(target)) as out:
        encrypt_stream(plain, out, key)


def encrypt_tree(directory: str | Path, key: MasterKey | None = None) -> int:
    """Seal every regular file under `directory` (links are left alone); returns how many were sealed."""
    key = key or master_key()
    if key is None:
        return 0
    files = [p for p in sorted(Path(directory).rglob("*")) if p.is_file() and not p.is_symlink()]
    return sum(encrypt_file(p, key) for p in files)


def write_bytes(path: str | Path, data: bytes, key: MasterKey | None = None) -> None:
    """Write `data` to `path`: sealed (atomically) when a master key is set, as it is otherwise."""
    key = key or master_key()
    if key is None:
        Path(path).write_bytes(data)
        return
    with atomic_writer(Path(path)) as out:
        encrypt_stream(io.BytesIO(data), out, key)


def read_bytes(path: str | Path, key: MasterKey | None = None) -> bytes:
    """The plain bytes of `path`, decrypted in memory when the file is sealed."""
    with open(path, "rb") as handle:
        if not looks_sealed(handle.read(len(MAGIC))):
            handle.seek(0)
            return handle.read()
        handle.seek(0)
        return b"".join(decrypt_stream(handle, path, key))


def plain_chunks(path: str | Path, key: MasterKey | None = None) -> Iterator[bytes]:
    """A file's plain content in blocks (each authenticated before it is yielded, when sealed),
    without holding the whole file in memory."""
    with open(path, "rb") as handle:
        sealed = looks_sealed(handle.read(len(MAGIC)))
        handle.seek(0)
        if sealed:
            yield from decrypt_stream(handle, path, key)
        else:
            yield from iter(lambda: handle.read(CHUNK_SIZE), b"")


def read_text(path: str | Path, key: MasterKey | None = None) -> str:
    return read_bytes(path, key).decode("utf-8")


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """A safetensors file's tensors: memory-mapped when plain, decrypted in memory when sealed."""
    from safetensors.torch import load, load_file

    if not is_encrypted(path):
        return load_file(path, device=device)
    return {name: tensor.to(device) for name, tensor in load(read_bytes(path)).items()}


def decrypt_file(source: Path, target: Path, key: MasterKey | None = None) -> None:
    """Write the plain content of the sealed `source` to `target` (created readable by its owner only)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with source.open("rb") as handle, os.fdopen(fd, "wb") as out:
        for chunk in decrypt_stream(handle, source, key):
            out.write(chunk)


@contextlib.contextmanager
def decrypted_copy(path: str | Path, key: MasterKey | None = None) -> Iterator[Path]:
    """A plain copy of the file or directory `path` for libraries that open files themselves
    (transformers, PEFT, safetensors, llama.cpp), in a private temporary directory (mode 0700)
    removed when the block ends. When nothing under `path` is sealed, `path` itself."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    if not any(is_encrypted(p) for p in files):
        yield path
        return
    private = Path(tempfile.mkdtemp(prefix="afina-decrypted-"))  # mkdtemp makes it 0700
    try:
        target = private / path.name
        if path.is_file():
            decrypt_file(path, target, key)
        else:
            for source in files:
                copy = target / source.relative_to(path)
                copy.parent.mkdir(parents=True, exist_ok=True)
                if is_encrypted(source):
                    decrypt_file(source, copy, key)
                else:
                    shutil.copyfile(source, copy)
        yield target
    finally:
        shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file handle whose bytes replace `path` only once fully written and synced (with the mode `path`
    had; a new file is readable by its owner only); on failure `path` is untouched and the partial
    file removed."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".sealing", dir=path.parent)
    temporary = Path(temporary)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- handed down to the lower layers -------------------------------------------------------------

class EncryptedFiles:
    """`afina.sealing.SealedFiles` under the master key of the environment (read at each call, so a
    rotated key is used at once): sealed when a key is set, plain files as they are otherwise."""

    def read_bytes(self, path: str | Path) -> bytes:
        return read_bytes(path)

    def plain_chunks(self, path: str | Path) -> Iterator[bytes]:
        return plain_chunks(path)

    def plain_copy(self, path: str | Path) -> contextlib.AbstractContextManager[Path]:
        return decrypted_copy(path)

    def seal_tree(self, directory: str | Path) -> int:
        return encrypt_tree(directory)


ENCRYPTED_FILES = EncryptedFiles()


def use_encryption() -> None:
    """Hand encryption at rest down to the lower layers of this process (`afina.sealing`); the CLI,
    the services, the jobs worker, the pipeline, export and serving call it before they work."""
    use_sealed_files(ENCRYPTED_FILES)
