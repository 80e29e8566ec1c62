"""Evaluate symbolic dims (``batch``, ``seq*2``, ``batch*seq``) at concrete batch and seq.

A tiny arithmetic evaluator over Python's ``ast`` (never ``eval``): shape strings come from
the model file. A dim naming any other symbol is unknown (None), never guessed.
"""
from __future__ import annotations

import ast
import operator
from functools import lru_cache

from costlens.ir import Dim, Shape

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Div: operator.floordiv, ast.Mod: operator.mod}


@lru_cache(maxsize=4096)
def _parse(expression: str):
    try:
        return ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None


def _value(node, bindings: dict[str, int]) -> int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return bindings.get(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, bindings), _value(node.right, bindings)
        if left is None or right is None or (right == 0 and type(node.op) in (ast.FloorDiv, ast.Div, ast.Mod)):
            return None
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _value(node.operand, bindings)
        return None if inner is None else -inner
    return None


def eval_dim(dim: Dim, bindings: dict[str, int]) -> int | None:
    """One dim's size in elements at ``bindings`` (``/`` divides as ``//``); None when it names an
    unbound symbol or is not integer arithmetic, so an unknown size is never guessed."""
    if isinstance(dim, int):
        return dim
    tree = _parse(dim)
    return None if tree is None else _value(tree, bindings)


def eval_shape(shape: Shape | None, bindings: dict[str, int]) -> tuple[int, ...] | None:
    """``shape`` at ``bindings`` (elements per dim), None when a dim is unknown. Memoised:
    shapes do not depend on the plan, so pricing five plans asks for the same few thousand
    (shape, batch, seq) triples ~50k times; the key is the bindings' items, so a different
    binding (or a mutated dict) is a different entry, never a stale one."""
    if shape is None:
        return None
    try:
        return _eval_shape_at(shape, tuple(bindings.items()))
    except TypeError:                 # an unhashable shape (a list): evaluated uncached
        return _eval_shape_at.__wrapped__(tuple(shape), tuple(bindings.items()))


@lru_cache(maxsize=65536)
def _eval_shape_at(shape: Shape, binding_items: tuple[tuple[str, int], ...]) -> tuple[int, ...] | None:
    bindings = dict(binding_items)
    dims = tuple(eval_dim(d, bindings) for d in shape)
    return None if any(d is None for d in dims) else dims


def numel(shape: tuple[int, ...]) -> int:
    """Elements in a tensor of concrete ``shape`` (1 for a scalar's ``()``); times the dtype's size for bytes."""
    count = 1
    for dim in shape:
        count *= dim
    return count
