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
    """(forward FLOPs, forward+backward FLOPs) of one step: forward, cross-entropy, backward.
    A transformers model (or its PEFT wrapper) runs without a KV cache and its output's
    ``.logits`` are taken, upcast as HF's loss does."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    hf = type(getattr(module, "config", None)).__module__.startswith("transformers.")
    with FlopCounterMode(display=False) as counter:
        output = module(input_ids=ids, use_cache=False) if hf else module(ids)
        logits = getattr(output, "logits", output)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# How a user writes each of costlens's default plans for the fixture modules (fixtures/models.py).
ATTN_MODULES = r".*(self_attn|attention)\.(q_proj|k_proj|v_proj|o_proj|c_attn|c_proj)"
FFN_MODULES = r".*(mlp|extra_mlps\.\d+)\.(gate_proj|up_proj|down_proj|c_fc|c_proj)"
ROUTER_MODULES = r".*mlp\.gate"
EXPERT_MODULES = r".*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)"
EXPERT_PARAMETERS = ["mlp.gate_up_proj", "mlp.down_proj"]


def default_plan_recipe(plan_name: str, fused_experts: bool) -> dict:
    """Keyword arguments of ``apply_recipe`` for one default plan."""
    none = r"^$"
    recipes = {
        "full": {"train": None},
        "freeze-attn": {"freeze": ATTENTION},
        "ffn-only": {"train": FFN},
        "experts-only": {"train": EXPERTS},
        "router-only": {"train": ROUTER},
        "lora-attn-r8": {"train": none, "modules": ATTN_MODULES, "rank": 8},
        "lora-attn-ffn-r8": {"train": none, "modules": f"({ATTN_MODULES}|{FFN_MODULES})", "rank": 8},
    }
    if plan_name == "lora-attn-router-experts":
        if fused_experts:   # PEFT target_parameters; its rank_pattern keys on the parameter name
            return {"train": none, "modules": f"({ATTN_MODULES}|{ROUTER_MODULES})", "parameters": EXPERT_PARAMETERS,
                    "rank": 8, "rank_pattern": {"gate": 4, "gate_up_proj": 4, "down_proj": 4}}
        return {"train": none, "modules": f"({ATTN_MODULES}|{ROUTER_MODULES}|{EXPERT_MODULES})", "rank": 8,
                "rank_pattern": {"gate": 4, r"experts\.\d+\.\w+_proj": 4}}
    return recipes[plan_name]


def apply_recipe(module, train=None, freeze=None, modules=None, parameters=None, rank=8, rank_pattern=None):
    if freeze is not None:
        for name, param in module.named_parameters():
            param.requires_grad_(re.search(freeze, name) is None)
    else:
        set_trainable(module, train)
    if modules is None and parameters is None:
        return module
    from peft import LoraConfig, get_peft_model
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, bias="none", rank_pattern=rank_pattern or {},
                        target_modules=modules or [], target_parameters=parameters or [])
    wrapped = get_peft_model(module, config)
    for name, param in wrapped.base_model.model.named_parameters():
        if name in keep:
            param.requires_grad_(True)
    return wrapped
