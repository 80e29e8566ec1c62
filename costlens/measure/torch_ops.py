"""ONNX ops as torch calls, for the graph executor (measure/executor.py).

Only the transformer op set the front ends produce. Each implementation follows the ONNX
operator spec and calls the torch function a PyTorch model would call, so that autograd
saves the same tensors (``F.linear`` for Gemm, ``torch.matmul`` for MatMul, ``F.gelu``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from costlens.errors import CostlensError
from costlens.ops.registry import rule_table

OPS: dict[str, Callable] = {}
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


op = rule_table(OPS, "torch implementation")


def run_op(node, args: list) -> list:
    """Run one ONNX node on its input tensors with the torch implementation of its op; the outputs
    as a list (CostlensError for an op the executor has no implementation of)."""
    fn = OPS.get(node.op)
    if fn is None:
        raise CostlensError(f"the executor cannot run op {node.op!r} (node {node.name!r})")
    result = fn(node, *args)
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _ints(tensor) -> list[int]:
    return [int(v) for v in torch.as_tensor(tensor).reshape(-1).tolist()]


def _axis(node, key: str, default: int) -> int:
    return int(node.attr(key, default))


# --------------------------------------------------------------------------- arithmetic
op("Add")(lambda n, a, b: a + b)
op("Sub")(lambda n, a, b: a - b)
op("Mul")(lambda n, a, b: a * b)
op("Div")(lambda n, a, b: a / b)
op("Neg")(lambda n, x: -x)
op("Sqrt")(lambda n, x: torch.sqrt(x))
op("Reciprocal")(lambda n, x: torch.reciprocal(x))
op("Exp")(lambda n, x: torch.exp(x))
op("Log")(lambda n, x: torch.log(x))
op("Cos")(lambda n, x: torch.cos(x))
op("Sin")(lambda n, x: torch.sin(x))
op("Tanh")(lambda n, x: torch.tanh(x))
op("Erf")(lambda n, x: torch.erf(x))
op("Sigmoid")(lambda n, x: torch.sigmoid(x))
op("Relu")(lambda n, x: F.relu(x))
op("Abs")(lambda n, x: torch.abs(x))
op("Equal")(lambda n, a, b: a == b)
op("Less")(lambda n, a, b: a < b)
op("Greater")(lambda n, a, b: a > b)
op("Not")(lambda n, x: ~x)
op("Identity", "Dropout")(lambda n, x, *rest: x)


@op("Pow")
def _pow(node, x, exponent):
    exponent = exponent.item() if exponent.numel() == 1 else exponent
    return torch.pow(x, exponent)


@op("Where")
def _where(node, condition, x, y):
    return torch.where(condition.bool(), x, y)


@op("Gelu")
def _gelu(node, x):
    return F.gelu(x, approximate=node.attr("approximate", "none"))


@op("Softmax")
def _softmax(node, x):
    return torch.softmax(x, dim=_axis(node, "axis", -1))


@op("Cast")
def _cast(node, x):
    return x.to(_DTYPES[int(node.attr("to"))])


# --------------------------------------------------------------------------- products
@op("MatMul")
def _matmul(node, a, b):
    if a.dim() == 2 and b.dim() >= 3:
        # [t, d] @ [E, d, f]: run it as a batched product over an expanded view, as expert code
        # does; torch.matmul would fold it into one mm over a transposed copy of the weight
        a = a.expand(*b.shape[:-2], *a.shape)
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(node, a, b, c=None):
    if node.attr("transA", 0):
        a = a.t()
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)            # what nn.Linear runs: addmm / mm with the weight's view
    out = alpha * torch.matmul(a, b.t() if node.attr("transB", 0) else b)
    return out if c is None else out + beta * c


# --------------------------------------------------------------------------- norms, reductions
@op("LayerNormalization")
def _layer_norm(node, x, scale, bias=None):
    axis = _axis(node, "axis", -1)
    shape = x.shape[axis:] if axis >= 0 else x.shape[axis:]
    return F.layer_norm(x, shape, scale, bias, eps=float(node.attr("epsilon", 1e-5)))


def _reduce(fn):
    def run(node, x, axes=None):
        dims = _ints(axes) if axes is not None else list(node.attr("axes", ()) or range(x.dim()))
        return fn(x, dim=dims, keepdim=bool(node.attr("keepdims", 1)))
    return run


op("ReduceMean")(_reduce(torch.mean))
op("ReduceSum")(_reduce(torch.sum))


@op("TopK")
def _topk(node, x, k):
    values, indices = torch.topk(x, _ints(k)[0], dim=_axis(node, "axis", -1),
                                 largest=bool(node.attr("largest", 1)), sorted=bool(node.attr("sorted", 1)))
    return values, indices


@op("ScatterElements")
def _scatter(node, data, indices, updates):
    return torch.scatter(data, _axis(node, "axis", 0), indices.long(), updates)


@op("Gather")
def _gather(node, data, indices):
    axis = _axis(node, "axis", 0)
    if indices.dim() == 0:
        return torch.select(data, axis, int(indices))
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return F.embedding(indices.long(), data)               # an embedding lookup, as nn.Embedding runs it
    return torch.index_select(data, axis, indices.reshape(-1).long()).reshape(
        data.shape[:axis] + indices.shape + data.shape[axis + 1:])


# --------------------------------------------------------------------------- shapes
@op("Shape")
def _shape(node, x):
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


@op("Reshape")
def _reshape(node, x, shape):
    target = _ints(shape)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return torch.reshape(x, target)


@op("Transpose")
def _transpose(node, x):
    perm = node.attr("perm") or tuple(reversed(range(x.dim())))
    return x.permute(*perm)


@op("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    for axis in sorted(a % (x.dim() + len(_ints(axes))) for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


@op("Squeeze")
def _squeeze(node, x, axes=None):
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in _ints(axes)), reverse=True):
        x = x.squeeze(axis)
    return x


@op("Concat")
def _concat(node, *xs):
    return torch.cat([x for x in xs if x is not None], dim=_axis(node, "axis", 0))


@op("Split")
def _split(node, x, split=None):
    axis = _axis(node, "axis", 0)
    if split is not None:
        return torch.split(x, _ints(split), dim=axis)
    parts = int(node.attr("num_outputs", len(node.outputs)))
    return torch.chunk(x, parts, dim=axis)


@op("Slice")
def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return x[tuple(index)]


@op("Expand")
def _expand(node, x, shape):
    target = _ints(shape)
    rank = max(len(target), x.dim())
    dims = [1] * (rank - x.dim()) + list(x.shape)
    target = [1] * (rank - len(target)) + target
    return x.reshape(dims).expand([max(a, b) if a == 1 or b == 1 else b for a, b in zip(dims, target)])


@op("Range")
def _range(node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("ConstantOfShape")
def _constant_of_shape(node, shape):
    value = node.attr("value")
    fill = 0.0
    dtype = torch.float32
    if value is not None:
        from onnx import numpy_helper
        array = numpy_helper.to_array(value)
        fill, dtype = array.reshape(-1)[0].item(), torch.from_numpy(array).dtype
    return torch.full(_ints(shape), fill, dtype=dtype)


@op("Trilu")
def _trilu(node, x, k=None):
    diagonal = _ints(k)[0] if k is not None else 0
    return torch.triu(x, diagonal) if node.attr("upper", 1) else torch.tril(x, diagonal)


# --------------------------------------------------------------------------- onnxruntime contrib ops
# Fused ops of onnxruntime-genai's model builder, written out as the eager PyTorch modules they
# replace (an RMSNorm module, eager attention, a sparse MoE block), so that autograd saves what
# training those modules saves. ops/saved.py prices exactly these tensors.

def _rms_norm(x, weight, epsilon: float):
    # as a torch RMSNorm module (fixtures/models.py RMSNorm, Hugging Face LlamaRMSNorm)
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + epsilon))


def _check_last_axis(node, x) -> None:
    axis = int(node.attr("axis", -1))
    if axis not in (-1, x.dim() - 1):
        raise CostlensError(f"{node.op}: only the last axis is normalized here (axis={axis})")


@op("SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization")
def _simplified_layer_norm(node, x, scale):
    _check_last_axis(node, x)
    return _rms_norm(x, scale, float(node.attr("epsilon", 1e-5)))


@op("com.microsoft.SkipSimplifiedLayerNormalization")
def _skip_simplified_layer_norm(node, x, skip, gamma, bias=None):
    """(rmsnorm(x + skip + bias) * gamma, mean, inv_std_var, x + skip + bias); the statistics
    outputs are not produced (the model builder leaves them unconnected)."""
    summed = x + skip
    if bias is not None:
        summed = summed + bias
    return _rms_norm(summed, gamma, float(node.attr("epsilon", 1e-5))), None, None, summed


def _rotate(x, cos, sin, interleaved: bool):
    """RoPE on [b, h, s, hd] with cos / sin [s, hd / 2], computed on the halves (or the even and odd
    lanes), so only the constant tables are kept for backward."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _repeat_kv(x, n_rep: int):
    """[b, kvh, s, hd] -> [b, kvh * n_rep, s, hd], each kv head serving n_rep query heads
    (Hugging Face ``repeat_kv``: expand, then one copy)."""
    if n_rep == 1:
        return x
    b, kvh, s, hd = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, s, hd).reshape(b, kvh * n_rep, s, hd)


