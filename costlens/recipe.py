"""Training recipes: the fields of Hugging Face ``TrainingArguments`` that change a step's cost.

A recipe is a YAML (PyYAML, installed with transformers) or JSON mapping of TrainingArguments
fields, as a Trainer / TRL script reads it. The fields that change cost map onto Setup:

| recipe field                            | Setup                                              |
|-----------------------------------------|----------------------------------------------------|
| per_device_train_batch_size             | batch                                              |
| max_length / max_seq_length (TRL)       | seq                                                |
| bf16 / fp16                             | precision bf16-autocast / fp16-autocast (fp32 weights, gradients and AdamW state; the forward under torch.autocast, as the Trainer runs it; neither: fp32) |
| dtype / torch_dtype bfloat16 (TRL)      | precision bf16 (bf16 weights, no fp32 master copy) |
| gradient_checkpointing                  | checkpointing                                      |
| optim (see OPTIMIZERS)                  | optimizer, optimizer_impl                          |
| gradient_accumulation_steps             | recorded: it does not change per-step memory       |

A field the recipe leaves out takes TrainingArguments' own default (read from transformers:
batch 8, optim adamw_torch_fused, fp32, no checkpointing); a value costlens cannot price is a
PlanError naming it. TrainingArguments fields that do not change a step's cost (learning rate,
logging, saving, ...) are accepted and listed as ignored; a key that is not a TrainingArguments
field is an error unless it is a known non-cost key of TRL scripts (model_name_or_path, ...).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from costlens.errors import PlanError

# HF optim name -> (costlens optimizer, optimizer_impl, note or "")
OPTIMIZERS: Mapping[str, tuple[str, str, str]] = MappingProxyType({
    "adamw_torch": ("adamw", "foreach", ""),     # torch.optim.AdamW: foreach is its default on CUDA
    "adamw_torch_fused": ("adamw", "for-loop",
                          "optim adamw_torch_fused is priced as the for-loop AdamW: the fused kernel keeps no step "
                          "temporaries, so the optimizer-phase figure is an upper bound"),
    "adamw_8bit": ("adamw-8bit", "for-loop", ""), "adamw_bnb_8bit": ("adamw-8bit", "for-loop", ""),
    "paged_adamw_8bit": ("adamw-8bit", "for-loop", "paged optimizer state is priced resident on the GPU"),
    "paged_adamw_32bit": ("adamw", "for-loop", "paged optimizer state is priced resident on the GPU"),
    "sgd": ("sgd", "for-loop", ""),
    "adafactor": ("adafactor", "for-loop", "transformers' Adafactor is priced as torch.optim.Adafactor "
                                           "(factored second moments, no first moment)"),
})
COST_FIELDS = ("per_device_train_batch_size", "max_length", "max_seq_length", "bf16", "fp16", "dtype", "torch_dtype",
               "gradient_checkpointing", "gradient_checkpointing_kwargs", "optim", "optim_args",
               "gradient_accumulation_steps")
# TrainingArguments fields that change what a step costs and that costlens does not price
UNPRICED = ("fsdp", "fsdp_config", "deepspeed", "torch_compile", "optim_target_modules", "use_liger_kernel",
            "bf16_full_eval", "fp16_full_eval", "tf32", "parallelism_config")
# keys TRL / transformers example scripts put beside TrainingArguments that do not change cost
SCRIPT_KEYS = ("model_name_or_path", "model_revision", "dataset_name", "dataset_config", "dataset_text_field",
               "dataset_train_split", "dataset_test_split", "trust_remote_code", "attn_implementation",
               "packing", "completion_only_loss", "assistant_only_loss", "chat_template_path")
# keys that would change cost but belong to another input
ELSEWHERE = {"use_peft": "--peft adapter_config.json or --lora", "lora_r": "--peft or --rank",
             "lora_alpha": "--peft or --alpha", "lora_dropout": "--peft or --lora-dropout",
             "lora_target_modules": "--peft or --lora", "load_in_4bit": None, "load_in_8bit": None}


@dataclass(frozen=True)
class Recipe:
    """What a recipe file sets: Setup keyword values, and what it records beside them."""

    source: str
    setup: Mapping[str, object]                    # Setup field -> value (batch, seq, precision, ...)
    from_file: tuple[str, ...]                     # Setup fields the file itself set (the rest: defaults)
    gradient_accumulation_steps: int
    notes: tuple[str, ...]
    ignored: tuple[str, ...]                       # fields that do not change a step's cost

    def as_setup(self, base=None):
        """``base`` (a Setup; default Setup()) with the recipe's values."""
        from dataclasses import replace as replaced
        from costlens.plans import Setup
        return replaced(base or Setup(), **self.setup)

    def document(self) -> dict:
        """The ``recipe`` block of a costlens.plan/1 or costlens.fit/1 document."""
        return {"source": self.source, "setup": dict(self.setup), "from_file": list(self.from_file),
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "tokens_per_optimizer_step_per_device":
                    None if self.setup.get("seq") is None or self.setup.get("batch") is None
                    else self.setup["batch"] * self.setup["seq"] * self.gradient_accumulation_steps,
                "notes": list(self.notes), "ignored": list(self.ignored)}

    def lines(self) -> list[str]:
        """Text lines for a table's footer."""
        lines = [f"recipe {self.source}: " + ", ".join(f"{k} {v}" for k, v in self.setup.items())
                 + f"; gradient accumulation {self.gradient_accumulation_steps} step(s) "
                   "(per-step memory and FLOPs are those of one micro-batch)"]
        return lines + [f"recipe: {note}" for note in self.notes]


