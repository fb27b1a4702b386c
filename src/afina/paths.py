"""Where afina keeps what it writes: the afina home (`AFINA_HOME`, default `~/.afina`)."""

from __future__ import annotations

import os
from pathlib import Path

from afina.errors import AfinaError


def afina_home() -> Path:
    """The afina home directory. Not created here: only commands that write create it."""
    return Path(os.environ.get("AFINA_HOME", "~/.afina")).expanduser()


def models_cache_dir() -> Path:
    return afina_home() / "models"


def runs_dir() -> Path:
    return afina_home() / "runs"


def check_afina_home() -> Path:
    """The afina home, refused before any work when a run could not be written there: a file where a
    folder belongs, or a folder (or the nearest existing parent of one yet to be made) afina cannot
    write to. Creates nothing."""
    existing = runs_dir()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise AfinaError("afina_home_unusable", "a file stands where the afina home needs a folder",
                         location=str(existing), hint="point AFINA_HOME at a folder, or move the file away")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AfinaError("afina_home_unusable", "afina cannot write to the afina home", location=str(existing),
                         hint="make it writable, or point AFINA_HOME at a folder you can write to")
    return afina_home()
