"""The CPU storage tracker on hand-checkable cases, then measure_step on the fixtures.

Every golden sits beside its arithmetic: float32 is 4 bytes, int64 8 bytes. A storage is
counted once, at its full size, for as long as anything (Python or autograd) holds it.
"""
from __future__ import annotations

import dataclasses
import re

import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")

import models  # noqa: E402  (fixtures/models.py)
import torch_plans as tp  # noqa: E402

from costlens.errors import PlanError  # noqa: E402
from costlens.measure.step import measure_step  # noqa: E402
from costlens.measure.tracker import MemCategory, Phase, StorageTracker  # noqa: E402

BATCH, SEQ, VOCAB = 2, 32, 512
LLAMA_ATTN = r".*self_attn\.(q|k|v|o)_proj"


# --------------------------------------------------------------------------- the tracker, by hand

def test_an_allocation_counts_its_bytes_and_a_delete_gives_them_back():
    with StorageTracker() as tracker:
        a = torch.ones(1000)
        assert tracker.live_bytes == 4000                 # 1000 * 4
        b = torch.ones(250)
        assert tracker.live_bytes == 5000                 # + 250 * 4
        del b
        assert tracker.live_bytes == 4000
        del a
        assert tracker.live_bytes == 0
    assert tracker.profile().peak_bytes == 5000


def test_views_share_their_storage_and_a_slice_keeps_the_whole_base():
    with StorageTracker() as tracker:
        a = torch.ones(1000)
        views = [a.view(10, 100), a[::2], a.view(10, 100).t(), a.reshape(100, 10), a.unsqueeze(0)]
        assert tracker.live_bytes == 4000                 # + 0 for each view
        tail = a[990:]
        del a, views
        assert tracker.live_bytes == 4000                 # 10 elements alive, all 1000 still allocated
        tail.clone()                                      # the copy is 10 * 4 = 40, freed at once
    assert tracker.profile().peak_bytes == 4040


def test_matmul_output():
    with StorageTracker() as tracker:
        x, w = torch.ones(8, 16), torch.ones(16, 4)       # 512 + 256
        y = x @ w                                         # [8,16] @ [16,4] -> [8,4]: 8 * 4 * 4 = 128
        assert tracker.live_bytes == 512 + 256 + 128
    assert y.shape == (8, 4)


def test_in_place_ops_and_out_arguments_add_nothing():
    with StorageTracker() as tracker:
        x, out = torch.ones(1000), torch.empty(1000)
        x.add_(1).mul_(2).relu_()
        torch.add(x, 1, out=out)
        assert tracker.live_bytes == 8000                 # the two allocations, nothing since
    assert tracker.profile().peak_bytes == 8000


def test_resize_grows_a_tracked_storage():
    with StorageTracker() as tracker:
        x = torch.empty(0)
        x.resize_(100)                                    # same storage, now 100 * 4 = 400
        assert tracker.live_bytes == 400


def test_a_tensor_literal_is_tracked_through_lift_fresh():
    with StorageTracker() as tracker:
        t = torch.tensor([1.0, 2.0, 3.0])                 # built outside the dispatcher, then lifted
        assert tracker.live_bytes == 12
    assert tracker.profile().n_untracked_inputs == 0 and t.sum() == 6


def test_an_unregistered_pre_existing_tensor_is_reported_not_counted():
    outside = torch.ones(1000)
    with StorageTracker() as tracker:
        outside.add_(1)                                   # in place on it: still not counted
        total = outside.sum()                             # 4 bytes
        assert tracker.live_bytes == 4
    profile = tracker.profile()
    assert (profile.untracked_input_bytes, profile.n_untracked_inputs) == (4000, 1)
    assert total == 2000


def _linear_step(w_trainable: bool):
    """y = (x @ W).sum() with x [8,16] (no grad) made inside forward, W [16,4] registered."""
    w = torch.randn(16, 4, requires_grad=w_trainable)
    tracker = StorageTracker()
    tracker.register_existing([w], MemCategory.WEIGHTS)
    with tracker:
        with tracker.phase("forward"):
            y = (torch.randn(8, 16) @ w).sum()            # only autograd can keep x alive
        after_forward = tracker.live_bytes
        if w_trainable:
            with tracker.phase("backward"):
                y.backward()
            tracker.classify([w.grad], MemCategory.GRADIENTS)
    return tracker.profile(), after_forward


