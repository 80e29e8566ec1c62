"""ONNX files exported with static shapes (issue 16 item 0).

``torch.onnx.export`` without ``dynamic_shapes=`` (dynamo) or ``dynamic_axes=`` (TorchScript)
writes the example input's batch and seq as fixed dims, and folds them into the graph: reshape
and expand targets, Range limits, ``ConstantOfShape`` sizes, causal-mask and RoPE tables of
[batch, 1, seq, seq] / [1, seq, head_dim], TorchScript's arange tables of position ids. Such a
graph prices one shape only; evaluated "at" another batch or seq it silently returns the export's
numbers. So a static dim is bound to the value it was exported at: the setup defaults to it, and
a different value is refused with the reason.

Where the graph allows it the static dims are re-bound (``symbolize``): the graph is made dynamic
again, so it prices any batch and seq. Values are never matched by number alone: in the exports
of tiny HF models they collide with model sizes (batch 2 = kv heads = the GQA repeat = an
Unsqueeze axis; seq 32 = the kv projection's width). Instead each axis of each tensor carries a
tag, a monomial ``c * batch^i * seq^j``, propagated from the token input op by op (a reshape
regroups its input's axes by their products; a matmul keeps M of its first operand and N of its
second; elementwise ops broadcast). A constant meets a tag only where it sits on a tagged axis of
the op that reads it: a reshape / expand target entry, a mask or RoPE table broadcast against
the activations. Those constants are rebuilt from the token input's shape (``Shape`` ->
``Slice`` -> ``Mul`` -> ``Concat``; tables as ``ConstantOfShape``: their values never change a
cost). An op without a rule on a tagged tensor, a table of integers (TorchScript's folded position
ids, whose values depend on seq), a sliced or concatenated tagged axis, an axis two tags claim, or
an activation of a tagged size that no tag reaches refuses the re-binding, with the reason; the
result is then checked by symbolic shape inference without merging (a wrong guess breaks a
matmul against a weight) and against the static shapes at the exported size.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.errors import PlanError
from costlens.frontends.static_rebind import NotRebindable, Tagger, check, monomial, rewrite, static_facts

REEXPORT_HINT = ("re-export with dynamic shapes: torch.onnx.export(..., dynamo=True, "
                 "dynamic_shapes={'input_ids': {0: 'batch', 1: 'seq'}}), or dynamo=False with "
                 "dynamic_axes={'input_ids': {0: 'batch', 1: 'seq'}}")


@dataclass(frozen=True)
class StaticShape:
    """The fixed dims of a graph's token input (``None``: that dim is symbolic)."""

    input_name: str
    batch: int | None
    seq: int | None

    def describe(self) -> str:
        dims = ", ".join(str(d) if d is not None else name for d, name in ((self.batch, "batch"), (self.seq, "seq")))
        return f"{self.input_name} [{dims}]"


