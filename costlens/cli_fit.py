"""`costlens fit`: the largest batch, the longest seq, or the cheapest plan that fits a memory limit.

Registered on the `costlens` group by ``register(main)`` (called at the end of cli.py, which
this module imports only inside ``register``, so neither import cycle nor half-built module);
the examples of every command's --help are added there too (cli_help.py).
"""
from __future__ import annotations

import json
import re
import sys

import click

from costlens.cli_errors import friendly_errors
from costlens.errors import CostlensError

SEARCH_AXES = ("precision", "optimizer", "checkpointing")
EXIT_NOTHING_FITS = 1          # as a budget exceeded: the limit is exceeded by every step priced


def parse_memory(text: str) -> int:
    """``24GiB``, ``80GB``, ``512MiB`` or a number of bytes -> bytes (GiB = 2^30, GB = 10^9)."""
    from costlens.budgets import Limit, parse_quantity
    try:
        return int(parse_quantity(text, Limit.PEAK_MEMORY))
    except ValueError:
        raise CostlensError(f"--memory {text!r}: expected a size such as 24GiB, 80GB, 512MiB or bytes") from None


def parse_headroom(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", text or "")
    if not match:
        raise CostlensError(f"--headroom {text!r}: expected a share such as 10% or 0.1")
    value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if not 0.0 <= value < 1.0:
        raise CostlensError(f"--headroom {text!r}: must be at least 0% and below 100%")
    return value


class Ticker:
    """A one-line progress indicator on stderr, redrawn in place (a terminal only)."""

    def __init__(self, what: str):
        self.what, self.count, self.shown = what, 0, sys.stderr.isatty()

    def __call__(self, message: str) -> None:
        self.count += 1
        if self.shown:
            sys.stderr.write(f"\r\033[Kcostlens: {self.what} [{self.count}] {message}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown and self.count:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def register(main: click.Group, cli) -> None:
    """Add ``fit`` to ``main``; ``cli`` is the costlens.cli module, passed in (not imported,
    so that the two modules form no import cycle): fit shares its plan and setup options."""
    from costlens.cli_help import add_examples

    @main.command()
    @click.argument("model")
    @click.option("--memory", help="The memory limit: 24GiB, 80GB, 512MiB or bytes [default: the --gpu's memory].")
    @click.option("--headroom", default="0%", show_default=True,
                  help="Share of the limit kept free (allocator fragmentation, CUDA context): 10% or 0.1.")
    @click.option("--search", type=click.Choice(["batch", "seq", "plan"]), default="batch", show_default=True,
                  help="batch: the largest batch; seq: the longest sequence; plan: the cheapest plan among "
                       "full, freeze-attn, ffn-only, LoRA r=8/16/64 on attention (+FFN), with and without "
                       "checkpointing, AdamW or 8-bit AdamW, bf16-mixed or bf16.")
    @click.option("--html", "html_path", type=click.Path(dir_okay=False),
                  help="Also write the frontier as a self-contained HTML page with a chart.")
    @cli.plan_options
    @cli.setup_options
    @cli.QUANT
    @cli.job_options
    @cli.TRACER
    @cli.REVISION
    @friendly_errors
    def fit(model, memory, headroom, search, html_path, as_json, tracer, revision, **options) -> None:
        """Find what fits in a GPU's memory (--gpu l4) or a limit (--memory 24GiB): the largest
        batch, the longest seq, or the cheapest plan. The plan options (--lora, --rank, --train,
        --peft, ...) give the plan a batch or seq search prices; in a plan search they add one
        candidate. --quant stores the frozen base quantized (a plan search then tries the LoRA
        candidates only); --tokens (or --dataset-tokens) prices each row's whole job. One traced
        model serves every estimate. Exit 1 when nothing fits."""
        from costlens.fit import fit as search_fit
        from costlens.gpus import gpu as find_gpu
        from costlens.render.fit import fit_document, fit_text, render_fit_html

        if not memory and not options.get("gpu"):
            raise CostlensError("give the limit: --gpu NAME (its memory) or --memory SIZE (e.g. 24GiB)")
        limit = parse_memory(memory) if memory else find_gpu(options["gpu"]).memory_bytes
        fraction = parse_headroom(headroom)
        recipe = cli._recipe(options)
        job = cli._job(options, recipe)          # the job options price each probe's whole job
        options["optimizer_impl"] = options["optimizer_impl"] or "foreach"     # a GPU step: torch's CUDA default
        setup = cli._setup(options, recipe)
        if job is not None and setup.gpu:
            from costlens.jobcost import with_price_table
            job = with_price_table(job, setup.gpu, "costlens.toml")
        given = {key for key in SEARCH_AXES if key in cli._given_on_command_line(SEARCH_AXES)
                 or (recipe is not None and key in recipe.from_file)}
        user_plan = any(options.get(key) for key in (*cli.PLAN_OPTION_KEYS, "peft"))
        peft = options.get("peft")
        if not peft:
            chosen = cli._plan(options)
        # a config is traced as the fixed precision runs it; when the precision is searched, in
        # bf16: fp32-weight candidates price a half trace exactly as an fp32 one (its casts are views)
        loaded = cli._load(model, tracer, revision, setup.precision if "precision" in given else "bf16")
        if peft:
            chosen = cli._plan(options, loaded, model)
        ticker = Ticker(f"fit ({search})")
        try:
            result = search_fit(loaded, limit, search=search, plan=chosen[1], setup=setup, headroom=fraction,
                                gpu=find_gpu(options["gpu"]).name if options.get("gpu") else None,
                                extra_plans=(chosen,) if search == "plan" and user_plan else (),
                                fixed=frozenset(given), progress=ticker)
        finally:
            ticker.close()
        cli._warn_positions(loaded, setup)
        document = fit_document(loaded, result, recipe, job=job)
        if html_path:
            from pathlib import Path
            try:
                Path(html_path).write_text(render_fit_html(document), encoding="utf-8")
            except OSError as e:
                raise CostlensError(f"cannot write {html_path}: {e.strerror or e}") from None
        click.echo(json.dumps(document, indent=2) if as_json else fit_text(document))
        if result.best is None:
            sys.exit(EXIT_NOTHING_FITS)

    add_examples(main)
