"""The `costlens` command: parse -> one library call -> render.

Every CostlensError becomes one line on stderr and exit code 2; a budget or tolerance
exceeded is exit code 1. No traceback reaches the user unless --debug asks for it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from costlens.cli_errors import TOLERANCE, friendly_errors
from costlens.defaults import source_defaults
from costlens.errors import CostlensError
from costlens.plans import ATTENTION_IMPLS, EXPERTS_IMPLS, LOSSES, PRECISIONS

TRACER = click.option(
    "--tracer", type=click.Choice(["export", "fvcore"]), default="export", show_default=True,
    help="How a PyTorch source (import spec, config.json, model folder) is traced: torch.export on the meta "
         "device, or fvcore's TorchScript trace.")

REVISION = click.option("--revision", default=None,
                        help="Branch, tag or commit of a Hugging Face Hub id MODEL (org/name) [default: main].")


def _load(model: str, tracer: str = "export", revision: str | None = None, precision: str = "fp32"):
    """costlens.load, with a note on stderr while it traces (a terminal only); a config is
    traced in the dtype ``precision`` runs the model in (plans.running_dtype)."""
    from costlens.api import load
    from costlens.cli_help import status
    from costlens.plans import running_dtype
    status(f"loading {model}")
    return load(model, tracer=tracer, revision=revision, dtype=running_dtype(precision))


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


SETUP_KEYS = ("batch", "seq", "optimizer", "optimizer_impl", "precision", "attention", "loss", "checkpointing", "gpu",
              "mfu",
              "moe_dispatch", "experts_impl", "base_quant")


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
                     type=click.Choice(list(PRECISIONS))),
        click.option("--attention", default=None, type=click.Choice(list(ATTENTION_IMPLS)),
                     help="eager keeps the batch x heads x seq x seq scores; fused (flash / memory-efficient SDPA) does not "
                          "[default: what the source runs: a config's attn_implementation, else sdpa when its "
                          "transformers class supports it, else eager; eager for an .onnx file]."),
        click.option("--loss", type=click.Choice(list(LOSSES)), default=None,
                     help="ce: cross-entropy of the logits in their dtype; hf: as a transformers model computes it "
                          "from labels (logits upcast to fp32 first: fp32 scores in a half model) [default: hf for a "
                          "Hugging Face config, folder or hub id, else ce]."),
        click.option("--checkpointing", is_flag=True, help="Recompute each layer in backward (activation checkpointing)."),
        click.option("--gpu", default=None, help="Accelerator for a time-per-step figure, e.g. h100, a100-40gb, l4."),
        click.option("--mfu", type=float, default=0.4, show_default=True, help="Model FLOPs utilization for --gpu."),
        click.option("--moe-dispatch", type=click.Choice(["routed", "dense"]), default="routed", show_default=True,
                     help="routed: each expert runs on the tokens routed to it (k of E); dense: every token."),
        click.option("--experts-impl", type=click.Choice(list(EXPERTS_IMPLS)), default=None,
                     help="How routed experts stored as 3-D tensors run (transformers' experts_implementation): "
                          "grouped_mm or eager (a loop over the experts, combined by index_add); experts stored one "
                          "linear per expert always loop [default: what the source runs: a config's "
                          "experts_implementation, else grouped_mm (transformers 5's) for a Hugging Face source; "
                          "eager for an .onnx file or import spec]."),
        *PARALLEL_OPTIONS,
        click.option("--json", "as_json", is_flag=True, help="Print the costlens.plan/1 JSON document."),
        click.option("--recipe", type=click.Path(dir_okay=False),
                     help="A YAML or JSON file of Hugging Face TrainingArguments (batch, max_length, bf16/fp16, "
                          "gradient_checkpointing, optim, ...); options given here win over it."),
    ]):
        command = decorator(command)
    return command


QUANT = click.option("--quant", "base_quant", type=click.Choice(["nf4", "nf4-dq", "int8"]), default=None,
                     help="Frozen linear base weights stored quantized by bitsandbytes (QLoRA: nf4; nf4-dq: with "
                          "double quantization; int8: LLM.int8) [default: not quantized].")

JOB_OPTION_KEYS = ("tokens", "dataset_tokens", "epochs", "grad_accum", "price_per_hour")


def job_options(command):
    """Options pricing the whole job (costlens/jobcost.py), shared by plan and compare."""
    for decorator in reversed([
        click.option("--tokens", type=int, default=None, help="Tokens the whole job trains on (e.g. 2000000000)."),
        click.option("--dataset-tokens", type=int, default=None, help="Tokens in one pass over the data (with --epochs)."),
        click.option("--epochs", type=float, default=None, help="Passes over --dataset-tokens [default: 1]."),
        click.option("--grad-accum", type=int, default=1, show_default=True,
                     help="Micro-batches of --batch accumulated per optimizer step (job cost only: the step's "
                          "memory is that of one micro-batch)."),
        click.option("--price-per-hour", type=float, default=None,
                     help="Price of one GPU-hour [default: the [prices] table of ./costlens.toml, if any]."),
    ]):
        command = decorator(command)
    return command


def _job(options: dict, recipe=None):
    """The Job of the job options (None without --tokens / --dataset-tokens); pops them. Without
    --grad-accum, a --recipe's gradient_accumulation_steps is the accumulation (a derived default)."""
    from costlens.jobcost import Job, job_tokens
    values = {key: options.pop(key) for key in JOB_OPTION_KEYS}
    if recipe is not None and "grad_accum" not in _given_on_command_line(("grad_accum",)):
        values["grad_accum"] = recipe.gradient_accumulation_steps
        if recipe.gradient_accumulation_steps != 1:
            click.get_current_context().meta["costlens.job_derived"] = {
                "grad_accum": f"{recipe.gradient_accumulation_steps}, from --recipe gradient_accumulation_steps"}
    tokens = job_tokens(values["tokens"], values["dataset_tokens"], values["epochs"])
    if tokens is None:
        for key in ("grad_accum", "price_per_hour"):
            if key in _given_on_command_line((key,)):
                raise CostlensError(f"--{key.replace('_', '-')} prices a whole job: give --tokens N "
                                    "(or --dataset-tokens N --epochs E)")
        return None
    if values["grad_accum"] < 1:
        raise CostlensError(f"--grad-accum must be positive, got {values['grad_accum']}")
    price, source = values["price_per_hour"], "--price-per-hour" if values["price_per_hour"] is not None else None
    return Job(tokens=tokens, grad_accum=values["grad_accum"], price_per_gpu_hour=price, price_source=source)


