"""What the CLI shows around its work: an example per command (click epilogs) and progress on
stderr — shown only when stderr is a terminal, so pipes, files and CI logs stay clean."""
from __future__ import annotations

import sys

import click

# "\b" keeps click from re-wrapping the lines that follow it
EXAMPLES = {
    "inspect": "costlens inspect fixtures/llama.onnx\n  costlens inspect meta-llama/Llama-3.1-8B --json",
    "plan": "costlens plan fixtures/llama.onnx --lora attn,ffn --rank 8 --seq 128\n"
            "  costlens plan benchmarks/configs/llama3-8b.json --peft adapter_config.json --recipe train.yaml",
    "compare": "costlens compare benchmarks/configs/llama3-8b.json --precision bf16-mixed --gpu h100 "
               "--html report.html\n"
               "  costlens compare benchmarks/configs/llama3-8b.json --plan 'qlora:lora=attn;rank=16' --quant nf4 "
               "--precision bf16 --gpu a100 --tokens 200000000 --grad-accum 8 --price-per-hour 1.8",
    "gpus": "costlens gpus\n  costlens gpus --budget costlens.toml --json",
    "validate": "costlens validate fixtures/moe.onnx --lora attn,router,experts --rank attn=8,router=4,experts=4 "
                "--batch 2 --seq 64",
    "export": "costlens export benchmarks/configs/llama3-8b.json -o llama3-8b.onnx",
    "report": "costlens compare model.onnx --json > estimate.json && costlens report estimate.json -o report.html",
    "check": "costlens check fixtures/llama.onnx --budget costlens.toml --format junit",
    "fit": "costlens fit benchmarks/configs/llama3-8b.json --gpu l4 --lora attn --rank 16 --seq 4096 "
           "--precision bf16-mixed --checkpointing\n"
           "  costlens fit benchmarks/configs/mixtral-8x7b.json --memory 80GiB --search plan --seq 2048",
}


def add_examples(group: click.Group) -> None:
    """An "Examples" epilog on every command of ``group`` that has none yet."""
    for name, command in group.commands.items():
        if name in EXAMPLES and not command.epilog:
            command.epilog = "\b\nExample:\n  " + EXAMPLES[name]


def interactive() -> bool:
    """Whether stderr is a terminal: progress lines go there only, to keep pipes and CI logs clean."""
    return sys.stderr.isatty()


def status(message: str) -> None:
    """One progress line on stderr (a terminal only)."""
    if interactive():
        click.echo(f"costlens: {message}...", err=True)
