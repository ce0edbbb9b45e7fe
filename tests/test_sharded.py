"""Pods on one machine (docs/DESIGN.md §5.12): on 1, 2, 4 and 8 fake CPU devices, with params sharded over
fsdp x model meshes of several shapes, the forward logits, MATCH, CSU, CSH and L2-PERMTEST equal the one-device
results (float tolerance for statistics, identical PERMTEST counts); no device holds a whole model; loading
places each layer's shards on their devices without the host holding the model."""

import tracemalloc

import jax
import numpy as np
import pytest
from helpers import perturb, random_params

from converters import checkpoint
from converters.sources import load_model
from jaxind.io.loaded_model import from_params
from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.pair.registry import TESTS, key_for
from jaxind.pair.token_data import TokenData
from jaxind.parallel import sharding
from jaxind.stats import grams, permtest

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")

CFG = ModelConfig("qwen2", vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
TOKENS = np.asarray(jax.random.randint(jax.random.key(3), (8, 16), 0, CFG.vocab_size))
NUM_PERMS = 63
# (mesh, devices, PERMTEST layer shards): 1, 2, 4 and 8 devices, fsdp x model (x data) of several shapes.
MESHES = [
    ("fsdp:1", 1, 1),
    ("fsdp:2", 2, 2),
    ("fsdp:2,model:2", 4, 4),
    ("fsdp:8", 8, 1),
    ("data:2,fsdp:2,model:2", 8, 2),
    ("fsdp:2,model:4", 8, 8),  # 8 layer shards for 4 layers: the depth is padded with zero layers
]


def run_all(a, b, c, layer_shards: int):
    """Logits of A, every sharded test on (A, B) through the registry (one shared data pass for CSH and MATCH),
    and L2-PERMTEST on (A, C)."""
    data = TokenData(TOKENS, batch_size=4)
    out = {"logits": sharding.to_host(a.logits(TOKENS[:2]))}
    for name in ("csu", "csh", "match"):
        out[name] = TESTS[name](a, b, key=key_for(0, name), data=data)
    out["l2"] = permtest.permtest(
        a.params, c.params, a.config, key_for(0, "l2"), num_perms=NUM_PERMS, layer_shards=layer_shards
    )
    return out


@pytest.fixture(scope="module")
def models():
    """A; B, A weakly related (p-values of CSU, CSH and MATCH in range); C independent of A (L2 counts in range)."""
    params_a = random_params(CFG, seed=1, std=0.3, noise=0.1)
    params_b = perturb(params_a, jax.random.key(2), rel=3.0, std=0.3)
    return params_a, params_b, random_params(CFG, seed=7, std=0.3, noise=0.1)


@pytest.fixture(scope="module")
def reference(models):
    return run_all(*(from_params(CFG, p) for p in models), 1)


@pytest.mark.parametrize("mesh, n_devices, layer_shards", MESHES, ids=[m[0] for m in MESHES])
def test_sharded_results_equal_one_device(models, reference, mesh, n_devices, layer_shards):
    layout = sharding.Layout(sharding.make_mesh(mesh, jax.devices()[:n_devices]))
    a, b, c = (from_params(CFG, p, layout=layout) for p in models)
    assert len(a.params["layers"]["gate"].sharding.device_set) == n_devices
    got = run_all(a, b, c, layer_shards)
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
    for name in ("csu", "csh", "match"):
        ref, res = reference[name], got[name]
        assert res.error is None and len(res.layers) == CFG.n_layers
        np.testing.assert_allclose(res.log10_pvalue, ref.log10_pvalue, rtol=1e-3, err_msg=name)
        for r, s in zip(ref.layers, res.layers):
            np.testing.assert_allclose(s.statistic, r.statistic, rtol=1e-4, atol=1e-6, err_msg=name)
    l2, ref = got["l2"], reference["l2"]
    assert l2.pvalue == ref.pvalue and 1 / (NUM_PERMS + 1) < ref.pvalue < 1  # the same counts, not a trivial one
    np.testing.assert_array_equal(l2.pvalue_layers, ref.pvalue_layers)
    np.testing.assert_allclose(l2.stats, ref.stats, rtol=1e-5)
    np.testing.assert_allclose(l2.stats_layers, ref.stats_layers, rtol=1e-5)


@pytest.mark.parametrize("mesh", ["fsdp:8", "fsdp:4,model:2", "fsdp:2,model:4", "data:2,fsdp:4"])
def test_no_device_holds_a_whole_model(models, mesh):
    """Every param leaf's largest addressable shard is at most 1/k of it on a k-way fsdp axis, and every device
    holds at most 1/k of the model's bytes."""
    layout = sharding.Layout(sharding.make_mesh(mesh))
    placed = layout.place(models[0], CFG)
    k = layout.mesh.shape["fsdp"]
    for path, leaf in model.flatten_paths(placed).items():
        assert sharding.largest_shard_fraction(leaf) <= 1 / k, (path, leaf.sharding.spec)
    per_device = sharding.bytes_per_device(placed)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(models[0]))
    assert max(per_device.values()) <= total / k
    assert len(per_device) == layout.mesh.size
    assert max(per_device.values()) == sharding.param_bytes_per_device(CFG, dict(layout.mesh.shape))  # the planner


