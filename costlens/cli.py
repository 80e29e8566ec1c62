"""The `costlens` command: parse -> one library call -> render.

Every CostlensError becomes one line on stderr and exit code 2; a budget or tolerance
exceeded is exit code 1. No traceback reaches the user unless --debug asks for it.
"""
from __future__ import annotations

import json
import sys
from functools import wraps

import click

from costlens.errors import CostlensError

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    click.echo(f"costlens: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def friendly_errors(command):
    """Turn library errors (and any crash on a hostile file) into one line and exit 2."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except CostlensError as e:
            if debug:
                raise
            _fail(str(e))
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - a model file must never produce a traceback
            if debug:
                raise
            _fail(f"could not analyse the model ({type(e).__name__}: {e}); rerun with --debug for details")
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="costlens")
def main(debug: bool) -> None:
    """Price fine-tuning plans of transformer models from their graph, before renting a GPU."""


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the costlens.inspect/1 JSON document.")
@friendly_errors
def inspect(model: str, as_json: bool) -> None:
    """Summarize MODEL: architecture, parameters by role and per layer."""
    from costlens.api import load
    from costlens.render.inspect import inspect_document, inspect_text

    document = inspect_document(load(model))
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(inspect_text(document))


if __name__ == "__main__":
    main()
