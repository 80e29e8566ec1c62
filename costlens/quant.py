"""Quantized base weights (QLoRA): frozen linear weights stored as bitsandbytes keeps them.

A quantized model (transformers ``BitsAndBytesConfig``) replaces every ``nn.Linear`` except the output
head by a bitsandbytes layer; embeddings, norms and biases stay in the compute dtype. Bytes per weight
of ``n`` elements in ``d_out`` rows, as bitsandbytes 0.50 stores them (checked against real
bitsandbytes layers in tests/test_quant.py where it is installed):

- ``nf4`` (``Linear4bit``, blocksize 64): ``ceil(n/2)`` packed uint8 + one fp32 absmax per 64 elements
  + the 16-entry fp32 NF4 code table (64 bytes).
- ``nf4-dq`` (``bnb_4bit_use_double_quant=True``): the absmax quantized to uint8 (1 byte per 64
  elements) with a second fp32 absmax per 256 blocks, a 256-entry fp32 code (1,024 bytes) and an
  fp32 offset (4 bytes), beside the same 16-entry code.
- ``int8`` (``Linear8bitLt``, LLM.int8 inference weights): one int8 per element + one fp32 scale
  per row (``SCB``).

While a quantized linear runs (forward, and backward for its input gradient) bitsandbytes
dequantizes the whole weight to the compute dtype: one such copy of the largest quantized weight
is added to the forward and backward peaks (an upper bound: the copy lives only while that linear
runs, which need not be where the peak is). A quantized weight cannot train (no gradient to an
int8/uint8 tensor): a plan that trains one is refused.

What backward keeps: the 4-bit matmul (``MatMul4Bit``) keeps only the packed weight, which the
model holds anyway; the int8 one (``MatMul8bitFp`` on the CPU, ``MatMul8bitLt`` on CUDA) keeps its
input ``A`` on its autograd context whenever backward runs through it, although the frozen weight
needs no gradient: that input is an activation even where nothing else saves it (bitsandbytes 0.50,
measured in tests/test_validate_bnb.py).
"""
from __future__ import annotations

import math
from dataclasses import replace

from costlens.errors import PlanError
from costlens.roles.types import ParamUse, Role

QUANT_MODES = ("nf4", "nf4-dq", "int8")
BLOCK = 64                 # bitsandbytes 4-bit blocksize (its default)
NESTED_BLOCK = 256         # double quantization: blocks of absmax values
NF4_CODE_BYTES = 16 * 4    # the NF4 code table, fp32
NESTED_CODE_BYTES = 256 * 4 + 4   # the 8-bit dynamic code of the nested absmax, fp32, and the fp32 offset
QUANTIZED_ROLES = (Role.ATTENTION, Role.FFN, Role.ROUTER, Role.EXPERTS, Role.SHARED_EXPERTS)


def quantized_bytes(mode: str, shape: tuple[int, ...]) -> int:
    """Bytes bitsandbytes keeps for one linear weight of ``shape`` (d_out, d_in) quantized as ``mode``."""
    n = math.prod(shape)
    if mode == "int8":
        return n + 4 * shape[0]
    blocks = -(-n // BLOCK)
    packed = -(-n // 2)
    if mode == "nf4":
        return packed + 4 * blocks + NF4_CODE_BYTES
    if mode == "nf4-dq":
        return packed + blocks + 4 * -(-blocks // NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES
    raise PlanError(f"unknown --quant {mode!r} (choose from {', '.join(QUANT_MODES)})")


def quantized_uses(uses: tuple[ParamUse, ...]) -> list[ParamUse]:
    """The parameter uses a bitsandbytes model holds quantized: 2-D weights of linear roles (fused
    3-D expert tensors are parameters, not nn.Linear, and stay unquantized), each tensor once."""
    return [u for u in uses if u.role in QUANTIZED_ROLES and len(u.shape) == 2 and u.n_params and not u.tied_to]


def quantize_base(memory, analysis, setup, weight_bytes: int, compute_bytes: int, plan=None):
    """``memory`` (a MemoryBytes) with the frozen linear weights stored quantized as ``setup.base_quant``:
    the weights (and every phase's peak) shrink by the bytes saved; the forward and backward peaks
    grow by the dequantized copy of the largest quantized weight (``compute_bytes`` per element).
    ``weight_bytes``: bytes per element the estimate gave each weight; ``plan``: the plan priced (int8's
    kept inputs are those its saved storages do not already hold)."""
    uses = quantized_uses(analysis.model.roles.params)
    trained = sorted(u.hint or u.key for u in uses if u.key in analysis.trainable)
    if trained:
        raise PlanError(f"--quant {setup.base_quant}: {trained[0]} would train, but a quantized base weight "
                        "cannot (freeze it, e.g. --lora attn trains adapters only)")
    if not uses:
        return memory
    saved = sum(u.n_params * weight_bytes - quantized_bytes(setup.base_quant, u.shape) for u in uses)
    dequantized = max(u.n_params for u in uses) * compute_bytes
    kept = int8_kept_inputs(analysis, uses, setup, plan) if setup.base_quant == "int8" else 0
    # the kept inputs live from the forward until their linear's backward: at the forward peak and
    # at the start of backward, where its peak usually is
    during_passes = dequantized + kept if memory.peak_phase in ("forward", "backward") else 0
    return replace(memory, weights=memory.weights - saved, activations=memory.activations + kept,
                   peak=memory.peak - saved + during_passes)


def int8_kept_inputs(analysis, uses: list[ParamUse], setup, plan=None) -> int:
    """Bytes of the inputs int8 linears keep for backward that nothing else saves: each distinct input
    storage of a quantized linear that runs backward, less the storages the plan saves already (e.g. a
    LoRA adapter's input on a same-dtype base)."""
    from costlens.plans import Plan
    from costlens.storages import Precision, StorageContext, collect_saved
    ctx = StorageContext(analysis, Precision.of(setup.precision), setup.device, setup.attention, setup.experts_impl)
    plan = plan or Plan(name="quant")
    already = collect_saved(analysis, ctx, plan, setup)
    index_of = {node.name: i for i, node in enumerate(analysis.model.graph.nodes)}
    kept: dict[str, int] = {}
    for use in uses:
        index = index_of.get(use.site)
        if index is None or not analysis.runs_backward[index]:
            continue
        node = analysis.model.graph.nodes[index]
        for tensor in node.inputs:
            if tensor and not ctx.is_weight(tensor) and tensor not in analysis.model.graph.inputs:
                root = ctx.storage(tensor)
                if root not in already:
                    kept[root] = ctx.nbytes(root)
    return sum(kept.values())
