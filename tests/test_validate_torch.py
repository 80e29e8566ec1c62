"""`costlens validate` from a PyTorch source: the traced module priced, the real module measured."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
pytest.importorskip("peft", reason="needs the torch extra (PEFT)")

from click.testing import CliRunner  # noqa: E402

from costlens.cli import main  # noqa: E402

CASES = [
    ("models:llama_like", ["--lora", "attn", "--rank", "8"]),
    ("models:gpt2_like", []),                                   # a tied head: one parameter, two names
    ("models:bert_like", ["--freeze", "attn"]),
    ("models:stacked_ffn_like", ["--lora", "attn,ffn"]),
    ("models:llama_like", ["--train", "ffn", "--stop-grad", "attn"]),
    ("models:moe_like", ["--moe-dispatch", "dense", "--lora", "attn,router,experts",
                         "--rank", "attn=8,router=4,experts=4"]),
    ("models:moe_fused_like", ["--moe-dispatch", "dense", "--lora", "experts"]),   # PEFT target_parameters
]


@pytest.mark.parametrize("spec, args", CASES, ids=[f"{s}{' '.join(a)}" for s, a in CASES])
def test_validate_import_spec(spec, args):
    # fixtures/ is on sys.path (conftest), as a user's package would be
    result = CliRunner().invoke(main, ["validate", spec, *args, "--seq", "32", "--batch", "2", "--json"])
    assert result.exit_code == 0, result.stderr + result.stdout
    document = json.loads(result.stdout)
    assert document["measured_from"] == "torch" and document["ok"]
    trainable = next(c for c in document["comparisons"] if c["quantity"] == "trainable params")
    assert trainable["estimated"] == trainable["measured"]


def test_validate_torch_source_refuses_graph_changes():
    result = CliRunner().invoke(main, ["validate", "models:llama_like", "--stack-ffn", "1"])
    assert result.exit_code == 2 and "ONNX graph" in result.stderr
