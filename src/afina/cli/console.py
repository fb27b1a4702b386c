"""What every `afina` subcommand shares: the console it prints to, and how a user error is shown."""

from __future__ import annotations

import functools
import sys

from rich.console import Console

from afina.errors import AfinaError

console = Console()


def user_errors(command):
    """Print an AfinaError as one line and exit with status 2; never a traceback for bad input."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AfinaError as error:
            Console(stderr=True).print(error.render(), markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            Console(stderr=True).print("interrupted")
            sys.exit(130)

    return wrapper
