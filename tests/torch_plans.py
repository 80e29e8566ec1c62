"""Apply a plan to a fixture's torch module the way users do (requires_grad flags, PEFT),
independently of costlens, and count its FLOPs with torch.utils.flop_counter."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ATTENTION = r"\.(self_attn|attention)\."
FFN = r"\.(mlp|extra_mlps)\.(?!gate\.|experts|shared_expert|gate_up_proj|down_proj$)"
ROUTER = r"\.mlp\.gate\."
EXPERTS = r"\.mlp\.(experts\.|gate_up_proj$|down_proj$)"


def set_trainable(module: torch.nn.Module, pattern: str | None) -> None:
    """Train parameters whose name matches; None trains everything."""
    for name, param in module.named_parameters():
        param.requires_grad_(pattern is None or re.search(pattern, name) is not None)


def add_lora(module: torch.nn.Module, target_regex: str | list, rank: int, rank_pattern: dict | None = None):
    """PEFT LoRA on modules whose full name matches (a regex), or on parameters (a list:
    PEFT's ``target_parameters``, for 3-D expert tensors). PEFT freezes the base; base
    weights the plan also trains keep training."""
    from peft import LoraConfig, get_peft_model
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    targets = {"target_modules": [], "target_parameters": target_regex} if isinstance(target_regex, list) \
        else {"target_modules": target_regex}
    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, bias="none", rank_pattern=rank_pattern or {},
                        **targets)
    wrapped = get_peft_model(module, config)
    for name, param in wrapped.base_model.model.named_parameters():
        if name in keep:            # base weights the plan also trains (e.g. the router)
            param.requires_grad_(True)
    return wrapped


def detach_attention_outputs(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        if name.endswith("self_attn") or name.endswith(".attention"):
            sub.register_forward_hook(lambda _m, _inputs, output: output.detach())


def step_flops(module: torch.nn.Module, batch: int, seq: int, vocab: int) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs) of one step: forward, cross-entropy, backward."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = module(ids)
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1))
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
