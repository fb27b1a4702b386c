"""Where afina keeps what it writes: the afina home (`AFINA_HOME`, default `~/.afina`)."""

from __future__ import annotations

import os
from pathlib import Path


def afina_home() -> Path:
    """The afina home directory. Not created here: only commands that write create it."""
    return Path(os.environ.get("AFINA_HOME", "~/.afina")).expanduser()


def models_cache_dir() -> Path:
    return afina_home() / "models"


def runs_dir() -> Path:
    return afina_home() / "runs"
