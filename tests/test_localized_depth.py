"""Localized testing across depth changes: up-scaled (SOLAR-style) models, the layer-pair screen
(jaxind.stats.layer_screen), layer-stacked merges of two parents."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import layer_list, perturb, stack_layers

from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.pair import report
from jaxind.stats import localized

CFG = ModelConfig(family="llama", vocab_size=128, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
SOURCE = [0, 1, 2, 3, 2, 3, 4, 5]  # SOLAR-style: A[0:4] + A[2:6], 6 -> 8 layers
CFG_B = CFG.replace(n_layers=len(SOURCE))


def _matrix(res) -> np.ndarray:
    """The p-value matrix with screened-out pairs as NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in res.extra["log10_pvalue_matrix"]])


@pytest.fixture(scope="module")
def model_a():
    return model.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
    return [jax.random.randint(jax.random.key(50 + i), (4, 32), 0, 128) for i in range(4)]


@pytest.fixture(scope="module")
def upscaled(model_a):
    """A up-scaled to 8 layers (a middle block range duplicated), every weight moved by noise (a
    stand-in for the healing fine-tune)."""
    b = dict(model_a, layers=stack_layers([layer_list(model_a)[a] for a in SOURCE]))
    return perturb(b, jax.random.key(2), rel=0.3)


@pytest.fixture(scope="module")
def upscaled_runs(model_a, upscaled, batches):
    """The screened and the full localized test of the up-scaled pair (same data, same key)."""
    return {
        screen: localized.localized_test(model_a, CFG, upscaled, CFG_B, batches, key=jax.random.key(3), screen=screen)
        for screen in (True, False)
    }


def test_upscaled_layer_map_names_duplicated_layers(upscaled_runs):
    """Every layer of B maps to the layer of A it copies; A's layers 2 and 3 are named as the
    sources of two layers each; the screen changes nothing in the answer."""
    for res in upscaled_runs.values():
        assert res.extra["layer_map"] == {str(b): a for b, a in enumerate(SOURCE)}
        assert res.extra["duplicated_layers"] == {"2": [2, 4], "3": [3, 5]}
        assert res.log10_pvalue < -10
        json.dumps(res.to_json())
    screened, full = upscaled_runs[True], upscaled_runs[False]
    assert screened.log10_pvalue == full.log10_pvalue
    text = report.format_localized(screened.extra)
    assert "A layer 2 is the source of 2 layers of B: 2, 4" in text and "screen: LAPs solved for" in text
    assert full.extra["screen"] is None and len(full.layers) == CFG.n_layers * CFG_B.n_layers


def test_screen_tests_few_pairs_with_the_full_tests_pvalues(upscaled_runs):
    """The screen solves LAPs for few pairs, and each tested pair's p-value is the full test's, bit
    for bit (same pair keys); screened-out pairs are None in the JSON matrix and have no record."""
    screened, full = upscaled_runs[True], upscaled_runs[False]
    info = screened.extra["screen"]
    assert info["pairs"] == 48 and info["pairs_tested"] <= 12
    mat_s, mat_f = _matrix(screened), _matrix(full)
    tested = ~np.isnan(mat_s)
    assert tested.sum() == info["pairs_tested"] == len(screened.layers)
    np.testing.assert_array_equal(mat_s[tested], mat_f[tested])
    hits = mat_f < full.extra["threshold_log10"]
    assert hits.sum() == len(SOURCE) and not (hits & ~tested).any()
    excess = np.asarray(info["excess_matrix"])
    copies = np.zeros_like(hits)
    copies[SOURCE, np.arange(len(SOURCE))] = True
    assert excess[copies].min() > 10 * max(1.0, np.abs(excess[~copies]).max() / 3)


