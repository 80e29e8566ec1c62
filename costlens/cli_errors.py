"""One-line errors for every command: library errors (and any crash on a hostile file)
become ``costlens: error: ...`` on stderr and exit code 2; ``--debug`` shows the traceback."""
from __future__ import annotations

import sys
from functools import wraps

import click

from costlens.errors import CostlensError

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    click.echo(f"costlens: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def friendly_errors(command):
    @wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except CostlensError as e:
            if debug:
                raise
            fail(str(e))
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - a model file must never produce a traceback
            if debug:
                raise
            fail(f"could not analyse the model ({type(e).__name__}: {e}); rerun with --debug for details")
    return wrapper
