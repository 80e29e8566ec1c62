"""Symbolic dims (costlens/shapes.py): arithmetic by hand, unknown symbols never guessed, no eval."""
from __future__ import annotations

import pytest

from costlens.shapes import eval_dim, eval_shape, numel

AT = {"batch": 3, "seq": 10}


@pytest.mark.parametrize("dim, expected", [
    (7, 7), ("batch", 3), ("seq*2", 20), ("batch*seq", 30), ("seq - 1", 9), ("seq/4", 2),
    ("seq//3", 3), ("seq % 4", 2), ("-batch + seq", 7), ("(batch + 1) * (seq - 2)", 32),
])
def test_dims_evaluate_as_integer_arithmetic(dim, expected):
    assert eval_dim(dim, AT) == expected


@pytest.mark.parametrize("dim", ["heads", "batch*heads", "seq/0", "seq % 0", "2.5", "seq**2", "seq(", "__import__('os')",
                                 "batch if seq else 1", "[batch]"])
def test_unknown_or_non_arithmetic_dims_are_none(dim):
    assert eval_dim(dim, AT) is None


def test_a_shape_is_known_only_when_every_dim_is():
    assert eval_shape(("batch", "seq", 64), AT) == (3, 10, 64)
    assert eval_shape(("batch", "heads", 64), AT) is None
    assert eval_shape(None, AT) is None
    assert eval_shape(["batch", 2], AT) == (3, 2)          # a list (unhashable) is evaluated uncached


def test_memoised_shapes_follow_the_bindings():
    shape = ("batch", "seq")
    assert eval_shape(shape, {"batch": 1, "seq": 2}) == (1, 2)
    assert eval_shape(shape, {"batch": 4, "seq": 8}) == (4, 8)     # not the cached (1, 2)


def test_numel():
    assert numel(()) == 1
    assert numel((3, 10, 64)) == 1920
    assert numel((5, 0)) == 0
