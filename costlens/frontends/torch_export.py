"""PyTorch front end: a module traced with ``torch.export`` on the meta device -> the graph IR.

No weight is ever materialized: costlens builds modules on the meta device, and a module
with real weights is traced where it is (non-strict export runs on fake tensors, so nothing
is computed and the caller's module is left as it was); ``torch.export`` records every op
with its symbolic output shape. The token input's two dims are traced as dynamic and
named ``batch`` and ``seq``. Parameters become constants named by their module path
(``layers.0.self_attn.q_proj.weight``), buffers and lifted constants too (the role locator
decides which are parameters); each node keeps its module path as ``scope``.

Every op is lowered to canonical ONNX op kinds by the rules in ``aten.py`` — the IR is the
one the ONNX front end builds for the same module. Higher-order ops (``no_grad`` and
autocast regions) are inlined; nodes that do not reach an output are dropped, as an ONNX
export drops them. Mixture-of-experts modules of transformers are traced in their
dense-dispatch form, the form costlens prices, and activations transformers writes out in
Python (GPT-2's ``gelu_new``) as their one torch op (``canonical.canonical_forms``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
import re
import sys
import warnings
from typing import Any

import torch
from torch import nn

from costlens.errors import CostlensError
from costlens.frontends.aten import Call, lower
from costlens.frontends.irbuild import Builder, Value, dtype_name, finish, print_dim
from costlens.ir import BATCH, SEQ, Graph

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16
_SYM_FUNCTIONS = {operator.add: "sym.add", operator.sub: "sym.sub", operator.mul: "sym.mul",
                  operator.floordiv: "sym.floordiv", operator.truediv: "sym.truediv", operator.mod: "sym.mod",
                  operator.neg: "sym.neg", torch.sym_max: "sym.max", torch.sym_min: "sym.min"}
_PASS_FUNCTIONS = {torch.sym_int, torch.sym_float}


class TraceError(CostlensError):
    """The model could not be traced (torch.export failed, or the trace lost batch/seq)."""


class SourceError(CostlensError):
    """An import spec that does not lead to a module factory."""


# --------------------------------------------------------------------------- sources

def module_from_spec(spec: str, device: str = "meta"):
    """``package.module:factory`` -> (module, example inputs or None). The factory runs under
    ``torch.device("meta")`` so that a big model is never materialized (validation asks for
    real weights on the CPU instead); the current folder is importable, as for ``python -m``."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise SourceError(f"{spec}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise SourceError(f"{spec}: importing {module_name!r} failed ({type(e).__name__}: {first_line(e)})") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SourceError(f"{spec}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SourceError(f"{spec}: {attribute!r} is not callable (expected a factory returning an nn.Module)")
    try:
        with torch.device(device):
            result = target()
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{spec}: the factory raised {type(e).__name__}: {first_line(e)}") from e
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result
    if isinstance(result, nn.Module):
        return result, None
    raise SourceError(f"{spec}: the factory returned a {type(result).__name__}, not an nn.Module "
                      f"(or a (module, example_inputs) pair)")


# --------------------------------------------------------------------------- tracing

def load_torch(module: nn.Module, example_inputs=None, *, source: str | None = None) -> Graph:
    """Trace ``module`` on the meta device and build the graph IR (no weights are read)."""
    source = source or type(module).__name__
    program = export_program(module, example_inputs, source=source)
    return graph_from_program(program, source)


def example_args(example_inputs, device="meta") -> tuple[tuple, dict]:
    """(args, kwargs) on ``device`` (the module's); default: token ids [2, 16]."""
    if example_inputs is None:
        example_inputs = (torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long),)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def device_of(module: nn.Module):
    """Where the module's parameters live (meta for costlens' own builds)."""
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("meta")


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module.eval()`` for the trace, the caller's mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def dynamic_shapes(args: tuple, kwargs: dict):
    """Dims 0 and 1 of every tensor input that has the token input's batch and seq sizes."""
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        raise TraceError("the example inputs hold no tensor")
    lead = tuple(tensors[0].shape[:2])

    def spec(x):
        if not isinstance(x, torch.Tensor):
            return None
        return {i: torch.export.Dim.DYNAMIC for i, size in enumerate(x.shape[:2]) if i < len(lead) and size == lead[i]}
    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def export_program(module: nn.Module, example_inputs=None, *, source: str = "module"):
    """``torch.export.export`` on the meta device with dynamic batch and seq."""
    if not isinstance(module, nn.Module):
        raise TraceError(f"{source}: expected a torch.nn.Module, got {type(module).__name__}")
    # A module with real weights is traced where it is: non-strict export runs on fake
    # tensors, so nothing is computed and the caller's module is left as it was.
    args, kwargs = example_args(example_inputs, device_of(module))
    dyn_args, dyn_kwargs = dynamic_shapes(args, kwargs)
    dynamic = {**_by_name(module, dyn_args), **dyn_kwargs} if kwargs else dyn_args
    with quiet(), traced_canonical(module), evaluating(module):
        try:
            program = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # noqa: BLE001 - any tracing failure is the model's, reported in one line
            raise TraceError(f"{source}: torch.export could not trace the model ({type(e).__name__}: "
                             f"{first_line(e)})") from e
    _check_dynamic(program, source)
    if _writes_into_views(program):
        # ``t[..., :n].copy_(x)`` (DeepSeek's MLA keys) mutates a view: only the functional form
        # (slice_scatter) keeps that data flow in the graph.
        with quiet():
            program = program.run_decompositions({})
    return program


