"""The torch front end against the ONNX front end, fixture by fixture.

Each fixture module (fixtures/models.py) is built on the meta device and traced with
torch.export; its ONNX export (fixtures/<name>.onnx) goes through the ONNX front end. Both
must give identical roles, parameters per layer, architecture, and identical parameter and
FLOP estimates. Memory may differ a little, for two known reasons, each checked here:
the ONNX exporter merges the RoPE cos/sin tables that the module computes per call (the
torch graph keeps one storage per call, as autograd does), and the optimizer visits
parameters in ``model.parameters()`` order, which the ONNX file's initializer order is not.
"""
from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")

import models  # noqa: E402  (fixtures/models.py)
from click.testing import CliRunner  # noqa: E402

import costlens  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from costlens.cli import main  # noqa: E402
from costlens.estimate import estimate  # noqa: E402
from costlens.frontends import aten  # noqa: E402
from costlens.ops.registry import known  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

FACTORIES = {"gpt2": models.gpt2_like, "llama": models.llama_like, "moe": models.moe_like,
             "moe_fused": models.moe_fused_like, "stacked_ffn": models.stacked_ffn_like, "bert": models.bert_like}
DENSE_PLANS = ["full", "freeze=attn", "lora=attn;rank=8", "lora=attn,ffn;rank=8", "train=ffn;stop-grad=attn"]
MOE_PLANS = ["full", "freeze=attn", "lora=attn;rank=8", "lora=attn,router,experts;rank=attn=8,router=4,experts=4",
             "train=router;freeze=experts"]
SETUP = Setup(batch=2, seq=32)
# Memory differences measured when this test was written (bytes of the peak at batch 2, seq 32);
# the bound below keeps them small.
MEMORY_TOLERANCE = 0.02


def per_layer(roles) -> dict:
    counts = Counter()
    for use in roles.params:
        counts[(use.layer, use.role.value)] += use.n_params
    return dict(counts)


