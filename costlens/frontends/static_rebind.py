"""The re-binding machinery behind static_shapes.rebind: axis tags propagated over a static
graph, the constants they reach rewritten from the token input's shape, the result checked.

Internal to the ONNX front end (static_shapes.py is the interface). The method is described in
static_shapes' docstring; here: one rule per op family, each 3-20 lines.
"""
from __future__ import annotations


class NotRebindable(Exception):
    """Why a static graph cannot be re-bound (internal: the caller keeps the static graph)."""


# a tag: the ordered factors of an axis, each an int or "b" / "s" (the batch and seq dims), with at
# least one of those; an untagged axis is None. Order matters only to split a merged axis back.
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And",
    "Or", "Not", "Xor", "Neg", "Sqrt", "Reciprocal", "Cast", "Sigmoid", "Tanh", "Relu", "Gelu", "Erf", "Exp", "Log",
    "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Max", "Min", "Clip", "Abs", "Cos", "Sin", "Identity", "Dropout",
    "Softplus", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Mod", "Floor", "Ceil", "Round", "Sign", "BitwiseAnd",
    "BitwiseOr", "BitwiseNot", "CastLike", "Trilu"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
                    "ReduceLogSumExp", "ReduceL1"})
NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})


def monomial(tag) -> tuple[int, int, int] | None:
    """(coefficient, exponent of batch, exponent of seq) of a tag: what it means, whatever its order."""
    if tag is None:
        return None
    coef = 1
    for f in tag:
        coef *= f if isinstance(f, int) else 1
    return (coef, tag.count("b"), tag.count("s"))


def _as_tag(factors):
    factors = tuple(f for f in factors if f != 1)
    return factors if "b" in factors or "s" in factors else None


