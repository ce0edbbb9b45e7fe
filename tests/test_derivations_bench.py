"""benchmarks/derivations.py (issue 18): the derivation zoo's tables on a few tiny pairs, resuming, and the
applicability data it reads (jaxind.pair.catalog.APPLICABILITY, also the README's table)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import pytest
from helpers import REPO

from jaxind.errors import JaxindError
from jaxind.pair import catalog

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import derivation_zoo as dz  # noqa: E402
import derivations as bench  # noqa: E402

PLAN = bench.Plan(
    sizes=("tiny",),
    seeds=2,
    derivations=("finetune", "upcycle"),
    tests=("csu", "l2"),
    num_perms=99,
    generalized_steps=10,
    steps=dataclasses.asdict(dz.Steps(base=0, finetune=3, distill=3)),  # untrained bases: one training compile
)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("derivations") / "d.json")
    return out, bench.run(PLAN, out, alpha=0.01, log=lambda m: None)


def test_tables_detect_the_finetune_and_mark_what_does_not_apply(ran):
    out, doc = ran
    assert len(doc["pairs"]) == 2 * 2 * 2  # seeds x derivations x (dependent, independent)
    assert json.loads(open(out).read()) == doc
    text = open(os.path.splitext(out)[0] + ".md").read()
    tables = re.findall(r"#### (\w+) \(tiny\).*?\n\n((?:\|.*\n)+)", text)
    assert [name for name, _ in tables] == ["finetune", "upcycle"]
    for _, table in tables:
        assert [row.split("|")[1].strip() for row in table.splitlines()[2:]] == ["`csu`", "`l2`"]
    finetune = bench.summarize(doc, "tiny", "finetune", "csu", 0.01)
    assert finetune["detected"] == (2, 2) and finetune["false_positives"] == (0, 2) and finetune["auc"] == 1.0
    l2_upcycle = bench.summarize(doc, "tiny", "upcycle", "l2", 0.01)
    assert l2_upcycle["na"] and "dense vs MoE" in l2_upcycle["na"][0] and l2_upcycle["detected"] == (0, 0)
    assert "| `l2` | n/a: dense vs MoE" in text
    assert bench.summarize(doc, "tiny", "upcycle", "csu", 0.01)["detected"] == (2, 2)


def test_a_rerun_resumes_and_other_settings_are_refused(ran, monkeypatch):
    out, doc = ran
    monkeypatch.setattr(bench, "run_tests", lambda *a, **k: pytest.fail("a finished pair was run again"))
    assert bench.run(PLAN, out, alpha=0.01, log=lambda m: None) == doc
    with pytest.raises(JaxindError, match="other settings"):
        bench.load_doc(out, dataclasses.replace(PLAN, num_perms=19))


def test_auc_is_mann_whitney():
    assert bench.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert bench.auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert bench.auc([], [1.0]) is None


def test_every_test_states_every_kind_and_the_readme_holds_the_table():
    for name in catalog.CATALOG:
        assert set(catalog.APPLICABILITY.get(name, {})) == set(catalog.PAIR_KINDS), name
    readme = open(os.path.join(REPO, "README.md")).read()
    table = re.search(r"<!-- applicability-table -->\n(.*?)\n<!-- /applicability-table -->", readme, re.S)
    assert table is not None and table.group(1) == catalog.applicability_table()


def test_pair_kinds_and_reasons():
    cfg = dz.SIZES["tiny"]
    assert catalog.pair_kinds(cfg, cfg) == ("same",)
    assert catalog.pair_kinds(cfg, cfg, same_tokenizer=False) == ("tokenizer",)
    assert catalog.pair_kinds(cfg, cfg.replace(d_ff=48, n_layers=6)) == ("mlp_width", "depth")
    assert catalog.not_applicable("match", ("mlp_width", "depth")) is None
    assert "one architecture" in catalog.not_applicable("l2", ("depth",))
