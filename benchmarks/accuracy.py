"""Estimate vs measured training steps: real transformers modules, and the costlens executor.

    python benchmarks/accuracy.py                          # both sections, CPU, writes docs/accuracy.md
    python benchmarks/accuracy.py --section real --quick   # real modules only, a quick subset
    python benchmarks/accuracy.py --section real --arch llama,gpt2 --recipe bf16-autocast
    python benchmarks/accuracy.py --device cuda            # also records fixtures/measured/*.json

Real modules (the truth): every architecture of the HF corpus (fixtures/hf/index.json, dynamo
export ok) x default plans x recipes x two (batch, seq) points; the plan priced from the HF
config through the config front end, the real transformers module of the same config
measured (costlens.measure.validate.validate_config). Results also go to
benchmarks/results/real_modules.json (schema costlens.accuracy_real/1), written after each
architecture so a partial run is readable.

Executor rows (a separate section):
Each case prices the plan with costlens and measures two real training steps of the same
plan (the second reported) on the graph executed as a torch module (costlens.measure).
Targets: peak memory within 5%, FLOPs within 1%, trainable parameters exact.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import costlens  # noqa: E402
from costlens.measure.validate import validate_onnx  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

FIXTURES = ["gpt2", "llama", "moe", "moe_fused", "stacked_ffn", "bert", "genai_dense", "genai_moe"]
SIZES = [(2, 32), (4, 64), (8, 128)]
# the genai fixtures' rotary caches hold 64 positions (onnxruntime cannot run them longer)
SIZES_FOR = {"genai_dense": [(2, 32), (4, 64), (8, 64)], "genai_moe": [(2, 32), (4, 64), (8, 64)]}
# Plans beyond the defaults that exercise other parts of the model: (fixture, spec, setup overrides)
EXTRA = [
    ("gpt2", "dropout:dropout=0.1", {}),
    ("bert", "dropout:dropout=0.1", {}),
    ("llama", "stop-grad:train=ffn;stop-grad=attn", {}),
    ("llama", "stacked:stack-ffn=1;train=stacked", {}),
    ("llama", "lora-dropout:lora=attn,ffn;rank=8;lora-dropout=0.05", {}),
    ("llama", "full-sgd-momentum:full", {"optimizer": "sgd-momentum"}),
    ("llama", "full-foreach:full", {"optimizer_impl": "foreach"}),
    ("moe", "full-foreach:full", {"optimizer_impl": "foreach"}),
    ("moe_fused", "lora-experts:lora=experts;rank=8", {}),
]
QUANTITIES = ("peak bytes", "activation bytes", "step FLOPs", "trainable params")


def cases():
    for fixture in FIXTURES:
        for spec in costlens.default_plans(costlens.load(ROOT / "fixtures" / f"{fixture}.onnx")):
            yield fixture, spec, {}
    yield from EXTRA


def run(device: str):
    rows = []
    for fixture, spec, overrides in cases():
        for batch, seq in SIZES_FOR.get(fixture, SIZES):
            setup = Setup(batch=batch, seq=seq, **overrides)
            result = validate_onnx(ROOT / "fixtures" / f"{fixture}.onnx", parse_plan_spec(spec), setup, device=device)
            by_name = {c.quantity: c for c in result.comparisons}
            rows.append((fixture, spec.split(":")[0], batch, seq, result, by_name))
            print(f"{fixture:11s} {spec.split(':')[0]:26s} {batch}x{seq:<4d} peak "
                  f"{100 * by_name['peak bytes'].error:+6.2f}%  ok={result.ok}", file=sys.stderr)
    return rows


def run_routed(device: str):
    """MoE with routed dispatch: the dense-form torch module traced and priced, its routed twin
    (each expert on its own tokens) measured with the plan applied by parameter name."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    import models
    from costlens.measure.validate import validate_module
    rows = []
    for fixture, factory in (("moe", models.moe_like), ("moe_fused", models.moe_fused_like)):
        traced = costlens.load(factory())
        for spec in costlens.default_plans(traced):
            for batch, seq in SIZES:
                result = validate_module(traced, factory(dispatch="sparse"), parse_plan_spec(spec),
                                         Setup(batch=batch, seq=seq), device=device)
                by_name = {c.quantity: c for c in result.comparisons}
                rows.append((f"{fixture} (torch, routed)", spec.split(":")[0], batch, seq, result, by_name))
                print(f"{fixture:11s} routed {spec.split(':')[0]:26s} {batch}x{seq:<4d} peak "
                      f"{100 * by_name['peak bytes'].error:+6.2f}%  ok={result.ok}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- real modules

HF = ROOT / "fixtures" / "hf"
RESULTS = ROOT / "benchmarks" / "results" / "real_modules.json"
REAL_PLANS = ["full", "lora-attn-r8:lora=attn;rank=8", "lora-attn-ffn-r8:lora=attn,ffn;rank=8", "train-ffn:train=ffn",
              "freeze-ffn:freeze=ffn"]
MOE_PLANS = ["full", "lora-attn-r8:lora=attn;rank=8", "lora-attn-router-experts:lora=attn,router,experts;rank=8",
             "train-experts:train=experts"]
RECIPES = {"fp32-eager": {}, "fp32-sdpa": {"attention": "sdpa"}, "bf16-autocast": {"precision": "bf16-autocast"},
           "bf16": {"precision": "bf16"}, "checkpointing": {"checkpointing": True},
           # half weights stepped through fp32 masters; pure bf16 with the model's own (fp32-upcast) loss
           "bf16-mixed": {"precision": "bf16-mixed"}, "bf16-hf-loss": {"precision": "bf16", "loss": "hf"}}
REAL_SIZES = [(2, 32), (4, 64)]
# the error of each category: (label, comparison quantity)
CATEGORIES = [("weights", "weights bytes"), ("gradients", "gradient bytes"), ("optimizer", "optimizer bytes"),
              ("activations", "activation bytes"), ("peak", "peak bytes"), ("FLOPs", "step FLOPs"),
              ("trainable", "trainable params")]


def corpus_archs() -> list[str]:
    index = json.loads((HF / "index.json").read_text())
    return [arch for arch, entry in index["archs"].items()
            if (entry.get("exporters", {}).get("dynamo") or {}).get("status") == "ok"
            and (HF / f"{arch}.config.json").is_file()]


def _is_moe(arch: str) -> bool:
    config = json.loads((HF / f"{arch}.config.json").read_text())
    return any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def run_real(device: str, archs, recipes, quick: bool, results: Path = RESULTS, sizes=None,
             plans_given=None) -> list[dict]:
    """plans_given: plan specs (NAME:SPEC) run on every architecture instead of the default ones."""
    from costlens.measure.validate import validate_config
    rows = []
    sizes = sizes or (REAL_SIZES[:1] if quick else REAL_SIZES)
    for arch in archs:
        plans = plans_given or (MOE_PLANS if _is_moe(arch) else REAL_PLANS)
        for spec in plans[:2] if quick and not plans_given else plans:
            for recipe in recipes:
                for batch, seq in sizes:
                    row = {"arch": arch, "plan": spec.split(":")[0], "recipe": recipe, "batch": batch, "seq": seq}
                    try:
                        # MoE experts as transformers 5 runs them by default (grouped_mm)
                        setup = Setup(batch=batch, seq=seq, **{"experts_impl": "grouped_mm", **RECIPES[recipe]})
                        result = validate_config(HF / f"{arch}.config.json", parse_plan_spec(spec), setup,
                                                 device=device)
                    except Exception as e:  # noqa: BLE001 - a case that cannot run is a row, not a stop
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        print(f"{arch:12s} {row['plan']:26s} {recipe:14s} {batch}x{seq:<3d} ERROR {row['error']}",
                              file=sys.stderr)
                        rows.append(row)
                        continue
                    by = {c.quantity: c for c in result.comparisons}
                    row.update(truth=result.truth_label, phase={"estimated": result.estimated_phase,
                                                          "measured": result.measured_phase},
                               figures={label: {"estimated": by[q].estimated, "measured": by[q].measured,
                                                "error": by[q].error} for label, q in CATEGORIES})
                    rows.append(row)
                    print(f"{arch:12s} {row['plan']:26s} {recipe:14s} {batch}x{seq:<3d} peak "
                          f"{100 * by['peak bytes'].error:+6.2f}% act {100 * by['activation bytes'].error:+6.2f}%",
                          file=sys.stderr)
        write_real(rows, device, results, quick)
    return rows


def summary(rows: list[dict]) -> dict:
    """{recipe: {category: {"median": |error|, "max": |error|, "n": cases}}} over the rows that ran."""
    import statistics
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        done = [r for r in rows if r["recipe"] == recipe and "figures" in r]
        out[recipe] = {label: {"median": statistics.median(abs(r["figures"][label]["error"]) for r in done),
                               "max": max(abs(r["figures"][label]["error"]) for r in done), "n": len(done)}
                       for label, _ in CATEGORIES} if done else {}
    return out


def write_real(rows: list[dict], device: str, results: Path = RESULTS, quick: bool = False) -> None:
    import torch
    import transformers
    results.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": "costlens.accuracy_real/1", "device": device, "quick": quick, "torch": torch.__version__,
                "transformers": transformers.__version__,
                "truth": "real transformers module of the config (random weights), two steps, the second measured",
                "estimate": "the HF config through the config front end (costlens.load of the config)",
                "summary": summary(rows), "rows": rows}
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(results)


