"""One steady-state training step of a torch module, measured.

Owns ``measure_step`` and its ``StepMeasurement`` result. The step is the one costlens
estimates: ``zero_grad(set_to_none=True)``, forward on random ``input_ids`` [batch, seq],
cross-entropy over the vocabulary against the same ids, backward, ``optimizer.step()``.
Two steps run; the second is reported, because the first creates the optimizer state
lazily (DESIGN 2.8). Memory comes from ``StorageTracker`` (exact live storage bytes, any
device) and, on CUDA, also from the caching allocator's peak statistics. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` around the first step's forward, loss and
backward: FLOPs depend on shapes only (MoE: every token still reaches exactly top-k
experts), and counting them in the warm-up step keeps the measured step free of a second
dispatch mode. The optimizer step has no FLOP formula there (pointwise ops), so it adds none.
"""
from __future__ import annotations

import contextlib
import gc
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from costlens.errors import PlanError
from costlens.measure.tracker import MemCategory, MemoryProfile, Phase, StorageTracker, storages_of

OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adafactor", "adamw-8bit")   # adamw-8bit: bitsandbytes' AdamW8bit
# "ce": cross-entropy of the logits against the ids themselves; "hf": the model's own loss with
# labels=input_ids (transformers upcasts the logits to fp32, shifts by one, cross-entropy);
# "chunked-ce": torchtune's CEWithChunkedOutputLoss over the head applied per token chunk, as
# torchtune's recipes run it (TransformerDecoder.chunked_output, labels shifted with an ignored tail)
LOSSES = ("ce", "hf", "chunked-ce")
TORCHTUNE_CHUNKS = 8          # CEWithChunkedOutputLoss's default num_output_chunks (every recipe's)
IGNORE_INDEX = -100
OPTIMIZER_IMPLS = ("for-loop", "foreach")
SGD_MOMENTUM = 0.9


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2·M·K·N of torch._grouped_mm, which FlopCounterMode has no formula for (transformers 5
    runs fused MoE experts with it: without this the measured step misses every expert matmul).
    Groups split one dimension (the rows of a 2-D operand, by ``offs``), so summed over groups
    the multiply-adds are those of one matmul over the whole split dimension:
    2-D x 3-D [M,K]x[E,K,N]: M·K·N; 3-D x 3-D [E,M,K]x[E,K,N]: E·M·K·N;
    2-D x 2-D [M,K]x[K,N] (offs split K, as the weight gradient does): M·K·N; 3-D x 2-D [E,M,K]x[K,N]: M·K·N."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    m, k = (a_shape[-2], a_shape[-1])
    return 2 * m * k * b_shape[-1]


