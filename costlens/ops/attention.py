"""Rules of the fused attention ops: ONNX Attention (opset 23) and com.microsoft Attention,
MultiHeadAttention, GroupQueryAttention, PackedAttention, PackedMultiHeadAttention; and the
rotary embeddings.

Each op's dimensions (``AttentionDims``: batch, heads, query and key lengths, head sizes) come
from its inputs' shapes and its head-count attributes; a missing one makes the op unpriced,
never guessed. Forward: scores q·kᵀ and context probs·v, 2·B·H·S_q·S_kv·D each. Backward, as
eager attention runs it: dQ and dK each repeat the scores product, dProbs repeats the context
product when q or k needs a gradient, dV when v does. Saved, as the executor's eager modules
keep them (measure/torch_ops.py): the [B, H, S_q, S_kv] probabilities and q / k / v (k and v
repeated to the query heads); a fused kernel keeps q, k, v, its output and a per-row
logsumexp instead. com.microsoft Attention and PackedAttention project q, k, v inside the op
([in, q+k+v] weights): that product is priced as a linear (dX, dW; keeps X when dW is needed).
"""
from __future__ import annotations

from typing import NamedTuple

from costlens.ir import Node
from costlens.ops import costs
from costlens.ops.registry import NOT_COUNTED, Backward, Extra, Family, FlopContext, Needed, SavedContext, Zero, \
    register
from costlens.shapes import numel


