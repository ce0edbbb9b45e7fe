"""The parameter table and the Flax module built from it (issue 16): one declaration per leaf, every view derived;
the NNX module computes what the pure forward does, carries its logical axes, and keeps the symmetry group."""

import dataclasses
import doctest
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import numpy_params
from test_symmetry import CONFIGS

from converters.build import plan
from converters.mappings import HF_DECODER, HF_MOE, Rule
from jaxind.errors import CheckpointError
from jaxind.models import model, paramspec, symmetry
from jaxind.models.config import ModelConfig
from jaxind.parallel import sharding

ROOT = Path(__file__).resolve().parent.parent
TOY = ModelConfig("llama", 32, 16, 2, 4, 2, 4, 24)
MOE = ModelConfig(
    "qwen2_moe", 32, 16, 2, 4, 2, 4, 8, n_experts=4, experts_per_token=2, d_expert=6, shared_expert=True, qkv_bias=True
)
ALL = {**CONFIGS, "qwen2_moe": MOE}


def test_every_config_has_one_declared_leaf_per_tree_leaf():
    for name, cfg in ALL.items():
        tree = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))  # noqa: B023
        flat = model.flatten_paths(tree)
        declared = {paramspec.path(leaf): leaf for leaf in paramspec.leaves(cfg)}
        assert set(flat) == set(declared), name
        for path, leaf in declared.items():
            assert flat[path].shape == leaf.full_shape(cfg), (name, path)
            assert len(leaf.full_axes()) == flat[path].ndim, (name, path)
        assert cfg.num_params() == sum(math.prod(a.shape) for a in flat.values()), name


# --- a toy family adds a leaf in one place: every derived view changes with it ---------------------------------


@pytest.fixture
def toy_leaf(monkeypatch):
    """A layer leaf ``toy_gain`` ``(d, h)`` read after ``mlp_norm``, present only when ``cfg.o_bias`` (the toy
    family's switch), added to the table and nowhere else."""
    leaf = paramspec.Leaf(
        "toy_gain", ("embed", "mlp"), lambda c: (c.d_model, c.d_ff), lambda c: c.o_bias, reads="mlp_norm"
    )
    monkeypatch.setattr(paramspec, "TABLE", (*paramspec.TABLE, leaf))
    return leaf


def test_a_leaf_added_to_the_table_appears_in_every_view(toy_leaf):
    cfg, plain = TOY.replace(o_bias=True), TOY
    d, h, n = cfg.d_model, cfg.d_ff, cfg.n_layers
    # shapes, and so what converters expect of a checkpoint
    assert model.param_shapes_flat(cfg)["layers.toy_gain"] == (n, d, h)
    assert model.param_shapes_flat(cfg, per_layer=True)["layers.1.toy_gain"] == (d, h)
    assert "layers.toy_gain" not in model.param_shapes_flat(plain)
    # the count
    assert cfg.num_params() == plain.num_params() + n * d * h + n * d  # + o_bias, the toy family's other leaf
    # init and the module (with the axes as Flax metadata)
    tree = model.init_params(cfg, jax.random.key(0))
    assert tree["layers"]["toy_gain"].shape == (n, d, h)
    decoder = model.Decoder(cfg, key=jax.random.key(0))
    spec = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(decoder)))["layers"]["toy_gain"]
    assert spec == jax.sharding.PartitionSpec("layers", "embed", "mlp")
    # the permutation spec and folding
    assert symmetry.permutation_spec(cfg)[("layers", "toy_gain")] == ("layers", "resid", "mlp")
    assert symmetry.layer_leaf_names(cfg)[-1] == "toy_gain"
    assert "toy_gain" in paramspec.norm_readers()["mlp_norm"]
    # the sharding axes
    assert sharding.param_names(cfg)["layers.toy_gain"] == ("layers", "embed", "mlp")
    # a permutation moves it like gate's (residual rows, hidden columns of each layer)
    perm = symmetry.draw_permutations(jax.random.key(2), cfg)
    moved = symmetry.apply_permutation(tree, cfg, perm)["layers"]["toy_gain"]
    want = jnp.stack([tree["layers"]["toy_gain"][l][perm.resid][:, perm.mlp[l]] for l in range(n)])
    np.testing.assert_array_equal(moved, want)


def test_a_checkpoint_without_the_added_leaf_is_refused(toy_leaf):
    """The converter's expected shapes come from the table: a checkpoint lacking the new leaf is incomplete."""
    cfg = TOY.replace(o_bias=True)

    class Reader:
        config, table, ignored = cfg, HF_DECODER, ()

        def names(self):
            return [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
                *(
                    f"model.layers.{l}.{n}"
                    for l in range(cfg.n_layers)
                    for n in (
                        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
                        "self_attn.o_proj.bias",
                        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
                        "input_layernorm.weight",
                        "post_attention_layernorm.weight",
                    )
                ),
            ]

    expected = model.param_shapes_flat(cfg, per_layer=True)
    with pytest.raises(CheckpointError, match="toy_gain"):
        plan(Reader(), "toy", expected)
    monkey_free = {k: v for k, v in expected.items() if "toy_gain" not in k}
    assert plan(Reader(), "toy", monkey_free)  # the same checkpoint is complete without the leaf