def read_recipe_file(path: str | Path) -> dict:
    """The mapping in a recipe file: ``.yaml`` / ``.yml`` (PyYAML) or ``.json``."""
    file = Path(path)
    if not file.is_file():
        raise PlanError(f"{path}: no such recipe file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PlanError(f"{path}: reading YAML needs PyYAML (installed with transformers); "
                            "without it, give the recipe as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}:{e.lineno}: not JSON ({e.msg}); a recipe is JSON, or YAML with a .yaml name") \
                from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a recipe is a mapping of TrainingArguments fields")
    return data


def training_arguments_defaults() -> dict | None:
    """TrainingArguments' field defaults, from the installed transformers (None without it)."""
    try:     # a plain import: the user's hub settings stay as they are for a hub id read later
        import transformers
    except ImportError:
        return None
    return {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)
            if f.default is not dataclasses.MISSING}


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file as Setup values (PlanError for a value costlens cannot price)."""
    return recipe_from_mapping(read_recipe_file(path), str(path))


def recipe_from_mapping(data: dict, source: str = "recipe") -> Recipe:
    """A parsed recipe mapping (TrainingArguments fields) as Setup values; ``source`` names it in
    each PlanError. Fields it leaves out take TrainingArguments' defaults when transformers is installed."""
    defaults = training_arguments_defaults()
    known = set(defaults or ()) | set(COST_FIELDS)
    _check_keys(data, known if defaults is not None else None, source)
    given = {k: v for k, v in data.items() if k in COST_FIELDS}
    value = lambda key: given.get(key, (defaults or {}).get(key))  # noqa: E731
    notes: list[str] = []
    setup: dict[str, object] = {}
    if value("per_device_train_batch_size") is not None:
        setup["batch"] = _whole(value("per_device_train_batch_size"), "per_device_train_batch_size", source)
    seq = _seq(given, source)
    if seq is not None:
        setup["seq"] = seq
    if defaults is not None or any(k in given for k in ("bf16", "fp16", "dtype", "torch_dtype")):
        setup["precision"] = _precision(given, source)
    if defaults is not None or "gradient_checkpointing" in given:     # transformers 5 defaults it to None: off
        setup["checkpointing"] = _flag(value("gradient_checkpointing") or False, "gradient_checkpointing", source)
    if value("optim") is not None:
        optimizer, impl, note = _optimizer(value("optim"), given.get("optim_args"), source)
        setup["optimizer"], setup["optimizer_impl"] = optimizer, impl
        notes += [note] if note else []
    accumulation = _whole(value("gradient_accumulation_steps") or 1, "gradient_accumulation_steps", source)
    if defaults is None:
        notes.append("transformers is not installed: fields the recipe leaves out keep costlens's defaults")
    fields = {"per_device_train_batch_size": "batch", "max_length": "seq", "max_seq_length": "seq",
              "bf16": "precision", "fp16": "precision", "dtype": "precision", "torch_dtype": "precision",
              "gradient_checkpointing": "checkpointing", "optim": "optimizer"}
    from_file = tuple(dict.fromkeys(fields[k] for k in given if k in fields))
    if "optimizer" in from_file:
        from_file += ("optimizer_impl",)
    ignored = tuple(sorted(k for k in data if k not in COST_FIELDS))
    return Recipe(source, MappingProxyType(setup), from_file, accumulation, tuple(notes), ignored)


