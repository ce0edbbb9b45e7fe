"""csu_aligned (issue 18, point 4): CSU after mapping B's residual stream onto A's by orthogonal Procrustes on
the embeddings of shared tokens. Power on rotated copies where plain CSU sees nothing, calibration on null pairs
(including pairs that share their embeddings exactly), the map against scipy, tokens shared by string."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.linalg
from helpers import numpy_noise, numpy_params
from scipy import stats

from jaxind.errors import JaxindError
from jaxind.io import shared_vocab
from jaxind.io.loaded_model import Model, from_params
from jaxind.models import symmetry
from jaxind.models.config import ModelConfig
from jaxind.pair.registry import TESTS, key_for
from jaxind.stats import constrained
from jaxind.stats.csu_aligned import csu_aligned, procrustes

TINY = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=48)


def disguise(params, cfg: ModelConfig, seed: int, permute_units: bool = False):
    """``params`` with its residual stream permuted and rotated (norm gains folded first), and, with
    ``permute_units``, its MLP units permuted too: the same function (jaxind.models.symmetry)."""
    perm = symmetry.draw_permutations(jax.random.key(seed), cfg)
    if not permute_units:
        perm = perm._replace(mlp=symmetry.identity(cfg).mlp)
    out = symmetry.apply_permutation(params, cfg, perm)
    return symmetry.rotate_residual(out, cfg, symmetry.random_orthogonal(jax.random.key(seed + 1), cfg.d_model))


@pytest.fixture(scope="module")
def base():
    return numpy_params(TINY, seed=0)  # random norm gains: folding is exercised


def test_procrustes_is_scipys_and_its_residual_measures_the_fit():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 12)), rng.normal(size=(200, 12))
    rotation, residual = procrustes(a, b)
    np.testing.assert_allclose(rotation, scipy.linalg.orthogonal_procrustes(a, b)[0], atol=1e-5)
    assert 0.8 < residual < 1.0  # unrelated rows
    exact = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    rotation, residual = procrustes(a, 3.0 * a @ exact)  # a scaled rotation: recovered, residual 0
    np.testing.assert_allclose(rotation, exact, atol=1e-5)
    assert residual < 1e-3


def test_detects_a_rotated_copy_that_plain_csu_misses(base):
    copy, cfg_b = disguise(base, TINY, seed=1)
    found = csu_aligned(base, TINY, copy, cfg_b, key=jax.random.key(0), return_map=True)
    plain = constrained.csu(base, TINY, copy, cfg_b, jax.random.key(0))
    assert found.log10_pvalue < -30 and found.exact and plain.pvalue > 0.01
    info = found.extra["procrustes"]
    assert info["shared_tokens"] == TINY.vocab_size and info["by"] == "id" and info["residual"] < 1e-2
    assert abs(info["trace"]) < 0.5 and np.asarray(info["map"]).shape == (16, 16)
    # a fine-tune stand-in of the rotated copy (every weight moved, embeddings too) is still detected
    tuned = numpy_noise(copy, seed=2, scale=0.15)
    assert csu_aligned(base, TINY, tuned, cfg_b, key=jax.random.key(0)).log10_pvalue < -10


def test_permuted_mlp_units_are_what_its_exactness_rests_on(base):
    """A copy whose MLP units are permuted looks like an independent model to it (docs/DESIGN.md §5.16)."""
    copy, cfg_b = disguise(base, TINY, seed=3, permute_units=True)
    assert csu_aligned(base, TINY, copy, cfg_b, key=jax.random.key(0)).pvalue > 1e-3


def _null_pvalues(n: int, offset: int) -> np.ndarray:
    """p-values of ``n`` independent pairs; every other one has B take A's embeddings exactly (the map is then the
    identity, fitted without error), the case where the map is as dependent on A as it can be."""
    pvalues = []
    for i in range(n):
        a, b = numpy_params(TINY, seed=offset + 2 * i), numpy_params(TINY, seed=offset + 2 * i + 1)
        if i % 2:
            b = {**b, "embed": a["embed"]}
        pvalues.append(csu_aligned(a, TINY, b, TINY, key=jax.random.key(offset + i)).pvalue)
    return np.asarray(pvalues)


def test_calibrated_on_a_few_null_pairs():
    assert stats.kstest(_null_pvalues(24, offset=100), "uniform").pvalue > 0.01


@pytest.mark.slow
def test_calibrated_on_many_null_pairs():
    pvalues = _null_pvalues(150, offset=1000)
    assert stats.kstest(pvalues, "uniform").pvalue > 0.01
    lo, hi = stats.binom.interval(0.99, len(pvalues), 0.05)
    assert lo <= (pvalues <= 0.05).sum() <= hi


def test_shared_tokens_by_string():
    vocab_a = {"Ġthe": 0, "a": 1, "Ġ": 2, "x": 3, "big": 9}
    vocab_b = {"▁the": 5, "a": 0, "▁": 1, "y": 2, "Ġa": 3, "▁a": 4, "big": 6}
    shared = shared_vocab.shared_by_string(vocab_a, vocab_b, size_a=9, size_b=10)
    # " the" and " " by marker, "a" exactly; " a" is ambiguous in B (dropped); "big" has no row in A (id 9 >= 9)
    assert shared.by == "string"
    assert list(zip(shared.ids_a.tolist(), shared.ids_b.tolist())) == [(0, 5), (1, 0), (2, 1)]


def _tokenizer(tokens: list[str]):
    """A fast tokenizer whose vocabulary is ``tokens`` (id = position)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    )