def test_the_table_refuses_repeats_and_unknown_axes():
    leaf = paramspec.TABLE[3]
    with pytest.raises(ValueError, match="repeated"):
        paramspec.check_table((*paramspec.TABLE, leaf))
    with pytest.raises(ValueError, match="axis names"):
        paramspec.check_table((dataclasses.replace(leaf, name="x", axes=("resid", "heads")),))
    with pytest.raises(ValueError, match="not in the table"):
        paramspec.check_table((dataclasses.replace(leaf, name="x", reads="nowhere"),))


def test_converter_rules_name_only_declared_leaves():
    declared = {leaf.name for leaf in paramspec.TABLE}
    rules: tuple[Rule, ...] = HF_DECODER + HF_MOE
    assert {r.path.rsplit(".", 1)[-1] for r in rules} <= declared


# --- the Flax module -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_module_init_and_apply_equal_init_params_and_forward(name):
    cfg = ALL[name]
    decoder = model.Decoder(cfg, key=jax.random.key(5))
    state = nnx.to_pure_dict(nnx.state(decoder))
    tree = model.init_params(cfg, jax.random.key(5))
    assert jax.tree.structure(state) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, state, tree)
    params = numpy_params(cfg, 0)  # norms and biases away from their init
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    want_logits, want_acts = model.forward_jit(params, cfg, tokens, collect=(0, 1))
    logits, acts = nnx.jit(lambda m, t: m(t, collect=(0, 1)))(model.Decoder(cfg, params), tokens)
    np.testing.assert_array_equal(logits, want_logits)  # the same ops in the same order: bit for bit
    jax.tree.map(np.testing.assert_array_equal, acts, want_acts)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2_moe"])
def test_a_random_symmetry_element_leaves_the_module_logits_unchanged(name):
    cfg = ALL[name]
    graphdef, state = nnx.split(model.Decoder(cfg, numpy_params(cfg, 0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    run = nnx.jit(lambda m, t: m(t)[0])
    before = run(nnx.merge(graphdef, state), tokens)
    perm = symmetry.draw_permutations(jax.random.key(3), cfg)
    permuted = symmetry.apply_permutation(nnx.to_pure_dict(state), cfg, perm)
    assert not np.array_equal(permuted["layers"]["up"] if cfg.d_ff else 0, nnx.to_pure_dict(state)["layers"]["up"])
    nnx.replace_by_pure_dict(state, permuted)
    after = run(nnx.merge(graphdef, state), tokens)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(jnp.abs(before).max()))


def test_module_metadata_is_what_the_mesh_rules_read():
    """The logical axes the layout shards by are the ones each Param carries."""
    for cfg in (CONFIGS["llama"], CONFIGS["gpt2"], MOE):
        specs = nnx.get_partition_spec(nnx.state(model.Decoder(cfg)))
        pure = nnx.to_pure_dict(specs)
        flat = {
            path: tuple(pure["layers"][path[7:]] if path.startswith("layers.") else pure[path])
            for path in sharding.param_names(cfg)
        }
        assert flat == {path: tuple(n) for path, n in sharding.param_names(cfg).items()}


def test_readme_library_example_runs_as_a_doctest():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "nnx" in b and ">>>" in b]
    assert blocks, "README has no doctested Flax example"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(blocks[0], {}, "README", "README.md", 0)
    assert len(test.examples) >= 5
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


def test_num_params_is_the_sum_of_declared_shapes():
    for cfg in ALL.values():
        assert cfg.num_params() == sum(math.prod(s) for s in model.param_shapes_flat(cfg).values())


def test_a_checkpoint_written_by_the_previous_release_loads_into_the_module(tmp_path):
    """tests/fixtures/checkpoint_0_1: a Qwen2-style checkpoint written by jaxind 0.1.0 (commit 91ebdc8, before the
    module and the table) from ``init_params(cfg, key(7))``: it loads, bit for bit, and runs as the module."""
    import shutil

    from converters.checkpoint import load_checkpoint

    src = tmp_path / "ckpt"
    shutil.copytree(ROOT / "tests" / "fixtures" / "checkpoint_0_1", src)
    cfg, params, meta = load_checkpoint(str(src))
    assert cfg == ModelConfig("qwen2", 32, 16, 2, 4, 2, 4, 24, qkv_bias=True)
    jax.tree.map(np.testing.assert_array_equal, params, model.init_params(cfg, jax.random.key(7)))
    logits, _ = model.Decoder(cfg, params)(jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 32) and bool(jnp.isfinite(logits).all())
