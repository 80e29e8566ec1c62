"""FLOP formulas, as pure functions of dimensions (FLOPs = 2 x multiply-accumulates).

Like ``torch.utils.flop_counter``, only matrix products are counted (linear layers,
convolutions, einsum contractions, attention scores and context, expert matmuls);
elementwise ops, norms, softmax and the loss are not. Backward of a product costs one
forward's worth per gradient it produces: Y = A·B, dA = dY·Bᵀ and dB = Aᵀ·dY are each
2·M·N·K. The per-op rules (ops/linear.py, attention.py, moe.py) read shapes and attributes
off a node and call these.
"""
from __future__ import annotations

from costlens.errors import CostlensError
from costlens.ir import Node
from costlens.shapes import numel


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """FLOPs (2 x MACs) of a [rows, inner] @ [inner, cols] product; every other formula builds on it."""
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


def conv_flops(batch: int, out_spatial: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """Convolution, as torch.utils.flop_counter's conv_flop_count: every output position of
    every output channel is a dot product over (C_in / group) x kernel; bias not counted."""
    # weight [C_out, C_in / group, *kernel]: 2 * N * prod(out) * C_out * (C_in / group) * prod(kernel)
    return 2 * batch * numel(out_spatial) * numel(weight_shape)


def einsum_flops(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """A two-operand einsum as the batched matmul torch lowers it to: 2 x the product of every
    index size that takes part in the product (batch, free and contracted indices). An index
    found in one operand only and not in the output is summed out first (a reduction, not
    counted, as torch does before its bmm); with no contracted index at all (an outer or
    elementwise product) torch multiplies elementwise: 0, as FlopCounterMode counts it."""
    inputs, output = parse_einsum(equation, shapes)
    if len(inputs) != 2:
        raise CostlensError(f"einsum {equation!r}: only two-operand contractions are priced")
    sizes: dict[str, int] = {}
    for labels, shape in zip(inputs, shapes):
        for label, dim in zip(labels, shape):
            sizes[label] = max(sizes.get(label, 1), dim)     # broadcast: a 1 meets the other's size
    a, b = inputs
    if not any(x in a and x in b and x not in output for x in sizes):
        return 0          # nothing contracted (outer or elementwise product): torch runs a mul, not a bmm
    used = [x for x in sizes if x in output or (x in a and x in b)]
    return 2 * numel(tuple(sizes[x] for x in used))


def parse_einsum(equation: str, shapes: list[tuple[int, ...]]) -> tuple[list[str], str]:
    """Operand labels and output labels of an einsum equation, ``...`` expanded into one label
    per broadcast dimension (ONNX labels are letters, so those are Greek capitals here), the
    implicit output (no ``->``) formed as numpy does: labels seen once, sorted, ellipsis first."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise CostlensError(f"einsum {equation!r}: {len(terms)} operands in the equation, {len(shapes)} given")
    n_ellipsis = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes) if "..." in t), default=0)
    dims = "".join(chr(0x391 + i) for i in range(n_ellipsis))
    inputs = []
    for term, shape in zip(terms, shapes):
        if "..." in term:
            rank = len(shape) - len(term.replace("...", ""))
            term = term.replace("...", dims[n_ellipsis - rank:])     # right-aligned broadcast dims
        if len(term) != len(shape):
            raise CostlensError(f"einsum {equation!r}: term {term!r} does not match a rank-{len(shape)} operand")
        inputs.append(term)
    if arrow:
        output = rhs.replace("...", dims)
    else:
        counts = {x: sum(t.count(x) for t in inputs) for t in inputs for x in t}
        output = dims + "".join(sorted(x for x, n in counts.items() if n == 1 and x not in dims))
    return inputs, output


def lora_flops(tokens: int, rank: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs (2 x MACs) of one LoRA adapter's x·A·B over ``tokens`` rows (the base product excluded)."""
    # x[T,in] @ A[in,r] -> [T,r]; then @ B[r,out] -> [T,out]
    return matmul_flops(tokens, d_in, rank) + matmul_flops(tokens, rank, d_out)


def dora_weight_flops(rank: int, d_in: int, d_out: int) -> int:
    """FLOPs (2 x MACs) DoRA spends each forward making B·A for its weight norm, independent of the tokens."""
    # PEFT's DoRA makes B·A each forward as lora_B(lora_A(eye(in))): [in,in] @ A -> [in,r] @ B -> [in,out]
    return matmul_flops(d_in, d_in, rank) + matmul_flops(d_in, rank, d_out)


def attention_core_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """Forward FLOPs (2 x MACs) of attention's two products, Q·Kᵀ and P·V, over the full q_len x kv_len
    scores (no causal discount, as torch.utils.flop_counter counts them); softmax is not counted."""
    # scores [b,h,q,d] @ [b,h,d,kv] and context [b,h,q,kv] @ [b,h,kv,d]
    return 2 * matmul_flops(batch * heads * q_len, head_dim, kv_len)


def routed_expert_flops(tokens: int, top_k: int, per_expert_weight_elements: int) -> int:
    """Forward FLOPs (2 x MACs) of routed experts: each token runs ``top_k`` experts, whose matrices hold
    ``per_expert_weight_elements`` elements together (not all E experts' weights)."""
    # each token runs k experts; each expert matrix costs 2 FLOPs per weight element per token
    return 2 * tokens * top_k * per_expert_weight_elements


def merged_expert_delta_flops(n_experts: int, rank: int, d_in: int, d_out: int) -> int:
    """FLOPs (2 x MACs) of one evaluation of W + B·A for every expert of a 3-D weight with LoRA (PEFT's
    ``target_parameters``), independent of the tokens."""
    # W + B·A per expert as one baddbmm: [E, out, r] @ [E, r, in] -> [E, out, in]
    return matmul_flops(n_experts * d_out, rank, d_in)