def _with_query_heads(query_shape, other_shape):
    # GQA: key/value may carry fewer heads; each query head still multiplies a full S_k x D block
    return (*other_shape[:1], query_shape[1], *other_shape[2:])


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """SDPA's CPU flash kernel: QKᵀ and PV over the full S x S_k block, as torch counts its CUDA
    flash and efficient kernels (torch.utils.flop_counter.sdpa_flop_count)."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, _with_query_heads(query_shape, key_shape),
                           _with_query_heads(query_shape, value_shape))


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, _with_query_heads(query_shape, key_shape),
                                    _with_query_heads(query_shape, value_shape))


# Kernels FlopCounterMode has no formula for, although the real modules run them on the CPU:
# transformers 5's fused MoE experts (torch._grouped_mm) and SDPA's CPU flash kernel. Without
# these the measured FLOPs miss every expert matmul and every attention core.
for _name, _formula in (("_grouped_mm", _grouped_mm_flops),
                        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flops)):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None and _op not in flop_registry:
        register_flop_formula(_op)(_formula)


@dataclass(frozen=True)
class AllocatorPeak:
    """CUDA caching-allocator figures of the measured step, in bytes (``memory_allocated``:
    block-rounded, includes every tensor of the process on that device)."""

    peak_bytes: int                        # max_memory_allocated over the step
    baseline_bytes: int                    # memory_allocated when the step began
    peak_phase: Phase
    peak_bytes_by_phase: dict[Phase, int]
    device_baseline_bytes: int = 0         # memory_allocated before the module moved to the device

    @property
    def above_baseline_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @property
    def step_bytes(self) -> int:
        """The peak of everything the training step owns on the device (weights, gradients,
        optimizer state, activations, temporaries): the figure beside the estimated peak."""
        return self.peak_bytes - self.device_baseline_bytes


@dataclass(frozen=True)
class StepMeasurement:
    """The second (steady-state) training step; bytes, FLOPs (2 per multiply-add), counts."""

    device: str
    batch: int
    seq: int
    optimizer: str
    optimizer_impl: str
    memory: MemoryProfile                  # exact live storages; categories at the peak
    allocator: AllocatorPeak | None        # CUDA only
    n_params: int                          # every parameter, shared ones once
    n_trainable_params: int
    weights_bytes: int                     # storages of all parameters and buffers
    gradient_bytes: int                    # storages of the trainable parameters' .grad
    optimizer_state_bytes: int             # storages in optimizer.state (moments, buffers, step counters)
    saved_activation_bytes: int            # live after forward+loss minus live before forward
    forward_flops: int                     # forward and cross-entropy
    total_flops: int                       # forward + backward, and the recompute of checkpointed layers

    @property
    def backward_flops(self) -> int:
        return self.total_flops - self.forward_flops

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def peak_phase(self) -> Phase:
        return self.memory.peak_phase

    @property
    def by_category_at_peak(self) -> dict[MemCategory, int]:
        return self.memory.by_category_at_peak


@dataclass(frozen=True)
class StepRecipe:
    """How the forward and the loss run: ``loss`` in LOSSES; ``autocast``: the half dtype of
    torch.autocast around forward and loss (the HF Trainer's bf16=True / fp16=True), or None;
    ``master_weights``: the optimizer steps fp32 master copies of the (half) trainable
    parameters and copies them back ("bf16-mixed" / "fp16-mixed")."""

    loss: str = "ce"
    autocast: torch.dtype | None = None
    master_weights: bool = False


def measure_step(module: torch.nn.Module, batch: int, seq: int, vocab: int, optimizer: str = "adamw",
                 optimizer_impl: str = "for-loop", lr: float = 1e-3, device: str = "cpu", seed: int = 0,
                 keep_logits: bool = False, recipe: StepRecipe = StepRecipe()) -> StepMeasurement:
    """Train ``module`` for two steps and measure the second: bytes, FLOPs (2 per
    multiply-add), parameter counts. The module is moved to ``device`` and its weights change.
    A module returning a transformers ModelOutput is read through its ``.logits`` / ``.loss``.

    Only parameters with ``requires_grad`` go to the optimizer. ``keep_logits``: hold the
    logits until the step ends, as a loop that keeps the model output does; by default only
    the loss is kept, so what stays alive after the loss is what autograd saved for backward.
    On CUDA the allocator baseline is taken before the module moves to the device, so
    ``allocator.step_bytes`` is everything the training step owns there.
    """
    _check_choices(optimizer, optimizer_impl, device)
    if recipe.loss not in LOSSES:
        raise PlanError(f"measure: unknown loss {recipe.loss!r} (choose from {', '.join(LOSSES)})")
    watch = _AllocatorWatch(device) if device.startswith("cuda") else None
    if watch:
        watch.before_module()
    module = module.to(device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, optimizer, optimizer_impl, lr, recipe.master_weights)
    ids = torch.Generator().manual_seed(seed)   # one stream, so the two steps see different batches
    forward_flops, total_flops = _warmup_step(module, opt, ids, batch, seq, vocab, device, recipe)

    tracker = _tracker_with_state(module, opt, torch.device(device).type)
    with _gc_paused(), tracker:
        if watch:
            watch.start()
        saved_bytes = _measured_step(module, opt, ids, batch, seq, vocab, device, tracker, watch, keep_logits,
                                     recipe)
    tracker.classify(_grads(trainable), MemCategory.GRADIENTS)
    tracker.classify(_state_tensors(opt), MemCategory.OPTIMIZER)
    return StepMeasurement(
        device=device, batch=batch, seq=seq, optimizer=optimizer, optimizer_impl=optimizer_impl,
        memory=tracker.profile(), allocator=watch.result() if watch else None,
        n_params=sum(p.numel() for p in module.parameters()), n_trainable_params=sum(p.numel() for p in trainable),
        weights_bytes=storage_bytes([*module.parameters(), *module.buffers()]),
        gradient_bytes=storage_bytes(_grads(trainable)), optimizer_state_bytes=storage_bytes(_state_tensors(opt)),
        saved_activation_bytes=saved_bytes, forward_flops=forward_flops, total_flops=total_flops)


def make_optimizer(params: list[torch.nn.Parameter], name: str, impl: str, lr: float,
                   master_weights: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` (one of OPTIMIZERS, unchecked here: measure_step checks it; any other
    name builds plain SGD) over ``params``, ``impl`` "foreach" or "for-loop"; with ``master_weights``,
    stepping fp32 master copies of half-precision parameters."""
    if master_weights:
        return MasterCopyOptimizer(params, lambda masters: make_optimizer(masters, name, impl, lr))
    if name == "adamw-8bit":       # bitsandbytes' own (blockwise, min_8bit_size 4096), on the CPU too
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(params, lr=lr)
    foreach = impl == "foreach"
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, foreach=foreach)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=foreach)
    momentum = SGD_MOMENTUM if name == "sgd-momentum" else 0.0
    return torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=foreach)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared or tied ones once)."""
    seen = {}
    for tensor in tensors:
        for storage in storages_of(tensor) or ():
            seen[id(storage)] = storage.nbytes()   # storages stay alive (held by tensors) meanwhile
    return sum(seen.values())


# --------------------------------------------------------------------------- the two steps

def _warmup_step(module, opt, ids, batch, seq, vocab, device, recipe: StepRecipe = StepRecipe()) -> tuple[int, int]:
    """Step 1: creates optimizer state (and CUDA workspaces); returns (forward, total) FLOPs."""
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        input_ids = _input_ids(ids, batch, seq, vocab, device)
        with _autocast(recipe, device):
            loss = _forward_loss(module, input_ids, vocab, recipe.loss)[1]
        forward_flops = counter.get_total_flops()
        loss.backward()
    opt.step()
    return forward_flops, counter.get_total_flops()


def _measured_step(module, opt, ids, batch, seq, vocab, device, tracker, watch, keep_logits,
                   recipe: StepRecipe = StepRecipe()) -> int:
    """Step 2 under the tracker; returns the bytes forward+loss left alive."""
    phase = partial(_phase, tracker, watch)
    with phase(Phase.ZERO_GRAD):
        opt.zero_grad(set_to_none=True)
    before_forward = tracker.live_bytes
    with phase(Phase.FORWARD), _autocast(recipe, device):
        input_ids = _input_ids(ids, batch, seq, vocab, device)   # the embedding saves them for backward
        # "hf": the model computes its loss inside forward; the phases then meet in FORWARD
        output, loss = _forward_loss(module, input_ids, vocab, recipe.loss) if recipe.loss == "hf" \
            else (_forward(module, input_ids, recipe.loss), None)
    with phase(Phase.LOSS), _autocast(recipe, device):
        if loss is None:
            loss = _loss(output, input_ids, vocab, recipe.loss)
        if not keep_logits:
            del output
        del input_ids                   # autograd still holds them where backward needs them
        saved_bytes = tracker.live_bytes - before_forward
    with phase(Phase.BACKWARD):
        loss.backward()
    del loss
    with phase(Phase.OPTIMIZER):
        opt.step()
    return saved_bytes


def _logits(output) -> torch.Tensor:
    """The logits of a plain tensor or of a transformers ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _forward_loss(module, input_ids, vocab: int, loss: str):
    """(what forward returned, the loss): "hf" asks the model for its own loss (labels=ids)."""
    if loss == "hf":
        output = module(input_ids=input_ids, labels=input_ids)
        return output, output.loss
    logits = _forward(module, input_ids, loss)
    return logits, _loss(logits, input_ids, vocab, loss)


