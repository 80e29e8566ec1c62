"""The fuzz corpus of hostile and broken inputs, and the invariant every input must keep.

Imported by ``tests/test_fuzz.py`` (a quick deterministic sample, in-process) and by
``benchmarks/fuzz.py`` (the whole corpus, one subprocess per input with an audit hook on
``open``). Everything is derived from the fixtures in ``fixtures/*.onnx`` and from seeded
``random.Random`` instances (one per case, seeded by the case id), so a case id always
builds the same bytes.

A case writes its input into its own folder ``<root>/<case>/model/`` (the *model's folder*);
``<root>/<case>/outside/`` holds decoys (``secret.bin``, ``doc.json``) that external-data
locations, symlinks and remote code point at. Nothing may ever be opened outside the model's
folder (system and site-packages paths excepted), and no file may appear in ``outside/``.

The invariant (``violations``): exit 0, 1 or 2; no traceback; at most 3 lines of stderr, each
short and free of control characters; an error line that names the cause (never "internal
error" nor "could not analyse the model (SomeError: ...)"); bounded time and memory; every
hostile string escaped in HTML outputs; no output file left by a failing run; the exit code
the case expects (absurd dimensions are refused, remote code is refused).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
FIXTURE_NAMES = tuple(sorted(p.stem for p in FIXTURES.glob("*.onnx")))
BUDGET_SAMPLE = ROOT / "costlens.toml"
SEED = 13
TIMEOUT_SECONDS = 20.0
MAX_STDERR_LINES = 3
MAX_LINE_CHARS = 1000
MAX_RSS_MB = 2048
MEMORY_LIMIT_BYTES = 8 * 2**30      # address space of a subprocess run (torch maps ~2-3 GB at import)
ANY_EXIT = (0, 1, 2)
BAD_INPUT = (2,)

HTML_MARKERS = ("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "\"><svg onload=alert(3)>")
HOSTILE_NAMES = {
    "html": HTML_MARKERS[0],
    "html-attr": HTML_MARKERS[2],
    "ansi": "\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "newlines": "line1\nline2\r\nline3",
    "quotes": "'\"&<>\\",
    "bidi": "abc\u202edcb\u2066",
    "huge": "n" * 1_000_000,
}
GENERIC_ERROR = re.compile(r"internal error|could not analyse the model \([A-Z][A-Za-z]*(Error|Exception|Interrupt)\b")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Invocation:
    """What a built case runs: costlens arguments, and what its outputs must satisfy."""

    argv: tuple[str, ...]
    outputs: tuple[str, ...] = ()       # files (in the model's folder) the command may write
    hostile: tuple[str, ...] = ()       # strings that must never appear raw in those outputs


@dataclass(frozen=True)
class Case:
    id: str                             # family/fixture/variant, stable across runs
    family: str
    description: str
    make: Callable[["Case", Path], Invocation] = field(repr=False, compare=False)
    expect: tuple[int, ...] = ANY_EXIT
    needs_torch: bool = False

    def rng(self) -> random.Random:
        return random.Random(f"{SEED}:{self.id}")

    def build(self, folder: Path) -> Invocation:
        """Write the input into ``folder/model`` (and decoys into ``folder/outside``)."""
        (folder / "model").mkdir(parents=True, exist_ok=True)
        outside = folder / "outside"
        outside.mkdir(exist_ok=True)
        (outside / "secret.bin").write_bytes(b"\x00" * 4096)
        return self.make(self, folder / "model")


@functools.lru_cache(maxsize=None)
def _fixture_bytes(name: str) -> bytes:
    return (FIXTURES / f"{name}.onnx").read_bytes()


@functools.lru_cache(maxsize=None)
def _fixture_proto(name: str) -> onnx.ModelProto:
    return onnx.load_model_from_string(_fixture_bytes(name))


@functools.lru_cache(maxsize=None)
def _graph_only(name: str) -> tuple[bytes, bytes]:
    """The fixture with every weight moved to external data: (model bytes, data bytes)."""
    model = copy.deepcopy(_fixture_proto(name))
    data = bytearray()
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < 256:
            continue
        offset, raw = len(data), tensor.raw_data
        data += raw
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString(), bytes(data)


def _proto(name: str, graph_only: bool) -> onnx.ModelProto:
    if graph_only:
        return onnx.load_model_from_string(_graph_only(name)[0])
    return copy.deepcopy(_fixture_proto(name))


def _save(folder: Path, model: onnx.ModelProto | bytes, graph_only: bool, name: str) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if graph_only:
        (folder / "model.onnx.data").write_bytes(_graph_only(name)[1])
    return path


def _inspect(path: Path) -> Invocation:
    return Invocation(("inspect", str(path)))


# --------------------------------------------------------------------------- raw bytes

def _truncated(case: Case, folder: Path) -> Invocation:
    name, graph_only, cut = case.id.split("/")[1], "graph" in case.id, case.rng()
    data = _graph_only(name)[0] if graph_only else _fixture_bytes(name)
    n = cut.randrange(1, len(data))
    _save(folder, data[:n], graph_only, name)
    return _command(case, folder / "model.onnx")


def _flipped(case: Case, folder: Path) -> Invocation:
    name, graph_only, rng = case.id.split("/")[1], "graph" in case.id, case.rng()
    data = bytearray(_graph_only(name)[0] if graph_only else _fixture_bytes(name))
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    _save(folder, bytes(data), graph_only, name)
    return _command(case, folder / "model.onnx")


def _command(case: Case, path: Path) -> Invocation:
    """Most inputs run `inspect`; every fifth `plan --lora attn`, every seventh `compare --html`."""
    pick = case.rng().randrange(35)
    if pick % 7 == 0:
        return Invocation(("compare", str(path), "--html", str(path.parent / "out.html")), ("out.html",))
    if pick % 5 == 0:
        return Invocation(("plan", str(path), "--lora", "attn", "--seq", "64"))
    return _inspect(path)


# --------------------------------------------------------------------------- protobuf mutations

def _pick(rng: random.Random, items):
    items = list(items)
    return rng.choice(items) if items else None


def _initializer_dim(value):
    def mutate(model, rng):
        tensor = _pick(rng, [t for t in model.graph.initializer if t.dims])
        tensor.dims[rng.randrange(len(tensor.dims))] = value
    return mutate


def _input_dim(value):
    def mutate(model, rng):
        dims = [d for v in model.graph.input for d in v.type.tensor_type.shape.dim]
        dim = _pick(rng, dims)
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    return mutate


def _output_dim(value):
    def mutate(model, rng):
        dims = [d for v in model.graph.output for d in v.type.tensor_type.shape.dim]
        _pick(rng, dims).dim_value = value
    return mutate


def _initializer_dtype(value):
    def mutate(model, rng):
        _pick(rng, model.graph.initializer).data_type = value
    return mutate


def _every_initializer_dtype(value):
    def mutate(model, rng):
        for tensor in model.graph.initializer:
            tensor.data_type = value
    return mutate


def _input_dtype(value):
    def mutate(model, rng):
        for v in model.graph.input:
            v.type.tensor_type.elem_type = value
    return mutate


def _drop_node(model, rng):
    del model.graph.node[rng.randrange(len(model.graph.node))]


def _drop_many(model, rng):
    keep = [n for n in model.graph.node if rng.random() > 0.3]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _duplicate_node(model, rng):
    i = rng.randrange(len(model.graph.node))
    model.graph.node.insert(i + 1, copy.deepcopy(model.graph.node[i]))


def _dangling_input(model, rng):
    node = _pick(rng, [n for n in model.graph.node if n.input])
    node.input[rng.randrange(len(node.input))] = "ghost_" + "x" * rng.choice((1, 100_000))


def _cycle(model, rng):
    nodes = model.graph.node
    i = rng.randrange(len(nodes) // 2)
    j = rng.randrange(i + 1, len(nodes))
    if nodes[i].input and nodes[j].output:
        nodes[i].input[0] = nodes[j].output[0]


def _self_loop(model, rng):
    node = _pick(rng, [n for n in model.graph.node if n.input and n.output])
    node.input[0] = node.output[0]


def _shuffle_nodes(model, rng):
    nodes = list(model.graph.node)
    rng.shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_outputs(model, rng):
    del model.graph.output[:]


def _drop_initializers(model, rng):
    del model.graph.initializer[:]


def _drop_inputs(model, rng):
    del model.graph.input[:]


def _unknown_domain(model, rng):
    _pick(rng, model.graph.node).domain = "evil.example"


def _unknown_op(model, rng):
    node = _pick(rng, model.graph.node)
    node.op_type, node.domain = "NoSuchOp", "evil.example"


def _opset(version, domain=""):
    def mutate(model, rng):
        if domain:
            model.opset_import.append(helper.make_opsetid(domain, version))
        else:
            for opset in model.opset_import:
                opset.version = version
    return mutate


def _no_opset(model, rng):
    del model.opset_import[:]


def _ir_version(value):
    def mutate(model, rng):
        model.ir_version = value
    return mutate


def _attribute_type(model, rng):
    node = _pick(rng, [n for n in model.graph.node if n.attribute])
    attribute = node.attribute[rng.randrange(len(node.attribute))]
    attribute.type = rng.choice((onnx.AttributeProto.STRING, onnx.AttributeProto.FLOATS, onnx.AttributeProto.GRAPH,
                                 onnx.AttributeProto.TENSOR, onnx.AttributeProto.UNDEFINED, 99))


def _attribute_value(model, rng):
    node = _pick(rng, [n for n in model.graph.node if n.attribute])
    attribute = node.attribute[rng.randrange(len(node.attribute))]
    attribute.Clear()
    attribute.CopyFrom(rng.choice((helper.make_attribute(attribute.name or "axis", "text"),
                                   helper.make_attribute(attribute.name or "axis", [1.5, 2.5]),
                                   helper.make_attribute(attribute.name or "axis", 2**62))))


def _drop_attributes(model, rng):
    for node in model.graph.node:
        del node.attribute[:]


def _topk(value):
    """TopK's k (an int64 initializer) or a fused MoE op's k attribute set to ``value``."""
    def mutate(model, rng):
        names = {n.input[1] for n in model.graph.node if n.op_type == "TopK" and len(n.input) > 1}
        for tensor in model.graph.initializer:
            if tensor.name in names:
                tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.INT64, [1], [value]))
        for node in model.graph.node:
            if node.op_type == "Constant" and set(node.output) & names:
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", helper.make_tensor("v", TensorProto.INT64, [1], [value])))
            for attribute in node.attribute:
                if attribute.name == "k" and attribute.type == onnx.AttributeProto.INT:
                    attribute.i = value
    return mutate


def _matmul_mismatch(model, rng):
    weights = {t.name: t for t in model.graph.initializer}
    node = _pick(rng, [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                       and n.input[1] in weights and weights[n.input[1]].dims])
    if node is not None:
        tensor = weights[node.input[1]]
        tensor.dims[0] += rng.choice((1, 3, 17))


def _small_int_mismatch(model, rng):
    """An int64 shape constant whose dims no longer match its data."""
    tensor = _pick(rng, [t for t in model.graph.initializer if t.data_type == TensorProto.INT64])
    if tensor is not None:
        tensor.dims[:] = [rng.choice((3, 7, 0))] + list(tensor.dims)[1:]


def _shape_values(value):
    """Every int64 constant (Reshape shapes, Slice ends, ...) holds ``value``."""
    def mutate(model, rng):
        for tensor in model.graph.initializer:
            if tensor.data_type == TensorProto.INT64 and 0 < len(tensor.raw_data) <= 64:
                n = len(tensor.raw_data) // 8
                tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.INT64, list(tensor.dims), [value] * n))
    return mutate


def _nested(op: str, depth: int):
    """A node moved into ``depth`` nested If (or Loop) bodies."""
    def mutate(model, rng):
        index = rng.randrange(len(model.graph.node))
        inner = original = model.graph.node[index]
        for level in range(depth):
            outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in inner.output]
            if op == "If":      # then: the deeper levels; else: the original node (the size stays linear)
                body = helper.make_graph([inner], f"then{level}", [], outputs)
                other = helper.make_graph([copy.deepcopy(original)], f"else{level}", [], outputs)
                inner = helper.make_node("If", ["fuzz_cond"], list(inner.output), name=f"if{level}",
                                         then_branch=body, else_branch=other)
            else:
                inputs = [helper.make_tensor_value_info(f"iter{level}", TensorProto.INT64, []),
                          helper.make_tensor_value_info(f"cond{level}", TensorProto.BOOL, [])]
                body = helper.make_graph([inner], f"body{level}", inputs,
                                         [helper.make_tensor_value_info(f"cond{level}", TensorProto.BOOL, [])] + outputs)
                inner = helper.make_node("Loop", ["", "fuzz_cond"], list(inner.output), name=f"loop{level}", body=body)
        model.graph.node[index].CopyFrom(inner)
        model.graph.input.append(helper.make_tensor_value_info("fuzz_cond", TensorProto.BOOL, []))
    return mutate


def _identity_chain(n: int):
    def mutate(model, rng):
        last = model.graph.output[0].name
        producer = next(node for node in model.graph.node if last in node.output)
        producer.output[list(producer.output).index(last)] = "chain_0"
        model.graph.node.extend(helper.make_node("Identity", [f"chain_{i}"], [f"chain_{i + 1}" if i + 1 < n else last])
                                for i in range(n))
    return mutate


def _many_inputs(model, rng):
    for i in range(20_000):
        model.graph.input.append(helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [i % 7, "seq"]))


def _constant_node_dims(model, rng):
    node = helper.make_node("Constant", [], ["fuzz_const"])
    tensor = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[2**41, 2**41])
    node.attribute.append(helper.make_attribute("value", tensor))
    model.graph.node.insert(0, node)


MUTATIONS: dict[str, tuple[Callable, tuple[int, ...], str]] = {
    # name: (mutation, expected exit codes, description)
    "init-dim-negative": (_initializer_dim(-7), BAD_INPUT, "an initializer dim set to -7"),
    "init-dim-zero": (_initializer_dim(0), ANY_EXIT, "an initializer dim set to 0"),
    "init-dim-huge": (_initializer_dim(2**41), BAD_INPUT, "an initializer dim set to 2**41"),
    "init-dim-max": (_initializer_dim(2**63 - 1), BAD_INPUT, "an initializer dim set to 2**63-1"),
    "input-dim-negative": (_input_dim(-1), BAD_INPUT, "a graph input dim set to -1"),
    "input-dim-zero": (_input_dim(0), ANY_EXIT, "a graph input dim set to 0"),
    "input-dim-huge": (_input_dim(2**50), BAD_INPUT, "a graph input dim set to 2**50"),
    "input-dim-symbol": (_input_dim("<b>sym\x1b[0m"), ANY_EXIT, "a graph input dim renamed to a hostile symbol"),
    "input-dim-same-symbol": (_input_dim("seq"), ANY_EXIT, "a graph input dim renamed to an existing symbol"),
    "output-dim-huge": (_output_dim(2**45), ANY_EXIT, "a graph output dim set to 2**45"),
    "init-dtype-int64": (_initializer_dtype(TensorProto.INT64), ANY_EXIT, "an initializer typed int64"),
    "init-dtype-string": (_initializer_dtype(TensorProto.STRING), ANY_EXIT, "an initializer typed string"),
    "init-dtype-undefined": (_initializer_dtype(TensorProto.UNDEFINED), ANY_EXIT, "an initializer typed UNDEFINED"),
    "init-dtype-bogus": (_initializer_dtype(999), ANY_EXIT, "an initializer with data_type 999"),
    "all-dtype-bogus": (_every_initializer_dtype(77), ANY_EXIT, "every initializer with data_type 77"),
    "all-dtype-bool": (_every_initializer_dtype(TensorProto.BOOL), ANY_EXIT, "every initializer typed bool"),
    "input-dtype-float": (_input_dtype(TensorProto.FLOAT), ANY_EXIT, "token input typed float"),
    "input-dtype-bogus": (_input_dtype(12345), ANY_EXIT, "token input with elem_type 12345"),
    "drop-node": (_drop_node, ANY_EXIT, "one node dropped"),
    "drop-many": (_drop_many, ANY_EXIT, "30% of the nodes dropped"),
    "duplicate-node": (_duplicate_node, ANY_EXIT, "one node duplicated (two producers of a tensor)"),
    "dangling-input": (_dangling_input, BAD_INPUT, "a node reads a tensor nothing produces"),
    "cycle": (_cycle, ANY_EXIT, "an early node reads a later node's output"),
    "self-loop": (_self_loop, BAD_INPUT, "a node reads its own output"),
    "shuffle-nodes": (_shuffle_nodes, ANY_EXIT, "nodes in random order"),
    "drop-outputs": (_drop_outputs, ANY_EXIT, "no graph outputs"),
    "drop-initializers": (_drop_initializers, ANY_EXIT, "no initializers"),
    "drop-inputs": (_drop_inputs, ANY_EXIT, "no graph inputs"),
    "unknown-domain": (_unknown_domain, ANY_EXIT, "a node in domain evil.example"),
    "unknown-op": (_unknown_op, ANY_EXIT, "a node replaced by evil.example.NoSuchOp"),
    "opset-999": (_opset(999), ANY_EXIT, "opset 999"),
    "opset-zero": (_opset(0), ANY_EXIT, "opset 0"),
    "opset-negative": (_opset(-3), ANY_EXIT, "opset -3"),
    "opset-unknown-domain": (_opset(2**62, "evil.example"), ANY_EXIT, "an opset for evil.example at 2**62"),
    "no-opset": (_no_opset, BAD_INPUT, "no opset_import"),
    "ir-version-zero": (_ir_version(0), BAD_INPUT, "ir_version 0"),
    "ir-version-huge": (_ir_version(2**62), ANY_EXIT, "ir_version 2**62"),
    "attribute-type": (_attribute_type, ANY_EXIT, "an attribute's type field changed"),
    "attribute-value": (_attribute_value, ANY_EXIT, "an attribute replaced by a string, floats or 2**62"),
    "drop-attributes": (_drop_attributes, ANY_EXIT, "every attribute removed"),
    "topk-huge": (_topk(1000), ANY_EXIT, "TopK k = 1000 (> E)"),
    "topk-zero": (_topk(0), ANY_EXIT, "TopK k = 0"),
    "topk-negative": (_topk(-2), ANY_EXIT, "TopK k = -2"),
    "matmul-mismatch": (_matmul_mismatch, ANY_EXIT, "a MatMul/Gemm weight's first dim changed"),
    "int-constant-mismatch": (_small_int_mismatch, ANY_EXIT, "an int64 constant whose dims do not match its data"),
    "shape-values-huge": (_shape_values(2**40), ANY_EXIT, "every int64 constant set to 2**40"),
    "shape-values-negative": (_shape_values(-5), ANY_EXIT, "every int64 constant set to -5"),
    "shape-values-zero": (_shape_values(0), ANY_EXIT, "every int64 constant set to 0"),
    "if-1": (_nested("If", 1), ANY_EXIT, "a node moved into an If body"),
    "if-8": (_nested("If", 8), ANY_EXIT, "a node moved into 8 nested If bodies"),
    "loop-3": (_nested("Loop", 3), ANY_EXIT, "a node moved into 3 nested Loop bodies"),
    "if-30": (_nested("If", 30), ANY_EXIT, "a node moved into 30 nested If bodies"),
    "identity-chain": (_identity_chain(10_000), ANY_EXIT, "10,000 Identity nodes before the output"),
    "many-inputs": (_many_inputs, ANY_EXIT, "20,000 extra graph inputs"),
    "constant-node-huge": (_constant_node_dims, BAD_INPUT, "a Constant node of 2**41 x 2**41"),
}


def _mutated(case: Case, folder: Path) -> Invocation:
    _, name, kind, variant = case.id.split("/")
    graph_only = variant == "graph"
    model = _proto(name, graph_only)
    MUTATIONS[kind][0](model, case.rng())
    return _command(case, _save(folder, model, graph_only, name))


# --------------------------------------------------------------------------- external data

def _set_location(model: onnx.ModelProto, rng: random.Random, location: str, every: bool = True, **entries) -> None:
    tensors = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    for tensor in tensors if every else [rng.choice(tensors)]:
        values = {e.key: e.value for e in tensor.external_data}
        values.update(location=location, **entries)
        del tensor.external_data[:]
        for key, value in values.items():
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


PLACEHOLDER = "LOCATION_PLACEHOLDER_0123456789"


def _external(case: Case, folder: Path) -> Invocation:
    _, name, kind = case.id.split("/")[:3]
    model, rng = _proto(name, True), case.rng()
    outside = (folder.parent / "outside").resolve()
    raw_patch = None
    if kind == "parent":
        _set_location(model, rng, "../outside/secret.bin")
    elif kind == "parent-deep":
        _set_location(model, rng, "sub/../../outside/secret.bin", every=False)
    elif kind == "absolute":
        _set_location(model, rng, str(outside / "secret.bin"))
    elif kind == "absolute-system":
        _set_location(model, rng, "/etc/passwd", every=False)
    elif kind in ("symlink-file", "symlink-dir"):
        if kind == "symlink-file":
            os.symlink(outside / "secret.bin", folder / "weights.bin")
            _set_location(model, rng, "weights.bin")
        else:
            os.symlink(outside, folder / "sub")
            _set_location(model, rng, "sub/secret.bin")
    elif kind == "offset-beyond":
        _set_location(model, rng, "model.onnx.data", offset=str(10**12))
    elif kind == "length-beyond":
        _set_location(model, rng, "model.onnx.data", length=str(10**15))
    elif kind == "offset-negative":
        _set_location(model, rng, "model.onnx.data", offset="-4096")
    elif kind == "offset-text":
        _set_location(model, rng, "model.onnx.data", offset="lots", length="\x00")
    elif kind == "missing-file":
        _set_location(model, rng, "nowhere.bin")
    elif kind == "directory":
        _set_location(model, rng, ".")
    elif kind == "empty-location":
        _set_location(model, rng, "")
    elif kind == "no-location":
        _set_location(model, rng, None)
    elif kind == "nul-byte":
        _set_location(model, rng, "model.onnx.data\x00../../outside/secret.bin")
    elif kind == "huge-location":
        _set_location(model, rng, "a/" * 300_000 + "x.bin", every=False)
    elif kind in ("non-utf8", "non-utf8-parent"):
        _set_location(model, rng, PLACEHOLDER, every=False)
        raw_patch = (b"\xff\xfe\x80" + b"../outside/" if kind == "non-utf8-parent" else b"\xc3\x28\xa0\xa1")
        raw_patch = raw_patch.ljust(len(PLACEHOLDER), b"\x80")
    else:
        raise ValueError(kind)
    data = model.SerializeToString()
    if raw_patch is not None:
        data = data.replace(PLACEHOLDER.encode(), raw_patch)
    path = _save(folder, data, True, name)
    if case.id.endswith("/validate"):
        return Invocation(("validate", str(path), "--batch", "1", "--seq", "8"))
    if case.id.endswith("/html"):
        return Invocation(("compare", str(path), "--html", str(folder / "out.html")), ("out.html",))
    return _inspect(path)


EXTERNAL_KINDS = {
    "parent": "every external location is ../outside/secret.bin",
    "parent-deep": "one location is sub/../../outside/secret.bin",
    "absolute": "every location is the absolute path of a file outside the folder",
    "absolute-system": "one location is /etc/passwd",
    "symlink-file": "locations name a symlink to a file outside the folder",
    "symlink-dir": "locations go through a symlinked folder that leaves the model's folder",
    "offset-beyond": "offsets 10**12 beyond the data file",
    "length-beyond": "lengths 10**15 beyond the data file",
    "offset-negative": "negative offsets",
    "offset-text": "offset 'lots', length NUL",
    "missing-file": "locations name a file that does not exist",
    "directory": "location '.' (the folder itself)",
    "empty-location": "empty locations",
    "no-location": "external data entries without a location",
    "nul-byte": "a location with a NUL byte followed by ../",
    "huge-location": "a 900 kB location",
    "non-utf8": "a location that is not UTF-8",
    "non-utf8-parent": "a non-UTF-8 location with ../outside/ inside",
}


# --------------------------------------------------------------------------- hostile names

def _hostile(case: Case, folder: Path) -> Invocation:
    _, name, where, style = case.id.split("/")
    hostile = HOSTILE_NAMES[style]
    model = _proto(name, True)
    graph = model.graph
    every = style != "huge"         # a 1 MB name once, not on every tensor (a 600 MB file)
    if where == "nodes":
        for i, node in enumerate(graph.node):
            if every or i == len(graph.node) // 2:
                node.name = f"{hostile}{i}"
    elif where == "tensors":
        _rename_tensors(model, lambda n, i: f"{hostile}{i}" if every or i == 3 else n)
    elif where == "unknown-op":
        node = graph.node[len(graph.node) // 2]
        node.op_type, node.domain = hostile[:200] if style == "huge" else hostile, "evil.example"
    elif where == "metadata":
        graph.name = model.producer_name = model.doc_string = graph.doc_string = hostile
        for node in graph.node if every else graph.node[:1]:
            entry = node.metadata_props.add()
            entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr([hostile, hostile])
    elif where == "dangling":
        graph.node[len(graph.node) // 2].input[0] = hostile
    else:
        raise ValueError(where)
    path = _save(folder, model, True, name)
    markers = tuple(m for m in HTML_MARKERS if m in hostile)
    if case.rng().random() < 0.5 or markers:
        return Invocation(("compare", str(path), "--html", str(folder / "out.html"), "--seq", "64"), ("out.html",), markers)
    return _inspect(path)


def _rename_tensors(model: onnx.ModelProto, rename: Callable[[str, int], str]) -> None:
    names: dict[str, str] = {}

    def new(old: str) -> str:
        if old and old not in names:
            names[old] = rename(old, len(names))
        return names.get(old, old)
    graph = model.graph
    for tensor in graph.initializer:
        tensor.name = new(tensor.name)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = new(value.name)
    for node in graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]


def _non_utf8_names(case: Case, folder: Path) -> Invocation:
    name = case.id.split("/")[1]
    model = _proto(name, True)
    _rename_tensors(model, lambda n, i: f"NAME{i:06d}XX" if i % 3 == 0 else n)
    data = re.sub(rb"NAME(\d{6})XX", lambda m: b"\xff\xfe" + m.group(1) + b"\xc0\xc1", model.SerializeToString())
    return _inspect(_save(folder, data, True, name))


# --------------------------------------------------------------------------- config.json

PWNED = "PWNED"
REMOTE_CODE = f"""
import pathlib
pathlib.Path(__file__).resolve().parent.parent.joinpath("outside", "{PWNED}").write_text("remote code ran")
"""
SMALL_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
CONFIGS: dict[str, tuple[object, tuple[int, ...], str]] = {
    "hidden-huge": ({"hidden_size": 10**12}, BAD_INPUT, "hidden_size 10**12"),
    "hidden-zero": ({"hidden_size": 0}, BAD_INPUT, "hidden_size 0"),
    "hidden-negative": ({"hidden_size": -64}, BAD_INPUT, "hidden_size -64"),
    "hidden-float": ({"hidden_size": 64.5}, BAD_INPUT, "hidden_size 64.5"),
    "hidden-string": ({"hidden_size": "64"}, BAD_INPUT, "hidden_size '64'"),
    "hidden-bool": ({"hidden_size": True}, BAD_INPUT, "hidden_size true"),
    "layers-huge": ({"num_hidden_layers": 10**7}, BAD_INPUT, "num_hidden_layers 10**7"),
    "layers-zero": ({"num_hidden_layers": 0}, ANY_EXIT, "num_hidden_layers 0"),
    "heads-zero": ({"num_attention_heads": 0}, BAD_INPUT, "num_attention_heads 0"),
    "kv-heads-huge": ({"num_key_value_heads": 2**40}, BAD_INPUT, "num_key_value_heads 2**40"),
    "vocab-huge": ({"vocab_size": 10**13}, BAD_INPUT, "vocab_size 10**13"),
    "vocab-zero": ({"vocab_size": 0}, BAD_INPUT, "vocab_size 0"),
    "intermediate-huge": ({"intermediate_size": 2**45}, BAD_INPUT, "intermediate_size 2**45"),
    "model-type-unknown": ({"model_type": "evil-model"}, BAD_INPUT, "model_type evil-model"),
    "model-type-number": ({"model_type": 123}, BAD_INPUT, "model_type 123"),
    "model-type-list": ({"model_type": ["llama"]}, BAD_INPUT, "model_type ['llama']"),
    "auto-map": ({"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}},
                 BAD_INPUT, "auto_map naming evil.py (remote code)"),
    "auto-map-unknown-type": ({"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}},
                              BAD_INPUT, "unknown model_type with auto_map"),
    "trust-remote-code": ({"trust_remote_code": True, "auto_map": {"AutoModel": "evil.EvilModel"}}, BAD_INPUT,
                          "trust_remote_code true and auto_map"),
    "hostile-strings": ({"torch_dtype": HTML_MARKERS[0], "architectures": [HOSTILE_NAMES["ansi"]]}, ANY_EXIT,
                        "hostile strings in free-form fields"),
    "not-json": (b"{ this is not json", BAD_INPUT, "not JSON"),
    "non-utf8": (b"{\"model_type\": \"\xff\xfe\"}", BAD_INPUT, "not UTF-8"),
    "json-list": ([SMALL_LLAMA], BAD_INPUT, "a JSON list"),
    "empty": (b"", BAD_INPUT, "an empty file"),
    "nested-deep": (b"[" * 200_000 + b"]" * 200_000, BAD_INPUT, "200,000 nested JSON arrays"),
    "nan-size": (b'{"model_type": "llama", "hidden_size": NaN}', BAD_INPUT, "hidden_size NaN"),
}


def _config(case: Case, folder: Path) -> Invocation:
    kind = case.id.split("/")[1]
    value = CONFIGS[kind][0]
    if isinstance(value, dict):
        value = {**SMALL_LLAMA, **value}
    text = value if isinstance(value, bytes) else json.dumps(value).encode()
    (folder / "config.json").write_bytes(text)
    (folder / "evil.py").write_text(REMOTE_CODE)
    target = folder if case.rng().random() < 0.5 else folder / "config.json"
    return _inspect(target)


# --------------------------------------------------------------------------- TOML

BUDGET_TEXTS: dict[str, str | bytes] = {
    "empty": "",
    "non-utf8": b"[setup]\nbatch = 4\n[[plan]]\nname = \"\xff\xfe\"\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "garbage": "\x00\x01\x02 [[[ ]]] = = =",
    "setup-not-table": "setup = 3\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "plan-not-array": "plan = \"full\"\n",
    "plan-numbers": "plan = [1, 2]\n",
    "plan-empty-table": "[[plan]]\n",
    "batch-negative": "[setup]\nbatch = -1\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "batch-huge": "[setup]\nbatch = 1e30\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "batch-int-huge": "[setup]\nbatch = 9223372036854775807\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "seq-huge": "[setup]\nseq = 4611686018427387904\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "mfu-nan": "[setup]\nmfu = nan\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "gpu-number": "[setup]\ngpu = 5\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "gpu-unknown": "[setup]\ngpu = \"<script>alert(1)</script>\"\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "memory-negative": "[[plan]]\nspec = \"full\"\npeak_memory = \"-5GiB\"\n",
    "memory-inf": "[[plan]]\nspec = \"full\"\npeak_memory = inf\n",
    "memory-list": "[[plan]]\nspec = \"full\"\npeak_memory = [1, 2]\n",
    "params-overflow": "[[plan]]\nspec = \"full\"\ntrainable_params = \"1e400\"\n",
    "flops-table": "[[plan]]\nspec = \"full\"\nstep_flops = { a = 1 }\n",
    "spec-number": "[[plan]]\nspec = 5\npeak_memory = \"1GiB\"\n",
    "name-number": "[[plan]]\nname = 5\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "spec-unknown-role": "[[plan]]\nspec = \"lora=nonexistent\"\npeak_memory = \"1GiB\"\n",
    "spec-hostile": "[[plan]]\nspec = \"x:lora=<script>alert(1)</script>\"\npeak_memory = \"1GiB\"\n",
    "rank-zero": "[[plan]]\nspec = \"lora=attn;rank=0\"\npeak_memory = \"1GiB\"\n",
    "rank-huge": "[[plan]]\nspec = \"lora=attn;rank=99999999999999999999\"\npeak_memory = \"1GiB\"\n",
    "stack-huge": "[[plan]]\nspec = \"stack-ffn=100000000\"\npeak_memory = \"1GiB\"\n",
    "dropout-nan": "[[plan]]\nspec = \"dropout=nan\"\npeak_memory = \"1GiB\"\n",
    "alpha-text": "[[plan]]\nspec = \"lora=attn;alpha=lots\"\npeak_memory = \"1GiB\"\n",
    "duplicate-names": "[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n[[plan]]\nspec = \"full\"\npeak_memory = \"2GiB\"\n",
    "headroom-two": "[defaults]\npeak_memory = \"fits: h100\"\nheadroom = 2\n[[plan]]\nspec = \"full\"\n",
    "time-no-gpu": "[[plan]]\nspec = \"full\"\ntime_per_step = \"1s\"\n",
    "unknown-table": "[evil]\nx = 1\n[[plan]]\nspec = \"full\"\npeak_memory = \"1GiB\"\n",
    "nested-arrays": "x = " + "[" * 50_000 + "]" * 50_000 + "\n",
    "nested-tables": "x = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n",
    "huge-value": "[[plan]]\nspec = \"full\"\nname = \"" + "n" * 1_000_000 + "\"\npeak_memory = \"1GiB\"\n",
    "ansi-name": "[[plan]]\nspec = \"full\"\nname = \"\\u001b[31mred\\n2nd line\"\npeak_memory = \"1GiB\"\n",
    "many-plans": "".join(f"[[plan]]\nname = \"p{i}\"\nspec = \"lora=attn;rank={i + 1}\"\npeak_memory = \"1GiB\"\n"
                          for i in range(300)),
}
PLANS_TEXTS: dict[str, str | bytes] = {
    "empty": "",
    "non-utf8": b"[[plan]]\nname = \"\xff\"\nspec = \"full\"\n",
    "garbage": "\x00\x01 = =",
    "plan-not-array": "plan = \"full\"\n",
    "plan-numbers": "plan = [1, 2]\n",
    "plan-strings": "plan = [\"full\"]\n",
    "plan-empty-table": "[[plan]]\n",
    "name-number": "[[plan]]\nname = 5\nspec = \"full\"\n",
    "name-table": "[[plan]]\nname = { a = 1 }\nlora = \"attn\"\n",
    "spec-list": "[[plan]]\nname = \"a\"\nspec = [\"full\"]\n",
    "spec-and-keys": "[[plan]]\nname = \"a\"\nspec = \"full\"\nlora = \"attn\"\n",
    "unknown-key": "[[plan]]\nname = \"a\"\nevil = 1\n",
    "rank-text": "[[plan]]\nname = \"a\"\nlora = \"attn\"\nrank = \"lots\"\n",
    "rank-negative": "[[plan]]\nname = \"a\"\nlora = \"attn\"\nrank = -3\n",
    "rank-float": "[[plan]]\nname = \"a\"\nlora = \"attn\"\nrank = 2.5\n",
    "lora-list": "[[plan]]\nname = \"a\"\nlora = [\"attn\", 3]\n",
    "lora-unknown": "[[plan]]\nname = \"a\"\nlora = \"nonexistent\"\n",
    "stack-huge": "[[plan]]\nname = \"a\"\nstack-ffn = 100000000\n",
    "stack-width-huge": "[[plan]]\nname = \"a\"\nstack-ffn = 1\nstack-ffn-width = 1099511627776\n",
    "dropout-two": "[[plan]]\nname = \"a\"\ndropout = 2\n",
    "alpha-inf": "[[plan]]\nname = \"a\"\nlora = \"attn\"\nalpha = inf\n",
    "hostile-name": "[[plan]]\nname = \"<script>alert(1)</script>\"\nlora = \"attn\"\n",
    "ansi-name": "[[plan]]\nname = \"\\u001b[2J\\u001b[31mred\\nline\"\nlora = \"attn\"\n",
    "nested-arrays": "x = " + "[" * 50_000 + "]" * 50_000 + "\n",
    "huge-name": "[[plan]]\nname = \"" + "n" * 1_000_000 + "\"\nlora = \"attn\"\n",
    "layers-huge": "[[plan]]\nname = \"a\"\ntrain = \"layers:0-99999999999999999999\"\n",
    "duplicate-names": "[[plan]]\nname = \"a\"\n[[plan]]\nname = \"a\"\nlora = \"attn\"\n",
}


def _budget(case: Case, folder: Path) -> Invocation:
    kind = case.id.split("/")[1]
    model = _save(folder, _graph_only("llama")[0], True, "llama")
    if kind.startswith("truncated-") or kind.startswith("flipped-"):
        data = bytearray(BUDGET_SAMPLE.read_bytes())
        rng = case.rng()
        if kind.startswith("truncated-"):
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.choice((1, 2, 4))):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        text = bytes(data)
    else:
        text = BUDGET_TEXTS[kind]
    budget = folder / "budget.toml"
    budget.write_bytes(text if isinstance(text, bytes) else text.encode())
    html = folder / "out.html"
    markers = tuple(m for m in HTML_MARKERS if m in (text if isinstance(text, str) else ""))
    return Invocation(("check", str(model), "--budget", str(budget), "--html", str(html), "--format", "junit",
                       "-o", str(folder / "junit.xml")), ("out.html", "junit.xml"), markers)


def _plans(case: Case, folder: Path) -> Invocation:
    kind = case.id.split("/")[1]
    model = _save(folder, _graph_only("moe")[0], True, "moe")
    text = PLANS_TEXTS[kind]
    plans = folder / "plans.toml"
    plans.write_bytes(text if isinstance(text, bytes) else text.encode())
    markers = tuple(m for m in HTML_MARKERS if m in (text if isinstance(text, str) else ""))
    return Invocation(("compare", str(model), "--plans", str(plans), "--seq", "64", "--html", str(folder / "out.html")),
                      ("out.html",), markers)


# --------------------------------------------------------------------------- saved estimates (report)

@functools.lru_cache(maxsize=None)
def plan_document() -> str:
    """`costlens compare --json` of the llama fixture (computed once, through the library)."""
    import costlens
    from costlens.estimate import default_plans, estimate
    from costlens.plans import Setup, parse_plan_spec
    from costlens.render.plan import plan_document as document_of
    model = costlens.load(FIXTURES / "llama.onnx")
    setup = Setup(seq=64)
    results = [(spec, estimate(model, parse_plan_spec(spec), setup)) for spec in default_plans(model)]
    return json.dumps(document_of(model, results))


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _report(case: Case, folder: Path) -> Invocation:
    kind = case.id.split("/")[1]
    document, rng = json.loads(plan_document()), case.rng()
    markers: tuple[str, ...] = ()
    paths = [p for p in _paths(document) if p]
    for _ in range(rng.choice((1, 2, 3))):
        target = rng.choice(paths)
        parent = document
        try:
            for key in target[:-1]:
                parent = parent[key]
            if kind == "drop":
                del parent[target[-1]]
            elif kind == "retype":
                parent[target[-1]] = rng.choice((None, "text", -1, 1e308, [], {}, True, float("nan")))
            elif kind == "hostile":
                parent[target[-1]] = HTML_MARKERS[1]
                markers = (HTML_MARKERS[1],)
        except (KeyError, IndexError, TypeError):
            continue
    if kind == "hostile":      # names and free text a model or a user controls
        for plan in document["plans"]:
            plan["name"] = HTML_MARKERS[0] + str(plan["name"])
            # a mutation above may have retyped the list: hostile text goes in as a list again
            plan["assumptions"] = [*(a for a in plan.get("assumptions") or [] if isinstance(a, str)), HTML_MARKERS[2]] \
                if isinstance(plan.get("assumptions"), list) or "assumptions" not in plan else [HTML_MARKERS[2]]
        document["model"]["source"] = HTML_MARKERS[2]
        warnings = document["model"].get("warnings")
        document["model"]["warnings"] = [*(warnings if isinstance(warnings, list) else []), HTML_MARKERS[0]]
        markers = HTML_MARKERS
    path = folder / "estimate.json"
    path.write_text(json.dumps(document))
    return Invocation(("report", str(path), "-o", str(folder / "out.html")), ("out.html",), markers)


# --------------------------------------------------------------------------- the corpus

def corpus() -> list[Case]:
    """Every case, in a fixed order (ids are unique and stable)."""
    cases: list[Case] = []
    for name in FIXTURE_NAMES:
        for variant in ("raw", "graph"):
            for i in range(8):
                cases.append(Case(f"truncate/{name}/{variant}/{i}", "truncate",
                                  f"{name}.onnx ({variant}) cut at a seeded random length", _truncated))
            for i in range(12):
                cases.append(Case(f"bitflip/{name}/{variant}/{i}", "bitflip",
                                  f"{name}.onnx ({variant}) with 1-8 seeded bit flips", _flipped))
        for kind, (_, expect, text) in MUTATIONS.items():
            variant = "graph" if kind in ("if-30", "identity-chain", "many-inputs") or len(kind) % 2 else "raw"
            cases.append(Case(f"proto/{name}/{kind}/{variant}", "proto", f"{name}.onnx: {text}", _mutated, expect))
        for kind, text in EXTERNAL_KINDS.items():
            cases.append(Case(f"external/{name}/{kind}/inspect", "external", f"{name}.onnx: {text}", _external))
        for where in ("nodes", "tensors", "unknown-op", "metadata", "dangling"):
            for style in HOSTILE_NAMES:
                expect = BAD_INPUT if where == "dangling" else ANY_EXIT
                cases.append(Case(f"names/{name}/{where}/{style}", "names",
                                  f"{name}.onnx: {style} strings as {where}", _hostile, expect))
        cases.append(Case(f"names/{name}/non-utf8/bytes", "names", f"{name}.onnx: non-UTF-8 tensor names",
                          _non_utf8_names))
    for kind in ("parent", "absolute", "symlink-file", "symlink-dir", "offset-beyond", "length-beyond", "non-utf8"):
        cases.append(Case(f"external/llama/{kind}/html", "external", f"compare --html: {EXTERNAL_KINDS[kind]}", _external))
        cases.append(Case(f"external/llama/{kind}/validate", "external",
                          f"validate (reads weights): {EXTERNAL_KINDS[kind]}", _external, needs_torch=True))
    for kind, (_, expect, text) in CONFIGS.items():
        cases.append(Case(f"config/{kind}", "config", f"config.json: {text}", _config, expect, needs_torch=True))
    for kind in BUDGET_TEXTS:
        cases.append(Case(f"budget/{kind}", "budget", f"budget TOML: {kind}", _budget))
    for i in range(12):
        cases.append(Case(f"budget/truncated-{i}", "budget", "costlens.toml cut at a seeded random length", _budget))
        cases.append(Case(f"budget/flipped-{i}", "budget", "costlens.toml with seeded bit flips", _budget))
    for kind in PLANS_TEXTS:
        cases.append(Case(f"plans/{kind}", "plans", f"plans TOML: {kind}", _plans))
    for kind in ("drop", "retype", "hostile"):
        for i in range(8):
            cases.append(Case(f"report/{kind}/{i}", "report", f"saved estimate JSON: {kind} fields", _report))
    return cases


def quick_sample(cases: list[Case], per_family: int = 9, torch_cases: int = 3) -> list[Case]:
    """A deterministic sample: ``per_family`` cases of each family (seeded), fewer torch ones."""
    rng = random.Random(SEED)
    chosen = []
    for family in sorted({c.family for c in cases}):
        members = [c for c in cases if c.family == family and not c.needs_torch]
        chosen += rng.sample(members, min(per_family, len(members)))
    torch_members = [c for c in cases if c.needs_torch and c.family == "config"]
    chosen += rng.sample(torch_members, min(torch_cases, len(torch_members)))
    return sorted(chosen, key=lambda c: c.id)


# --------------------------------------------------------------------------- running and judging

@dataclass
class Outcome:
    exit_code: int | None           # None: timed out or killed
    stdout: str
    stderr: str
    seconds: float
    outside_opens: list[str]        # files opened outside the model's folder and the system dirs
    peak_rss_mb: float | None = None
    crash: str = ""                 # in-process: the exception that escaped the CLI


def allowed_roots() -> list[str]:
    """Where a run may open files besides its model's folder: Python, site-packages, the
    costlens package (templates), costlens's graph cache, system folders."""
    import site
    import sysconfig
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(),
             *sysconfig.get_paths().values(), str(ROOT / "costlens"), "/usr", "/lib", "/lib64", "/etc",
             "/proc", "/sys", "/dev",
             # the harness's own sources (import-time stack inspection, warnings' source lines)
             str(ROOT / "tests"), str(ROOT / "benchmarks"), os.path.abspath(sys.argv[0] or "."),
             # package metadata of the editable install (importlib.metadata.entry_points scans it)
             str(ROOT / "costlens.egg-info")}
    # costlens's own graph cache (frontends/graph_cache.py): files named by a SHA-256 of content
    # costlens derived, never a path the model chose
    from costlens.frontends.graph_cache import cache_dir
    if cache_dir() is not None:
        roots.add(str(cache_dir()))
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user_site:
        roots.add(user_site)
    return sorted({os.path.realpath(r) for r in roots if r})


