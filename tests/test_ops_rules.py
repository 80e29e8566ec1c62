"""The op rules (costlens/ops/): hand-derived goldens beside their arithmetic, and the same
formulas checked against torch.utils.flop_counter.FlopCounterMode and torch's saved tensors
on the equivalent torch ops (``@pytest.mark.torch``)."""
from __future__ import annotations

from types import MappingProxyType

import pytest

from costlens.ir import Node
from costlens.ops import costs
from costlens.ops.attention import DIMS
from costlens.ops.registry import Backward, Extra, Needed, lookup


def node(op, inputs, outputs=("y",), **attrs) -> Node:
    return Node(name="n", op=op, inputs=tuple(inputs), outputs=tuple(outputs), attrs=MappingProxyType(attrs))


class Ctx:
    """A FlopContext and SavedContext over explicit shapes and flags (fp32). Tensors named
    ``w*`` are weights."""

    def __init__(self, shapes: dict, needs=(), trains=False, fused=False, act=4):
        self._shapes, self._needs, self._trains, self._fused, self._act = shapes, set(needs), trains, fused, act

    def shape(self, tensor):
        return self._shapes.get(tensor)

    def is_weight(self, tensor):
        return tensor.startswith("w")

    def needs(self, tensor):
        return tensor in self._needs

    receives = needs

    def trains(self, _node):
        return self._trains

    def is_fused_inner(self, _tensor):
        return False

    def rows(self, tensor):
        shape = self._shapes[tensor]
        return costs.numel(shape) // shape[-1]

    def stat_bytes(self):
        return 4

    def act_bytes(self, op=""):
        return self._act

    def fused_attention(self):
        return self._fused

    def weight_bytes(self):
        return 4


def forward(n: Node, ctx: Ctx):
    return lookup(n.op).forward_flops(n, ctx)


def backward(n: Node, ctx: Ctx, inputs=(), weight=False) -> Backward:
    return lookup(n.op).backward_flops(n, ctx, Needed(frozenset(inputs), weight), forward(n, ctx))


def saved_bytes(n: Node, ctx: Ctx) -> int:
    found = {}
    for item in lookup(n.op).saved_by(n, ctx):
        found[item.key if isinstance(item, Extra) else item] = (
            item.n_bytes if isinstance(item, Extra) else 4 * costs.numel(ctx.shape(item)))
    return sum(found.values())


# --------------------------------------------------------------------------- Einsum

@pytest.mark.parametrize("equation, shapes, golden", [
    ("ij,jk->ik", [(4, 6), (6, 5)], 240),                    # 2*4*6*5 = 240
    ("bsd,df->bsf", [(2, 4, 6), (6, 5)], 480),               # a linear: 2*(2*4)*6*5 = 480
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)], 1920),  # attention scores: 2*2*3*4*5*8 = 1920
    ("...ij,jk->...ik", [(2, 3, 4, 6), (6, 5)], 1440),       # ellipsis batch: 2*(2*3)*4*6*5 = 1440
    ("...ij,...jk", [(2, 3, 4, 6), (3, 6, 5)], 1440),        # implicit output, broadcast batch: same
    ("bij,bjk", [(2, 4, 6), (2, 6, 5)], 480),                # implicit output -> bik: 2*2*4*6*5 = 480
    ("ij,jk->k", [(4, 6), (6, 5)], 60),                      # i summed out of A first: 2*6*5 = 60
    ("i,i->", [(7,), (7,)], 14),                              # a dot product: 2*7 = 14
    ("ij,j->i", [(4, 5), (5,)], 40),                         # matrix-vector: 2*4*5 = 40
    ("i,j->ij", [(4,), (5,)], 0),                            # outer product: elementwise, not counted
    ("bij,bij->bij", [(2, 4, 5), (2, 4, 5)], 0),             # Hadamard product: not counted
])
def test_einsum_golden(equation, shapes, golden):
    ctx = Ctx({"a": shapes[0], "b": shapes[1]})
    assert forward(node("Einsum", ["a", "b"], equation=equation), ctx) == golden


