"""Roles on the exporter corpus (fixtures/hf): real transformers models exported by torch.onnx
(dynamo and TorchScript). Every count is checked against the truth file, which comes from the
torch module's own parameter names (fixtures/hf/build.py), never from costlens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import costlens

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
INDEX = json.loads((CORPUS / "index.json").read_text())
EXPORTS = sorted(
    (arch, exporter)
    for arch, entry in INDEX["archs"].items()
    for exporter, outcome in entry["exporters"].items()
    if outcome["status"] == "ok"
)
IDS = [f"{a}.{e}" for a, e in EXPORTS]
# the truth files say how positions enter; costlens names the computed kind it sees
POSITIONS = {"learned": "learned", "computed": "rotary", "rotary": "rotary", "none": "none"}


def _truth(arch: str) -> dict:
    return json.loads((CORPUS / f"{arch}.truth.json").read_text())


def _load(arch: str, exporter: str):
    return costlens.load(CORPUS / f"{arch}.{exporter}.onnx")


def _layer_counts(model) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for use in model.roles.params:
        if not use.n_params:
            continue
        layer = "none" if use.layer is None else str(use.layer)
        row = counts.setdefault(layer, {})
        row[use.role.value] = row.get(use.role.value, 0) + use.n_params
    return counts


def test_corpus_is_not_empty():
    assert len({a for a, _ in EXPORTS}) >= 15


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_params_by_role_equal_truth(arch, exporter):
    model = _load(arch, exporter)
    truth = _truth(arch)
    found = {k: v for k, v in model.roles.params_by_role().items() if v}
    assert found == {k: v for k, v in truth["params_by_role"].items() if v}
    assert model.roles.params_total == truth["params_total"]


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_params_by_layer_equal_truth(arch, exporter):
    model = _load(arch, exporter)
    truth = {layer: {k: v for k, v in row.items() if v} for layer, row in _truth(arch)["params_by_layer"].items()}
    assert _layer_counts(model) == {k: v for k, v in truth.items() if v}


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_architecture_line(arch, exporter):
    arch_found = _load(arch, exporter).roles.architecture
    truth = _truth(arch)["architecture"]
    assert arch_found.layers == truth["layers"]
    assert arch_found.hidden == truth["hidden"]
    assert arch_found.vocab == truth["vocab"]
    assert arch_found.experts == truth["experts"]
    assert (arch_found.top_k or 0) == truth["top_k"]
    assert arch_found.positions == POSITIONS[truth["positions"]]
    assert arch_found.norm == truth["norm"]
    assert arch_found.gated_ffn == truth["gated_ffn"]
    assert arch_found.shared_experts == truth["shared_experts"]
    assert arch_found.tied_embedding == _truth(arch)["tied_embedding"]


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_no_parameter_left_unplaced(arch, exporter):
    assert _load(arch, exporter).roles.unmatched == ()