def test_linear_forward_backward_saves_x_for_dw_and_peaks_in_backward():
    profile, after_forward = _linear_step(w_trainable=True)
    # baseline: W 16*4*4 = 256
    # forward: x 8*16*4 = 512, x@W 8*4*4 = 128, sum 4 -> peak 256+512+128+4 = 900.
    #   MmBackward saves x (dW = xᵀ·dY); W does not need saving (x needs no grad);
    #   SumBackward saves only sizes, so x@W dies once summed: 256 + 512 + 4 = 772 left.
    # backward: dL/dy = 4, expanded to [8,4] as a view (+0); dW = xᵀ @ dY is 16*4*4 = 256
    #   -> peak 772 + 4 + 256 = 1032; then x is released and dW becomes W.grad.
    assert after_forward == 772
    assert profile.baseline_bytes == 256
    assert profile.peak_bytes_by_phase[Phase.FORWARD] == 900
    assert (profile.peak_bytes, profile.peak_phase) == (1032, Phase.BACKWARD)
    assert profile.by_category_at_peak == {
        MemCategory.WEIGHTS: 256, MemCategory.GRADIENTS: 256, MemCategory.OPTIMIZER: 0,
        MemCategory.ACTIVATIONS: 512 + 4,                 # x (held by autograd) and y
        MemCategory.TEMPORARIES: 4}                       # dL/dy
    assert profile.final_bytes == 256 + 4 + 256           # W, y (still referenced), W.grad


def test_a_frozen_linear_saves_nothing():
    _, after_forward = _linear_step(w_trainable=False)
    assert after_forward == 256 + 4                       # W and y: x died with its last use


def test_relu_keeps_its_output_a_scalar_multiply_keeps_nothing():
    with StorageTracker() as tracker:
        a = torch.randn(1000, requires_grad=True)
        before = tracker.live_bytes
        r = torch.relu(a).sum()
        assert tracker.live_bytes - before == 4000 + 4    # ReluBackward keeps relu(a); the sum 4
        before = tracker.live_bytes
        m = (a * 2).sum()
        assert tracker.live_bytes - before == 4           # MulBackward keeps the scalar 2 only
        before = tracker.live_bytes
        r.backward()
        # + a.grad 4000, - relu(a) 4000 released by its backward; dL/dr (4) lived only meanwhile
        assert tracker.live_bytes - before == 0 and a.grad.shape == (1000,)
    assert m.requires_grad


def test_the_peak_keeps_its_phase_and_categories_and_the_profile_is_frozen():
    weight = torch.ones(1000)                             # 4000, registered
    tracker = StorageTracker()
    tracker.register_existing([weight], "weights")
    with tracker:
        with tracker.phase(Phase.FORWARD):
            act = torch.ones(500)                         # + 2000 -> 6000
        with tracker.phase(Phase.BACKWARD):
            grad = torch.ones(1000)                       # + 4000 -> 10000: the peak
            del act                                       # -> 8000
        with tracker.phase(Phase.OPTIMIZER):
            tmp = torch.ones(250)                         # + 1000 -> 9000
            del tmp
        tracker.classify([grad], "gradients")
    profile = tracker.profile()
    assert (profile.peak_bytes, profile.peak_phase, profile.baseline_bytes) == (10000, Phase.BACKWARD, 4000)
    assert profile.peak_bytes_by_phase == {Phase.OTHER: 8000, Phase.FORWARD: 6000,
                                           Phase.BACKWARD: 10000, Phase.OPTIMIZER: 9000}
    assert profile.by_category_at_peak == {"weights": 4000, "gradients": 4000, "optimizer": 0,
                                           "activations": 2000, "temporaries": 0}
    assert profile.by_category_at_phase_peak[Phase.OPTIMIZER]["temporaries"] == 1000
    assert profile.final_bytes == 8000
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.peak_bytes = 0


# --------------------------------------------------------------------------- a training step

def _llama(plan: str):
    module = models.llama_like()
    if plan == "freeze=attn":
        for name, param in module.named_parameters():
            param.requires_grad_(re.search(tp.ATTENTION, name) is None)
    elif plan == "lora=attn":
        tp.set_trainable(module, r"^$")
        module = tp.add_lora(module, LLAMA_ATTN, 8)
    return module