def test_einsum_one_operand_is_zero_three_is_unpriced():
    ctx = Ctx({"a": (4, 6), "b": (6, 5), "c": (5, 3)})
    assert forward(node("Einsum", ["a"], equation="ij->ji"), ctx) == 0          # a permutation
    assert lookup("Einsum").saved_by(node("Einsum", ["a"], equation="ij->ji"), Ctx({}, needs={"a"})) == []
    assert forward(node("Einsum", ["a", "b", "c"], equation="ij,jk,kl->il"), ctx) is None
    assert forward(node("Einsum", ["a", "b"], equation="ijk,jk->i"), ctx) is None   # rank mismatch: unknown


def test_einsum_backward_and_saved_are_a_matmuls():
    # x [2,4,6] . w [6,5]: forward 480; dX and dW each one forward's worth
    n = node("Einsum", ["x", "w"], equation="bsd,df->bsf")
    ctx = Ctx({"x": (2, 4, 6), "w": (6, 5)})
    assert backward(n, ctx, inputs={0}, weight=True) == (480, 480)
    assert backward(n, ctx, inputs={0}, weight=False) == (480, 0)
    assert backward(n, ctx, inputs=(), weight=True) == (0, 480)
    assert lookup("Einsum").saved_by(n, Ctx({}, needs={"x"}, trains=True)) == ["x"]   # dW = xᵀ·dY
    assert lookup("Einsum").saved_by(n, Ctx({}, needs={"x"}, trains=False)) == []     # w is resident
    scores = node("Einsum", ["q", "k"], equation="bhqd,bhkd->bhqk")
    # two activations: each gradient reads the other operand
    assert lookup("Einsum").saved_by(scores, Ctx({}, needs={"q", "k"})) == ["q", "k"]
    assert backward(scores, Ctx({"q": (2, 3, 4, 8), "k": (2, 3, 5, 8)}), inputs={0, 1}) == (2 * 1920, 0)


# --------------------------------------------------------------------------- FusedMatMul

@pytest.mark.parametrize("a_shape, b_shape, attrs", [
    ((2, 3, 4, 6), (2, 3, 6, 5), {}),
    ((2, 3, 6, 4), (2, 3, 6, 5), {"transA": 1}),                     # A [.., K, M]
    ((4, 2, 3, 6), (2, 3, 6, 5), {"transBatchA": 1}),                # A [M, B, H, K] runs as [B, H, M, K]
    ((6, 2, 3, 4), (2, 3, 6, 5), {"transBatchA": 1, "transA": 1}),   # A [K, B, H, M]
    ((2, 3, 4, 6), (5, 2, 3, 6), {"transBatchB": 1, "transB": 1}),   # B [N, B, H, K]
    ((2, 3, 4, 6), (6, 5), {"alpha": 0.125}),                        # broadcast B; alpha not counted
])
def test_fused_matmul_golden(a_shape, b_shape, attrs):
    # every case is [2,3] batches of [4,6] @ [6,5]: 2*(2*3)*4*6*5 = 1440
    n = node("com.microsoft.FusedMatMul", ["x", "w"], **attrs)
    ctx = Ctx({"x": a_shape, "w": b_shape})
    assert forward(n, ctx) == 1440
    assert backward(n, ctx, inputs={0}, weight=True) == (1440, 1440)


# --------------------------------------------------------------------------- Conv

def test_conv_golden():
    # x [2,3,8,8] * w [4,3,3,3] -> y [2,4,6,6]: 2 * 2 * (6*6) * (4*3*3*3) = 2*2*36*108 = 15552
    n = node("Conv", ["x", "w", "wb"])
    ctx = Ctx({"x": (2, 3, 8, 8), "w": (4, 3, 3, 3), "wb": (4,), "y": (2, 4, 6, 6)})
    assert forward(n, ctx) == 15552
    assert backward(n, ctx, inputs={0}, weight=True) == (15552, 15552)
    assert backward(n, ctx, inputs=(), weight=True) == (0, 15552)
    # grouped conv1d: x [2,4,10] * w [6,2,3] (group 2) -> y [2,6,8]: 2 * 2 * 8 * (6*2*3) = 1152
    grouped = node("Conv", ["x", "w"], group=2)
    assert forward(grouped, Ctx({"x": (2, 4, 10), "w": (6, 2, 3), "y": (2, 6, 8)})) == 1152


