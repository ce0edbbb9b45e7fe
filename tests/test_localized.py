"""Localized testing (jaxind.stats.localized): layer maps of pruned / partly shared models, heatmap."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from helpers import layer_list, perturb, stack_layers

from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.stats import localized

CFG = ModelConfig(family="llama", vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


@pytest.fixture(scope="module")
def model_a():
    return model.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
    return [jax.random.randint(jax.random.key(50 + i), (4, 32), 0, 128) for i in range(4)]


def test_pruned_model_layer_map_and_units(model_a, batches, tmp_path):
    """B = A with layer 1 dropped and 48 of 64 units kept (shuffled) in each remaining MLP, then
    lightly fine-tuned: the layer map is recovered exactly and the kept units (>= 95%)."""
    keep_layers = [0, 2, 3]
    rng = np.random.default_rng(1)
    kept = {l: rng.permutation(CFG.d_ff)[:48] for l in keep_layers}
    layers = []
    for l in keep_layers:
        layer, k = layer_list(model_a)[l], kept[l]
        layers.append(dict(layer, gate=layer["gate"][:, k], up=layer["up"][:, k], down=layer["down"][k]))
    b = perturb(dict(model_a, layers=stack_layers(layers)), jax.random.key(2), rel=0.3)
    cfg_b = CFG.replace(n_layers=3, d_ff=48)
    png = localized.heatmap_path_for(tmp_path / "pair.json")
    res = localized.localized_test(model_a, CFG, b, cfg_b, batches, key=jax.random.key(3), heatmap_path=png)
    assert res.extra["layer_map"] == {"0": 0, "1": 2, "2": 3}
    assert np.asarray(res.extra["log10_pvalue_matrix"]).shape == (4, 3)
    assert res.log10_pvalue < -10
    for entry in res.extra["matched_units"]:
        k = kept[entry["layer_a"]]
        right = np.asarray(entry["units_a"]) == k[np.asarray(entry["units_b"])]
        assert right.mean() >= 0.95
        assert len(entry["units_a"]) == 48
    assert res.extra["heatmap"] == png and os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    json.dumps(res.to_json())


def test_partly_shared_model_flagged_on_exactly_those_layers(model_a, batches):
    """B shares A's embeddings and layers 1 and 3 (all lightly fine-tuned); its layers 0 and 2
    are independently initialised. Exactly (1, 1) and (3, 3) pass the Bonferroni threshold."""
    other = model.init_params(CFG, jax.random.key(77))
    shared = {1, 3}
    mixed = [
        mine if l in shared else theirs for l, (mine, theirs) in enumerate(zip(layer_list(model_a), layer_list(other)))
    ]
    b = dict(model_a, layers=stack_layers(mixed))
    b = perturb(b, jax.random.key(4), rel=0.3)
    res = localized.localized_test(model_a, CFG, b, CFG, batches, key=jax.random.key(5))
    assert res.extra["layer_map"] == {"0": None, "1": 1, "2": None, "3": 3}
    matrix = np.asarray(res.extra["log10_pvalue_matrix"])
    hits = {tuple(ij) for ij in np.argwhere(matrix < res.extra["threshold_log10"]).tolist()}
    assert hits == {(1, 1), (3, 3)}


def test_chunked_passes_match_single_pass(model_a, batches):
    b = perturb(model_a, jax.random.key(6), rel=3.0)
    one = localized.localized_test(model_a, CFG, b, CFG, batches, key=jax.random.key(7))
    budget = localized.pair_memory_bytes(CFG, CFG, CFG.n_layers, 1)  # one B layer per pass
    many = localized.localized_test(
        model_a, CFG, b, CFG, lambda: iter(batches), key=jax.random.key(7), memory_budget_bytes=budget
    )
    assert one.extra["num_passes"] == 1 and many.extra["num_passes"] == 4
    np.testing.assert_allclose(
        many.extra["log10_pvalue_matrix"], one.extra["log10_pvalue_matrix"], rtol=1e-6, atol=1e-9
    )


def test_independent_models_empty_layer_map(model_a, batches):
    b = model.init_params(CFG, jax.random.key(99))
    res = localized.localized_test(model_a, CFG, b, CFG, batches, key=jax.random.key(8), layers_b=[0, 2])
    assert res.extra["layers_b"] == [0, 2]
    assert res.extra["layer_map"] == {"0": None, "2": None}
    assert res.extra["matched_units"] == []
    assert res.pvalue > 0.01
