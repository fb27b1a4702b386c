"""Master-key rotation: every sealed file's data key re-wrapped under a new master key, data untouched.

    afina keys rotate --new-key-file new.key        # AFINA_MASTER_KEY (or _FILE) holds the current key

    report = rotate_master_key(key_roots(), old=master_key(), new=new_master_key(path))

Only each file's fixed-size header changes (`afina.security.encryption`): the ciphertext after it is
never rewritten, so a rotation over hundreds of gigabytes of checkpoints takes seconds. A header is
replaced through a journal: the new header is first written and synced beside the file
(`.NAME.afina-rewrap`), then written over the old one in place, then the journal is removed. A
rotation cut short (a crash, a full disk) is finished by running it again with the same two keys:
journals left behind are applied first, files already under the new key are counted and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from afina.errors import AfinaError
from afina.security.encryption import (
    HEADER,
    Header,
    is_encrypted,
    open_data_key,
    parse_header,
    read_header,
    seal_data_key,
)
from afina.security.master_key import MasterKey

JOURNAL_SUFFIX = ".afina-rewrap"


@dataclass
class RotationReport:
    """What a rotation did, file by file counted."""

    rewrapped: int = 0
    already_new: int = 0  # sealed under the new key before this rotation (an earlier, interrupted one)
    plain: int = 0  # files that are not sealed (reports, configs, the store's database): left as they are
    failed: list[tuple[Path, str]] = field(default_factory=list)  # sealed under neither key, or damaged


def journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{JOURNAL_SUFFIX}")


def rewrap_file(path: Path, old: MasterKey, new: MasterKey) -> str:
    """Re-wrap the data key of the sealed file `path` from `old` to `new`, in place; returns
    `rewrapped` or `already_new`. AfinaError `decryption_failed` when `old` does not open it."""
    header = read_header(path)
    if header.key_id == new.key_id:
        open_data_key(header, new, path)  # authenticated, not only labelled, as the new key's
        return "already_new"
    replacement = seal_data_key(open_data_key(header, old, path), new, header.chunk_size)
    write_header(path, replacement)
    return "rewrapped"


def write_header(path: Path, header: Header) -> None:
    """Replace the header of `path` in place, through the journal (see the module's docstring)."""
    journal = journal_path(path)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, header.pack())
        os.fsync(fd)
    finally:
        os.close(fd)
    apply_journal(path, journal)


def apply_journal(path: Path, journal: Path) -> None:
    raw = journal.read_bytes()
    if len(raw) != HEADER.size:  # cut short before it was synced: the file itself was never touched
        journal.unlink()
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, raw, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    journal.unlink()


def finish_interrupted(path: Path, new: MasterKey) -> None:
    """Apply a journal a crashed rotation left beside `path`, when it holds a header under `new`."""
    journal = journal_path(path)
    if not journal.is_file():
        return
    raw = journal.read_bytes()
    if len(raw) == HEADER.size:
        open_data_key(parse_header(raw, journal), new, journal)  # a journal that is not ours is never applied
    apply_journal(path, journal)


def sealed_candidates(roots: Iterable[Path]) -> Iterable[Path]:
    """Every regular file under `roots` (each file once, links not followed, journals left out)."""
    seen: set[Path] = set()
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in files:
            if path.is_symlink() or not path.is_file() or path.name.endswith(JOURNAL_SUFFIX):
                continue
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield path


def rotate_master_key(roots: Iterable[Path], old: MasterKey, new: MasterKey) -> RotationReport:
    """Re-wrap every sealed file under `roots` from `old` to `new`. A file that fails is reported and
    left as it was; the others are rotated all the same."""
    if old.key_id == new.key_id:
        raise AfinaError("same_master_key", "the new master key is the current one", location="--new-key-file",
                         hint="make a new key with: openssl rand -hex 32")
    report = RotationReport()
    for path in sealed_candidates(roots):
        try:
            finish_interrupted(path, new)
            if not is_encrypted(path):
                report.plain += 1
                continue
            outcome = rewrap_file(path, old, new)
        except (AfinaError, OSError) as error:
            report.failed.append((path, error.message if isinstance(error, AfinaError) else str(error)))
            continue
        if outcome == "rewrapped":
            report.rewrapped += 1
        else:
            report.already_new += 1
    return report


def key_roots() -> list[Path]:
    """Where afina keeps sealed files: the afina home, and the run directories, model artifacts and
    uploaded files the store knows about (wherever they are)."""
    from afina.paths import afina_home

    roots = [afina_home()]
    if not (os.environ.get("AFINA_DATABASE_URL") or (afina_home() / "afina.db").is_file()):
        return roots  # no store yet: do not create one just to look
    from afina.store import open_store

    with open_store() as store:
        roots += [Path(run.run_dir) for run in store.list_runs()]
        for model in store.list_models(include_deleted=True):
            roots += [Path(value) for value in model.artifacts.values() if isinstance(value, str)]
        roots += [Path(stored.path) for stored in store.list_files()]
    home = afina_home().resolve()
    return [roots[0]] + [root for root in dict.fromkeys(roots[1:]) if not root.resolve().is_relative_to(home)]


def rotate_master_key_command(new_key_file: Path | None) -> str:
    """`afina keys rotate`: rotate from the current master key to the new one and say what was done;
    AfinaError `rotation_incomplete` when a file could not be rotated."""
    from afina.security.master_key import master_key, new_master_key

    old = master_key()
    if old is None:
        raise AfinaError("master_key_missing", "no current master key: nothing is encrypted under one",
                         location="AFINA_MASTER_KEY", hint="set AFINA_MASTER_KEY or AFINA_MASTER_KEY_FILE to the key "
                                                           "in use, and give the new key with --new-key-file")
    new = new_master_key(new_key_file)
    roots = key_roots()
    report = rotate_master_key(roots, old, new)
    summary = (f"re-wrapped {report.rewrapped} encrypted files under the new master key (key id {new.key_id.hex()}); "
               f"{report.already_new} were under it already, {report.plain} not encrypted; searched "
               f"{', '.join(map(str, roots))}")
    if report.failed:
        path, reason = report.failed[0]
        raise AfinaError("rotation_incomplete", f"{summary}; {len(report.failed)} files could not be rotated, the "
                         f"first: {reason}", location=str(path),
                         hint="restore them from a backup or rotate them with the key they were written with; "
                              "then run afina keys rotate again")
    return summary + ". From now on set AFINA_MASTER_KEY (or AFINA_MASTER_KEY_FILE) to the new key."