def test_conv_saves_its_input_whenever_it_runs_backward():
    # convolution_backward reads input and weight for every gradient (the weight is resident)
    n = node("Conv", ["x", "w"])
    assert lookup("Conv").saved_by(n, Ctx({}, needs={"x"}, trains=False)) == ["x"]
    assert lookup("Conv").saved_by(n, Ctx({}, needs=(), trains=True)) == ["x"]
    assert lookup("Conv").saved_by(n, Ctx({}, needs=(), trains=False)) == []


# --------------------------------------------------------------------------- fused attention

ATTENTION_CASES = [
    # ONNX Attention, 3-D: Q [2,5,4*8], K [2,7,2*8], V [2,7,2*6], 4 query heads, 2 kv heads:
    # scores 2*2*4*5*7*8 = 4480, context 2*2*4*5*7*6 = 3360 -> 7840
    ("Attention", ["q", "k", "v"], {"q": (2, 5, 32), "k": (2, 7, 16), "v": (2, 7, 12)},
     {"q_num_heads": 4, "kv_num_heads": 2}, 7840),
    # ONNX Attention, 4-D: Q [2,4,5,8], K, V [2,2,7,8]: 2 * (2*2*4*5*7*8) = 8960
    ("Attention", ["q", "k", "v"], {"q": (2, 4, 5, 8), "k": (2, 2, 7, 8), "v": (2, 2, 7, 8)}, {}, 8960),
    # MultiHeadAttention: query [2,5,32], key / value [2,7,32], 4 heads of 8: 2*2*(2*4*5*7*8) = 8960
    ("com.microsoft.MultiHeadAttention", ["q", "k", "v"], {"q": (2, 5, 32), "k": (2, 7, 32), "v": (2, 7, 32)},
     {"num_heads": 4}, 8960),
    # GroupQueryAttention: q [2,5,4*8], k / v [2,5,2*8]: 2*2*(2*4*5*5*8) = 6400
    ("com.microsoft.GroupQueryAttention", ["q", "k", "v"], {"q": (2, 5, 32), "k": (2, 5, 16), "v": (2, 5, 16)},
     {"num_heads": 4, "kv_num_heads": 2}, 6400),
    # com.microsoft.Attention: x [2,5,16] @ w [16, 3*32]: 2*10*16*96 = 30720, + core 6400 = 37120
    ("com.microsoft.Attention", ["q", "w"], {"q": (2, 5, 16), "w": (16, 96)}, {"num_heads": 4}, 37120),
    # PackedAttention: x [10 tokens, 16], w [16, 96], token_offset [2, 5]: the same 37120
    ("com.microsoft.PackedAttention", ["q", "w", "", "offsets"], {"q": (10, 16), "w": (16, 96), "offsets": (2, 5)},
     {"num_heads": 4}, 37120),
    # PackedMultiHeadAttention: query / key / value [10, 32], token_offset [2, 5]: 6400
    ("com.microsoft.PackedMultiHeadAttention", ["q", "k", "v", "", "offsets"],
     {"q": (10, 32), "k": (10, 32), "v": (10, 32), "offsets": (2, 5)}, {"num_heads": 4}, 6400),
]


@pytest.mark.parametrize("op, inputs, shapes, attrs, golden", ATTENTION_CASES)
def test_fused_attention_golden(op, inputs, shapes, attrs, golden):
    assert forward(node(op, inputs, **attrs), Ctx(shapes)) == golden


def test_fused_attention_backward_is_eager_attentions():
    # ONNX Attention above: scores 4480, context 3360. All of q, k, v: dQ + dK = 2*4480,
    # dProbs + dV = 2*3360 -> 15680 = 2 x forward; v alone: dV = 3360
    n = node("Attention", ["q", "k", "v"], q_num_heads=4, kv_num_heads=2)
    ctx = Ctx({"q": (2, 5, 32), "k": (2, 7, 16), "v": (2, 7, 12)})
    assert backward(n, ctx, inputs={0, 1, 2}) == (15680, 0)
    assert backward(n, ctx, inputs={2}) == (3360, 0)
    assert backward(n, ctx, inputs={0}) == (4480 + 3360, 0)          # dQ, dProbs
    # com.microsoft.Attention: projection 30720 + core 6400; everything trains: dX 30720 + core
    # backward 2*6400, dW 30720
    packed = node("com.microsoft.Attention", ["x", "w"], num_heads=4)
    ctx = Ctx({"x": (2, 5, 16), "w": (16, 96)})
    assert backward(packed, ctx, inputs={0}, weight=True) == (30720 + 12800, 30720)
    assert backward(packed, ctx, inputs=(), weight=True) == (12800, 30720)


