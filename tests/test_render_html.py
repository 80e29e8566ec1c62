"""The HTML report: renders for every fixture, escapes what the model file says, stays
self-contained, tolerates missing fields, and shows the key numbers in a real browser."""
from __future__ import annotations

import copy
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import jinja2
import pytest

from conftest import FIXTURES, ROOT
from costlens.budgets import judge, parse_budget
from costlens.estimate import default_plans, estimate
from costlens.plans import Setup, parse_plan_spec
from costlens.render import units
from costlens.render.html import TEMPLATES, environment, render_html
from costlens.render.plan import plan_document

ALL_FIXTURES = sorted(path.stem for path in FIXTURES.glob("*.onnx"))
HOSTILE = "<script>alert(1)</script>"


def compare_document(loaded, name: str, **setup) -> dict:
    """What `costlens compare fixtures/NAME.onnx --json` prints (default plans)."""
    model = loaded(name)
    setup = Setup(**{"batch": 1, "seq": 64, **setup})
    document = plan_document(model, [(spec, estimate(model, parse_plan_spec(spec), setup))
                                      for spec in default_plans(model)])
    document["model"]["source"] = f"fixtures/{name}.onnx"      # as the CLI prints it from the repository root
    return document


def text_of(html: str) -> str:
    """The page's visible text (what a person reads), whitespace collapsed."""
    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("style", "title")

        def handle_endtag(self, tag):
            self.skip -= tag in ("style", "title")

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)
    parser = Text()
    parser.feed(html)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


def assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    assert not re.search(r"\b(src|href)\s*=", html), "the page must load nothing"
    assert "@import" not in html and "url(" not in html
    assert re.findall(r"https?://[^\s\"']+", html) == ["http://www.w3.org/2000/svg"] * html.count("<svg ")


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_report_renders_for_every_fixture(loaded, name):
    document = compare_document(loaded, name, gpu="l4")
    html = render_html(document)
    assert_self_contained(html)
    text = text_of(html)
    for plan in document["plans"]:
        assert plan["name"] in text
        assert units.params(plan["params"]["trainable"]) in text
        assert units.flops(plan["flops"]["step"]) in text
        assert units.nbytes(plan["memory_bytes"]["peak"]) in text
    assert 'id="memory-chart"' in html and 'id="flops-chart"' in html
    assert html.count('class="part weights"') >= len(document["plans"])


def test_every_string_from_the_model_file_is_escaped(loaded):
    document = compare_document(loaded, "llama")
    document["model"]["source"] = HOSTILE
    document["model"]["unknown_ops"] = {HOSTILE: 2}
    document["model"]["incomplete"] = True
    document["model"]["warnings"] = [HOSTILE]
    document["model"]["architecture"]["activation"] = HOSTILE
    plan = document["plans"][0]
    plan["name"], plan["spec"] = HOSTILE, f"x:{HOSTILE}"
    plan["assumptions"] = [f'"><img onerror=alert(1)>{HOSTILE}']
    plan["layers"] = [{"layer": 0, "trainable": [HOSTILE], "adapters": [], "trainable_params": 1, "activation_bytes": 1}]
    plan["validation"] = {HOSTILE: {"estimated": 1, "measured": 2, "error": 1.0}}
    for other in document["plans"][1:]:
        other["layers"] = [{"layer": 0, "trainable": [], "trainable_params": 0, "activation_bytes": 0}]
    verdicts = judge(parse_budget(f'[[plan]]\nname = "{HOSTILE}"\nspec = "full"\ntrainable_params = 1\n'), document)
    html = render_html(document, verdicts)
    assert "<script" not in html.lower() and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 10
    assert HOSTILE in text_of(html)                      # shown to the reader, as text


def test_template_environment_is_strict_and_escapes():
    env = environment()
    assert env.autoescape is True and env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("report.html.j2").render()
    assert (TEMPLATES / "report.html.j2").is_file() and TEMPLATES.parent.name == "costlens"


def test_fields_a_document_lacks_render_as_na(loaded):
    document = compare_document(loaded, "llama")
    document["setup"] = {"batch": 1, "seq": 64}
    for plan in document["plans"]:
        for key in ("memory_bytes", "peak_phase", "time", "layers"):
            plan.pop(key, None)
    html = render_html(document)
    text = text_of(html)
    assert "n/a: this document carries no memory estimate" in text
    assert 'id="memory-chart"' not in html
    assert "no per-layer breakdown" in text and "no measured run" in text
    assert units.params(158016) in text                 # the numbers it has still show


