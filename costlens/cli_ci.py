"""`costlens report` and `costlens check`: HTML reports and budget checks for CI.

The commands are standalone click commands; costlens.cli adds them to its group with
``register(main)`` (defining them on ``main`` here would import cli.py, which imports this).
``write_html`` is what ``costlens compare --html`` calls.

Exit codes: 0 ok; 1 a budget limit is exceeded; 2 bad input (one line on stderr).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from costlens.cli_errors import friendly_errors
from costlens.errors import CostlensError

EXIT_OVER_BUDGET = 1


def write_html(document: dict, path: str | Path, verdicts=(), gpu: str | None = None) -> None:
    """Render a costlens.plan/1 document (with budget verdicts, if any) to one HTML file."""
    from costlens.render.html import render_html

    write_atomic(path, render_html(document, tuple(verdicts), gpu))


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and
    ``os.replace``: a failing or interrupted run never leaves a half-written file, and an
    older file at ``path`` stays whole until the new one is complete."""
    path = Path(path)
    data = text.encode("utf-8")           # before any file exists: an encoding error leaves nothing
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CostlensError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())     # mkstemp's 0600 is for secrets
            handle.write(data)
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise CostlensError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_plan_document(path: str) -> dict:
    """A saved `costlens compare --json` output ('-': standard input)."""
    from costlens.render.plan import PLAN_SCHEMA

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        document = json.loads(text)
    except FileNotFoundError:
        raise CostlensError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CostlensError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise CostlensError(f"{path}:{e.lineno}: not JSON ({e.msg}); give the output of `costlens compare --json`") from None
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema != PLAN_SCHEMA or not isinstance(document.get("plans"), list) or not document["plans"]:
        raise CostlensError(f"{path}: not a {PLAN_SCHEMA} document with plans (schema: {schema!r}); "
                            "give the output of `costlens compare --json`")
    return document


@click.command()
@click.argument("result")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--gpu", help="Draw this accelerator's memory line (e.g. h100-80gb) [default: the document's].")
@click.option("--budget", type=click.Path(dir_okay=False), help="Also show verdicts of this budget file.")
@friendly_errors
def report(result: str, output: str, gpu: str | None, budget: str | None) -> None:
    """Render RESULT.json (saved `costlens compare --json` output; '-' reads stdin) as one HTML page."""
    from costlens.budgets import judge, load_budget

    from costlens.render.html import render_html
    from costlens.render.plan import PLAN_SCHEMA

    document = read_plan_document(result)
    verdicts = ()
    parsed = load_budget(budget) if budget else None
    try:
        if parsed:
            _same_setup(parsed, document, result)
            verdicts = judge(parsed, document)
            gpu = gpu or parsed.gpu
        page = render_html(document, tuple(verdicts), gpu)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        # a saved document someone edited (or another program wrote): name the broken field
        what = f"field {e.args[0]!r} is missing" if isinstance(e, KeyError) and e.args else f"a field has the wrong type ({e})"
        raise CostlensError(f"{result}: not a well-formed {PLAN_SCHEMA} document: {what}; "
                            "give the output of `costlens compare --json`") from None
    write_atomic(output, page)
    click.echo(f"wrote {output}")


def _same_setup(budget, document: dict, source: str) -> None:
    """A budget judged against a saved document must describe the step that document priced."""
    setup = document.get("setup") or {}
    for key, value in budget.setup.items():
        if key in setup and setup[key] != value:
            raise CostlensError(f"{budget.source}: [setup] {key} = {value!r}, but {source} was estimated "
                                f"with {key} = {setup[key]!r}")


@click.command()
@click.argument("model")
@click.option("--budget", required=True, type=click.Path(dir_okay=False), help="The budget file (costlens.toml).")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "junit", "markdown"]),
              default="text", show_default=True, help="How to write the verdicts.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the verdicts to this file (the text summary still goes to stdout).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write the HTML report with verdicts.")
@friendly_errors
def check(model: str, budget: str, output_format: str, output: str | None, html_path: str | None) -> None:
    """Price the budget file's plans for MODEL; exit 1 when a limit is exceeded."""
    import costlens
    from costlens.budgets import job_of, judge, load_budget, resolved_setup
    from costlens.defaults import seq_beyond_positions
    from costlens.estimate import estimate
    from costlens.plans import parse_plan_spec, running_dtype, with_name
    from costlens.render import check as render
    from costlens.render.plan import plan_document

    parsed = load_budget(budget)
    resolved = resolved_setup(parsed, model)       # the defaults `costlens plan MODEL` derives, before tracing
    setup = resolved.setup()
    loaded = costlens.load(model, dtype=running_dtype(setup.precision))   # a config traced as it runs
    warning = seq_beyond_positions(loaded, setup.seq, model)
    if warning:
        click.echo(f"costlens: warning: {warning}", err=True)
    results = []
    for plan_budget in parsed.plans:
        plan = with_name(parse_plan_spec(plan_budget.spec), plan_budget.name)
        try:
            results.append((plan_budget.spec, estimate(loaded, plan, setup)))
        except CostlensError as e:
            raise CostlensError(f"{budget}: plan {plan_budget.name!r}: {e}") from None
    document = plan_document(loaded, results, derived=dict(resolved.derived), job=job_of(parsed))
    verdicts = judge(parsed, document)
    writers = {"text": lambda: render.check_text(verdicts, model, budget),
               "json": lambda: render.check_json(verdicts, model, budget, document.get("setup") or {}),
               "junit": lambda: render.check_junit(verdicts, model, budget),
               "markdown": lambda: render.check_markdown(verdicts, model, budget)}
    text = writers[output_format]()
    page = None
    if html_path:        # rendered before anything is written: a failure leaves no file
        from costlens.render.html import render_html
        page = render_html(document, tuple(verdicts), parsed.gpu)
    if output:
        write_atomic(output, text + "\n")
        text = writers["text"]()
    if page is not None:
        write_atomic(html_path, page)
    click.echo(text)
    if not all(v.passed for v in verdicts):
        sys.exit(EXIT_OVER_BUDGET)


def register(group: click.Group) -> None:
    """Add `report` and `check` to the costlens command group."""
    group.add_command(report)
    group.add_command(check)