def is_outside(path: str, folder: str, roots: list[str]) -> bool:
    if path.endswith(".__path_hook__"):         # setuptools' editable-install finder: not a file
        return False
    real = os.path.realpath(path)
    return not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in [folder, *roots])


def violations(case: Case, invocation: Invocation, outcome: Outcome, folder: Path) -> list[str]:
    """Every way the outcome breaks the invariant (empty: the input was handled)."""
    found = []
    code, err = outcome.exit_code, outcome.stderr
    if code is None:
        found.append(f"no exit within {TIMEOUT_SECONDS:.0f} s")
    elif code not in ANY_EXIT:
        found.append(f"exit code {code}")
    elif code not in case.expect:
        found.append(f"exit {code}, expected {'/'.join(map(str, case.expect))}")
    if outcome.crash:
        found.append(f"exception escaped the CLI: {outcome.crash}")
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in outcome.stdout:
        found.append("traceback")
    lines = err.splitlines()
    if len(lines) > MAX_STDERR_LINES:
        found.append(f"{len(lines)} lines of stderr")
    if any(len(line) > MAX_LINE_CHARS for line in lines):
        found.append(f"a stderr line of {max(len(line) for line in lines)} characters")
    if CONTROL.search(err) or CONTROL.search(outcome.stdout):
        found.append("raw control characters (terminal escapes) in the output")
    if code == 2:
        errors = [line for line in lines if line.startswith("costlens: error: ")]
        if not errors or not errors[-1][len("costlens: error: "):].strip():
            found.append(f"exit 2 without a 'costlens: error: ...' line: {err[:200]!r}")
    if GENERIC_ERROR.search(err):
        found.append(f"a message that names no cause: {GENERIC_ERROR.search(err).group(0)!r}")
    if outcome.outside_opens:
        found.append(f"opened outside the model's folder: {sorted(set(outcome.outside_opens))[:3]}")
    if outcome.seconds > TIMEOUT_SECONDS:
        found.append(f"took {outcome.seconds:.1f} s")
    if outcome.peak_rss_mb is not None and outcome.peak_rss_mb > MAX_RSS_MB:
        found.append(f"peak RSS {outcome.peak_rss_mb:.0f} MB")
    if (folder / "outside" / PWNED).exists():
        found.append("remote code was executed")
    if set(os.listdir(folder / "outside")) - {"secret.bin", PWNED}:
        found.append(f"wrote outside the model's folder: {sorted(os.listdir(folder / 'outside'))}")
    model_folder = folder / "model"
    for name in invocation.outputs:
        path = model_folder / name
        if code not in (0, 1) and path.exists():
            found.append(f"a failing run (exit {code}) left {name}")
        if path.exists() and name.endswith(".html"):
            html = path.read_text(encoding="utf-8", errors="replace")
            for marker in invocation.hostile:
                if marker in html:
                    found.append(f"{marker!r} unescaped in {name}")
    leftovers = [n for n in os.listdir(model_folder) if n.startswith(".") and n.endswith(".tmp")]
    if leftovers:
        found.append(f"temporary files left: {leftovers}")
    return found


