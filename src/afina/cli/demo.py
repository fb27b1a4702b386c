"""`afina demo`: the whole path on the bundled model and data."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from afina.cli.console import console


def demo_command() -> None:
    """The whole path on the bundled model and data: validate, split, fine-tune, compare, save."""
    from afina.config.loading import load_config
    from afina.pipeline.demo import run_demo

    started = time.perf_counter()
    config = load_config(Path(str(resources.files("afina.data.example") / "demo.yaml")))
    run_demo(config, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")
