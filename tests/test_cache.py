"""The on-disk graph cache of the config path (costlens/frontends/graph_cache.py).

A config traced once is read back from the cache: the cached graph must equal the traced
one field for field (every node, tensor, constant) and price every plan identically; an
entry that is corrupt (flipped byte, truncated, wrong header, not JSON) is ignored and the
config traced again; ``COSTLENS_CACHE=off`` writes nothing. Every test points the cache at
its own tmp folder.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="needs the torch extra (transformers)")

from costlens.estimate import estimate  # noqa: E402
from costlens.frontends import graph_cache, hf_config  # noqa: E402
from costlens.model import analyse  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

# a 4-block Mixtral (router, 4 experts): replication, MoE dense dispatch and tied-free heads
CONFIG = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 4, "intermediate_size": 96, "num_local_experts": 4,
          "num_experts_per_tok": 2, "bos_token_id": 0, "eos_token_id": 1}
PLANS = ("full", "freeze=attn", "train=experts", "lora=attn;rank=8", "lora=attn,experts;rank=4")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture()
def traces(monkeypatch):
    """Counts the traces load_config_file really runs (a cache hit runs none)."""
    calls = []
    real = hf_config.load_config_graph

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(hf_config, "load_config_graph", counted)
    return calls


def priced(graph):
    model = analyse(graph)
    return [estimate(model, parse_plan_spec(spec), Setup(batch=2, seq=64)) for spec in PLANS]


def entries(folder):
    return sorted(folder.glob("graph-*.json"))


def test_cached_graph_equals_the_trace_node_for_node_and_cost_for_cost(cache, config_file, traces):
    traced = hf_config.load_config_file(config_file, name="a")
    assert len(traces) == 1 and len(entries(cache)) == 1
    cached = hf_config.load_config_file(config_file, name="a")
    assert len(traces) == 1                                        # read back, not traced again
    assert cached == traced                                        # every field of the frozen IR
    assert cached.nodes == traced.nodes and dict(cached.tensors) == dict(traced.tensors)
    assert dict(cached.constants) == dict(traced.constants)
    uncached = hf_config.load_config_graph(hf_config.read_config(config_file), source="a")
    assert cached == uncached
    assert priced(cached) == priced(uncached)                       # every figure of every plan


def test_source_name_is_not_part_of_the_entry(cache, config_file, tmp_path, traces):
    other = tmp_path / "elsewhere.json"
    other.write_text(config_file.read_text())
    first = hf_config.load_config_file(config_file, name="one")
    second = hf_config.load_config_file(other, name="two")
    assert len(traces) == 1
    assert second.source == "two" and first.source == "one"
    assert second.nodes == first.nodes


def test_another_config_is_another_entry(cache, config_file, traces):
    hf_config.load_config_file(config_file)
    config_file.write_text(json.dumps({**CONFIG, "num_hidden_layers": 5}))
    deeper = hf_config.load_config_file(config_file)
    assert len(traces) == 2 and len(entries(cache)) == 2
    assert {n.scope.split(".")[2] for n in deeper.nodes if n.scope.startswith("model.layers.")} == set("01234")


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "not-json", "empty"])
def test_corrupt_entry_is_ignored_and_rebuilt(cache, config_file, traces, damage):
    traced = hf_config.load_config_file(config_file)
    (entry,) = entries(cache)
    data = entry.read_bytes()
    damaged = {
        "flip": data[:-200] + bytes([data[-200] ^ 0x01]) + data[-199:],
        "truncate": data[: len(data) // 2],
        "header": data.replace(b'"sha256"', b'"sha257"', 1),
        "not-json": b"\x80\x81 not a cache entry",
        "empty": b"",
    }[damage]
    entry.write_bytes(damaged)
    rebuilt = hf_config.load_config_file(config_file)
    assert len(traces) == 2                                        # traced again
    assert rebuilt == traced
    assert entry.read_bytes() == data                              # and the entry rewritten whole
    hf_config.load_config_file(config_file)
    assert len(traces) == 2


def test_a_well_formed_entry_of_another_key_is_not_read(cache, config_file, traces):
    hf_config.load_config_file(config_file)
    (entry,) = entries(cache)
    header, _, payload = entry.read_bytes().partition(b"\n")
    moved = cache / ("graph-" + "0" * 64 + ".json")
    moved.write_bytes(header + b"\n" + payload)
    assert graph_cache.load_graph_entry("0" * 64) is None          # the header names its own key


def test_cache_off_writes_nothing(tmp_path, config_file, monkeypatch, traces):
    monkeypatch.setenv(graph_cache.CACHE_ENV, "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hf_config.load_config_file(config_file)
    hf_config.load_config_file(config_file)
    assert len(traces) == 2
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()


def test_unwritable_cache_folder_still_loads(tmp_path, config_file, monkeypatch, traces):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(blocker / "cache"))
    graph = hf_config.load_config_file(config_file)
    assert graph.nodes and len(traces) == 1


def test_round_trip_keeps_tuples_mappings_and_symbolic_shapes(cache, config_file):
    graph = hf_config.load_config_file(config_file)
    back = graph_cache.graph_from_document(json.loads(json.dumps(graph_cache.graph_document(graph))))
    assert back == graph
    symbolic = [t.shape for t in graph.tensors.values() if t.shape and any(isinstance(d, str) for d in t.shape)]
    assert symbolic and all(isinstance(s, tuple) for s in symbolic)
    with_tuples = [n for n in graph.nodes if any(isinstance(v, tuple) for v in n.attrs.values())]
    assert with_tuples and all(type(a.attrs[k]) is type(b.attrs[k])
                               for a, b in zip(graph.nodes, back.nodes) for k in a.attrs)


def test_key_changes_with_versions(monkeypatch):
    parts = {"config": CONFIG}
    before = graph_cache.cache_key(parts)
    real = graph_cache.metadata.version
    monkeypatch.setattr(graph_cache.metadata, "version",
                        lambda name: "0.0.0-other" if name == "transformers" else real(name))
    assert graph_cache.cache_key(parts) != before


def test_a_warm_plan_on_a_config_never_imports_transformers(cache, config_file):
    # importing transformers (and torch under it) costs seconds: with the graph and the attention
    # default cached, pricing a config again needs neither (the cache's point, issue 12)
    import os
    import subprocess
    import sys
    command = ("import sys; from costlens.cli import main\n"
               "try:\n    main(['plan', sys.argv[1], '--seq', '32'])\n"
               "except SystemExit as e:\n    assert not e.code, e.code\n"
               "print('transformers' in sys.modules, 'torch' in sys.modules)")
    env = dict(os.environ, **{graph_cache.CACHE_ENV: str(cache)})
    run = lambda: subprocess.run([sys.executable, "-c", command, str(config_file)], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=300)
    cold, warm = run(), run()
    assert cold.returncode == 0 and cold.stdout.strip().endswith("True True"), cold.stderr[-500:]
    assert warm.returncode == 0, warm.stderr[-500:]
    assert warm.stdout.strip().splitlines()[-1] == "False False"
