"""The library API: every registered test called one way returns the same fields, results JSON
validates against its schema, per-test keys, shared passes, layer selections."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jsonschema
import numpy as np
import pytest
from helpers import REPO, perturb

from jaxind.errors import JaxindError
from jaxind.io.loaded_model import from_params
from jaxind.models import layer_selection, model
from jaxind.models.config import ModelConfig
from jaxind.pair import registry, runner
from jaxind.pair.registry import TESTS, key_for
from jaxind.stats import grams, results
from jaxind.stats.results import RESULTS_SCHEMA, TEST_SCHEMA, TestResult

CFG = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
# Small options so that every test runs in seconds on tiny models.
FAST = {
    "l2": {"num_perms": 19},
    "mc": {"num_perms": 9, "mc_sequences": 2},
    "generalized": {"steps": 50, "num_inputs": 256, "batch_size": 64},
}
EXACT = {
    "csu": True,
    "csh": True,
    "l2": True,
    "mc": True,
    "csu_all": False,
    "jsd": False,
    "match": False,
    "localized": False,
    "generalized": False,
    "csu_aligned": True,
}


@pytest.fixture(scope="module")
def pair():
    params = model.init_params(CFG, jax.random.key(0))
    a = from_params(CFG, params, "a")
    b = from_params(CFG, perturb(params, jax.random.key(1)), "b")  # a fine-tune stand-in
    return a, b


@pytest.fixture(scope="module")
def tokens():
    return np.asarray(jax.random.randint(jax.random.key(2), (8, 16), 0, CFG.vocab_size), np.int32)


@pytest.fixture(scope="module")
def every_result(pair, tokens):
    a, b = pair
    return {name: spec(a, b, key=key_for(0, name), data=tokens, **FAST.get(name, {})) for name, spec in TESTS.items()}


def test_every_registered_test_returns_the_same_fields(every_result):
    assert set(every_result) == set(TESTS) == set(EXACT)
    core = set(TEST_SCHEMA["required"])
    for name, result in every_result.items():
        assert isinstance(result, TestResult) and result.test == name and result.error is None
        record = result.to_json()
        assert core <= set(record), name
        jsonschema.validate(record, TEST_SCHEMA)
        json.dumps(record)
        assert result.exact is EXACT[name] and result.seconds > 0, name
        if name == "jsd":
            assert result.pvalue is None and result.statistic > 0
            continue
        assert 0 <= result.pvalue <= 1 and np.isfinite(result.log10_pvalue), name
        if TESTS[name].layerwise:
            assert result.layers and all({"layer_a", "layer_b", "statistic"} <= set(r.to_json()) for r in result.layers)


def test_the_fine_tune_stand_in_is_detected(every_result):
    for name in ("csu", "csh", "l2", "match", "localized", "csu_all", "csu_aligned"):
        assert every_result[name].log10_pvalue <= np.log10(0.05) + 1e-12, name  # l2: 1/(19 + 1) at best


def test_results_document_validates_and_the_schema_bites(pair, tmp_path):
    a, b = pair
    settings = runner.Settings(
        tests=("csu", "jsd", "match", "l2"), num_perms=19, data=runner.data.DataSpec(num_sequences=4, seq_len=8)
    )
    doc = runner.run_pair(a, b, settings, log=lambda _: None).to_json()
    path = tmp_path / "r.json"
    results.write_json(str(path), doc)
    written = json.loads(path.read_text())
    jsonschema.validate(written, RESULTS_SCHEMA)
    assert written["schema_version"] == results.SCHEMA_VERSION == 2
    assert written["tests"]["l2"]["num_perms"] == 19
    broken = json.loads(path.read_text())
    del broken["tests"]["csu"]["log10_pvalue"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RESULTS_SCHEMA)
    broken = json.loads(path.read_text())
    broken["tests"]["match"]["layers"][0]["pvalue"] = 2.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RESULTS_SCHEMA)


def test_a_failed_test_is_a_record_with_the_same_fields(pair):
    a, _ = pair
    other_cfg = CFG.replace(d_model=24, head_dim=12)
    other = from_params(other_cfg, model.init_params(other_cfg, jax.random.key(3)))
    settings = runner.Settings(tests=("csu", "l2"), data=runner.data.DataSpec(num_sequences=2, seq_len=8))
    doc = runner.run_pair(a, other, settings, log=lambda _: None).to_json()
    jsonschema.validate(doc, RESULTS_SCHEMA)
    assert "same residual width" in doc["tests"]["csu"]["error"] and doc["tests"]["csu"]["pvalue"] is None
    assert "same architecture" in doc["tests"]["l2"]["error"]


def test_per_test_keys_depend_on_the_name_only(pair, monkeypatch):
    keys = {name: np.asarray(jax.random.key_data(key_for(0, name))).tolist() for name in TESTS}
    assert len({json.dumps(k) for k in keys.values()}) == len(TESTS)  # distinct per test
    monkeypatch.setattr(registry, "TESTS", {})  # a registry with other tests gives the same keys
    assert all(np.asarray(jax.random.key_data(key_for(0, n))).tolist() == k for n, k in keys.items())
    monkeypatch.undo()
    # The runner uses exactly that key: l2's draws equal a direct call with key_for(seed, "l2").
    a, b = pair
    settings = runner.Settings(tests=("csu", "l2"), num_perms=19, data=runner.data.DataSpec(num_sequences=2, seq_len=8))
    doc = runner.run_pair(a, b, settings, log=lambda _: None).to_json()
    direct = TESTS["l2"](a, b, key=key_for(0, "l2"), num_perms=19)
    assert doc["tests"]["l2"]["null_mean"] == pytest.approx(direct.extra["null_mean"], rel=1e-12)


def test_csh_and_match_share_one_pass(pair, monkeypatch):
    calls = []
    accumulate = grams.accumulate
    monkeypatch.setattr(grams, "accumulate", lambda *args, **kw: calls.append(1) or accumulate(*args, **kw))
    a, b = pair
    settings = runner.Settings(tests=("csh", "match"), data=runner.data.DataSpec(num_sequences=4, seq_len=8))
    doc = runner.run_pair(a, b, settings, log=lambda _: None).to_json()
    assert len(calls) == 1 and doc["tests"]["csh"]["num_tokens"] == doc["tests"]["match"]["num_tokens"] == 32


def test_layer_selections(pair, tokens):
    a, b = pair
    k = jax.random.key(4)
    assert [(r.layer_a, r.layer_b) for r in TESTS["csu"](a, b, key=k, layers=[1]).layers] == [(1, 1)]
    assert [(r.layer_a, r.layer_b) for r in TESTS["match"](a, b, key=k, data=tokens, layers=[(1, 0)]).layers] == [
        (1, 0)
    ]
    loc = TESTS["localized"](a, b, key=k, data=tokens, layers=[0])
    assert np.asarray(loc.extra["log10_pvalue_matrix"]).shape == (1, 1)
    # L2 over one layer is that layer's own PERMTEST: the same p-value as its per-layer record.
    whole = TESTS["l2"](a, b, key=k, num_perms=19)
    one = TESTS["l2"](a, b, key=k, num_perms=19, layers=[1])
    assert [r.layer_a for r in one.layers] == [1] and one.pvalue == whole.layers[1].pvalue
    with pytest.raises(layer_selection.LayerSelectionError, match="out of range"):
        TESTS["csu"](a, b, key=k, layers=[2])
    with pytest.raises(layer_selection.LayerSelectionError, match="cannot compare pairs"):
        TESTS["l2"](a, b, key=k, layers=[(0, 1)])
    with pytest.raises(JaxindError, match="takes no layer selection"):
        TESTS["jsd"](a, b, key=k, data=tokens, layers=[0])
    with pytest.raises(JaxindError, match="pass data="):
        TESTS["match"](a, b, key=k)


@pytest.mark.parametrize("text,expected", [("0,5,14", (0, 5, 14)), ("10:13", (10, 11, 12)), ("0, 2:4,0", (0, 2, 3))])
def test_parse_layers(text, expected):
    assert layer_selection.parse_layers(text) == expected


@pytest.mark.parametrize("text", ["1x", "-1", "5:5", "", "3:y"])
def test_parse_layers_refuses(text):
    with pytest.raises(layer_selection.LayerSelectionError, match="--layers"):
        layer_selection.parse_layers(text)


def test_parse_layer_pairs():
    assert layer_selection.parse_layer_pairs("14:14,3:5") == ((14, 14), (3, 5))
    for bad in ("3", "3:x", "1:2,,"):
        with pytest.raises(layer_selection.LayerSelectionError, match="--layer_pairs"):
            layer_selection.parse_layer_pairs(bad)


README = Path(REPO) / "README.md"


def test_readme_test_table_is_the_registry():
    text = README.read_text()
    table = re.search(r"<!-- tests-table -->\n(.*?)\n<!-- /tests-table -->", text, re.S)
    assert table is not None and table.group(1) == registry.markdown_table()


def test_readme_library_example_runs(monkeypatch, capsys):
    """The README's library example, verbatim, on tiny 12-layer models instead of the sources it names."""
    from converters import sources

    code = re.search(r"## Library\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    cfg = CFG.replace(n_layers=12, vocab_size=128)
    params = model.init_params(cfg, jax.random.key(5))
    fakes = iter([from_params(cfg, params, "a"), from_params(cfg, perturb(params, jax.random.key(6)), "b")])
    monkeypatch.setattr(sources, "load_model", lambda source, **kw: next(fakes))
    exec(compile(code, "README.md", "exec"), {})
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) >= 5 and all(line[0] in TESTS for line in lines)
    assert len({line[0] for line in lines}) >= 4  # several tests, one signature