def _writes_into_views(program) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "_schema", None) is not None
               and n.target._schema.name == "aten::copy_" for n in program.graph.nodes)


def _by_name(module: nn.Module, dyn_args: tuple) -> dict:
    import inspect
    names = [p for p in inspect.signature(module.forward).parameters]
    return dict(zip(names, dyn_args))


def first_line(error: Exception) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name: what
    one-line errors quote of a failure in torch or in the user's code."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _check_dynamic(program, source: str) -> None:
    first = next((n for n in program.graph.nodes if n.op == "placeholder"
                  and n.name in program.graph_signature.user_inputs), None)
    val = first.meta.get("val") if first is not None else None
    if isinstance(val, torch.Tensor) and val.dim() >= 2:
        fixed = [name for name, d in zip((BATCH, SEQ), val.shape[:2]) if isinstance(d, int)]
        if fixed:
            raise TraceError(f"{source}: the trace fixed {' and '.join(fixed)} to the example's size "
                             f"(the model branches on it); costlens needs them symbolic")


@contextlib.contextmanager
def quiet():
    """Tracing is chatty (warnings, transformers' logger); the library never prints."""
    previous = logging.root.manager.disable
    # torch.export prints the partial graph of a failed trace to sys.stderr itself
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


@contextlib.contextmanager
def traced_canonical(module: nn.Module):
    """``canonical.canonical_forms`` around a trace when transformers is loaded (a module that
    is not a transformers model needs no patch, and transformers is not imported for it)."""
    if "transformers" not in sys.modules:
        yield
        return
    from costlens.frontends.canonical import canonical_forms
    with canonical_forms(module):
        yield


# --------------------------------------------------------------------------- conversion

def graph_from_program(program, source: str) -> Graph:
    """The IR of an ExportedProgram: every op lowered, dead nodes dropped."""
    signature = program.graph_signature
    builder = Builder(source)
    converter = _Converter(builder, program.graph_module, _symbol_names(program))
    constants = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                 **signature.inputs_to_lifted_tensor_constants}
    inputs = []
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if node.name in constants:
            shape = converter.shape(val)
            if any(not isinstance(d, int) for d in shape):
                raise TraceError(f"{source}: parameter {constants[node.name]!r} has a symbolic shape {shape}")
            converter.values[node.name] = builder.add_constant(constants[node.name], shape, dtype_name(val.dtype))
        elif isinstance(val, torch.Tensor):
            converter.values[node.name] = builder.add_input(node.name, converter.shape(val), dtype_name(val.dtype))
            inputs.append(node.name)
        else:
            converter.values[node.name] = val
    outputs = converter.run(program.graph)
    kinds = [spec.kind.name for spec in signature.output_specs]
    user = [v for kind, v in zip(kinds, outputs) if kind == "USER_OUTPUT" and isinstance(v, Value)]
    if not user:
        raise TraceError(f"{source}: the traced model returns no tensor")
    return finish(builder.graph(inputs, [v.name for v in user]))


