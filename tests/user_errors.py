"""What every bad-input test asserts: exit status 2, one `error[code] at location` line, no traceback,
and nothing new in the afina home."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from afina.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def home_files(home: Path) -> set[str]:
    """Every path under the afina home (hidden staging directories included)."""
    return {str(p.relative_to(home)) for p in home.rglob("*")} if home.is_dir() else set()


def assert_user_error(result, code: str, location, home: Path, before: set[str] = frozenset()) -> str:
    """The error line; `before` is what the afina home held before the command."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error[")]
    assert len(errors) == 1 and errors[0].startswith(f"error[{code}] at {location}"), result.output
    assert "Traceback" not in result.output
    assert home_files(home) == set(before), sorted(home_files(home) - set(before))
    return errors[0]
