"""The `costlens` command: parse -> one library call -> render.

Every CostlensError becomes one line on stderr and exit code 2; a budget or tolerance
exceeded is exit code 1. No traceback reaches the user unless --debug asks for it.
"""
from __future__ import annotations

import json
import sys

import click

from costlens.cli_errors import friendly_errors
from costlens.errors import CostlensError

TRACER = click.option(
    "--tracer", type=click.Choice(["export", "fvcore"]), default="export", show_default=True,
    help="How a PyTorch source (import spec, config.json, model folder) is traced: torch.export on the meta "
         "device, or fvcore's TorchScript trace.")

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="costlens")
def main(debug: bool) -> None:
    """Price fine-tuning plans of transformer models from their graph, before renting a GPU."""


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the costlens.inspect/1 JSON document.")
@TRACER
@friendly_errors
def inspect(model: str, as_json: bool, tracer: str) -> None:
    """Summarize MODEL (an .onnx file, a Hugging Face config.json or model folder, or an import
    spec package.module:factory): architecture, parameters by role and per layer."""
    from costlens.api import load
    from costlens.render.inspect import inspect_document, inspect_text

    document = inspect_document(load(model, tracer=tracer))
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(inspect_text(document))


SETUP_KEYS = ("batch", "seq", "optimizer", "optimizer_impl", "precision", "attention", "checkpointing", "gpu", "mfu",
              "moe_dispatch")


def setup_options(command):
    """Options describing how the step runs, shared by plan, compare (and check)."""
    for decorator in reversed([
        click.option("--batch", type=int, default=1, show_default=True, help="Sequences per step."),
        click.option("--seq", type=int, default=None,
                     help="Tokens per sequence [default: 2048, capped by a learned position table]."),
        click.option("--optimizer", default="adamw", show_default=True,
                     type=click.Choice(["adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor"])),
        click.option("--optimizer-impl", type=click.Choice(["for-loop", "foreach"]), default=None,
                     help="How the optimizer steps [default: foreach with --gpu (torch's CUDA default), else for-loop]."),
        click.option("--precision", default="fp32", show_default=True,
                     type=click.Choice(["fp32", "bf16-mixed", "fp16-mixed", "bf16"])),
        click.option("--attention", default="eager", show_default=True, type=click.Choice(["eager", "fused"]),
                     help="eager keeps the batch x heads x seq x seq scores; fused (flash / memory-efficient SDPA) does not."),
        click.option("--checkpointing", is_flag=True, help="Recompute each layer in backward (activation checkpointing)."),
        click.option("--gpu", default=None, help="Accelerator for a time-per-step figure, e.g. h100, a100-40gb, l4."),
        click.option("--mfu", type=float, default=0.4, show_default=True, help="Model FLOPs utilization for --gpu."),
        click.option("--moe-dispatch", type=click.Choice(["routed", "dense"]), default="routed", show_default=True,
                     help="routed: each expert runs on the tokens routed to it (k of E); dense: every token."),
        click.option("--json", "as_json", is_flag=True, help="Print the costlens.plan/1 JSON document."),
    ]):
        command = decorator(command)
    return command


def _setup(options: dict):
    from costlens.plans import Setup
    values = {k: options[k] for k in SETUP_KEYS if k in options}
    values["optimizer_impl"] = values["optimizer_impl"] or ("foreach" if values["gpu"] else "for-loop")
    return Setup(**values)


def _run_plans(model, plans: list, setup, as_json: bool, html_path: str | None = None,
               validate_on: str | None = None) -> None:
    """model: a loaded Model; plans: (spec text, Plan) pairs; validate_on: a device to measure on."""
    from costlens.estimate import estimate
    from costlens.render.plan import plan_document, plan_text

    results = [(spec, estimate(model, plan, setup)) for spec, plan in plans]
    document = plan_document(model, results)
    if validate_on:
        _attach_validation(document, model, plans, setup, validate_on)
    if html_path:
        from costlens.cli_ci import write_html
        write_html(document, html_path)
    click.echo(json.dumps(document, indent=2) if as_json else plan_text(document))


PLAN_OPTION_KEYS = ("train", "freeze", "lora", "rank", "alpha", "lora_dropout", "stop_grad", "dropout", "stack_ffn",
                    "stack_ffn_width")


def plan_options(command):
    """Options describing one plan, shared by plan and validate."""
    for decorator in reversed([
        click.option("--train", help="Roles whose base weights train: attn,q,k,v,o,ffn,up,gate,down,router,experts,"
                                     "shared_experts,embed,norm,head,all,stacked,layers:A-B "
                                     "[default: all, or none with --lora]."),
        click.option("--freeze", help="Roles to freeze (same names as --train)."),
        click.option("--lora", help="LoRA targets, e.g. attn or attn,ffn or attn,router,experts."),
        click.option("--rank", help="LoRA rank: 8, or per target: attn=8,router=4,experts=4."),
        click.option("--alpha", help="LoRA alpha (does not change costs)."),
        click.option("--lora-dropout", help="LoRA dropout probability (keeps a dropped copy of each adapted input)."),
        click.option("--stop-grad", help="Detach outputs: attn (nothing below an attention output gets its gradient)."),
        click.option("--dropout", help="Training-time dropout after embeddings, attention probabilities, attention "
                                       "and FFN outputs (GPT-2/BERT use 0.1); the exported graph no longer shows it."),
        click.option("--stack-ffn", help="N extra FFN sublayers (own norm and residual) after each block's FFN; "
                                         "--train stacked trains only them."),
        click.option("--stack-ffn-width", help="Width of the stacked FFN sublayers [default: the block FFN's]."),
    ]):
        command = decorator(command)
    return command


