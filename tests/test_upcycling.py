"""Dense vs mixture of experts (sparse upcycling) and MoEs of different expert counts: jaxind.stats.upcycling."""

import json
import math

import jax
import numpy as np
import pytest
from helpers import numpy_params

import jaxind
from jaxind.models import model
from jaxind.pair.registry import TESTS, key_for
from jaxind.pair.token_data import TokenData
from jaxind.stats import upcycling

DENSE = jaxind.ModelConfig("llama", 64, 16, 2, 4, 2, 4, 20)
TOKENS = np.asarray(jax.random.randint(jax.random.key(2), (4, 16), 0, 64))
ACTIVATION_TESTS = ("csu", "csh", "match")


@pytest.fixture(scope="module")
def zoo():
    """A random dense model, its sparse upcycle into 4 experts (copies + 30% noise, random router), an upcycle into 8
    experts with other noise, and an independently initialised MoE of the upcycle's config."""
    dense = numpy_params(DENSE, 0)
    up4, cfg4 = upcycling.sparse_upcycle(dense, DENSE, 1, n_experts=4, noise=0.3)
    up8, cfg8 = upcycling.sparse_upcycle(dense, DENSE, 3, n_experts=8, noise=0.3)
    other = numpy_params(cfg4, 5)
    return {
        "dense": jaxind.from_params(DENSE, dense),
        "up4": jaxind.from_params(cfg4, up4),
        "up8": jaxind.from_params(cfg8, up8),
        "other": jaxind.from_params(cfg4, other),
    }


def _run(a, b, tests=ACTIVATION_TESTS):
    data = TokenData(TOKENS)  # CSH and MATCH share one pass
    return {name: TESTS[name](a, b, key=key_for(0, name), data=data) for name in tests}


def test_sparse_upcycle_copies_the_mlp_into_every_expert(zoo):
    dense, up4 = zoo["dense"], zoo["up4"]
    cfg = up4.config
    assert cfg.moe and (cfg.n_experts, cfg.d_expert, cfg.d_ff) == (4, DENSE.d_ff, 0)
    exact, _ = upcycling.sparse_upcycle(dense.params, DENSE, 1, n_experts=4)
    for e in range(4):  # without noise every expert is the dense MLP: the MoE computes the dense model's function
        np.testing.assert_array_equal(exact["layers"]["expert_up"][:, e], dense.params["layers"]["up"])
    np.testing.assert_allclose(
        jaxind.from_params(cfg, exact).logits(TOKENS), dense.logits(TOKENS), rtol=2e-4, atol=2e-4
    )
    with pytest.raises(jaxind.JaxindError, match="dense llama"):
        upcycling.sparse_upcycle(up4.params, cfg)


def test_upcycled_experts_are_detected_each_and_overall(zoo):
    """Dense vs its upcycle: CSU, CSH and MATCH reject overall and for every expert of every layer, and the map
    names each expert as derived from the dense MLP of its layer; the results JSON carries both."""
    for name, result in _run(zoo["dense"], zoo["up4"]).items():
        assert result.error is None and result.log10_pvalue < -10, (name, result.log10_pvalue)
        assert result.exact == (name != "match") and len(result.layers) == DENSE.n_layers
        for record in result.layers:
            pairs = record.extra["block_pairs"]
            assert [(p["expert_a"], p["expert_b"]) for p in pairs] == [("mlp", e) for e in range(4)]
            assert all(p["log10_pvalue"] < -5 for p in pairs), (name, record.layer_a, pairs)
        derived = {(d["layer_a"], d["layer_b"], d["expert_a"], d["expert_b"]) for d in result.extra["derived_experts"]}
        assert derived == {(l, l, "mlp", e) for l in range(DENSE.n_layers) for e in range(4)}, name
        doc = json.loads(json.dumps(result.to_json()))
        assert doc["derived_experts"][0]["expert_a"] == "mlp" and doc["layers"][0]["part"] == "blocks"
    reverse = _run(zoo["up4"], zoo["dense"], ("csu",))["csu"]  # the MoE as model A: the same test, mirrored
    assert reverse.log10_pvalue < -10 and reverse.extra["derived_experts"][0]["expert_b"] == "mlp"


def test_an_independent_moe_is_not_rejected(zoo):
    for name, result in _run(zoo["dense"], zoo["other"]).items():
        assert result.pvalue > 0.01 and result.extra["derived_experts"] == [], (name, result.pvalue)