class Tagger:
    """Forward propagation of axis tags over a static graph (see the module docstring)."""

    def __init__(self, model, static, shapes: dict, values: dict):
        self.model, self.shapes, self.values = model, shapes, values
        self.constants = set(values) | {t.name for t in model.graph.initializer}
        self.tags: dict[str, tuple] = {}
        self.rewrites: dict[str, tuple] = {}         # constant -> its axes' tags (tables)
        self.entries: dict[str, dict[int, tuple]] = {}   # shape-operand constant -> {entry: monomial}
        self.uses: dict[str, list] = {}      # shape-operand constant -> (node index, input position) reading it so
        self.index = -1
        self.producers = {o: n for n in model.graph.node for o in n.output if o and n.op_type != "Constant"}
        self.size = {"b": static.batch, "s": static.seq}
        self.tags[static.input_name] = (("b",) if static.batch is not None else None,
                                        ("s",) if static.seq is not None else None)

    def tags_of(self, name: str) -> tuple:
        if name in self.tags:
            return self.tags[name]
        shape = self.shapes.get(name)
        if shape is None:
            raise NotRebindable(f"tensor {name!r} has no inferred shape")
        return (None,) * len(shape)

    def run(self) -> None:
        for self.index, node in enumerate(self.model.graph.node):
            if node.op_type == "Constant":
                continue
            if not any(any(t is not None for t in self.tags_of(i)) for i in node.input if i):
                continue            # nothing tagged flows in: the op is shape-independent
            self.visit(node)

    def visit(self, node) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise NotRebindable(f"{node.domain}.{op} {node.name!r} reads a batch/seq-sized tensor")
        if op in ELEMENTWISE:
            self._broadcast(node, [i for i in node.input if i], node.output[0])
        elif op in NORMS:
            self._norm(node)
        elif op in ("MatMul", "Gemm"):
            self._matmul(node)
        elif op == "Gather":
            self._gather(node)
        elif op == "Transpose":
            perm = _attr(node, "perm", None) or tuple(reversed(range(len(self.tags_of(node.input[0])))))
            tags = self.tags_of(node.input[0])
            self.tags[node.output[0]] = tuple(tags[p] for p in perm)
        elif op in ("Unsqueeze", "Squeeze"):
            self._squeeze(node)
        elif op == "Reshape":
            self._reshape(node)
        elif op == "Flatten":
            self._flatten(node)
        elif op == "Expand":
            self._expand(node)
        elif op in REDUCE:
            self._reduce(node)
        elif op in ("Slice", "Split"):
            self._slice(node)
        elif op == "Concat":
            self._concat(node)
        else:
            raise NotRebindable(f"no re-binding rule for {op} {node.name!r} on a batch/seq-sized tensor")

    # -------------------------------------------------------------- rules
    def _out_shape(self, name):
        shape = self.shapes.get(name)
        if shape is None:
            raise NotRebindable(f"tensor {name!r} has no inferred shape")
        return shape

    def _broadcast(self, node, inputs, output) -> None:
        out = self._out_shape(output)
        tags = [None] * len(out)
        for name in inputs:
            shape, its = self._out_shape(name), self.tags_of(name)
            for k in range(1, len(shape) + 1):
                if shape[-k] == out[-k] and its[-k] is not None:
                    tags[-k] = self._agree(tags[-k], its[-k], node)
        self.tags[output] = tuple(tags)
        for name in inputs:
            self._meet(node, name, self.tags[output])

    def _agree(self, a, b, node):
        if a is not None and monomial(a) != monomial(b):
            raise NotRebindable(f"two tags claim one axis at {node.op_type} {node.name!r}")
        return b

    def _meet(self, node, name, out_tags) -> None:
        """An operand on tagged axes of its op: a constant there is rewritten, an untagged
        activation there carries batch or seq by a route no rule follows."""
        shape, its = self._out_shape(name), list(self.tags_of(name))
        changed = False
        for k in range(1, len(shape) + 1):
            want = out_tags[-k] if k <= len(out_tags) else None
            if want is None or shape[-k] == 1 or monomial(its[-k]) == monomial(want):
                continue
            if its[-k] is not None:
                raise NotRebindable(f"two tags claim one axis of {name!r} at {node.op_type} {node.name!r}")
            if name not in self.constants and self.producer(name) is None:
                raise NotRebindable(f"{name!r} into {node.op_type} {node.name!r} is batch/seq-sized by a route "
                                    "the re-binding does not follow")
            its[-k], changed = want, True
        if changed and name in self.constants:
            self._table(name, tuple(its))
        elif changed:             # an elementwise op of constants (an unfolded mask): tag its operands
            self.tags[name] = tuple(its)
            producer = self.producer(name)
            for operand in producer.input:
                if operand:
                    self._meet(producer, operand, self.tags[name])

    def producer(self, name: str):
        """The elementwise node computing ``name`` from untagged operands, or None."""
        node = self.producers.get(name)
        return node if node is not None and node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx") else None

    def _table(self, name, tags) -> None:
        if name in self.uses:
            raise NotRebindable(f"constant {name!r} is both a shape operand and a batch/seq-sized table")
        self.rewrites[name] = tags
        self.tags[name] = tags

    def _norm(self, node) -> None:
        self.tags[node.output[0]] = self.tags_of(node.input[0])
        for extra in node.output[1:]:
            if extra:
                shape = self._out_shape(extra)
                self.tags[extra] = tuple(t if d != 1 else None for t, d in zip(self.tags_of(node.input[0]), shape))

    def _matmul(self, node) -> None:
        a, b = self.tags_of(node.input[0]), self.tags_of(node.input[1])
        if node.op_type == "Gemm":
            a = a[::-1] if _attr(node, "transA", 0) else a
            b = b[::-1] if _attr(node, "transB", 0) else b
            if len(node.input) > 2 and node.input[2] and any(self.tags_of(node.input[2])):
                raise NotRebindable(f"Gemm {node.name!r} adds a batch/seq-sized C")
        if len(a) < 2 or len(b) < 2:
            raise NotRebindable(f"{node.op_type} {node.name!r} on a vector")
        if monomial(a[-1]) != monomial(b[-2]):
            if a[-1] is None and node.input[0] in self.constants or b[-2] is None and node.input[1] in self.constants:
                raise NotRebindable(f"constant operand of {node.op_type} {node.name!r} on a tagged axis")
            raise NotRebindable(f"{node.op_type} {node.name!r} contracts a tagged axis with an untagged one")
        out = self._out_shape(node.output[0])
        lead = [None] * (len(out) - 2)
        for name, its in ((node.input[0], a), (node.input[1], b)):
            shape = self._out_shape(name)
            for k in range(3, len(shape) + 1):
                if shape[-k] == out[-k] and its[-k] is not None:
                    lead[-k + 2] = self._agree(lead[-k + 2], its[-k], node)
        self.tags[node.output[0]] = (*lead, a[-2], b[-1])

    def _gather(self, node) -> None:
        axis = _attr(node, "axis", 0)
        data, idx = self.tags_of(node.input[0]), self.tags_of(node.input[1])
        if axis < 0:
            axis += len(data)
        if data[axis] is not None:
            raise NotRebindable(f"Gather {node.name!r} indexes a batch/seq-sized axis")
        self.tags[node.output[0]] = (*data[:axis], *idx, *data[axis + 1:])

    def _axes(self, node, position: int):
        if len(node.input) > position and node.input[position]:
            if node.input[position] not in self.values or self.values[node.input[position]][1] != "int":
                raise NotRebindable(f"{node.op_type} {node.name!r} takes computed axes")
            return list(self.values[node.input[position]][0])
        return list(_attr(node, "axes", ()) or ())

    def _squeeze(self, node) -> None:
        tags = list(self.tags_of(node.input[0]))
        out = self._out_shape(node.output[0])
        axes = [a + len(out) if a < 0 else a for a in self._axes(node, 1)] if node.op_type == "Unsqueeze" else \
            [a + len(tags) if a < 0 else a for a in self._axes(node, 1)]
        if node.op_type == "Unsqueeze":
            for a in sorted(axes):
                tags.insert(a, None)
        else:
            axes = axes or [i for i, d in enumerate(self._out_shape(node.input[0])) if d == 1]
            tags = [t for i, t in enumerate(tags) if i not in axes]
        self.tags[node.output[0]] = tuple(tags)

    def _regroup(self, node, in_shape, in_tags, out_shape) -> list:
        """Tags of a reshape's output: the finest common grouping of the two shapes by their
        products (row-major order is kept); a group maps to one output axis, or splits a
        monomial that has exactly one way to fall on the output axes' values."""
        tags, i, j = [], 0, 0
        while i < len(in_shape) or j < len(out_shape):
            gi, gj = [i], [j]
            pi = in_shape[i] if i < len(in_shape) else 1
            pj = out_shape[j] if j < len(out_shape) else 1
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    pi *= in_shape[i]; gi.append(i); i += 1
                else:
                    pj *= out_shape[j]; gj.append(j); j += 1
            factors = []
            for k in gi:
                if k < len(in_shape):
                    factors.extend(in_tags[k] if in_tags[k] is not None else (in_shape[k],))
            gj = [k for k in gj if k < len(out_shape)]
            tags.extend(self._split(node, factors, [out_shape[k] for k in gj]))
        return tags[:len(out_shape)]

    def _split(self, node, factors, dims) -> list:
        """The factors of a group laid on the output axes in order (an int factor may split)."""
        if not any(isinstance(f, str) for f in factors):
            return [None] * len(dims)
        factors, tags, k = [f for f in factors if f != 1], [], 0
        for dim in dims:
            group, product = [], 1
            while product < dim:
                if k >= len(factors):
                    raise NotRebindable(f"Reshape {node.name!r} regroups a batch/seq-sized axis ambiguously")
                f = factors[k]
                value = self.size[f] if isinstance(f, str) else f
                if dim % (product * value) == 0:
                    group.append(f)
                    product, k = product * value, k + 1
                elif isinstance(f, int) and f % (dim // product) == 0 and dim % product == 0:
                    group.append(dim // product)
                    factors[k], product = f // (dim // product), dim
                else:
                    raise NotRebindable(f"Reshape {node.name!r} splits a batch/seq-sized axis")
            tags.append(_as_tag(group))
        if any(f != 1 for f in factors[k:]):
            raise NotRebindable(f"Reshape {node.name!r} regroups a batch/seq-sized axis ambiguously")
        return tags

    def _reshape(self, node) -> None:
        in_shape, out_shape = self._out_shape(node.input[0]), self._out_shape(node.output[0])
        tags = self._regroup(node, in_shape, self.tags_of(node.input[0]), out_shape)
        self.tags[node.output[0]] = tuple(tags)
        self._target(node, node.input[1], tags, right_aligned=False)

    def _target(self, node, name, tags, right_aligned: bool) -> None:
        """A shape operand's entries on tagged output axes are rewritten (0 and -1 copy or infer)."""
        if not any(t is not None for t in tags):
            return
        if name not in self.values or self.values[name][1] != "int":
            raise NotRebindable(f"{node.op_type} {node.name!r} has a computed shape operand")
        entries = self.values[name][0]
        offset = len(tags) - len(entries) if right_aligned else 0
        wanted = self.entries.setdefault(name, {})
        self.uses.setdefault(name, []).append((self.index, list(node.input).index(name)))
        for index, value in enumerate(entries):
            tag = tags[index + offset] if 0 <= index + offset < len(tags) else None
            if tag is None or value in (0, -1) or (right_aligned and value == 1):
                continue
            if wanted.get(index, monomial(tag)) != monomial(tag):
                raise NotRebindable(f"shape constant {name!r} is read with two meanings")
            wanted[index] = monomial(tag)

    def _flatten(self, node) -> None:
        in_shape, out_shape = self._out_shape(node.input[0]), self._out_shape(node.output[0])
        self.tags[node.output[0]] = tuple(self._regroup(node, in_shape, self.tags_of(node.input[0]), out_shape))

    def _expand(self, node) -> None:
        shape, its = self._out_shape(node.input[0]), self.tags_of(node.input[0])
        out = self._out_shape(node.output[0])
        tags = [None] * len(out)
        for k in range(1, len(shape) + 1):
            if shape[-k] == out[-k]:
                tags[-k] = its[-k]
        self.tags[node.output[0]] = tuple(tags)
        self._target(node, node.input[1], tags, right_aligned=True)

    def _reduce(self, node) -> None:
        tags = self.tags_of(node.input[0])
        axes = [a + len(tags) if a < 0 else a for a in self._axes(node, 1)] or list(range(len(tags)))
        if any(tags[a] is not None for a in axes):
            raise NotRebindable(f"{node.op_type} {node.name!r} reduces a batch/seq-sized axis")
        keep = _attr(node, "keepdims", 1)
        self.tags[node.output[0]] = tuple(None if i in axes else t for i, t in enumerate(tags) if keep or i not in axes)

    def _slice(self, node) -> None:
        shape, its = self._out_shape(node.input[0]), self.tags_of(node.input[0])
        for output in node.output:
            out = self._out_shape(output)
            for d_in, d_out, tag in zip(shape, out, its):
                if tag is not None and d_in != d_out:
                    raise NotRebindable(f"{node.op_type} {node.name!r} cuts a batch/seq-sized axis")
            self.tags[output] = tuple(its)

    def _concat(self, node) -> None:
        axis = _attr(node, "axis", 0)
        out = self._out_shape(node.output[0])
        axis = axis + len(out) if axis < 0 else axis
        tags = [None] * len(out)
        for name in node.input:
            its = self.tags_of(name)
            if its[axis] is not None:
                raise NotRebindable(f"Concat {node.name!r} joins along a batch/seq-sized axis")
            for k, tag in enumerate(its):
                if tag is not None:
                    tags[k] = self._agree(tags[k], tag, node)
        self.tags[node.output[0]] = tuple(tags)
        for name in node.input:
            self._meet(node, name, tuple(t if k != axis else None for k, t in enumerate(tags)))


def _attr(node, name, default):
    import onnx
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def static_facts(model) -> tuple[dict, dict]:
    """({tensor: concrete shape}, {constant: (int values or None, "int" | "other")}) of a static model."""
    from onnx import TensorProto, numpy_helper

    from costlens.frontends.onnx_proto import constant_node_value, external_location, infer_shapes
    inferred = infer_shapes(model, [])
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    values = {}
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], constant_node_value(n)) for n in model.graph.node if n.op_type == "Constant" and n.output]
    for name, tensor in tensors:
        if tensor is None:
            continue
        shapes[name] = tuple(int(d) for d in tensor.dims)
        integer = tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
        small = integer and len(tensor.dims) <= 1 and external_location(tensor) is None
        values[name] = (tuple(int(v) for v in numpy_helper.to_array(tensor).reshape(-1)) if small else None,
                        "int" if small else "other")
    return shapes, values


