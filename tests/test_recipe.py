"""Recipe files (TrainingArguments fields) as Setup: each field checked against the option it stands for."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main
from costlens.errors import PlanError
from costlens.recipe import load_recipe, recipe_from_mapping

LLAMA = str(FIXTURES / "llama.onnx")
RECIPE_YAML = """\
# a TRL SFT recipe
model_name_or_path: meta-llama/Llama-3.1-8B
learning_rate: 2.0e-4
per_device_train_batch_size: 4
max_length: 128
bf16: true
gradient_checkpointing: true
optim: adamw_8bit
gradient_accumulation_steps: 8
"""


def _plan_json(*args):
    result = CliRunner().invoke(main, ["plan", LLAMA, "--lora", "attn", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(RECIPE_YAML)
    return path


def test_yaml_recipe_is_the_same_step_as_the_options(recipe):
    from_recipe = _plan_json("--recipe", str(recipe))
    by_hand = _plan_json("--batch", "4", "--seq", "128", "--precision", "bf16-autocast", "--checkpointing",
                         "--optimizer", "adamw-8bit", "--optimizer-impl", "for-loop")
    # the same step; the recipe's accumulation is recorded as a derived default (issue 16 item 1)
    derived = from_recipe["setup"].pop("derived")
    assert derived == {"grad_accum": "8, from --recipe gradient_accumulation_steps"}
    assert by_hand["setup"].pop("derived") == {}
    assert from_recipe["setup"] == by_hand["setup"]
    assert from_recipe["plans"] == by_hand["plans"]
    block = from_recipe["recipe"]
    assert block["gradient_accumulation_steps"] == 8
    assert block["tokens_per_optimizer_step_per_device"] == 4 * 128 * 8
    assert "learning_rate" in block["ignored"] and "model_name_or_path" in block["ignored"]


def test_gradient_accumulation_does_not_change_the_step(recipe, tmp_path):
    single = tmp_path / "one.yaml"
    single.write_text(RECIPE_YAML.replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1"))
    eight, one = _plan_json("--recipe", str(recipe)), _plan_json("--recipe", str(single))
    assert eight["plans"] == one["plans"]
    text = CliRunner().invoke(main, ["plan", LLAMA, "--lora", "attn", "--recipe", str(recipe)]).stdout
    assert "gradient accumulation 8 step(s)" in text


def test_command_line_wins_over_the_recipe(recipe):
    document = _plan_json("--recipe", str(recipe), "--batch", "2", "--precision", "fp32")
    assert document["setup"]["batch"] == 2 and document["setup"]["precision"] == "fp32"
    assert document["setup"]["seq"] == 128 and document["setup"]["checkpointing"] is True


def test_json_recipe_and_the_python_api(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"per_device_train_batch_size": 2, "max_seq_length": 64, "fp16": True,
                                "optim": "sgd", "optim_args": "momentum=0.9"}))
    recipe = load_recipe(path)
    assert dict(recipe.setup) == {"batch": 2, "seq": 64, "precision": "fp16-autocast", "checkpointing": False,
                                  "optimizer": "sgd-momentum", "optimizer_impl": "for-loop"}
    from costlens.plans import Setup
    assert recipe.as_setup(Setup(attention="fused")) == Setup(batch=2, seq=64, precision="fp16-autocast", attention="fused",
                                                              optimizer="sgd-momentum", optimizer_impl="for-loop")


def test_left_out_fields_take_training_arguments_defaults():
    transformers = pytest.importorskip("transformers")
    defaults = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    recipe = recipe_from_mapping({"max_length": 256})
    assert recipe.setup["batch"] == defaults["per_device_train_batch_size"]
    assert defaults["optim"] == "adamw_torch_fused" and recipe.setup["optimizer"] == "adamw"
    assert any("upper bound" in note for note in recipe.notes)           # fused AdamW priced as the for-loop form
    assert recipe.setup["precision"] == "fp32" and recipe.setup["checkpointing"] is False


@pytest.mark.parametrize("mapping, needles", [
    ({"optim": "lion_8bit"}, ["optim 'lion_8bit'", "adamw_torch"]),
    ({"per_device_batch_size": 4}, ["not a TrainingArguments field", "per_device_train_batch_size"]),
    ({"fsdp": "full_shard"}, ["fsdp"]),
    ({"bf16": True, "fp16": True}, ["both"]),
    ({"max_length": 128, "max_seq_length": 256}, ["differ"]),
    ({"per_device_train_batch_size": 0}, ["positive"]),
    ({"lora_r": 16}, ["--peft"]),
    ({"load_in_4bit": True}, ["quantized"]),
    ({"dtype": "float16"}, ["float16"]),
])
def test_what_cannot_be_priced_is_an_error(mapping, needles):
    pytest.importorskip("transformers")
    with pytest.raises(PlanError) as error:
        recipe_from_mapping(mapping, "train.yaml")
    assert all(n in str(error.value) for n in needles), str(error.value)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: galore_adamw\n")
    _one_line_error(CliRunner().invoke(main, ["plan", LLAMA, "--recipe", str(bad)]), "galore_adamw")
    _one_line_error(CliRunner().invoke(main, ["plan", LLAMA, "--recipe", str(tmp_path / "none.yaml")]),
                    "no such recipe")


def test_without_pyyaml_yaml_is_refused_and_json_still_works(tmp_path, monkeypatch, recipe):
    monkeypatch.setitem(sys.modules, "yaml", None)            # import yaml -> ImportError
    with pytest.raises(PlanError, match="give the recipe as JSON"):
        load_recipe(recipe)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"per_device_train_batch_size": 3}))
    assert load_recipe(path).setup["batch"] == 3
