"""The real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (float32 both,
dequantised alike by the `gguf` package)."""

import numpy as np
import pytest
from test_parity import rel_err, torch_reference

pytestmark = pytest.mark.slow  # the real model: loading, parity, MATCH, the CLI on it


@pytest.fixture(scope="module")
def reference(smollm2_torch):
    return smollm2_torch


def test_config_read_from_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.family, c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (
        "llama",
        30,
        576,
        1536,
        9,
        3,
        64,
        49152,
    )
    assert c.tie_embeddings and c.rope_theta == 100000.0
    assert smollm2.summary()["params"] == c.num_params() == 134_515_008


def test_logits_and_activations_match_transformers(smollm2, reference):
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 24))
    ref_logits, ref_acts = torch_reference(reference, tokens)
    assert rel_err(smollm2.logits(tokens), ref_logits) <= 1e-3
    acts = smollm2.mlp_activations(tokens, layers=[0, 14, 29])
    for layer in (0, 14, 29):
        for proj in ("gate", "up"):
            assert rel_err(acts[layer][proj], ref_acts[layer][proj]) <= 1e-3


def test_gguf_tokenizer_and_real_text(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    assert tok.decode(ids) == "The quick brown fox jumps over the lazy dog."
    logits = np.asarray(smollm2.logits(np.asarray([ids])))
    # A real language model predicts real text far better than chance (log 49152 = 10.8 nats).
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.mean([logp[0, i, ids[i + 1]] for i in range(len(ids) - 1)])
    assert nll < 6.0


def test_match_detects_disguised_and_fine_tuned_smollm2(smollm2, smollm2_finetuned, corpus_ids):
    """MATCH on the real model: a copy with every MLP's hidden units permuted and the residual
    stream rotated, and a fine-tuned copy, are both detected from activations on real text."""
    import jax

    from jaxind.models import model, symmetry
    from jaxind.stats import match

    cfg = smollm2.config
    k_perm, k_rot = jax.random.split(jax.random.key(7))
    disguised = symmetry.apply_permutation(smollm2.params, cfg, symmetry.draw_permutations(k_perm, cfg))
    disguised, disguised_cfg = symmetry.rotate_residual(disguised, cfg, symmetry.random_orthogonal(k_rot, cfg.d_model))
    tokens = corpus_ids[: 4 * 64].reshape(4, 64)
    logits = model.forward_jit(disguised, disguised_cfg, tokens[:1])[0]
    assert rel_err(logits, smollm2.logits(tokens[:1])) < 1e-3  # the same function
    layers = [(l, l) for l in (0, 10, 20, 29)]
    for params_b, cfg_b in ((disguised, disguised_cfg), (smollm2_finetuned, cfg)):
        out = match.match_test(
            smollm2.params, cfg, params_b, cfg_b, [tokens[:2], tokens[2:]], key=jax.random.key(0), layer_pairs=layers
        )
        assert out.log10_pvalue < -10, out.log10_pvalue


def test_cli_on_the_real_model_with_text_data(tmp_path, smollm2_path):
    """End to end on the real GGUF: its own tokenizer reads a text file; a model against itself
    is as dependent as it gets, and the JSON says which data was used."""
    import json

    from helpers import run_module

    out = tmp_path / "self.json"
    r = run_module(
        "jaxind.main",
        f"--model_a={smollm2_path}",
        "--model_b=smollm2",
        "--tests=csu,match",
        "--data=text:jaxind/data/demo_corpus.txt",
        "--num_sequences=4",
        "--seq_len=32",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["data"]["kind"] == "text" and doc["data"]["tokens_shape"] == [4, 32]
    assert doc["model_a"]["params"] == 134_515_008
    assert doc["tests"]["csu"]["log10_pvalue"] < -1000 and doc["tests"]["match"]["log10_pvalue"] < -1000
