"""One model, three front ends: the HF config traced by torch.export on the meta device, its dynamo
ONNX export and its TorchScript ONNX export give the same roles, parameters and FLOPs
(issue 9, item 5). Exports that cannot show a fact are listed with the reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
pytest.importorskip("transformers", reason="needs the torch extra")

import costlens  # noqa: E402
from costlens.estimate import estimate  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

pytestmark = pytest.mark.torch
CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
INDEX = json.loads((CORPUS / "index.json").read_text())
SETUP = Setup(batch=2, seq=16)
PAIRS = sorted((arch, exporter) for arch, entry in INDEX["archs"].items()
               for exporter, outcome in entry["exporters"].items() if outcome["status"] == "ok")
# The TorchScript exporter writes a tied head as a transposed copy of the embedding under a new
# name; the corpus keeps both tensors' data in those exports (build.py tied_initializers), and the
# front end sees from it that they are one tensor (issue 9): every pair must agree.


@pytest.fixture(scope="module")
def configs():
    cache = {}
    return lambda arch: cache.setdefault(arch, costlens.load(CORPUS / f"{arch}.config.json"))


def _summary(model) -> tuple:
    return model.roles.params_total, {k: v for k, v in model.roles.params_by_role().items() if v}


@pytest.mark.parametrize("arch, exporter", PAIRS, ids=lambda v: str(v))
def test_export_and_config_agree(configs, arch, exporter):
    from_config = configs(arch)
    exported = costlens.load(CORPUS / f"{arch}.{exporter}.onnx")
    assert _summary(exported) == _summary(from_config)
    for spec in costlens.default_plans(from_config):
        plan = parse_plan_spec(spec)
        a, b = estimate(from_config, plan, SETUP), estimate(exported, plan, SETUP)
        assert b.params.trainable == a.params.trainable, plan.name
        assert b.flops.forward == pytest.approx(a.flops.forward, rel=0.01), plan.name
        assert b.flops.step == pytest.approx(a.flops.step, rel=0.01), plan.name
