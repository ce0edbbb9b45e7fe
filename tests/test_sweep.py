"""Many models (jaxind.sweep, jaxind.many.scan, jaxind.stats.fingerprint, jaxind.many.provenance).

A zoo of eight tiny models built here (tests/helpers.py ``sweep_zoo``): two derived families (a base,
a fine-tune proxy and a permuted+rotated copy of the fine-tune; a base, a fine-tune proxy and a
pruned copy) and two independent models, plus one model that cannot be read. The sweep must report
exactly the six pairs inside the families as dependent, with CSU, L2 and MATCH where they apply;
a sweep killed at several points (one inside a fingerprint write) and rerun must end with the
results of an uninterrupted run and count every conversion, fingerprint and pair exactly once; the
one-vs-many scan must rank the true base first and find nothing for an independent suspect; the
HTML report must render in headless Chromium and list the right pairs.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import Frozen, alias_bomb, cli_env, numpy_noise, numpy_params, run_cli, save_jaxind, sweep_zoo

from jaxind.many import sweep, sweep_config
from jaxind.stats import fingerprint

ZOO = ["base1", "ft1", "permrot1", "base2", "ft2", "pruned2", "ind1", "ind2"]
EXPECTED = {
    frozenset(p)
    for p in [
        ("base1", "ft1"),
        ("base1", "permrot1"),
        ("ft1", "permrot1"),
        ("base2", "ft2"),
        ("base2", "pruned2"),
        ("ft2", "pruned2"),
    ]
}
DATA = {"kind": "random", "num_sequences": 16, "seq_len": 16, "seed": 0}


@dataclasses.dataclass
class Zoo:
    root: Path
    paths: dict[str, str]
    config_path: str


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("sweep")
    models = sweep_zoo(str(root / "models"))
    broken = root / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 32}))
    entries = [{"name": n, "source": p, **({"parent": parent} if parent else {})} for n, (p, parent) in models.items()]
    entries.append({"name": "broken", "source": str(broken)})
    config = {"models": entries, "tests": ["csu", "l2", "match"], "num_perms": 99, "data": DATA, "alpha": 0.05}
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    return Zoo(root, {n: p for n, (p, _) in models.items()}, str(root / "sweep.yaml"))


@pytest.fixture(scope="module")
def reference(zoo) -> tuple[dict, Path, Path]:
    """An uninterrupted sweep, in this process: ``(summary, output, cache)``."""
    config = dataclasses.replace(sweep_config.load(zoo.config_path), cache_dir=str(zoo.root / "cache"))
    output = zoo.root / "reference"
    return sweep.run_sweep(config, str(output), log=lambda m: None), output, zoo.root / "cache"


def _pairs(rows) -> set[frozenset[str]]:
    return {frozenset((r["a"], r["b"])) for r in rows}


def test_sweep_reports_exactly_the_dependent_pairs(reference):
    summary, output, _ = reference
    rows = {frozenset((r["a"], r["b"])): r for r in summary["pairs"]}
    assert {frozenset(p) for p in summary["dependent_pairs"]} == EXPECTED
    assert summary["complete"] and summary["counts"] == {"models": 9, "pairs": 36, "done": 28, "error": 8}
    for pair, row in rows.items():
        if "broken" in pair:
            assert row["status"] == "error" and "broken failed" in row["error"] and row["dependent"] is None
            continue
        assert row["status"] == "done" and row["expected_dependent"] == (pair in EXPECTED)
        tests = row["tests"]
        assert tests["match"]["dependent"] == (pair in EXPECTED)  # MATCH: every relation, nothing else
        if pair in EXPECTED:
            assert tests["match"]["log10_pvalue"] < -10
        if "pruned2" in pair:
            assert "same architecture" in tests["l2"]["error"]  # L2 needs equal configs: recorded, not fatal
        elif pair in EXPECTED and "permrot1" not in pair:
            assert tests["l2"]["pvalue"] == pytest.approx(0.01)  # the smallest p of 99 draws
        csu_related = pair in EXPECTED and "permrot1" not in pair  # the rotation hides the weights from CSU
        assert tests["csu"]["dependent"] == csu_related
        assert not any(t.get("dependent") for t in tests.values()) or pair in EXPECTED
    broken = next(m for m in summary["models"] if m["name"] == "broken")
    assert broken["status"] == "error" and "mamba" in broken["error"]
    # every pair JSON is the usual results document, with the models' keys for resuming
    import jsonschema

    from jaxind.stats.results import RESULTS_SCHEMA

    for path in glob.glob(str(output / "pairs" / "*.json")):
        doc = json.loads(Path(path).read_text())
        jsonschema.validate(doc, RESULTS_SCHEMA)
        assert doc["schema_version"] == 2 and len(doc["sweep"]["model_keys"]) == 2


def test_each_model_is_converted_and_fingerprinted_once(reference):
    counters = reference[0]["counters"]
    assert counters["converted"] == {n: 1 for n in ZOO} and counters["fingerprinted"] == {n: 1 for n in ZOO}
    assert counters["model_error"] == {"broken": 1} and len(counters["pair"]) == 28
    assert set(counters["pair"].values()) == {1}


def test_fingerprints_give_the_one_pass_statistics(zoo, reference):
    """MATCH from two cached fingerprints equals MATCH from a pass over the tokens with both models."""
    from converters.sources import load_model
    from jaxind import TESTS, key_for

    _, output, cache = reference
    tokens = np.load(output / "tokens.npy")
    a, b = load_model(zoo.paths["base2"]), load_model(zoo.paths["pruned2"])
    direct = TESTS["match"](a, b, key=key_for(0, "match"), data=tokens)
    swept = json.loads((output / "pairs" / "base2__pruned2.json").read_text())["tests"]["match"]
    assert [r.statistic for r in direct.layers] == [l["statistic"] for l in swept["layers"]]
    assert direct.log10_pvalue == pytest.approx(swept["log10_pvalue"], rel=1e-12)
    # fingerprints on other tokens are refused, with the reason
    state = json.loads((output / "models" / "base2.json").read_text())
    fp = fingerprint.load(fingerprint.path_for(str(cache), state["fingerprint"]))
    other = fingerprint.compute(b.params, b.config, tokens[:, :8], range(2), name="pruned2")
    with pytest.raises(fingerprint.IncomparableError, match="different tokens .* incomparable"):
        fingerprint.pass_stats(fp, a.params, other, b.params, [(0, 0)])
    from jaxind.pair.token_data import TokenData

    with pytest.raises(fingerprint.IncomparableError, match="other tokens"):
        TokenData(tokens).add_fingerprint(b.params, other)


def _assert_same_results(mine: dict, theirs: dict) -> None:
    """Two summaries hold the same pairs, statuses and per-test p-values (None where a test did not
    run on a pair, e.g. L2 across widths: pytest.approx refuses None since pytest 9.2)."""
    assert mine["dependent_pairs"] == theirs["dependent_pairs"]
    assert len(mine["pairs"]) == len(theirs["pairs"])
    for got, want in zip(mine["pairs"], theirs["pairs"]):
        assert (got["a"], got["b"], got["status"]) == (want["a"], want["b"], want["status"])
        assert set(got["tests"]) == set(want["tests"])
        for test, entry in want["tests"].items():
            value, where = got["tests"][test]["log10_pvalue"], (want["a"], want["b"], test)
            assert (got["tests"][test]["error"] is None) == (entry["error"] is None), where
            if entry["log10_pvalue"] is None:
                assert value is None, where
            else:
                assert value == pytest.approx(entry["log10_pvalue"], rel=1e-9, abs=1e-12), where


def _tmp_entries(cache: Path) -> list[str]:
    return glob.glob(str(cache / "*" / ".tmp-*"))


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_same_results(zoo, reference, tmp_path):
    """kill -9 inside a fingerprint write, after a pair, before the summary; each rerun picks up where
    the last stopped. Final results equal the uninterrupted run's; nothing was computed twice."""
    summary, _, _ = reference
    output, cache = tmp_path / "out", tmp_path / "cache"
    argv = [f"--config={zoo.config_path}", f"--output={output}"]
    env = {"JAXIND_CACHE": str(cache), "JAXIND_COMPILATION_CACHE": str(tmp_path / "jax")}
    for point in ("fingerprint_writing:ft1", "pair_written:base1__ft2", "summary_writing"):
        frozen = Frozen("sweep", argv, point, str(tmp_path / "logs"), **env)
        try:
            if point.startswith("fingerprint_writing"):
                published = [n for n in os.listdir(cache / "fingerprints") if not n.startswith(".") and "." not in n]
                assert _tmp_entries(cache) and len(published) == 1  # base1's is done, ft1's half written
            frozen.kill()
        finally:
            frozen.close()
        if point.startswith("pair_written"):
            assert len(os.listdir(output / "pairs")) == 4 and not (output / "summary.json").exists()
    final = run_cli("sweep", argv, env=cli_env(**env))
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = json.loads((output / "summary.json").read_text())
    assert not _tmp_entries(cache)  # the killed writer's leftovers were removed
    _assert_same_results(resumed, summary)
    counters = resumed["counters"]
    assert counters["runs"] == 4
    assert counters["converted"] == {n: 1 for n in ZOO} and counters["fingerprinted"] == {n: 1 for n in ZOO}
    assert counters["pair"] == {f"{r['a']}__{r['b']}": 1 for r in summary["pairs"] if r["status"] == "done"}
    assert counters["pair_skipped"]["base1__ft1"] == 2  # finished before the second kill, skipped twice