def test_run_pair_returns_a_typed_result_whose_json_round_trips(pair):
    from jaxind.pair.report import format_table
    from jaxind.pair.result import PairResult

    a, b = pair
    settings = runner.Settings(
        tests=("csu", "jsd", "l2"), num_perms=19, data=runner.data.DataSpec(num_sequences=2, seq_len=8)
    )
    result = runner.run_pair(a, b, settings, log=lambda _: None)
    assert isinstance(result, PairResult) and result.timing is None
    assert result.tests["csu"].log10_pvalue < -5 and result.tests["jsd"].pvalue is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.alpha = 0.01  # type: ignore[misc]
    doc = result.to_json()
    jsonschema.validate(doc, RESULTS_SCHEMA)
    back = PairResult.from_json(json.loads(json.dumps(doc)))
    assert back.to_json() == doc and back.tests["l2"].extra["num_perms"] == 19
    assert format_table(back) == format_table(doc) == format_table(result)
    with pytest.warns(DeprecationWarning, match="PairResult"):
        assert result["tests"]["csu"]["log10_pvalue"] == doc["tests"]["csu"]["log10_pvalue"]
    with pytest.raises(JaxindError, match="schema version 1"):
        PairResult.from_json({**doc, "schema_version": 1})
    with pytest.raises(JaxindError, match="without seed"):
        PairResult.from_json({k: v for k, v in doc.items() if k != "seed"})