def _setup(options: dict, recipe=None):
    """The Setup of the options (and recipe); defaults derived from another option are recorded in
    the click context (``derived_defaults``) for the header and the JSON (issue 16 item 1)."""
    from costlens.plans import Setup
    from costlens.recipe import merge_setup
    values = {k: options[k] for k in SETUP_KEYS if k in options}
    given = _given_on_command_line(SETUP_KEYS)
    values = merge_setup(values, recipe, given)
    if "mfu" in given and not values.get("gpu"):
        raise CostlensError("--mfu sets the utilization of --gpu's peak: give --gpu too (e.g. --gpu h100)")
    params = click.get_current_context().params
    explicit = given | set(recipe.from_file if recipe is not None else ())
    resolved = source_defaults(params.get("model"), values, explicit, revision=params.get("revision"),
                               searched=params.get("search"))         # costlens/defaults.py: one home
    values, derived = dict(resolved.values), dict(resolved.derived)
    parallel = _parallel_values(options)
    if parallel and options["gpus"] is None and parallel["gpus"] > 1:
        derived["gpus"] = f"{parallel['gpus']}, from --tp {parallel['tp']} x --ep {parallel['ep']}"
    if parallel and options["shard"] is None and parallel["shard"] != "none":
        derived["shard"] = f"{parallel['shard']}, from --gpus {parallel['gpus']}"
    values.update(parallel)
    click.get_current_context().meta["costlens.derived"] = derived
    return Setup(**values)



