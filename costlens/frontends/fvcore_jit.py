"""The second PyTorch front end: fvcore's scoped TorchScript trace -> the graph IR.

Isolated in this module because TorchScript is deprecated (STYLE.md). fvcore's
``_get_scoped_trace_graph`` runs the module once under ``torch.jit``'s tracer (on the meta
device: no weights) and records every op with its module path. TorchScript records
concrete sizes, so the module is traced twice, at (batch, seq) = (2, 16) and (3, 20): a dim
that changes between the traces is symbolic and is solved for as c·batch, c·seq,
c·batch·seq, ... (a dim that fits no form stays unknown and is reported, never guessed).
Ops go through the same lowering rules as the torch.export front end (``aten.py``).

Limits: tracing runs the module eagerly, so code that reads tensor values (transformers'
mask code calls ``.item()``) cannot be traced on the meta device — use the default
``torch.export`` front end for transformers models.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from costlens.frontends.aten import Call, lower
from costlens.frontends.irbuild import Builder, Sym, Value, finish
from costlens.frontends.torch_export import TraceError, traced_canonical, first_line, quiet, device_of, evaluating
from costlens.ir import Graph

EXAMPLES = ((2, 16), (3, 20))            # (batch, seq) of the two traces; seq/batch ratios differ
_FORMS = ((1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0))     # batch^i * seq^j
_DTYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Double": "float64", "Long": "int64",
           "Int": "int32", "Bool": "bool", "Byte": "uint8", "Char": "int8", "Short": "int16"}
_SYM_ARITH = {"aten::mul": "sym.mul", "aten::add": "sym.add", "aten::sub": "sym.sub",
              "aten::floor_divide": "sym.floordiv", "aten::div": "sym.floordiv", "aten::remainder": "sym.mod"}


def load_fvcore(model, example_inputs=None, *, source: str = "module") -> Graph:
    """Trace ``model`` (an nn.Module or a transformers config) with fvcore's JIT tracer."""
    if hasattr(model, "model_type") and not hasattr(model, "forward"):
        from costlens.frontends.hf_config import build_model
        model = build_model(model, source)
    if not isinstance(model, nn.Module):
        raise TraceError(f"{source}: expected a torch.nn.Module, got {type(model).__name__}")
    # TorchScript runs the module: on the meta device nothing is computed; a module with
    # real weights runs for real where it is (small modules), and is left as it was.
    device = device_of(model)
    inputs = [_inputs_at(example_inputs, batch, seq, device) for batch, seq in EXAMPLES]
    with quiet(), traced_canonical(model), evaluating(model):
        graphs = [_trace(model, args, source) for args in inputs]
    return _Converter(model, graphs, source).run(len(inputs[0]))


def _inputs_at(example_inputs, batch: int, seq: int, device) -> tuple:
    """The example inputs resized to (batch, seq) in their first two dims (token ids by default)."""
    if example_inputs is None:
        return (torch.zeros(batch, seq, dtype=torch.long, device=device),)
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if isinstance(example_inputs, dict):
        raise TraceError("the fvcore tracer takes positional example inputs only")
    lead = tuple(next(t for t in items if isinstance(t, torch.Tensor)).shape[:2])
    resized = []
    for item in items:
        if isinstance(item, torch.Tensor):
            shape = [(batch, seq)[i] if i < 2 and size == lead[i] else size for i, size in enumerate(item.shape)]
            item = torch.zeros(shape, dtype=item.dtype, device=device)
        resized.append(item)
    return tuple(resized)


def _trace(model: nn.Module, args: tuple, source: str):
    from fvcore.nn.jit_analysis import _get_scoped_trace_graph, _named_modules_with_dup
    aliases: dict = {}
    for name, module in _named_modules_with_dup(model):
        aliases.setdefault(module, name)
    try:
        return _get_scoped_trace_graph(model, args, aliases)
    except Exception as e:  # noqa: BLE001 - reported in one line
        raise TraceError(f"{source}: TorchScript tracing (fvcore) could not run the model on the meta device "
                         f"({type(e).__name__}: {first_line(e)})") from e


def solve_dim(a: int, b: int):
    """The dim whose sizes were ``a`` and ``b`` in the two traces, as an expression."""
    if a == b:
        return a
    (b0, s0), (b1, s1) = EXAMPLES
    for i, j in _FORMS:
        base0, base1 = b0 ** i * s0 ** j, b1 ** i * s1 ** j
        if a % base0 == 0 and a // base0 * base1 == b:
            factors = ["batch"] * i + ["seq"] * j
            coefficient = a // base0
            return "*".join(([str(coefficient)] if coefficient != 1 else []) + factors)
    for name, (x0, x1) in (("seq", (s0, s1)), ("batch", (b0, b1))):
        if a - x0 == b - x1:
            return f"{name} + {a - x0}" if a > x0 else f"{name} - {x0 - a}"
    return f"unknown_{a}_{b}"


