"""PERMTEST with a statistic of one's own (issue 17, point 1), through public names only: a plain function and a
precompute-and-draw pair run vmapped, chunked and sharded like the built-in "l2" and "mc" (two registered
statistics of the same protocol, their p-values unchanged); a bad statistic is one clear JaxindError."""

import doctest
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxind import JaxindError
from jaxind.models import symmetry
from jaxind.models.config import ModelConfig
from jaxind.stats import permtest, statistics

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(
    "qwen2",
    vocab_size=32,
    d_model=8,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=4,
    d_ff=16,
    qkv_bias=True,
    o_bias=True,
)
T = 31


def cosine(params_a, params_b):
    """Cosine similarity of the two flattened param trees (larger = more similar)."""
    leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
    dot = sum(jnp.vdot(x, y) for x, y in zip(leaves_a, leaves_b))
    norm_a = jnp.sqrt(sum(jnp.vdot(x, x) for x in leaves_a))
    norm_b = jnp.sqrt(sum(jnp.vdot(y, y) for y in leaves_b))
    return dot / (norm_a * norm_b)


def _cosine_draw(consts, perm, cfg):
    """The fast path: the cosine from L2's precomputed Grams, ``<A, p(B)> = (|A|^2 + |B|^2 - |A - p(B)|^2) / 2``."""
    _, minus_dist = permtest.l2_draw(consts, perm)
    inner = 0.5 * (consts.sq_a_total + consts.sq_b_total - minus_dist**2)
    return inner / jnp.sqrt(consts.sq_a_total * consts.sq_b_total)


FAST_COSINE = statistics.PermStatistic(
    name="cosine_fast", prepare=lambda a, b, cfg, tokens: permtest.l2_consts(a, b, cfg), draw=_cosine_draw
)


@pytest.fixture(scope="module")
def pair():
    """Two independent tiny models (norms and biases randomised too) and a related pair (B near A)."""
    a = random_params(CFG, 1, std=0.5, noise=0.1, noise_offset=10_000)
    b = random_params(CFG, 2, std=0.5, noise=0.1, noise_offset=10_000)
    return a, b


def loop_reference(a, b, key, num_perms):
    """The explicit Python loop: draw ``t`` is ``draw_permutations(fold_in(key, t))`` applied to B (one jitted
    step per draw)."""

    @jax.jit
    def step(t):
        perm = symmetry.draw_permutations(jax.random.fold_in(key, t), CFG)
        return cosine(a, symmetry.apply_permutation(b, CFG, perm))

    return float(cosine(a, b)), np.array([float(step(t)) for t in range(num_perms)])


KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def cosine_run(pair):
    """PERMTEST with the plain cosine function, T draws, on the default devices (one on CPU)."""
    return permtest.permtest(*pair, CFG, KEY, num_perms=T, statistic=cosine)


def test_custom_function_equals_an_explicit_loop_over_the_same_draws(pair, cosine_run):
    a, b = pair
    key, result = KEY, cosine_run
    stat0, stats = loop_reference(a, b, key, T)
    assert result.test == "cosine" and result.num_perms == T and result.exact
    np.testing.assert_allclose(result.stats, stats, rtol=1e-5)
    np.testing.assert_allclose(result.stat0, stat0, rtol=1e-6)
    exceed = int(np.sum(stats >= stat0))
    assert int(np.sum(result.stats >= result.stat0)) == exceed
    assert result.pvalue == (1 + exceed) / (T + 1)
    assert len(np.unique(result.stats)) == T  # the draws really differ
    # the fast path (precomputed Grams, no permuted model) gives the same draws and counts
    fast = permtest.permtest(a, b, CFG, key, num_perms=T, statistic=FAST_COSINE)
    np.testing.assert_allclose(fast.stats, stats, rtol=1e-4)
    assert fast.pvalue == result.pvalue and fast.test == "cosine_fast"
    # a registered name runs the same statistic
    statistics.register_statistic("test_cosine", cosine, overwrite=True)
    assert "test_cosine" in statistics.registered_statistics()[2:]
    named = permtest.permtest(a, b, CFG, key, num_perms=T, statistic="test_cosine")
    assert named.test == "test_cosine" and named.pvalue == result.pvalue
    np.testing.assert_array_equal(named.stats, result.stats)


def test_related_models_get_the_smallest_pvalue(pair):
    a, _ = pair
    near = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), a)
    result = permtest.permtest(a, near, CFG, jax.random.key(4), num_perms=T, statistic=cosine)
    assert result.pvalue == 1 / (T + 1)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_custom_statistic_on_8_devices_equals_one_device(pair, cosine_run):
    """The draws split over 8 devices, and chunked by the memory budget (one draw per device per step, 4 steps:
    a plain function's draw is budgeted at 3 copies of the model, the CPU budget shared by the 8 devices), give
    the counts the one-device run gives in one step."""
    a, b = pair
    on1 = cosine_run
    assert on1.num_perms == T and len(jax.devices()) >= 8
    budget = 8 * 3 * CFG.num_params() * 4
    on8 = permtest.permtest(
        a, b, CFG, KEY, num_perms=T, statistic=cosine, devices=jax.devices()[:8], memory_budget_bytes=budget
    )
    assert on8.pvalue == on1.pvalue and on8.log10_pvalue == on1.log10_pvalue
    np.testing.assert_allclose(on8.stats, on1.stats, rtol=1e-6)
    np.testing.assert_array_equal(on8.stats >= on8.stat0, on1.stats >= on1.stat0)