def test_compiled_passes_never_hold_a_whole_model_on_a_device():
    """XLA's own memory plan for the MATCH pass step (both models, every layer) and the logits forward on an 8-way
    fsdp mesh: per device, arguments plus temporaries stay below the bytes of one model (the weights are gathered
    one layer at a time inside the scan, never whole)."""
    cfg = ModelConfig("llama", vocab_size=64, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512)
    layout = sharding.Layout(sharding.make_mesh("fsdp:8"))
    params = layout.place(model.init_params(cfg, jax.random.key(0)), cfg)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    layers = tuple(range(cfg.n_layers))
    state = grams.init_state(128, 128, 512, 512, 8, 8, (8,), layout)
    tokens = layout.batch(np.zeros((8, 16), np.int32))
    static = dict(cfg_a=cfg, cfg_b=cfg, layers_a=layers, layers_b=layers, pair_index=tuple((l, l) for l in layers))
    step = grams.accumulate_step.lower(state, params, params, tokens, None, layout=layout, **static).compile()
    forward = model.forward_jit.lower(params, cfg, tokens).compile()
    for compiled in (step, forward):
        memory = compiled.memory_analysis()
        assert memory.argument_size_in_bytes + memory.temp_size_in_bytes < total, memory


def test_loading_places_layer_shards_without_the_whole_model_on_the_host(tmp_path):
    """A jaxind checkpoint loaded onto an 8-way fsdp mesh: the same params as a plain load, every leaf split 8
    ways, and the host's Python/numpy memory peaks at a fraction of the model (one layer group at a time)."""
    cfg = ModelConfig("llama", vocab_size=64, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512)
    params = jax.tree.map(np.asarray, random_params(cfg, seed=5))
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, cfg, checkpoint.groups_of(params), {"source": "test"})
    layout = sharding.Layout(sharding.make_mesh("fsdp:8"))
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))  # 8.5 MB, one layer 1 MB
    load_model(path, layout=layout)  # compiles the placement (its Python allocations are not the model's)
    tracemalloc.start()
    try:
        loaded = load_model(path, layout=layout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 3, (peak, total)
    plain = load_model(path)
    for (name, leaf), ref in zip(model.flatten_paths(loaded.params).items(), jax.tree.leaves(plain.params)):
        assert sharding.largest_shard_fraction(leaf) <= 1 / 8, name
        np.testing.assert_array_equal(sharding.to_host(leaf), np.asarray(ref))


def _family_config(name: str) -> ModelConfig:
    """A family's tiny test config (tests/hf_models.py), read by jaxind from transformers' config dict."""
    import transformers
    from hf_models import FAMILIES, MOE_FAMILIES, TINY

    from jaxind.io.hf_config import parse_hf_config

    config_cls, extra = {**FAMILIES, **MOE_FAMILIES}[name]
    base = {"vocab_size": TINY["vocab_size"]} if name == "gpt2" else TINY
    return parse_hf_config(getattr(transformers, config_cls)(**{**base, **extra}).to_dict())[0]


@pytest.mark.parametrize(
    "family", ["gemma2", "gemma3", "qwen3", "phi3", "olmo", "olmo2", "gpt2", "mixtral", "qwen2_moe"]
)
def test_every_family_shards_and_gives_the_same_logits(family):
    """Every family's leaves have logical axes (q/k norms, post-norms included): placed on an 8-way fsdp mesh,
    no leaf is whole on a device and the logits equal the unsharded ones."""
    cfg = _family_config(family)
    params = model.init_params(cfg, jax.random.key(0), std=0.2)
    layout = sharding.Layout(sharding.make_mesh("fsdp:8"))
    placed = layout.place(params, cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size))
    for path, leaf in model.flatten_paths(placed).items():
        if leaf.size >= 8 * 8:  # a leaf too small for any axis to split 8 ways stays whole
            assert sharding.largest_shard_fraction(leaf) <= 1 / 2, (path, leaf.sharding.spec)
    expected = np.asarray(model.forward_jit(params, cfg, tokens)[0])
    got = np.asarray(model.forward_jit(placed, cfg, tokens)[0])
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