@op("com.microsoft.GroupQueryAttention")
def _group_query_attention(node, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                           total_sequence_length=None, cos_cache=None, sin_cache=None, *rest):
    """Prompt-only (no KV cache), full-length rows: causal eager attention as torch.matmul ->
    softmax -> torch.matmul, with RoPE from the caches at positions 0..S-1 and kv heads
    repeated for the query heads. Returns (output [b, s, h·hd], present_key, present_value)."""
    if past_key is not None and past_key.numel() or past_value is not None and past_value.numel():
        raise CostlensError(f"{node.name}: GroupQueryAttention with a KV cache (past_key) cannot be trained here")
    if any(x is not None for x in rest):
        raise CostlensError(f"{node.name}: GroupQueryAttention inputs beyond sin_cache (position_ids, "
                            "attention_bias, ...) are not supported")
    if int(node.attr("smooth_softmax", 0)) or int(node.attr("qk_output", 0)):
        raise CostlensError(f"{node.name}: GroupQueryAttention smooth_softmax / qk_output are not supported")
    heads, kv_heads = int(node.attr("num_heads")), int(node.attr("kv_num_heads"))
    b, s, width = query.shape
    if key is None or key.numel() == 0:                  # packed qkv in query
        head_dim = width // (heads + 2 * kv_heads)
        q, key, value = torch.split(query, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    else:
        head_dim = width // heads
        q = query
    q = q.reshape(b, s, heads, head_dim).transpose(1, 2)                 # [b, h, s, hd]
    k = key.reshape(b, s, kv_heads, head_dim).transpose(1, 2)            # [b, kvh, s, hd]
    v = value.reshape(b, s, kv_heads, head_dim).transpose(1, 2)
    if int(node.attr("do_rotary", 0)):
        if s > cos_cache.shape[0]:
            raise CostlensError(f"{node.name}: sequence length {s} exceeds the {cos_cache.shape[0]} positions of "
                                "the rotary cos/sin caches")
        if cos_cache.shape[-1] * 2 != head_dim:
            raise CostlensError(f"{node.name}: partial rotary embedding (cos_cache width {cos_cache.shape[-1]}, "
                                f"head size {head_dim}) is not supported")
        # the tables for positions 0..S-1, made per forward as a torch rotary module makes them
        cos, sin = (cache[:s].to(q.device, copy=True) for cache in (cos_cache, sin_cache))
        interleaved = bool(int(node.attr("rotary_interleaved", 0)))
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    present_key, present_value = k, v
    k, v = _repeat_kv(k, heads // kv_heads), _repeat_kv(v, heads // kv_heads)
    scale = float(node.attr("scale", 0.0)) or 1.0 / head_dim ** 0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale                 # [b, h, s, s]
    softcap = float(node.attr("softcap", 0.0))
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if int(node.attr("causal", 1)):
        scores = scores + _causal_mask(s, int(node.attr("local_window_size", -1)), scores)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)                                          # [b, h, s, hd]
    return out.transpose(1, 2).reshape(b, s, heads * head_dim), present_key, present_value


def _causal_mask(s: int, window: int, like):
    """[s, s] additive mask: query i sees keys j <= i (and j > i - window with a local window)."""
    full = torch.full((s, s), float("-inf"), dtype=like.dtype, device=like.device)
    mask = torch.triu(full, diagonal=1)
    if window >= 0:
        mask = mask + torch.tril(full, diagonal=-window)
    return mask


def _swiglu(node, h, fused: int):
    """onnxruntime's SwiGLU: G * sigmoid(alpha * G) * (L + beta), G = clamp(g, max=limit),
    L = clamp(l, -limit, limit); fc1 interleaves g and l (swiglu_fusion=1) or concatenates them (2).
    With alpha 1 the gate runs as F.silu, as a torch SwiGLU module does."""
    if fused == 1:
        gate, linear = h[..., 0::2], h[..., 1::2]
    else:
        gate, linear = h.chunk(2, dim=-1)
    limit = node.attr("swiglu_limit")
    if limit is not None:
        gate, linear = gate.clamp(max=float(limit)), linear.clamp(min=-float(limit), max=float(limit))
    alpha, beta = float(node.attr("activation_alpha", 1.0)), float(node.attr("activation_beta", 0.0))
    activated = F.silu(gate) if alpha == 1.0 else gate * torch.sigmoid(alpha * gate)
    return activated * (linear + beta if beta else linear)


_ACTIVATIONS = {"relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
                "identity": lambda x: x}


@op("com.microsoft.MoE")
def _moe(node, x, router_probs, fc1_w, fc1_b=None, fc2_w=None, fc2_b=None, fc3_w=None, fc3_b=None, *rest):
    """Routed experts, as a sparse MoE block trains them: softmax over the router logits, top-k,
    renormalized (normalize_routing_weights); each expert runs on its own tokens only (fc1, the
    activation, fc2; weights [E, out, in] used as ``F.linear`` uses [out, in]); the weighted
    outputs are added back with index_add."""
    if any(t is not None for t in rest) or int(node.attr("use_sparse_mixer", 0)):
        raise CostlensError(f"{node.name}: MoE with a sparse mixer or extra inputs is not supported")
    activation = str(node.attr("activation_type", "relu"))
    if isinstance(activation, bytes):
        activation = activation.decode()
    if activation != "swiglu" and activation not in _ACTIVATIONS:
        raise CostlensError(f"{node.name}: MoE activation {activation!r} is not supported")
    fused = int(node.attr("swiglu_fusion", 0))
    if activation == "swiglu" and fused == 0 and fc3_w is None:
        raise CostlensError(f"{node.name}: MoE swiglu without fusion needs fc3")
    top_k = int(node.attr("k", 1))
    hidden = x.shape[-1]
    flat = x.reshape(-1, hidden)
    n_experts = fc1_w.shape[0]
    probs = torch.softmax(router_probs.reshape(-1, n_experts), dim=-1)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if int(node.attr("normalize_routing_weights", 0)):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(n_experts):
        token, slot = torch.where(chosen == e)
        tokens = flat[token]
        h = F.linear(tokens, fc1_w[e], None if fc1_b is None else fc1_b[e])
        if activation == "swiglu" and fused:
            a = _swiglu(node, h, fused)
        elif activation == "swiglu":
            up = F.linear(tokens, fc3_w[e], None if fc3_b is None else fc3_b[e])
            a = _swiglu(node, torch.stack((h, up), dim=-1).flatten(-2), 1)
        else:
            a = _ACTIVATIONS[activation](h)
        y = F.linear(a, fc2_w[e], None if fc2_b is None else fc2_b[e])
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out.reshape(x.shape)
