"""Issue 12's speed-ups change no number: each fast path against the slow one it replaced.

- a stack whose first blocks differ (DeepSeek-V3: dense blocks, then MoE blocks) is traced
  with the prefix plus two blocks and replicated: node for node and cost for cost the full trace;
- ``reaches_output`` (one backward walk shared by all sites) answers as the per-site forward
  walk did, on every linear site of every ONNX fixture;
- memoised ``eval_shape`` equals a direct evaluation, for any bindings, also after the caller
  mutates its dict;
- the cached ``adapter_at`` / ``tensor_adapters_at`` equal the maps rebuilt from the adapters,
  and pricing plans in any order gives the same figures as pricing each alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import canonical
from costlens.estimate import estimate
from costlens.frontends.onnx import load_onnx
from costlens.gradients import analyze
from costlens.model import analyse
from costlens.plans import Setup, parse_plan_spec
from costlens.roles.blocks import HEAD_PATH_OPS, BlockFinder
from costlens.roles.graphview import GraphView
from costlens.roles.params import SiteKind, classify_sites
from costlens.shapes import _eval_shape_at, eval_shape

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ONNX_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.onnx"))


# --------------------------------------------------------------------------- replication of a prefixed stack

def test_dense_prefix_then_moe_stack_replicated_equals_full_trace():
    pytest.importorskip("torch", reason="needs the torch extra")
    transformers = pytest.importorskip("transformers", reason="needs the torch extra")
    from costlens.frontends.hf_config import build_model, load_config_graph
    from costlens.frontends.torch_export import load_torch

    # DeepSeek-V3 in miniature: block 0 dense, blocks 1-3 MoE (router, 4 experts, a shared expert), MLA attention
    config = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    replicated = load_config_graph(config)
    assert any(n.name.endswith("@3") for n in replicated.nodes)    # block 3 is a copy of block 2
    full = load_torch(build_model(config))
    assert canonical(replicated) == canonical(full)
    fast, slow = analyse(replicated), analyse(full)
    assert fast.roles.params_total == slow.roles.params_total
    for spec in ("full", "freeze=attn", "train=experts", "lora=attn,experts;rank=4", "train=router"):
        plan, setup = parse_plan_spec(spec), Setup(batch=2, seq=32)
        a, b = estimate(fast, plan, setup), estimate(slow, plan, setup)
        assert (a.params, a.flops, a.memory) == (b.params, b.flops, b.memory), spec


# --------------------------------------------------------------------------- reaches_output

def reaches_output_by_forward_walk(finder: BlockFinder, site: int) -> bool:
    """The walk reaches_output did before issue 12: forward from the site, per site."""
    outputs = set(finder.view.graph.outputs)
    frontier, seen = [finder.view.nodes[site].outputs[0]], set()
    while frontier:
        name = frontier.pop()
        if name in outputs:
            return True
        for index in finder.view.consumer_nodes(name):
            if index in seen or index in finder.linear_sites:
                continue
            seen.add(index)
            if finder.view.nodes[index].op in HEAD_PATH_OPS:
                frontier.extend(o for o in finder.view.nodes[index].outputs if o)
    return False


@pytest.mark.parametrize("name", ONNX_FIXTURES)
def test_reaches_output_matches_the_per_site_walk(name):
    view = GraphView(load_onnx(FIXTURES / name))
    sites = classify_sites(view)
    linear = {s.site.node for group in sites.values() for s in group if s.kind is SiteKind.LINEAR}
    finder = BlockFinder(view, linear)
    answers = {site: finder.reaches_output(site) for site in sorted(linear)}
    assert answers == {site: reaches_output_by_forward_walk(finder, site) for site in sorted(linear)}
    assert any(answers.values()) or not linear                     # an LM head is found where there is one


# --------------------------------------------------------------------------- eval_shape

def test_memoised_eval_shape_equals_direct_evaluation():
    shapes = [("batch", "seq", 64), ("batch*seq", 8), ("seq*2", "seq//4"), ("batch", "heads"), (3, 4), ()]
    for bindings in ({"batch": 2, "seq": 16}, {"seq": 16, "batch": 2}, {"batch": 1, "seq": 4096}):
        for shape in shapes:
            assert eval_shape(shape, bindings) == _eval_shape_at.__wrapped__(shape, tuple(bindings.items()))
    # 2*16 = 32, 16*2 = 32, 16//4 = 4; an unknown symbol is None, never a guess
    assert eval_shape(("batch*seq", "seq*2", "seq//4"), {"batch": 2, "seq": 16}) == (32, 32, 4)
    assert eval_shape(("batch", "heads"), {"batch": 2, "seq": 16}) is None
    bindings = {"batch": 2, "seq": 16}
    assert eval_shape(("batch", "seq"), bindings) == (2, 16)
    bindings["seq"] = 8                                             # a mutated dict is a new key
    assert eval_shape(("batch", "seq"), bindings) == (2, 8)
    assert eval_shape(["batch", 3], bindings) == (2, 3)             # an unhashable shape still evaluates


# --------------------------------------------------------------------------- shared analyses across plans

@pytest.fixture(scope="module")
def moe():
    return analyse(load_onnx(FIXTURES / "moe.onnx"))


def test_cached_adapter_maps_equal_the_maps_rebuilt_from_adapters(moe):
    step = analyze(moe, parse_plan_spec("lora=attn,experts;rank=4"), {"batch": 2, "seq": 16})
    assert step.adapters
    assert step.adapter_at == {a.site: a for a in step.adapters if not a.n_experts}
    rebuilt: dict = {}
    for adapter in step.adapters:
        if adapter.n_experts:
            rebuilt[adapter.site] = rebuilt.get(adapter.site, ()) + (adapter,)
    assert step.tensor_adapters_at == rebuilt
    assert step.adapter_at is step.adapter_at                       # built once per analysis


def test_plans_priced_together_equal_each_priced_alone(moe):
    specs = ("full", "lora=attn;rank=8", "freeze=attn", "lora=attn,experts;rank=4", "train=router", "full")
    setup = Setup(batch=2, seq=64)
    together = [estimate(moe, parse_plan_spec(s), setup) for s in specs]
    alone = [estimate(analyse(load_onnx(FIXTURES / "moe.onnx")), parse_plan_spec(s), setup) for s in specs]
    for spec, a, b in zip(specs, together, alone):
        assert (a.params, a.flops, a.memory) == (b.params, b.flops, b.memory), spec
    assert together[0] == together[-1]
