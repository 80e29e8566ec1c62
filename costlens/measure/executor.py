"""Run a costlens graph as a trainable torch module, with a plan applied (validation from
an ONNX file alone).

Why not onnx2torch: it maps each initializer to one parameter, so an exporter-deduplicated
initializer (every all-ones norm weight folded into one) becomes one shared parameter, and
the plan's per-use trainability cannot be expressed; it also has no place for LoRA
adapters, stop-gradients or the stacked-FFN rewrite. Executing the IR directly gives each
parameter use its own ``nn.Parameter`` (as the original model had), adapters at the exact
sites the estimator prices, and runs rewritten graphs as they are.

Ops execute as PyTorch's own modules would run them, so autograd saves what a real model
saves: x * sigmoid(x) runs as ``F.silu``, 1 / sqrt(x) as ``torch.rsqrt``, Gemm as
``F.linear``. Op implementations live in ``measure/torch_ops.py``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from costlens.model import Model
from costlens.frontends.onnx import external_location, read_external_tensor
from costlens.gradients import Adapter, StepAnalysis
from costlens.errors import CostlensError
from costlens.measure.torch_ops import OPS, run_op
from costlens.storages import rsqrt_sqrt_outputs, silu_sigmoid_outputs
from costlens.plans import Plan
from costlens.roles.dropout import dropout_points
from costlens.stacking import STACKED_PREFIX

SAFE = re.compile(r"[^0-9A-Za-z_]")


def initializer_values(path: str | Path) -> dict[str, np.ndarray]:
    """Weights of an ONNX file; external data only from inside the model's folder."""
    path = Path(path)
    model = onnx.load_model(str(path), load_external_data=False)
    values = {}
    for tensor in model.graph.initializer:
        location = external_location(tensor)
        if location is not None:
            read_external_tensor(tensor, path.resolve().parent)     # refuses path traversal and bad offsets
        values[tensor.name] = numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


class GraphExecutor(nn.Module):
    """forward(input_ids) -> logits, executing ``model.graph`` with ``analysis``'s plan applied."""

    def __init__(self, model: Model, values: dict[str, np.ndarray], analysis: StepAnalysis, plan: Plan,
                 seed: int = 0):
        super().__init__()
        missing = sorted({n.op for n in model.graph.nodes if n.op not in OPS})
        if missing:
            raise CostlensError(f"cannot run this graph as a torch module: no implementation of {', '.join(missing)}")
        self.graph, self.roles, self.analysis, self.plan = model.graph, model.roles, analysis, plan
        generator = torch.Generator().manual_seed(seed)
        self.params = nn.ParameterDict()
        self._param_of: dict[tuple[int, str], str] = {}        # (site node, constant) -> parameter slot
        index_of = self.graph.node_index
        for use in self.roles.params:
            if use.n_params == 0:                             # a tied use shares its twin's parameter
                continue
            value = _value(values, self.graph.constants[use.constant], generator)
            slot = SAFE.sub("_", use.key)
            self.params[slot] = nn.Parameter(value, requires_grad=use.key in analysis.trainable)
            self._param_of[(index_of[use.site], use.constant)] = slot
        for use in self.roles.params:
            if use.tied_to:
                twin = next(u for u in self.roles.params if u.constant == use.tied_to and u.n_params)
                self._param_of[(index_of[use.site], use.constant)] = SAFE.sub("_", twin.key)
        self._buffers_np = {name: values[name] for name in self.graph.constants if name in values}
        self.adapters = nn.ModuleDict({str(a.site): _LoRA(a, plan, generator) for a in analysis.adapters
                                       if not a.n_experts})
        # LoRA'd 3-D expert tensors, by node and by the input slot that carries each tensor
        constant_of = {u.key: u.constant for u in self.roles.params}
        self.tensor_adapters = nn.ModuleDict({
            SAFE.sub("_", a.key): _LoRA(a, plan, generator, self.graph.constants[constant_of[a.key]].shape)
            for a in analysis.adapters if a.n_experts})
        self._tensor_slots: dict[int, list[tuple[int, str]]] = {}
        for a in analysis.adapters:
            if a.n_experts:
                slot = _slot_of(self.graph, a.site, constant_of[a.key])
                self._tensor_slots.setdefault(a.site, []).append((slot, SAFE.sub("_", a.key)))
        self._silu = silu_sigmoid_outputs(self.graph)
        self._rsqrt = rsqrt_sqrt_outputs(self.graph)
        self._dropped = _dropout_points(model, plan)
        self._producer = self.graph.producer_index
        self._constant_derived = analysis.weights
        self._last_use = _last_uses(self.graph)
        self._claim_paths(index_of)

    def _claim_paths(self, index_of: dict[str, int]) -> None:
        """A parameter reaches its site through nodes that read no data (a Transpose, or a
        Gather by positions for a position table): they read the use's parameter too."""
        consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                consumers.setdefault(name, []).append(index)
        for (site, constant), slot in list(self._param_of.items()):
            frontier = [constant]
            while frontier:
                tensor = frontier.pop()
                for index in consumers.get(tensor, ()):
                    node = self.graph.nodes[index]
                    if index < site and (index, constant) not in self._param_of:
                        self._param_of[(index, constant)] = slot
                        frontier.extend(o for o in node.outputs if o)

    # ------------------------------------------------------------------ constants
    def _constant(self, name: str, site: int) -> torch.Tensor:
        slot = self._param_of.get((site, name))
        if slot is not None:
            return self.params[slot]
        if name not in self._buffers_np:
            raise KeyError(f"no value for constant {name!r}")
        return torch.from_numpy(np.array(self._buffers_np[name]))

    def _derived(self, tensor: str, site: int, env: dict) -> torch.Tensor:
        """A constant-derived input (e.g. a transposed weight), rebuilt from this site's parameter."""
        if tensor in self.graph.constants:
            return self._constant(tensor, site)
        node = self.graph.nodes[self._producer[tensor]]
        args = [self._derived(x, site, env) if x else None for x in node.inputs]
        outputs = run_op(node, args)
        return outputs[node.outputs.index(tensor)]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.graph.inputs[0]: input_ids}
        for index, node in enumerate(self.graph.nodes):
            if all(x in self._constant_derived for x in node.inputs if x):
                continue                                     # evaluated per use, at its site
            if node.op == "Sigmoid" and node.outputs[0] in self._silu:
                continue                                     # runs as silu at its Mul
            if node.op == "Sqrt" and node.outputs[0] in self._rsqrt:
                continue                                     # runs as rsqrt at its Reciprocal
            outputs = self._run(index, node, env)
            for name in node.inputs:
                if name in env and self._last_use.get(name) == index:
                    del env[name]                           # free it as a module's local would be freed
            for name, value in zip(node.outputs, outputs):
                if not name:
                    continue
                if name in self._dropped:
                    value = F.dropout(value, self.plan.dropout, training=True)
                if name in self.analysis.cuts:
                    value = value.detach()
                env[name] = value
        return env[self.graph.outputs[0]]

    def _run(self, index: int, node, env: dict) -> list:
        if node.op == "Mul" and any(x in self._silu for x in node.inputs):
            x = next(x for x in node.inputs if x not in self._silu)
            return [F.silu(env[x])]
        if node.op == "Reciprocal" and node.inputs[0] in self._rsqrt:
            sqrt = self.graph.nodes[self._producer[node.inputs[0]]]
            return [torch.rsqrt(env[sqrt.inputs[0]])]
        args = [None if not x else env[x] if x in env else self._derived(x, index, env) for x in node.inputs]
        for slot, key in self._tensor_slots.get(index, ()):
            args[slot] = self.tensor_adapters[key].merged(args[slot])
        outputs = run_op(node, args)
        adapter = self.adapters[str(index)] if str(index) in self.adapters else None
        if adapter is not None:
            outputs[0] = outputs[0] + adapter(args[0])
        return outputs


