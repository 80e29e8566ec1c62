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

REVISION = click.option("--revision", default=None,
                        help="Branch, tag or commit of a Hugging Face Hub id MODEL (org/name) [default: main].")


def _load(model: str, tracer: str = "export", revision: str | None = None):
    """costlens.load, with a note on stderr while it traces (a terminal only)."""
    from costlens.api import load
    from costlens.cli_help import status
    status(f"loading {model}")
    return load(model, tracer=tracer, revision=revision)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="costlens")
def main(debug: bool) -> None:
    """Price fine-tuning plans of transformer models from their graph, before renting a GPU."""


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the costlens.inspect/1 JSON document.")
@TRACER
@REVISION
@friendly_errors
def inspect(model: str, as_json: bool, tracer: str, revision: str | None) -> None:
    """Summarize MODEL (an .onnx file, a Hugging Face config.json or model folder, or an import
    spec package.module:factory): architecture, parameters by role and per layer."""
    from costlens.render.inspect import inspect_document, inspect_text

    document = inspect_document(_load(model, tracer, revision))
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(inspect_text(document))


SETUP_KEYS = ("batch", "seq", "optimizer", "optimizer_impl", "precision", "attention", "checkpointing", "gpu", "mfu",
              "moe_dispatch")


PARALLEL_OPTIONS = [
    click.option("--gpus", type=int, default=None,
                 help="Ranks the step runs on (per-rank figures; --batch is per data-parallel rank) [default: tp x ep]."),
    click.option("--shard", type=click.Choice(["none", "ddp", "zero1", "zero2", "zero3"]), default=None,
                 help="How data-parallel ranks hold the model: ddp (replicas), zero1 (optimizer state sharded), "
                      "zero2 (FSDP2 reshard_after_forward=False), zero3 (FSDP2 fully_shard) [default: ddp with --gpus]."),
    click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel ranks (heads and FFN width split)."),
    click.option("--ep", type=int, default=1, show_default=True, help="Expert-parallel ranks (experts split)."),
    click.option("--offload", type=click.Choice(["optimizer", "params"]), default=None,
                 help="Keep optimizer state (and with params, the parameter shards) in host memory."),
    click.option("--bandwidth", type=float, default=100.0, show_default=True,
                 help="GB/s per rank for the communication time estimate."),
]


def _parallel_values(options: dict) -> dict:
    """Setup fields of the parallel layout from the options (docs/distributed.md)."""
    if "tp" not in options:
        return {}
    tp, ep = options["tp"], options["ep"]
    gpus = options["gpus"] or tp * ep
    shard = options["shard"] or ("ddp" if gpus // (tp * ep) > 1 else "none")
    return {"gpus": gpus, "shard": shard, "tp": tp, "ep": ep, "offload": options["offload"],
            "bandwidth": options["bandwidth"]}


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
        *PARALLEL_OPTIONS,
        click.option("--json", "as_json", is_flag=True, help="Print the costlens.plan/1 JSON document."),
        click.option("--recipe", type=click.Path(dir_okay=False),
                     help="A YAML or JSON file of Hugging Face TrainingArguments (batch, max_length, bf16/fp16, "
                          "gradient_checkpointing, optim, ...); options given here win over it."),
    ]):
        command = decorator(command)
    return command


def _setup(options: dict, recipe=None):
    from costlens.plans import Setup
    from costlens.recipe import merge_setup
    values = {k: options[k] for k in SETUP_KEYS if k in options}
    values = merge_setup(values, recipe, _given_on_command_line(SETUP_KEYS))
    values["optimizer_impl"] = values["optimizer_impl"] or ("foreach" if values["gpu"] else "for-loop")
    values.update(_parallel_values(options))
    return Setup(**values)


def _given_on_command_line(keys) -> set[str]:
    from click.core import ParameterSource
    context = click.get_current_context()
    return {key for key in keys if context.get_parameter_source(key) is ParameterSource.COMMANDLINE}


def _recipe(options: dict):
    """The --recipe file, read (None without one)."""
    from costlens.recipe import load_recipe
    return load_recipe(options["recipe"]) if options.get("recipe") else None