class _Prelude:
    """Nodes at the head of the rebound graph computing batch / seq monomials from the token
    input's shape (``Shape`` -> ``Slice`` -> ``Mul``), as dynamic exports compute them."""

    def __init__(self, static):
        self.static, self.nodes, self.initializers, self.made = static, [], [], {}

    def _const(self, values) -> str:
        from onnx import numpy_helper
        import numpy as np
        name = f"costlens.static.c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def _node(self, op, inputs, **attrs) -> str:
        import onnx
        name = f"costlens.static.{op.lower()}{len(self.nodes)}"
        self.nodes.append(onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def dim(self, which: str) -> str:
        if "shape" not in self.made:
            self.made["shape"] = self._node("Shape", [self.static.input_name])
        if which not in self.made:
            index = 0 if which == "b" else 1
            self.made[which] = self._node("Slice", [self.made["shape"], self._const([index]), self._const([index + 1])])
        return self.made[which]

    def monomial(self, mono) -> str:
        """A [1] int64 tensor holding coef * batch^i * seq^j."""
        if mono not in self.made:
            coef, nb, ns = mono
            factors = [self.dim("b")] * nb + [self.dim("s")] * ns
            current = factors[0]
            for factor in factors[1:]:
                current = self._node("Mul", [current, factor])
            if coef != 1:
                current = self._node("Mul", [current, self._const([coef])])
            self.made[mono] = current
        return self.made[mono]

    def vector(self, entries) -> str:
        """A shape vector: ints stay constants, monomials are computed."""
        parts = [self.monomial(e) if isinstance(e, tuple) else self._const([e]) for e in entries]
        return self._node("Concat", parts, axis=0)


def rewrite(model, static, tagger: Tagger):
    """A copy of ``model`` whose token input has symbolic batch and seq, and whose constants that
    carry those dims (as ``tagger`` found them) are rebuilt from the input's shape."""
    import onnx
    rebound = onnx.ModelProto()
    rebound.CopyFrom(model)
    graph, prelude = rebound.graph, _Prelude(static)
    produced = {}
    for name, wanted in tagger.entries.items():
        entries = list(tagger.values[name][0])
        for index, mono in wanted.items():
            entries[index] = mono
        produced[name] = prelude.vector(entries)
    for name, uses in tagger.uses.items():
        for index, position in uses:
            graph.node[index].input[position] = produced[name]
    tables = _tables(graph, tagger, prelude)
    kept = [n for n in graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in tables)]
    del graph.node[:]
    graph.node.extend(prelude.nodes + kept)
    kept_init = [t for t in graph.initializer if t.name not in tables]
    del graph.initializer[:]
    graph.initializer.extend(kept_init + prelude.initializers)
    _symbolic_io(graph, static, tagger)
    del graph.value_info[:]
    return rebound