def _forward(module, input_ids, loss: str):
    """The logits of forward: one tensor, or for "chunked-ce" the list of per-chunk logits."""
    return _chunked_logits(module, input_ids) if loss == "chunked-ce" else _logits(module(input_ids))


def _chunked_logits(module, input_ids) -> list[torch.Tensor]:
    """torchtune's ``TransformerDecoder.chunked_output`` on a transformers causal LM: the base
    model's last hidden state (after its final norm), split into TORCHTUNE_CHUNKS chunks along
    the sequence (``Tensor.chunk``), each through the real LM head (LoRA'd or not)."""
    causal = module.get_base_model() if hasattr(module, "get_base_model") else module
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if head is None or getattr(causal, "base_model", causal) is causal:
        raise PlanError("--loss chunked-ce needs a transformers causal LM (a base model and an LM head)")
    hidden = causal.base_model(input_ids=input_ids).last_hidden_state
    return [head(chunk) for chunk in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]


def _autocast(recipe: StepRecipe, device: str):
    # the HF Trainer runs forward and loss under autocast, backward and the optimizer outside it
    if recipe.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=recipe.autocast)


def _loss(logits, input_ids: torch.Tensor, vocab: int, loss: str = "ce") -> torch.Tensor:
    if loss == "chunked-ce":       # torchtune's recipes: labels shifted by one, the tail ignored
        ignored = torch.full_like(input_ids[:, :1], IGNORE_INDEX)
        return torchtune_chunked_loss()(TORCHTUNE_CHUNKS)(logits, torch.hstack((input_ids[:, 1:], ignored)))
    # [b, s, V] -> [b*s, V] against the ids themselves (as tests/torch_plans.step_flops does)
    return F.cross_entropy(logits.reshape(-1, vocab), input_ids.reshape(-1))