class _Converter:
    def __init__(self, model: nn.Module, graphs, source: str):
        from torch.jit._trace import _unique_state_dict
        self.graph, self.other = graphs
        self.state = list(_unique_state_dict(model, keep_vars=True).items())
        self.b = Builder(source)
        self.source = source
        self.values: dict[str, Any] = {}
        self.sizes: dict[str, Any] = {}            # value name -> symbolic dims, from the two traces

    def run(self, n_inputs: int) -> Graph:
        nodes, others = list(self.graph.nodes()), list(self.other.nodes())
        if [n.kind() for n in nodes] != [n.kind() for n in others]:
            raise TraceError(f"{self.source}: the model runs different ops at two sequence lengths; "
                             "use the torch.export tracer")
        inputs = list(self.graph.inputs())
        for value, other in zip(inputs, self.other.inputs()):
            self.sizes[value.debugName()] = self._dims(value, other)
        names = []
        for i, value in enumerate(inputs):
            shape, dtype = self._meta(value)
            if i < n_inputs:
                name = "input_ids" if i == 0 else f"input_{i}"
                self.values[value.debugName()] = self.b.add_input(name, shape, dtype)
                names.append(name)
            else:
                fqn, tensor = self.state[i - n_inputs]
                self.values[value.debugName()] = self.b.add_constant(fqn, tuple(tensor.shape), dtype)
        for node, other in zip(nodes, others):
            for value, twin in zip(node.outputs(), other.outputs()):
                self.sizes[value.debugName()] = self._dims(value, twin)
            self._convert(node)
        outputs = [v for v in _flatten(self._value(o) for o in self.graph.outputs()) if isinstance(v, Value)]
        if not outputs:
            raise TraceError(f"{self.source}: the traced model returns no tensor")
        return finish(self.b.graph(names, [v.name for v in outputs]))

    # ------------------------------------------------------------------ metadata
    def _dims(self, value, twin):
        if value.isCompleteTensor() and twin.isCompleteTensor():
            return tuple(solve_dim(a, b) for a, b in zip(value.type().sizes(), twin.type().sizes()))
        return None

    def _meta(self, value) -> tuple:
        dims = self.sizes.get(value.debugName())
        scalar = value.type().scalarType() if hasattr(value.type(), "scalarType") else None
        return dims, _DTYPES.get(scalar or "", "float32")

    def _value(self, value):
        return self.values.get(value.debugName())

    # ------------------------------------------------------------------ nodes
    def _convert(self, node) -> None:
        kind = node.kind()
        outs = list(node.outputs())
        scope = node.scopeName().split("/")[-1]
        args = [self._value(v) for v in node.inputs()]
        result: Any
        if kind == "prim::Constant":
            result = self._constant(node, scope)
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            result = list(args)
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            result = tuple(args[0])
        elif kind in ("prim::NumToTensor", "aten::Int", "aten::ScalarImplicit", "aten::Float", "prim::device",
                      "prim::dtype"):
            result = args[0]
        elif kind == "aten::size" and len(args) == 2:
            dims = self.sizes.get(node.inputsAt(0).debugName())
            dim = dims[args[1]] if dims else None
            result = lower(self.b, Call("aten.sym_size", {"self": args[0], "dim": args[1]}, [dim], scope, "size"))
        elif kind in _SYM_ARITH and any(isinstance(a, Sym) for a in args) and all(
                isinstance(a, (Sym, int)) for a in args[:2]):
            result = lower(self.b, Call(_SYM_ARITH[kind], {"a": args[0], "b": args[1]}, [None], scope, "sym"))
        else:
            result = self._op(node, args, outs, scope)
        if len(outs) == 1:
            self.values[outs[0].debugName()] = result
        else:
            for value, item in zip(outs, result if isinstance(result, (tuple, list)) else [result] * len(outs)):
                self.values[value.debugName()] = item

    def _constant(self, node, scope: str):
        value = node.output()
        if value.type().kind() == "TensorType":
            shape, dtype = self._meta(value)
            return self.b.add_constant(self.b.fresh("const"), tuple(d for d in (shape or ()) if isinstance(d, int)),
                                       dtype)
        return value.toIValue()

    def _op(self, node, args, outs, scope: str):
        schema_text = node.schema()
        if schema_text == "(no schema)":
            return lower(self.b, Call(node.kind().replace("::", "."), {f"a{i}": a for i, a in enumerate(args)},
                                      [self._meta(o) for o in outs], scope, node.kind().split("::")[-1]))
        schema = torch._C.parse_schema(schema_text)
        namespace, _, name = schema.name.partition("::")
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]
        bound = {spec.name: value for spec, value in zip(schema.arguments, args)}
        out_meta = []
        for value in outs:
            kind = value.type().kind()
            out_meta.append(self._meta(value) if kind == "TensorType" else None)
        if len(outs) == 1 and outs[0].type().kind() == "ListType":
            out_meta = self._list_outputs(node)
        return lower(self.b, Call(f"{namespace}.{name}", bound, out_meta, scope, name))

    def _list_outputs(self, node):
        """Split-like ops return a list: the shapes of its unpacked items."""
        for user in node.output().uses():
            if user.user.kind() == "prim::ListUnpack":
                return [self._meta(v) for v in user.user.outputs()]
        return []


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item