def _tables(graph, tagger: Tagger, prelude: _Prelude) -> set[str]:
    """Each batch/seq-sized constant table becomes ConstantOfShape of its rebound shape: a cost
    depends on a table's shape, never on its values."""
    import onnx
    dtypes = {t.name: t.data_type for t in graph.initializer}
    from costlens.frontends.onnx_proto import constant_node_value
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in tagger.rewrites:
            dtypes[node.output[0]] = constant_node_value(node).data_type
    for name, tags in tagger.rewrites.items():
        shape = tagger.shapes[name]
        entries = [monomial(t) if t is not None else d for d, t in zip(shape, tags)]
        value = onnx.helper.make_tensor("value", dtypes[name], [1], [0])
        prelude.nodes.append(onnx.helper.make_node("ConstantOfShape", [prelude.vector(entries)], [name],
                                                   name=f"costlens.static.table.{name}", value=value))
    return set(tagger.rewrites)


def _symbolic_io(graph, static, tagger: Tagger) -> None:
    """The token input's static dims become ``batch`` / ``seq``; outputs' tagged dims are left to inference."""
    from costlens.ir import BATCH, SEQ
    for value in graph.input:
        if value.name == static.input_name:
            for dim, name, fixed in zip(value.type.tensor_type.shape.dim, (BATCH, SEQ), (static.batch, static.seq)):
                if fixed is not None:
                    dim.dim_param = name
    for value in graph.output:
        for dim, tag in zip(value.type.tensor_type.shape.dim, tagger.tags_of(value.name)):
            if tag is not None:
                dim.Clear()