def test_moes_of_different_expert_counts_compare_every_expert_pair(zoo):
    """Two upcycles of one dense model (4 and 8 experts) share every expert's origin: all 32 expert pairs per layer
    are tested and found; an independent MoE against the 8-expert upcycle is not rejected."""
    result = _run(zoo["up4"], zoo["up8"], ("csu",))["csu"]
    assert result.log10_pvalue < -10 and len(result.layers[0].extra["block_pairs"]) == 32
    assert len(result.extra["derived_experts"]) == 32 * DENSE.n_layers
    assert _run(zoo["other"], zoo["up8"], ("csu",))["csu"].pvalue > 0.01
    same = _run(zoo["up4"], zoo["other"], ("csu",))["csu"]  # equal expert counts keep jaxind.stats.experts' matching
    assert {r.extra["part"] for r in same.layers} == {"experts", "expert"}


def test_layer_combination_is_calibrated_and_survives_underflow():
    """Sidak over uniform per-expert p-values is uniform (dense vs MoE); with Bonferroni over the smaller side
    it stays valid (at most alpha); log10 p-values far below float64 stay finite and ordered."""
    from scipy import stats

    rng = np.random.default_rng(0)
    one = [upcycling.combine_layer(np.log10(rng.uniform(size=(1, 8))))[0] for _ in range(3000)]
    assert stats.kstest(10.0 ** np.asarray(one), "uniform").pvalue > 0.01
    two = np.asarray([upcycling.combine_layer(np.log10(rng.uniform(size=(4, 8))))[0] for _ in range(3000)])
    assert np.mean(two <= math.log10(0.05)) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 3000)
    assert upcycling.sidak_log10(math.log10(0.2), 3) == pytest.approx(math.log10(1 - 0.8**3))
    assert upcycling.sidak_log10(-400.0, 8) == pytest.approx(-400.0 + math.log10(8))
    logs = np.full((1, 4), -0.1)
    logs[0, 2] = -5000.0
    assert upcycling.combine_layer(logs) == (pytest.approx(-5000.0 + math.log10(4)), (0, 2))


@pytest.mark.slow
def test_calibration_dense_vs_independent_moe():
    """100 independent dense/MoE pairs (one layer of 4 experts of width 12 against a dense MLP of width 20: the
    per-layer Bonferroni + Sidak combination is what is new): CSU, CSH and MATCH p-values pass a KS uniformity
    test. One compiled function per shape, reused across pairs."""
    from scipy import stats

    from jaxind.stats import experts

    dense_cfg = DENSE.replace(n_layers=1)
    moe_cfg = dense_cfg.replace(family="mixtral", d_ff=0, n_experts=4, experts_per_token=2, d_expert=12)
    init_dense = jax.jit(lambda k: model.init_params(dense_cfg, k, std=0.3))
    init_moe = jax.jit(lambda k: model.init_params(moe_cfg, k, std=0.3))
    pairs = ((0, 0),)
    pvals: dict[str, list[float]] = {name: [] for name in ACTIVATION_TESTS}
    for s in range(100):
        a, b = init_dense(jax.random.key(30_000 + 2 * s)), init_moe(jax.random.key(30_001 + 2 * s))
        key = jax.random.key(s)
        pvals["csu"].append(upcycling.csu(a, dense_cfg, b, moe_cfg, key).pvalue)
        stats_ab = experts.pass_for_pairs(a, dense_cfg, b, moe_cfg, [TOKENS], pairs)
        pvals["csh"].append(upcycling.csh_from_pass(a, dense_cfg, b, moe_cfg, stats_ab, pairs, key).pvalue)
        pvals["match"].append(upcycling.match_from_pass(a, dense_cfg, b, moe_cfg, stats_ab, pairs, key).pvalue)
    for name, values in pvals.items():
        assert stats.kstest(values, "uniform").pvalue > 0.01, name


@pytest.mark.slow  # one CLI subprocess
def test_cli_on_a_dense_model_and_its_upcycle(tmp_path, zoo):
    import jsonschema
    from helpers import run_module, save_jaxind

    from jaxind.stats.results import RESULTS_SCHEMA

    dense = save_jaxind(str(tmp_path / "dense"), DENSE, zoo["dense"].params, "dense")
    up = save_jaxind(str(tmp_path / "up"), zoo["up4"].config, zoo["up4"].params, "up4")
    out = tmp_path / "r.json"
    r = run_module("jaxind.main", f"--model_a={dense}", f"--model_b={up}", "--tests=csu,match",
                   "--num_sequences=4", "--seq_len=16", f"--output={out}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "csu: 8 MLP block pairs derived" in r.stdout and "<- A layer   1 MLP" in r.stdout  # the report names them
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, RESULTS_SCHEMA)
    for name in ("csu", "match"):
        test = doc["tests"][name]
        assert test["error"] is None and test["log10_pvalue"] < -10, name
        named = {(d["layer_b"], d["expert_a"], d["expert_b"]) for d in test["derived_experts"]}
        assert named == {(l, "mlp", e) for l in range(DENSE.n_layers) for e in range(4)}, name