@lru_cache(maxsize=1)
def torchtune_chunked_loss() -> type:
    """torchtune's ``CEWithChunkedOutputLoss`` class, run unchanged from torchtune's own source
    file. The file imports only torch; the package's ``__init__`` imports torchao and its data
    stack, which the loss never uses, so the module is loaded by path (``pip install --no-deps
    torchtune`` is enough)."""
    import importlib.util
    from pathlib import Path
    found = importlib.util.find_spec("torchtune")
    if found is None or not found.submodule_search_locations:
        raise PlanError("--loss chunked-ce runs torchtune's CEWithChunkedOutputLoss: "
                        "pip install --no-deps torchtune")
    path = Path(next(iter(found.submodule_search_locations))) / "modules" / "loss" / "ce_chunked_output_loss.py"
    spec = importlib.util.spec_from_file_location("costlens_torchtune_ce_chunked_output_loss", path)
    if spec is None or not path.is_file():
        raise PlanError(f"--loss chunked-ce: this torchtune has no {path.name}")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.CEWithChunkedOutputLoss


def _input_ids(generator, batch, seq, vocab, device) -> torch.Tensor:
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids if device == "cpu" else ids.to(device)


# --------------------------------------------------------------------------- state and helpers

def _tracker_with_state(module, opt, device_type: str) -> StorageTracker:
    tracker = StorageTracker(device_type)
    tracker.register_existing([*module.parameters(), *module.buffers()], MemCategory.WEIGHTS)
    tracker.register_existing(_grads(module.parameters()), MemCategory.GRADIENTS)
    tracker.register_existing(_state_tensors(opt), MemCategory.OPTIMIZER)
    return tracker


def _grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Storages held only by reference cycles die whenever the cyclic collector happens to
    # run; collecting first and pausing it makes the measured peak repeatable.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _phase(tracker: StorageTracker, watch: _AllocatorWatch | None, phase: Phase) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(tracker.phase(phase))
        if watch:
            stack.enter_context(watch.phase(phase))
        yield


def _check_choices(optimizer: str, impl: str, device: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"measure: unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if impl not in OPTIMIZER_IMPLS:
        raise PlanError(f"measure: unknown optimizer implementation {impl!r} "
                            f"(choose from {', '.join(OPTIMIZER_IMPLS)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError("measure: device 'cuda' asked for, but torch sees no CUDA device")


class _AllocatorWatch:
    """Per-phase peaks of the CUDA caching allocator: the peak counter is reset as each phase
    begins and read as it ends (after a synchronize, so queued kernels have allocated)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.baseline_bytes = 0
        self.device_baseline_bytes = 0
        self.peaks: dict[Phase, int] = {}

    def before_module(self) -> None:
        """What the device holds before the module moves there (other tensors, other work)."""
        torch.cuda.synchronize(self.device)
        self.device_baseline_bytes = torch.cuda.memory_allocated(self.device)

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.baseline_bytes = torch.cuda.memory_allocated(self.device)

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated(self.device))

    def result(self) -> AllocatorPeak:
        phase = max(self.peaks, key=self.peaks.get)
        return AllocatorPeak(peak_bytes=self.peaks[phase], baseline_bytes=self.baseline_bytes,
                             peak_phase=phase, peak_bytes_by_phase=dict(self.peaks),
                             device_baseline_bytes=self.device_baseline_bytes)


class MasterCopyOptimizer:
    """Half-precision trainable parameters stepped through fp32 master copies (the
    "bf16-mixed" / "fp16-mixed" recipe): each step converts the half gradient to fp32 on the
    master, steps the inner optimizer on the masters and copies them back. ``state`` shows
    the masters beside the inner optimizer's moments, so both count as optimizer state."""

    def __init__(self, params: list[torch.nn.Parameter], make_inner) -> None:
        self.params = params
        self.masters = [p.detach().to(torch.float32, copy=True) for p in params]
        self.inner = make_inner(self.masters)

    @property
    def state(self) -> dict:
        return {id(m): {"master": m, **self.inner.state.get(m, {})} for m in self.masters}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad = None