def _symbol_names(program) -> dict[str, str]:
    """The token input's dims are ``batch`` and ``seq``; other symbols keep their names."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                names = {}
                for label, dim in zip((BATCH, SEQ), val.shape[:2]):
                    if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                        names[dim.node.expr.name] = label
                return names
    return {}


class _Converter:
    def __init__(self, builder: Builder, graph_module, names: dict[str, str]):
        self.b = builder
        self.module = graph_module
        self.names = names
        self.values: dict[str, Any] = {}

    # ------------------------------------------------------------------ metadata
    def dim(self, d):
        if isinstance(d, int):
            return d
        expr = d.node.expr
        return int(expr) if expr.is_number else print_dim(expr, self.names)

    def shape(self, val) -> tuple:
        return tuple(self.dim(d) for d in val.shape)

    def meta(self, val) -> list:
        if isinstance(val, torch.Tensor):
            return [(self.shape(val), dtype_name(val.dtype))]
        if isinstance(val, (list, tuple)):
            return [self.meta(v)[0] if isinstance(v, torch.Tensor) else None for v in val]
        if isinstance(val, torch.SymInt):
            return [self.dim(val)]
        return []

    # ------------------------------------------------------------------ graph walk
    def run(self, graph) -> list:
        for node in graph.nodes:
            if node.op == "get_attr":
                self.values[node.name] = self._attribute(node)
            elif node.op == "call_function":
                self.values[node.name] = self.call(node)
            elif node.op == "output":
                result = self.arg(node.args[0])
                return list(result) if isinstance(result, (list, tuple)) else [result]
        return []

    def _attribute(self, node):
        target = self.module
        for part in node.target.split("."):
            target = getattr(target, part)
        if isinstance(target, torch.Tensor):
            return self.b.add_constant(node.target, tuple(target.shape), dtype_name(target.dtype))
        return target

    def arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.values.get(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def call(self, node):
        target = node.target
        if target is operator.getitem:
            container = self.arg(node.args[0])
            return None if container is None else container[node.args[1]]
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self._inline(node)
        scope = _scope(node)
        outs = self.meta(node.meta.get("val"))
        if isinstance(target, torch._ops.OpOverload):
            op, args = _op_name(target), _bind(target, self.arg(node.args), self.arg(node.kwargs))
            if op == "aten._grouped_mm":
                self.b.warnings.append(f"{node.name}: aten._grouped_mm outside a transformers experts module is not "
                                       "priced (write the experts in dense-dispatch form or as transformers experts)")
            result = lower(self.b, Call(op, args, outs, scope, node.name))
            if target._schema.name.endswith("_") and not target._schema.name.endswith("__") and node.args:
                first = node.args[0]
                if isinstance(first, torch.fx.Node) and isinstance(result, Value):
                    self.values[first.name] = result       # an in-place op rebinds its operand
            return result
        if target in _PASS_FUNCTIONS:
            return self.arg(node.args[0])
        if target in _SYM_FUNCTIONS:
            args = {f"a{i}": self.arg(a) for i, a in enumerate(node.args)}
            if all(isinstance(v, (int, float)) for v in args.values()):
                return target(*args.values())
            return lower(self.b, Call(_SYM_FUNCTIONS[target], args, outs, scope, node.name))
        if getattr(target, "__module__", "") in ("_operator", "operator") or target in (torch._sym_sqrt,):
            return None                               # guards on symbolic ints (sym bools): no data
        name = getattr(target, "__name__", str(target))
        args = {f"a{i}": self.arg(a) for i, a in enumerate(node.args)}
        return lower(self.b, Call(f"py.{name}", args, outs, scope, node.name))

    def _inline(self, node):
        """no_grad / autocast regions: convert the body with its operands bound."""
        args = list(node.args)
        body_index = next(i for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                          and isinstance(self.values.get(a.name), torch.fx.GraphModule))
        body = self.values[args[body_index].name]
        operands = [self.arg(a) for a in args[body_index + 1:]]
        inner = _Converter(self.b, body, self.names)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for placeholder, value in zip(placeholders, operands):
            inner.values[placeholder.name] = value
        outputs = inner.run(body.graph)
        return tuple(outputs)


def _op_name(target) -> str:
    namespace, _, name = target._schema.name.partition("::")
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]                                # in-place: the functional op
    return f"{namespace}.{name}"


def _bind(target, args, kwargs) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    schema_args = target._schema.arguments
    for i, spec in enumerate(schema_args):
        if i < len(args) and not spec.kwarg_only:
            bound[spec.name] = args[i]
        elif spec.name in kwargs:
            bound[spec.name] = kwargs[spec.name]
        elif spec.has_default_value():
            bound[spec.name] = spec.default_value
    return bound


_BRACKET = re.compile(r"\[(\d+)\]")


def _scope(node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if "empty_nn_module_stack" in path:
        return ""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return _BRACKET.sub(r".\1", path).strip(".")