@pytest.mark.slow
def test_shards_and_workers_compose(zoo, reference, tmp_path):
    """Two shards (one with two worker processes) into one folder give the uninterrupted results."""
    summary, _, cache = reference
    config = dataclasses.replace(sweep_config.load(zoo.config_path), cache_dir=str(cache))
    output = tmp_path / "sharded"
    first = sweep.run_sweep(config, str(output), shard=(0, 2), workers=2, log=lambda m: None)
    assert not first["complete"] and first["counts"]["pending"] > 0
    second = sweep.run_sweep(config, str(output), shard=(1, 2), log=lambda m: None)
    assert second["complete"] and second["dependent_pairs"] == summary["dependent_pairs"]
    assert set(second["counters"]["pair"].values()) == {1} and len(second["counters"]["pair"]) == 28
    assert second["counters"]["converted"] == {} and second["counters"]["fingerprinted"] == {}  # all cached


# --- issue 19: damaged pair JSONs, pairs where no test ran, alias bombs ---------------------------------------

DAMAGED = {
    "base1__ft1": "[]",  # valid JSON of the wrong shape
    "ind1__ind2": json.dumps({"tests": {"csu": {"log10_pvalue": "abc"}, "l2": {}, "match": {}}, "sweep": {}}),
    "base1__base2": json.dumps({"tests": {"csu": {"log10_pvalue": -1.0}}, "sweep": {}}),  # l2, match missing
}


