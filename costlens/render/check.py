"""`costlens check` output: budget verdicts as text, JSON (costlens.check/1), JUnit XML, Markdown.

Every format reads the same verdicts; text gives one line per limit (violations first with
plan, limit, value and by how much), JUnit one test case per plan and limit (CI systems show
them as test results), Markdown a table fit for a pull-request comment.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from costlens.budgets import Limit, Verdict
from costlens.render import units

CHECK_SCHEMA = "costlens.check/1"
FORMATS = ("text", "json", "junit", "markdown")


def format_value(limit: Limit, value: float) -> str:
    """A limit's quantity in human units (bytes in GiB/MiB, parameters in K/M/B, FLOPs, seconds)."""
    if limit is Limit.PEAK_MEMORY:
        return units.nbytes(round(value))
    if limit is Limit.TRAINABLE_PARAMS:
        return units.params(round(value))
    if limit is Limit.STEP_FLOPS:
        return units.flops(round(value))
    if limit is Limit.MAX_COST:
        return f"{value:,.2f}"
    return seconds(value)


def seconds(value: float) -> str:
    """A duration in the unit that keeps it readable: 120 ns, 3.4 ms, 1.2 s, 2.5 min, 3.1 h."""
    for scale, suffix in ((3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value / 1e-9:.3g} ns"


def _by_how_much(verdict: Verdict) -> str:
    """The distance to the limit and its share of the limit: '58.02K (+58.0%)' over, '1.2 GiB (12.0%)' under."""
    fraction = verdict.excess_fraction
    share = "" if fraction is None else f" ({fraction:+.1%})" if not verdict.passed else f" ({-fraction:.1%})"
    return f"{format_value(verdict.limit, abs(verdict.excess))}{share}"


def verdict_line(verdict: Verdict) -> str:
    """One line: plan, limit, value, the limit as written, and by how much it is over (or under)."""
    value, maximum = format_value(verdict.limit, verdict.value), format_value(verdict.limit, verdict.maximum)
    where = f"{verdict.written}, {verdict.where}"
    if verdict.passed:
        return f"ok    {verdict.plan}: {verdict.limit.value} {value} <= {maximum} ({where}); " \
               f"{_by_how_much(verdict)} to spare"
    return f"FAIL  {verdict.plan}: {verdict.limit.value} {value} > {maximum} ({where}); " \
           f"over by {_by_how_much(verdict)}"


def _summary(verdicts: tuple[Verdict, ...]) -> str:
    failed = sum(not v.passed for v in verdicts)
    if failed:
        return f"{failed} of {len(verdicts)} budget limits exceeded"
    return f"all {len(verdicts)} budget limits met"


def check_text(verdicts: tuple[Verdict, ...], model: str, budget: str) -> str:
    """One line per limit, violations first (so a CI log shows them on top), then a summary line."""
    ordered = sorted(verdicts, key=lambda v: v.passed)          # violations first, stable otherwise
    return "\n".join([*(verdict_line(v) for v in ordered), f"costlens check: {_summary(verdicts)} "
                      f"(model {model}, budget {budget})"])


def check_document(verdicts: tuple[Verdict, ...], model: str, budget: str, setup: dict) -> dict:
    """The costlens.check/1 document (docs/ci.md): bytes, params and FLOPs as integers, seconds as floats."""
    def number(limit: Limit, value: float):
        return value if limit in (Limit.TIME_PER_STEP, Limit.MAX_COST) else round(value)

    return {
        "schema": CHECK_SCHEMA, "model": model, "budget": budget, "setup": setup,
        "passed": all(v.passed for v in verdicts), "n_limits": len(verdicts),
        "n_failed": sum(not v.passed for v in verdicts),
        "verdicts": [{"plan": v.plan, "limit": v.limit.value, "value": number(v.limit, v.value),
                      "maximum": number(v.limit, v.maximum), "written": v.written, "where": v.where,
                      "passed": v.passed, "excess": number(v.limit, v.excess),
                      "excess_fraction": v.excess_fraction} for v in verdicts],
    }


def check_json(verdicts: tuple[Verdict, ...], model: str, budget: str, setup: dict) -> str:
    """``check_document`` as indented JSON text."""
    return json.dumps(check_document(verdicts, model, budget, setup), indent=2)


def check_junit(verdicts: tuple[Verdict, ...], model: str, budget: str) -> str:
    """JUnit XML: one <testcase> per plan and limit, a <failure> where the limit is exceeded."""
    failed = str(sum(not v.passed for v in verdicts))
    suites = ET.Element("testsuites", name="costlens check", tests=str(len(verdicts)), failures=failed,
                        errors="0", time="0")
    suite = ET.SubElement(suites, "testsuite", name=f"costlens budget {budget} on {model}",
                          tests=str(len(verdicts)), failures=failed, errors="0", skipped="0", time="0")
    for verdict in verdicts:
        case = ET.SubElement(suite, "testcase", classname=f"costlens.{verdict.plan}",
                             name=f"{verdict.limit.value} <= {verdict.written}", time="0")
        if not verdict.passed:
            failure = ET.SubElement(case, "failure", message=verdict_line(verdict).removeprefix("FAIL  "),
                                    type="BudgetExceeded")
            failure.text = verdict_line(verdict)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode")


def _cell(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def check_markdown(verdicts: tuple[Verdict, ...], model: str, budget: str) -> str:
    """A Markdown table of the verdicts, violations first, for a pull-request comment."""
    failed = sum(not v.passed for v in verdicts)
    mark = "❌" if failed else "✅"
    lines = [f"### {mark} costlens budget check: {_summary(verdicts)}", "",
             f"Model `{_cell(model)}`, budget `{_cell(budget)}`.", "",
             "| | plan | limit | value | maximum | margin |", "|---|---|---|---:|---:|---:|"]
    for v in sorted(verdicts, key=lambda v: v.passed):
        margin = ("over by " if not v.passed else "") + _by_how_much(v) + ("" if not v.passed else " to spare")
        lines.append(f"| {'❌' if not v.passed else '✅'} | {_cell(v.plan)} | {v.limit.value.replace('_', ' ')} | "
                     f"{format_value(v.limit, v.value)} | {format_value(v.limit, v.maximum)} ({_cell(v.written)}) | "
                     f"{margin} |")
    return "\n".join(lines)