def derived_defaults() -> dict[str, str]:
    """{setup key: "value, from which option"} of the defaults the last _setup derived."""
    meta = click.get_current_context().meta
    return {**meta.get("costlens.derived", {}), **meta.get("costlens.job_derived", {})}


def _given_on_command_line(keys) -> set[str]:
    from click.core import ParameterSource
    context = click.get_current_context()
    return {key for key in keys if context.get_parameter_source(key) is ParameterSource.COMMANDLINE}


def _recipe(options: dict):
    """The --recipe file, read (None without one)."""
    from costlens.recipe import load_recipe
    return load_recipe(options["recipe"]) if options.get("recipe") else None


def _run_plans(model, plans: list, setup, as_json: bool, html_path: str | None = None,
               validate_on: str | None = None, recipe=None, job=None) -> None:
    """model: a loaded Model; plans: (spec text, Plan) pairs; validate_on: a device to measure on;
    recipe: the --recipe file read (recorded in the document and under the table); job: a Job to price."""
    from costlens.estimate import estimate
    from costlens.jobcost import with_price_table
    from costlens.render.plan import plan_document, plan_text

    results = [(spec, estimate(model, plan, setup)) for spec, plan in plans]
    _warn_positions(model, setup)
    for _, result in results:
        if result.params.trainable == 0:      # e.g. --freeze all: legal, but rarely what was meant
            click.echo(f"costlens: warning: plan {result.plan.name!r} trains no parameter: "
                       "the step is a forward pass only", err=True)
    if job is not None and setup.gpu:
        job = with_price_table(job, setup.gpu, "costlens.toml")
    document = plan_document(model, results, derived=derived_defaults(), job=job)
    if validate_on:
        _attach_validation(document, model, plans, setup, validate_on)
    if recipe is not None:
        document["recipe"] = recipe.document()
    if html_path:
        from costlens.cli_ci import write_html
        write_html(document, html_path)
    text = "\n".join([plan_text(document), *(recipe.lines() if recipe is not None else [])])
    click.echo(json.dumps(document, indent=2) if as_json else text)
    if validate_on and _validation_failed(document):
        sys.exit(1)                       # exit 1: a tolerance exceeded (README, exit codes)


def _measure_plan(source: str, chosen, setup, device: str):
    """A measured step of ``chosen`` on ``source`` (a measure.validate.Validation), the truth
    ``costlens validate SOURCE`` uses: the real transformers module of a config, folder or hub id,
    an .onnx file's graph as a torch module, an import spec's module. (Reading a config as an ONNX
    graph was issue 16's confusing ParseError of ``compare CONFIG --validate``.)"""
    from costlens.frontends.source import SourceKind, classify
    from costlens.measure.validate import validate_config, validate_onnx, validate_torch
    kind = classify(source).kind
    if kind is SourceKind.ONNX:
        return validate_onnx(source, chosen, setup, device=device)
    if kind in (SourceKind.HF_CONFIG, SourceKind.HUB_ID):
        return validate_config(source, chosen, setup, device=device)
    return validate_torch(source, chosen, setup, device=device)


def _warn_positions(model, setup) -> None:
    """A warning line on stderr when --seq exceeds a RoPE model's configured positions
    (defaults.seq_beyond_positions; a learned position table refuses it in the estimate)."""
    from costlens.defaults import seq_beyond_positions
    params = click.get_current_context().params
    warning = seq_beyond_positions(model, setup.seq, params.get("model"), params.get("revision"))
    if warning:
        click.echo(f"costlens: warning: {warning}", err=True)


def _validation_failed(document: dict) -> bool:
    return any(figure["verdict"] not in ("ok", "shown")
               for entry in document["plans"] for figure in entry.get("validation", {}).values())


