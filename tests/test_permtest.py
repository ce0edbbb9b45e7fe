"""PERMTEST kernel: equals the loop reference, independent of device count and chunking,
detects dependence, and is calibrated under simulated nulls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import near_copy, random_params
from scipy import stats

from jaxind.errors import JaxindError
from jaxind.models.config import ModelConfig
from jaxind.models.model import forward_jit, init_params
from jaxind.stats import permtest as permtest_lib
from jaxind.stats.permtest import permtest, permtest_loop

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
TIED = ModelConfig(
    "llama", vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, tie_embeddings=True
)
GPT2 = ModelConfig(
    "gpt2",
    vocab_size=32,
    d_model=8,
    n_layers=2,
    n_heads=2,
    n_kv_heads=2,
    head_dim=4,
    d_ff=16,
    tie_embeddings=True,
    qkv_bias=True,
    o_bias=True,
    mlp_act="gelu_tanh",
    glu=False,
    norm_kind="layer",
    max_positions=8,
    mlp_bias=True,
)
TOKENS = jax.random.randint(jax.random.key(7), (2, 6), 0, 32)
T_SMALL = 31  # draws for the equality tests (one compiled shape on 1 and 8 devices)


def model(cfg, seed):
    """Independent random model; norms and biases randomised too (iid, so the null holds)."""
    return random_params(cfg, seed, std=0.5, noise=0.1, noise_offset=10_000)


@pytest.mark.parametrize("cfg", [CFG, TIED, GPT2], ids=["qwen2_biases", "llama_tied", "gpt2"])
def test_kernel_equals_loop_l2(cfg):
    a, b = model(cfg, 1), model(cfg, 2)
    key = jax.random.key(3)
    kern = permtest(a, b, cfg, key, num_perms=T_SMALL)
    loop = permtest_loop(a, b, cfg, key, num_perms=T_SMALL)
    assert kern.stats.shape == (T_SMALL,) and kern.stats_layers.shape == (T_SMALL, cfg.n_layers)
    np.testing.assert_allclose(kern.stats, loop.stats, rtol=2e-5)
    np.testing.assert_allclose(kern.stats_layers, loop.stats_layers, rtol=2e-5)
    assert kern.stat0 == loop.stat0
    assert kern.pvalue == loop.pvalue
    np.testing.assert_array_equal(kern.pvalue_layers, loop.pvalue_layers)
    assert len(np.unique(kern.stats)) == T_SMALL  # the draws really differ


def test_kernel_equals_loop_mc():
    a, b = model(CFG, 4), model(CFG, 5)
    key = jax.random.key(6)
    kern = permtest(a, b, CFG, key, num_perms=15, statistic="mc", tokens=TOKENS)
    loop = permtest_loop(a, b, CFG, key, num_perms=15, statistic="mc", tokens=TOKENS)
    np.testing.assert_allclose(kern.stats, loop.stats, rtol=1e-5)
    assert kern.pvalue == loop.pvalue and kern.stats_layers is None
    assert np.all(kern.stats < 0)  # minus a cross-entropy


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
@pytest.mark.parametrize("statistic", ["l2", "mc"])
def test_same_result_on_1_and_8_devices(statistic):
    a, b = model(CFG, 8), model(CFG, 9)
    key = jax.random.key(10)
    kwargs = dict(num_perms=T_SMALL if statistic == "l2" else 15, statistic=statistic, tokens=TOKENS)
    on8 = permtest(a, b, CFG, key, devices=jax.devices()[:8], **kwargs)
    on1 = permtest(a, b, CFG, key, devices=jax.devices()[:1], **kwargs)
    assert on8.pvalue == on1.pvalue and on8.log10_pvalue == on1.log10_pvalue
    np.testing.assert_allclose(on8.stats, on1.stats, rtol=1e-6)
    if statistic == "l2":
        np.testing.assert_array_equal(on8.pvalue_layers, on1.pvalue_layers)
        # the layers split over the 8 devices give the same counts as well
        layers8 = permtest(a, b, CFG, key, devices=jax.devices()[:8], layer_shards=8, **kwargs)
        assert layers8.pvalue == on1.pvalue
        np.testing.assert_array_equal(layers8.pvalue_layers, on1.pvalue_layers)
    # a different seed gives different draws
    other = permtest(a, b, CFG, jax.random.key(11), devices=jax.devices()[:1], **kwargs)
    assert not np.allclose(other.stats, on1.stats)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_cpu_draws_run_on_one_device_per_process_by_default():
    """A process's CPU devices share its memory and cores: by default PERMTEST-L2 draws on one of them (one copy of
    the constants, no collectives), with the counts the 8-device meshes give."""
    from jaxind.stats.permtest import default_draw_devices

    assert default_draw_devices(jax.devices()[:8]) == [jax.devices()[0]]
    a, b = model(CFG, 8), model(CFG, 9)
    key = jax.random.key(10)
    auto = permtest(a, b, CFG, key, num_perms=T_SMALL)
    for layer_shards in (1, 8):
        on8 = permtest(a, b, CFG, key, num_perms=T_SMALL, devices=jax.devices()[:8], layer_shards=layer_shards)
        assert on8.pvalue == auto.pvalue
        np.testing.assert_array_equal(on8.pvalue_layers, auto.pvalue_layers)


def test_chunking_does_not_change_results():
    a, b = model(CFG, 12), model(CFG, 13)
    key = jax.random.key(14)
    whole = permtest(a, b, CFG, key, num_perms=T_SMALL, devices=jax.devices()[:1])
    chunked = permtest(a, b, CFG, key, num_perms=T_SMALL, devices=jax.devices()[:1], chunk_size=4)
    np.testing.assert_allclose(chunked.stats, whole.stats, rtol=1e-6)
    np.testing.assert_allclose(chunked.stats_layers, whole.stats_layers, rtol=1e-6)
    assert chunked.pvalue == whole.pvalue


def test_one_device_consts_and_cpu_chunks_change_nothing():
    """On one device the L2 constants come from one program (``l2_consts``): bit-identical to the layer-by-layer
    build the mesh path uses; and the CPU's default chunk (``CPU_L2_CHUNK``) gives the same draws, statistics and
    counts as one chunk holding every draw."""
    a, b = model(CFG, 15), model(CFG, 16)
    one = permtest_lib.make_mesh(jax.devices()[:1])
    fast = permtest_lib._place_consts("l2", a, b, CFG, None, one)
    two = permtest_lib.make_mesh(jax.devices()[:2], layer_shards=2)  # conftest: 8 CPU devices
    slow = permtest_lib._place_consts("l2", a, b, CFG, None, two)  # built layer by layer, split over 2 devices
    for name, x, y in zip(permtest_lib.L2Consts._fields, fast, slow):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), name)
    key = jax.random.key(17)
    default = permtest(a, b, CFG, key, num_perms=3 * permtest_lib.CPU_L2_CHUNK + 1, devices=jax.devices()[:1])
    whole = permtest(
        a, b, CFG, key, num_perms=3 * permtest_lib.CPU_L2_CHUNK + 1, devices=jax.devices()[:1], chunk_size=64
    )
    np.testing.assert_allclose(default.stats, whole.stats, rtol=1e-6)
    assert default.pvalue == whole.pvalue and default.stat0 == whole.stat0
    np.testing.assert_array_equal(default.pvalue_layers, whole.pvalue_layers)
    np.testing.assert_array_equal(default.stats >= default.stat0, whole.stats >= whole.stat0)


def greedy_tokens(params, cfg, n_seq=2, length=6):
    """Sequences the model itself continues greedily (it has a low loss on them), so that
    mode connectivity has something to lose."""
    tokens = jnp.arange(n_seq, dtype=jnp.int32)[:, None] % cfg.vocab_size
    for _ in range(length - 1):
        logits, _ = forward_jit(params, cfg, tokens)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)], axis=1)
    return tokens


def test_near_copy_is_detected_l2():
    a = model(CFG, 15)
    b = near_copy(a, 16)
    res = permtest(a, b, CFG, jax.random.key(17), num_perms=99)
    assert res.pvalue == pytest.approx(1 / 100)
    assert res.log10_pvalue == pytest.approx(-2.0)
    assert res.stat0 > res.stats.max()
    np.testing.assert_allclose(res.pvalue_layers, 1 / 100)
    # the observed distance is computed directly: tiny, not lost to cancellation
    assert -0.5 < res.stat0 < 0


def test_near_copy_is_detected_mc():
    a = model(CFG, 15)
    b = near_copy(a, 16)
    tokens = greedy_tokens(a, CFG)
    res = permtest(a, b, CFG, jax.random.key(17), num_perms=15, statistic="mc", tokens=tokens)
    assert res.pvalue == pytest.approx(1 / 16)
    assert res.stat0 > res.stats.max()


def test_independent_pair_is_not_extreme():
    a, b = model(CFG, 18), model(CFG, 19)
    res = permtest(a, b, CFG, jax.random.key(20), num_perms=99)
    assert res.pvalue > 2 / 100  # (a 2% event under H0; the calibration test covers the rest)
    assert np.all(res.pvalue_layers > 1 / 100)
    assert res.stats.min() < res.stat0 < res.stats.max()


@pytest.mark.slow
def test_calibration_under_null():
    """200 independent pairs: L2-PERMTEST p-values are uniform on {1/100, ..., 1} and the false
    positive rate at alpha = 0.05 lies in its 99% binomial interval."""
    n_pairs, num_perms, alpha = 200, 99, 0.05
    pvals = []
    for i in range(n_pairs):
        a, b = model(CFG, 1000 + 2 * i), model(CFG, 1001 + 2 * i)
        pvals.append(permtest(a, b, CFG, jax.random.key(5000 + i), num_perms=num_perms).pvalue)
    pvals = np.array(pvals)
    assert len(np.unique(pvals)) > 30
    # discrete uniform on k/100: compare with the continuous uniform after a half-step jitter
    # (the KS statistic of the raw grid is off by at most 1/100)
    ks = stats.kstest(pvals - 0.5 / (num_perms + 1), "uniform")
    assert ks.pvalue > 0.01, ks
    lo, hi = stats.binom.interval(0.99, n_pairs, alpha)
    rejections = int((pvals <= alpha).sum())
    assert lo <= rejections <= hi, (rejections, lo, hi)


def test_bad_arguments():
    a, b = model(CFG, 21), model(CFG, 22)
    with pytest.raises(JaxindError, match="statistic"):
        permtest(a, b, CFG, jax.random.key(0), num_perms=5, statistic="jsd")
    with pytest.raises(JaxindError, match="tokens"):
        permtest(a, b, CFG, jax.random.key(0), num_perms=5, statistic="mc")
    with pytest.raises(JaxindError, match="num_perms"):
        permtest(a, b, CFG, jax.random.key(0), num_perms=0)
    other = init_params(CFG.replace(d_ff=8), jax.random.key(0))
    with pytest.raises(JaxindError):
        permtest(a, other, CFG, jax.random.key(0), num_perms=5)
