"""The Python API the CLI is a thin shell over (usable from notebooks).

    model = costlens.load("model.onnx")
    model.roles.params_by_role()
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from costlens.errors import CostlensError
from costlens.ir import Graph, frozen_map
from costlens.ops.registry import known
from costlens.roles import RoleMap, locate_roles


@dataclass(frozen=True)
class Model:
    """A loaded model: its graph, its located roles, and what costlens could not price."""

    graph: Graph
    roles: RoleMap
    unknown_ops: Mapping[str, int]

    @property
    def incomplete(self) -> bool:
        return bool(self.unknown_ops)


def load_graph(source: str | os.PathLike) -> Graph:
    """Build the graph IR from a source. Today: an ``.onnx`` file."""
    path = Path(source)
    if path.is_dir():
        raise CostlensError(f"{source}: is a directory; give an .onnx file")
    if path.suffix.lower() == ".onnx" or path.is_file():
        from costlens.frontends.onnx import load_onnx
        return load_onnx(path)
    raise CostlensError(f"{source}: no such model file (expected an .onnx file)")


def load(source: str | os.PathLike) -> Model:
    """Load a model and locate the role of every parameter."""
    graph = load_graph(source)
    roles = locate_roles(graph)
    unknown = Counter(node.op for node in graph.nodes if not known(node.op))
    return Model(graph=graph, roles=roles, unknown_ops=frozen_map(dict(sorted(unknown.items()))))
