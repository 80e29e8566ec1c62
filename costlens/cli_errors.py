"""One-line errors for every command: library errors (and any crash on a hostile file)
become ``costlens: error: ...`` on stderr and exit code 2; ``--debug`` shows the traceback."""
from __future__ import annotations

import re
import sys
from functools import wraps

import click

from costlens.errors import CostlensError

EXIT_BAD_INPUT = 2


MAX_MESSAGE_CHARS = 600
# C0/C1 controls (newlines, ANSI escapes), DEL and the bidi overrides that reorder a terminal line
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message safe to print as one terminal line: control characters shown as escapes
    (a model's names may hold newlines or ANSI sequences), the middle of a long one elided."""
    message = _UNPRINTABLE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(message))
    if len(message) > limit:
        message = f"{message[:limit // 2]} [... {len(message) - limit:,} characters ...] {message[-limit // 3:]}"
    return message


def fail(message: str) -> None:
    """Print ``message`` as one ``costlens: error:`` line on stderr and exit with EXIT_BAD_INPUT (2)."""
    click.echo(f"costlens: error: {one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def friendly_errors(command):
    """Decorate a click command so that any error it raises ends as one line and exit code 2, not a
    traceback (``--debug`` on the root command re-raises it instead)."""
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


class Tolerance(click.ParamType):
    """A relative tolerance: ``5%`` or ``0.05`` (both 5%). A bare number above 1 is refused rather than
    read as a multiple (``5`` would mean 500%); negatives are refused."""

    name = "FRACTION"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        percent = text.endswith("%")
        try:
            number = float(text[:-1] if percent else text)
        except ValueError:
            self.fail(f"{value!r} is not a tolerance: write 5% or 0.05", param, ctx)
        if not number == number or number in (float("inf"), float("-inf")):      # NaN, inf
            self.fail(f"{value!r} is not a finite tolerance", param, ctx)
        if number < 0:
            self.fail(f"{value!r}: a tolerance cannot be negative", param, ctx)
        if percent:
            return number / 100.0
        if number > 1:
            self.fail(f"{value!r} would mean {number:.0%}: write {number:g}% for {number:g} percent, "
                      f"or a fraction such as 0.05", param, ctx)
        return number


TOLERANCE = Tolerance()
