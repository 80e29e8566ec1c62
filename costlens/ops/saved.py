"""What autograd keeps for backward, per op (DESIGN.md §2.6).

Each rule mirrors PyTorch's derivative formulas (``tools/autograd/derivatives.yaml``): a
tensor is saved only when a gradient that needs it will be computed. A matmul saves X when
dW is needed and W when dX is needed (W is resident: not counted); softmax, sigmoid, tanh,
relu, sqrt and reciprocal save their output; gelu, erf and pow save their input; a
normalization saves its input and per-row statistics. SiLU exported as x * sigmoid(x)
saves x once, as ``torch.nn.functional.silu`` does. Rules return the names of graph
tensors (the memory stage maps them to storages) and ``Extra`` entries for tensors the
graph does not show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from costlens.ir import Node
from costlens.ops.registry import rule_table


@dataclass(frozen=True)
class Extra:
    """A saved tensor the exported graph does not show (e.g. a norm's mean and rstd)."""

    key: str
    n_bytes: int


class SavedContext(Protocol):
    def needs(self, tensor: str) -> bool: ...            # an activation that needs a gradient
    def receives(self, tensor: str) -> bool: ...         # ... and gets one from the loss in backward
    def is_weight(self, tensor: str) -> bool: ...        # computed from constants alone
    def trains(self, node: Node) -> bool: ...            # a trainable parameter meets data here
    def is_fused_inner(self, tensor: str) -> bool: ...  # the inner half of a fused pair: sigmoid of
                                                          # x * sigmoid(x), sqrt of 1 / sqrt(x)
    def rows(self, tensor: str) -> int: ...              # elements / last dim
    def stat_bytes(self) -> int: ...                     # bytes per element of fp32 statistics
    def shape(self, tensor: str) -> tuple | None: ...   # concrete shape (batch, seq bound), constants too
    def act_bytes(self, op: str = "") -> int: ...        # bytes per element of an activation ``op`` makes
                                                          # (fp32 where autocast runs ``op`` in fp32)
    def fused_attention(self) -> bool: ...               # attention runs as a fused kernel (no probs kept)
    def weight_bytes(self) -> int: ...                   # bytes per weight (and weight-gradient) element


Rule = Callable[[Node, SavedContext], list]
SAVED_RULES: dict[str, Rule] = {}
# bytes an op's backward allocates beyond its output's and inputs' gradients (and its weights' .grad)
TRANSIENT_RULES: dict[str, Callable[[Node, SavedContext], int]] = {}


saves = rule_table(SAVED_RULES, "saved-tensor rule")


def _grad_needed(node: Node, operand: str, ctx: SavedContext) -> bool:
    return ctx.trains(node) if ctx.is_weight(operand) else ctx.needs(operand)


def _data(operand: str, ctx: SavedContext) -> bool:
    return bool(operand) and not ctx.is_weight(operand)


@saves("MatMul", "Gemm", "com.microsoft.FusedMatMul")
def _matmul(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    kept = []
    if _grad_needed(node, b, ctx) and _data(a, ctx):
        kept.append(a)            # dB = Aᵀ·dY
    if _grad_needed(node, a, ctx) and _data(b, ctx):
        kept.append(b)            # dA = dY·Bᵀ
    return kept


@saves("Mul")
def _mul(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if ctx.is_fused_inner(a) or ctx.is_fused_inner(b):
        x = b if ctx.is_fused_inner(a) else a
        return [x] if ctx.needs(x) else []          # silu saves its input only
    kept = []
    if _grad_needed(node, b, ctx) and _data(a, ctx):
        kept.append(a)
    if _grad_needed(node, a, ctx) and _data(b, ctx):
        kept.append(b)
    return kept


@saves("Div")
def _div(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if not _data(b, ctx):
        return []                                    # division by a constant: no saved activation
    kept = [b] if ctx.needs(a) else []
    if ctx.needs(b):
        kept += [a, b]                               # d/db (a/b) = -a/b²
    return kept


@saves("Pow", "Gelu", "Erf", "Log", "Softplus", "Abs", "com.microsoft.FastGelu", "com.microsoft.BiasGelu",
       "com.microsoft.QuickGelu", "Mish", "Elu", "Selu", "Celu", "LeakyRelu", "HardSwish", "Sin", "Cos")
def _input(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    return [x] if ctx.needs(x) else []


@saves("Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Relu", "Sqrt", "Reciprocal", "Exp")
def _output(node: Node, ctx: SavedContext) -> list:
    x, y = node.inputs[0], node.outputs[0]
    if not ctx.needs(x) or (node.op in ("Sigmoid", "Sqrt") and ctx.is_fused_inner(y)):
        return []                                    # the fused op (silu, rsqrt) keeps what it needs
    return [y]


@saves("LayerNormalization", "RMSNormalization", "com.microsoft.SkipLayerNormalization",
       "com.microsoft.LayerNormalization")
def _norm(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    if not (ctx.needs(x) or ctx.trains(node)):
        return []
    n_stats = 1 if "RMS" in node.op or "Simplified" in node.op else 2       # rstd (and mean)
    return [x, Extra(f"stats@{node.name}", n_stats * ctx.rows(x) * ctx.stat_bytes())]


@saves("Where")
def _where(node: Node, ctx: SavedContext) -> list:
    return [node.inputs[0]] if any(ctx.needs(x) for x in node.inputs[1:]) else []


@saves("TopK")
def _topk(node: Node, ctx: SavedContext) -> list:
    return [node.outputs[1]] if ctx.needs(node.inputs[0]) else []          # the indices


@saves("ScatterElements", "GatherElements", "ScatterND", "GatherND")
def _indexed(node: Node, ctx: SavedContext) -> list:
    return [node.inputs[1]] if any(ctx.needs(x) for x in node.inputs) else []


# --------------------------------------------------------------------------- onnxruntime contrib ops
# The executor (measure/torch_ops.py) runs these fused ops as the eager modules they replace; each
# rule lists what that torch code keeps, tensors the graph does not show as ``Extra``.

INDEX_BYTES = 8          # int64 indices (nonzero, topk)


def _elements(shape) -> int:
    count = 1
    for dim in shape or ():
        count *= dim
    return count


@saves("SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization")
def _rms_norm(node: Node, ctx: SavedContext) -> list:
    """weight * (x * rsqrt(x.pow(2).mean(-1) + eps)), as a torch RMSNorm module: pow and the
    product keep x, rsqrt its result (one value per row) -- when x needs a gradient; the weight's
    product keeps the normalized x when the weight trains."""
    x = node.inputs[0]
    kept: list = []
    if ctx.needs(x):
        kept += [x, Extra(f"rstd@{node.name}", ctx.rows(x) * ctx.act_bytes("Sqrt"))]
    if ctx.trains(node):
        kept.append(Extra(f"normed@{node.name}", _elements(ctx.shape(x)) * ctx.act_bytes()))
    return kept


@saves("com.microsoft.SkipSimplifiedLayerNormalization")
def _skip_rms_norm(node: Node, ctx: SavedContext) -> list:
    """s = input + skip (+ bias), then the RMSNorm above on s: s (output 3, the residual, when
    the graph names it), its per-row rsqrt, and the normalized s when gamma trains -- when the
    normalized output gets a gradient at all (else autograd frees that part with its consumers)."""
    x, skip = node.inputs[0], node.inputs[1]
    bias = node.inputs[3] if len(node.inputs) > 3 else ""
    summed = node.outputs[3] if len(node.outputs) > 3 else ""
    if not ctx.receives(node.outputs[0]):
        return []         # only the residual sum gets a gradient (the add keeps nothing)
    kept: list = []
    if ctx.needs(x) or ctx.needs(skip) or (bias and ctx.trains(node)):
        kept.append(summed or Extra(f"sum@{node.name}", _elements(ctx.shape(x)) * ctx.act_bytes()))
        kept.append(Extra(f"rstd@{node.name}", ctx.rows(x) * ctx.act_bytes("Sqrt")))
    if ctx.trains(node):
        kept.append(Extra(f"normed@{node.name}", _elements(ctx.shape(x)) * ctx.act_bytes()))
    return kept


def attention_inputs(node: Node) -> tuple[str, str, str]:
    """(query, key, value) of a fused attention op; packed qkv repeats the query."""
    query = node.inputs[0]
    key = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else query
    value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else query
    return query, key, value


def gqa_dims(node: Node, ctx: SavedContext) -> tuple[int, int, int, int] | None:
    """(batch, seq, heads, head_dim) of a GroupQueryAttention without a KV cache."""
    shape = ctx.shape(node.inputs[0])
    heads, kv_heads = node.attr("num_heads"), node.attr("kv_num_heads")
    if not shape or len(shape) != 3 or not heads or not kv_heads:
        return None
    packed = len(node.inputs) < 2 or not node.inputs[1]
    return shape[0], shape[1], heads, shape[2] // (heads + 2 * kv_heads if packed else heads)


@saves("com.microsoft.GroupQueryAttention")
def _group_query_attention(node: Node, ctx: SavedContext) -> list:
    """Eager attention: q·kᵀ keeps the rotated q (for dK) and the repeated k (for dQ), each
    [b, heads, s, hd]; softmax (and the softcap's tanh) keeps the [b, heads, s, s] probabilities,
    which probs·v also keeps for dV; probs·v keeps the repeated v for dP. RoPE on the halves
    keeps only the cos / sin tables for positions 0..S-1. A fused kernel keeps q, k, v, its output and a
    per-row logsumexp instead."""
    dims = gqa_dims(node, ctx)
    if dims is None:
        return []
    batch, seq, heads, head_dim = dims
    query, key, value = attention_inputs(node)
    nq, nk, nv = ctx.needs(query), ctx.needs(key), ctx.needs(value)
    if not (nq or nk or nv):
        return []
    per_head = batch * heads * seq * head_dim * ctx.act_bytes()
    probs = batch * heads * seq * seq * ctx.act_bytes("Softmax")
    name = node.name
    if ctx.fused_attention():
        lse = batch * heads * seq * ctx.stat_bytes()
        return [Extra(f"{t}@{name}", per_head) for t in ("q", "k", "v", "out")] + [Extra(f"lse@{name}", lse)]
    kept: list = [Extra(f"probs@{name}", probs)]
    if nk:
        kept.append(Extra(f"q@{name}", per_head))
    if nq:
        kept.append(Extra(f"k@{name}", per_head))
    if nq or nk:
        kept.append(Extra(f"v@{name}", per_head))
        if node.attr("do_rotary", 0):      # RoPE keeps its cos and sin tables [s, hd / 2]
            kept.append(Extra(f"rope@{name}", 2 * seq * (head_dim // 2) * ctx.act_bytes()))
        if float(node.attr("softcap", 0.0) or 0.0) > 0:
            kept.append(Extra(f"tanh@{name}", batch * heads * seq * seq * ctx.act_bytes("Tanh")))
    return kept


def moe_weights(node: Node, ctx: SavedContext) -> dict[str, tuple]:
    """Expert weight shapes of a com.microsoft.MoE by input name (fc1, fc2, fc3), [E, out, in]."""
    found = {}
    for slot, name in ((2, "fc1"), (4, "fc2"), (6, "fc3")):
        if len(node.inputs) > slot and node.inputs[slot]:
            shape = ctx.shape(node.inputs[slot])
            if shape and len(shape) == 3:
                found[name] = tuple(shape)
    return found


@saves("com.microsoft.MoE")
def _moe(node: Node, ctx: SavedContext) -> list:
    """Routed experts as a sparse MoE block runs them (see torch_ops._moe). With P = tokens·k
    (token, expert) pairs: the router's softmax keeps its [T, E] output, topk its [T, k]
    indices, the renormalization the top-k values and their sum; torch.where keeps each
    expert's (token, slot) pairs [P, 2] int64 (for the gathers and index_add). When the
    experts' outputs need gradients (input needs one or expert weights train): fc1's output
    [P, fc1 out] (the activation's saved halves), the activation's output [P, F], the routing
    weight per pair and index_add's source [P, D]; when the weights train also the gathered
    tokens [P, D] (dW1) and the activated [P, F] (dW2); when the router needs a gradient the
    expert outputs [P, D] (for d weight) and index_add's source."""
    x, router = node.inputs[0], node.inputs[1]
    shape, weights = ctx.shape(x), moe_weights(node, ctx)
    top_k = node.attr("k")
    if not shape or "fc1" not in weights or "fc2" not in weights or not top_k:
        return []
    hidden = shape[-1]
    tokens = _elements(shape) // hidden
    pairs = tokens * int(top_k)
    n_experts = weights["fc1"][0]
    ffn = weights["fc2"][2]
    act, name = ctx.act_bytes(), node.name
    routed, trains = ctx.needs(router), ctx.trains(node)
    experts = ctx.needs(x) or trains
    kept: list = []
    if routed:
        kept += [Extra(f"router_probs@{name}", tokens * n_experts * ctx.act_bytes("Softmax")),
                 Extra(f"topk_indices@{name}", tokens * int(top_k) * INDEX_BYTES)]
        if node.attr("normalize_routing_weights", 0):
            kept += [Extra(f"topk_values@{name}", tokens * int(top_k) * act),
                     Extra(f"topk_sum@{name}", tokens * act)]
        kept.append(Extra(f"expert_out@{name}", pairs * hidden * act))
    if routed or experts:
        kept += [Extra(f"pairs@{name}", pairs * 2 * INDEX_BYTES), Extra(f"source@{name}", pairs * hidden * act)]
    if experts:
        kept += [Extra(f"pair_weight@{name}", pairs * act)]
        kept += _moe_activation_saved(node, pairs, weights, ffn, act)
    if trains:
        kept += [Extra(f"expert_in@{name}", pairs * hidden * act), Extra(f"activated@{name}", pairs * ffn * act)]
    return kept


def _moe_activation_saved(node: Node, pairs: int, weights: dict, ffn: int, act: int) -> list:
    """What the expert activation keeps, per (token, expert) pair: fc1's output (gate and up,
    interleaved) plus, for SwiGLU, the activated gate; a clamp (swiglu_limit), a sigmoid with
    alpha != 1 and an up shifted by beta each keep one more [P, F] tensor."""
    name = node.name
    activation = node.attr("activation_type", "relu")
    activation = activation.decode() if isinstance(activation, bytes) else str(activation)
    if activation != "swiglu":       # relu keeps its output (what fc2 keeps too), gelu / silu their input
        key = "activated" if activation == "relu" else "fc1_out"
        return [] if activation == "identity" else [Extra(f"{key}@{name}", pairs * weights["fc1"][1] * act)]
    kept = [Extra(f"fc1_out@{name}", pairs * 2 * ffn * act), Extra(f"gate_act@{name}", pairs * ffn * act)]
    limit = node.attr("swiglu_limit") is not None
    extra = int(limit) + int(float(node.attr("activation_alpha", 1.0)) != 1.0)
    extra += int(limit or float(node.attr("activation_beta", 0.0)) != 0.0)
    if extra:
        kept.append(Extra(f"swiglu_tmp@{name}", extra * pairs * ffn * act))
    return kept


def _moe_transient(node: Node, ctx: SavedContext) -> int:
    """Each expert reads its slice of a 3-D weight (``fc1[e]``): the slice's backward
    (select_backward) materializes a full-size [E, out, in] gradient, which is then added to
    the gradient accumulated so far -- one full-size temporary beside the weight's gradient."""
    if not ctx.trains(node):
        return 0
    sizes = [_elements(shape) for shape in moe_weights(node, ctx).values()]
    return max(sizes, default=0) * ctx.weight_bytes()


TRANSIENT_RULES["com.microsoft.MoE"] = _moe_transient


def backward_transient(node: Node, ctx: SavedContext) -> int:
    rule = TRANSIENT_RULES.get(node.op)
    return rule(node, ctx) if rule else 0


def saved_by(node: Node, ctx: SavedContext) -> list:
    """Saved tensors of one node; ops without a rule save nothing (views, adds, reductions)."""
    rule = SAVED_RULES.get(node.op)
    return rule(node, ctx) if rule else []
