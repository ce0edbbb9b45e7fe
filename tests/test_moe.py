"""Mixture-of-experts families (Mixtral, Qwen2-MoE): config, forward parity with transformers, checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import MOE_FAMILIES, build_torch_model, moe_reference_activations, save

import jaxind
from converters.sources import load_model
from jaxind.errors import JaxindError, UnsupportedModelError
from jaxind.io.hf_config import from_hf_config
from jaxind.models import model, moe

TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def save_per_expert_bin(torch_model, out_dir: str) -> str:
    """A legacy ``pytorch_model.bin`` with one tensor per expert (the hub layout), from save_pretrained's
    safetensors (transformers 5 writes the per-expert names back)."""
    from safetensors.torch import load_file

    save(torch_model, out_dir, "safetensors")
    path = os.path.join(out_dir, "model.safetensors")
    state = load_file(path)
    os.remove(path)
    torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    return out_dir


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "bin_per_expert"])
def test_logits_and_expert_activations_match_transformers(tmp_path, family, fmt):
    ref_model = build_torch_model(family, seed=3)
    out = str(tmp_path / family)
    path = save_per_expert_bin(ref_model, out) if fmt == "bin_per_expert" else save(ref_model, out, fmt)
    ours = load_model(path)
    cfg = ours.config
    assert cfg.moe and cfg.family == ref_model.config.model_type
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ref_logits, ref_acts = moe_reference_activations(ref_model, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    acts = ours.mlp_activations(tokens)
    for layer, ref in ref_acts.items():
        for proj, value in ref.items():
            assert acts[layer][proj].shape == value.shape, (layer, proj)
            assert rel_err(acts[layer][proj], value) <= TOL, (layer, proj)
    assert acts[0]["expert_gate"].shape == (2, 12, cfg.n_experts, cfg.d_expert)
    assert ("gate" in acts[0]) == cfg.shared_expert


def test_routing_is_exercised(tmp_path):
    """The parity above would fail with a wrong routing: top-1 instead of top-2, no renormalisation, or the
    shared expert's gate dropped all change the logits beyond tolerance."""
    ref_model = build_torch_model("mixtral", seed=4)
    ours = load_model(save(ref_model, str(tmp_path / "m")))
    tokens = np.random.default_rng(1).integers(0, ours.config.vocab_size, (2, 10))
    ref_logits, _ = moe_reference_activations(ref_model, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    for change in (dict(experts_per_token=1), dict(experts_per_token=3), dict(norm_topk_prob=False)):
        wrong = jaxind.from_params(ours.config.replace(**change), ours.params)
        assert rel_err(wrong.logits(tokens), ref_logits) > 100 * TOL, change
    qwen = build_torch_model("qwen2_moe", seed=4)
    ours = load_model(save(qwen, str(tmp_path / "q")))
    ref_logits, _ = moe_reference_activations(qwen, tokens)
    ungated = dict(
        ours.params, layers={**ours.params["layers"], "shared_gate": 0 * ours.params["layers"]["shared_gate"]}
    )
    assert rel_err(jaxind.from_params(ours.config, ungated).logits(tokens), ref_logits) > 100 * TOL
    normed = jaxind.from_params(ours.config.replace(norm_topk_prob=True), ours.params)
    assert rel_err(normed.logits(tokens), ref_logits) > 100 * TOL


def test_dense_routing_equals_sparse_dispatch():
    """The dense MoE (every expert on every token, weighted) equals dispatching each token to its top-k experts."""
    cfg = jaxind.ModelConfig(
        family="mixtral", vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=0,
        n_experts=5, experts_per_token=2, d_expert=12,
    )  # fmt: skip
    layer = model.layer_slice(_random_params(cfg), 0)
    x = jax.random.normal(jax.random.key(1), (3, 7, 16))
    y, _ = jax.jit(moe.moe_mlp, static_argnums=1)(layer, cfg, x)
    _, top, index = moe.route(layer["router"], cfg, x)
    w = {k: np.asarray(v, np.float64) for k, v in layer.items()}
    xs, expected = np.asarray(x, np.float64), np.zeros((3, 7, 16))
    for b, t in np.ndindex(3, 7):
        for weight, e in zip(np.asarray(top[b, t]), np.asarray(index[b, t])):
            g, u = xs[b, t] @ w["expert_gate"][e], xs[b, t] @ w["expert_up"][e]
            expected[b, t] += weight * ((g / (1 + np.exp(-g)) * u) @ w["expert_down"][e])
    assert rel_err(y, expected) < 1e-5
    np.testing.assert_allclose(np.asarray(top).sum(-1), 1.0, rtol=1e-6)  # Mixtral renormalises
    assert len(np.unique(np.asarray(index[..., 0]))) > 2  # the tokens really go to different experts


def _mixtral_config(**changes) -> dict:
    hf = {
        "model_type": "mixtral",
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.1,
        "output_router_logits": True,
    }
    return {**hf, **changes}


def _qwen_config(**changes) -> dict:
    hf = {
        "model_type": "qwen2_moe",
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
    }
    return {**hf, **changes}


def test_config_reading():
    mix = from_hf_config(_mixtral_config())  # training-only router settings do not block
    assert (mix.n_experts, mix.experts_per_token, mix.d_expert, mix.d_ff) == (8, 2, 24, 0)
    assert mix.norm_topk_prob and not mix.shared_expert and mix.sliding_window is None
    assert from_hf_config(_mixtral_config(sliding_window=16)).sliding_window == 16
    qwen = from_hf_config(_qwen_config())
    assert (qwen.n_experts, qwen.d_expert, qwen.d_ff, qwen.shared_expert, qwen.qkv_bias) == (8, 24, 40, True, True)
    assert not qwen.norm_topk_prob and from_hf_config(_qwen_config(norm_topk_prob=True)).norm_topk_prob
    assert jaxind.ModelConfig.from_json(qwen.to_json()) == qwen
    assert {"n_experts", "shared_expert"} <= set(json.loads(qwen.to_json()))
    # a dense config's JSON leaves the expert fields out (checkpoints readable by jaxind before MoE), and reads back
    dense = qwen.replace(
        family="qwen2", n_experts=0, experts_per_token=0, d_expert=0, shared_expert=False, norm_topk_prob=True
    )
    assert not {"n_experts", "d_expert", "shared_expert"} & set(json.loads(dense.to_json()))
    assert jaxind.ModelConfig.from_json(dense.to_json()) == dense
    per_layer = 2 * 48 * 48 + 2 * 48 * 16 + 2 * 48 + 8 * 3 * 48 * 24 + 8 * 48 + 3 * 48 * 40 + 48 + 16 + 16 + 48
    assert qwen.num_params() == 97 * 48 * 2 + 48 + 2 * per_layer


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        (_qwen_config(decoder_sparse_step=2), "dense MLP layers between the MoE layers"),
        (_qwen_config(mlp_only_layers=[1]), "dense MLP layers between the MoE layers"),
        (_qwen_config(use_sliding_window=True), "use_sliding_window"),
        (_qwen_config(shared_expert_intermediate_size=0), "shared_expert_intermediate_size=0"),
        (_mixtral_config(num_experts_per_tok=9), "experts_per_token"),
        (_mixtral_config(num_local_experts=0), "0 experts"),
        (_mixtral_config(hidden_act="gelu"), "hidden activation"),
    ],
)
def test_unsupported_moe_layouts_are_refused(hf, message):
    with pytest.raises(UnsupportedModelError, match=message):
        from_hf_config(hf)