def test_fused_attention_saved_as_the_gqa_rule():
    # MultiHeadAttention, b=2, h=4, s_q=5, s_kv=7, d=8, fp32: probs 2*4*5*7*4 = 1120 B,
    # q 2*4*5*8*4 = 1280, k and v 2*4*7*8*4 = 1792 each
    n = node("com.microsoft.MultiHeadAttention", ["q", "k", "v"], num_heads=4)
    shapes = {"q": (2, 5, 32), "k": (2, 7, 32), "v": (2, 7, 32)}
    assert saved_bytes(n, Ctx(shapes, needs={"q", "k", "v"})) == 1120 + 1280 + 1792 + 1792
    assert saved_bytes(n, Ctx(shapes, needs={"v"})) == 1120                    # dV = probsᵀ·dO
    # fused: q 1280 + k 1792 + v 1792 + out 1280 + logsumexp 2*4*5*4 = 160
    assert saved_bytes(n, Ctx(shapes, needs={"q"}, fused=True)) == 1280 + 1792 + 1792 + 1280 + 160
    assert saved_bytes(n, Ctx(shapes)) == 0
    # GroupQueryAttention with equal lengths: the generic and the GQA rule agree (no rope, no softcap)
    gqa = node("com.microsoft.GroupQueryAttention", ["q", "k", "v"], num_heads=4, kv_num_heads=2)
    mha = node("com.microsoft.MultiHeadAttention", ["q", "k", "v"], num_heads=4)
    for fused in (False, True):
        gqa_ctx = Ctx({"q": (2, 5, 32), "k": (2, 5, 16), "v": (2, 5, 16)}, needs={"q", "k", "v"}, fused=fused)
        mha_ctx = Ctx({"q": (2, 5, 32), "k": (2, 5, 32), "v": (2, 5, 32)}, needs={"q", "k", "v"}, fused=fused)
        assert saved_bytes(gqa, gqa_ctx) == saved_bytes(mha, mha_ctx)


def test_attention_without_head_counts_is_unpriced():
    assert forward(node("Attention", ["q", "k", "v"]), Ctx({"q": (2, 5, 32), "k": (2, 7, 16), "v": (2, 7, 16)})) is None
    assert forward(node("com.microsoft.MultiHeadAttention", ["q", "k", "v"]), Ctx({"q": (2, 5, 32)})) is None


# --------------------------------------------------------------------------- saved rules

def test_activation_and_norm_saved_goldens():
    x = (2, 4, 5, 6)                   # 240 elements, 960 B in fp32
    for op in ("HardSigmoid", "com.microsoft.Gelu"):
        assert lookup(op).saved_by(node(op, ["x"]), Ctx({"x": x}, needs={"x"})) == ["x"]
        assert lookup(op).saved_by(node(op, ["x"]), Ctx({"x": x})) == []
    assert lookup("PRelu").saved_by(node("PRelu", ["x", "slope"]), Ctx({}, needs={"x"})) == ["x", "slope"]
    assert lookup("PRelu").saved_by(node("PRelu", ["x", "w"]), Ctx({}, needs={"x"})) == ["x"]   # resident slope
    assert saved_bytes(node("Softsign", ["x"]), Ctx({"x": x}, needs={"x"})) == 960 + 960   # x and 1 + |x|
    # batch norm over C=4: x 960 + save_mean, save_invstd 2*4*4 = 32
    assert saved_bytes(node("BatchNormalization", ["x", "w", "wb"]), Ctx({"x": x}, needs={"x"})) == 960 + 32
    # group norm, N=2, G=2: x 960 + mean, rstd 2*(2*2)*4 = 32
    assert saved_bytes(node("GroupNormalization", ["x", "w", "wb"], num_groups=2), Ctx({"x": x}, needs={"x"})) \
        == 960 + 32
    # instance norm, N*C = 8: x 960 + mean, rstd 2*8*4 = 64 + the scale repeated to [8] 32
    assert saved_bytes(node("InstanceNormalization", ["x", "w", "wb"]), Ctx({"x": x}, needs={"x"})) \
        == 960 + 64 + 32
    assert saved_bytes(node("BatchNormalization", ["x", "w", "wb"]), Ctx({"x": x}, trains=True)) == 960 + 32
    assert saved_bytes(node("BatchNormalization", ["x", "w", "wb"]), Ctx({"x": x})) == 0


