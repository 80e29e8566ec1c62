"""costlens: what will this fine-tuning plan cost, before you rent the GPU?

    import costlens
    model = costlens.load("model.onnx")
    result = costlens.estimate(model, costlens.Plan(lora=("attn",), rank=8), costlens.Setup(batch=4, seq=2048))
    result.memory.peak, result.flops.step
"""
from costlens.api import Model, load, load_graph
from costlens.errors import CostlensError
from costlens.estimate import Estimate, default_plans, estimate
from costlens.plans import Plan, Setup, load_plans_file, parse_plan_spec

__all__ = ["Model", "load", "load_graph", "CostlensError", "Estimate", "default_plans", "estimate", "Plan", "Setup",
           "load_plans_file", "parse_plan_spec"]
__version__ = "0.1.0"