def test_per_layer_view_validation_and_budget(loaded):
    document = copy.deepcopy(compare_document(loaded, "llama"))
    for plan in document["plans"]:
        plan["layers"] = [{"layer": 0, "trainable": ["layers.0.attn.q"], "adapters": ["layers.0.attn.k"],
                           "trainable_params": 4096, "activation_bytes": 3 * 2**20},
                          {"layer": None, "trainable": [], "adapters": [], "trainable_params": 0,
                           "activation_bytes": None}]
    document["plans"][0]["validation"] = {"peak_bytes": {"estimated": 2**30, "measured": 1.1 * 2**30, "error": -0.0909}}
    verdicts = judge(parse_budget('[[plan]]\nspec = "full"\ntrainable_params = "100K"\n'
                                  '[[plan]]\nname = "lora-attn-r8"\nspec = "lora=attn"\ntrainable_params = "100K"\n'), document)
    text = text_of(render_html(document, verdicts))
    assert "Per layer: what trains, saved activations" in text
    assert "layer 0" in text and "outside layers" in text and "layers.0.attn.q" in text
    assert "layers.0.attn.k (LoRA)" in text and "4.10K trainable; activations 3.00 MiB" in text
    assert "1.00 GiB 1.10 GiB -9.1%" in text
    assert "Budget: 1 of 2 limits exceeded" in text
    assert "FAIL full: trainable_params 158.02K > 100.00K" in text