# --------------------------------------------------------------------------- against torch

torch_only = pytest.mark.torch


def _torch():
    return pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")


def _counted(fn, *args, backward_too=False) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs FlopCounterMode counts for fn(*args)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    fwd = counter.get_total_flops()
    if not backward_too:
        return fwd, fwd
    with FlopCounterMode(display=False) as counter:
        fn(*args).sum().backward()
    del out
    return fwd, counter.get_total_flops()


@torch_only
@pytest.mark.parametrize("equation, shapes", [
    ("ij,jk->ik", [(4, 6), (6, 5)]), ("bsd,df->bsf", [(2, 4, 6), (6, 5)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)]), ("...ij,jk->...ik", [(2, 3, 4, 6), (6, 5)]),
    ("bij,bjk", [(2, 4, 6), (2, 6, 5)]), ("ij,jk->k", [(4, 6), (6, 5)]), ("bqd,bkd->bqk", [(3, 4, 8), (3, 5, 8)]),
    ("ij,j->i", [(4, 5), (5,)]), ("i,j->ij", [(4,), (5,)]), ("bij,bij->bij", [(2, 4, 5), (2, 4, 5)]),
    ("...d,d->...", [(2, 3, 4), (4,)]),
])
def test_einsum_rule_is_what_flop_counter_counts(equation, shapes):
    torch = _torch()
    a, b = (torch.randn(*s, requires_grad=True) for s in shapes)
    fwd, total = _counted(lambda p, q: torch.einsum(equation, p, q), a, b, backward_too=True)
    ctx = Ctx({"a": shapes[0], "w": shapes[1]})
    n = node("Einsum", ["a", "w"], equation=equation)
    assert forward(n, ctx) == fwd
    grads = backward(n, ctx, inputs={0}, weight=True)
    assert fwd + grads.input + grads.weight == total          # dA and dB: 3 x forward in all