def test_checkpoint_with_a_missing_or_extra_expert_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = save(build_torch_model("mixtral", seed=5), str(tmp_path / "m"))
    weights = load_file(os.path.join(path, "model.safetensors"))
    name = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    save_file({k: v for k, v in weights.items() if k != name}, os.path.join(path, "model.safetensors"))
    with pytest.raises(JaxindError, match="layers.1.expert_down"):
        load_model(path)
    extra = {**weights, name.replace("experts.7", "experts.8"): weights[name]}
    save_file(extra, os.path.join(path, "model.safetensors"))
    with pytest.raises(JaxindError, match="expert 8 of layers.1.expert_down, but the config has 8 experts"):
        load_model(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["num_local_experts"] == 8


# --------------------------------------------------------------------------------------------
# The symmetry group: experts (with the router's columns), each expert's units, the shared expert's units.

MOE_CONFIGS = {
    "mixtral": jaxind.ModelConfig(
        "mixtral", 64, 16, 2, 4, 2, 4, 0, n_experts=4, experts_per_token=2, d_expert=12, sliding_window=5
    ),
    "qwen2_moe": jaxind.ModelConfig(
        "qwen2_moe", 64, 16, 2, 4, 2, 4, 20, qkv_bias=True, n_experts=5, experts_per_token=3, d_expert=8,
        norm_topk_prob=False, shared_expert=True,
    ),
}  # fmt: skip
TOKENS = jax.random.randint(jax.random.key(99), (2, 9), 0, 64)


@pytest.fixture(params=sorted(MOE_CONFIGS), scope="module")
def moe_model(request):
    cfg = MOE_CONFIGS[request.param]
    return cfg, _random_params(cfg)


def _random_params(cfg: jaxind.ModelConfig, seed: int = 0):
    """An independent random model with randomised norms and biases (as ``helpers.random_params``), drawn with
    numpy: ``N(0, 0.3^2)`` weights and biases, norms ``1 + N(0, 0.3^2)`` (no per-shape JAX RNG compilations)."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for path, shape in model.param_shapes_flat(cfg).items():
        offset = 1.0 if path.endswith("norm") else 0.0
        leaves[path] = jnp.asarray(offset + 0.3 * rng.standard_normal(shape), jnp.float32)
    params = {path: leaf for path, leaf in leaves.items() if not path.startswith("layers.")}
    params["layers"] = {path[len("layers.") :]: leaf for path, leaf in leaves.items() if path.startswith("layers.")}
    return params


def _apply(params, cfg, perm):
    """``symmetry.apply_permutation``, compiled once per config and Perm layout."""
    from jaxind.models import symmetry as S

    return jax.jit(S.apply_permutation, static_argnums=1)(params, cfg, perm)


def _logits(params, cfg):
    return np.asarray(model.forward_jit(params, cfg, TOKENS)[0])


def _assert_same_function(p1, c1, p2, c2):
    a, b = _logits(p1, c1), _logits(p2, c2)
    assert np.abs(a).max() > 1.0
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def _eq(p, q) -> bool:
    return all(bool(jnp.all(x == y)) for x, y in zip(p, q))


def test_group_element_preserves_logits_and_moves_every_leaf(moe_model):
    from jaxind.models import symmetry as S

    cfg, params = moe_model
    perm = S.draw_permutations(jax.random.key(1), cfg)
    assert perm.experts.shape == (cfg.n_layers, cfg.n_experts)
    assert perm.expert_mlp.shape == (cfg.n_layers, cfg.n_experts, cfg.d_expert)
    out = _apply(params, cfg, perm)
    for name, leaf in params["layers"].items():
        if name not in ("attn_norm", "mlp_norm", "q_bias", "k_bias", "v_bias"):  # moved by no perm drawn here
            assert not np.allclose(leaf, out["layers"][name]), name
    l, e = 1, 2
    src, units = int(perm.experts[l, e]), perm.expert_mlp[l, e]
    s = perm.resid
    np.testing.assert_array_equal(out["layers"]["expert_up"][l, e], params["layers"]["expert_up"][l, src][s][:, units])
    np.testing.assert_array_equal(
        out["layers"]["expert_down"][l, e], params["layers"]["expert_down"][l, src][units][:, s]
    )
    np.testing.assert_array_equal(out["layers"]["router"][l], params["layers"]["router"][l][s][:, perm.experts[l]])
    _assert_same_function(params, cfg, out, cfg)
    # each part alone is a symmetry too
    ident = S.identity(cfg)
    for part in ("experts", "expert_mlp", "mlp"):
        if part == "mlp" and not cfg.d_ff:
            continue
        alone = ident._replace(**{part: getattr(perm, part)})
        if part == "expert_mlp":
            alone = alone._replace(experts=ident.experts)
        _assert_same_function(params, cfg, _apply(params, cfg, alone), cfg)


def test_a_broken_expert_action_changes_the_function(moe_model):
    """Sensitivity: moving the experts without the router's columns, or one expert's gate units without its
    down rows, is not a symmetry."""
    from jaxind.models import symmetry as S

    cfg, params = moe_model
    perm = S.draw_permutations(jax.random.key(2), cfg)
    layers = dict(params["layers"], router=params["layers"]["router"])
    moved = _apply(params, cfg, S.identity(cfg)._replace(experts=perm.experts))
    broken = dict(params, layers=dict(moved["layers"], router=layers["router"]))
    assert not np.allclose(_logits(params, cfg), _logits(broken, cfg), rtol=1e-3, atol=1e-3)
    gate = params["layers"]["expert_gate"]
    units = dict(
        params, layers=dict(params["layers"], expert_gate=gate.at[0, 0].set(gate[0, 0][:, perm.expert_mlp[0, 0]]))
    )
    assert not np.allclose(_logits(params, cfg), _logits(units, cfg), rtol=1e-3, atol=1e-3)


def test_group_laws_with_experts():
    from jaxind.models import symmetry as S

    cfg = MOE_CONFIGS["qwen2_moe"]  # (Mixtral's layout is exercised by the tests above)
    params = _random_params(cfg)
    p1, p2, p3 = (S.draw_permutations(jax.random.key(k), cfg) for k in (11, 12, 13))
    ident = S.identity(cfg)
    assert _eq(S.compose(S.invert(p1), p1), ident) and _eq(S.compose(p1, S.invert(p1)), ident)
    assert _eq(S.compose(p3, S.compose(p2, p1)), S.compose(S.compose(p3, p2), p1))
    assert _eq(S.invert(S.invert(p1)), p1)
    two_step = _apply(_apply(params, cfg, p1), cfg, p2)
    one_step = _apply(params, cfg, S.compose(p2, p1))
    for x, y in zip(jax.tree.leaves(two_step), jax.tree.leaves(one_step)):
        np.testing.assert_array_equal(x, y)
    back = _apply(_apply(params, cfg, p1), cfg, S.invert(p1))
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    # draws are uniform per component: every expert lands in every position across draws
    draws = jax.jit(jax.vmap(lambda k: S.draw_permutations(k, cfg)))(jax.random.split(jax.random.key(3), 400))
    counts = np.stack([np.bincount(np.asarray(draws.experts[:, 0, e]), minlength=cfg.n_experts) for e in range(2)])
    assert counts.min() > 400 / cfg.n_experts / 2
    assert not np.array_equal(draws.expert_mlp[0, 0, 0], draws.expert_mlp[0, 0, 1])  # own perm per expert


def test_rotation_and_fold_norms_with_experts(moe_model):
    from jaxind.models import symmetry as S

    cfg, params = moe_model
    folded, fcfg = S.fold_norms(params, cfg)
    _assert_same_function(params, cfg, folded, fcfg)
    rotated, rcfg = S.rotate_residual(params, cfg, S.random_orthogonal(jax.random.key(5), cfg.d_model))
    assert not np.allclose(rotated["layers"]["router"], params["layers"]["router"], atol=1e-2)
    _assert_same_function(params, cfg, rotated, rcfg)


# --------------------------------------------------------------------------------------------
# PERMTEST: the draws permute experts and units too; the kernel equals the loop that materialises g(B).


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_permtest_kernel_equals_loop_l2(family):
    from jaxind.stats.permtest import permtest, permtest_loop

    cfg = MOE_CONFIGS[family]
    a, b = _random_params(cfg, 1), _random_params(cfg, 2)
    key = jax.random.key(3)
    kern = permtest(a, b, cfg, key, num_perms=15)
    loop = permtest_loop(a, b, cfg, key, num_perms=15)
    np.testing.assert_allclose(kern.stats, loop.stats, rtol=2e-5)
    np.testing.assert_allclose(kern.stats_layers, loop.stats_layers, rtol=2e-5)
    assert kern.pvalue == loop.pvalue and len(np.unique(kern.stats)) == 15
    near = jax.tree.map(lambda w: w + 0.01 * jax.random.normal(jax.random.key(4), w.shape), a)
    assert permtest(a, near, cfg, key, num_perms=15).pvalue == pytest.approx(1 / 16)


@pytest.mark.slow  # a second PERMTEST compilation (a forward per draw)
def test_permtest_kernel_equals_loop_mc():
    from jaxind.stats.permtest import permtest, permtest_loop

    cfg = MOE_CONFIGS["qwen2_moe"]
    a, b = _random_params(cfg, 4), _random_params(cfg, 5)
    key = jax.random.key(6)
    kern = permtest(a, b, cfg, key, num_perms=7, statistic="mc", tokens=TOKENS)
    loop = permtest_loop(a, b, cfg, key, num_perms=7, statistic="mc", tokens=TOKENS)
    np.testing.assert_allclose(kern.stats, loop.stats, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# CSU / CSH / MATCH / L2 / MC on mixtures of experts: power on trained models, calibration under the null.


def _trained_config(family: str) -> jaxind.ModelConfig:
    shared = family == "qwen2_moe"
    return jaxind.ModelConfig(
        family, 256, 32, 2, 4, 2, 8, 32 if shared else 0, qkv_bias=shared, n_experts=8, experts_per_token=2,
        d_expert=24, norm_topk_prob=not shared, shared_expert=shared,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def trained(request):
    """Byte-level MoE models trained on the bundled corpus: a base, a fine-tuned copy (20 more AdamW steps on the
    second half), an independently initialised and trained model, and the fine-tune permuted and rotated."""
    from jaxind.cli import demo
    from jaxind.models import symmetry as S
    from jaxind.models import train

    cfg = _trained_config(request.param)
    corpus = demo.corpus_bytes()
    base, _ = train.train(model.init_params(cfg, jax.random.key(0)), cfg, corpus, steps=60, seed=0)
    tuned, losses = train.train(base, cfg, corpus[corpus.shape[0] // 2 :], steps=20, learning_rate=1e-3, seed=1)
    assert np.isfinite(losses).all()
    other, _ = train.train(model.init_params(cfg, jax.random.key(1000)), cfg, corpus, steps=60, seed=2)
    hidden, hcfg = S.rotate_residual(tuned, cfg, S.random_orthogonal(jax.random.key(3), cfg.d_model))
    hidden = S.apply_permutation(hidden, hcfg, S.draw_permutations(jax.random.key(4), hcfg))
    tokens = np.stack([corpus[i * 64 : (i + 1) * 64] for i in range(16)])
    models = {
        "base": jaxind.from_params(cfg, base),
        "tuned": jaxind.from_params(cfg, tuned),
        "other": jaxind.from_params(cfg, other),
        "hidden": jaxind.from_params(hcfg, hidden),
    }
    return models, tokens


def _run(a, b, tokens, tests, num_perms=99):
    from jaxind.pair.registry import TESTS, key_for
    from jaxind.pair.token_data import TokenData

    data = TokenData(tokens)
    out = {}
    for name in tests:
        options = {"num_perms": num_perms if name == "l2" else 19} if name in ("l2", "mc") else {}
        out[name] = TESTS[name](a, b, key=key_for(0, name), data=data, **options)
        assert out[name].error is None, out[name].error
    return out


@pytest.mark.slow  # trains three small MoE models per family (module fixture)
def test_fine_tune_is_detected_and_an_independent_model_is_not(trained):
    models, tokens = trained
    tuned = _run(models["base"], models["tuned"], tokens, ("csu", "csh", "match", "l2", "mc"))
    for name in ("csu", "csh", "match"):
        assert tuned[name].log10_pvalue < -10, (name, tuned[name].log10_pvalue)
    assert tuned["l2"].pvalue == pytest.approx(1 / 100) and tuned["mc"].pvalue == pytest.approx(1 / 20)
    assert tuned["csu"].exact and tuned["csh"].exact and tuned["l2"].exact and not tuned["match"].exact
    # every layer contributes its expert matching, each matched pair of experts and the shared expert
    cfg = models["base"].config
    parts = [r.extra["part"] for r in tuned["csu"].layers]
    expected = ["experts"] + ["expert"] * cfg.n_experts + (["shared"] if cfg.shared_expert else [])
    assert parts == expected * cfg.n_layers
    matched = [(r.extra["expert_a"], r.extra["expert_b"]) for r in tuned["csh"].layers if r.extra["part"] == "expert"]
    assert all(i == j for i, j in matched)  # the fine-tune keeps every expert in place
    other = _run(models["base"], models["other"], tokens, ("csu", "csh", "match", "l2", "mc"))
    for name, result in other.items():
        assert result.pvalue > 0.01, (name, result.pvalue)
    # permuted (experts, units, residual) and rotated: the weight tests lose it, MATCH does not
    hidden = _run(models["base"], models["hidden"], tokens, ("csu", "match"))
    assert hidden["match"].log10_pvalue < -10 and hidden["csu"].pvalue > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_calibration_under_the_null(family):
    """100 independent random pairs: the exact tests (CSU, CSH, L2 PERMTEST) give uniform p-values (KS), and
    MATCH's per-record p-values hold the 5% level. One compiled function per test, reused across pairs."""
    from scipy import stats

    from jaxind.stats import experts, permtest

    cfg = MOE_CONFIGS[family].replace(n_layers=2, n_experts=8, experts_per_token=2, d_expert=12, sliding_window=None)
    init = jax.jit(lambda k: model.init_params(cfg, k, std=0.3))
    tokens = [np.asarray(jax.random.randint(jax.random.key(2), (4, 16), 0, 64))]
    pairs = ((0, 0), (1, 1))
    pvals: dict[str, list[float]] = {"csu": [], "csh": [], "l2": [], "match": [], "match_records": []}
    for s in range(100):
        a, b = init(jax.random.key(20_000 + 2 * s)), init(jax.random.key(20_001 + 2 * s))
        key = jax.random.key(s)
        pvals["csu"].append(experts.csu(a, cfg, b, cfg, key).pvalue)
        stats_ab = experts.pass_for_pairs(a, cfg, b, cfg, tokens, pairs)
        pvals["csh"].append(experts.csh_from_pass(a, b, stats_ab, pairs, key).pvalue)
        result = experts.match_from_pass(a, b, stats_ab, pairs, key)
        pvals["match"].append(result.pvalue)
        pvals["match_records"] += [r.pvalue for r in result.layers]
        pvals["l2"].append(permtest.permtest(a, b, cfg, key, num_perms=99, devices=jax.devices()[:1]).pvalue)
    for name in ("csu", "csh"):
        assert stats.kstest(pvals[name], "uniform").pvalue > 0.01, name
    # L2: discrete uniform on k/100; compare after a half-step shift (as tests/test_permtest.py)
    assert stats.kstest(np.asarray(pvals["l2"]) - 0.005, "uniform").pvalue > 0.01
    assert stats.kstest(pvals["match"], "uniform").pvalue > 0.01
    assert np.mean(np.asarray(pvals["match_records"]) < 0.05) < 0.08


def test_registry_runs_the_expert_tests_and_refuses_what_does_not_apply():
    """The registry sends MoE pairs to the expert versions, a MoE vs a dense model to the block-by-block tests of
    jaxind.stats.upcycling (tests/test_upcycling.py); localized testing is refused with a reason (recorded as that
    test's error by the runner)."""
    from jaxind.pair.registry import TESTS, key_for

    cfg = MOE_CONFIGS["qwen2_moe"]
    a = jaxind.from_params(cfg, _random_params(cfg, 1))
    near = jaxind.from_params(cfg, jax.tree.map(lambda w: w + 0.01, a.params))
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (4, 8), 0, 64))
    for name in ("csu", "csh", "match"):
        result = TESTS[name](a, near, key=key_for(0, name), data=tokens)
        parts = {"expert", "shared"} | ({"experts"} if name != "match" else set())  # MATCH does not test the pairing
        assert result.log10_pvalue < -5 and {r.extra["part"] for r in result.layers} == parts
    dense_cfg = jaxind.ModelConfig("qwen2", 64, 16, 2, 4, 2, 4, 20, qkv_bias=True)
    dense = jaxind.from_params(dense_cfg, _random_params(dense_cfg, 2))
    for name in ("csu", "csh", "match"):
        result = TESTS[name](a, dense, key=key_for(0, name), data=tokens)
        assert {r.extra["part"] for r in result.layers} == {"blocks"} and result.pvalue > 0.01
    with pytest.raises(JaxindError, match="not implemented for mixtures of experts"):
        TESTS["localized"](a, near, key=key_for(0, "localized"), data=tokens)
    # the dense kernels refuse MoE params instead of silently testing the shared expert alone
    from jaxind.stats import constrained, experts, grams

    with pytest.raises(JaxindError, match="jaxind.stats.experts.csu"):
        constrained.csu(a.params, cfg, near.params, cfg, jax.random.key(0))
    with pytest.raises(JaxindError, match="mixture of experts"):
        grams.accumulate(a.params, cfg, near.params, cfg, [tokens], layers_a=(0,), layers_b=(0,), pair_index=((0, 0),))
    mixtral = jaxind.from_params(MOE_CONFIGS["mixtral"], _random_params(MOE_CONFIGS["mixtral"], 3))
    with pytest.raises(JaxindError, match="shared expert"):  # the expert kernel itself; the registry compares blocks
        experts.csu(a.params, cfg, mixtral.params, mixtral.config, jax.random.key(0))
    assert TESTS["csu"](a, mixtral, key=key_for(0, "csu")).layers[0].extra["part"] == "blocks"


