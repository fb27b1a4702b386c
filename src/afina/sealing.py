"""Files kept sealed at rest, as the modules that read and write them see it: the protocol, a plain
default, and the one implementation the process was handed.

    files = sealed_files()                    # what the process was handed; PlainFiles otherwise
    state = json.loads(files.read_bytes(path))  # decrypted in memory when sealed
    with files.plain_copy(run_dir / "adapter") as adapter:  # for libraries that open files themselves
        PeftModel.from_pretrained(base, adapter)
    files.seal_tree(staging)                  # every file under it sealed, when a master key is set

Models, training and the other lower layers read and write through this protocol and never import
the encryption itself: the layers that compose afina (the CLI, the services, the jobs worker, the
pipeline, export and serving) hand the implementation down once per process with
`use_sealed_files` (`afina.security.encryption.use_encryption`).

The default is fail-closed. `PlainFiles` reads and writes plain files as they are, but with a
master key configured (AFINA_MASTER_KEY or AFINA_MASTER_KEY_FILE) it refuses to leave a file plain
(`seal_tree`) and to read a sealed one: code that forgot to hand the encryption down gets one clear
error, never a plain copy of data that should be encrypted. A sealed file is told by its first
bytes (`is_sealed`), which is all this module knows of the format.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from afina.errors import AfinaError

MAGIC = b"AFINAENC"  # the first bytes of every sealed file
KEY_VARIABLE = "AFINA_MASTER_KEY"
KEY_FILE_VARIABLE = "AFINA_MASTER_KEY_FILE"
BLOCK_SIZE = 1 << 20


class SealedFiles(Protocol):
    """Reading and writing the files afina keeps at rest, sealed or plain."""

    def read_bytes(self, path: str | Path) -> bytes:
        """The plain bytes of `path`, decrypted in memory when the file is sealed."""
        ...

    def plain_chunks(self, path: str | Path) -> Iterator[bytes]:
        """The plain content of `path` block by block, without holding the whole file in memory."""
        ...

    def plain_copy(self, path: str | Path) -> AbstractContextManager[Path]:
        """A plain copy of the file or directory `path` while the block runs (a private temporary copy
        removed afterwards); `path` itself when nothing under it is sealed."""
        ...

    def seal_tree(self, directory: str | Path) -> int:
        """Seal every regular file under `directory` in place when a master key is set; how many were sealed."""
        ...


def looks_sealed(head: bytes) -> bool:
    """True for a file's first bytes that are afina's magic, or a file cut short inside it."""
    return head == MAGIC or 0 < len(head) < len(MAGIC) and MAGIC.startswith(head)


def is_sealed(path: str | Path) -> bool:
    """True when `path` is a file that starts with afina's magic header."""
    try:
        with open(path, "rb") as handle:
            return looks_sealed(handle.read(len(MAGIC)))
    except (IsADirectoryError, FileNotFoundError):
        return False


def master_key_configured() -> bool:
    """Whether AFINA_MASTER_KEY or AFINA_MASTER_KEY_FILE is set (the key itself is read by `afina.security`)."""
    return bool(os.environ.get(KEY_VARIABLE) or os.environ.get(KEY_FILE_VARIABLE))


def encryption_not_handed_down(path: str | Path, doing: str) -> AfinaError:
    return AfinaError("encryption_not_set_up", f"a master key is set ({KEY_VARIABLE} or {KEY_FILE_VARIABLE}) but "
                      f"this process was not given afina's encryption, so it refuses {doing}", location=str(path),
                      hint="afina's commands, services and pipeline set it up; code that calls afina's modules "
                           "directly calls afina.security.encryption.use_encryption() first")


class PlainFiles:
    """Plain files as they are: the default until the process is handed its encryption. Fail-closed:
    with a master key configured it refuses to seal (it cannot) and to read a sealed file."""

    def read_bytes(self, path: str | Path) -> bytes:
        self._refuse_sealed(path)
        return Path(path).read_bytes()

    def plain_chunks(self, path: str | Path) -> Iterator[bytes]:
        self._refuse_sealed(path)
        with open(path, "rb") as handle:
            yield from iter(lambda: handle.read(BLOCK_SIZE), b"")

    @contextlib.contextmanager
    def plain_copy(self, path: str | Path) -> Iterator[Path]:
        path = Path(path)
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            self._refuse_sealed(file)
        yield path

    def seal_tree(self, directory: str | Path) -> int:
        if master_key_configured():
            raise encryption_not_handed_down(directory, "to leave these files unencrypted")
        return 0

    @staticmethod
    def _refuse_sealed(path: str | Path) -> None:
        if not is_sealed(path):
            return
        if master_key_configured():
            raise encryption_not_handed_down(path, "to read this encrypted file")
        raise AfinaError("master_key_missing", "the file is encrypted and no master key is set", location=str(path),
                         hint=f"set {KEY_VARIABLE} or {KEY_FILE_VARIABLE} to the key it was written with")


_handed_down: SealedFiles = PlainFiles()


def sealed_files() -> SealedFiles:
    """The sealed files the process was handed (`use_sealed_files`); `PlainFiles` until then."""
    return _handed_down


def use_sealed_files(files: SealedFiles) -> SealedFiles:
    """Make `files` the process's way to read and write files at rest; returns the one it replaces."""
    global _handed_down
    previous, _handed_down = _handed_down, files
    return previous


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """A safetensors file's tensors: memory-mapped when plain, decrypted in memory when sealed."""
    from safetensors.torch import load, load_file

    if not is_sealed(path):
        return load_file(path, device=device)
    return {name: tensor.to(device) for name, tensor in load(sealed_files().read_bytes(path)).items()}