@torch_only
@pytest.mark.parametrize("x_shape, w_shape, groups, stride, padding", [
    ((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 0), ((2, 4, 9, 9), (6, 2, 3, 3), 2, 2, 1), ((2, 4, 10), (6, 2, 3), 2, 1, 0),
    ((1, 3, 7), (5, 3, 1), 1, 1, 0),
])
def test_conv_rule_is_what_flop_counter_counts(x_shape, w_shape, groups, stride, padding):
    torch = _torch()
    import torch.nn.functional as F
    conv = F.conv2d if len(x_shape) == 4 else F.conv1d
    x, w = torch.randn(*x_shape, requires_grad=True), torch.randn(*w_shape, requires_grad=True)
    y = conv(x, w, stride=stride, padding=padding, groups=groups)
    fwd, total = _counted(lambda p, q: conv(p, q, stride=stride, padding=padding, groups=groups), x, w,
                          backward_too=True)
    n = node("Conv", ["x", "w"], group=groups)
    ctx = Ctx({"x": x_shape, "w": w_shape, "y": tuple(y.shape)})
    assert forward(n, ctx) == fwd
    grads = backward(n, ctx, inputs={0}, weight=True)
    assert grads == (fwd, fwd)
    # FlopCounterMode's grad_weight formula ignores groups (it counts a grouped dW group times
    # over); the rule prices the arithmetic, one forward's worth
    assert fwd + grads.input + groups * grads.weight == total


@torch_only
@pytest.mark.parametrize("a_shape, b_shape, attrs", [
    ((2, 3, 6, 4), (2, 3, 6, 5), {"transA": 1}), ((4, 2, 3, 6), (2, 3, 6, 5), {"transBatchA": 1}),
    ((6, 2, 3, 4), (2, 3, 6, 5), {"transBatchA": 1, "transA": 1}), ((2, 3, 4, 6), (5, 2, 3, 6),
                                                                     {"transBatchB": 1, "transB": 1}),
])
def test_fused_matmul_rule_is_what_flop_counter_counts(a_shape, b_shape, attrs):
    torch = _torch()

    def op_(t, trans, batch):          # onnxruntime's FusedMatMul operand transform
        if batch:
            t = t.permute(*range(1, t.dim() - 1), 0, t.dim() - 1)
        return t.transpose(-1, -2) if trans else t
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    fwd, _ = _counted(lambda p, q: op_(p, attrs.get("transA"), attrs.get("transBatchA"))
                      @ op_(q, attrs.get("transB"), attrs.get("transBatchB")), a, b)
    assert forward(node("com.microsoft.FusedMatMul", ["a", "b"], **attrs), Ctx({"a": a_shape, "b": b_shape})) == fwd


@torch_only
@pytest.mark.parametrize("op, inputs, shapes, attrs, golden", ATTENTION_CASES[:4])
def test_attention_rule_is_what_eager_attention_counts(op, inputs, shapes, attrs, golden):
    """Eager attention with bmm-shaped products (q·kᵀ, softmax, probs·v) under FlopCounterMode."""
    torch = _torch()
    n = node(op, inputs, **attrs)
    dims = DIMS[op](n, Ctx(shapes))
    b, h, sq, skv, d, dv = dims
    q = torch.randn(b, h, sq, d, requires_grad=True)
    k = torch.randn(b, h, skv, d, requires_grad=True)
    v = torch.randn(b, h, skv, dv, requires_grad=True)
    fwd, total = _counted(lambda q_, k_, v_: torch.softmax(q_ @ k_.transpose(-1, -2), -1) @ v_, q, k, v,
                          backward_too=True)
    assert forward(n, Ctx(shapes)) == fwd == golden
    grads = backward(n, Ctx(shapes), inputs={0, 1, 2})
    assert fwd + grads.input == total


def _saved_storage_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves for fn(*args), inputs' storages excluded
    unless a rule names them (the test then adds them back)."""
    torch = _torch()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


@torch_only
@pytest.mark.parametrize("op, attrs, fn", [
    ("HardSigmoid", {}, lambda F, x, w, b: F.hardsigmoid(x)),
    ("com.microsoft.Gelu", {}, lambda F, x, w, b: F.gelu(x)),
    ("Softsign", {}, lambda F, x, w, b: F.softsign(x)),
    ("BatchNormalization", {}, lambda F, x, w, b: F.batch_norm(x, None, None, w, b, training=True)),
    ("GroupNormalization", {"num_groups": 2}, lambda F, x, w, b: F.group_norm(x, 2, w, b)),
    ("InstanceNormalization", {}, lambda F, x, w, b: F.instance_norm(x, weight=w, bias=b)),
])
def test_saved_rules_are_what_torch_saves(op, attrs, fn):
    torch = _torch()
    import torch.nn.functional as F
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    w, b = torch.ones(4), torch.zeros(4)               # constants: resident, not counted
    measured = _saved_storage_bytes(lambda: fn(F, x, w, b)) - (16 if op in ("BatchNormalization",
                                                                             "GroupNormalization") else 0)
    inputs = ["x", "w", "wb"] if "Normalization" in op else ["x"]
    assert saved_bytes(node(op, inputs, **attrs), Ctx({"x": (2, 4, 5, 6)}, needs={"x"})) == measured


@torch_only
def test_prelu_and_conv_saved_rules_are_what_torch_saves():
    torch = _torch()
    import torch.nn.functional as F
    x, slope = torch.randn(2, 4, 5, 6, requires_grad=True), torch.rand(4, requires_grad=True)
    # prelu keeps x (960 B) and the slope (16 B), both data here
    assert _saved_storage_bytes(lambda: F.prelu(x, slope)) == 960 + 16
    assert saved_bytes(node("PRelu", ["x", "s"]), Ctx({"x": (2, 4, 5, 6), "s": (4,)}, needs={"x", "s"})) == 976
    # conv keeps x [2,3,8,8] (1536 B) and its weight (resident) even when only dX is needed
    x, w = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3)
    assert _saved_storage_bytes(lambda: F.conv2d(x, w)) - 4 * w.numel() == 1536
    assert saved_bytes(node("Conv", ["x", "w"]), Ctx({"x": (2, 3, 8, 8)}, needs={"x"})) == 1536