def _with_tokenizer(cfg: ModelConfig, params, tokenizer, path) -> Model:
    tokenizer.save_pretrained(path)
    m = from_params(cfg, params, str(path))
    m.meta["tokenizer"] = {"kind": "hf", "path": str(path)}
    return m


def test_registry_maps_tokens_by_string(base, tmp_path):
    """B numbers the tokens in reverse (its embedding rows reordered alike) and is rotated: found by string;
    matched by id the map would be wrong. A vocabulary with no string in common is refused in one line."""
    words = [f"w{i}" for i in range(TINY.vocab_size)]
    a = _with_tokenizer(TINY, base, _tokenizer(words), tmp_path / "a")
    copy, cfg_b = disguise({**base, "embed": base["embed"][::-1]}, TINY, seed=6)
    b = _with_tokenizer(cfg_b, copy, _tokenizer(words[::-1]), tmp_path / "b")
    result = TESTS["csu_aligned"](a, b, key=key_for(0, "csu_aligned"))
    assert result.extra["procrustes"]["by"] == "string" and result.extra["procrustes"]["shared_tokens"] == 64
    assert result.log10_pvalue < -30
    by_id = csu_aligned(a.params, a.config, b.params, b.config, key=jax.random.key(0))
    assert by_id.extra["procrustes"]["residual"] > 0.5 and by_id.log10_pvalue > result.log10_pvalue + 20
    other = _with_tokenizer(cfg_b, copy, _tokenizer([f"v{i}" for i in range(TINY.vocab_size)]), tmp_path / "c")
    with pytest.raises(JaxindError, match=r"found 0 tokens both vocabularies share \(by string\), fewer than the"):
        TESTS["csu_aligned"](a, other, key=key_for(0, "csu_aligned"))


def test_refuses_different_widths(base):
    wide = TINY.replace(d_model=32, head_dim=16)
    with pytest.raises(JaxindError, match="same residual width"):
        csu_aligned(base, TINY, base, wide, key=jax.random.key(0))  # refused before the params are read


@pytest.mark.slow
def test_detects_rotated_smollm2(smollm2):
    """The real SmolLM2 (its first and last layers, to keep the rotation cheap) against its rotated copy (a Haar
    rotation: residual permutations are among them): found, tokens shared by string; plain CSU sees nothing."""
    cfg = smollm2.config.replace(n_layers=2)
    params = {**smollm2.params, "layers": {k: v[np.asarray([0, 29])] for k, v in smollm2.params["layers"].items()}}
    copy, cfg_b = symmetry.rotate_residual(params, cfg, symmetry.random_orthogonal(jax.random.key(7), cfg.d_model))
    a, b = Model(cfg, params, dict(smollm2.meta)), Model(cfg_b, copy, {**smollm2.meta, "source": "rotated"})
    a.__dict__["tokenizer"] = smollm2.tokenizer  # read once for the session
    found = TESTS["csu_aligned"](a, b, key=key_for(0, "csu_aligned"))
    assert "tokenizer" not in b.__dict__  # B names A's tokenizer: not read again
    info = found.extra["procrustes"]
    assert info["by"] == "string" and info["shared_tokens"] > 40_000 and info["residual"] < 1e-2
    assert found.log10_pvalue < -100
    assert constrained.csu(params, cfg, copy, cfg_b, jax.random.key(0), layers=[1]).pvalue > 1e-3
