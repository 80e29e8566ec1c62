"""costlens: what will this fine-tuning plan cost, before you rent the GPU?"""
from costlens.api import Model, load, load_graph
from costlens.errors import CostlensError

__all__ = ["Model", "load", "load_graph", "CostlensError"]
__version__ = "0.1.0"
