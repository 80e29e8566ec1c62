"""Per-rank figures for LLaMA-3-70B under ZeRO-3 (FSDP2) on 8 and 64 GPUs, full fine-tuning and
LoRA, beside DeepSpeed's published model-states estimator.

    python benchmarks/bench_parallel.py [--seq 4096] [--batch 1]

costlens: ``estimate`` + ``estimate_parallel`` on benchmarks/configs/llama3-70b.json (meta device,
nothing downloaded), bf16 mixed precision (bf16 weights and gradients, fp32 master weights and
AdamW moments), fused attention, activation checkpointing, batch per rank as given.

DeepSpeed: ``estimate_zero3_model_states_mem_needs`` (deepspeed/runtime/zero/stage3.py, the formula
behind ``estimate_zero3_model_states_mem_needs_all_live`` / ``_all_cold``; docs:
https://deepspeed.readthedocs.io/en/latest/memory.html), without offload and with zero_init:
    largest_layer_memory = 4 * largest_layer_params
    gpu_mem = largest_layer_memory + 18 * total_params / total_gpus
where largest_layer_params is the largest module's own parameters (here the token embedding or
the LM head, 128,256 x 8,192). It takes the total parameter count only: frozen or not, every
parameter is charged 18 bytes. docs/distributed.md explains the differences.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

GiB = 2**30


def deepspeed_zero3_gpu_bytes(total_params: int, largest_layer_params: int, gpus: int) -> int:
    """DeepSpeed's estimate_zero3_model_states_mem_needs, cpu_offload=False: bytes per GPU."""
    return 4 * largest_layer_params + int(18 * total_params / gpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--config", default=str(HERE / "configs" / "llama3-70b.json"))
    args = parser.parse_args()

    import costlens
    from costlens.estimate import estimate
    from costlens.parallel import estimate_parallel
    from costlens.parallel.deepspeed import deepspeed_states
    from costlens.plans import Setup, plan_from_options

    start = time.perf_counter()
    model = costlens.load(args.config)
    roles = model.roles
    total = roles.params_total
    largest = max(u.n_params for u in roles.params)
    setup = Setup(batch=args.batch, seq=args.seq, precision="bf16-mixed", attention="fused", checkpointing=True)
    plans = {"full": plan_from_options("full"), "lora-attn-r16": plan_from_options("lora", lora="attn", rank="16")}
    print(f"LLaMA-3-70B ({total:,} parameters; largest tensor {largest:,}), batch {args.batch} per rank, "
          f"seq {args.seq}, bf16-mixed AdamW, fused attention, checkpointing")
    header = (f"{'plan':<14} {'GPUs':>4} {'weights':>9} {'grads':>9} {'optim':>9} {'acts':>9} {'buffers':>9} "
              f"{'peak/rank':>10} {'phase':>9} {'AG+RS/step':>11} {'comm s':>7} | {'DeepSpeed':>9} {'states':>9} "
              f"{'DS-3 formula':>12}")
    print(header)
    print("-" * len(header))
    for name, plan in plans.items():
        result = estimate(model, plan, setup)
        for gpus in (8, 64):
            p = estimate_parallel(result, gpus, "zero3")
            m, c = p.memory, p.communication
            states = m.weights + m.gradients + m.optimizer
            ds = deepspeed_zero3_gpu_bytes(total, largest, gpus)
            ds3 = deepspeed_states(result, gpus, 3)
            print(f"{name:<14} {gpus:>4} {m.weights / GiB:>8.2f}G {m.gradients / GiB:>8.2f}G {m.optimizer / GiB:>8.2f}G "
                  f"{m.activations / GiB:>8.2f}G {(m.buffers + m.transient) / GiB:>8.2f}G {m.peak / GiB:>9.2f}G "
                  f"{m.peak_phase:>9} {(c.all_gather + c.reduce_scatter) / GiB:>10.1f}G {c.seconds:>7.2f} | "
                  f"{ds / GiB:>8.2f}G {states / GiB:>8.2f}G {ds3.total / GiB:>11.2f}G")
    print(f"\ncomm s at {p.communication.bandwidth_gbps:g} GB/s per rank; 'states' = costlens weights + grads + "
          f"optimizer per rank (DeepSpeed's figure is model states only); 'DS-3 formula' = "
          f"costlens.parallel.deepspeed: ZeRO-3 states + fp32 master + a 5e8-element reduce bucket; "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