# The subprocess wrapper of the full run: an audit hook on "open" records every file opened
# outside the model's folder and the allowed roots; the report goes to argv[2] (hook off).
CHILD = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))   # absurd dims must never allocate
folder, report, roots = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
argv = sys.argv[4:]
outside, active = [], [True]
prefixes = [folder] + roots
def hook(event, args):
    if event == "open" and active[0] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            real = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            real = repr(args[0])
        if not real.endswith(".__path_hook__") and not any(real == p or real.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes):
            outside.append(real)
sys.addaudithook(hook)
code = 0
try:
    from costlens.cli import main
    main(argv, prog_name="costlens")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    active[0] = False
    with open(report, "w") as f:
        json.dump({"outside": outside[:20], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
sys.exit(code)
"""


CHILD = CHILD.replace("MEMORY_LIMIT", str(MEMORY_LIMIT_BYTES))


def run_subprocess(case: Case, folder: Path, timeout: float = TIMEOUT_SECONDS) -> tuple[Invocation, Outcome]:
    """Build the case in ``folder`` and run it in a fresh Python with the audit hook."""
    import subprocess
    import time
    invocation = case.build(folder)
    report = folder / "child.json"
    command = [sys.executable, "-c", CHILD, str((folder / "model").resolve()), str(report),
               json.dumps(allowed_roots()), *invocation.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, env=env, cwd=folder / "model")
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = None, e.stdout or b"", e.stderr or b""
    seconds = time.perf_counter() - start
    info = json.loads(report.read_text()) if report.is_file() else {"outside": [], "rss_mb": None}
    return invocation, Outcome(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), seconds,
                               info["outside"], info["rss_mb"])


# A persistent subprocess for many inputs (the full run's default: the imports of onnx,
# onnxruntime's shape inference and sympy are paid once per worker, not once per input). Jobs
# arrive as JSON lines on stdin; each runs through click's CliRunner with the audit hook
# recording opens outside that job's model folder; results go back on a private copy of
# stdout (fd 1 itself is sent to /dev/null so stray C-level prints cannot corrupt them).
WORKER = r"""
import json, os, resource, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
roots = json.loads(sys.argv[1])
state = {"folder": None, "outside": []}
def hook(event, args):
    folder = state["folder"]
    if folder is None or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    try:
        real = os.path.realpath(os.fsdecode(args[0]))
    except Exception:
        real = repr(args[0])
    if not real.endswith(".__path_hook__") and not any(
            real == p or real.startswith(p.rstrip(os.sep) + os.sep) for p in [folder] + roots):
        state["outside"].append(real)
sys.addaudithook(hook)
reply = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
from click.testing import CliRunner
from costlens.cli import main
reply.write("@@READY@@\n"); reply.flush()
for line in sys.stdin:
    job = json.loads(line)
    os.chdir(job["folder"])
    state["folder"], state["outside"] = os.path.realpath(job["folder"]), []
    start = time.perf_counter()
    crash = ""
    try:
        result = CliRunner().invoke(main, job["argv"], catch_exceptions=True)
        code, out, err = result.exit_code, result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crash = "".join(traceback.format_exception_only(type(result.exception), result.exception)).strip()[:300]
    except MemoryError:
        code, out, err, crash = None, "", "", "MemoryError (address-space limit)"
    seconds = time.perf_counter() - start
    state["folder"] = None
    os.chdir("/")
    reply.write("@@FUZZ@@" + json.dumps({"code": code, "stdout": out, "stderr": err, "crash": crash,
                                         "seconds": seconds, "outside": state["outside"][:20],
                                         "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\n")
    reply.flush()
"""
WORKER = WORKER.replace("MEMORY_LIMIT", str(MEMORY_LIMIT_BYTES))


class Worker:
    """One persistent worker subprocess; restarted after a timeout or a crash."""

    def __init__(self):
        self.process = None

    def _start(self) -> None:
        import queue
        import subprocess
        import threading
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(allowed_roots())], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, encoding="utf-8", errors="replace", cwd="/")
        self.lines: "queue.Queue[str | None]" = queue.Queue()

        def pump(stream, lines):
            for line in stream:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=pump, args=(self.process.stdout, self.lines), daemon=True).start()
        self._read(120.0, "@@READY@@")

    def _read(self, timeout: float, prefix: str) -> str | None:
        import queue
        import time
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(prefix):
                return line[len(prefix):]

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def run(self, case: Case, folder: Path, timeout: float = TIMEOUT_SECONDS) -> tuple[Invocation, Outcome]:
        import time
        invocation = case.build(folder)
        if self.process is None or self.process.poll() is not None:
            self._start()
        start = time.perf_counter()
        self.process.stdin.write(json.dumps({"folder": str((folder / "model").resolve()),
                                             "argv": list(invocation.argv)}) + "\n")
        self.process.stdin.flush()
        line = self._read(timeout, "@@FUZZ@@")
        if line is None:                       # timed out, or the worker died (memory limit, segfault)
            died = self.process.poll() is not None
            self.stop()
            return invocation, Outcome(None, "", "", time.perf_counter() - start, [],
                                       crash="the worker process died" if died else "")
        info = json.loads(line)
        return invocation, Outcome(info["code"], info["stdout"], info["stderr"], info["seconds"], info["outside"],
                                   info["rss_mb"], info["crash"])


class _Timeout(BaseException):
    """Raised by SIGALRM in an in-process run (a BaseException: no handler swallows it)."""


_AUDIT = {"folder": None, "roots": None, "outside": []}


def _audit(event, args):
    folder = _AUDIT["folder"]
    if folder is None or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if is_outside(path, folder, _AUDIT["roots"]):
        _AUDIT["outside"].append(os.path.realpath(path))


def run_in_process(case: Case, folder: Path, timeout: float = TIMEOUT_SECONDS) -> tuple[Invocation, Outcome]:
    """Build the case and run it through click's CliRunner in this process (the quick test).
    Opens outside the folder are recorded by an audit hook installed once per process."""
    import signal
    import time
    import traceback

    from click.testing import CliRunner

    from costlens.cli import main
    if _AUDIT["roots"] is None:
        _AUDIT["roots"] = allowed_roots()
        sys.addaudithook(_audit)
    invocation = case.build(folder)

    def alarm(signum, frame):
        raise _Timeout()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _AUDIT["folder"], _AUDIT["outside"] = os.path.realpath(folder / "model"), []
    start = time.perf_counter()
    try:
        result = CliRunner().invoke(main, list(invocation.argv), catch_exceptions=True)
        code, out, err = result.exit_code, result.stdout, result.stderr
        crash = ""
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crash = "".join(traceback.format_exception_only(type(result.exception), result.exception)).strip()[:300]
    except _Timeout:
        code, out, err, crash = None, "", "", ""
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - start
        outside = list(_AUDIT["outside"])
        _AUDIT["folder"] = None
    return invocation, Outcome(code, out, err, seconds, outside, crash=crash)


def folder_name(case: Case) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case.id)