def token_input_static_shape(model) -> StaticShape | None:
    """The static dims of an ``onnx.ModelProto``'s token input: the rank-2 integer graph input a
    Gather reads as indices (the embedding lookup), as the ONNX front end finds it. None when the
    graph has no such input or both its dims are symbolic."""
    from onnx import TensorProto
    initializers = {t.name for t in model.graph.initializer}
    gather_indices = {n.input[1] for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        if value.name in initializers or value.name not in gather_indices:
            continue
        if tensor_type.elem_type not in (TensorProto.INT64, TensorProto.INT32) or len(tensor_type.shape.dim) != 2:
            continue
        fixed = [int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        return StaticShape(value.name, fixed[0], fixed[1]) if any(d is not None for d in fixed) else None
    return None


def static_shape_of_file(path) -> StaticShape | None:
    """``token_input_static_shape`` of an ONNX file (graph only, no weights read)."""
    from costlens.frontends.onnx_proto import read_model
    return token_input_static_shape(read_model(path))


def bind_static(static: StaticShape, batch: int | None, seq: int | None, source: str = "the model",
                not_rebindable: str | None = "") -> tuple[int | None, int | None, dict[str, str]]:
    """(batch, seq, derived defaults) of a setup on a static graph. ``batch`` / ``seq``: the values
    the user chose, None where none was chosen; a static dim fills an unchosen value (recorded in
    the derived defaults). ``not_rebindable``: why the graph cannot be re-bound (``rebindability``;
    None: it can), then a chosen value that differs is refused (PlanError, one line)."""
    derived: dict[str, str] = {}
    wrong = [f"{name} {chosen}" for name, chosen, fixed in (("batch", batch, static.batch), ("seq", seq, static.seq))
             if fixed is not None and chosen is not None and chosen != fixed]
    if wrong and not_rebindable is not None:
        fixed = ", ".join(f"{name} {v}" for name, v in (("batch", static.batch), ("seq", static.seq)) if v is not None)
        why = f" and cannot be re-bound ({not_rebindable})" if not_rebindable else ""
        raise PlanError(f"{source} was exported with static shapes ({static.describe()}){why}: it prices {fixed} "
                        f"only, not {', '.join(wrong)}; {REEXPORT_HINT}")
    note = "re-bound for other values" if not_rebindable is None else "the only one it prices"
    if batch is None and static.batch is not None:
        batch = static.batch
        derived["batch"] = f"{batch}, the ONNX file's static input shape ({static.describe()}; {note})"
    if seq is None and static.seq is not None:
        seq = static.seq
        derived["seq"] = f"{seq}, the ONNX file's static input shape ({static.describe()}; {note})"
    return batch, seq, derived


def unbound_static_shape(graph) -> tuple[StaticShape, str] | None:
    """(static shape, why it could not be re-bound) of an IR Graph whose ONNX token input kept
    static dims after loading (``symbolize`` re-binds the graphs it can, so what is left static
    prices the exported shape only); None for any other graph."""
    notes = [w for w in graph.warnings if w.startswith("static shapes (") and "priced at that shape only" in w]
    if not notes:            # only the ONNX loader's symbolize writes it: other front ends trace symbolic dims
        return None
    gather_indices = {n.inputs[1] for n in graph.nodes if n.op == "Gather" and len(n.inputs) > 1}
    for name in graph.inputs:
        tensor = graph.tensors.get(name)
        if name not in gather_indices or tensor is None or tensor.dtype not in ("int64", "int32"):
            continue
        if tensor.shape is None or len(tensor.shape) != 2:
            continue
        fixed = [d if isinstance(d, int) else None for d in tensor.shape]
        if all(d is None for d in fixed):
            return None
        why = notes[0].split("priced at that shape only (", 1)[-1].removesuffix(")")
        return StaticShape(name, fixed[0], fixed[1]), why
    return None


def bound_shape(graph, batch: int, seq: int | None) -> tuple[int, int | None]:
    """(batch, seq) a setup may price on ``graph``: as given on a dynamic (or re-bound) graph; on a
    static graph that could not be re-bound, an unchosen seq (None) is the export's and a batch or
    seq other than the export's is refused (PlanError naming the shape and the re-export fix)."""
    found = unbound_static_shape(graph)
    if found is None:
        return batch, seq
    static, why = found
    _, seq, _ = bind_static(static, batch, seq, graph.source, why)
    return batch, seq


# --------------------------------------------------------------------------- re-binding

MIN_STATIC = 2      # a dim exported at 1 cannot be told from a broadcast axis


def symbolize(model, warnings: list):
    """The ONNX front end's hook: a model whose token input has static dims, re-bound to
    symbolic ``batch`` / ``seq`` where ``rebind`` can (a note in ``warnings`` either way); any other
    model unchanged."""
    static = token_input_static_shape(model)
    if static is None:
        return model
    try:
        rebound = rebind(model, static)
    except NotRebindable as e:
        warnings.append(f"static shapes ({static.describe()}): priced at that shape only ({e})")
        return model
    warnings.append(f"static shapes ({static.describe()}) re-bound to symbolic batch and seq")
    return rebound


def rebindability(path) -> tuple[StaticShape | None, str | None]:
    """(the static shape of an ONNX file or None, why it cannot be re-bound or None)."""
    from costlens.frontends.onnx_proto import read_model
    model = read_model(path)
    static = token_input_static_shape(model)
    if static is None:
        return None, None
    try:
        rebind(model, static)
    except NotRebindable as e:
        return static, str(e)
    return static, None


def rebind(model, static: StaticShape):
    """A copy of ``model`` whose static batch / seq dims are symbolic, checked (NotRebindable)."""
    small = [d for d in (static.batch, static.seq) if d is not None and d < MIN_STATIC]
    if small:
        raise NotRebindable(f"exported at size {small[0]}, which cannot be told from a broadcast axis")
    if static.batch is None or static.seq is None:
        raise NotRebindable("one input dim is symbolic and one static: only a wholly static input is re-bound")
    try:
        return _rebind(model, static)
    except NotRebindable:
        raise
    except Exception as e:  # noqa: BLE001 - a graph the rules did not foresee: refused, never a traceback
        raise NotRebindable(f"re-binding failed on this graph ({type(e).__name__}: {e})") from None


def _rebind(model, static: StaticShape):
    shapes, values = static_facts(model)
    tagger = Tagger(model, static, shapes, values)
    tagger.run()
    out = model.graph.output[0].name
    meanings = [monomial(t) for t in tagger.tags_of(out)[:2]]
    expected = [(1, 1, 0) if static.batch is not None else None, (1, 0, 1) if static.seq is not None else None]
    if meanings != expected:
        raise NotRebindable(f"the output {out!r} does not follow the input's batch and seq")
    rebound = rewrite(model, static, tagger)
    check(rebound, static, shapes)
    return rebound
