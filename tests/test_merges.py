"""Merges and many parents (issue 18 point 6): a ``--reference`` scan names every reference the suspect derives from,
and with ``--localized`` which reference each layer of a layer-stacked merge ("frankenmerge") comes from.

One module fixture runs the scan the way the command line does (flags parsed in this process, ``preflight``,
``run_scan``): the suspect is a merge of two tiny parents (tests/merge_models.py: layers 0-1 of ``p1``, 2-4 of
``p2``), the references are both parents and an independent ``stranger``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from merge_models import frankenmerge_family

REFS = ["stranger", "p2", "p1"]


@pytest.fixture(scope="module")
def merge_scan(tmp_path_factory) -> tuple[str, dict]:
    """``python -m jaxind.main --model_a=merge --reference=refs.yaml --localized --output=scan.json``, in this
    process: ``(stdout, the scan document written)``."""
    from jaxind.cli import main

    root = tmp_path_factory.mktemp("merges")
    paths = frankenmerge_family(str(root / "models"))
    refs = root / "refs.yaml"
    data = {"kind": "random", "num_sequences": 16, "seq_len": 16, "seed": 0}
    refs.write_text(yaml.safe_dump({"models": [{"name": n, "source": paths[n]} for n in REFS], "data": data}))
    out = root / "scan.json"
    argv = ["jaxind", f"--model_a={paths['merge']}", f"--reference={refs}", "--localized", f"--output={out}"]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXIND_CACHE", str(root / "cache"))
        main.FLAGS.unparse_flags()
        try:
            main.FLAGS(argv)
            run = main.preflight()
            with contextlib.redirect_stdout(stdout):
                assert main.run_scan(run, writer=True) == 0
        finally:
            main.FLAGS.unparse_flags()
    return stdout.getvalue(), json.loads(Path(out).read_text())


def test_localized_with_reference_keeps_the_scan_tests(merge_scan):
    """``--reference --localized`` without ``--tests`` runs the scan's default tests plus localized testing (it
    used to drop ``--localized`` silently), and draws no heatmap (a scan writes one JSON)."""
    _, doc = merge_scan
    assert doc["tests"] == ["csu", "match", "localized"]
    assert all("localized" in doc["results"][name]["tests"] for name in REFS)
    assert all(doc["results"][name]["tests"]["localized"]["heatmap"] is None for name in REFS)


def test_scan_reports_both_parents_of_a_merge_and_not_the_stranger(merge_scan):
    """Every reference whose Holm-adjusted p-value is at most alpha is listed in ``dependent``, in rank order: both
    parents; the independent model is not."""
    stdout, doc = merge_scan
    ranking = {r["name"]: r for r in doc["ranking"]}
    assert sorted(doc["dependent"]) == ["p1", "p2"]
    assert doc["dependent"] == [r["name"] for r in doc["ranking"] if r["dependent"]]
    assert all(ranking[n]["adjusted_log10_pvalue"] <= math.log10(doc["alpha"]) for n in ("p1", "p2"))
    assert not ranking["stranger"]["dependent"] and ranking["stranger"]["adjusted_log10_pvalue"] > math.log10(0.05)
    assert f"derived from: {', '.join(doc['dependent'])}" in stdout.splitlines()


def test_localized_scan_names_each_layers_parent(merge_scan):
    """Layers 0-1 of the merge come from p1's layers 0-1 and layers 2-4 from p2's layers 2-4 (each map at alpha over
    the three references); the stranger is named for no layer; the printed summary says the same."""
    stdout, doc = merge_scan
    parents = doc["layer_parents"]
    assert parents["alpha_per_reference"] == pytest.approx(doc["alpha"] / 3)
    got = {b: (v["parent"], v["layer"]) if v else None for b, v in parents["layers"].items()}
    assert got == {"0": ("p1", 0), "1": ("p1", 1), "2": ("p2", 2), "3": ("p2", 3), "4": ("p2", 4)}
    lines = stdout.splitlines()
    assert any(l.split() == ["layers", "0-1", "from", "p1", "layers", "0-1", "(p", "<=", l.split()[-1]] for l in lines)
    assert any(l.split()[:6] == ["layers", "2-4", "from", "p2", "layers", "2-4"] for l in lines)


def test_layer_parents_thresholds_each_parent_and_keeps_the_strongest():
    """:func:`jaxind.stats.localized.layer_parents` on hand-made matrices: a layer goes to the parent with the smaller
    passing p-value; a p-value that passes at ``alpha`` but not at ``alpha_each`` over the parent's pairs names no
    parent; a screened-out pair (None) is never chosen."""
    from jaxind.stats import localized

    # 2 x 2 pairs per parent, alpha_each = 0.01: threshold log10(0.01 / 4) = -2.6
    records = {
        "x": {"layers_a": [0, 1], "layers_b": [0, 1], "log10_pvalue_matrix": [[-9.0, -2.5], [-1.0, None]]},
        "y": {"layers_a": [0, 1], "layers_b": [0, 1], "log10_pvalue_matrix": [[-3.0, None], [-12.0, -2.0]]},
    }
    got = localized.layer_parents(records, 0.01)
    assert got == {"0": {"parent": "y", "layer": 1, "log10_pvalue": -12.0}, "1": None}
    got = localized.layer_parents({"x": records["x"]}, 0.01)
    assert got == {"0": {"parent": "x", "layer": 0, "log10_pvalue": -9.0}, "1": None}


def test_layer_parents_print_as_runs_of_consecutive_layers():
    """A run continues only while both the suspect's and the reference's layers step by one from one reference:
    a repeated block (layers 2-3 again at 4-5, as in depth up-scaling) and a change of reference start new runs, and
    a layer no reference explains says so."""
    from jaxind.many import scan

    def src(parent: str, layer: int) -> dict:
        return {"parent": parent, "layer": layer, "log10_pvalue": -50.0 - layer}

    layers = {"0": src("a", 0), "1": src("a", 1), "2": src("a", 2), "3": src("a", 3), "4": src("a", 2)}
    layers |= {"5": src("a", 3), "6": None, "7": src("b", 7)}
    lines = scan.format_layer_parents({"alpha_per_reference": 0.025, "layers": layers})
    assert [l.split()[:6] for l in lines[1:]] == [
        ["layers", "0-3", "from", "a", "layers", "0-3"],
        ["layers", "4-5", "from", "a", "layers", "2-3"],
        ["layer", "6", "no", "reference"],
        ["layer", "7", "from", "b", "layer", "7"],
    ]
    assert lines[1].endswith("(p <= 10^-50.0)") and lines[2].endswith("(p <= 10^-52.0)")
