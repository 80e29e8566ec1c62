"""One exception hierarchy for the library. The CLI turns each into one line and exit 2."""
from __future__ import annotations


class CostlensError(Exception):
    """Base of every error costlens raises on purpose (bad input, bad usage)."""


class ModelFormatError(CostlensError):
    """The file is not a readable model: not ONNX, truncated, corrupted, empty, cyclic."""


class AbsurdModelError(CostlensError):
    """The model declares shapes no real model has (negative or astronomically large dims)."""


class StructureError(CostlensError):
    """The graph loads but lacks the structure costlens prices (e.g. no attention found)."""


class UnsafePathError(CostlensError):
    """An external-data location points outside the model's folder."""


class PlanError(CostlensError):
    """A plan asks for something the model or costlens cannot do."""
