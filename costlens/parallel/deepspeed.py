"""DeepSpeed ZeRO stages 1-3 priced by formula (not measured here: docs/distributed.md says why).

Per rank, as DESIGN.md §6 records DeepSpeed's behaviour:

- an fp32 master copy of the rank's partition of the trainable parameters, even for fp32 models;
- the optimizer state of that partition (DeepSpeed partitions flat, element-wise: ⌈Ψ_t/N⌉);
- stage 1: full gradients; stages 2 and 3: the gradient partition;
- stage 3: the parameter partition, except tensors under ``stage3_param_persistence_threshold``
  elements, which every rank keeps whole;
- a gradient reduction bucket of ``reduce_bucket_size`` elements (default 5e8: about 1.9 GB in
  fp32 whatever the model), in the gradients' dtype.

These are model states and buffers only, like DeepSpeed's own estimators; activations and the
gathered parameters of the layer being computed come on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from costlens.estimate import Estimate
from costlens.gradients import analyze
from costlens.optimizers import state_bytes
from costlens.parallel.layout import tensors_of
from costlens.storages import Precision

REDUCE_BUCKET_SIZE = 500_000_000            # elements (DeepSpeed's default reduce_bucket_size)
PERSISTENCE_THRESHOLD = 100_000             # elements (stage3_param_persistence_threshold)


@dataclass(frozen=True)
class DeepSpeedStates:
    """Bytes per rank."""

    stage: int
    weights: int
    gradients: int
    optimizer: int             # optimizer state of the partition
    master: int                # fp32 master copy of the partition
    bucket: int                # the gradient reduction bucket

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.master + self.bucket


def deepspeed_states(result: Estimate, gpus: int, stage: int, reduce_bucket_size: int = REDUCE_BUCKET_SIZE,
                     persistence_threshold: int = PERSISTENCE_THRESHOLD) -> DeepSpeedStates:
    """Model states and the reduction bucket per rank under DeepSpeed ZeRO ``stage`` on ``gpus`` ranks."""
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage {stage}: 1, 2 or 3")
    precision = Precision.of(result.setup.precision)
    analysis = analyze(result.model, result.plan, {"batch": result.batch, "seq": result.seq},
                       routed=result.setup.moe_dispatch == "routed", input_grads=result.setup.checkpointing)
    tensors = tensors_of(analysis, 1)
    n_all = sum(prod(t.shape) for t in tensors)
    n_trainable = sum(prod(t.shape) for t in tensors if t.trainable)
    share = ceil(n_trainable / gpus)
    # state per element of the partition, as for one flat tensor of that size (AdamW: two moments)
    optimizer = state_bytes(result.setup.optimizer, (share,), precision.state) if share else 0
    if stage == 3:
        persistent = sum(prod(t.shape) for t in tensors if prod(t.shape) < persistence_threshold)
        weights = (ceil((n_all - persistent) / gpus) + persistent) * precision.weight
    else:
        weights = n_all * precision.weight
    gradients = (share if stage >= 2 else n_trainable) * precision.weight
    bucket = reduce_bucket_size * precision.weight if n_trainable else 0
    return DeepSpeedStates(stage, weights, gradients, optimizer, share * 4, bucket)
