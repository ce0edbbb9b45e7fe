"""Human-readable report of a results document: one table row per test."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jaxind.pair.registry import TESTS
from jaxind.pair.result import PairResult
from jaxind.stats.results import TestResult

__all__ = ["format_localized", "format_table", "verdict"]


def verdict(test: TestResult, alpha: float) -> str:
    """What the p-value means at level ``alpha``."""
    if test.error:
        return "error"
    if test.pvalue is None or test.log10_pvalue is None:
        return "n/a (not a test)"
    return "dependent (reject H0)" if test.log10_pvalue <= math.log10(alpha) else "no evidence of dependence"


def _p(test: TestResult) -> str:
    if test.error:
        return "-"
    if test.pvalue is None or test.log10_pvalue is None:
        return f"stat={test.statistic:.4g}" if test.statistic is not None else "-"
    if test.pvalue and test.pvalue >= 1e-4:
        return f"{test.pvalue:.4f}"
    return f"10^{test.log10_pvalue:.1f}"


def format_table(result: PairResult | Mapping[str, Any], title: str | None = None) -> str:
    """The tests of a pair (a :class:`PairResult`, or its results document) as an aligned text table (test,
    p-value, verdict, seconds, meaning)."""
    if not isinstance(result, PairResult):
        result = PairResult.from_json(result)
    alpha = result.alpha
    rows = [("test", "p-value", f"at alpha={alpha}", "seconds", "what it measures")]
    for name, test in result.tests.items():
        meaning = test.error or (TESTS[name].meaning if name in TESTS else "")
        rows.append((name, _p(test), verdict(test, alpha), f"{test.seconds:.1f}", meaning))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_localized(result: TestResult | Mapping[str, Any]) -> str:
    """The localized-testing summary (its :class:`TestResult`, or that result's JSON record): which layer of B
    comes from which layer of A."""
    loc = result.to_json() if isinstance(result, TestResult) else result  # plain JSON types (lists, string keys)
    lines = [
        f"localized MATCH over {len(loc['layers_a'])} x {len(loc['layers_b'])} layer pairs "
        f"(a layer pair counts when log10 p < {loc['threshold_log10']:.1f}: Bonferroni at alpha={loc['alpha']})"
    ]
    units = {u["layer_b"]: u for u in loc.get("matched_units", [])}
    matrix = loc["log10_pvalue_matrix"]
    for col, b in enumerate(loc["layers_b"]):
        a = loc["layer_map"][str(b)]
        if a is None:
            lines.append(f"  B layer {b:>3}: no layer of A")
            continue
        row = loc["layers_a"].index(a)
        kept = units.get(b)
        extra = f", {len(kept['units_a'])} units matched" if kept else ""
        lines.append(f"  B layer {b:>3} <- A layer {a:>3} (log10 p = {matrix[row][col]:.1f}{extra})")
    for a, bs in loc.get("duplicated_layers", {}).items():
        lines.append(f"  A layer {a} is the source of {len(bs)} layers of B: {', '.join(map(str, bs))}")
    if loc.get("screen"):
        screen = loc["screen"]
        lines.append(
            f"  screen: LAPs solved for {screen['pairs_tested']} of {screen['pairs']} pairs (the rest untested)"
        )
    if loc.get("heatmap"):
        lines.append(f"  heatmap: {loc['heatmap']}")
    return "\n".join(lines)
