"""What autograd keeps for backward, per node: the memory model's view of the op rules.

The rules themselves live with their ops (ops/linear.py, attention.py, moe.py, norms.py,
elementwise.py; the format in ops/registry.py): each mirrors PyTorch's derivative formulas
(``tools/autograd/derivatives.yaml``), saving a tensor only when a gradient that needs it will
be computed. They return the names of graph tensors (storages.py maps them to storages) and
``Extra`` entries for tensors the graph does not show.
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.ops.registry import Extra, SavedContext, lookup

__all__ = ["Extra", "SavedContext", "saved_by", "backward_transient"]


def saved_by(node: Node, ctx: SavedContext) -> list:
    """Saved tensors of one node (tensor names and ``Extra``). An op without a rule saves
    nothing here: it is already reported unknown and the estimate marked incomplete."""
    found = lookup(node.op)
    return found.saved_by(node, ctx) if found else []


def backward_transient(node: Node, ctx: SavedContext) -> int:
    """Bytes one node's backward allocates beyond its output's and inputs' gradients."""
    found = lookup(node.op)
    return found.backward_transient(node, ctx) if found else 0