PLAN_OPTION_KEYS = ("train", "freeze", "lora", "rank", "alpha", "lora_dropout", "dora", "stop_grad", "dropout",
                    "stack_ffn", "stack_ffn_width")


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
        click.option("--dora", is_flag=True, default=None,
                     help="DoRA (PEFT use_dora): a trained magnitude per output of each adapted linear; keeps the "
                          "base and adapter outputs for its gradient."),
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
    from costlens.cli_fit import Ticker
    progress = Ticker("validating")    # on stderr, and only when it is a terminal
    source = click.get_current_context().params.get("model") or model.graph.source
    for entry, (spec, chosen) in zip(document["plans"], plans):
        progress(f"plan {entry['name']}")
        result = _measure_plan(source, chosen, setup, device)
        entry["validation"] = {c.quantity: {"estimated": c.estimated, "measured": c.measured, "error": c.error,
                                             "tolerance": c.tolerance, "verdict": _verdict(c)}
                               for c in result.comparisons}
    progress.close()


def _verdict(comparison) -> str:
    """ok / outside tolerance / shown (a figure measured for information, not judged)."""
    if comparison.tolerance is None:
        return "shown"
    if comparison.ok:
        return "ok"
    return f"OUTSIDE {comparison.tolerance:.0%}" if comparison.tolerance else "NOT EXACT"


@main.command()
@click.argument("model")
@plan_options
@setup_options
@QUANT
@job_options
@TRACER
@REVISION
@friendly_errors
def plan(model, as_json, tracer, revision, **options) -> None:
    """Price one fine-tuning plan of MODEL (an .onnx file, a config.json or model folder, an
    import spec, or a Hugging Face Hub id): parameters, memory and FLOPs of a training step
    (and, with --tokens, of the whole job)."""
    recipe = _recipe(options)
    job = _job(options, recipe)
    setup = _setup(options, recipe)
    if not options.get("peft"):
        chosen = _plan(options)                 # a bad plan fails before the model is traced
    loaded = _load(model, tracer, revision, setup.precision)
    if options.get("peft"):
        chosen = _plan(options, loaded, model)
    _run_plans(loaded, [chosen], setup, as_json, recipe=recipe, job=job)


@main.command()
@click.argument("model")
@plan_options
@setup_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the measured step runs (cuda: allocator peak; cpu: exact live tensor storage).")
@click.option("--tolerance", type=TOLERANCE, default=0.05, show_default=True,  # issue 16: 5% or 0.05
              help="Largest relative error of a memory figure (FLOPs: 1%; trainable parameters: exact).")
@click.option("--inference", is_flag=True,
              help="Also measure onnxruntime's inference memory in a fresh process (shown, not judged).")
@click.option("--tiny", is_flag=True,
              help="Validate a small model of the same architecture (2 layers, hidden 64, vocab 256, at most 8 "
                   "experts; heads keep their GQA ratio); estimate and measurement are of that model.")
@click.option("--layers", type=int, default=None, help="Shrink the config to N layers (with or without --tiny).")
@click.option("--hidden", type=int, default=None, help="Shrink the hidden size to H (heads of 16 unless --heads).")
@click.option("--heads", type=int, default=None, help="Attention heads of the shrunk model (with --hidden).")
@click.option("--vocab", type=int, default=None, help="Vocabulary of the shrunk model.")
@click.option("--intermediate", type=int, default=None, help="FFN (and expert) width of the shrunk model.")
@click.option("--experts", type=int, default=None, help="At most this many experts in the shrunk model.")
@click.option("--source-config", type=click.Path(dir_okay=True),
              help="For an .onnx MODEL: the HF config.json it was exported from; its real module is measured "
                   "[default: found through the HF corpus index.json beside the file, else the costlens executor].")
@click.option("--executor", is_flag=True,
              help="For an .onnx MODEL: measure the costlens executor of the graph, not the real module.")
