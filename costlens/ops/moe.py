"""Rules of the fused MoE op (com.microsoft.MoE): routed experts with 3-D expert weights.

Forward: every token runs its k experts through fc1 (and fc3) and fc2, 2 FLOPs per weight
element per (token, expert) pair. Backward, per pair: dX through fc1 (and fc3) when the input
needs a gradient, the activation's gradient through fc2 whenever the experts' output needs
one (the input does, or the expert weights train), and dW for every expert matrix when they
train. Saved: what the executor's sparse MoE block keeps (measure/torch_ops._moe). The
quantized QMoE has no rule (its packed weights and scales are laid out differently): it is
reported unknown, never priced as zero.
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.ops import costs
from costlens.ops.registry import Backward, Extra, Family, FlopContext, Needed, SavedContext, rule
from costlens.shapes import numel

INDEX_BYTES = 8          # int64 indices (nonzero, topk)
WEIGHT_SLOTS = {2: "fc1", 4: "fc2", 6: "fc3"}     # MoE inputs: x, router, fc1 w, fc1 b, fc2 w, fc2 b, fc3 w, ...


def moe_weights(node: Node, ctx) -> dict[str, tuple]:
    """Expert weight shapes of a com.microsoft.MoE by input name (fc1, fc2, fc3), [E, out, in]."""
    found = {}
    for slot, name in WEIGHT_SLOTS.items():
        if len(node.inputs) > slot and node.inputs[slot]:
            shape = ctx.shape(node.inputs[slot])
            if shape and len(shape) == 3:
                found[name] = tuple(shape)
    return found


def _expert_matrices(node: Node, ctx: FlopContext) -> list[tuple[int, ...]]:
    """Shapes of the 3-D expert weights the op multiplies by (biases are 2-D)."""
    shapes = [ctx.shape(w) for w in node.inputs[2:] if w and ctx.is_weight(w)]
    return [s for s in shapes if s and len(s) == 3]


def _tokens(node: Node, ctx) -> int | None:
    shape = ctx.shape(node.inputs[0])
    return numel(shape) // shape[-1] if shape else None


def moe_backward(node: Node, ctx: FlopContext, needed: Needed, forward_flops: int) -> Backward:
    """Backward FLOPs of a routed com.microsoft.MoE node: dX through each expert's fc1/fc3 and
    fc2 for the tokens·k routed pairs, and the expert weights' gradients when they train."""
    tokens, top_k = _tokens(node, ctx), node.attr("k")
    if tokens is None or not top_k:
        return Backward(0, 0)
    pairs = tokens * int(top_k)
    per_pair = {name: 2 * numel(shape) // shape[0] for name, shape in moe_weights(node, ctx).items()}
    needs_x = 0 in needed.inputs
    dx = pairs * (per_pair.get("fc1", 0) + per_pair.get("fc3", 0)) if needs_x else 0
    dx += pairs * per_pair.get("fc2", 0) if needs_x or needed.weight else 0
    dw = pairs * sum(per_pair.values()) if needed.weight else 0
    return Backward(dx, dw)


def moe_weight_flops(node: Node, ctx: FlopContext, weight: str, forward_flops: int) -> int:
    """The share of the expert products that multiply by one of the op's expert weights."""
    shapes = _expert_matrices(node, ctx)
    mine = ctx.shape(weight)
    if not shapes or not mine:
        return forward_flops
    return round(forward_flops * numel(mine) / sum(numel(s) for s in shapes))


def moe_saved(node: Node, ctx: SavedContext) -> list:
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
    tokens = numel(shape) // hidden
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


def moe_transient(node: Node, ctx: SavedContext) -> int:
    """Each expert reads its slice of a 3-D weight (``fc1[e]``): the slice's backward
    (select_backward) materializes a full-size [E, out, in] gradient, which is then added to
    the gradient accumulated so far -- one full-size temporary beside the weight's gradient."""
    if not ctx.trains(node):
        return 0
    sizes = [numel(shape) for shape in moe_weights(node, ctx).values()]
    return max(sizes, default=0) * ctx.weight_bytes()


@rule("com.microsoft.MoE", family=Family.FUSED_MOE, saved=moe_saved, backward=moe_backward,
      transient=moe_transient, weight_flops=moe_weight_flops)
def moe_flops(node: Node, ctx: FlopContext) -> int | None:
    """Every token runs k experts through each of its expert matrices."""
    tokens, shapes, top_k = _tokens(node, ctx), _expert_matrices(node, ctx), node.attr("k")
    if tokens is None or not shapes or not top_k:
        return None
    return costs.routed_expert_flops(tokens, top_k, sum(numel(s) // s[0] for s in shapes))
