"""The symmetry group: every group action leaves the logits unchanged, on every family, and
the group laws (compose / invert / identity) hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from jaxind.errors import JaxindError
from jaxind.models import symmetry as S
from jaxind.models.config import ModelConfig
from jaxind.models.model import forward_jit

V, D, L, H_HEADS, KV, HD, H = 64, 16, 2, 4, 2, 4, 24

CONFIGS = {
    "llama": ModelConfig("llama", V, D, L, H_HEADS, KV, HD, H),
    "mistral_window": ModelConfig("mistral", V, D, L, H_HEADS, KV, HD, H, sliding_window=3),
    "qwen2_bias": ModelConfig("qwen2", V, D, L, H_HEADS, KV, HD, H, qkv_bias=True),
    "gemma": ModelConfig(
        "gemma", V, D, L, H_HEADS, 1, HD, H, mlp_act="gelu_tanh", norm_offset=1.0, embed_scale=True, tie_embeddings=True
    ),
    "llama_tied_obias": ModelConfig("llama", V, D, L, H_HEADS, KV, HD, H, tie_embeddings=True, o_bias=True),
    "gpt2": ModelConfig(
        "gpt2",
        V,
        D,
        L,
        H_HEADS,
        H_HEADS,
        HD,
        H,
        tie_embeddings=True,
        qkv_bias=True,
        o_bias=True,
        mlp_act="gelu_tanh",
        glu=False,
        norm_kind="layer",
        max_positions=16,
        mlp_bias=True,
    ),
    "gemma2": ModelConfig(
        "gemma2",
        V,
        D,
        L,
        H_HEADS,
        KV,
        HD,
        H,
        mlp_act="gelu_tanh",
        norm_offset=1.0,
        embed_scale=True,
        tie_embeddings=True,
        norm_position="sandwich",
        attn_softcap=2.0,
        final_softcap=3.0,
        query_pre_attn_scalar=6.0,
        sliding_window=3,
        layer_types=("sliding_attention", "full_attention"),
    ),
    "gemma3": ModelConfig(
        "gemma3",
        V,
        D,
        L,
        H_HEADS,
        1,
        HD,
        H,
        mlp_act="gelu_tanh",
        norm_offset=1.0,
        embed_scale=True,
        tie_embeddings=True,
        norm_position="sandwich",
        qk_norm="head",
        sliding_window=3,
        layer_types=("sliding_attention", "full_attention"),
        rope_local_theta=100.0,
    ),
    "qwen3": ModelConfig("qwen3", V, D, L, H_HEADS, KV, HD, H, qk_norm="head", qkv_bias=True, o_bias=True),
    "phi3": ModelConfig("phi3", V, D, L, H_HEADS, KV, HD, H, sliding_window=3),
    "olmo": ModelConfig("olmo", V, D, L, H_HEADS, H_HEADS, HD, H, norm_kind="nonparam", clip_qkv=0.4),
    "olmo2": ModelConfig("olmo2", V, D, L, H_HEADS, KV, HD, H, norm_position="post", qk_norm="proj"),
}


def refuses_rotation(cfg) -> bool:
    """LayerNorm models (GPT-2, OLMo) and models with norms on the attention/MLP outputs (Gemma 2/3, OLMo 2) have
    no rotation symmetry: the functions must refuse them."""
    if cfg.norm_kind == "rms" and cfg.norm_position == "pre":
        return False
    why = "LayerNorm" if cfg.norm_kind != "rms" else "pre-norm"
    with pytest.raises(JaxindError, match=why):
        S.rotate_residual(random_params(cfg), cfg, jnp.eye(cfg.d_model))
    with pytest.raises(JaxindError, match=why):
        S.fold_norms(random_params(cfg), cfg)
    return True


TOKENS = jax.random.randint(jax.random.key(99), (2, 9), 0, V)


def logits(params, cfg):
    return np.asarray(forward_jit(params, cfg, TOKENS)[0])


def assert_same_function(p1, c1, p2, c2):
    a, b = logits(p1, c1), logits(p2, c2)
    assert np.abs(a).max() > 1.0  # a meaningful scale, not all-zero logits
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def leaves_differ(p1, p2) -> bool:
    return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)) if x.shape == y.shape)


@pytest.fixture(params=list(CONFIGS), scope="module")
def family(request):
    cfg = CONFIGS[request.param]
    return cfg, random_params(cfg)


def test_residual_permutation_preserves_logits(family):
    cfg, params = family
    perm = S.draw_permutations(jax.random.key(1), cfg)
    perm = S.Perm(perm.resid, S.identity(cfg).mlp)
    out = S.apply_permutation(params, cfg, perm)
    assert leaves_differ(params, out)
    if cfg.has_norm_weights:
        np.testing.assert_array_equal(out["final_norm"], params["final_norm"][perm.resid])
    for name in ("q_norm", "k_norm"):  # act on head_dim (or the q/k projection), not on the residual stream
        if name in params["layers"]:
            np.testing.assert_array_equal(out["layers"][name], params["layers"][name])
    for name in ("post_attn_norm", "post_mlp_norm"):  # act on the residual stream
        if name in params["layers"]:
            np.testing.assert_array_equal(out["layers"][name], params["layers"][name][:, perm.resid])
    assert_same_function(params, cfg, out, cfg)


def test_mlp_permutations_preserve_logits(family):
    cfg, params = family
    perm = S.draw_permutations(jax.random.key(2), cfg)
    perm = S.Perm(S.identity(cfg).resid, perm.mlp)
    out = S.apply_permutation(params, cfg, perm)
    for layer in range(cfg.n_layers):
        np.testing.assert_array_equal(out["layers"]["down"][layer], params["layers"]["down"][layer][perm.mlp[layer]])
        np.testing.assert_array_equal(out["layers"]["up"][layer], params["layers"]["up"][layer][:, perm.mlp[layer]])
        for name in set(params["layers"]) - {"gate", "up", "down", "up_bias"}:  # untouched by MLP permutations
            np.testing.assert_array_equal(out["layers"][name][layer], params["layers"][name][layer])
        if cfg.mlp_bias:
            np.testing.assert_array_equal(
                out["layers"]["up_bias"][layer], params["layers"]["up_bias"][layer][perm.mlp[layer]]
            )
    assert_same_function(params, cfg, out, cfg)


def test_composed_permutations_preserve_logits(family):
    cfg, params = family
    p1 = S.draw_permutations(jax.random.key(3), cfg)
    p2 = S.draw_permutations(jax.random.key(4), cfg)
    out = S.apply_permutation(params, cfg, S.compose(p2, p1))
    assert_same_function(params, cfg, out, cfg)


def test_rotation_preserves_logits(family):
    cfg, params = family
    if refuses_rotation(cfg):
        return
    rot = S.random_orthogonal(jax.random.key(5), cfg.d_model)
    out, new_cfg = S.rotate_residual(params, cfg, rot)
    assert new_cfg.tie_embeddings is False
    assert "lm_head" in out
    neutral = 0.0 if cfg.norm_offset else 1.0
    np.testing.assert_array_equal(out["final_norm"], neutral)
    np.testing.assert_array_equal(out["layers"]["mlp_norm"], neutral)
    assert not np.allclose(out["embed"], params["embed"], atol=1e-2)
    assert_same_function(params, cfg, out, new_cfg)


def test_rotation_then_permutation_preserves_logits(family):
    cfg, params = family
    if refuses_rotation(cfg):
        return
    rot = S.random_orthogonal(jax.random.key(6), cfg.d_model)
    out, new_cfg = S.rotate_residual(params, cfg, rot)
    out = S.apply_permutation(out, new_cfg, S.draw_permutations(jax.random.key(7), new_cfg))
    assert_same_function(params, cfg, out, new_cfg)


def test_fold_norms_preserves_logits(family):
    cfg, params = family
    if refuses_rotation(cfg):
        return
    folded, new_cfg = S.fold_norms(params, cfg)
    assert new_cfg.tie_embeddings is False
    assert_same_function(params, cfg, folded, new_cfg)


def test_broken_action_is_detected():
    """Sensitivity check: permuting only q's input rows (not a group element) changes logits."""
    cfg = CONFIGS["llama"]
    params = random_params(cfg)
    perm = S.draw_permutations(jax.random.key(8), cfg)
    q = params["layers"]["q"]
    broken = S._rebuild(params, {("layers", "q"): q.at[0].set(q[0][perm.resid])})  # layer 0 only
    assert not np.allclose(logits(params, cfg), logits(broken, cfg), rtol=1e-4, atol=1e-3)
    # And a non-orthogonal "rotation" is not a symmetry either.
    not_orth = S.random_orthogonal(jax.random.key(9), cfg.d_model) * 1.5
    out, new_cfg = S.rotate_residual(params, cfg, not_orth)
    assert not np.allclose(logits(params, cfg), logits(out, new_cfg), rtol=1e-4, atol=1e-3)