def _plan(options: dict):
    """(spec text, Plan) from the plan options of a command."""
    from costlens.plans import plan_from_options
    values = {key: options.pop(key) for key in PLAN_OPTION_KEYS}
    spec = ";".join(f"{key.replace('_', '-')}={value}" for key, value in values.items() if value) or "full"
    return spec, plan_from_options(spec, **values)


def _attach_validation(document: dict, model, plans: list, setup, device: str) -> None:
    """plans[].validation = {quantity: {estimated, measured, error}} from a measured step each."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise CostlensError("--validate runs real training steps: it needs the torch extra (pip install 'costlens[torch]')")
    from costlens.measure.validate import validate_onnx
    for entry, (spec, chosen) in zip(document["plans"], plans):
        click.echo(f"costlens: validating plan {entry['name']}...", err=True)
        result = validate_onnx(model.graph.source, chosen, setup, device=device)
        entry["validation"] = {c.quantity: {"estimated": c.estimated, "measured": c.measured, "error": c.error}
                               for c in result.comparisons}


@main.command()
@click.argument("model")
@plan_options
@setup_options
@TRACER
@friendly_errors
def plan(model, as_json, tracer, **options) -> None:
    """Price one fine-tuning plan of MODEL (an .onnx file, a config.json or model folder, or an
    import spec): parameters, memory and FLOPs of a training step."""
    from costlens.api import load

    chosen = _plan(options)
    _run_plans(load(model, tracer=tracer), [chosen], _setup(options), as_json)


@main.command()
@click.argument("model")
@plan_options
@setup_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the measured step runs (cuda: allocator peak; cpu: exact live tensor storage).")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Largest relative error of a memory figure (FLOPs: 1%; trainable parameters: exact).")
@click.option("--inference", is_flag=True,
              help="Also measure onnxruntime's inference memory in a fresh process (shown, not judged).")
@friendly_errors
def validate(model, device, tolerance, inference, as_json, **options) -> None:
    """Measure a real training step of the plan and compare it with the estimate (exit 1 when
    a figure is outside tolerance). MODEL is an .onnx file (its graph runs as a torch module) or
    an import spec package.module:factory (the module itself runs). Needs the torch extra."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise CostlensError("validate runs a real training step: it needs the torch extra (pip install 'costlens[torch]')")
    from costlens.measure.validate import validate_onnx, validate_torch
    from costlens.render.validate import validation_document, validation_text

    spec, chosen = _plan(options)
    if options["optimizer_impl"] is None and device == "cuda":
        options["optimizer_impl"] = "foreach"           # torch's default on CUDA
    setup = _setup(options)
    if device == "cuda" and not _cuda_available():
        raise CostlensError("--device cuda: no CUDA device is available here")
    progress = lambda message: click.echo(f"costlens: {message}...", err=True)  # noqa: E731
    if model.lower().endswith(".onnx"):
        result = validate_onnx(model, chosen, setup, device=device, tolerance=tolerance, inference=inference,
                               progress=progress)
    else:
        result = validate_torch(model, chosen, setup, device=device, tolerance=tolerance, progress=progress)
    document = validation_document(result, model, spec)
    click.echo(json.dumps(document, indent=2) if as_json else validation_text(document))
    if not result.ok:
        sys.exit(1)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@main.command()
@click.argument("model")
@click.option("--plans", "plans_file", type=click.Path(dir_okay=False),
              help="A TOML file of [[plan]] tables (name plus spec, or name plus train/freeze/lora/rank/... keys).")
@click.option("--plan", "plans", multiple=True,
              help="A plan spec, repeatable: 'NAME:key=value;key=value' with keys train, freeze, lora, rank, "
                   "alpha, stop-grad; e.g. 'moe-lora:lora=attn,router,experts;rank=attn=8,router=4,experts=4'.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML report to this file.")
@click.option("--validate", "validate_on", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Also measure each plan on this device and attach the errors (torch extra; minutes on big models).")
@setup_options
@TRACER
@friendly_errors
def compare(model, plans_file, plans, html_path, validate_on, as_json, tracer, **setup) -> None:
    """Price several plans of MODEL side by side (default: a set that fits the model)."""
    from costlens.api import load
    from costlens.estimate import default_plans
    from costlens.plans import load_plans_file, parse_plan_spec

    loaded = load(model, tracer=tracer)
    chosen = load_plans_file(plans_file) if plans_file else []
    chosen += [(spec, parse_plan_spec(spec)) for spec in plans]
    if not chosen:
        chosen = [(spec, parse_plan_spec(spec)) for spec in default_plans(loaded)]
    _run_plans(loaded, chosen, _setup(setup), as_json, html_path, validate_on)


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@friendly_errors
def export(source: str, output: str) -> None:
    """Write SOURCE (import spec, config.json or model folder) as an ONNX graph with dynamic batch
    and seq; weights are external-data references, never written."""
    from costlens.frontends.onnx_export import export_onnx

    path = export_onnx(source, output)
    click.echo(f"{path}: ONNX graph written (weights referenced in {path.name}.data, which is not written)")


from costlens.cli_ci import register  # noqa: E402  (cli_ci never imports cli)

register(main)

if __name__ == "__main__":
    main()
