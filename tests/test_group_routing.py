"""Group-limited routing (DeepSeek-V3: a top-k inside each group of experts, a top-k of groups,
then the top-k over every expert): the router's k is the last one's, and the step's FLOPs equal
what torch's FlopCounterMode counts on the real transformers module running its experts one by
one (the grouped_mm default is invisible to FlopCounterMode)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="needs the torch extra")

import costlens  # noqa: E402
import torch_plans  # noqa: E402  (tests/: the step as FlopCounterMode counts it)
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

pytestmark = pytest.mark.torch
# 8 experts in 4 groups of 2: the group score is a top-2 inside each group, 2 groups are kept,
# then 3 experts are chosen: three TopKs with k = 2, 2, 3; only the last picks experts
CONFIG = {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
          "n_shared_experts": 1, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
          "first_k_dense_replace": 0, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
          "qk_nope_head_dim": 8, "v_head_dim": 16, "vocab_size": 256, "max_position_embeddings": 256,
          "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return costlens.load(path)


def _real_step_flops(batch: int, seq: int) -> tuple[int, int]:
    data = dict(CONFIG)
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    config._attn_implementation, config._experts_implementation = "eager", "eager"
    torch.manual_seed(0)
    module = transformers.AutoModelForCausalLM.from_config(config)
    return torch_plans.step_flops(module, batch, seq, CONFIG["vocab_size"])


def test_the_router_k_is_the_top_k_over_all_experts(model):
    assert {(r.n_experts, r.top_k) for r in model.roles.routers} == {(8, 3)}
    assert model.roles.architecture.top_k == 3


def test_step_flops_equal_the_real_module(model):
    forward, total = _real_step_flops(2, 16)
    result = costlens.estimate(model, parse_plan_spec("full"), Setup(batch=2, seq=16))
    assert result.flops.forward == pytest.approx(forward, rel=0.01)
    assert result.flops.step == pytest.approx(total, rel=0.01)
