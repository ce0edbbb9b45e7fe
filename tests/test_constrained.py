"""Constrained-setting tests: calibration under the null, power on trained and real models,
and what the tests (correctly) cannot see."""

import jax
import numpy as np
import pytest
from scipy import stats

from jaxind.cli import demo
from jaxind.models import model, symmetry
from jaxind.models.config import ModelConfig
from jaxind.stats import constrained, divergence, permtest

TINY = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=48)


@pytest.mark.slow
def test_csu_calibrated_under_the_null():
    """200 independent random pairs: CSU p-values are uniform, false positives at 0.05 within
    the 99% binomial interval."""
    pvals = []
    for i in range(200):
        a = model.init_params(TINY, jax.random.key(2 * i))
        b = model.init_params(TINY, jax.random.key(2 * i + 1))
        pvals.append(constrained.csu(a, TINY, b, TINY, jax.random.key(10_000 + i)).pvalue)
    pvals = np.asarray(pvals)
    assert stats.kstest(pvals, "uniform").pvalue > 0.01
    lo, hi = stats.binom.interval(0.99, len(pvals), 0.05)
    assert lo <= (pvals <= 0.05).sum() <= hi


@pytest.mark.slow
def test_csu_calibrated_when_the_group_acts_at_random():
    """A fixed model A against independent models each hit by a random group element: still uniform."""
    a = model.init_params(TINY, jax.random.key(0))
    pvals = []
    for i in range(200):
        b = model.init_params(TINY, jax.random.key(1 + i))
        b = symmetry.apply_permutation(b, TINY, symmetry.draw_permutations(jax.random.key(5000 + i), TINY))
        pvals.append(constrained.csu(a, TINY, b, TINY, jax.random.key(9000 + i)).pvalue)
    assert stats.kstest(np.asarray(pvals), "uniform").pvalue > 0.01


@pytest.fixture(scope="module")
def zoo():
    return demo.build_zoo(seed=3, steps=60, finetune_steps=20, log=lambda *_: None)


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_power_on_trained_models(zoo):
    cfg, base = zoo["base"]
    _, finetuned = zoo["finetuned"]
    _, independent = zoo["independent"]
    dep = constrained.csu(base, cfg, finetuned, cfg, jax.random.key(0))
    assert dep.log10_pvalue < -10 and len(dep.layers) == cfg.n_layers
    assert all(r.statistic > 0.99 for r in dep.layers)
    ind = constrained.csu(base, cfg, independent, cfg, jax.random.key(0))
    assert ind.pvalue > 0.01
    t = 99
    l2 = permtest.permtest(base, finetuned, cfg, jax.random.key(1), num_perms=t)
    assert l2.pvalue == pytest.approx(1 / (t + 1))
    assert permtest.permtest(base, independent, cfg, jax.random.key(1), num_perms=t).pvalue > 0.01
    # CSU-all sees the same dependence, and says its p-value is heuristic.
    all_ = constrained.csu_all(base, cfg, finetuned, cfg, jax.random.key(2))
    assert all_.log10_pvalue < -10 and all_.exact is False
    assert {r.extra["param"] for r in all_.layers} >= {"layers.0.up", "layers.1.q"}


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_mode_connectivity_detects_the_fine_tune(zoo):
    cfg, base = zoo["base"]
    tokens = demo.corpus_bytes()[: 4 * 32].reshape(4, 32)
    t = 19
    dep = permtest.permtest(
        base, zoo["finetuned"][1], cfg, jax.random.key(3), num_perms=t, statistic="mc", tokens=tokens
    )
    assert dep.pvalue == pytest.approx(1 / (t + 1))
    ind = permtest.permtest(
        base, zoo["independent"][1], cfg, jax.random.key(3), num_perms=t, statistic="mc", tokens=tokens
    )
    assert ind.pvalue > 0.05


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_permuted_and_rotated_copy_escapes_the_weight_tests(zoo):
    """Expected and documented: the disguise scrambles the weight basis, so CSU (and L2) do not
    detect it; that is what MATCH is for."""
    cfg, base = zoo["base"]
    dcfg, disguised = zoo["permuted+rotated"]
    assert constrained.csu(base, cfg, disguised, dcfg, jax.random.key(0)).pvalue > 0.01


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_csh_detects_fine_tune_from_activations(zoo):
    from jaxind.models import layer_selection
    from jaxind.stats import grams

    cfg, base = zoo["base"]
    tokens = demo.corpus_bytes()[: 16 * 32].reshape(16, 32)
    results = {}
    for name in ("finetuned", "independent"):
        _, other = zoo[name]
        pairs = layer_selection.default_pairs(cfg, cfg)
        stats = grams.accumulate(
            base,
            cfg,
            other,
            cfg,
            [tokens],
            layers_a=(0, 1, 2, 3),
            layers_b=(0, 1, 2, 3),
            pair_index=tuple((i, i) for i in range(4)),
        )
        results[name] = constrained.csh_from_pass(stats, list(pairs), jax.random.key(0))
    assert results["finetuned"].log10_pvalue < -10
    assert results["independent"].pvalue > 0.01


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_jsd_is_zero_for_the_same_function_and_positive_otherwise(zoo):
    from jaxind.io.token_source import batches

    cfg, base = zoo["base"]
    dcfg, disguised = zoo["permuted+rotated"]
    _, finetuned = zoo["finetuned"]
    tokens = demo.corpus_bytes()[: 8 * 32].reshape(8, 32)
    f = model.forward_logits
    same = divergence.jsd(f(finetuned, cfg), f(disguised, dcfg), batches(tokens, 4), 256)
    assert same.pvalue is None and same.statistic < 1e-6  # the group leaves outputs unchanged
    assert divergence.jsd(f(base, cfg), f(finetuned, cfg), batches(tokens, 4), 256).statistic > 1e-3


@pytest.mark.slow
def test_real_smollm2_fine_tune_is_detected(smollm2, smollm2_finetuned):
    """A few real optimisation steps on real text (the bundled corpus, SmolLM2's tokenizer)."""
    tuned = smollm2_finetuned
    csu = constrained.csu(smollm2.params, smollm2.config, tuned, smollm2.config, jax.random.key(0))
    assert csu.log10_pvalue < -10
    t = 49
    l2 = permtest.permtest(smollm2.params, tuned, smollm2.config, jax.random.key(1), num_perms=t)
    assert l2.pvalue == pytest.approx(1 / (t + 1))


@pytest.mark.slow  # trains the model zoo (module fixture)
def test_match_on_the_trained_zoo(zoo):
    """MATCH sees through the disguise that defeats CSU, and stays quiet on the independent model."""
    from jaxind.stats import match

    cfg, base = zoo["base"]
    tokens = demo.corpus_bytes()[: 16 * 32].reshape(16, 32)
    out = {
        name: match.match_test(base, cfg, zoo[name][1], zoo[name][0], [tokens], key=jax.random.key(4))
        for name in ("finetuned", "independent", "permuted+rotated")
    }
    assert out["finetuned"].log10_pvalue < -10
    assert out["permuted+rotated"].log10_pvalue < -10
    assert out["independent"].pvalue > 0.01


def test_csu_refuses_models_of_different_width():
    other = TINY.replace(d_model=24, head_dim=12)
    from jaxind.errors import JaxindError

    with pytest.raises(JaxindError, match="match"):
        constrained.csu(
            model.init_params(TINY, jax.random.key(0)),
            TINY,
            model.init_params(other, jax.random.key(1)),
            other,
            jax.random.key(2),
        )
