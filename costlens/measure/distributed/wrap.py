"""A plan on the real module in one rank, and the parallel wrapper of each shard mode.

``apply_recipe`` sets requires_grad by parameter name and adds PEFT LoRA (as
``validate.apply_plan`` does); ``wrap`` returns (the module to call, its optimizer) for
ddp, zero1, zero2, zero3 and tp (see the package docstring for what each runs).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn

from costlens.measure.tracker import MemCategory, StorageTracker

# module-name suffixes split by tensor parallelism (what torch.distributed.tensor.parallel plans name)
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


class PeakResetTracker(StorageTracker):
    """A StorageTracker whose peak can be reset between steps while every storage stays tracked,
    safe against frees booked from gloo's worker threads.

    A gloo collective runs on a ProcessGroupGloo worker thread that holds the Work (and with it the
    collective's tensors) until a moment after the Work completes. When the rank's own code drops a
    tensor before the worker has let go, the storage dies on the worker thread, later than the step
    released it -- how much later depends on how the OS schedules 4+ rank processes on 2 shared
    cores, and the weakref callback then races the main thread's ``_live_bytes += n`` (a lost
    update shifts every later figure). Bookkeeping is therefore serialized by a lock, and frees
    booked off the rank's main thread in the measured step are counted (``late_frees``, bytes in
    ``late_free_bytes``) so that the launcher can reject a run they may have distorted."""

    def __init__(self, device_type: str | None = None) -> None:
        """``device_type``: as StorageTracker's."""
        super().__init__(device_type)
        self._lock = threading.RLock()
        self._owner = threading.get_ident()
        self._counting_late = False
        self.late_frees = 0
        self.late_free_bytes = 0

    def _track(self, storage, category):
        with self._lock:
            return super()._track(storage, category)

    def _resize(self, serial: int, nbytes: int) -> None:
        with self._lock:
            super()._resize(serial, nbytes)

    def _on_free(self, serial: int, _ref) -> None:
        with self._lock:
            if self._counting_late and threading.get_ident() != self._owner and serial in self._live:
                self.late_frees += 1
                self.late_free_bytes += self._live[serial]
            super()._on_free(serial, _ref)

    def _switch_phase(self, phase) -> None:
        with self._lock:
            super()._switch_phase(phase)

    def reset_peak(self) -> None:
        """Start the measured step: the peak from here, late frees counted from here."""
        with self._lock:
            self._reset_peak()
            self._counting_late = True
            self.late_frees = self.late_free_bytes = 0

    def _reset_peak(self) -> None:
        self._snapshot_pending()
        self._baseline_bytes = self._live_bytes
        self._peak_bytes, self._peak_phase = self._live_bytes, self._phase
        self._phase_peak = {self._phase: self._live_bytes}
        self._phase_snapshot = {}
        self._unsnapped = self._phase
        self._untracked_bytes = self._n_untracked = 0

    def note_resize(self, tensor: torch.Tensor) -> None:
        """Book a storage resized outside the dispatcher (FSDP2 frees and re-allocates the
        unsharded parameters with ``untyped_storage().resize_``, which no aten op reports)."""
        for storage in self._storages(tensor) or ():
            serial = self._serials.get(storage)
            if serial is None:
                if storage.nbytes():
                    self._track(storage, MemCategory.WEIGHTS)
            else:
                self._resize(serial, storage.nbytes())


@contextmanager
def storage_resizes_seen(tracker: PeakResetTracker) -> Iterator[None]:
    """FSDP2's alloc_storage / free_storage, reported to ``tracker`` (restored on exit)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    originals = (_fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage)

    def alloc(tensor):
        originals[0](tensor)
        tracker.note_resize(tensor)

    def free(tensor):
        originals[1](tensor)
        tracker.note_resize(tensor)
    _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = alloc, free, alloc
    try:
        yield
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = originals


def apply_recipe(module: nn.Module, recipe) -> nn.Module:
    """requires_grad from the recipe's names (a tied parameter trains if any of its names does),
    then PEFT LoRA; returns the module to train (the model inside PEFT's wrapper)."""
    trainable = set(recipe.trainable)
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for parameter in module.parameters():
        parameter.requires_grad_(any(n in trainable for n in names[id(parameter)]))
    if not recipe.lora_modules and not recipe.lora_parameters:
        return module
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, bias="none",
                        target_modules=list(recipe.lora_modules), target_parameters=list(recipe.lora_parameters),
                        rank_pattern=dict(recipe.rank_pattern))
    wrapped = get_peft_model(module, config)
    inner = wrapped.base_model.model
    for name, parameter in inner.named_parameters():
        if name in trainable:
            parameter.requires_grad_(True)
    return inner