def _run_plans(model, plans: list, setup, as_json: bool, html_path: str | None = None,
               validate_on: str | None = None, recipe=None) -> None:
    """model: a loaded Model; plans: (spec text, Plan) pairs; validate_on: a device to measure on;
    recipe: the --recipe file read (recorded in the document and under the table)."""
    from costlens.estimate import estimate
    from costlens.render.plan import plan_document, plan_text

    results = [(spec, estimate(model, plan, setup)) for spec, plan in plans]
    document = plan_document(model, results)
    if validate_on:
        _attach_validation(document, model, plans, setup, validate_on)
    if recipe is not None:
        document["recipe"] = recipe.document()
    if html_path:
        from costlens.cli_ci import write_html
        write_html(document, html_path)
    text = "\n".join([plan_text(document), *(recipe.lines() if recipe is not None else [])])
    click.echo(json.dumps(document, indent=2) if as_json else text)


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
        click.option("--peft", type=click.Path(),
                     help="A PEFT adapter_config.json (or its folder): its LoRA targets, ranks, dropout and "
                          "modules_to_save as the plan (instead of --lora/--rank/--alpha/--lora-dropout)."),
    ]):
        command = decorator(command)
    return command


def _plan(options: dict, model=None, source: str | None = None):
    """(spec text, Plan) from the plan options of a command; with --peft, the adapter config's
    plan on ``model`` (a loaded Model; ``source`` its MODEL argument)."""
    from costlens.plans import plan_from_options
    peft = options.pop("peft", None)
    if peft:
        from costlens.peft_config import peft_plan_with_options
        values = {key: options.pop(key) for key in PLAN_OPTION_KEYS}
        spec, chosen, notes = peft_plan_with_options(peft, model, source, values)
        for note in notes:
            click.echo(f"costlens: note: {note}", err=True)
        return spec, chosen
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
@REVISION
@friendly_errors
def plan(model, as_json, tracer, revision, **options) -> None:
    """Price one fine-tuning plan of MODEL (an .onnx file, a config.json or model folder, an
    import spec, or a Hugging Face Hub id): parameters, memory and FLOPs of a training step."""
    recipe = _recipe(options)
    setup = _setup(options, recipe)
    if not options.get("peft"):
        chosen = _plan(options)                 # a bad plan fails before the model is traced
    loaded = _load(model, tracer, revision)
    if options.get("peft"):
        chosen = _plan(options, loaded, model)
    _run_plans(loaded, [chosen], setup, as_json, recipe=recipe)


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

    if options.get("peft"):
        from costlens.api import load
        spec, chosen = _plan(options, load(model), model)
    else:
        spec, chosen = _plan(options)
    if options["optimizer_impl"] is None and device == "cuda":
        options["optimizer_impl"] = "foreach"           # torch's default on CUDA
    setup = _setup(options, _recipe(options))
    if device == "cuda" and not _cuda_available():
        raise CostlensError("--device cuda: no CUDA device is available here")
    progress = lambda message: click.echo(f"costlens: {message}...", err=True)  # noqa: E731
    if setup.gpus > 1:
        from costlens.measure.distributed import validate_distributed
        if device != "cpu":
            raise CostlensError("validate --gpus runs gloo ranks on the CPU (--device cpu)")
        result, _, _ = validate_distributed(model, chosen, setup, setup.gpus, setup.shard, setup.tp,
                                            tolerance=tolerance if _given_on_command_line(("tolerance",)) else 0.03,
                                            progress=progress)
    elif model.lower().endswith(".onnx"):
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
@REVISION
@friendly_errors
def compare(model, plans_file, plans, html_path, validate_on, as_json, tracer, revision, **setup) -> None:
    """Price several plans of MODEL side by side (default: a set that fits the model)."""
    from costlens.estimate import default_plans
    from costlens.plans import load_plans_file, parse_plan_spec

    recipe = _recipe(setup)
    setup_values = _setup(setup, recipe)
    loaded = _load(model, tracer, revision)
    chosen = load_plans_file(plans_file) if plans_file else []
    chosen += [(spec, parse_plan_spec(spec)) for spec in plans]
    if not chosen:
        chosen = [(spec, parse_plan_spec(spec)) for spec in default_plans(loaded)]
    _run_plans(loaded, chosen, setup_values, as_json, html_path, validate_on, recipe)


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

from costlens.cli_fit import register as register_fit  # noqa: E402  (it reads cli only inside register)

register_fit(main)

if __name__ == "__main__":
    main()