def _n_tensors(module) -> int:
    return sum(1 for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("plan", ["full", "freeze=attn", "lora=attn"])
def test_step_sizes_partition_and_nothing_leaks(plan):
    module = _llama(plan)
    n_trainable = tp.trainable_count(module)
    m = measure_step(module, BATCH, SEQ, VOCAB)
    assert m.n_trainable_params == n_trainable
    assert m.weights_bytes == 4 * m.n_params
    assert m.gradient_bytes == 4 * n_trainable
    # AdamW: two fp32 moments per element, one fp32 step counter per parameter tensor
    assert m.optimizer_state_bytes == 8 * n_trainable + 4 * _n_tensors(module)
    mem = m.memory
    assert (mem.untracked_input_bytes, mem.n_unsupported_tensors) == (0, 0)
    # step 2 begins holding step 1's grads and ends holding its own: nothing else survives
    assert mem.baseline_bytes == mem.final_bytes == m.weights_bytes + m.gradient_bytes + m.optimizer_state_bytes
    assert sum(mem.by_category_at_peak.values()) == m.peak_bytes
    assert mem.by_category_at_peak[MemCategory.WEIGHTS] == m.weights_bytes
    assert mem.by_category_at_peak[MemCategory.OPTIMIZER] == m.optimizer_state_bytes
    # the loss phase ends holding the saved activations above W + O, plus the logits
    # ([b,s,V] fp32) until they are dropped: the loss graph does not need them
    logits_bytes = BATCH * SEQ * VOCAB * 4
    assert mem.peak_bytes_by_phase[Phase.LOSS] == (m.weights_bytes + m.optimizer_state_bytes
                                                   + m.saved_activation_bytes + logits_bytes)
    assert m.peak_phase == Phase.BACKWARD


def test_backward_starts_at_the_peak_with_two_logit_sized_gradients():
    m = measure_step(_llama("full"), BATCH, SEQ, VOCAB)
    logits_bytes = BATCH * SEQ * VOCAB * 4                # 2*32*512*4 = 131072
    cats = m.by_category_at_peak
    # nll_loss backward then log_softmax backward: dL/dlogp and dL/dlogits, plus dL/dloss (4)
    assert cats[MemCategory.TEMPORARIES] == 2 * logits_bytes + 4
    assert cats[MemCategory.GRADIENTS] == 0               # no parameter gradient exists yet
    # saved activations are all alive, less nll_loss's 4-byte total_weight released by its backward
    assert cats[MemCategory.ACTIVATIONS] == m.saved_activation_bytes - 4


def test_optimizer_temporaries_for_loop_versus_foreach():
    loop_step = measure_step(_llama("full"), BATCH, SEQ, VOCAB, optimizer_impl="for-loop")
    each = measure_step(_llama("full"), BATCH, SEQ, VOCAB, optimizer_impl="foreach").memory
    loop = loop_step.memory
    base = loop.baseline_bytes                            # W + G + O, also when the optimizer starts
    # foreach: sqrt(exp_avg_sq) for every trainable tensor at once = one more copy of the grads
    assert each.peak_bytes_by_phase[Phase.OPTIMIZER] == base + loop_step.gradient_bytes
    # for-loop: sqrt and its quotient for one tensor at a time, while the previous tensor's
    # denominator is still bound: final norm (64*4 = 256) then lm_head (512*64*4 = 131072)
    assert loop.peak_bytes_by_phase[Phase.OPTIMIZER] == base + 256 + 2 * 131072
    assert each.peak_phase == Phase.OPTIMIZER and loop.peak_phase == Phase.BACKWARD


@pytest.mark.parametrize("optimizer, per_element", [("sgd", 0), ("sgd-momentum", 4)])
def test_sgd_state(optimizer, per_element):
    m = measure_step(_llama("full"), BATCH, SEQ, VOCAB, optimizer=optimizer)
    assert m.optimizer_state_bytes == per_element * m.n_trainable_params   # momentum buffer: fp32
    assert m.memory.by_category_at_peak[MemCategory.OPTIMIZER] == m.optimizer_state_bytes


def test_kept_logits_add_one_logit_tensor():
    dropped = measure_step(_llama("full"), BATCH, SEQ, VOCAB)
    kept = measure_step(_llama("full"), BATCH, SEQ, VOCAB, keep_logits=True)
    assert kept.saved_activation_bytes - dropped.saved_activation_bytes == BATCH * SEQ * VOCAB * 4


def test_flops_match_flop_counter_and_the_measurement_repeats():
    first = measure_step(_llama("lora=attn"), BATCH, SEQ, VOCAB)
    assert (first.forward_flops, first.total_flops) == tp.step_flops(_llama("lora=attn"), BATCH, SEQ, VOCAB)
    again = measure_step(_llama("lora=attn"), BATCH, SEQ, VOCAB)
    assert again.memory == first.memory


def test_sparse_moe_step_is_fully_accounted():
    m = measure_step(models.moe_like(dispatch="sparse"), BATCH, SEQ, VOCAB)
    assert (m.memory.untracked_input_bytes, m.memory.n_unsupported_tensors) == (0, 0)
    assert m.memory.final_bytes == m.memory.baseline_bytes


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
def test_peak_equals_torch_mem_tracker(impl):
    """Cross-check against torch's own MemTracker on the same second step."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in: torch's MemTracker is unavailable")
    import gc

    from torch.distributed._tools.mem_tracker import MemTracker

    import costlens.measure.step as step
    module = models.llama_like()
    opt = step.make_optimizer(list(module.parameters()), "adamw", impl, 1e-3)
    ids = torch.Generator().manual_seed(0)
    step._warmup_step(module, opt, ids, BATCH, SEQ, VOCAB, "cpu")
    theirs = MemTracker()
    theirs.track_external(module, opt)
    gc.collect()
    with theirs:
        opt.zero_grad(set_to_none=True)
        input_ids = step._input_ids(ids, BATCH, SEQ, VOCAB, "cpu")
        loss = step._loss(module(input_ids), input_ids, VOCAB)
        del input_ids
        loss.backward()
        del loss
        opt.step()
    their_peak = sum(snap["Total"] for snap in theirs.get_tracker_snapshot("peak").values())
    ours = measure_step(models.llama_like(), BATCH, SEQ, VOCAB, optimizer_impl=impl)
    assert ours.peak_bytes == their_peak


def test_unknown_choices_are_plan_errors():
    with pytest.raises(PlanError, match="unknown optimizer"):
        measure_step(_llama("full"), BATCH, SEQ, VOCAB, optimizer="lion")
    with pytest.raises(PlanError, match="implementation"):
        measure_step(_llama("full"), BATCH, SEQ, VOCAB, optimizer_impl="fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the allocator peak path needs one")
def test_cuda_allocator_peak_covers_the_tracked_peak():
    m = measure_step(_llama("full"), BATCH, SEQ, VOCAB, device="cuda")
    alloc = m.allocator
    assert alloc is not None and alloc.peak_bytes >= alloc.baseline_bytes > 0
    # every tracked storage is a real allocation of at least its size (the allocator rounds
    # up to 512-byte blocks and also holds kernel scratch), so above the baseline the
    # allocator sees at least what the tracker sees -- less at most the rounding of step 1's
    # gradients, freed by zero_grad before the peak (< 512 bytes per parameter tensor)
    rounding_slack = 512 * sum(1 for _ in _llama("full").parameters())
    assert alloc.above_baseline_bytes >= m.memory.peak_bytes - m.memory.baseline_bytes - rounding_slack
    assert set(alloc.peak_bytes_by_phase) == {Phase.ZERO_GRAD, Phase.FORWARD, Phase.LOSS,
                                              Phase.BACKWARD, Phase.OPTIMIZER}


def test_allocator_watch_bookkeeping_with_a_fake_cuda_allocator(monkeypatch):
    """The CUDA path's per-phase peak logic, on a stand-in allocator (no GPU needed)."""
    from costlens.measure.step import _AllocatorWatch
    fake = {"allocated": 1000, "peak": 5000}              # a stale peak from before the step
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: fake.update(peak=fake["allocated"]))

    def allocate(nbytes):
        fake["allocated"] += nbytes
        fake["peak"] = max(fake["peak"], fake["allocated"])

    watch = _AllocatorWatch("cuda")
    watch.start()
    with watch.phase(Phase.FORWARD):
        allocate(300)                                     # 1300
    with watch.phase(Phase.BACKWARD):
        allocate(500)                                     # 1800: the peak
        allocate(-600)                                    # 1200
    with watch.phase(Phase.OPTIMIZER):
        allocate(100)                                     # 1300
    result = watch.result()
    assert (result.peak_bytes, result.peak_phase, result.baseline_bytes) == (1800, Phase.BACKWARD, 1000)
    assert result.above_baseline_bytes == 800
    assert result.peak_bytes_by_phase == {Phase.FORWARD: 1300, Phase.BACKWARD: 1800, Phase.OPTIMIZER: 1300}