def planned_real_module(real) -> tuple[nn.Module, nn.ModuleList, str]:
    """(module to train, its decoder layers, truth label) of a RealModule: the real transformers
    module (seed 0 on every rank, so the replicas agree) with the plan put on it by
    ``validate.apply_plan``, exactly as single-rank ``validate_config`` does."""
    from costlens.frontends.hf_config import layer_container, layer_count
    from costlens.measure.hf_module import build_real_module, truth_label
    from costlens.measure.validate import apply_plan
    module = build_real_module(real.config, real.setup)
    model = SimpleNamespace(roles=SimpleNamespace(params=list(real.params), attentions=()))
    plan = real.plan()
    planned = apply_plan(module, model, SimpleNamespace(trainable_keys=real.trainable_keys,
                                                        adapters=real.adapters, plan=plan))
    truth = truth_label(planned)
    inner = planned.get_base_model() if hasattr(planned, "get_base_model") else planned
    # the FSDP units: the ModuleList of the config's repeated blocks (LlamaDecoderLayer, GPT2Block, ...)
    path = layer_container(inner, layer_count(real.config) or 0)
    if path is None:
        raise ValueError(f"no ModuleList of {layer_count(real.config)} decoder layers in {type(inner).__name__}")
    return inner, inner.get_submodule(path), truth


def decoder_layers(module: nn.Module) -> nn.ModuleList:
    """The repeated blocks: the FSDP units (the first ModuleList named ``layers``)."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return child
    raise ValueError("no decoder layers (a ModuleList named 'layers') to shard")


def make_optimizer(params, name: str, lr: float):
    """The single-rank optimizer of ``name`` over ``params``, stepping per parameter (for-loop)."""
    from costlens.measure.step import make_optimizer as single
    return single(params, name, "for-loop", lr)


def wrap(module: nn.Module, shard: str, world: int, optimizer: str, lr: float, tp: int = 1,
         layers: nn.ModuleList | None = None):
    """(module to call, optimizer) for one shard mode; with ``tp`` > 1 and zero2/zero3, a 2-D mesh
    (world / tp data-parallel x tp tensor-parallel): tensor parallelism inside, FSDP2 across.
    ``layers``: the FSDP units (default: ``decoder_layers(module)``)."""
    if shard in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(module)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        if shard == "ddp":
            return wrapped, make_optimizer(trainable, optimizer, lr)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return wrapped, ZeroRedundancyOptimizer(trainable, optimizer_class=_optimizer_class(optimizer), lr=lr,
                                                **_optimizer_kwargs(optimizer))
    if shard in ("zero2", "zero3"):
        from torch.distributed.fsdp import fully_shard
        mesh = None
        if tp > 1:
            from torch.distributed.device_mesh import init_device_mesh
            mesh2d = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
            tensor_parallel(module, tp, mesh2d["tp"])
            mesh = mesh2d["dp"]
        reshard = False if shard == "zero2" else None      # None: True per layer, False for the root
        for layer in layers if layers is not None else decoder_layers(module):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
        return module, make_optimizer([p for p in module.parameters() if p.requires_grad], optimizer, lr)
    if shard == "tp":
        tensor_parallel(module, world)
        return module, make_optimizer([p for p in module.parameters() if p.requires_grad], optimizer, lr)
    raise ValueError(f"unknown shard mode {shard!r}")


def _optimizer_class(name: str):
    return torch.optim.AdamW if name == "adamw" else torch.optim.SGD


def _optimizer_kwargs(name: str) -> dict:
    if name == "adamw":
        return {"foreach": False}
    from costlens.measure.step import SGD_MOMENTUM
    return {"foreach": False, "momentum": SGD_MOMENTUM if name == "sgd-momentum" else 0.0}


def tensor_parallel(module: nn.Module, world: int, mesh=None) -> None:
    """Column-parallel q, k, v, gate, up; row-parallel o, down (LoRA: the base weight and the
    adapter's outer matrix split, the inner one replicated); attention runs heads/T local heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
    plan = {}
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLWISE + ROWWISE:
            continue
        colwise = leaf in COLWISE
        if hasattr(child, "base_layer"):               # a PEFT LoRA linear
            plan[f"{name}.base_layer"] = ColwiseParallel() if colwise else RowwiseParallel()
            inner, outer = f"{name}.lora_A.default", f"{name}.lora_B.default"
            plan[outer if colwise else inner] = ColwiseParallel() if colwise else RowwiseParallel()
        else:
            plan[name] = ColwiseParallel() if colwise else RowwiseParallel()
    parallelize_module(module, mesh, plan)
    for child in module.modules():
        cfg = getattr(child, "cfg", None)
        if hasattr(child, "q_proj") and cfg is not None:
            if cfg.heads % world or cfg.kv_heads % world:
                raise ValueError(f"tensor parallel {world}: {cfg.heads} heads / {cfg.kv_heads} kv heads do not split")
            child.cfg = SimpleNamespace(heads=cfg.heads // world, kv_heads=cfg.kv_heads // world,
                                        head_dim=cfg.head_dim, hidden=cfg.hidden)


def optimizer_state(opt) -> list[torch.Tensor]:
    """This rank's optimizer state tensors (ZeroRedundancyOptimizer: its local optimizer's)."""
    local = getattr(opt, "optim", opt)
    return [v for state in local.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
