"""The `afina` command.

    afina demo                          # the whole path on the bundled model and data
    afina data inspect data.jsonl       # check a data file before spending compute
    afina train config.yaml key=value   # fine-tune
    afina eval RUN                      # tuned vs base on the run's test split
    afina estimate config.yaml          # tokens, steps, peak memory, time and cost before launch
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from afina.errors import AfinaError

console = Console()
app = typer.Typer(help="Fine-tune open language models on your own data and prove they got better.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


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


from afina.cli import data as _data  # noqa: E402
from afina.cli import estimate as _estimate  # noqa: E402
from afina.cli import train as _train  # noqa: E402

app.add_typer(_data.app, name="data")
app.command("train")(user_errors(_train.train_command))
app.command("eval")(user_errors(_train.eval_command))
app.command("demo")(user_errors(_train.demo_command))
app.command("merge")(user_errors(_train.merge_command))
app.command("estimate")(user_errors(_estimate.estimate_command))