def test_expert_similarity_ignores_unit_order_and_follows_the_experts():
    """S is invariant under permutations of each expert's units and equivariant under expert permutations:
    what makes CSU/CSH exact (jaxind.stats.experts module doc)."""
    from jaxind.stats import experts

    w_a = jax.random.normal(jax.random.key(0), (5, 16, 12))
    w_b = jax.random.normal(jax.random.key(1), (5, 16, 12))
    x_a, x_b = jax.random.normal(jax.random.key(2), (2, 40, 16))
    spaces = (experts.WEIGHTS, experts.Space(x_a.T @ x_b, x_a.T @ x_a, x_b.T @ x_b))
    units = jax.vmap(lambda k: jax.random.permutation(k, 12))(jax.random.split(jax.random.key(3), 5))
    order = jax.random.permutation(jax.random.key(4), 5)
    for space in spaces:
        s = np.asarray(experts.expert_similarity(w_a, w_b, space))
        shuffled = jnp.take_along_axis(w_b, units[:, None, :], axis=2)
        np.testing.assert_allclose(experts.expert_similarity(w_a, shuffled, space), s, rtol=1e-5)
        np.testing.assert_allclose(experts.expert_similarity(w_a, w_b[order], space), s[:, order], rtol=1e-5)
    # an expert is most similar to a noisy copy of itself (weights, or activations on the same inputs)
    for space in (experts.WEIGHTS, experts.Space(x_a.T @ x_a, x_a.T @ x_a, x_a.T @ x_a)):
        copy = np.asarray(experts.expert_similarity(w_a, w_a + 0.1 * w_b, space))
        assert (np.argmax(copy, axis=1) == np.arange(5)).all()


