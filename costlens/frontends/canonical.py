"""Canonical forms of transformers modules for tracing, shared by every torch front end
(torch.export, fvcore, the ONNX exporter): fused experts traced in dense-dispatch form and
activations that wrap one torch op traced as that op. Instance patches, undone afterwards;
the arithmetic is the same. Nothing here imports torch until a model is patched."""
from __future__ import annotations

import contextlib
import types


def _is_fused_experts(module) -> bool:
    """transformers' ``@use_experts_implementation`` experts: 3-D gate_up/up and down tensors."""
    up = getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", False) else getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (hasattr(module, "is_transposed") and getattr(up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3)


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """All experts on all tokens, weighted by the sparse combine matrix (dense dispatch).
    hidden [t, d], top_k_index / top_k_weights [t, k] -> [t, d]."""
    import torch
    up = self.gate_up_proj if self.has_gate else self.up_proj
    experts = up.shape[0]
    combine = hidden_states.new_zeros((hidden_states.shape[0], experts))
    combine = combine.scatter(-1, top_k_index, top_k_weights.to(combine.dtype))           # [t, E]
    h = torch.matmul(hidden_states, up if self.is_transposed else up.transpose(1, 2))     # [E, t, 2F]
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias).unsqueeze(1)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)                          # [E, t, F]
    out = torch.matmul(h, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))  # [E, t, d]
    if self.has_bias:
        out = out + self.down_proj_bias.unsqueeze(1)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = (out * combine.t().unsqueeze(-1)).sum(dim=0)                                    # [t, d]
    return out.to(hidden_states.dtype)


# transformers activations that call one torch op through a wrapper. The ones written out as a
# Python formula (GPT-2's NewGELUActivation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), Fast-
# and AccurateGELU) are traced as they run: autograd keeps four [tokens, 4H] tensors for them
# where gelu(x, approximate="tanh") keeps one (issue 10), so they are not replaced here.
_ONE_OP_ACTIVATIONS = {
    "GELUTanh": lambda x: _F().gelu(x, approximate="tanh"),
    "GELUActivation": lambda x: _F().gelu(x),
    "MishActivation": lambda x: _F().mish(x),
}


def _F():
    import torch.nn.functional as F
    return F


@contextlib.contextmanager
def canonical_forms(model):
    """Trace transformers experts in dense-dispatch form and Python-written activations as
    their one torch op (instance patches, undone afterwards; the arithmetic is the same)."""
    patched = []
    for module in model.modules():
        if _is_fused_experts(module):
            module.forward = types.MethodType(dense_experts_forward, module)
            patched.append(module)
        elif type(module).__name__ in _ONE_OP_ACTIVATIONS and type(module).__module__.startswith("transformers."):
            module.forward = _ONE_OP_ACTIVATIONS[type(module).__name__]
            patched.append(module)
    try:
        yield patched
    finally:
        for module in patched:
            del module.forward
