"""Building the graph IR from a traced PyTorch program (shared by the torch front ends).

``Builder`` accumulates IR nodes, tensors and constants in topological order; ``Value`` is
a tensor the lowering rules pass around, ``Sym`` a symbolic integer (a dim of some tensor,
e.g. the sequence length) that lives in the graph as a shape-derived scalar, exactly as the
ONNX exporter writes it (``Shape`` → ``Squeeze``), so that stages reading the graph see
shape-derived values where the ONNX front end shows them (position tables, masks).

Dims are printed from sympy expressions over the trace's symbols: the token input's two
dims become ``batch`` and ``seq``; products and quotients keep the form ``batch*seq``.
``finish`` is the last step of every traced graph: canonical forms, then dead nodes dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from costlens.ir import Constant, Graph, Node, Shape, Tensor, frozen_map

# ONNX TensorProto codes of the dtypes a Cast can name (Cast's ``to`` attribute)
ONNX_DTYPE_CODES = {"float32": 1, "uint8": 2, "int8": 3, "int16": 5, "int32": 6, "int64": 7, "bool": 9,
                    "float16": 10, "float64": 11, "bfloat16": 16, "float8e4m3fn": 17, "float8e5m2": 19}
_TORCH_DTYPES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                 "short": "int16", "char": "int8", "byte": "uint8", "float8_e4m3fn": "float8e4m3fn",
                 "float8_e5m2": "float8e5m2"}
INT64_MAX = 2**63 - 1


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the IR's dtype names)."""
    name = str(dtype).removeprefix("torch.")
    return _TORCH_DTYPES.get(name, name)


@dataclass(frozen=True)
class Value:
    """A tensor of the IR: its name, symbolic shape and dtype."""

    name: str
    shape: Shape | None
    dtype: str

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclass
class Sym:
    """A symbolic integer. ``scalar`` is an int64 scalar tensor holding it, ``vector`` the same
    as a 1-element vector (what shape lists concatenate; made on first use); ``dim`` its
    printed expression."""

    scalar: str
    vector: str | None
    dim: Any


