"""Which layer each node belongs to, from the residual stream.

Layer i starts at the stream tensor that enters attention i (the skip input of the residual
add after its o-projection). A node belongs to the deepest layer whose entry it descends
from. The tail (final norm, head) starts at the stream tensor the head reads, walked back
through the final norm when norms come before sublayers (pre-LN); with post-LN the norm
that ends the last layer belongs to that layer.
"""
from __future__ import annotations

from costlens.roles.graphview import LINEAR_OPS, NORM_OPS, GraphView

RESIDUAL_PATH_OPS = frozenset({"Add", "Cast", "Dropout", "Identity", "Reshape", "Mul"})
NORM_DECOMPOSED_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Cast"})


def is_fused_add_norm(op: str) -> bool:
    """Skip(Simplified)LayerNormalization: residual add and norm in one op; output 3 is the sum."""
    return op.endswith("SkipLayerNormalization") or op.endswith("SkipSimplifiedLayerNormalization")


def residual_entry(view: GraphView, o_site: int, depth: int = 4) -> str | None:
    """The stream tensor added to the attention output (the block's skip input)."""
    tensor = view.nodes[o_site].outputs[0]
    for _ in range(depth):
        consumers = view.consumer_nodes(tensor)
        for index in consumers:
            node = view.nodes[index]
            data = view.data_inputs(index)
            if (node.op == "Add" or is_fused_add_norm(node.op)) and len(data) >= 2:
                pair = data[:2]
                other = pair[0] if pair[1] == tensor else pair[1]
                if node.op == "Add" and is_linear_output(view, other):
                    # parallel blocks (Falcon, GPT-J): attention and MLP outputs are summed first,
                    # then the sum is added to the stream
                    stream = _stream_after_parallel_sum(view, node.outputs[0])
                    if stream is not None:
                        return stream
                return other
        # a sandwich norm (Gemma 2's post_attention_layernorm) normalizes the sublayer's output
        # before the residual add: walk through a plain norm, never a fused add+norm
        nxt = [i for i in consumers if view.nodes[i].op in RESIDUAL_PATH_OPS
               or (view.nodes[i].op in NORM_OPS and not is_fused_add_norm(view.nodes[i].op))]
        if not nxt:
            return None
        tensor = view.nodes[nxt[0]].outputs[0]
    return None


def is_linear_output(view: GraphView, tensor: str, depth: int = 4) -> bool:
    """Is the tensor a linear's output (through views and a bias add): a sublayer's result?"""
    for _ in range(depth):
        index = view.producer.get(tensor)
        if index is None:
            return False
        node = view.nodes[index]
        data = view.data_inputs(index)
        if node.op in LINEAR_OPS:
            # the weight may reach the product through a view of it (torch.export transposes it)
            return any(x and not view.is_data(x) for x in node.inputs)
        if node.op not in ("Reshape", "Cast", "Identity", "Transpose", "Add") or len(data) != 1:
            return False
        tensor = data[0]
    return False


def _stream_after_parallel_sum(view: GraphView, tensor: str, depth: int = 3) -> str | None:
    """The stream the sum of two sublayer outputs is added to (None: no such add right after)."""
    for _ in range(depth):
        for index in view.consumer_nodes(tensor):
            node = view.nodes[index]
            data = view.data_inputs(index)
            if node.op == "Add" and len(data) == 2:
                other = data[0] if data[1] == tensor else data[1]
                return None if is_linear_output(view, other) else other
        nxt = [i for i in view.consumer_nodes(tensor) if view.nodes[i].op in ("Cast", "Identity", "Reshape", "Dropout")]
        if not nxt:
            return None
        tensor = view.nodes[nxt[0]].outputs[0]
    return None


def is_norm_output(view: GraphView, tensor: str, norm_sites: set[int]) -> bool:
    """Whether ``tensor`` is a normalization's output: a norm op's first output, or the output of a node
    in ``norm_sites`` (where a written-out norm applies its weight)."""
    index = view.producer.get(tensor)
    if index is None:
        return False
    node = view.nodes[index]
    if node.op in NORM_OPS:
        return node.outputs[0] == tensor   # a fused add+norm's other outputs are not normalized
    return index in norm_sites


def is_post_norm(view: GraphView, entries: list[str], norm_sites: set[int]) -> bool:
    """Post-LN blocks hand the next block a norm's output; pre-LN blocks hand it an add's.
    With one layer, the stream entering layer 0 decides (BERT normalizes its embeddings)."""
    later = entries[1:] if len(entries) > 1 else entries[:1]
    return all(is_norm_output(view, e, norm_sites) for e in later if e)


def stream_before_norm(view: GraphView, tensor: str, depth: int = 10) -> str:
    """Walk back from a norm's output to the stream tensor it normalizes."""
    current = tensor
    for _ in range(depth):
        index = view.producer.get(current)
        if index is None:
            return current
        node = view.nodes[index]
        data = view.data_inputs(index)
        if is_fused_add_norm(node.op):
            # the node is the residual add and the norm: the stream it normalizes is its own sum,
            # whichever input slot carries the residual (the tail opens at this node)
            return current
        if node.op in NORM_OPS:
            return data[0] if data else current
        if node.op not in NORM_DECOMPOSED_OPS or not data:
            return current
        if node.op == "Add" and len(data) == 2:
            return current          # a residual add: this is the stream
        current = data[0]
    return current


def label_layers(view: GraphView, entries: list[str], tail_start: str | None) -> list[int]:
    """Per node: -1 before layer 0, i inside layer i, len(entries) in the tail."""
    tensor_label: dict[str, int] = {name: -1 for name in view.graph.inputs}
    bump = {name: i for i, name in enumerate(entries)}
    if tail_start is not None:
        bump[tail_start] = len(entries)
    for name, i in bump.items():
        if name in tensor_label:
            tensor_label[name] = max(tensor_label[name], i)
    labels = []
    for node in view.nodes:
        label = max((tensor_label.get(x, -1) for x in node.inputs if x and view.is_data(x)), default=-1)
        if is_fused_add_norm(node.op):
            # the add closes the previous layer, the norm opens the one whose entry it emits
            # (its sum, output 3; or the normalized output 0 where it opens the tail)
            label = max([label] + [bump[o] for o in node.outputs if o in bump])
        labels.append(label)
        for out in node.outputs:
            if out:
                tensor_label[out] = max(label, bump.get(out, -1))
    return labels