# --------------------------------------------------------------------------------------------
# GGUF: Qwen2-MoE (`qwen2moe`, which transformers also reads) and Mixtral (`llama` with `llama.expert_count`).


def test_gguf_qwen2moe_matches_transformers_gguf_loader(tmp_path):
    """transformers' GGUF loader reads qwen2moe's expert widths from its own defaults (1408 / 5632), so the tiny
    model has those widths; everything else is small."""
    import transformers
    from gguf_models import write_moe_gguf

    ref = build_torch_model(
        "qwen2_moe", seed=6, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
    )  # fmt: skip
    path = write_moe_gguf(str(tmp_path / "m.gguf"), ref)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = load_model(path)
    assert ours.config.family == "qwen2_moe" and ours.config.d_expert == 1408 and not ours.config.norm_topk_prob
    tokens = np.random.default_rng(2).integers(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        their_logits = theirs(torch.tensor(tokens)).logits.numpy()
    assert rel_err(ours.logits(tokens), their_logits) <= TOL
    _, ref_acts = moe_reference_activations(ref, tokens)
    acts = ours.mlp_activations(tokens, layers=[1])[1]
    for proj in ("expert_gate", "expert_up", "gate", "up"):
        assert rel_err(acts[proj], ref_acts[1][proj]) <= TOL, proj


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per_expert"])
def test_gguf_mixtral_matches_the_same_weights_from_safetensors(tmp_path, per_expert):
    """transformers reads a `llama` GGUF as a dense Llama (it ignores llama.expert_count), so the reference is
    transformers' Mixtral with the same weights."""
    from gguf_models import write_moe_gguf

    ref = build_torch_model("mixtral", seed=7)
    path = write_moe_gguf(str(tmp_path / "m.gguf"), ref, per_expert=per_expert)
    ours, hf = load_model(path), load_model(save(ref, str(tmp_path / "hf")))
    assert ours.config.replace(norm_eps=1e-5) == hf.config and ours.config.family == "mixtral"  # eps: float32 in GGUF
    for x, y in zip(jax.tree.leaves(ours.params), jax.tree.leaves(hf.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    tokens = np.random.default_rng(3).integers(0, ours.config.vocab_size, (2, 10))
    ref_logits, _ = moe_reference_activations(ref, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL


def test_gguf_mixture_of_experts_errors(tmp_path):
    from gguf_models import write_tiny_llama_gguf

    from converters.readers import GGUFFileReader

    partial = write_tiny_llama_gguf(str(tmp_path / "a.gguf"), metadata={"llama.expert_count": 8})
    with pytest.raises(JaxindError, match="lacks llama.expert_used_count"):
        GGUFFileReader(partial)
    dense = write_tiny_llama_gguf(
        str(tmp_path / "b.gguf"), metadata={"llama.expert_count": 8, "llama.expert_used_count": 2}
    )
    assert GGUFFileReader(dense).config.family == "mixtral"
    with pytest.raises(JaxindError, match="blk.0.ffn_gate.weight"):
        load_model(dense)  # expert metadata, dense tensors


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line.


def test_moe_checkpoint_round_trip_is_bit_identical(tmp_path):
    from converters import convert, sources

    src = save(build_torch_model("qwen2_moe", seed=8), str(tmp_path / "hf"), "sharded")
    convert.convert(src, str(tmp_path / "ckpt"), progress=False)
    cfg1, p1, _ = sources.read_model(src)
    cfg2, p2, meta = sources.read_model(str(tmp_path / "ckpt"))
    assert cfg1 == cfg2 and cfg2.moe and meta["format"] == "jaxind"
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.slow  # two CLI subprocesses
def test_cli_on_moe_models(tmp_path):
    """Mixtral against a perturbed copy: every test runs and detects it; against an independent dense model the
    expert tests run block by block (jaxind.stats.upcycling) and name no derived expert, and JSD runs. The results JSON
    validates against the schema."""
    import jsonschema
    from helpers import run_module

    from jaxind.stats.results import RESULTS_SCHEMA

    base = build_torch_model("mixtral", seed=9, num_hidden_layers=2)
    a = save(base, str(tmp_path / "a"))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = save(base, str(tmp_path / "b"))
    dense = save(build_torch_model("llama", seed=9, num_hidden_layers=2), str(tmp_path / "dense"))
    short = ["--num_sequences=4", "--seq_len=16", "--num_perms=19"]
    r = run_module("jaxind.main", f"--model_a={a}", f"--model_b={b}", "--tests=csu,csh,match,l2,jsd", *short,
                   f"--output={tmp_path / 'ab.json'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "ab.json").read_text())
    jsonschema.validate(doc, RESULTS_SCHEMA)
    assert doc["model_a"]["family"] == "mixtral" and doc["model_a"]["experts"] == 8
    assert "experts=8x24 top-2" in r.stdout
    for name in ("csu", "csh", "match"):
        assert doc["tests"][name]["log10_pvalue"] < -10, name
    assert doc["tests"]["l2"]["pvalue"] == pytest.approx(1 / 20)
    assert {rec["part"] for rec in doc["tests"]["csu"]["layers"]} == {"experts", "expert"}
    r = run_module("jaxind.main", f"--model_a={a}", f"--model_b={dense}", "--tests=csu,match,jsd", *short,
                   f"--output={tmp_path / 'ad.json'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "ad.json").read_text())
    for name in ("csu", "match"):  # compared block by block (jaxind.stats.upcycling), independent: no derived expert
        assert doc["tests"][name]["error"] is None and doc["tests"][name]["derived_experts"] == []
    assert doc["tests"]["jsd"]["statistic"] > 0
