"""The `afina` command line: one module per noun."""


def main() -> None:
    """The `afina` command: the process sets OpenMP's wait policy and starts again under the installed
    allocator (see `afina.training.allocator`) before the command's modules, torch among them, are
    imported."""
    from afina.training.allocator import run_under_allocator

    run_under_allocator()
    from afina.cli.main import app

    app()