@dataclass
class Builder:
    """Accumulates one graph. Names are made unique; constants are deduplicated by value."""

    source: str
    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    constants: dict[str, Constant] = field(default_factory=dict)
    small_values: dict[str, tuple[int, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _taken: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ names
    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    # ------------------------------------------------------------------ tensors
    def add_input(self, name: str, shape: Shape | None, dtype: str) -> Value:
        self._taken.add(name)
        self.tensors[name] = Tensor(name, shape, dtype)
        return Value(name, shape, dtype)

    def add_constant(self, name: str, shape: tuple[int, ...], dtype: str) -> Value:
        self._taken.add(name)
        self.constants[name] = Constant(name=name, shape=tuple(int(d) for d in shape), dtype=dtype)
        return Value(name, tuple(shape), dtype)

    def scalar(self, value, dtype: str) -> Value:
        """A scalar constant (epsilons, exponents, fill values), one per distinct value."""
        name = f"scalar.{dtype}({value!r})"
        if name not in self.constants:
            self.add_constant(name, (), dtype)
            if dtype.startswith("int") and isinstance(value, int):
                self.small_values[name] = (int(value),)
        return Value(name, (), dtype)

    def ints(self, values: Sequence[int]) -> Value:
        """A 1-D int64 constant whose values the IR keeps (axes, shapes, k, split sizes)."""
        values = tuple(int(v) for v in values)
        name = f"ints({','.join(map(str, values))})"
        if name not in self.constants:
            self.add_constant(name, (len(values),), "int64")
            self.small_values[name] = values
        return Value(name, (len(values),), "int64")

    # ------------------------------------------------------------------ nodes
    def node(self, op: str, inputs: Sequence[Value | str | None], outputs: Sequence[tuple[Shape | None, str]],
             attrs: dict | None = None, scope: str = "", base: str | None = None) -> list[Value]:
        """Append a node; ``outputs`` are (shape, dtype) pairs. Returns the output values."""
        base = base or op.split(".")[-1].lower()
        names = [self.fresh(base if i == 0 else f"{base}.{i}") for i in range(len(outputs))]
        for name, (shape, dtype) in zip(names, outputs):
            self.tensors[name] = Tensor(name, None if shape is None else tuple(shape), dtype)
        self.nodes.append(Node(
            name=self.fresh(f"node_{base}"), op=op,
            inputs=tuple(_name_of(x) for x in inputs), outputs=tuple(names),
            attrs=frozen_map(attrs or {}), scope=scope,
        ))
        return [Value(name, None if shape is None else tuple(shape), dtype)
                for name, (shape, dtype) in zip(names, outputs)]

    def one(self, op: str, inputs: Sequence[Value | str | None], shape: Shape | None, dtype: str,
            attrs: dict | None = None, scope: str = "", base: str | None = None) -> Value:
        return self.node(op, inputs, [(shape, dtype)], attrs, scope, base)[0]

    def graph(self, inputs: Sequence[str], outputs: Sequence[str]) -> Graph:
        tensors = {k: v for k, v in self.tensors.items() if k not in self.constants}
        return Graph(
            nodes=tuple(self.nodes), tensors=frozen_map(tensors), constants=frozen_map(self.constants),
            inputs=tuple(inputs), outputs=tuple(outputs), source=self.source,
            small_values=frozen_map(self.small_values), warnings=tuple(self.warnings),
        )


def _name_of(x: Value | str | None) -> str:
    if x is None:
        return ""
    return x if isinstance(x, str) else x.name


# --------------------------------------------------------------------------- dims

def print_dim(expr, names: dict[str, str]):
    """A sympy expression over trace symbols -> an int or a string such as ``batch*seq``.

    Only + - * // % and integer powers are written (what ``costlens.shapes`` evaluates); any
    other function stays as its sympy text, which evaluates to "unknown", never to a guess."""
    import sympy

    if isinstance(expr, (int,)) or getattr(expr, "is_Integer", False):
        return int(expr)
    text = _expr(expr, names, sympy)
    return text


def _expr(expr, names, sympy) -> str:
    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Symbol:
        return names.get(expr.name, expr.name)
    if expr.is_Add:
        terms = sorted((_expr(a, names, sympy) for a in expr.args), key=_term_order)
        return " + ".join(terms).replace("+ -", "- ")
    if expr.is_Mul:
        factors = sorted((_factor(a, names, sympy) for a in expr.args), key=_term_order)
        if factors and factors[0] == "-1":
            return "-" + "*".join(factors[1:])
        return "*".join(factors)
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
        return "*".join([_factor(expr.base, names, sympy)] * int(expr.exp))
    func = type(expr).__name__
    if func in ("FloorDiv", "CleanDiv", "IntTrueDiv") and len(expr.args) == 2:
        a, b = (_factor(x, names, sympy) for x in expr.args)
        return f"{a}//{b}"
    if func in ("Mod", "PythonMod") and len(expr.args) == 2:
        a, b = (_factor(x, names, sympy) for x in expr.args)
        return f"{a}%{b}"
    return str(expr)


def _factor(expr, names, sympy) -> str:
    text = _expr(expr, names, sympy)
    return f"({text})" if expr.is_Add else text


_ORDER = {"batch": 0, "seq": 1}


def _term_order(text: str):
    """Numbers first, then batch, seq, other symbols: ``2*batch*seq``."""
    if text.lstrip("-").isdigit():
        return (0, text)
    head = text.split("*")[0].strip("()")
    return (1, _ORDER.get(head, 2), text)


# --------------------------------------------------------------------------- passes

def finish(graph: Graph) -> Graph:
    """The canonical passes every traced graph goes through."""
    return prune(fold_flat_linears(graph))


def fold_flat_linears(graph: Graph) -> Graph:
    """Reshape [.., K] -> [n, K], Gemm, Reshape back to [.., N]: one linear on the N-D input,
    written as torch.onnx writes ``nn.Linear`` there (MatMul with the [K, N] weight, + Add of
    the bias). transformers' ``Conv1D`` (GPT-2) runs its linears this way."""
    producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.nodes):
        for x in n.inputs:
            if x:
                consumers.setdefault(x, []).append(i)
    dropped: set[int] = set()
    inserted: dict[int, list[Node]] = {}
    tensors = dict(graph.tensors)
    for i, gemm in enumerate(graph.nodes):
        folded = _flat_linear(graph, i, gemm, producer, consumers)
        if folded is None:
            continue
        flatten, unflatten, x, out_shape = folded
        weight, bias = gemm.inputs[1], (gemm.inputs[2] if len(gemm.inputs) > 2 else "")
        nodes, out = [], graph.nodes[unflatten].outputs[0]
        if gemm.attr("transB", 0):
            w_shape = tuple(reversed(graph.shape(weight)))
            tensors[f"{weight}.T@{gemm.name}"] = Tensor(f"{weight}.T@{gemm.name}", w_shape, graph.dtype(weight))
            nodes.append(Node(f"{gemm.name}.transpose", "Transpose", (weight,), (f"{weight}.T@{gemm.name}",),
                              frozen_map({"perm": (1, 0)}), gemm.scope))
            weight = f"{weight}.T@{gemm.name}"
        product = out if not bias else f"{out}.matmul"
        if bias:
            tensors[product] = Tensor(product, out_shape, graph.dtype(out))
        nodes.append(Node(gemm.name, "MatMul", (x, weight), (product,), frozen_map({}), gemm.scope))
        if bias:
            nodes.append(Node(f"{gemm.name}.bias", "Add", (product, bias), (out,), frozen_map({}), gemm.scope))
        dropped.update((flatten, i, unflatten))
        inserted[i] = nodes
    if not inserted:
        return graph
    nodes = []
    for i, node in enumerate(graph.nodes):
        nodes += inserted.get(i, [])
        if i not in dropped:
            nodes.append(node)
    return replace(graph, nodes=tuple(nodes), tensors=frozen_map(tensors))


def _flat_linear(graph: Graph, index: int, gemm: Node, producer, consumers):
    if gemm.op != "Gemm" or gemm.attr("transA", 0) or gemm.attr("alpha", 1.0) != 1.0 or gemm.attr("beta", 1.0) != 1.0:
        return None
    flatten = producer.get(gemm.inputs[0])
    users = consumers.get(gemm.outputs[0], [])
    if flatten is None or len(users) != 1 or consumers.get(gemm.inputs[0]) != [index]:
        return None
    unflatten = users[0]
    if graph.nodes[flatten].op != "Reshape" or graph.nodes[unflatten].op != "Reshape":
        return None
    x = graph.nodes[flatten].inputs[0]
    x_shape, out_shape = graph.shape(x), graph.shape(graph.nodes[unflatten].outputs[0])
    gemm_shape = graph.shape(gemm.outputs[0])
    if not x_shape or not out_shape or not gemm_shape or len(x_shape) < 3:
        return None
    if tuple(out_shape[:-1]) != tuple(x_shape[:-1]) or out_shape[-1] != gemm_shape[-1]:
        return None
    return flatten, unflatten, x, out_shape


# --------------------------------------------------------------------------- pruning

def prune(graph: Graph) -> Graph:
    """Drop nodes whose outputs reach no graph output, and constants nothing reads except
    named module tensors (parameters and buffers are kept for the record)."""
    needed = set(graph.outputs)
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs if o):
            kept.append(node)
            needed.update(x for x in node.inputs if x)
    kept.reverse()
    produced = {o for n in kept for o in n.outputs}
    tensors = {k: v for k, v in graph.tensors.items() if k in produced or k in graph.inputs}
    constants = {k: v for k, v in graph.constants.items()
                 if k in needed or not (k.startswith(("scalar.", "ints(")) or k.startswith("reshape_target"))}
    small = {k: v for k, v in graph.small_values.items() if k in constants}
    return replace(graph, nodes=tuple(kept), tensors=frozen_map(tensors), constants=frozen_map(constants),
                   small_values=frozen_map(small))
