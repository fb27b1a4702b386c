"""Uploaded data files: checked with afina's validation as they arrive, then kept content-addressed.

    stored = save_upload(store, chunks, filename="tickets.jsonl", purpose="fine-tune", max_bytes=512 * 2**20)

The bytes go to a temporary file beside their final place, hashed and size-checked as they stream
in; a file that is too large or invalid is deleted before anything is recorded, and the store's
row is written only once the bytes are in place. The same content uploaded twice is kept once
(`AFINA_HOME/files/SHA256.EXT`). With a master key only an encrypted copy is kept
(`afina.security.encryption`): the plain bytes are checked in a temporary file outside the afina home,
removed at once; readers decrypt the kept file (`read_bytes`, `decrypted_copy`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from afina.data.validate import check_file
from afina.errors import AfinaError
from afina.paths import afina_home
from afina.security.encryption import encrypt_copy, read_bytes
from afina.security.master_key import master_key
from afina.store import Store, StoredFile
from afina.store.principals import Principal

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def files_dir() -> Path:
    """Where uploaded files' bytes live: shared by the server and every worker."""
    return afina_home() / "files"


def data_suffix(filename: str) -> str:
    """The file's format, from its name; AfinaError `unsupported_format` for any other."""
    suffix = Path(filename).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise AfinaError("unsupported_format", f"{filename!r} is not a data file afina reads",
                         location="file", hint=f"upload {', '.join(DATA_SUFFIXES)}")
    return suffix


async def save_upload(store: Store, chunks: AsyncIterator[bytes], *, filename: str, purpose: str,
                      max_bytes: int, project: str = "default", by: Principal | None = None) -> StoredFile:
    """Stream, check and keep an upload. AfinaError `file_too_large` past `max_bytes`; the first
    validation problem's code for an invalid file; nothing is left behind by either."""
    suffix = data_suffix(filename)
    directory = files_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = master_key()
    # with a master key the plain bytes are checked outside the afina home (a file only its owner
    # reads, under TMPDIR), and only their encrypted copy is written beside the kept files
    handle, temporary = tempfile.mkstemp(prefix=".upload-", suffix=suffix, dir=directory if key is None else None)
    temporary = Path(temporary)
    final: Path | None = None
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(handle, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise AfinaError("file_too_large", f"the file is larger than {max_bytes} bytes", location="file",
                                     hint="split it, or raise the server's --max-upload-mb")
                digest.update(chunk)
                out.write(chunk)
        report = validation_report(temporary, filename)
        final = directory / f"{digest.hexdigest()}{suffix}"
        existed = final.exists()
        if key is None:
            os.replace(temporary, final)  # the same content is the same bytes: replacing is harmless
        else:
            encrypt_copy(temporary, final, key)  # atomically, like the rename
        try:
            return store.create_file(purpose=purpose, filename=filename, bytes=size, sha256=digest.hexdigest(),
                                     path=str(final), report=report, project=project, by=by)
        except BaseException:
            if not existed:
                final.unlink(missing_ok=True)
            raise
    finally:
        temporary.unlink(missing_ok=True)


def validation_report(path: Path, filename: str) -> dict:
    """afina's check of a data file as a JSON report; AfinaError with the first invalid row's code,
    located in `filename` (the name the client knows)."""
    report = check_file(path)
    report.path = filename
    if report.errors:
        raise report.first_error(hint="fix the rows and upload the file again")
    return {"rows": report.rows_read, "formats": dict(report.formats), "duplicates": report.duplicates,
            "warnings": len(report.problems)}


def delete_stored_bytes(path: str) -> None:
    """Remove a deleted file's bytes (when nothing else needs them)."""
    Path(path).unlink(missing_ok=True)


def read_stored_bytes(path: str) -> bytes:
    """A kept file's content as it was uploaded (decrypted in memory when it is kept encrypted)."""
    return read_bytes(path)
