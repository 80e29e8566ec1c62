"""Lowering of torch.export's aten graph to the costlens IR, one rule per aten op.

``core`` holds the rule registry (``lowers``), the lowering loop (``lower``) and the rules for
products, reductions and activations; ``layout`` (views, slicing, concatenation) and ``tensors``
(creation, casts, indexing) add theirs. Importing the package registers them all; the rule
modules import ``core``, never this package, so the modules form no cycle.
"""
from costlens.frontends.aten import layout, tensors  # noqa: F401  (they register their rules)
from costlens.frontends.aten.core import Call, emit, lower, lowers, norm_dim, shape_list, tensor

__all__ = ["Call", "emit", "lower", "lowers", "norm_dim", "shape_list", "tensor"]
