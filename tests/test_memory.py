"""Memory goldens on graphs small enough to price by hand (arithmetic beside each number).

Setup for all: fp32 (4 bytes), AdamW for-loop (two fp32 moments + a 4-byte step per tensor),
eager attention, steady state. The loss is cross-entropy over the graph output, so autograd
keeps log_softmax(logits); the loop keeps only the loss. The for-loop AdamW step holds two
temporaries the size of the parameter it updates plus the previous parameter's denominator.
"""
from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

from costlens.api import Model
from costlens.estimate import estimate
from costlens.frontends.onnx import load_onnx
from costlens.ir import frozen_map
from costlens.plans import Setup, parse_plan_spec
from costlens.roles import locate_roles


def _weight(name, shape):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _model(tmp_path, nodes, inits, d_in, d_out, require_attention=True) -> Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", d_out])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    ir = load_onnx(path)
    return Model(ir, locate_roles(ir, require_attention=require_attention), frozen_map(Counter()))


def test_two_layer_mlp_with_first_layer_frozen(tmp_path):
    # x[2,3,8] -> MatMul W1[8,16] (frozen) -> Relu -> MatMul W2[16,4] (trains) -> logits[2,3,4]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["logits"])]
    model = _model(tmp_path, nodes, [_weight("W1", (8, 16)), _weight("W2", (16, 4))], 8, 4, require_attention=False)
    memory = estimate(model, parse_plan_spec("train=head"), Setup(batch=2, seq=3)).memory
    assert memory.weights == (8 * 16 + 16 * 4) * 4 == 768
    assert memory.gradients == 16 * 4 * 4 == 256
    assert memory.optimizer == 2 * 64 * 4 + 4 == 516
    # saved: W2's matmul keeps its input r [6,16] = 384 B (W2 trains); Relu keeps nothing (its
    # input needs no gradient: x is data, W1 is frozen); log_softmax 6*4*4 = 96
    assert memory.activations == 384 + 96
    # backward start: weights 768 + state 516 + saved (384 + 96) + nll and log_softmax
    # gradients 2*96 = 1956; at W2: log_softmax released, dW2 256 created, dlogits 96 alive:
    # 768 + 516 + 384 + 256 + 96 = 2020; optimizer step: 768 + 516 + grads 256 + 2*256 = 2052
    assert (memory.peak, memory.peak_phase) == (2052, "optimizer")


def test_lora_linear(tmp_path):
    # x[2,3,8] -> MatMul W[8,8] (frozen) with LoRA r=2 -> logits[2,3,8]; T = 6 tokens
    model = _model(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["logits"])], [_weight("W", (8, 8))],
                   8, 8, require_attention=False)
    result = estimate(model, parse_plan_spec("lora=head;rank=2"), Setup(batch=2, seq=3))
    memory = result.memory
    assert result.params.adapter == 2 * (8 + 8) == 32
    assert memory.weights == (64 + 32) * 4 == 384
    assert memory.gradients == 32 * 4 == 128
    assert memory.optimizer == 2 * (2 * 16 * 4 + 4) == 264          # A [2,8] and B [8,2]
    # saved: x·A [6,2] = 48 B (x itself is the caller's input); log_softmax 6*8*4 = 192
    assert memory.activations == 48 + 192
    # backward start: 384 + 264 + 48 + 192 (log_softmax) + 2*192 = 1272; the optimizer step
    # (384 + 264 + 128 + 2*64 + 64 = 968) stays below
    assert (memory.peak, memory.peak_phase) == (1272, "backward")


def _attention_nodes():
    # one head of width 8: q,k,v = x·Wq, x·Wk, x·Wv; P = softmax(q·kᵀ/√8); out = (P·v)·Wo
    return [
        helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Div", ["s", "scale"], ["sd"]),
        helper.make_node("Softmax", ["sd"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["c"]),
        helper.make_node("MatMul", ["c", "Wo"], ["logits"]),
    ]


def _attention_model(tmp_path):
    inits = [_weight(n, (8, 8)) for n in ("Wq", "Wk", "Wv", "Wo")]
    inits.append(numpy_helper.from_array(np.array(8 ** 0.5, dtype=np.float32), "scale"))
    return _model(tmp_path, _attention_nodes(), inits, 8, 8)


def test_single_attention_block_all_trainable(tmp_path):
    model = _attention_model(tmp_path)
    memory = estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=4)).memory   # T = 4
    assert memory.weights == 4 * 64 * 4 == 1024
    assert memory.gradients == 1024
    assert memory.optimizer == 4 * (2 * 64 * 4 + 4) == 2064
    # saved: q [4,8] 128 and kᵀ (a view of k) 128 for q·kᵀ; P [4,4] 64 (softmax output, and
    # P·v keeps the same P); v 128; c 128 for Wo; log_softmax 4*8*4 = 128.
    # x is the caller's input; the projections' weights are resident.
    assert memory.activations == 128 * 3 + 64 + 128 + 128


def test_fused_attention_keeps_no_score_matrix(tmp_path):
    model = _attention_model(tmp_path)
    eager = estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=4)).memory.activations
    fused = estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=4, attention="fused")).memory.activations
    # fused drops P (64) and adds the kernel's logsumexp, one fp32 per head per row: 1*4*4 = 16
    assert eager - fused == 64 - 16


def test_frozen_attention_saves_nothing_below_the_lowest_trainable(tmp_path):
    model = _attention_model(tmp_path)
    frozen = estimate(model, parse_plan_spec("train=o"), Setup(batch=1, seq=4)).memory
    # only Wo trains: q·kᵀ, softmax and P·v need no gradient and keep nothing; Wo keeps c (128)
    assert frozen.activations == 128 + 128
    assert frozen.gradients == 64 * 4


def test_mixed_precision_adds_master_weights(tmp_path):
    model = _attention_model(tmp_path)
    memory = estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=4, precision="bf16-mixed")).memory
    assert memory.weights == 4 * 64 * 2                     # bf16 weights
    assert memory.gradients == 4 * 64 * 2                   # bf16 gradients
    assert memory.optimizer == 4 * (2 * 64 * 4 + 4) + 4 * 64 * 4   # fp32 moments + fp32 master


def test_optimizer_state_by_kind(tmp_path):
    model = _attention_model(tmp_path)
    by_optimizer = {opt: estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=4, optimizer=opt)).memory.optimizer
                    for opt in ("adamw", "sgd", "sgd-momentum", "adafactor")}
    assert by_optimizer["sgd"] == 0
    assert by_optimizer["sgd-momentum"] == 4 * 64 * 4
    assert by_optimizer["adafactor"] == 4 * ((8 + 8) * 4 + 4)     # a row and a column vector per matrix
    assert by_optimizer["adamw"] == 4 * (2 * 64 * 4 + 4)
