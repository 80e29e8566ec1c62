"""The exporter corpus of real Hugging Face architectures (fixtures/hf, built by fixtures/hf/build.py).

These tests check the corpus itself — files, index, truth — not costlens.
"""
import json
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
ARCHS = [
    "gpt2", "gpt_neox", "falcon", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
    "phi3", "olmo2", "starcoder2", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "phimoe",
    "deepseek_v2", "deepseek_v3", "gpt_oss", "bert",
]
EXPORTERS = ["dynamo", "torchscript"]
ROLES = {"attention", "ffn", "router", "experts", "shared_experts", "embedding", "norm", "lm_head", "other"}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def index() -> dict:
    path = HF / "index.json"
    assert path.is_file(), f"missing {path}: run python fixtures/hf/build.py"
    return json.loads(path.read_text())


def exported() -> list[tuple[str, str]]:
    return [(arch, exporter) for arch, entry in index()["archs"].items()
            for exporter, result in entry.get("exporters", {}).items() if result.get("status") == "ok"]


def test_index_lists_every_arch_with_an_outcome_per_exporter():
    archs = index()["archs"]
    assert sorted(archs) == sorted(ARCHS)
    for arch, entry in archs.items():
        assert entry["model_class"].startswith("transformers."), arch
        assert isinstance(entry["config_kwargs"], dict), arch
        assert "attn_implementation_default" in entry and "experts_implementation_default" in entry, arch
        for exporter in EXPORTERS:
            status = entry["exporters"][exporter]["status"]
            assert status == "ok" or (isinstance(status, str) and ": " in status), (arch, exporter, status)


def test_at_least_15_archs_export_with_dynamo():
    ok = [arch for arch, exporter in exported() if exporter == "dynamo"]
    assert len(ok) >= 15, ok


@pytest.mark.parametrize("arch,exporter", exported())
def test_exported_file_loads_graph_only_with_dynamic_batch_and_seq(arch, exporter):
    result = index()["archs"][arch]["exporters"][exporter]
    path = HF / result["file"]
    assert path.name == f"{arch}.{exporter}.onnx" and path.is_file()
    assert path.stat().st_size == result["bytes"]
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    ids = model.graph.input[0].type.tensor_type
    assert ids.elem_type == onnx.TensorProto.INT64
    dims = ids.shape.dim
    assert len(dims) == 2 and all(d.dim_param and not d.HasField("dim_value") for d in dims), dims
    external = 0
    # a tied model's TorchScript export keeps the tie's evidence inline (build.py tied_initializers):
    # the token table and the head's transposed copy, with their data
    inline = set(result.get("inline_weights", ()))
    truth = json.loads((HF / f"{arch}.truth.json").read_text())
    assert len(inline) == (2 if exporter == "torchscript" and truth["tied_embedding"] else 0), inline
    for tensor in model.graph.initializer:
        numel = 1
        for d in tensor.dims:
            numel *= d
        if tensor.name in inline:
            assert tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) == 4 * numel
            inline.discard(tensor.name)
            continue
        if tensor.data_type in FLOATS and numel > 16:
            assert tensor.data_location == onnx.TensorProto.EXTERNAL, tensor.name
            entries = {e.key: e.value for e in tensor.external_data}
            assert entries["location"] == f"{arch}.{exporter}.weights"
            assert int(entries["offset"]) % 4096 == 0 and int(entries["length"]) > 0
            assert not tensor.raw_data
            external += 1
        else:
            assert tensor.data_location != onnx.TensorProto.EXTERNAL, tensor.name
    assert external > 0 and not inline
    assert not (HF / f"{arch}.{exporter}.weights").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_truth_sums(arch):
    truth = json.loads((HF / f"{arch}.truth.json").read_text())
    assert set(truth["params_by_role"]) <= ROLES
    assert truth["params_total"] == sum(truth["params_by_role"].values())
    assert truth["params_total"] == sum(sum(roles.values()) for roles in truth["params_by_layer"].values())
    layers = truth["architecture"]["layers"]
    assert set(truth["params_by_layer"]) <= {"none"} | {str(i) for i in range(layers)}
    arch_facts = truth["architecture"]
    assert arch_facts["positions"] in ("learned", "computed", "none")
    assert arch_facts["norm"] in ("layernorm", "rmsnorm")
    assert isinstance(arch_facts["gated_ffn"], bool) and isinstance(arch_facts["shared_experts"], bool)
    assert (HF / f"{arch}.config.json").is_file()


def test_corpus_is_small():
    total = sum(p.stat().st_size for p in HF.rglob("*") if p.is_file())
    assert total < 20e6, total


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_config_rebuilds_the_same_model(arch):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_dict = json.loads((HF / f"{arch}.config.json").read_text())
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config)
    truth = json.loads((HF / f"{arch}.truth.json").read_text())
    assert truth["params_total"] == sum(p.numel() for p in model.parameters())
    assert truth["architecture"]["layers"] == len(model.base_model.h if arch == "gpt2" else model.base_model.layers)
