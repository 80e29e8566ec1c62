"""What the role locator returns: every parameter use with one role and a layer."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What a parameter does in the model: the unit plans train, freeze or adapt by (``--lora attn,ffn``)."""

    ATTENTION = "attention"
    FFN = "ffn"
    ROUTER = "router"
    EXPERTS = "experts"
    SHARED_EXPERTS = "shared_experts"
    EMBEDDING = "embedding"
    NORM = "norm"
    LM_HEAD = "lm_head"
    OTHER = "other"


ROLE_ORDER = tuple(Role)


@dataclass(frozen=True)
class ParamUse:
    """One structural use of a parameter.

    Exporters deduplicate identical initializers (all-ones norm weights of every layer become
    one), so a constant can have several uses; each counts its elements once, except a true
    tie (token embedding reused as lm_head), whose second use has ``n_params == 0`` and names
    the use it is tied to."""

    key: str                 # unique: the constant's name, "#k" appended for its k-th extra use
    constant: str            # initializer name in the model file
    role: Role
    kind: str                # finer grain: q k v o qkv kv | up gate down gate_up | token position | weight bias ...
    layer: int | None        # None: outside the repeated blocks (embeddings, final norm, head)
    n_params: int
    shape: tuple[int, ...]
    site: str                # the node where it meets data
    hint: str = ""           # module path the exporter recorded, if any
    tied_to: str | None = None
    n_experts: int = 0       # >0 for a tensor with a leading expert dimension
    via: str | None = None   # a routed Gather picking its expert matrices before the site (batched experts)


@dataclass(frozen=True)
class AttentionBlock:
    """One layer's attention: its core nodes and the q/k/v/o linear sites (indices into graph.nodes);
    ``heads`` and ``kv_heads`` are counts, ``head_dim`` elements per head (None where not read)."""

    layer: int
    kind: str                       # "eager" (MatMul-Softmax-MatMul) or the fused op's name
    score_node: int | None          # Q·Kᵀ MatMul (eager) or the fused op
    softmax_node: int | None
    context_node: int | None        # P·V MatMul (eager) or the fused op
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    q_sites: tuple[int, ...]
    k_sites: tuple[int, ...]
    v_sites: tuple[int, ...]
    o_sites: tuple[int, ...]


@dataclass(frozen=True)
class Router:
    """One MoE router: the linear that scores E experts per token and the TopK that keeps ``top_k`` of them."""

    layer: int | None
    site: int                 # the d -> E linear's node
    topk_node: int | None
    n_experts: int
    top_k: int | None


@dataclass(frozen=True)
class FFNUnit:
    """One feed-forward (dense, expert or shared-expert) unit: its up, gate and down linear sites
    (indices into graph.nodes) and the activation's name ("(gated)" appended for GLU variants)."""

    layer: int | None
    role: Role                # FFN, EXPERTS or SHARED_EXPERTS
    up_sites: tuple[int, ...]
    gate_sites: tuple[int, ...]
    down_site: int
    activation: str


@dataclass(frozen=True)
class Architecture:
    """The model's shape as found in the graph (never from names); widths in features (elements), None
    where they could not be read. ``layers`` counts the attention blocks."""

    layers: int
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None      # features per head
    ffn: int | None           # the FFN's (else an expert's) inner width; a fused gate_up counts once
    activation: str | None
    gated_ffn: bool
    experts: int
    top_k: int | None
    shared_experts: bool
    vocab: int | None
    norm: str | None
    norm_placement: str       # "pre" or "post"
    positions: str            # "learned", "computed" (e.g. RoPE) or "none"
    tied_embedding: bool
    ffn_per_block: int        # FFN sublayers (a routed MoE counting as one) in the busiest block


@dataclass(frozen=True)
class RoleMap:
    """What the role locator returns: every parameter use with its role and layer, the blocks found,
    and what was left unclassified; ``params_total`` counts elements (tied uses once)."""

    params: tuple[ParamUse, ...]
    architecture: Architecture
    attentions: tuple[AttentionBlock, ...]
    routers: tuple[Router, ...]
    ffn_units: tuple[FFNUnit, ...]
    node_layers: tuple[int | None, ...]    # per graph node; None outside the blocks
    buffers: tuple[str, ...]               # float constants that are not parameters
    unmatched: tuple[str, ...]             # parameter keys whose role is OTHER
    warnings: tuple[str, ...]

    @property
    def params_total(self) -> int:
        return sum(p.n_params for p in self.params)

    def params_by_role(self) -> dict[str, int]:
        totals = {role.value: 0 for role in ROLE_ORDER}
        for use in self.params:
            totals[use.role.value] += use.n_params
        return totals
