"""Stacked layers under lax.scan (docs/DESIGN.md §5.9): the scan equals the unrolled loop, per-layer features
act layer by layer, and collecting a few layers keeps a few rows, not every layer's activations."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_params

from jaxind.models import model
from jaxind.models.config import ModelConfig

CFG = ModelConfig("mistral", 64, 16, 3, 4, 2, 4, 24, sliding_window=4)
TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)


def test_scan_equals_unrolled_loop_and_early_stop():
    params = random_params(CFG)
    logits, acts = model.forward_jit(params, CFG, TOKENS, collect=(0, 2), collect_inputs=True)
    logits_u, acts_u = model.forward_jit(params, CFG, TOKENS, collect=(0, 2), collect_inputs=True, unroll=True)
    np.testing.assert_allclose(logits, logits_u, rtol=1e-6, atol=1e-6)
    assert sorted(acts) == [0, 2] and sorted(acts[2]) == ["gate", "up", "x"]
    # an activation-only pass stops after layer 1 (indexing the stack) and gives the full pass's values
    _, early = model.forward_jit(params, CFG, TOKENS, collect=(1,), return_logits=False)
    _, full = model.forward_jit(params, CFG, TOKENS, collect=(1,))
    assert sorted(early[1]) == ["gate", "up"]
    for name in ("gate", "up"):
        np.testing.assert_allclose(early[1][name], full[1][name], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(acts[2][name], acts_u[2][name], rtol=1e-6, atol=1e-6)
    assert not np.allclose(acts[0]["up"], acts[2]["up"])  # rows hold their own layers


def test_per_layer_features_act_layer_by_layer():
    """A window on layer 1 only (the way per-layer local/global attention rides along) equals running each
    layer by hand with its own setting, and differs from no window anywhere."""
    cfg = CFG.replace(sliding_window=None)
    params = random_params(cfg)
    x = model.embed(params, cfg, TOKENS)
    feats = model.layer_features(cfg)
    assert feats["window"].tolist() == [0, 0, 0] and feats["inv_freq"].shape == (3, 2)
    mixed = dict(feats, window=np.asarray([0, 2, 0], np.int32))
    out, _ = model.run_layers(params["layers"], cfg, x, feats=mixed)
    by_hand = x
    for l in range(cfg.n_layers):
        layer_feats = {name: jnp.asarray(value[l]) for name, value in mixed.items()}
        by_hand, _ = model.block(model.layer_slice(params, l), layer_feats, cfg, by_hand)
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-5)
    plain, _ = model.run_layers(params["layers"], cfg, x)
    assert not np.allclose(out, plain, atol=1e-3)


def test_collecting_one_late_layer_keeps_two_rows_not_every_layer():
    """Collect layer 14 of 16 in an activation-only pass: the compiled program's temporaries plus outputs
    stay within five layers' gate+up outputs (the buffer: one row and a scratch row; the layer's own temporaries),
    where storing every layer run would need fifteen."""
    cfg = ModelConfig("llama", 64, 32, 16, 4, 2, 8, 256)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    one_layer = 2 * 4 * 64 * cfg.d_ff * 4  # gate and up, float32
    lowered = model.forward_jit.lower(params, cfg, tokens, collect=(14,), return_logits=False)
    memory = lowered.compile().memory_analysis()
    assert memory.output_size_in_bytes >= one_layer
    assert memory.temp_size_in_bytes + memory.output_size_in_bytes < 5 * one_layer
    every = model.forward_jit.lower(params, cfg, tokens, collect=tuple(range(15)), return_logits=False)
    assert every.compile().memory_analysis().output_size_in_bytes >= 15 * one_layer  # the check can fail
