"""The Python API the CLI is a thin shell over (usable from notebooks).

    model = costlens.load("model.onnx")
    model.roles.params_by_role()

The defaults the CLI derives from the source (attention, loss, experts implementation, a static
export's shape, foreach with a GPU; costlens/defaults.py) come from ``setup_for``, so that a
notebook prices what ``costlens plan SOURCE --batch 4 --seq 512`` prints:

    setup = costlens.api.setup_for("config.json", batch=4, seq=512)
    result = costlens.api.estimate(costlens.load("config.json", dtype=running_dtype(setup.precision)),
                                   costlens.Plan(lora=("attn",), rank=8), setup)

(``costlens.Setup(...)`` alone keeps the fixed defaults: eager attention, ce loss, the experts loop.)
``estimate`` here refuses a batch or seq that a static ONNX export cannot price (PlanError).

A façade only: the model lives in costlens.model, source dispatch in costlens.frontends.source.
Pipeline modules import those, never this one (only the CLI and ``costlens/__init__`` do).
"""
from __future__ import annotations

from costlens.frontends.source import IMPORT_SPEC, SOURCE_KINDS, load_graph
from costlens.defaults import source_defaults
from costlens.model import Model, analyse, unknown_ops

__all__ = ["IMPORT_SPEC", "SOURCE_KINDS", "Model", "estimate", "load", "load_graph", "setup_for", "source_defaults",
           "unknown_ops"]


def load(source, *, tracer: str = "export", revision: str | None = None, dtype: str = "float32") -> Model:
    """Load a model (any source ``load_graph`` takes; ``revision``: a hub id's branch, tag or
    commit; ``dtype``: the dtype a config is traced in, ``plans.running_dtype(precision)`` of
    the plan's precision) and locate the role of every parameter."""
    from dataclasses import replace

    from costlens.errors import CostlensError
    from costlens.frontends.attention_default import default_attention
    model = analyse(load_graph(source, tracer=tracer, revision=revision, dtype=dtype))
    try:
        chosen = default_attention(source, revision)       # issue 16 item 3: what the source runs
    except CostlensError as e:      # e.g. a config naming a kernel costlens does not price: no default
        return replace(model, default_attention=None, default_attention_why=str(e))
    return replace(model, default_attention=chosen.value, default_attention_why=chosen.why)


def setup_for(source, *, revision: str | None = None, **values):
    """The plans.Setup ``costlens plan SOURCE`` prices for these option values (Setup field
    names: batch=4, seq=512, gpu="h100", ...): the fields given win; the attention, loss, experts
    implementation, optimizer implementation and a static ONNX export's batch / seq are what the
    source decides (costlens/defaults.py). ``source_defaults`` gives the reasons too."""
    explicit = {key for key, value in values.items() if value is not None}
    return source_defaults(source, values, explicit, revision=revision).setup()


def estimate(model: Model, plan=None, setup=None):
    """costlens.estimate.estimate (parameters, bytes, FLOPs of one step), refusing what a static
    ONNX export that could not be re-bound cannot price: a batch or seq other than the export's
    is a PlanError with the reason (as the CLI refuses it), never the export's numbers under
    another shape's label; an unchosen seq is the export's."""
    from dataclasses import replace

    from costlens.estimate import estimate as price
    from costlens.frontends.static_shapes import bound_shape
    from costlens.plans import Plan, Setup
    setup = setup or Setup()
    batch, seq = bound_shape(model.graph, setup.batch, setup.seq)
    return price(model, plan or Plan(), replace(setup, batch=batch, seq=seq))