def test_rotation_by_permutation_matrix_equals_gather():
    """The spec drives both actions: contracting with P_s equals gathering with s."""
    cfg = CONFIGS["qwen2_bias"]
    folded, fcfg = S.fold_norms(random_params(cfg), cfg)
    perm = S.draw_permutations(jax.random.key(10), fcfg)
    perm = S.Perm(perm.resid, S.identity(fcfg).mlp)
    rotated, _ = S.rotate_residual(folded, fcfg, S.permutation_matrix(perm.resid))
    gathered = S.apply_permutation(folded, fcfg, perm)
    for x, y in zip(jax.tree.leaves(rotated), jax.tree.leaves(gathered)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_random_orthogonal():
    q = S.random_orthogonal(jax.random.key(0), 32)
    np.testing.assert_allclose(q @ q.T, np.eye(32), atol=1e-5)
    assert not np.allclose(q, S.random_orthogonal(jax.random.key(1), 32))


def test_group_laws():
    cfg = CONFIGS["llama"]
    params = random_params(cfg)
    p1, p2, p3 = (S.draw_permutations(jax.random.key(k), cfg) for k in (11, 12, 13))
    ident = S.identity(cfg)

    def eq(a, b):
        return bool(jnp.all(a.resid == b.resid)) and bool(jnp.all(a.mlp == b.mlp))

    # valid permutations, deterministic in the key, different across keys
    assert eq(S.Perm(jnp.sort(p1.resid), jnp.sort(p1.mlp, axis=-1)), ident)
    assert eq(p1, S.draw_permutations(jax.random.key(11), cfg))
    assert not eq(p1, p2)
    assert not bool(jnp.all(p1.mlp[0] == p1.mlp[1]))  # layers get their own permutation
    # inverse and identity
    assert eq(S.compose(S.invert(p1), p1), ident)
    assert eq(S.compose(p1, S.invert(p1)), ident)
    assert eq(S.compose(p1, ident), p1) and eq(S.compose(ident, p1), p1)
    assert eq(S.invert(S.invert(p1)), p1)
    # associativity
    assert eq(S.compose(p3, S.compose(p2, p1)), S.compose(S.compose(p3, p2), p1))
    # the action: apply(apply(w, p1), p2) == apply(w, compose(p2, p1)), exactly
    two_step = S.apply_permutation(S.apply_permutation(params, cfg, p1), cfg, p2)
    one_step = S.apply_permutation(params, cfg, S.compose(p2, p1))
    for x, y in zip(jax.tree.leaves(two_step), jax.tree.leaves(one_step)):
        np.testing.assert_array_equal(x, y)
    back = S.apply_permutation(S.apply_permutation(params, cfg, p1), cfg, S.invert(p1))
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    assert not eq(S.compose(p2, p1), S.compose(p1, p2))  # the group is not abelian


def test_vmap_over_permutations():
    cfg = CONFIGS["llama"]
    params = random_params(cfg)
    keys = jax.random.split(jax.random.key(14), 3)
    perms = jax.vmap(lambda k: S.draw_permutations(k, cfg))(keys)
    assert perms.resid.shape == (3, D) and perms.mlp.shape == (3, L, H)
    batched = jax.vmap(lambda p: S.apply_permutation(params, cfg, p))(perms)
    for i in range(3):
        single = S.apply_permutation(params, cfg, S.draw_permutations(keys[i], cfg))
        np.testing.assert_array_equal(batched["layers"]["gate"][i], single["layers"]["gate"])
        np.testing.assert_array_equal(batched["embed"][i], single["embed"])


def get_leaf_ndim(params, path):
    return S.get_leaf(params, path).ndim


def test_spec_covers_tree_and_refuses_unknown_leaves():
    cfg = CONFIGS["qwen2_bias"]
    params = random_params(cfg)
    spec = S.permutation_spec(cfg)
    assert len(spec) == len(jax.tree.leaves(params))
    assert spec[("layers", "down")] == ("layers", "mlp", "resid")
    assert spec[("layers", "q_bias")] == ("layers", None)
    assert all(len(axes) == get_leaf_ndim(params, path) for path, axes in spec.items())
    bad = dict(params, layers=dict(params["layers"], extra=jnp.zeros((L, 3))))
    with pytest.raises(JaxindError, match="extra"):
        S.apply_permutation(bad, cfg, S.identity(cfg))
    shallow = dict(params, layers=jax.tree.map(lambda a: a[:1], params["layers"]))
    with pytest.raises(JaxindError, match="stacks"):
        S.apply_permutation(shallow, cfg, S.identity(cfg))
    listed = dict(params, layers=[S.get_leaf(params, ("layers",))])
    with pytest.raises(JaxindError, match="stacked"):
        S.check_tree(listed, cfg)
    with pytest.raises(JaxindError, match="rotation must have shape"):
        S.rotate_residual(params, cfg, jnp.eye(D + 1))
