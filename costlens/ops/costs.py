"""FLOP formulas, as pure functions of shapes (FLOPs = 2 x multiply-accumulates).

Like ``torch.utils.flop_counter``, only matrix products are counted (linear layers,
attention scores and context, expert matmuls); elementwise ops, norms, softmax and the
loss are not. Backward of a product costs one forward's worth per gradient it produces:
Y = A·B, dA = dY·Bᵀ and dB = Aᵀ·dY are each 2·M·N·K.
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.shapes import numel


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    # [rows, inner] @ [inner, cols] -> [rows, cols]: rows*cols dot products of length inner
    return 2 * rows * inner * cols


def node_matmul_flops(node: Node, a_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int | None:
    """Forward FLOPs of a MatMul / Gemm from its first operand's and its output's shapes."""
    if not a_shape or not out_shape:
        return None
    cols = out_shape[-1]
    if node.op == "Gemm":
        inner = a_shape[0] if node.attr("transA", 0) else a_shape[-1]
    else:
        inner = a_shape[-1]
    rows = numel(out_shape) // cols if cols else 0
    return matmul_flops(rows, inner, cols)


def lora_flops(tokens: int, rank: int, d_in: int, d_out: int) -> int:
    # x[T,in] @ A[in,r] -> [T,r]; then @ B[r,out] -> [T,out]
    return matmul_flops(tokens, d_in, rank) + matmul_flops(tokens, rank, d_out)


def attention_core_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    # scores [b,h,q,d] @ [b,h,d,kv] and context [b,h,q,kv] @ [b,h,kv,d]
    return 2 * matmul_flops(batch * heads * q_len, head_dim, kv_len)


def routed_expert_flops(tokens: int, top_k: int, per_expert_weight_elements: int) -> int:
    # each token runs k experts; each expert matrix costs 2 FLOPs per weight element per token
    return 2 * tokens * top_k * per_expert_weight_elements


def merged_expert_delta_flops(n_experts: int, rank: int, d_in: int, d_out: int) -> int:
    # W + B·A per expert as one baddbmm: [E, out, r] @ [E, r, in] -> [E, out, in]
    return matmul_flops(n_experts * d_out, rank, d_in)