def _damage(output: Path, reference_output: Path) -> None:
    """``output``: a copy of the reference sweep with three pair JSONs replaced and one cut short."""
    shutil.copytree(reference_output, output)
    for name, text in DAMAGED.items():
        (output / "pairs" / f"{name}.json").write_text(text)
    cut = output / "pairs" / "base2__ft2.json"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])


def test_damaged_pair_jsons_are_reported_then_recomputed(zoo, reference, tmp_path):
    """Summarising a sweep with damaged pair JSONs marks those pairs as errors that say so; a rerun
    computes them again (and only them) and ends with the uninterrupted run's results."""
    from jaxind.many import sweep_summary

    summary, reference_output, cache = reference
    config = dataclasses.replace(sweep_config.load(zoo.config_path), cache_dir=str(cache))
    output = tmp_path / "out"
    _damage(output, reference_output)
    damaged = {*DAMAGED, "base2__ft2"}
    rows = {f"{r['a']}__{r['b']}": r for r in sweep_summary.build(config, str(output))["pairs"]}
    for name, row in rows.items():
        if name in damaged:
            assert row["status"] == "error" and f"pairs/{name}.json is damaged" in row["error"], row
            assert row["log10_pvalue"] is None and row["dependent"] is None
    assert sum(r["status"] == "done" for r in rows.values()) == 28 - len(damaged)
    resumed = sweep.run_sweep(config, str(output), log=lambda m: None)
    _assert_same_results(resumed, summary)
    recomputed = {n: c for n, c in resumed["counters"]["pair"].items() if c > 1}
    assert recomputed == {n: 2 for n in damaged}  # once in the reference run, once here
    assert len(resumed["counters"]["pair_skipped"]) == 28 - len(damaged)


def test_a_pair_where_no_test_ran_is_not_done(zoo, reference, tmp_path):
    """Every test of a pair recorded as not run (e.g. none applies to the two architectures): the pair
    is an error with the tests' reasons, not a finished pair without a p-value."""
    from jaxind.many import sweep_summary

    _, reference_output, cache = reference
    config = sweep_config.load(zoo.config_path)
    output = tmp_path / "out"
    shutil.copytree(reference_output, output)
    path = output / "pairs" / "ft1__permrot1.json"
    doc = json.loads(path.read_text())
    for test, record in doc["tests"].items():
        record.update(pvalue=None, log10_pvalue=None, statistic=None, layers=[], error=f"{test} does not apply")
    path.write_text(json.dumps(doc))
    built = sweep_summary.build(config, str(output))
    row = next(r for r in built["pairs"] if (r["a"], r["b"]) == ("ft1", "permrot1"))
    assert row["status"] == "error" and row["log10_pvalue"] is None
    assert row["error"].startswith("no test gave a p-value") and "csu: csu does not apply" in row["error"]
    assert built["counts"]["done"] == 27 and ["ft1", "permrot1"] not in built["dependent_pairs"]