class _LoRA(nn.Module):
    """PEFT's LoRA: lora_B(lora_A(dropout(x))) * alpha / r, B initialized to zeros; on a 3-D
    expert tensor, W re-parametrized as W + A·B per expert (PEFT ``target_parameters``)."""

    def __init__(self, adapter: Adapter, plan: Plan, generator: torch.Generator, tensor_shape=None):
        super().__init__()
        if tensor_shape is not None:       # W + A·B must take W's own layout [E, m, n]
            adapter = Adapter(adapter.key, adapter.role, adapter.site, adapter.rank, tensor_shape[1],
                              tensor_shape[2], adapter.n_experts)
        self.n_experts, self.rank = adapter.n_experts, adapter.rank
        self.scale = plan.alpha / adapter.rank
        self.dropout = plan.lora_dropout
        lead = (adapter.n_experts,) if adapter.n_experts else ()
        bound = 1 / math.sqrt(adapter.d_in)
        a_shape = lead + ((adapter.d_in, adapter.rank) if adapter.n_experts else (adapter.rank, adapter.d_in))
        b_shape = lead + ((adapter.rank, adapter.d_out) if adapter.n_experts else (adapter.d_out, adapter.rank))
        self.A = nn.Parameter((torch.rand(a_shape, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(b_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        # PEFT registers a parametrization, which torch evaluates once to check it, then once for use
        torch.baddbmm(weight, self.A, self.B, alpha=self.scale)
        return torch.baddbmm(weight, self.A, self.B, alpha=self.scale)


def _slot_of(graph, site: int, constant: str) -> int:
    """Which input of the site carries this constant (directly or through weight-only ops)."""
    node = graph.nodes[site]
    producers = graph.producers
    for slot, name in enumerate(node.inputs):
        frontier = [name]
        while frontier:
            tensor = frontier.pop()
            if tensor == constant:
                return slot
            if tensor in producers:
                frontier.extend(x for x in producers[tensor].inputs if x)
    raise KeyError(f"{constant!r} does not reach node {node.name!r}")


def _value(values: dict, const, generator: torch.Generator) -> torch.Tensor:
    if const.name in values:
        return torch.from_numpy(np.array(values[const.name], dtype=np.float32))
    original = const.name.split("/", 2)[-1] if const.name.startswith(STACKED_PREFIX) else None
    if original in values and tuple(values[original].shape) == tuple(const.shape):
        return torch.from_numpy(np.array(values[original], dtype=np.float32))   # a stacked copy starts as its model
    # a constant the plan added with a new shape: initialize like nn.Linear / norms would
    shape = const.shape
    if len(shape) == 1:
        return torch.ones(shape)
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(shape[-2] if len(shape) > 1 else 1)


def _last_uses(graph) -> dict[str, int]:
    """The index of the last node reading each tensor (graph outputs are never freed)."""
    last = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name:
                last[name] = index
    for name in graph.outputs:
        last[name] = len(graph.nodes)
    return last


def _dropout_points(model: Model, plan: Plan) -> set[str]:
    """The tensors dropped in training (roles/dropout.py, the places the estimator prices)."""
    if plan.dropout <= 0:
        return set()
    return {point.tensor for point in dropout_points(model.graph, model.roles)}