@pytest.fixture(scope="module")
def pairs():
    """(torch-traced model, ONNX model) per fixture, each loaded once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            with torch.device("meta"):
                module = FACTORIES[name]()
            cache[name] = (costlens.load(module), costlens.load(FIXTURES / f"{name}.onnx"))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(FACTORIES))
def test_roles_and_architecture_agree(pairs, name):
    traced, exported = pairs(name)
    assert traced.unknown_ops == {}, traced.unknown_ops        # every op lowered to a canonical kind
    assert all(known(n.op) for n in traced.graph.nodes)
    assert traced.graph.warnings == ()
    assert traced.roles.params_by_role() == exported.roles.params_by_role()
    assert per_layer(traced.roles) == per_layer(exported.roles)
    assert traced.roles.architecture == exported.roles.architecture
    assert traced.roles.unmatched == () == exported.roles.unmatched


@pytest.mark.parametrize("name", list(FACTORIES))
def test_parameters_and_flops_agree(pairs, name):
    traced, exported = pairs(name)
    plans = MOE_PLANS if name.startswith("moe") else DENSE_PLANS
    for spec in plans:
        a = estimate(traced, parse_plan_spec(spec), SETUP)
        b = estimate(exported, parse_plan_spec(spec), SETUP)
        assert a.params == b.params, spec
        assert a.flops == b.flops, spec
        assert a.memory.peak == pytest.approx(b.memory.peak, rel=MEMORY_TOLERANCE), spec
        assert a.memory.weights == b.memory.weights and a.memory.optimizer == b.memory.optimizer, spec


def test_memory_differences_have_their_known_causes(pairs):
    # GPT-2 computes no RoPE table and its parameter order matches: memory is identical
    traced, exported = pairs("gpt2")
    a, b = (estimate(m, parse_plan_spec("full"), SETUP).memory for m in (traced, exported))
    assert a == b
    # LLaMA: rotary() runs for q and k in each layer -> cos and sin [seq, head_dim] fp32 per call,
    # saved by the q/k products; the ONNX export keeps one shared pair: 3 extra pairs = 6 tables
    traced, exported = pairs("llama")
    a, b = (estimate(m, parse_plan_spec("full"), SETUP).memory for m in (traced, exported))
    table_bytes = 32 * 16 * 4                     # seq 32 x head_dim 16 x fp32 = 2048
    assert a.activations - b.activations == 6 * table_bytes


def test_parameters_keep_module_paths_and_nodes_keep_scopes(pairs):
    traced, _ = pairs("llama")
    names = {use.constant for use in traced.roles.params}
    assert "layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    q = next(u for u in traced.roles.params if u.constant == "layers.1.self_attn.q_proj.weight")
    assert (q.role.value, q.kind, q.layer, q.hint) == ("attention", "q", 1, "layers.1.self_attn.q_proj")


def test_symbolic_batch_and_seq(pairs):
    traced, _ = pairs("moe_fused")
    graph = traced.graph
    assert graph.shape(graph.inputs[0]) == ("batch", "seq")
    assert graph.shape(graph.outputs[0]) == ("batch", "seq", 512)
    assert ("batch*seq", 64) in {graph.shape(o) for n in graph.nodes for o in n.outputs}


def test_tied_head_is_one_tensor(pairs):
    traced, _ = pairs("gpt2")
    assert traced.roles.architecture.tied_embedding
    head = next(u for u in traced.roles.params if u.role.value == "lm_head")
    token = next(u for u in traced.roles.params if u.kind == "token")
    # one tensor used twice (torch.export keeps one of its names, as the ONNX export does)
    assert head.constant == token.constant and head.tied_to == token.constant and head.n_params == 0


def test_import_spec_and_module_give_the_same_graph(pairs, monkeypatch):
    monkeypatch.chdir(FIXTURES)                   # the spec's module is importable from the current folder
    from_spec = costlens.load("models:llama_like")
    traced, _ = pairs("llama")
    assert [n.op for n in from_spec.graph.nodes] == [n.op for n in traced.graph.nodes]
    assert from_spec.roles.params_by_role() == traced.roles.params_by_role()


def test_factory_may_return_example_inputs(tmp_path, monkeypatch):
    (tmp_path / "pairs_factory.py").write_text(
        "import torch\nimport models\n"
        "def build():\n"
        "    return models.llama_like(), (torch.zeros(3, 24, dtype=torch.long),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = costlens.load("pairs_factory:build")
    assert model.graph.shape(model.graph.inputs[0]) == ("batch", "seq")
    assert model.roles.architecture.layers == 2


def test_a_module_with_weights_is_left_as_it_was(pairs):
    module = models.llama_like()                      # real CPU weights, training mode
    weight = module.lm_head.weight.detach().clone()
    model = costlens.load(module)
    assert module.training and module.lm_head.weight.device.type == "cpu"
    assert torch.equal(module.lm_head.weight.detach(), weight)
    assert model.roles.params_by_role() == pairs("llama")[0].roles.params_by_role()


def test_lowering_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        aten.lowers("aten.linear")(lambda b, c: None)


# --------------------------------------------------------------------------- errors

BAD_MODULES = '''
import torch
from torch import nn

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
    def forward(self, ids):
        x = self.emb(ids)
        if x.sum() > 0:            # branches on values: no trace on the meta device
            return x * 2
        return x

def data_dependent():
    return DataDependent()

def not_a_module():
    return 42
'''


@pytest.mark.parametrize("spec, cause", [
    ("costlens_no_such_pkg.mod:factory", "cannot import module"),
    ("bad_modules:missing", "has no attribute"),
    ("bad_modules:not_a_module", "not an nn.Module"),
    ("bad_modules:data_dependent", "torch.export could not trace"),
])
def test_bad_sources_give_one_line_and_exit_2(tmp_path, monkeypatch, spec, cause):
    (tmp_path / "bad_modules.py").write_text(BAD_MODULES)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["inspect", spec])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error:") and cause in lines[0], result.stderr
    assert spec in lines[0]


# --------------------------------------------------------------------------- export

def test_export_writes_a_graph_only_onnx_file(tmp_path, pairs):
    import onnx

    from costlens.frontends.onnx_export import export_onnx
    with torch.device("meta"):
        module = models.llama_like()
    path = export_onnx(module, tmp_path / "llama.onnx")
    assert not (tmp_path / "llama.onnx.data").exists()          # referenced, never written
    proto = onnx.load(str(path), load_external_data=False)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    params = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in params} == {n for n, _ in module.named_parameters()}
    # the export reads back through the ONNX front end exactly as the committed fixture does
    exported, fixture = costlens.load(path), pairs("llama")[1]
    assert exported.roles.params_by_role() == fixture.roles.params_by_role()
    assert exported.roles.architecture == fixture.roles.architecture
    for spec in ("full", "lora=attn;rank=8"):
        a, b = (estimate(m, parse_plan_spec(spec), SETUP) for m in (exported, fixture))
        assert (a.params, a.flops, a.memory) == (b.params, b.flops, b.memory), spec


def test_export_refuses_an_onnx_source(tmp_path):
    from costlens.frontends.onnx_export import ExportError, export_onnx
    with pytest.raises(ExportError, match="already an ONNX file"):
        export_onnx(FIXTURES / "llama.onnx", tmp_path / "x.onnx")


def test_export_checks_the_output_before_tracing(tmp_path, monkeypatch):
    from costlens.frontends import onnx_export
    traced = []
    monkeypatch.setattr(onnx_export, "resolve_module", lambda source: traced.append(source))
    with pytest.raises(onnx_export.ExportError, match="does not exist"):
        onnx_export.export_onnx("models:llama_like", tmp_path / "missing" / "x.onnx")
    with pytest.raises(onnx_export.ExportError, match="is a folder"):
        onnx_export.export_onnx("models:llama_like", tmp_path)
    assert traced == []            # refused before any trace


# --------------------------------------------------------------------------- fvcore

@pytest.mark.parametrize("name", list(FACTORIES))
def test_fvcore_tracer_agrees_with_the_onnx_front_end(pairs, name):
    pytest.importorskip("fvcore", reason="the fvcore tracer needs fvcore (torch extra)")
    from costlens.api import load_graph
    from costlens.roles import locate_roles
    with torch.device("meta"):
        module = FACTORIES[name]()
    graph = load_graph(module, tracer="fvcore")
    assert all(known(n.op) for n in graph.nodes) and graph.warnings == ()
    traced = costlens.api.Model(graph, locate_roles(graph), {})
    exported = pairs(name)[1]
    assert traced.roles.params_by_role() == exported.roles.params_by_role()
    assert per_layer(traced.roles) == per_layer(exported.roles)
    assert traced.roles.architecture == exported.roles.architecture
    for spec in ("full", "lora=attn;rank=8"):
        a, b = (estimate(m, parse_plan_spec(spec), SETUP) for m in (traced, exported))
        assert (a.params, a.flops) == (b.params, b.flops), spec


def test_fvcore_solves_symbolic_dims():
    pytest.importorskip("fvcore", reason="the fvcore tracer needs fvcore (torch extra)")
    from costlens.frontends.fvcore_jit import solve_dim
    # traces at (batch, seq) = (2, 16) and (3, 20)
    assert solve_dim(64, 64) == 64
    assert (solve_dim(16, 20), solve_dim(2, 3), solve_dim(32, 60), solve_dim(128, 240)) == ("seq", "batch",
                                                                                         "batch*seq", "4*batch*seq")
    assert solve_dim(17, 21) == "seq + 1"
    assert solve_dim(5, 100).startswith("unknown")        # fits no form: unknown, never guessed