def _check_keys(data: dict, known: set | None, source: str) -> None:
    for key in data:
        if key in ELSEWHERE:
            where = ELSEWHERE[key]
            raise PlanError(f"{source}: {key}: " + (f"give it with {where}" if where else
                                                    "quantized base weights are not priced by costlens"))
        if key in UNPRICED and data[key] not in (None, False, "", [], {}):
            raise PlanError(f"{source}: {key}={data[key]!r} changes the step's cost and costlens does not price it")
        if known is not None and key not in known and key not in SCRIPT_KEYS:
            import difflib
            close = difflib.get_close_matches(key, COST_FIELDS, n=1) or difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PlanError(f"{source}: {key!r} is not a TrainingArguments field{hint}")


def _whole(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"{source}: {key} must be a positive whole number, got {value!r}")
    return value


def _flag(value, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _seq(given: dict, source: str) -> int | None:
    values = {k: given[k] for k in ("max_length", "max_seq_length") if given.get(k) is not None}
    if len(set(values.values())) > 1:
        raise PlanError(f"{source}: max_length and max_seq_length differ ({values['max_length']} vs "
                        f"{values['max_seq_length']})")
    return _whole(next(iter(values.values())), next(iter(values)), source) if values else None


def _precision(given: dict, source: str) -> str:
    bf16 = _flag(given.get("bf16") or False, "bf16", source)
    fp16 = _flag(given.get("fp16") or False, "fp16", source)
    if bf16 and fp16:
        raise PlanError(f"{source}: bf16 and fp16 are both true")
    dtype = given.get("dtype", given.get("torch_dtype"))
    if dtype not in (None, "float32", "bfloat16"):
        raise PlanError(f"{source}: dtype {dtype!r}: costlens prices float32 or bfloat16 weights (not float16 or auto)")
    if dtype == "bfloat16":
        if fp16:
            raise PlanError(f"{source}: fp16 autocast over bfloat16 weights is not priced")
        return "bf16"
    # the Trainer's bf16=True / fp16=True keep the model's fp32 weights and run the forward under
    # torch.autocast: no half-precision weights, no master copy (issue 10)
    return "bf16-autocast" if bf16 else "fp16-autocast" if fp16 else "fp32"


def _optimizer(name, optim_args, source: str) -> tuple[str, str, str]:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise PlanError(f"{source}: optim {name!r} is not priced by costlens (choose from {', '.join(OPTIMIZERS)})")
    optimizer, impl, note = OPTIMIZERS[name]
    if optim_args:
        args = dict(item.split("=", 1) for item in str(optim_args).replace(" ", "").split(",") if "=" in item)
        if name == "sgd" and float(args.pop("momentum", 0) or 0) > 0:
            optimizer = "sgd-momentum"
        args.pop("lr", None), args.pop("weight_decay", None)
        if args:
            raise PlanError(f"{source}: optim_args {', '.join(args)}: costlens does not know what they cost")
    return optimizer, impl, note


def merge_setup(values: dict, recipe: Recipe | None, explicit: set[str]) -> dict:
    """Setup keyword values: an option given on the command line (``explicit``) wins over the
    recipe, which wins over the option's default."""
    if recipe is None:
        return values
    merged = dict(values)
    for key, value in recipe.setup.items():
        if key not in explicit:
            merged[key] = value
    return merged
