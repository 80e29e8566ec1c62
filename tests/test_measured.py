"""Recorded measurements (fixtures/measured/, written by benchmarks/accuracy.py --record) against
today's estimates, so a machine without torch, or without the recorded device, still checks the
comparison. The recordings are measured runs, never estimator output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import costlens
from conftest import FIXTURES
from costlens.plans import Setup, parse_plan_spec

MEASURED = sorted((FIXTURES / "measured").glob("*.json"))
SPECS = {
    "dropout": "dropout=0.1", "stop-grad": "train=ffn;stop-grad=attn", "stacked": "stack-ffn=1;train=stacked",
    "lora-dropout": "lora=attn,ffn;rank=8;lora-dropout=0.05", "full-sgd-momentum": "full", "full-foreach": "full",
    "lora-experts": "lora=experts;rank=8",
}


def _spec(fixture: str, plan: str) -> str:
    if plan in SPECS:
        return SPECS[plan]
    defaults = costlens.default_plans(costlens.load(FIXTURES / f"{fixture}.onnx"))
    return next(spec for spec in defaults if spec.split(":")[0] == plan)


def test_recordings_exist():
    assert len(MEASURED) >= 100, "fixtures/measured/ is missing: run benchmarks/accuracy.py --record"


@pytest.mark.parametrize("path", MEASURED, ids=lambda p: p.stem)
def test_estimate_matches_recorded_measurement(loaded, path: Path):
    record = json.loads(path.read_text())
    setup = Setup(batch=record["batch"], seq=record["seq"], device=record["device"], **record["setup"])
    result = costlens.estimate(loaded(record["fixture"]), parse_plan_spec(_spec(record["fixture"], record["plan"])),
                               setup)
    measured = record["measured"]
    assert result.params.trainable == measured["trainable params"]
    assert result.flops.forward + result.flops.backward == pytest.approx(measured["step FLOPs"], rel=0.01)
    assert result.memory.peak == pytest.approx(measured["peak bytes"], rel=0.05)
    assert result.memory.activations == pytest.approx(measured["activation bytes"], rel=0.05)