def test_gpu_line_on_scale_and_off_scale(loaded):
    document = compare_document(loaded, "llama")
    html = render_html(document, gpu="l4")               # a few MiB against 24 GiB
    assert "l4 24.00 GiB (off scale:" in html and 'class="limit"' not in html
    largest = max(plan["memory_bytes"]["peak"] for plan in document["plans"])
    for plan in document["plans"]:                       # the same plans, as if 20 GiB at the peak
        plan["memory_bytes"] = {k: v * 20 * 2**30 // largest for k, v in plan["memory_bytes"].items()}
    html = render_html(document, gpu="l4")
    assert 'class="limit"' in html and "(off scale:" not in html and ">l4 24.00 GiB</text>" in html


def test_templates_ship_as_package_data():
    """`pip install costlens` (a wheel) must carry the report's templates beside the code."""
    from costlens.budgets import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["costlens"]
    assert "templates/*.j2" in patterns
    assert sorted(p.name for p in (ROOT / "costlens" / "templates").glob("*.j2")) == [
        "_charts.html.j2", "_report.css.j2", "fit.html.j2", "report.html.j2"]


# --------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "report.png"


def chromium(url: str, *args: str, profile) -> subprocess.CompletedProcess:
    """Headless Chromium with no network at all: the page must not need it."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
               *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: Debian's `chromium` package is not installed")
def test_report_in_headless_chromium(loaded, tmp_path):
    document = compare_document(loaded, "llama", gpu="l4", batch=4, seq=512)
    page = tmp_path / "report.html"
    page.write_text(render_html(document), encoding="utf-8")
    shot = tmp_path / "report.png"
    chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1280,1500", profile=tmp_path / "profile-1")
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1280, 1500)
    assert shot.stat().st_size > 50_000                  # a rendered page, not a blank one
    if os.environ.get("COSTLENS_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
    dom = chromium(page.as_uri(), "--dump-dom", profile=tmp_path / "profile-2").stdout
    text = text_of(dom)
    # the plans and their trainable parameters as the table prints them:
    # full 158,016; LoRA r=8 on q,k,v,o of 2 layers = 7,168 (tests/test_cli_plan.py)
    assert "full 158.02K 100.0%" in text
    assert "lora-attn-r8 7.17K 4.34% 7.17K" in text
    for plan in document["plans"]:
        assert plan["name"] in text and units.flops(plan["flops"]["step"]) in text
        assert units.nbytes(plan["memory_bytes"]["peak"]) in text
    assert "158.02K parameters (158,016)" in text
    assert "2 layers, hidden 64, 4 heads (2 kv) x 16" in text
    # an fp32 step runs at the L4's fp32 (CUDA-core) peak: 30.3 TFLOP/s (NVIDIA L4 datasheet)
    assert "l4 (24.00 GiB, 30.3 TFLOP/s dense fp32" in text


# --------------------------------------------------------------------------- issue 16 item 12

def test_nice_ticks_by_hand():
    from costlens.render.html import BYTE_UNITS, FLOP_UNITS, nice_ticks
    # 131.78 GiB: raw step 32.9 GiB -> 50 GiB (1-2-5), ticks 0, 50, 100, 150; the axis ends at 150 GiB
    end, ticks = nice_ticks(131.78 * 2**30, BYTE_UNITS)
    assert [label for _, label in ticks] == ["0", "50 GiB", "100 GiB", "150 GiB"] and end == 150 * 2**30
    # 37,748,700 FLOP = 37.7 MFLOP: raw 9.4 -> 10 MFLOP steps up to 40
    end, ticks = nice_ticks(3.77487e7, FLOP_UNITS)
    assert [label for _, label in ticks] == ["0", "10 MFLOP", "20 MFLOP", "30 MFLOP", "40 MFLOP"]
    # 3.02 MiB: raw 0.755 -> 1 MiB steps
    assert [label for _, label in nice_ticks(3.02 * 2**20, BYTE_UNITS)[1]] == ["0", "1 MiB", "2 MiB", "3 MiB", "4 MiB"]


def _thirty_two_layers(document: dict, name: str = "model.layers.{}.self_attn.q_proj") -> dict:
    for plan in document["plans"]:
        plan["layers"] = [{"layer": i, "trainable": [name.format(i)], "adapters": [], "trainable_params": 4096,
                           "activation_bytes": 2**20} for i in range(32)]
        plan["layers"].append({"layer": None, "trainable": ["lm_head"], "adapters": [], "trainable_params": 10,
                               "activation_bytes": 0})
    return document


def test_identical_layers_fold(loaded):
    document = _thirty_two_layers(copy.deepcopy(compare_document(loaded, "llama")))
    text = text_of(render_html(document))
    assert "layers 0\u201331 \u00d732" in text and "model.layers.*.self_attn.q_proj" in text
    assert "layer 5 " not in text and text.count("4.10K trainable; activations 1.00 MiB") == len(document["plans"])
    document["plans"][0]["layers"][7]["activation_bytes"] = 2**21        # one layer differs: three runs
    text = text_of(render_html(document))
    assert "layers 0\u20136 \u00d77" in text and "layer 7 " in text and "layers 8\u201331 \u00d724" in text


def test_folded_tensor_names_are_escaped(loaded):
    document = _thirty_two_layers(copy.deepcopy(compare_document(loaded, "llama")), HOSTILE + ".{}")
    html = render_html(document)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_fits_column_and_human_units(loaded):
    document = compare_document(loaded, "llama", gpu="l4")
    html = render_html(document)
    text = text_of(html)
    assert "on l4-" not in text and "on l4" in text
    for plan in document["plans"]:        # a few MiB in 24 GiB: every plan fits, at 0% of the board
        assert f"fits ({plan['memory_bytes']['peak'] / (24 * 2**30):.0%})" in text
    document["plans"][0]["memory_bytes"]["peak"] = 25 * 2**30
    assert "does not fit (+1.00 GiB)" in text_of(render_html(document))
    assert not re.search(r"\d\.\d+e[+-]\d\d", text), "no 3.77487e+07 on the page"


def test_validation_flops_in_human_units(loaded):
    document = copy.deepcopy(compare_document(loaded, "llama"))
    document["plans"][0]["validation"] = {"step FLOPs": {"estimated": 37748736, "measured": 37748736, "error": 0.0,
                                                         "verdict": "ok"}}
    text = text_of(render_html(document))
    assert "37.75 MFLOP 37.75 MFLOP +0.0% ok" in text and "e+07" not in text


def test_job_cost_in_the_report(loaded):
    from costlens.jobcost import Job
    model = loaded("llama")
    setup = Setup(batch=1, seq=64, gpu="h100")
    document = plan_document(model, [("full", estimate(model, parse_plan_spec("full"), setup))],
                             job=Job(tokens=6400, price_per_gpu_hour=2.0, price_source="--price-per-hour"))
    text = text_of(render_html(document))
    assert "Job: 6,400 tokens, gradient accumulation 1, 1 GPU(s), 2 per GPU-hour (--price-per-hour)" in text
    assert " 100 " in text          # 6,400 / 64 = 100 steps


def test_report_shows_derived_defaults_and_the_peak_used(loaded):
    model = loaded("llama")
    setup = Setup(batch=1, seq=64, gpu="h100", optimizer_impl="foreach", precision="fp32")
    document = plan_document(model, [("full", estimate(model, parse_plan_spec("full"), setup))],
                             derived={"optimizer_impl": "foreach, from --gpu h100 (torch's default on CUDA)"})
    text = text_of(render_html(document))
    assert "optimizer_impl (derived) foreach, from --gpu h100" in text
    assert "67 TFLOP/s dense fp32" in text                       # the fp32 peak, not the bf16 one
    time = document["plans"][0]["time"]
    assert f"(fp32 peak, {time['bound']}-bound)" in text
