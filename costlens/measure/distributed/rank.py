"""The rank process of a distributed measurement: ``python -m costlens.measure.distributed.rank
CONFIG.json`` with torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
from __future__ import annotations

import gc
import json
import os
import pickle
import sys
from dataclasses import asdict
from pathlib import Path

from costlens.measure.distributed import PlanRecipe, RankMeasurement



def _rank_main(config_path: str) -> None:
    import torch
    import torch.distributed as dist

    config = json.loads(Path(config_path).read_text())
    for entry in reversed(config["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure_rank(config, rank, world)
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(asdict(result)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure_rank(config: dict, rank: int, world: int) -> RankMeasurement:
    import torch
    from costlens.frontends.torch_export import module_from_spec
    from costlens.measure.distributed.comm import CollectiveCounter
    from costlens.measure.step import _gc_paused, _grads, _measured_step, storage_bytes
    from costlens.measure.tracker import MemCategory, Phase
    from costlens.measure.distributed.wrap import (PeakResetTracker, apply_recipe, optimizer_state,
                                                   storage_resizes_seen, wrap)

    from costlens.measure.step import StepRecipe
    layers, step, truth = None, StepRecipe(), ""
    if config.get("real_module"):
        from costlens.measure.distributed.wrap import planned_real_module
        from costlens.measure.hf_module import step_recipe
        real = pickle.loads(Path(config["real_module"]).read_bytes())
        module, layers, truth = planned_real_module(real)
        step = step_recipe(real.setup)
    else:
        module, _ = module_from_spec(config["source"], device="cpu")
        module = apply_recipe(module, PlanRecipe(**config["recipe"]))
    shard, batch, seq, vocab = config["shard"], config["batch"], config["seq"], config["vocab"]
    tracker = PeakResetTracker("cpu")
    tracker.register_existing([*module.parameters(), *module.buffers()], MemCategory.WEIGHTS)
    tp = world if shard == "tp" else config.get("tp", 1)
    ids = torch.Generator().manual_seed(1000 + rank // tp)     # the tensor-parallel ranks of a replica share a batch
    counter = CollectiveCounter()
    with _gc_paused(), tracker, storage_resizes_seen(tracker):
        wrapped, opt = wrap(module, shard, world, config["optimizer"], config["lr"], tp, layers)
        gc.collect()        # the replaced full parameters of the last unit sharded sit in a reference cycle
        tracker.classify([*wrapped.parameters()], MemCategory.WEIGHTS)
        _measured_step(wrapped, opt, ids, batch, seq, vocab, "cpu", tracker, None, False, step)   # step 1
        tracker.reset_peak()
        with counter:
            _measured_step(wrapped, opt, ids, batch, seq, vocab, "cpu", tracker, None, False, step)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    state = optimizer_state(opt)
    tracker.classify([*wrapped.parameters(), *wrapped.buffers()], MemCategory.WEIGHTS)
    tracker.classify(_grads(trainable), MemCategory.GRADIENTS)
    tracker.classify(state, MemCategory.OPTIMIZER)
    profile = tracker.profile()
    return RankMeasurement(
        rank=rank, peak_bytes=profile.peak_bytes, peak_phase=Phase(profile.peak_phase).value,
        by_category_at_peak={c.value: b for c, b in profile.by_category_at_peak.items()},
        peak_bytes_by_phase={Phase(p).value: b for p, b in profile.peak_bytes_by_phase.items()},
        weights_bytes=storage_bytes([*wrapped.parameters(), *wrapped.buffers()]),
        gradient_bytes=storage_bytes(_grads(trainable)), optimizer_state_bytes=storage_bytes(state),
        collective_bytes=dict(counter.bytes), collective_calls=dict(counter.calls),
        n_trainable_params=sum(_local(p).numel() for p in trainable), truth=truth,
        late_frees=tracker.late_frees, late_free_bytes=tracker.late_free_bytes)


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


if __name__ == "__main__":
    _rank_main(sys.argv[1])
