"""MATCH (jaxind.stats.match): detection of derived models, null behaviour, calibration, one-pass parity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import layer_list, perturb, stack_layers

from jaxind.errors import JaxindError
from jaxind.models import model, symmetry
from jaxind.models.config import ModelConfig
from jaxind.stats import grams, match

CFG = ModelConfig(family="llama", vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def _batches(n=4, b=4, t=32, vocab=128, seed=100):
    return [jax.random.randint(jax.random.key(seed + i), (b, t), 0, vocab) for i in range(n)]


@pytest.fixture(scope="module")
def model_a():
    return model.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
    return _batches()


def test_finetuned_copy_detected(model_a, batches):
    b = perturb(model_a, jax.random.key(1))
    res = match.match_test(model_a, CFG, b, CFG, batches, key=jax.random.key(2))
    assert res.log10_pvalue < -10
    assert all(rec.log10_pvalue < -10 for rec in res.layers)
    json.dumps(res.to_json())  # JSON-ready


def test_permuted_rotated_copy_detected(model_a, batches):
    perm = symmetry.draw_permutations(jax.random.key(3), CFG)
    b = symmetry.apply_permutation(model_a, CFG, perm)
    b, cfg_b = symmetry.rotate_residual(b, CFG, symmetry.random_orthogonal(jax.random.key(4), CFG.d_model))
    # The transformation leaves the function unchanged ...
    la, _ = model.forward_jit(model_a, CFG, batches[0])
    lb, _ = model.forward_jit(b, cfg_b, batches[0])
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-4)
    res = match.match_test(model_a, CFG, b, cfg_b, batches, key=jax.random.key(5), return_units=True)
    assert res.log10_pvalue < -10
    # ... and MATCH recovers the hidden permutation itself: B's unit perm.mlp[l][k] is A's unit k... inverted.
    for rec in res.layers:
        l = rec.layer_a
        units = rec.extra["matched_units"]
        inv = np.argsort(np.asarray(perm.mlp[l]))
        np.testing.assert_array_equal(np.asarray(units["gate_b"]), inv[np.asarray(units["gate_a"])])
        np.testing.assert_array_equal(np.asarray(units["up_b"]), inv[np.asarray(units["up_a"])])


def test_independent_models_not_detected(model_a, batches):
    b = model.init_params(CFG, jax.random.key(123))
    res = match.match_test(model_a, CFG, b, CFG, batches, key=jax.random.key(6))
    assert res.pvalue > 0.01
    assert all(abs(rec.statistic) < 0.5 for rec in res.layers)


def test_one_pass_agrees_with_slow_baseline(model_a, batches):
    b = perturb(model_a, jax.random.key(7), rel=3.0)  # weakly related: matchings not trivial
    pairs = [(0, 0), (2, 1)]
    fast = match.match_test(model_a, CFG, b, CFG, batches, key=jax.random.key(8), layer_pairs=pairs)
    slow = match.match_test_slow(model_a, CFG, b, CFG, batches, key=jax.random.key(8), layer_pairs=pairs)
    assert [(r.layer_a, r.layer_b) for r in fast.layers] == pairs
    for f, s in zip(fast.layers, slow.layers):
        assert f.statistic == pytest.approx(s.statistic, abs=1e-12)
    assert fast.extra["num_tokens"] == 4 * 4 * 32


def test_mask_excludes_tokens(model_a, batches):
    b = perturb(model_a, jax.random.key(9), rel=3.0)
    ones = [(t, jnp.ones(t.shape, bool)) for t in batches]
    half = [(t, jnp.arange(t.shape[1])[None, :].repeat(t.shape[0], 0) < 16) for t in batches]
    full = grams.accumulate(model_a, CFG, b, CFG, batches, layers_a=(0,), layers_b=(0,), pair_index=((0, 0),))
    masked1 = grams.accumulate(model_a, CFG, b, CFG, ones, layers_a=(0,), layers_b=(0,), pair_index=((0, 0),))
    np.testing.assert_allclose(full.grams(0, "gate")[0], masked1.grams(0, "gate")[0], rtol=1e-6)
    # Causal model: the first 16 positions of each sequence alone give the same activations.
    short = [t[:, :16] for t in batches]
    cut = grams.accumulate(model_a, CFG, b, CFG, short, layers_a=(0,), layers_b=(0,), pair_index=((0, 0),))
    masked = grams.accumulate(model_a, CFG, b, CFG, half, layers_a=(0,), layers_b=(0,), pair_index=((0, 0),))
    assert masked.count == cut.count == 4 * 4 * 16
    np.testing.assert_allclose(masked.grams(0, "up")[0], cut.grams(0, "up")[0], rtol=1e-4, atol=1e-6)


def test_rectangular_pruned_widths(model_a, batches):
    """B keeps 40 of A's 64 units in each layer (shuffled) plus fine-tune noise: detected, and the
    kept units are recovered; also with A as the narrower model."""
    rng = np.random.default_rng(0)
    kept = [rng.permutation(CFG.d_ff)[:40] for _ in range(CFG.n_layers)]
    layers = []
    for layer, k in zip(layer_list(model_a), kept):
        layers.append(dict(layer, gate=layer["gate"][:, k], up=layer["up"][:, k], down=layer["down"][k]))
    b = perturb(dict(model_a, layers=stack_layers(layers)), jax.random.key(10), rel=0.3)
    cfg_b = CFG.replace(d_ff=40)
    for swap in (False, True):
        args = (b, cfg_b, model_a, CFG) if swap else (model_a, CFG, b, cfg_b)
        res = match.match_test(*args, batches, key=jax.random.key(11), return_units=True)
        assert res.log10_pvalue < -10
        for rec, k in zip(res.layers, kept):
            units = rec.extra["matched_units"]
            wide, narrow = (units["gate_b"], units["gate_a"]) if swap else (units["gate_a"], units["gate_b"])
            assert len(wide) == 40
            assert np.mean(np.asarray(wide) == k[np.asarray(narrow)]) >= 0.95


@pytest.mark.slow
def test_calibration_independent_pairs_uniform():
    """120 independent pairs of tiny 2-layer models: Fisher-combined and per-layer p-values are
    uniform (KS test) and the 5% level is respected. Cheap: one compiled step, 32 x 32 LAPs."""
    cfg = ModelConfig(
        family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
    )
    tokens = [jax.random.randint(jax.random.key(2), (8, 16), 0, 64)]
    init = jax.jit(lambda k: model.init_params(cfg, k))
    combined, per_layer = [], []
    for s in range(120):
        a = init(jax.random.key(1000 + 2 * s))
        b = init(jax.random.key(1001 + 2 * s))
        res = match.match_test(a, cfg, b, cfg, tokens, key=jax.random.key(s))
        combined.append(res.pvalue)
        per_layer += [r.pvalue for r in res.layers]
    assert scipy.stats.kstest(combined, "uniform").pvalue > 0.01
    assert scipy.stats.kstest(per_layer, "uniform").pvalue > 0.01
    assert np.mean(np.asarray(per_layer) < 0.05) < 0.1


def test_bad_input_errors(model_a, batches):
    with pytest.raises(JaxindError, match="out of range"):
        match.match_test(model_a, CFG, model_a, CFG, batches, key=jax.random.key(0), layer_pairs=[(0, 5)])
    with pytest.raises(JaxindError, match="no token batches"):
        match.match_test(model_a, CFG, model_a, CFG, [], key=jax.random.key(0))


def test_input_grams_give_the_activation_grams_exactly(model_a):
    """The pass accumulates MLP-input Grams; the gate/up Grams derived from them equal the ones
    computed from stored activations (masked tokens excluded)."""
    b = perturb(model_a, jax.random.key(11), rel=3.0)
    tokens = jax.random.randint(jax.random.key(12), (3, 16), 0, CFG.vocab_size)
    mask = jnp.ones((3, 16)).at[2, 5:].set(0.0)
    stats = grams.accumulate(
        model_a, CFG, b, CFG, [(tokens, mask)], layers_a=(0, 1), layers_b=(1,), pair_index=((0, 0), (1, 0))
    )
    keep = np.asarray(mask).reshape(-1) > 0
    _, acts_a = model.forward(model_a, CFG, tokens, collect=(0, 1), return_logits=False)
    _, acts_b = model.forward(b, CFG, tokens, collect=(1,), return_logits=False)
    for p, (la, lb) in enumerate(((0, 1), (1, 1))):
        for proj in ("gate", "up"):
            xa = np.asarray(acts_a[la][proj], np.float64).reshape(-1, CFG.d_ff)[keep]
            xb = np.asarray(acts_b[lb][proj], np.float64).reshape(-1, CFG.d_ff)[keep]
            cross, sq_a, sq_b = stats.grams(p, proj)
            np.testing.assert_allclose(cross, xa.T @ xb, rtol=1e-4, atol=1e-4 * np.abs(xa.T @ xb).max())
            np.testing.assert_allclose(sq_a, (xa**2).sum(0), rtol=1e-4)
            np.testing.assert_allclose(sq_b, (xb**2).sum(0), rtol=1e-4)
    assert stats.count == keep.sum()


def _sq_distances_plain(cross, norm_a, norm_b):
    """``grams.sq_distances`` as it was written before it worked in place (five temporaries)."""
    d = norm_a.astype(np.float64)[:, None] + norm_b.astype(np.float64)[None, :] - 2.0 * cross.astype(np.float64)
    return np.maximum(d, 0.0)


def _reference_match(stats, pairs, key):
    """MATCH from pass statistics the plain way (before the prefetching loop): per pair, each projection's
    Gram and distances on their own, then the LAPs."""
    keys = jax.random.split(key, len(pairs))
    records = []
    for p, (a, b) in enumerate(pairs):
        d_gate = _sq_distances_plain(*stats.grams(p, "gate"))
        d_up = _sq_distances_plain(*stats.grams(p, "up"))
        records.append(match.match_units(d_gate, d_up, keys[p]).record(a, b))
    return records


@pytest.mark.parametrize("rel", [0.5, 3.0])
def test_prefetched_grams_equal_the_reference_path(model_a, batches, rel):
    """The pipelined MATCH (both projections' Grams in one device call, the next pair's dispatched before this
    pair's LAPs, distances in place) gives bit-identical distances and equal p-values to the plain path, on a
    dependent and on a weakly related pair."""
    b = perturb(model_a, jax.random.key(11), rel=rel)
    pairs = ((0, 0), (1, 1), (2, 1))
    layers = (0, 1, 2)
    index = tuple((layers.index(x), layers.index(y)) for x, y in pairs)
    stats = grams.accumulate(model_a, CFG, b, CFG, batches, layers_a=layers, layers_b=layers, pair_index=index)
    for p in range(len(pairs)):
        new = stats.distances_from(p, stats.project_both(p))
        for got, proj in zip(new, ("gate", "up")):
            np.testing.assert_array_equal(got, _sq_distances_plain(*stats.grams(p, proj)))
    key = jax.random.key(12)
    result = match.match_from_pass(stats, pairs, key)
    reference = _reference_match(stats, pairs, key)
    assert [r.log10_pvalue for r in result.layers] == [r.log10_pvalue for r in reference]
    assert [r.statistic for r in result.layers] == [r.statistic for r in reference]
    assert result.extra["seconds_grams"] >= 0 and result.extra["seconds_lap"] >= 0