@pytest.mark.parametrize("seed", [11, 12])
def test_screen_hides_nothing_on_null_pairs(model_a, batches, seed):
    """Independent models: every pair the full test flags is tested under the screen (here: none
    is flagged), the maps agree, and the screened overall p-value is never smaller (valid)."""
    other = model.init_params(CFG_B, jax.random.key(seed))
    runs = {
        s: localized.localized_test(model_a, CFG, other, CFG_B, batches, key=jax.random.key(seed), screen=s)
        for s in (True, False)
    }
    mat_s, mat_f = _matrix(runs[True]), _matrix(runs[False])
    hits = mat_f < runs[False].extra["threshold_log10"]
    assert not (hits & np.isnan(mat_s)).any()
    assert runs[True].extra["layer_map"] == runs[False].extra["layer_map"]
    assert runs[True].log10_pvalue >= runs[False].log10_pvalue
    assert runs[True].extra["screen"]["pairs_tested"] < 48 // 2


def test_screen_default_only_for_deep_pairs(model_a, upscaled, batches, upscaled_runs):
    """screen=None leaves a matrix of <= 64 pairs to the full test: the results stay as before."""
    res = localized.localized_test(model_a, CFG, upscaled, CFG_B, batches, key=jax.random.key(3))
    assert res.extra["screen"] is None
    assert res.extra["log10_pvalue_matrix"] == upscaled_runs[False].extra["log10_pvalue_matrix"]


def test_layer_stacked_merge_names_each_layers_parent(model_a, batches):
    """A layer-stacked merge ("frankenmerge") of A's layers 0-3 and layers 2-5 of a second parent P
    (P shares A's embeddings, as two fine-tunes of one base do; its layers are independent): each
    layer of the merge is attributed to the right parent and layer."""
    own = model.init_params(CFG, jax.random.key(21))
    parent = dict(own, embed=model_a["embed"])
    merged = dict(model_a, layers=stack_layers(layer_list(model_a)[:4] + layer_list(parent)[2:]))
    merged = perturb(merged, jax.random.key(22), rel=0.3)
    out = localized.localized_parents(
        {"A": (model_a, CFG), "P": (parent, CFG)}, merged, CFG_B, batches, key=jax.random.key(23), screen=True
    )
    got = {b: (v["parent"], v["layer"]) if v else None for b, v in out["layer_parents"].items()}
    want = [("A", 0), ("A", 1), ("A", 2), ("A", 3), ("P", 2), ("P", 3), ("P", 4), ("P", 5)]
    assert got == {str(b): w for b, w in enumerate(want)}
    assert out["alpha_per_parent"] == 0.005 and out["results"]["P"].extra["alpha"] == 0.005


def test_screen_on_a_pruned_model_samples_the_narrower_models_units(model_a, batches, tmp_path):
    """B keeps layers 0, 2, 3, 5 of A with 48 of 64 units (shuffled): the screen samples B's units
    (the narrower model) and the layer map and kept units are recovered; the heatmap is drawn with
    the screened-out pairs blank."""
    keep_layers, rng = [0, 2, 3, 5], np.random.default_rng(1)
    kept = {l: rng.permutation(CFG.d_ff)[:48] for l in keep_layers}
    layers = []
    for l in keep_layers:
        layer = layer_list(model_a)[l]
        layers.append(
            dict(layer, gate=layer["gate"][:, kept[l]], up=layer["up"][:, kept[l]], down=layer["down"][kept[l]])
        )
    cfg_b = CFG.replace(n_layers=4, d_ff=48)
    b = perturb(dict(model_a, layers=stack_layers(layers)), jax.random.key(2), rel=0.3)
    png = str(tmp_path / "p_localized.png")
    res = localized.localized_test(
        model_a, CFG, b, cfg_b, batches, key=jax.random.key(8), screen=True, heatmap_path=png
    )
    assert res.extra["layer_map"] == {"0": 0, "1": 2, "2": 3, "3": 5}
    for entry in res.extra["matched_units"]:
        right = np.asarray(entry["units_a"]) == kept[entry["layer_a"]][np.asarray(entry["units_b"])]
        assert right.mean() >= 0.95
    assert res.extra["screen"]["num_units"] == 48 and res.extra["screen"]["pairs_tested"] <= 8
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
