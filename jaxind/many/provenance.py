"""The sweep report: p-value heatmaps, the provenance graph, one self-contained HTML page and its
Markdown twin, written into the sweep's output folder (docs/DESIGN.md §5.10).

- ``heatmap_<test>.png`` (and ``heatmap_pair.png`` for the pair verdicts): ``-log10 p`` of every
  pair, models ordered by hierarchical clustering of the pair evidence (average linkage on
  ``1 / (1 + -log10 p)``, optimal leaf order), so related models sit together; dependent pairs
  (after the correction over pairs) are outlined. Each PNG names its models, in order, in its
  ``Models`` text field.
- ``provenance.png``: every model a node, every dependent pair an edge (width grows with the
  evidence); with a ground truth (``parent:`` keys) an edge that the truth does not relate is
  dashed red and a related pair not found is dotted grey.
- ``report.html``: the dependent pairs with their evidence, the pictures (embedded), every pair,
  every model, and per pair a drill-down (per-test, per-layer p-values; the localized heatmap if
  there is one) that the tables link to. No script, no external resource. ``report.md``: the same
  lists, linking the PNG files and the pair JSONs.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from typing import Any

import numpy as np

from jaxind.io import destinations
from jaxind.many import sweep_summary

__all__ = [
    "CLIP",
    "cluster_order",
    "fmt_p",
    "plot_graph",
    "plot_heatmap",
    "render_html",
    "render_markdown",
    "text_summary",
    "write_report",
]

CLIP = 50.0  # -log10 p above this shows as the darkest colour


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def cluster_order(matrix: np.ndarray) -> list[int]:
    """An order of the models (rows of the symmetric evidence ``matrix``, ``-log10 p``, NaN where
    untested) in which related models are adjacent."""
    n = matrix.shape[0]
    if n <= 2:
        return list(range(n))
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    evidence = np.nan_to_num(np.asarray(matrix, np.float64), nan=0.0)
    distance = 1.0 / (1.0 + np.maximum(evidence, 0.0))
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    tree = hierarchy.optimal_leaf_ordering(hierarchy.linkage(condensed, "average"), condensed)
    return [int(i) for i in hierarchy.leaves_list(tree)]


def _save(fig: Any, path: str, models: list[str], title: str) -> None:
    plt = _plt()
    metadata = {"Title": title, "Models": ",".join(models)}
    try:  # a temporary of its own per writer: shards may write the report at the same time
        destinations.write_file(path, lambda tmp: fig.savefig(tmp, format="png", metadata=metadata), "--output")
    finally:
        plt.close(fig)


def plot_heatmap(path: str, names: list[str], matrix: np.ndarray, order: list[int], title: str, hits: Any) -> str:
    """Writes the ``-log10 p`` matrix in ``order`` as a PNG; ``hits`` (bool matrix) are outlined."""
    plt = _plt()
    names = [names[i] for i in order]
    shown = np.asarray(matrix)[np.ix_(order, order)]
    hit = np.asarray(hits)[np.ix_(order, order)]
    n = len(names)
    size = 2.5 + 0.42 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    image = ax.imshow(np.minimum(shown, CLIP), cmap=cmap, vmin=0.0, vmax=CLIP)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            if hit[i, j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            if n <= 24 and np.isfinite(shown[i, j]):
                value = max(float(shown[i, j]), 0.0)
                text = f"{value:.0f}" if value >= 10 else f"{value:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if value < CLIP / 2 else "k")
    ax.set_title(f"{title}: -log10 p (clipped at {CLIP:.0f}; red: dependent)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path, names, title)
    return path


def _truth_pairs(summary: dict[str, Any]) -> set[frozenset[str]] | None:
    rows = summary["pairs"]
    if not rows or "expected_dependent" not in rows[0]:
        return None
    return {frozenset((r["a"], r["b"])) for r in rows if r["expected_dependent"]}


def plot_graph(path: str, summary: dict[str, Any], order: list[int]) -> str:
    """Writes the provenance graph: models on a circle in cluster order, dependent pairs as edges."""
    plt = _plt()
    names = [summary["models"][i]["name"] for i in order]
    n = len(names)
    angle = {name: 2 * math.pi * k / max(n, 1) + math.pi / 2 for k, name in enumerate(names)}
    xy = {name: (math.cos(a), math.sin(a)) for name, a in angle.items()}
    fig, ax = plt.subplots(figsize=(3 + 0.35 * n, 3 + 0.35 * n), dpi=100)
    truth = _truth_pairs(summary)
    found = {frozenset((r["a"], r["b"])): r for r in summary["pairs"] if r["dependent"]}
    for pair, row in found.items():
        (xa, ya), (xb, yb) = xy[row["a"]], xy[row["b"]]
        width = 1.0 + min(4.0, math.log10(1.0 - row["log10_pvalue"]))
        wrong = truth is not None and pair not in truth
        ax.plot([xa, xb], [ya, yb], color="tab:red" if wrong else "tab:blue", lw=width, ls="--" if wrong else "-")
    for pair in (truth or set()) - set(found):
        a, b = sorted(pair)
        ax.plot([xy[a][0], xy[b][0]], [xy[a][1], xy[b][1]], color="grey", lw=1.0, ls=":")
    status = {m["name"]: m.get("status") for m in summary["models"]}
    for name, (x, y) in xy.items():
        ax.scatter([x], [y], s=120, color="tab:orange" if status[name] == "ok" else "lightgrey", zorder=3)
        ax.annotate(name, (x, y), xytext=(8 * x, 8 * y), textcoords="offset points", fontsize=8,
                    ha="left" if x >= 0 else "right", va="center")  # fmt: skip
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    legend = f"edges: dependent pairs ({summary['correction']} over pairs, alpha={summary['alpha']})"
    if truth is not None:
        legend += "\nred dashed: not related in the truth; grey dotted: related, not found"
    ax.set_title(legend, fontsize=8)
    fig.tight_layout()
    _save(fig, path, names, "provenance graph")
    return path


def _hits(summary: dict[str, Any], names: list[str], test: str | None) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(names), len(names)), bool)
    for row in summary["pairs"]:
        dependent = row["dependent"] if test is None else row["tests"].get(test, {}).get("dependent")
        if dependent:
            out[index[row["a"]], index[row["b"]]] = out[index[row["b"]], index[row["a"]]] = True
    return out


def write_report(summary: dict[str, Any], output: str) -> dict[str, Any]:
    """Writes the pictures, ``report.html`` and ``report.md`` into ``output``; returns their names."""
    names, pair_matrix = sweep_summary.evidence_matrix(summary)
    order = cluster_order(pair_matrix)
    heatmaps = {"pair": plot_heatmap(os.path.join(output, "heatmap_pair.png"), names, pair_matrix, order,
                                     "pair verdict", _hits(summary, names, None))}  # fmt: skip
    for test in summary["tests"]:
        _, matrix = sweep_summary.evidence_matrix(summary, test)
        if np.isfinite(matrix).any():
            heatmaps[test] = plot_heatmap(
                os.path.join(output, f"heatmap_{test}.png"), names, matrix, order, test, _hits(summary, names, test)
            )
    graph = plot_graph(os.path.join(output, "provenance.png"), summary, order)
    files = {
        "html": "report.html",
        "markdown": "report.md",
        "graph": os.path.basename(graph),
        "heatmaps": {t: os.path.basename(p) for t, p in heatmaps.items()},
        "order": [names[i] for i in order],
    }
    destinations.write_text(os.path.join(output, "report.html"), render_html(summary, output, files))
    destinations.write_text(os.path.join(output, "report.md"), render_markdown(summary, files))
    return files


# --- text --------------------------------------------------------------------------------------------------


def fmt_p(log10: Any) -> str:
    """A p-value from its log10, readable at any size: 0.0312 or 10^-45.2."""
    if log10 is None:
        return "-"
    value = -math.inf if log10 == "-inf" else float(log10)
    return f"{10**value:.4f}" if value >= -4 else f"10^{value:.1f}"


def _evidence(row: dict[str, Any]) -> str:
    parts = []
    for test, entry in row["tests"].items():
        if entry.get("error"):
            parts.append(f"{test}: n/a")
        else:
            parts.append(f"{test}: {fmt_p(entry['log10_pvalue'])}{' *' if entry.get('dependent') else ''}")
    return ", ".join(parts)


def text_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: the counts and the dependent pairs."""
    counts = summary["counts"]
    lines = [
        f"{counts['pairs']} pairs of {counts['models']} models: {counts.get('done', 0)} done, "
        f"{counts.get('error', 0)} failed, {counts.get('pending', 0)} pending; "
        f"{len(summary['dependent_pairs'])} dependent at alpha={summary['alpha']} ({summary['correction']} over pairs)"
    ]
    for row in summary["pairs"]:
        if row["dependent"]:
            lines.append(f"  {row['a']} ~ {row['b']}: p = {fmt_p(row['log10_pvalue'])} ({_evidence(row)})")
    return "\n".join(lines)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _image(output: str, name: str, alt: str) -> str:
    with open(os.path.join(output, name), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" title="{_e(alt)}">'


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}th{background:#eee}
.dep{background:#fde2e2}.err{color:#a00}img{max-width:100%;border:1px solid #ddd;margin:4px}
details{margin:.3em 0}section.pair-detail{border-top:1px solid #ccc;margin-top:1em}"""


def _pair_rows_html(rows: list[dict[str, Any]], tests: list[str], css: str) -> list[str]:
    out = []
    for r in rows:
        name = sweep_summary.pair_name(r["a"], r["b"])
        cells = "".join(
            f"<td>{fmt_p(r['tests'][t]['log10_pvalue']) if t in r['tests'] and not r['tests'][t]['error'] else '-'}"
            f"{' *' if r['tests'].get(t, {}).get('dependent') else ''}</td>"
            for t in tests
        )
        status = r["status"] if not r.get("error") else f"{r['status']}: {r['error']}"
        out.append(
            f'<tr class="{css}{" dep" if r["dependent"] else ""}" data-a="{_e(r["a"])}" data-b="{_e(r["b"])}">'
            f"<td>{_e(r['a'])}</td><td>{_e(r['b'])}</td><td>{fmt_p(r['log10_pvalue'])}</td>"
            f"<td>{fmt_p(r['adjusted_log10_pvalue'])}</td>{cells}<td>{_e(status)}</td>"
            f'<td><a href="#pair-{_e(name)}">details</a></td></tr>'
        )
    return out


def _drill_down(row: dict[str, Any], output: str) -> str:
    name = sweep_summary.pair_name(row["a"], row["b"])
    parts = [f'<section class="pair-detail" id="pair-{_e(name)}"><h3>{_e(row["a"])} vs {_e(row["b"])}</h3>']
    parts.append(f'<p>pair p = {fmt_p(row["log10_pvalue"])}, adjusted {fmt_p(row["adjusted_log10_pvalue"])}; '
                 f'<a href="{_e(row["file"])}">results JSON</a></p>')  # fmt: skip
    doc = sweep_summary.read_json(os.path.join(output, row["file"])) if row["status"] == "done" else None
    if doc is None:
        parts.append(f'<p class="err">{_e(row.get("error") or row["status"])}</p></section>')
        return "".join(parts)
    for test, record in doc["tests"].items():
        head = f"{test}: p = {fmt_p(record.get('log10_pvalue'))}" + (
            f" (error: {record['error']})" if record.get("error") else ""
        )
        layers = "".join(
            f"<tr><td>{l['layer_a']}</td><td>{l['layer_b']}</td><td>{fmt_p(l['log10_pvalue'])}</td>"
            f"<td>{_e(l.get('statistic'))}</td></tr>"
            for l in record.get("layers", [])
        )
        table = f"<table><tr><th>layer A</th><th>layer B</th><th>p</th><th>statistic</th></tr>{layers}</table>"
        parts.append(f"<details><summary>{_e(head)}</summary>{table if layers else ''}</details>")
    heatmap = os.path.join("pairs", name + "_localized.png")
    if os.path.isfile(os.path.join(output, heatmap)):
        parts.append(_image(output, heatmap, f"localized MATCH {row['a']} vs {row['b']}"))
    parts.append("</section>")
    return "".join(parts)


def render_html(summary: dict[str, Any], output: str, files: dict[str, Any]) -> str:
    """The self-contained report page (see the module doc)."""
    tests = summary["tests"]
    header = "".join(f"<th>{_e(t)}</th>" for t in tests)
    columns = f"<tr><th>A</th><th>B</th><th>pair p</th><th>adjusted</th>{header}<th>status</th><th></th></tr>"
    dependent = [r for r in summary["pairs"] if r["dependent"]]
    ranked = sorted(summary["pairs"], key=lambda r: (r["log10_pvalue"] is None, r["log10_pvalue"] or 0.0))
    counts = summary["counts"]
    models = "".join(
        f"<tr><td>{_e(m['name'])}</td><td>{_e(m['source'])}</td><td>{_e(m.get('parent') or '')}</td>"
        f'<td>{_e(m.get("status"))}</td><td class="err">{_e(m.get("error") or "")}</td></tr>'
        for m in summary["models"]
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>jaxind sweep report</title><style>{_STYLE}</style>",
        "</head><body><h1>jaxind sweep report</h1>",
        f"<p>{counts['models']} models, {counts['pairs']} pairs ({counts.get('done', 0)} done, "
        f"{counts.get('error', 0)} failed, {counts.get('pending', 0)} pending). Verdict: {_e(summary['verdict'])}. "
        f"* marks a test dependent on its own after the same correction.</p>",
        f'<h2>Dependent pairs ({len(dependent)})</h2><table id="dependent-pairs">{columns}',
        *_pair_rows_html(dependent, tests, "dependent-pair"),
        "</table>",
        "<h2>Provenance graph</h2>",
        _image(output, files["graph"], "provenance graph: " + ", ".join(files["order"])),
        "<h2>P-value heatmaps</h2>",
        *(_image(output, name, f"{test}: " + ", ".join(files["order"])) for test, name in files["heatmaps"].items()),
        f'<h2>All pairs, strongest evidence first</h2><table id="all-pairs">{columns}',
        *_pair_rows_html(ranked, tests, "pair"),
        "</table>",
        '<h2>Models</h2><table id="models"><tr><th>name</th><th>source</th><th>parent</th><th>status</th>'
        f"<th>error</th></tr>{models}</table>",
        "<h2>Pair details</h2>",
        *(_drill_down(r, output) for r in ranked),
        "</body></html>",
    ]
    return "\n".join(parts)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#|~])")


def _md(value: Any) -> str:
    """Text from outside (an error message, a path) as inert Markdown: one line, HTML characters as entities,
    Markdown's punctuation backslash-escaped (no link, table cell break, heading or raw HTML can come of it)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def render_markdown(summary: dict[str, Any], files: dict[str, Any]) -> str:
    """The report as Markdown (pictures and pair JSONs linked, not embedded)."""
    tests = summary["tests"]
    lines = [
        "# jaxind sweep report",
        "",
        f"{summary['counts']['models']} models, {summary['counts']['pairs']} pairs. {summary['verdict']}.",
        "",
        f"## Dependent pairs ({len(summary['dependent_pairs'])})",
        "",
        "| A | B | pair p | adjusted | " + " | ".join(tests) + " | details |",
        "|---|---|---|---|" + "---|" * len(tests) + "---|",
    ]
    for r in summary["pairs"]:
        if r["dependent"]:
            per = " | ".join(
                fmt_p(r["tests"][t]["log10_pvalue"]) if t in r["tests"] and not r["tests"][t]["error"] else "-"
                for t in tests
            )
            lines.append(
                f"| {r['a']} | {r['b']} | {fmt_p(r['log10_pvalue'])} | {fmt_p(r['adjusted_log10_pvalue'])} | {per} "
                f"| [{r['file']}]({r['file']}) |"
            )
    lines += ["", f"![provenance graph]({files['graph']})", ""]
    lines += [f"![{test}]({name})" for test, name in files["heatmaps"].items()]
    failed = [r for r in summary["pairs"] if r["status"] == "error"] + [
        m for m in summary["models"] if m.get("status") == "error"
    ]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {_md(x.get('name') or x['a'] + ' vs ' + x['b'])}: {_md(x.get('error'))}" for x in failed]
    return "\n".join(lines) + "\n"
