"""Rules of the normalizations: no FLOPs counted (``NOT_COUNTED``); what they keep follows
torch's native kernels: the input and fp32 statistics (mean and rstd, or rstd alone for RMS
norms) per normalized group -- per row for layer norms, per channel for batch norm
(``native_batch_norm``: save_mean, save_invstd [C]), per (sample, group) for group norm
(``native_group_norm``: mean, rstd [N, G]), per (sample, channel) for instance norm (batch
norm over [1, N*C, ...], which also repeats its scale to [N*C]).
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.ops.registry import NOT_COUNTED, Extra, Family, SavedContext, Zero, register
from costlens.shapes import numel


def _elements(shape) -> int:
    return numel(shape) if shape else 0


def _norm(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    if not (ctx.needs(x) or ctx.trains(node)):
        return []
    n_stats = 1 if "RMS" in node.op or "Simplified" in node.op else 2       # rstd (and mean)
    return [x, Extra(f"stats@{node.name}", n_stats * ctx.rows(x) * ctx.stat_bytes())]


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


def _channel_norm(node: Node, ctx: SavedContext) -> list:
    """Batch / group / instance norm over x [N, C, *spatial]: the input and two fp32
    statistics per normalized group (C; N x G; N x C)."""
    x = node.inputs[0]
    shape = ctx.shape(x)
    if not (ctx.needs(x) or ctx.trains(node)) or not shape or len(shape) < 2:
        return []
    batch, channels = shape[0], shape[1]
    kept: list = [x]
    if node.op == "BatchNormalization":
        groups = channels
    elif node.op == "GroupNormalization":
        groups = batch * int(node.attr("num_groups", 0) or 0)
    else:
        groups = batch * channels
        if len(node.inputs) > 1 and node.inputs[1]:          # scale.repeat(N) is kept for backward
            kept.append(Extra(f"scale@{node.name}", batch * channels * ctx.weight_bytes()))
    kept.append(Extra(f"stats@{node.name}", 2 * groups * ctx.stat_bytes()))
    return kept


register("LayerNormalization", "RMSNormalization", "com.microsoft.SkipLayerNormalization",
         "com.microsoft.LayerNormalization", family=Family.NORM, flops=Zero(NOT_COUNTED), saved=_norm)
register("SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization", family=Family.NORM,
         flops=Zero(NOT_COUNTED), saved=_rms_norm)
register("com.microsoft.SkipSimplifiedLayerNormalization", family=Family.NORM, flops=Zero(NOT_COUNTED),
         saved=_skip_rms_norm)
register("BatchNormalization", "GroupNormalization", "InstanceNormalization", family=Family.NORM,
         flops=Zero(NOT_COUNTED), saved=_channel_norm)