def test_an_alias_bomb_is_refused_within_a_second(tmp_path):
    """573 bytes whose nested YAML aliases expand to 9**9 strings: refused while reading, with the
    line of the first anchor (it hung the config check, which expanded them into an error message)."""
    import subprocess
    import sys

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    timed = (
        "import sys, time; from jaxind.many import sweep_config; start = time.perf_counter()\n"
        "try:\n    sweep_config.load(sys.argv[1])\nexcept sweep_config.SweepConfigError as e:\n"
        "    print(time.perf_counter() - start); print(e)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", timed, str(path)], capture_output=True, text=True, env=cli_env(), timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading a 573-byte sweep file took over 30 s")
    seconds, message = done.stdout.splitlines()
    assert float(seconds) < 1.0 and "line 2: YAML anchors and aliases (&name, *name) are not allowed" in message


def _references(zoo: Zoo, names: list[str], path: Path) -> str:
    path.write_text(yaml.safe_dump({"models": [{"name": n, "source": zoo.paths[n]} for n in names], "data": DATA}))
    return str(path)


def test_scan_ranks_the_true_base_first(zoo, reference, tmp_path):
    """A new fine-tune of base2 against six references: one conversion and one forward pass (the
    suspect's), the references' fingerprints from the sweep's cache, base2 first and alone dependent."""
    from helpers import SWEEP_CFG

    _, _, cache = reference
    base2 = numpy_params(SWEEP_CFG, seed=2)  # the zoo's base2
    suspect = save_jaxind(str(tmp_path / "suspect"), SWEEP_CFG, numpy_noise(base2, 99, 0.1), "suspect")
    refs = _references(zoo, ["base1", "ft1", "permrot1", "base2", "ind1", "ind2"], tmp_path / "refs.yaml")
    result = run_cli(
        "main",
        [f"--model_a={suspect}", f"--reference={refs}", f"--output={tmp_path / 'scan.json'}"],
        env=cli_env(JAXIND_CACHE=str(cache), JAXIND_COMPILATION_CACHE="off"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [l for l in result.stdout.splitlines() if re.match(r"^\s+\d+\. ", l)]
    assert len(lines) == 6 and lines[0].split()[1] == "base2" and " dependent " in lines[0]
    doc = json.loads((tmp_path / "scan.json").read_text())
    ranking = doc["ranking"]
    assert [r["name"] for r in ranking][0] == "base2" and ranking[0]["log10_pvalue"] < -50
    assert [r["dependent"] for r in ranking] == [True] + [False] * 5
    assert all(set(r) >= {"name", "source", "pvalue", "log10_pvalue", "dependent"} for r in ranking)
    assert doc["computed"] == {"converted": ["suspect"], "fingerprinted": ["suspect"]}


def test_scan_finds_nothing_for_an_independent_suspect(zoo, reference, tmp_path, monkeypatch):
    from helpers import SWEEP_CFG

    from jaxind.many import scan
    from jaxind.pair import runner

    _, _, cache = reference
    monkeypatch.setenv("JAXIND_CACHE", str(cache))
    suspect = save_jaxind(str(tmp_path / "stranger"), SWEEP_CFG, numpy_params(SWEEP_CFG, seed=77), "stranger")
    refs = scan.read_references(zoo.config_path)  # all eight zoo models (and the broken one)
    settings = runner.Settings(tests=("csu", "match"), num_perms=99)
    doc = scan.scan(suspect, refs, settings, log=lambda m: None)
    ranked = {r["name"]: r for r in doc["ranking"]}
    assert len([r for r in doc["ranking"] if r["error"] is None]) == 8 and ranked["broken"]["error"]
    assert not any(r["dependent"] for r in doc["ranking"])
    assert min(r["adjusted_log10_pvalue"] for r in doc["ranking"] if r["error"] is None) > np.log10(0.05)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is needed (Debian package chromium; .ci/run installs it)"
    return found


def _chromium_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(reference, tmp_path):
    from PIL import Image

    summary, output, _ = reference
    page = (output / "report.html").as_uri()
    dom = _chromium_run(tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = re.findall(r'<tr class="dependent-pair[^"]*" data-a="([^"]+)" data-b="([^"]+)"', dom.stdout)
    assert {frozenset(r) for r in rows} == EXPECTED and len(rows) == 6
    assert len(re.findall(r'<tr class="pair[ "]', dom.stdout)) == 36
    for a, b in rows:  # each dependent pair links its drill-down, which holds its per-layer p-values
        assert f'href="#pair-{a}__{b}"' in dom.stdout and f'id="pair-{a}__{b}"' in dom.stdout
    assert "http://" not in dom.stdout.replace("http://www.w3.org", "")  # self-contained
    shot = tmp_path / "report.png"
    taken = _chromium_run(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page)
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # something rendered
    names = {m["name"] for m in summary["models"]}
    pictures = [summary["report"]["graph"], *summary["report"]["heatmaps"].values()]
    assert set(summary["report"]["heatmaps"]) == {"pair", "csu", "l2", "match"}
    for picture in pictures:
        image = Image.open(output / picture)
        assert set(image.text["Models"].split(",")) == names and image.size[0] > 300
    order = summary["report"]["order"]  # related models sit together in the heatmaps
    for family in (["base1", "ft1", "permrot1"], ["base2", "ft2", "pruned2"]):
        positions = sorted(order.index(n) for n in family)
        assert positions[-1] - positions[0] == 2
    markdown = (output / "report.md").read_text()
    assert all(f"| {a} | {b} |" in markdown for a, b in rows)


def test_a_model_that_does_not_fit_the_cache_disk_is_refused_before_writing(zoo, tmp_path, monkeypatch):
    """The model cache stores a model only where the disk keeps 1 GiB free after it: otherwise OSError (ENOSPC,
    naming the sizes and JAXIND_CACHE), and nothing is left in the cache."""
    import errno

    from jaxind.many import modelstore

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(modelstore.shutil, "disk_usage", lambda _: usage._replace(free=2**30 + 1000))
    with pytest.raises(OSError, match="GiB in the model cache.*JAXIND_CACHE") as raised:
        modelstore.ensure("base1", zoo.paths["base1"], cache_root=str(tmp_path / "cache"))
    assert raised.value.errno == errno.ENOSPC
    assert [n for n in os.listdir(tmp_path / "cache" / "models") if not n.endswith(".lock")] == []


def test_a_damaged_fingerprint_and_tokens_file_are_rebuilt(zoo, reference, tmp_path, caplog):
    """Noise in a cached fingerprint's x.npy: the next sweep on that cache logs one warning naming it, computes
    it again and gives the reference MATCH p-value; tokens.npy overwritten with other ids: the next run logs one
    warning, makes the same tokens again and finds every pair finished."""
    import logging

    from jaxind.io import disk_cache

    _, ref_output, ref_cache = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache, ignore=shutil.ignore_patterns("jax"))
    names = ["base1", "ft1", "ind1"]
    state = json.loads((ref_output / "models" / "ft1.json").read_text())
    x_path = Path(fingerprint.path_for(str(cache), state["fingerprint"])) / "x.npy"
    x = np.load(x_path, mmap_mode="r+")
    x[...] = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    x.flush()
    del x
    getattr(disk_cache, "_verified", {}).clear()  # as in a new process
    body = yaml.safe_load(Path(zoo.config_path).read_text())
    body["models"] = [m for m in body["models"] if m["name"] in names]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(body))
    config = dataclasses.replace(sweep_config.load(str(tmp_path / "s.yaml")), cache_dir=str(cache))
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        sweep.run_sweep(config, str(output), log=lambda m: None)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and state["fingerprint"] in warnings[0] and "x.npy" in warnings[0], warnings
    for a, b in (("base1", "ft1"), ("ft1", "ind1")):
        got, want = (json.loads((o / "pairs" / f"{a}__{b}.json").read_text())["tests"] for o in (output, ref_output))
        assert got["match"]["log10_pvalue"] == want["match"]["log10_pvalue"], (a, b)
    tokens = np.load(output / "tokens.npy")
    np.save(output / "tokens.npy", (tokens + 1) % 64)
    caplog.clear()
    lines: list[str] = []
    with caplog.at_level(logging.WARNING):
        sweep.run_sweep(config, str(output), log=lines.append)
    assert [r.getMessage() for r in caplog.records if "tokens.npy is damaged" in r.getMessage()] != []
    np.testing.assert_array_equal(np.load(output / "tokens.npy"), tokens)
    assert "3 of 3 pairs already finished or blocked; 0 to run" in lines
