"""Atomic checkpoints.

A checkpoint is written into a hidden staging directory, every file is fsynced and hashed into
`manifest.json`, and only then is the directory renamed to `step-NNNNNNN`. A crash mid-write leaves
a staging directory that is never read; a checkpoint whose files no longer match its manifest is
skipped in favour of the previous one. With a master key every file but the manifest is encrypted
before the rename, and decrypted in memory when restored, through the sealed files the process was
handed (`afina.sealing`): a process given none refuses to write a checkpoint in plain text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from afina.sealing import load_tensors, sealed_files

CHECKPOINT = re.compile(r"^step-(\d{7})$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # loop state: epoch, batch index, tokens seen, ...


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(directory: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep: int, keep_also: Path | None = None) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` (and `keep_also`,
    the best one)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:07d}"
    staging = directory / f".staging-step-{step:07d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_files(staging, step, trainable, optimizer, scheduler, state)
    except BaseException:  # a full disk, an I/O error, files that could not be sealed: leave nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        if old != keep_also:
            shutil.rmtree(old)
    return final


def _write_files(staging: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                 state: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, staging / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({**state, "step": step}))
    sealed_files().seal_tree(staging)  # with a master key; the manifest then hashes the files as they are on disk
    files = sorted(p for p in staging.iterdir())
    for path in files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    manifest = {"step": step, "files": {p.name: sha256(p) for p in files}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_dir(staging)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and CHECKPOINT.match(p.name))


def is_intact(path: Path) -> bool:
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        return all((path / name).is_file() and sha256(path / name) == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint whose files match its manifest."""
    for path in reversed(list_checkpoints(directory)):
        if is_intact(path):
            state = json.loads(sealed_files().read_bytes(path / "state.json"))
            return Checkpoint(path, state["step"], state)
    return None


def restore_weights(path: Path | None, trainable: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trained weights into the model (nothing to do without a checkpoint)."""
    if path is None:
        return
    weights = load_tensors(path / "trainable.safetensors")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])


def restore_checkpoint(checkpoint: Checkpoint, trainable: dict[str, torch.Tensor], optimizer, scheduler) -> None:
    restore_weights(checkpoint.path, trainable)
    saved = torch.load(io.BytesIO(sealed_files().read_bytes(checkpoint.path / "optimizer.pt")), weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