def real_markdown(rows: list[dict]) -> list[str]:
    stats = summary(rows)
    lines = ["## Real modules (truth: the transformers module itself)", "",
             "Each row prices the plan from the HF config (config front end) and measures two training steps of "
             "the real transformers module built from the same config (random weights; the second step reported). "
             "|error| per category, median / max over the architectures, plans and sizes of each recipe:", "",
             "| recipe | cases | " + " | ".join(label for label, _ in CATEGORIES) + " |",
             "|---|---|" + "---|" * len(CATEGORIES)]
    for recipe, by in stats.items():
        if not by:
            continue
        n = next(iter(by.values()))["n"]
        lines.append(f"| {recipe} | {n} | " + " | ".join(
            f"{100 * by[label]['median']:.1f}% / {100 * by[label]['max']:.1f}%" for label, _ in CATEGORIES) + " |")
    errors = [r for r in rows if "error" in r]
    lines += ["", f"Cases that could not run: {len(errors)}."]
    lines += [f"- {r['arch']} {r['plan']} {r['recipe']} {r['batch']}x{r['seq']}: {r['error']}" for r in errors[:40]]
    lines += ["", "| arch | plan | recipe | batch x seq | peak est | peak meas | peak | activations | weights | "
              "gradients | optimizer | FLOPs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "figures" not in r:
            continue
        f = r["figures"]
        lines.append(f"| {r['arch']} | {r['plan']} | {r['recipe']} | {r['batch']} x {r['seq']} | "
                     f"{f['peak']['estimated']:,} | {f['peak']['measured']:,} | " + " | ".join(
                         f"{100 * f[k]['error']:+.1f}%" for k in
                         ("peak", "activations", "weights", "gradients", "optimizer", "FLOPs")) + " |")
    return lines


def markdown(rows, device: str, seconds: float) -> str:
    import torch
    lines = [
        "# Accuracy: estimate vs measured training steps",
        "",
        f"Generated by `python benchmarks/accuracy.py` on {device} ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}) in {seconds:.0f} s. Each row prices a plan with costlens and measures two "
        "real training steps of the same plan (the second reported): the fixture's ONNX graph executed as a torch "
        "module with the plan applied per parameter (`costlens.measure.executor`), exact live tensor storage on "
        "the CPU (`costlens.measure.tracker`), FLOPs from `torch.utils.flop_counter.FlopCounterMode`. fp32, "
        "AdamW (for-loop) unless the plan says otherwise, eager attention. The exported MoE graphs run every expert "
        "on every token, so they are priced and measured with `moe_dispatch=dense`; the rows marked \"torch, routed\" "
        "price the traced torch module with routed dispatch and measure its twin that runs each expert on its own "
        "tokens. The genai fixtures (onnxruntime-genai's "
        "contrib ops) run GroupQueryAttention eagerly and com.microsoft.MoE routed, each expert on its own tokens "
        "(`costlens.measure.torch_ops`); they are measured up to seq 64 (their rotary caches hold 64 positions).",
        "",
        "Targets: peak memory within 5%, FLOPs within 1%, trainable parameters exact.",
        "",
    ]
    worst = {q: max(abs(r[5][q].error) for r in rows) for q in QUANTITIES}
    failing = [r for r in rows if not r[4].ok]
    lines += [f"**{len(rows)} cases; worst |error|: " + ", ".join(f"{q} {100 * worst[q]:.2f}%" for q in QUANTITIES)
              + f"; outside tolerance: {len(failing)}.**", ""]
    lines += ["| model | plan | batch x seq | peak estimated | peak measured | error | phase (est / meas) | "
              "activations error | step FLOPs error | trainable params |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for fixture, plan, batch, seq, result, c in rows:
        peak = c["peak bytes"]
        params = c["trainable params"]
        lines.append(
            f"| {fixture} | {plan} | {batch} x {seq} | {peak.estimated:,} | {peak.measured:,} | "
            f"{100 * peak.error:+.2f}% | {result.estimated_phase} / {result.measured_phase} | "
            f"{100 * c['activation bytes'].error:+.2f}% | {100 * c['step FLOPs'].error:+.2f}% | "
            f"{params.estimated:,} {'=' if params.ok else '!='} {params.measured:,} |")
    return "\n".join(lines) + "\n"


def record(rows, device: str) -> None:
    """Save measurements (with device and torch version) for tests on machines without that device."""
    import torch
    out = ROOT / "fixtures" / "measured"
    out.mkdir(parents=True, exist_ok=True)
    for label, plan, batch, seq, result, c in rows:
        fixture = label.split(" ")[0]
        source = "torch module" if result.source == "torch" else "onnx graph"
        entry = {"schema": "costlens.measured/1", "device": device, "torch": torch.__version__,
                 "fixture": fixture, "measured_on": source, "plan": plan, "batch": batch, "seq": seq,
                 "setup": {"optimizer": result.setup.optimizer, "optimizer_impl": result.setup.optimizer_impl,
                           "moe_dispatch": result.setup.moe_dispatch},
                 "measured": {q.quantity: q.measured for q in result.comparisons},
                 "peak_phase": result.measured_phase}
        tag = f"{fixture}-{result.setup.moe_dispatch}" if result.source == "torch" else fixture
        (out / f"{device}-{tag}-{plan}-{batch}x{seq}.json").write_text(json.dumps(entry, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "accuracy.md"))
    parser.add_argument("--record", action="store_true", help="write fixtures/measured/ (default with --device cuda)")
    parser.add_argument("--section", choices=["all", "real", "executor"], default="all")
    parser.add_argument("--arch", help="comma-separated corpus architectures (real modules) [default: all]")
    parser.add_argument("--recipe", help=f"comma-separated recipes: {', '.join(RECIPES)} [default: all]")
    parser.add_argument("--quick", action="store_true", help="real modules: two plans, one size")
    parser.add_argument("--results", default=str(RESULTS), help="where the real-module rows go (JSON)")
    parser.add_argument("--sizes", help="real modules: batch x seq points, e.g. 4x64,2x32 [default: 2x32,4x64]")
    parser.add_argument("--plan", action="append", default=[],
                        help="real modules: NAME:SPEC run on every architecture instead of the default plans "
                             "(repeatable), e.g. dora-r8:lora=attn,ffn;rank=8;dora=true")
    args = parser.parse_args()
    start = time.time()
    archs = args.arch.split(",") if args.arch else corpus_archs()
    recipes = args.recipe.split(",") if args.recipe else list(RECIPES)
    unknown = [r for r in recipes if r not in RECIPES] + [a for a in archs if a not in corpus_archs()]
    if unknown:
        print(f"accuracy: unknown recipe or architecture: {', '.join(unknown)}", file=sys.stderr)
        return 2
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")] if args.sizes else None
    real = run_real(args.device, archs, recipes, args.quick, Path(args.results), sizes, args.plan or None) \
        if args.section in ("all", "real") else []
    rows = run(args.device) + run_routed(args.device) if args.section in ("all", "executor") else []
    text = [f"# Accuracy: estimate vs measured training steps ({args.device}, {time.time() - start:.0f} s)", ""]
    if real:
        text += real_markdown(real) + [""]
    if rows:
        text.append(markdown(rows, args.device, time.time() - start).replace(
            "# Accuracy: estimate vs measured training steps", "## Executor rows (truth: the costlens executor of the "
            "ONNX graph, not the real module)"))
    Path(args.out).write_text("\n".join(text) + "\n")
    if rows and (args.record or args.device == "cuda"):
        record(rows, args.device)
    print(f"wrote {args.out}" + (f" and {args.results}" if real else ""), file=sys.stderr)
    return 0 if all(r[4].ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
