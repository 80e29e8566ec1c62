"""Hostile and broken inputs (issue 13): the quick fuzz sample, the invariant checker itself,
and a regression test for every failure the fuzz corpus found.

The corpus and the invariant live in tests/fuzz_corpus.py (``benchmarks/fuzz.py`` runs all of
it, one subprocess per input). Here: a deterministic sample of ~75 inputs in-process through
click's CliRunner, a few in a subprocess with the audit hook on ``open``, and targeted tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import fuzz_corpus as fc
from costlens.cli import main
from costlens.errors import AbsurdModelError, CostlensError, ModelFormatError, PlanError, UnsafePathError

CASES = {case.id: case for case in fc.corpus()}
QUICK = [case.id for case in fc.quick_sample(list(CASES.values()))]
LLAMA = fc.FIXTURES / "llama.onnx"


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error: "), result.stderr
    return lines[0]


def _check(case_id: str, folder: Path) -> None:
    case = CASES[case_id]
    if case.needs_torch:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    invocation, outcome = fc.run_in_process(case, folder)
    problems = fc.violations(case, invocation, outcome, folder)
    assert not problems, f"{case.id} ({case.description}): {problems}; stderr: {outcome.stderr[:300]!r}"


# --------------------------------------------------------------------------- the corpus

def test_corpus_is_large_unique_and_covers_every_family():
    assert len(CASES) == len(fc.corpus()) >= 1000              # ids are unique
    families = {case.family for case in CASES.values()}
    assert families == {"truncate", "bitflip", "proto", "external", "names", "config", "budget", "plans", "report"}
    kinds = {case_id.split("/")[2] for case_id in CASES if case_id.startswith(("proto/", "external/"))}
    for kind in ("init-dim-negative", "init-dim-huge", "input-dim-symbol", "init-dtype-bogus", "drop-node",
                 "duplicate-node", "dangling-input", "cycle", "unknown-domain", "opset-999", "attribute-type",
                 "topk-huge", "matmul-mismatch", "if-8", "loop-3", "parent", "absolute", "symlink-file",
                 "offset-beyond", "length-beyond", "non-utf8"):
        assert kind in kinds, kind


def test_quick_sample_is_deterministic_and_spans_the_families():
    again = [case.id for case in fc.quick_sample(fc.corpus())]
    assert again == QUICK
    assert 60 <= len(QUICK) <= 100
    assert {CASES[i].family for i in QUICK} == {case.family for case in CASES.values()}


@pytest.mark.parametrize("case_id", ["bitflip/llama/graph/3", "proto/moe/cycle/graph", "names/gpt2/tensors/html",
                                     "external/bert/symlink-file/inspect", "budget/flipped-2", "report/retype/1"])
def test_a_case_builds_the_same_bytes_every_time(tmp_path, case_id):
    def built(folder: Path) -> dict:
        invocation = CASES[case_id].build(folder)
        files = {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes())
                 for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}
        return {"argv": [a.replace(str(folder), "<dir>") for a in invocation.argv],
                "files": {k: (v.replace(str(folder), "<dir>") if isinstance(v, str) else v) for k, v in files.items()}}
    assert built(tmp_path / "a") == built(tmp_path / "b")


@pytest.mark.parametrize("case_id", QUICK)
def test_quick_sample_keeps_the_invariant(tmp_path, case_id):
    _check(case_id, tmp_path)


# Whole processes, with the audit hook on "open" of the full run: the external-data cases
# whose decoys sit outside the model's folder, and a bit-flipped file.
SUBPROCESS = ["external/llama/symlink-file/inspect", "external/gpt2/parent/inspect",
              "external/moe/absolute/inspect", "bitflip/genai_moe/graph/0"]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_subprocess_runs_keep_the_invariant(tmp_path, case_id):
    case = CASES[case_id]
    invocation, outcome = fc.run_subprocess(case, tmp_path)
    assert outcome.peak_rss_mb is not None, "the wrapper wrote no report"
    assert not fc.violations(case, invocation, outcome, tmp_path), (outcome.stderr, outcome.outside_opens)


def test_a_worker_runs_inputs_in_turn_and_survives_a_timeout(tmp_path):
    """The full run's worker subprocess: one result per input; a timed-out input kills the
    worker, is reported as no exit, and the next input gets a fresh worker."""
    worker = fc.Worker()
    try:
        first = CASES["truncate/llama/raw/0"]
        invocation, outcome = worker.run(first, tmp_path / "a")
        assert outcome.exit_code == 2 and "costlens: error:" in outcome.stderr
        assert not fc.violations(first, invocation, outcome, tmp_path / "a")
        _, stuck = worker.run(CASES["proto/moe/identity-chain/graph"], tmp_path / "b", timeout=0.01)
        assert stuck.exit_code is None and worker.process is None
        invocation, outcome = worker.run(CASES["external/llama/parent/inspect"], tmp_path / "c")
        assert outcome.exit_code == 0, outcome.stderr
        assert "leaves the model's folder" in outcome.stdout + outcome.stderr
    finally:
        worker.stop()


# --------------------------------------------------------------------------- the checker can fail

def _outcome(**overrides) -> fc.Outcome:
    values = dict(exit_code=2, stdout="", stderr="costlens: error: x.onnx: the ONNX graph has no outputs\n",
                  seconds=0.1, outside_opens=[])
    values.update(overrides)
    return fc.Outcome(**values)


@pytest.mark.parametrize("overrides, expected", [
    ({"exit_code": 3}, "exit code 3"),
    ({"exit_code": None}, "no exit"),
    ({"stderr": "Traceback (most recent call last):\n  File x\nIndexError: y\n"}, "traceback"),
    ({"stderr": "costlens: error: a\nb\nc\nd\n"}, "lines of stderr"),
    ({"stderr": "costlens: error: " + "x" * 5000}, "characters"),
    ({"stderr": "costlens: error: could not analyse the model (IndexError: list index out of range)"}, "names no cause"),
    ({"stderr": "costlens: error: internal error"}, "names no cause"),
    ({"stdout": "name \x1b[31mred"}, "control characters"),
    ({"stderr": "nothing useful"}, "without a 'costlens: error"),
    ({"outside_opens": ["/home/user/.ssh/id_rsa"]}, "outside the model's folder"),
    ({"seconds": 25.0}, "took"),
    ({"peak_rss_mb": 9000.0}, "peak RSS"),
])
def test_violations_flags_each_broken_promise(tmp_path, overrides, expected):
    case = CASES["proto/llama/drop-outputs/raw"]
    invocation = case.build(tmp_path)
    problems = fc.violations(case, invocation, _outcome(**overrides), tmp_path)
    assert any(expected in p for p in problems), problems
    assert not fc.violations(case, invocation, _outcome(), tmp_path)       # the same case, well handled


def test_violations_flags_unescaped_html_and_leftovers(tmp_path):
    case = CASES["names/llama/nodes/html"]
    invocation = fc.Invocation(("compare",), ("out.html",), fc.HTML_MARKERS[:1])
    case.build(tmp_path)
    (tmp_path / "model" / "out.html").write_text(f"<td>{fc.HTML_MARKERS[0]}</td>")
    problems = fc.violations(case, invocation, _outcome(exit_code=0, stderr=""), tmp_path)
    assert any("unescaped" in p for p in problems), problems
    problems = fc.violations(case, invocation, _outcome(), tmp_path)
    assert any("left out.html" in p for p in problems), problems
    (tmp_path / "model" / ".out.html.abc.tmp").write_text("half")
    assert any("temporary files" in p for p in fc.violations(case, invocation, _outcome(exit_code=0, stderr=""), tmp_path))


def test_violations_flags_expected_refusals(tmp_path):
    case = CASES["proto/llama/init-dim-huge/graph"]          # absurd dims must be refused
    invocation = case.build(tmp_path)
    assert case.expect == (2,)
    assert any("expected 2" in p for p in fc.violations(case, invocation, _outcome(exit_code=0, stderr=""), tmp_path))


def test_the_audit_hook_sees_a_read_outside_the_folder(tmp_path):
    def make(case, folder):
        document = folder.parent / "outside" / "doc.json"
        document.write_text(fc.plan_document())
        return fc.Invocation(("report", str(document), "-o", str(folder / "out.html")), ("out.html",))
    case = fc.Case("meta/outside-read", "meta", "report reads a document outside the model's folder", make)
    invocation, outcome = fc.run_subprocess(case, tmp_path)
    assert outcome.exit_code == 0, outcome.stderr
    assert any(p.endswith("outside/doc.json") for p in outcome.outside_opens), outcome.outside_opens
    invocation, outcome = fc.run_in_process(case, tmp_path / "again")
    assert any(p.endswith("outside/doc.json") for p in outcome.outside_opens), outcome.outside_opens


# --------------------------------------------------------------------------- regressions (found by the fuzz run)

# Each of these inputs failed before its fix; the cause is in the comment.
REGRESSIONS = [
    "bitflip/genai_moe/graph/0",            # op_type holding invalid UTF-8 came back as bytes: TypeError in roles
    "proto/llama/init-dtype-bogus/raw",     # data_type 999: ValueError from TensorProto.DataType.Name
    "proto/llama/input-dtype-bogus/graph",  # elem_type 12345 on a graph input: the same ValueError
    "proto/llama/int-constant-mismatch/graph",  # an int64 constant whose data != dims: numpy reshape ValueError
    "proto/llama/shape-values-zero/graph",  # zero inferred dims: ZeroDivisionError in the storage rules
    "proto/moe_anon/shape-values-negative/graph",  # negative inferred dims: ZeroDivisionError (router width)
    "proto/stacked_ffn/drop-outputs/raw",   # no graph outputs: IndexError in the memory estimate
    "proto/moe_fused/drop-outputs/raw",     # no graph outputs: ZeroDivisionError (k / E with E unknown)
    "proto/llama/dangling-input/raw",       # a 100 kB tensor name printed whole on stderr
    "proto/stacked_ffn/init-dtype-undefined/raw",  # onnxruntime saved sym_shape_infer_temp.onnx into the cwd
    "names/moe/unknown-op/html",            # router width unknown after an unknown op: ZeroDivisionError
    "names/llama/unknown-op/ansi",          # ANSI escapes of an op name printed raw to the terminal
    "names/gpt2/tensors/ansi",              # ANSI escapes of tensor names printed raw
    "external/moe/nul-byte/inspect",        # a NUL byte in a location: ValueError from Path.resolve
    "external/moe/huge-location/inspect",   # a 900 kB location: Path.resolve took over 20 s
    "budget/stack-huge",                    # stack-ffn=100000000: ran for ever
    "budget/alpha-text",                    # alpha=lots: ValueError from float()
    "budget/nested-arrays",                 # 50,000 nested arrays: RecursionError in tomllib
    "plans/non-utf8",                       # a plans file that is not UTF-8: UnicodeDecodeError
    "plans/plan-numbers",                   # plan = [1, 2]: AttributeError
    "plans/name-table",                     # name = { a = 1 }: TypeError
    "report/drop/0",                        # a saved estimate with a field removed: KeyError while rendering
    "report/retype/2",                      # a field of the wrong type: TypeError while rendering
]


@pytest.mark.parametrize("case_id", REGRESSIONS)
def test_fuzz_regression(tmp_path, case_id, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check(case_id, tmp_path / "case")
    assert os.listdir(tmp_path) == ["case"], "the run wrote into the current directory"


@pytest.mark.parametrize("case_id", ["config/auto-map", "config/trust-remote-code", "config/layers-huge",
                                     "config/vocab-huge", "config/model-type-list", "config/nested-deep"])
def test_config_regression(tmp_path, case_id):
    """auto_map was accepted (exit 0), 10**7 layers ran past 20 s, a 10**13 vocabulary was priced,
    a list model_type raised TypeError, deeply nested JSON raised RecursionError. Checked before
    transformers is imported, so this needs no torch."""
    from costlens.frontends.hf_config import read_config
    case = CASES[case_id]
    case.build(tmp_path)
    with pytest.raises(CostlensError) as raised:
        read_config(tmp_path / "model" / "config.json")
    assert "config" in str(raised.value)
    assert not (tmp_path / "outside" / fc.PWNED).exists()


def _relu_model(op_type: str = "Relu") -> onnx.ModelProto:
    node = helper.make_node(op_type, ["x"], ["y"], name="n")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_op_type_that_is_not_utf8_is_one_line(tmp_path):
    data = _relu_model("RelXX").SerializeToString().replace(b"RelXX", b"Rel\xe5X")
    assert isinstance(onnx.load_model_from_string(data).graph.node[0].op_type, bytes)   # what upb returns
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert "not UTF-8 text" in _error_line(_run("inspect", str(path)))


def test_control_characters_in_names_are_escaped(tmp_path):
    from costlens.frontends.onnx import read_model
    model = _relu_model()
    model.graph.node[0].name = "a\x1b[31m\nb\u202e"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert read_model(path).graph.node[0].name == "a\\x1b[31m\\nb\\u202e"


def test_one_line_escapes_and_elides():
    from costlens.cli_errors import MAX_MESSAGE_CHARS, one_line
    assert one_line("a\nb\x1b[0m") == "a\\nb\\x1b[0m"
    long = one_line("start " + "x" * 100_000 + " end")
    assert long.startswith("start ") and long.endswith(" end") and len(long) < MAX_MESSAGE_CHARS + 60
    assert "characters ...]" in long


@pytest.mark.parametrize("location", ["a\x00b", "a/" * 3000])
def test_unusable_locations_are_refused_quickly(tmp_path, location):
    from costlens.frontends.onnx import resolve_external_path
    with pytest.raises(UnsafePathError, match="not a usable file name"):
        resolve_external_path(tmp_path, location)


def _external_tensor(location: str, **entries) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_read_external_tensor_reads_inside_the_folder_only(tmp_path):
    import numpy as np
    from costlens.frontends.onnx import read_external_tensor
    folder, outside = tmp_path / "model", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    values = np.arange(6, dtype=np.float32)
    (folder / "w.bin").write_bytes(values.tobytes())
    (outside / "secret.bin").write_bytes(values.tobytes())
    os.symlink(outside / "secret.bin", folder / "link.bin")
    tensor = _external_tensor("w.bin", offset="8", length="16")
    read_external_tensor(tensor, folder)
    assert np.frombuffer(tensor.raw_data, dtype=np.float32).tolist() == [2.0, 3.0, 4.0, 5.0]
    for location in ("../outside/secret.bin", str(outside / "secret.bin"), "link.bin"):
        with pytest.raises(UnsafePathError):
            read_external_tensor(_external_tensor(location), folder)
    for entries, match in (({"offset": str(10**12)}, "lies outside"), ({"length": str(10**15)}, "lies outside"),
                           ({"offset": "-8", "length": "16"}, "lies outside"), ({"offset": "lots"}, "not a number"),
                           ({"length": "8"}, "8 bytes of external data for 16")):
        with pytest.raises(ModelFormatError, match=match):
            read_external_tensor(_external_tensor("w.bin", **entries), folder)


def test_inferred_zero_dims_are_refused(tmp_path):
    from costlens.frontends.onnx import load_onnx
    model = _relu_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(AbsurdModelError, match="dimension of 0"):
        load_onnx(path)


def test_plan_spec_bounds():
    from costlens.plans import MAX_STACKED, parse_plan_spec
    assert parse_plan_spec(f"stack-ffn={MAX_STACKED}").stack_ffn == MAX_STACKED
    with pytest.raises(PlanError, match="absurd"):
        parse_plan_spec(f"stack-ffn={MAX_STACKED + 1}")
    with pytest.raises(PlanError, match="alpha"):
        parse_plan_spec("lora=attn;alpha=lots")
    assert parse_plan_spec("lora=attn;alpha=32").alpha == 32.0


# --------------------------------------------------------------------------- HTML escaping, atomic writes

def test_hostile_names_are_escaped_in_the_html(tmp_path):
    case = CASES["names/llama/unknown-op/html"]
    invocation, outcome = fc.run_in_process(case, tmp_path)
    assert outcome.exit_code == 0, outcome.stderr
    html = (tmp_path / "model" / "out.html").read_text(encoding="utf-8")
    assert fc.HTML_MARKERS[0] not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html          # the name is there, as text


def test_hostile_saved_estimate_is_escaped_in_report(tmp_path):
    document = json.loads(fc.plan_document())
    document["plans"][0]["name"] = fc.HTML_MARKERS[0]
    document["model"]["source"] = fc.HTML_MARKERS[2]
    source = tmp_path / "estimate.json"
    source.write_text(json.dumps(document))
    result = _run("report", str(source), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert fc.HTML_MARKERS[0] not in html and fc.HTML_MARKERS[2] not in html
    assert "&lt;script&gt;" in html and "&lt;svg onload=alert(3)&gt;" in html


def test_write_atomic_leaves_nothing_when_replace_fails(tmp_path, monkeypatch):
    from costlens import cli_ci
    target = tmp_path / "out.html"
    target.write_text("the old report")

    def broken(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli_ci.os, "replace", broken)
    with pytest.raises(CostlensError, match="No space left"):
        cli_ci.write_atomic(target, "<html>new</html>")
    assert target.read_text() == "the old report"
    assert os.listdir(tmp_path) == ["out.html"]


def test_interrupted_write_keeps_the_old_report(tmp_path, monkeypatch):
    from costlens import cli_ci
    target = tmp_path / "out.html"
    target.write_text("the old report")
    real_fdopen = os.fdopen

    class Interrupted:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def write(self, data):
            self.handle.write(data[:100])      # half of it, then Ctrl-C
            raise KeyboardInterrupt
    monkeypatch.setattr(cli_ci.os, "fdopen", lambda fd, mode: Interrupted(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        cli_ci.write_atomic(target, "x" * 10_000)
    assert target.read_text() == "the old report"
    assert os.listdir(tmp_path) == ["out.html"]


def test_written_report_is_readable_by_others(tmp_path):
    from costlens import cli_ci
    cli_ci.write_atomic(tmp_path / "r.html", "<html></html>")
    mode = (tmp_path / "r.html").stat().st_mode & 0o777
    assert mode == 0o666 & ~cli_ci._umask()


def test_failing_compare_leaves_no_html(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(LLAMA.read_bytes()[:5000])
    out = tmp_path / "out.html"
    _error_line(_run("compare", str(broken), "--html", str(out)))
    assert not out.exists()


def test_failing_report_leaves_no_html_and_keeps_the_old_one(tmp_path):
    document = json.loads(fc.plan_document())
    del document["plans"][0]["flops"]
    source = tmp_path / "estimate.json"
    source.write_text(json.dumps(document))
    out = tmp_path / "out.html"
    assert "'flops' is missing" in _error_line(_run("report", str(source), "-o", str(out)))
    assert not out.exists()
    out.write_text("the old report")
    _error_line(_run("report", str(source), "-o", str(out)))
    assert out.read_text() == "the old report"
    assert sorted(os.listdir(tmp_path)) == ["estimate.json", "out.html"]


def test_check_renders_everything_before_writing(tmp_path, monkeypatch):
    """A check whose HTML cannot be rendered leaves neither the HTML nor the -o file."""
    from costlens.render import html as html_module
    budget = tmp_path / "b.toml"
    budget.write_text('[[plan]]\nspec = "full"\npeak_memory = "1GiB"\n')

    def broken(*args, **kwargs):
        raise CostlensError("rendering failed")
    monkeypatch.setattr(html_module, "render_html", broken)
    result = _run("check", str(LLAMA), "--budget", str(budget), "--format", "junit", "-o", str(tmp_path / "j.xml"),
                  "--html", str(tmp_path / "r.html"))
    assert "rendering failed" in _error_line(result)
    assert sorted(os.listdir(tmp_path)) == ["b.toml"]