@friendly_errors
def validate(model, device, tolerance, inference, as_json, tiny, layers, hidden, heads, vocab, intermediate,
             experts, source_config, executor, **options) -> None:
    """Measure a real training step of the plan and compare it with the estimate (exit 1 when
    a figure is outside tolerance). MODEL is a Hugging Face config.json, model folder or hub id
    (the real transformers module runs, random weights), an .onnx file (the real module of its
    source config when known, else its graph as a torch module), or an import spec
    package.module:factory (the module itself runs). The report says which truth was used.
    Needs the torch extra."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise CostlensError("validate runs a real training step: it needs the torch extra (pip install 'costlens[torch]')")
    from costlens.measure.hf_module import Dims
    from costlens.measure.validate import corpus_config, validate_config, validate_onnx, validate_torch
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
        raise CostlensError("--device cuda: no CUDA device is available here (torch sees none); "
                            "validate on the CPU with --device cpu")
    dims = Dims.tiny(layers=layers, hidden=hidden, heads=heads, vocab=vocab, intermediate=intermediate,
                     experts=experts) if tiny else Dims(layers, hidden, heads, vocab, intermediate, experts)
    is_onnx = model.lower().endswith(".onnx")
    config = None
    if is_onnx and not executor:
        config = source_config or corpus_config(model)
    if source_config and (not is_onnx or executor):
        raise CostlensError("--source-config names the config an .onnx MODEL was exported from "
                            "(and measures its real module, so not with --executor)")
    if dims.given and is_onnx and config is None:
        raise CostlensError(f"{model}: --tiny and the size options shrink a Hugging Face config, and this ONNX file "
                            "has none (give --source-config CONFIG.json, or validate the config itself)")
    from costlens.cli_fit import Ticker
    progress = Ticker("validate")      # on stderr, and only when it is a terminal (issue 14 item 4)
    if setup.gpus > 1:
        from costlens.measure.distributed import validate_distributed
        if device != "cpu":
            raise CostlensError("validate --gpus runs gloo ranks on the CPU (--device cpu)")
        # a config (or the corpus config of an .onnx file) runs the real transformers module in each rank
        result, _, _ = validate_distributed(config if is_onnx and config is not None else model, chosen, setup,
                                            setup.gpus, setup.shard, setup.tp,
                                            tolerance=tolerance if _given_on_command_line(("tolerance",)) else 0.03,
                                            progress=progress, dims=dims)
    elif is_onnx and config is not None:
        if inference:
            raise CostlensError("--inference measures onnxruntime on the graph: give it with --executor")
        result = validate_config(config, chosen, setup, dims=dims, device=device, tolerance=tolerance,
                                 progress=progress, estimate_from=None if dims.given else model)
    elif is_onnx:
        result = validate_onnx(model, chosen, setup, device=device, tolerance=tolerance, inference=inference,
                               progress=progress)
    elif _is_config_source(model):
        result = validate_config(model, chosen, setup, dims=dims, device=device, tolerance=tolerance,
                                 progress=progress)
    else:
        if dims.given:
            raise CostlensError("--tiny and the size options shrink a Hugging Face config, not an import spec")
        result = validate_torch(model, chosen, setup, device=device, tolerance=tolerance, progress=progress)
    progress.close()
    document = validation_document(result, model, spec)
    click.echo(json.dumps(document, indent=2) if as_json else validation_text(document))
    if not result.ok:
        sys.exit(1)


def _is_config_source(model: str) -> bool:
    """A config.json, a model folder or a hub id (the sources validate builds the real module of)."""
    from costlens.frontends.source import SourceKind, classify
    return classify(model).kind in (SourceKind.HF_CONFIG, SourceKind.HUB_ID)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@main.command()
@click.argument("model")
@click.option("--plans", "plans_file", type=click.Path(dir_okay=False),
              help="A TOML file of [[plan]] tables (name plus spec, or name plus train/freeze/lora/rank/... keys).")
@click.option("--plan", "plans", multiple=True,
              help="A plan spec, repeatable: 'NAME:key=value;key=value' with keys "
                   + ", ".join(key.replace("_", "-") for key in PLAN_OPTION_KEYS)
                   + "; e.g. 'moe-lora:lora=attn,router,experts;rank=attn=8,router=4,experts=4'.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML report to this file.")
@click.option("--validate", "validate_on", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Also measure each plan on this device and attach the errors (torch extra; minutes on big models).")
@click.option("--peft", "peft_files", multiple=True, type=click.Path(),
              help="A PEFT adapter_config.json (or its folder), repeatable: its plan is priced beside the others "
                   "(named peft-FOLDER; beside the default plans when no --plan or --plans is given).")
@setup_options
@QUANT
@job_options
@TRACER
@REVISION
@friendly_errors
def compare(model, plans_file, plans, html_path, validate_on, as_json, tracer, revision, peft_files, **setup) -> None:
    """Price several plans of MODEL side by side (default: a set that fits the model)."""
    from costlens.estimate import default_plans
    from costlens.plans import check_unique_names, load_plans_file, parse_plan_spec

    recipe = _recipe(setup)
    job = _job(setup, recipe)
    setup_values = _setup(setup, recipe)
    chosen = load_plans_file(plans_file) if plans_file else []
    chosen += [(spec, parse_plan_spec(spec)) for spec in plans]
    check_unique_names([plan for _, plan in chosen])      # before the model is traced
    loaded = _load(model, tracer, revision, setup_values.precision)
    if not chosen:
        chosen = [(spec, parse_plan_spec(spec)) for spec in default_plans(loaded)]
    chosen += [_peft_plan(path, loaded, model) for path in peft_files]
    check_unique_names([plan for _, plan in chosen])
    _run_plans(loaded, chosen, setup_values, as_json, html_path, validate_on, recipe, job)


def _peft_plan(path: str, model, source: str):
    """(spec, Plan) of one --peft adapter config for compare, named after its folder (or file)."""
    from pathlib import Path

    from costlens.peft_config import peft_plan_with_options
    from costlens.plans import with_name
    spec, plan, notes = peft_plan_with_options(path, model, source, {})
    for note in notes:
        click.echo(f"costlens: note: {note}", err=True)
    where = Path(path)
    label = where.name if where.is_dir() else (where.parent.name or where.stem)
    return spec, with_name(plan, f"peft-{label}")


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


@main.command("gpus")
@click.option("--budget", type=click.Path(dir_okay=False), help="Also list the custom [gpu.NAME] entries of this budget file.")
@click.option("--json", "as_json", is_flag=True, help="Print the costlens.gpus/1 JSON document.")
@friendly_errors
def gpus_command(budget: str | None, as_json: bool) -> None:
    """List the accelerators --gpu accepts: memory, dense peak FLOP/s per dtype, memory bandwidth."""
    from costlens import gpus
    from costlens.render.gpus import gpus_text
    custom = ()
    if budget:
        from costlens.budgets import load_budget
        custom = load_budget(budget).accelerators
    document = gpus.table_document(custom)
    click.echo(json.dumps(document, indent=2) if as_json else gpus_text(document))


def _name_json_schemas(group: click.Group) -> None:
    """Each command's --json help names the schema that command prints (setup_options is shared)."""
    # written out: render/validate.py imports the measuring code (torch); test_cli_errors checks they agree
    schemas = {"validate": "costlens.validate/1", "fit": "costlens.fit/1"}
    for name, schema in schemas.items():
        for param in getattr(group.commands.get(name), "params", ()):
            if param.name == "as_json":
                param.help = f"Print the {schema} JSON document."


from costlens.cli_ci import register  # noqa: E402  (cli_ci never imports cli)

register(main)

from costlens.cli_fit import register as register_fit  # noqa: E402  (fit is defined over this module's options)

register_fit(main, sys.modules[__name__])
_name_json_schemas(main)

if __name__ == "__main__":
    main()