def check(rebound, static, shapes: dict) -> None:
    """Symbolic shape inference without merging on the rebound graph (a wrong guess meets a
    weight and fails), then every tensor's shape at the exported size equals the static one."""
    import sympy

    from costlens.frontends.onnx_proto import graph_for_inference, symbolic_shape_inference
    import logging
    inference_class = symbolic_shape_inference()
    quiet = logging.getLogger(inference_class.__module__)       # its warnings name what disagrees: we refuse
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        inference = inference_class(2**31 - 1, False, True, 0)
        inference._preprocess(graph_for_inference(rebound))
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as e:  # noqa: BLE001 - any inconsistency refuses the re-binding
        raise NotRebindable(f"the re-bound graph's shapes do not agree ({type(e).__name__})") from None
    finally:
        quiet.setLevel(level)
    if not complete:       # a static dim left beside a symbolic one: a constant no tag reached
        raise NotRebindable("the re-bound graph's shapes do not agree (a batch/seq constant the re-binding missed)")
    at = {sympy.Symbol("batch"): static.batch or 1, sympy.Symbol("seq"): static.seq or 1}
    graph = inference.out_mp_.graph
    for value in list(graph.value_info) + list(graph.output):
        before = shapes.get(value.name)
        if before is None:
            continue
        after = tuple(int(d.dim_value) if d.HasField("dim_value") else _evaluate(d.dim_param, at)
                      for d in value.type.tensor_type.shape.dim)
        if after != before:
            raise NotRebindable(f"tensor {value.name!r} is {list(after)} re-bound at the exported size, "
                                f"{list(before)} as exported")


_EVALUATED: dict = {}


def _evaluate(expression: str, at: dict):
    import sympy
    key = (expression, tuple(sorted((str(k), v) for k, v in at.items())))
    if key not in _EVALUATED:
        try:
            _EVALUATED[key] = int(sympy.sympify(expression).subs(at))
        except (sympy.SympifyError, TypeError, ValueError):
            _EVALUATED[key] = expression
    return _EVALUATED[key]