class AttentionDims(NamedTuple):
    """A fused attention op's dimensions: counts of sequences and heads, lengths in tokens (``kv_len``
    includes a KV cache's past), head sizes in elements per head."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int


def attention_inputs(node: Node) -> tuple[str, str, str]:
    """(query, key, value) of a fused attention op; packed qkv repeats the query."""
    query = node.inputs[0]
    key = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else query
    value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else query
    return query, key, value


def _input(node: Node, slot: int) -> str:
    return node.inputs[slot] if len(node.inputs) > slot else ""


def _past_len(node: Node, ctx, slot: int, axis: int = 2) -> int:
    """Length of a KV cache input (0 when absent): attention runs over past + new keys."""
    shape = ctx.shape(_input(node, slot)) if _input(node, slot) else None
    return shape[axis] if shape and len(shape) > axis else 0


def gqa_dims(node: Node, ctx) -> tuple[int, int, int, int] | None:
    """(batch, seq, heads, head_dim) of a GroupQueryAttention without a KV cache."""
    shape = ctx.shape(node.inputs[0])
    heads, kv_heads = node.attr("num_heads"), node.attr("kv_num_heads")
    if not shape or len(shape) != 3 or not heads or not kv_heads:
        return None
    packed = len(node.inputs) < 2 or not node.inputs[1]
    return shape[0], shape[1], heads, shape[2] // (heads + 2 * kv_heads if packed else heads)


def _gqa(node: Node, ctx) -> AttentionDims | None:
    dims = gqa_dims(node, ctx)
    if dims is None:
        return None
    batch, seq, heads, head_dim = dims
    return AttentionDims(batch, heads, seq, seq + _past_len(node, ctx, 3), head_dim, head_dim)


def _onnx_attention(node: Node, ctx) -> AttentionDims | None:
    """Q [B, S_q, H*D] with q_num_heads / kv_num_heads, or [B, H, S_q, D]; K, V alike with the
    kv heads; past_key (input 4) [B, H_kv, P, D] is prepended to K."""
    q, k, v = (ctx.shape(x) for x in attention_inputs(node))
    if not q or not k or not v or len(q) != len(k) or len(q) not in (3, 4):
        return None
    if len(q) == 4:
        return AttentionDims(q[0], q[1], q[2], k[2] + _past_len(node, ctx, 4), q[3], v[3])
    heads, kv_heads = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if not heads or not kv_heads:
        return None
    return AttentionDims(q[0], heads, q[1], k[1] + _past_len(node, ctx, 4), q[2] // heads, v[2] // kv_heads)


def _multi_head(node: Node, ctx) -> AttentionDims | None:
    """query [B, S_q, N*H] or packed qkv [B, S, N, 3, H]; key [B, S_kv, N*H], [B, N, S_kv, H]
    or packed kv [B, S_kv, N, 2, H]; value [B, S_kv, N*H_v] or [B, N, S_kv, H_v]; past_key
    (input 6) [B, N, P, H] is prepended to the key."""
    heads = node.attr("num_heads")
    q = ctx.shape(node.inputs[0])
    if not heads or not q:
        return None
    if len(q) == 5:                                              # packed qkv
        return AttentionDims(q[0], heads, q[1], q[1], q[4], q[4])
    k, v = ctx.shape(_input(node, 1)), ctx.shape(_input(node, 2))
    if len(q) != 3 or not k:
        return None
    head_dim = q[2] // heads
    if len(k) == 5:                                              # packed kv
        return AttentionDims(q[0], heads, q[1], k[1], head_dim, k[4])
    kv_len = k[2] if len(k) == 4 else k[1]
    if not v:
        return None
    v_dim = v[3] if len(v) == 4 else v[2] // heads
    return AttentionDims(q[0], heads, q[1], kv_len + _past_len(node, ctx, 6), head_dim, v_dim)


def _qkv_sizes(node: Node, ctx) -> tuple[int, int, int] | None:
    """(q, k, v) widths of com.microsoft Attention's packed projection [in, q+k+v]."""
    weights = ctx.shape(_input(node, 1))
    if not weights or len(weights) != 2:
        return None
    sizes = node.attr("qkv_hidden_sizes")
    if sizes:
        return tuple(int(s) for s in sizes)
    return (weights[1] // 3,) * 3 if weights[1] % 3 == 0 else None


def _ms_attention(node: Node, ctx) -> AttentionDims | None:
    """input [B, S, in], weights [in, q+k+v]; past (input 4) [2, B, N, P, H]."""
    x, heads, sizes = ctx.shape(node.inputs[0]), node.attr("num_heads"), _qkv_sizes(node, ctx)
    if not x or len(x) != 3 or not heads or not sizes:
        return None
    return AttentionDims(x[0], heads, x[1], x[1] + _past_len(node, ctx, 4, axis=3), sizes[0] // heads,
                         sizes[2] // heads)


def _packed(node: Node, ctx, offset_slot: int) -> tuple[int, int] | None:
    """(batch, seq) of a packed op from token_offset [B, S]: every sequence taken at full
    length S (the static bound; the runtime's cumulative lengths can only make it smaller)."""
    offsets = ctx.shape(_input(node, offset_slot))
    return (offsets[0], offsets[1]) if offsets and len(offsets) == 2 else None


def _packed_attention(node: Node, ctx) -> AttentionDims | None:
    """input [T, in], weights [in, q+k+v], bias, token_offset (input 3) [B, S]."""
    bs, heads, sizes = _packed(node, ctx, 3), node.attr("num_heads"), _qkv_sizes(node, ctx)
    if not bs or not heads or not sizes:
        return None
    return AttentionDims(bs[0], heads, bs[1], bs[1], sizes[0] // heads, sizes[2] // heads)


def _packed_multi_head(node: Node, ctx) -> AttentionDims | None:
    """query [T, N*H] or packed qkv [T, N, 3, H]; key [T, N*H], value [T, N*H_v];
    token_offset (input 4) [B, S]."""
    bs, heads, q = _packed(node, ctx, 4), node.attr("num_heads"), ctx.shape(node.inputs[0])
    if not bs or not heads or not q:
        return None
    if len(q) == 4:
        return AttentionDims(bs[0], heads, bs[1], bs[1], q[3], q[3])
    v = ctx.shape(_input(node, 2))
    if len(q) != 2 or not v:
        return None
    return AttentionDims(bs[0], heads, bs[1], bs[1], q[1] // heads, v[-1] // heads)


DIMS = {
    "Attention": _onnx_attention,
    "com.microsoft.Attention": _ms_attention,
    "com.microsoft.MultiHeadAttention": _multi_head,
    "com.microsoft.GroupQueryAttention": _gqa,
    "com.microsoft.PackedAttention": _packed_attention,
    "com.microsoft.PackedMultiHeadAttention": _packed_multi_head,
}
PROJECTED = frozenset({"com.microsoft.Attention", "com.microsoft.PackedAttention"})   # weights inside


def _products(dims: AttentionDims) -> tuple[int, int]:
    # scores [b,h,q,d] @ [b,h,d,kv] -> [b,h,q,kv]; context [b,h,q,kv] @ [b,h,kv,dv] -> [b,h,q,dv]
    rows = dims.batch * dims.heads * dims.q_len
    return costs.matmul_flops(rows, dims.head_dim, dims.kv_len), costs.matmul_flops(rows, dims.kv_len, dims.v_head_dim)


def _projection_flops(node: Node, ctx) -> int | None:
    x, sizes = ctx.shape(node.inputs[0]), _qkv_sizes(node, ctx)
    if not x or not sizes:
        return None
    # [tokens, in] @ [in, q+k+v]
    return costs.matmul_flops(numel(x) // x[-1], x[-1], sum(sizes))


def attention_flops(node: Node, ctx: FlopContext) -> int | None:
    """Forward FLOPs (2 x MACs) of a fused attention op: scores and context, plus the in-op q/k/v
    projection where the op holds the weights; None when a dimension is unknown (never guessed)."""
    dims = DIMS[node.op](node, ctx)
    if dims is None:
        return None
    scores, context = _products(dims)
    if node.op not in PROJECTED:
        return scores + context
    projection = _projection_flops(node, ctx)
    return None if projection is None else projection + scores + context


def _needs_qkv(node: Node, needed: Needed) -> tuple[bool, bool, bool]:
    """Whether q, k and v need gradients: separate or packed inputs, or (weights inside the op)
    whenever the input needs one or the weights train."""
    if node.op in PROJECTED:
        inner = 0 in needed.inputs or needed.weight
        return inner, inner, inner
    slots = [i if len(node.inputs) > i and node.inputs[i] else 0 for i in range(3)]
    return tuple(slot in needed.inputs for slot in slots)


def attention_backward(node: Node, ctx: FlopContext, needed: Needed, forward_flops: int) -> Backward:
    """Backward FLOPs (2 x MACs) as eager attention runs it: dQ and dK a scores product each, dProbs a
    context product when q or k needs a gradient, dV one when v does; an in-op projection adds its dX and dW."""
    dims = DIMS[node.op](node, ctx)
    if dims is None:
        return Backward(0, 0)
    scores, context = _products(dims)
    nq, nk, nv = _needs_qkv(node, needed)
    dx = scores * (int(nq) + int(nk)) + context * (int(nq or nk) + int(nv))
    dw = 0
    if node.op in PROJECTED:
        projection = _projection_flops(node, ctx) or 0
        dx += projection if 0 in needed.inputs else 0
        dw += projection if needed.weight else 0
    return Backward(dx, dw)


def _core_saved(node: Node, ctx: SavedContext, dims: AttentionDims, nq: bool, nk: bool, nv: bool) -> list:
    if not (nq or nk or nv):
        return []
    b, name = dims.batch * dims.heads, node.name        # k and v repeated to the query heads
    act = ctx.act_bytes()
    q, k = b * dims.q_len * dims.head_dim * act, b * dims.kv_len * dims.head_dim * act
    v, out = b * dims.kv_len * dims.v_head_dim * act, b * dims.q_len * dims.v_head_dim * act
    if ctx.fused_attention():
        lse = b * dims.q_len * ctx.stat_bytes()
        return [Extra(f"q@{name}", q), Extra(f"k@{name}", k), Extra(f"v@{name}", v), Extra(f"out@{name}", out),
                Extra(f"lse@{name}", lse)]
    kept: list = [Extra(f"probs@{name}", b * dims.q_len * dims.kv_len * ctx.act_bytes("Softmax"))]
    if nk:
        kept.append(Extra(f"q@{name}", q))
    if nq:
        kept.append(Extra(f"k@{name}", k))
    if nq or nk:
        kept.append(Extra(f"v@{name}", v))
    return kept


def attention_saved(node: Node, ctx: SavedContext) -> list:
    """Eager: probabilities, q (for dK), k (for dQ), v (for dProbs); fused: q, k, v, out, lse.
    Projecting ops also keep their input for dW when the weights train."""
    dims = DIMS[node.op](node, ctx)
    if dims is None:
        return []
    if node.op in PROJECTED:
        x = node.inputs[0]
        inner = ctx.needs(x) or ctx.trains(node)
        kept = _core_saved(node, ctx, dims, inner, inner, inner)
        return kept + ([x] if ctx.trains(node) and not ctx.is_weight(x) else [])
    query, key, value = attention_inputs(node)
    return _core_saved(node, ctx, dims, ctx.needs(query), ctx.needs(key), ctx.needs(value))


def _group_query_attention_saved(node: Node, ctx: SavedContext) -> list:
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


register("Attention", "com.microsoft.Attention", "com.microsoft.MultiHeadAttention",
         "com.microsoft.PackedAttention", "com.microsoft.PackedMultiHeadAttention", family=Family.FUSED_ATTENTION,
         flops=attention_flops, backward=attention_backward, saved=attention_saved)
register("com.microsoft.GroupQueryAttention", family=Family.FUSED_ATTENTION, flops=attention_flops,
         backward=attention_backward, saved=_group_query_attention_saved)


def _rotary_saved(node: Node, ctx: SavedContext) -> list:
    """x·cos + rotate(x)·sin keeps only the cos / sin tables: gathered at the position ids
    ([B, S, D_rot / 2] each) when the op takes them, else its cos / sin inputs themselves
    (constants are resident: not counted)."""
    x = node.inputs[0]
    if not ctx.needs(x):
        return []
    onnx = node.op == "RotaryEmbedding"     # ONNX: X, cos, sin, position_ids; contrib: X, position_ids, cos, sin
    cos, sin = (_input(node, 1), _input(node, 2)) if onnx else (_input(node, 2), _input(node, 3))
    positions = _input(node, 3) if onnx else _input(node, 1)
    pos_shape, cos_shape = ctx.shape(positions) if positions else None, ctx.shape(cos)
    if pos_shape and cos_shape:
        return [Extra(f"rope@{node.name}", 2 * numel(pos_shape) * cos_shape[-1] * ctx.act_bytes())]
    return [t for t in (cos, sin) if t and not ctx.is_weight(t)]


register("RotaryEmbedding", "com.microsoft.RotaryEmbedding", family=Family.FUSED_ATTENTION,
         flops=Zero(NOT_COUNTED), saved=_rotary_saved)