# Computed on main (482696d, before the protocol) with the same models, keys and T: the built-in statistics'
# p-values are bit for bit what they were, their statistics equal to float rounding.
MAIN_L2 = dict(pvalue=0.953125, log10=-0.020850138973119936, layers=[0.8125, 0.75], stat0=-30.21364402770996)
MAIN_L2_STATS = ([-29.823400497436523, -30.294918060302734, -30.16896629333496], -1870.4165897369385)
MAIN_MC = dict(pvalue=0.4375, log10=-0.359021942641668, stat0=-4.081754207611084)
MAIN_MC_STATS = ([-4.329313278198242, -4.355638027191162, -4.236049175262451], -62.703383445739746)


def test_builtin_statistics_are_registered_and_unchanged(pair):
    a, b = pair
    assert statistics.registered_statistics()[:2] == ("l2", "mc")
    assert statistics.resolve_statistic("l2") is permtest.L2 and permtest.L2.per_layer
    l2 = permtest.permtest(a, b, CFG, jax.random.key(3), num_perms=63)
    assert (l2.pvalue, l2.log10_pvalue) == (MAIN_L2["pvalue"], MAIN_L2["log10"])
    assert l2.pvalue_layers.tolist() == MAIN_L2["layers"]
    np.testing.assert_allclose(l2.stat0, MAIN_L2["stat0"], rtol=1e-6)
    np.testing.assert_allclose(l2.stats[:3], MAIN_L2_STATS[0], rtol=1e-6)
    np.testing.assert_allclose(l2.stats.sum(), MAIN_L2_STATS[1], rtol=1e-6)
    tokens = jax.random.randint(jax.random.key(7), (2, 6), 0, 32)
    mc = permtest.permtest(a, b, CFG, jax.random.key(4), num_perms=15, statistic="mc", tokens=tokens)
    assert (mc.test, mc.pvalue, mc.log10_pvalue) == ("mc", MAIN_MC["pvalue"], MAIN_MC["log10"])
    np.testing.assert_allclose(mc.stat0, MAIN_MC["stat0"], rtol=1e-6)
    np.testing.assert_allclose(mc.stats[:3], MAIN_MC_STATS[0], rtol=1e-6)
    np.testing.assert_allclose(mc.stats.sum(), MAIN_MC_STATS[1], rtol=1e-6)


def _vector(a, b):
    return jnp.stack([jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


def _integer(a, b):
    return jnp.sum(jax.tree.leaves(a)[0] > 0).astype(jnp.int32)


def _untraceable(a, b):
    return 1.0 if float(jnp.sum(jax.tree.leaves(a)[0])) > 0 else 0.0  # Python control flow on a tracer


def _bad_prepare_draw(consts, perm, cfg):
    return consts.gram_global[perm.resid]  # (d, d): not a scalar


BAD_DRAW = statistics.PermStatistic(
    name="bad_draw", prepare=lambda a, b, cfg, tokens: permtest.l2_consts(a, b, cfg), draw=_bad_prepare_draw
)


@pytest.mark.parametrize(
    "statistic, match",
    [
        (_vector, r"'_vector' must return one float scalar per draw .*got float32\[\d+\]"),
        (_integer, r"'_integer' must return one float scalar per draw .*got int32\[\]"),
        (_untraceable, r"'_untraceable' fails on one draw: ConcretizationTypeError"),
        (BAD_DRAW, r"'bad_draw' must return one float scalar per draw .*got float32\[8, 8\]"),
        ("cosine_typo", r"unknown PERMTEST statistic 'cosine_typo'; choose from \('l2', 'mc'"),
        (42, r"statistic= takes a name from \('l2', 'mc'.*got int"),
    ],
    ids=["vector", "integer", "untraceable", "prepare_draw_matrix", "unknown_name", "not_a_statistic"],
)
def test_a_bad_statistic_is_one_clear_error(pair, statistic, match):
    a, b = pair
    with pytest.raises(JaxindError, match=match) as info:
        permtest.permtest(a, b, CFG, jax.random.key(0), num_perms=3, statistic=statistic)
    assert "\n" not in str(info.value)


def test_bad_options_and_registrations_are_errors(pair):
    a, b = pair
    run = dict(params_a=a, params_b=b, cfg=CFG, key=jax.random.key(0), statistic=cosine)
    with pytest.raises(JaxindError, match="takes no layer selection"):
        permtest.permtest(**run, num_perms=3, layers=[0])
    with pytest.raises(JaxindError, match="takes no layer sharding"):
        permtest.permtest(**run, num_perms=4, layer_shards=2)
    with pytest.raises(JaxindError, match="num_perms must be an integer >= 1"):
        permtest.permtest(**run, num_perms=0)
    with pytest.raises(JaxindError, match="'l2' is a built-in PERMTEST statistic"):
        statistics.register_statistic("l2", cosine)
    statistics.register_statistic("test_taken", cosine, overwrite=True)
    with pytest.raises(JaxindError, match="already registered; pass overwrite=True"):
        statistics.register_statistic("test_taken", _vector)
    with pytest.raises(JaxindError, match="is a function .* or a PermStatistic"):
        statistics.register_statistic("test_number", 3)  # type: ignore[arg-type]
    nan = jax.tree.map(lambda x: x * jnp.nan, b)
    with pytest.raises(JaxindError, match="NaN or inf"):
        permtest.permtest(a, nan, CFG, jax.random.key(0), num_perms=3, statistic=cosine)


def test_readme_custom_statistic_example_runs_as_a_doctest():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "register_statistic" in b and ">>>" in b]
    assert blocks, "README has no doctested custom PERMTEST statistic"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(blocks[0], {}, "README", "README.md", 0)
    assert len(test.examples) >= 5
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)
