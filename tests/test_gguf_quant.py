"""GGUF files as they are published: every quantisation type the ``gguf`` package dequantises loads (any mix in
one file), the writer (converters/quantize.py) stores each type within its precision with llama.cpp's per-tensor
fallback, and a fine-tuned model re-quantised to Q4_K or Q8_0 is still detected against its float source while an
independent model quantised the same way is not."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants
from gguf_models import write_typed_llama_gguf
from helpers import numpy_params

import jaxind
from converters import quantize
from converters.readers import GGUFFileReader, gguf_readable_types
from jaxind.errors import JaxindError, UnsupportedModelError

# Relative error (Frobenius, per tensor) each writable type may add to Gaussian-like weights: llama.cpp's bits per
# weight, with room (Q8_0 ~0.5%, 5-bit ~4%, 4-bit ~8%, MXFP4 ~11%, ternary types keep only signs: ~80%).
BOUNDS = {
    "F32": 0.0,
    "F16": 1e-3,
    "BF16": 5e-3,
    "Q8_0": 0.01,
    "Q5_0": 0.06,
    "Q5_1": 0.06,
    "Q4_0": 0.12,
    "Q4_1": 0.12,
    "Q4_K": 0.12,
    "MXFP4": 0.16,
    "TQ1_0": 0.9,
    "TQ2_0": 0.9,
}
CFG = jaxind.ModelConfig("llama", 256, 256, 2, 4, 2, 64, 512)  # rows of 256 and 512 values: K-quants apply


@pytest.fixture(scope="module")
def float_model():
    return CFG, numpy_params(CFG, 0, std=0.05)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_q4_k_blocks_are_read_back_by_gguf():
    """Our Q4_K bytes, dequantised by the gguf package, give the input back to 4-bit precision (a wrong byte
    layout gives errors of order 1); on Gaussian rows better than Q4_1 of the same 32-value groups, as in llama.cpp."""
    x = (0.05 * np.random.default_rng(1).standard_normal((16, 512))).astype(np.float32)
    x[0] = np.linspace(-1, 3, 512)  # a row of one sign mostly: the mins matter
    x[1] = 0.0  # an all-zero row: scales 0, no division by zero
    stored = quantize.quantize_q4_k(x)
    assert stored.shape == (16, 2 * 144) and stored.dtype == np.uint8
    back = quants.dequantize(stored, GGMLQuantizationType.Q4_K)
    assert np.isfinite(back).all() and (back[1] == 0).all()
    assert _rel(back[0], x[0]) < 0.05  # Q4_K's mins are offsets below zero only: groups above zero lose a bit
    q4_1 = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert _rel(back[2:], x[2:]) < _rel(q4_1[2:], x[2:]) < 0.1


def test_every_writable_type_loads_within_its_precision(float_model, tmp_path):
    cfg, params = float_model
    assert set(BOUNDS) == set(quantize.writable_types())  # a new gguf type needs a bound here
    for qtype, bound in BOUNDS.items():
        path = quantize.write_gguf_quantized(cfg, params, str(tmp_path / f"{qtype}.gguf"), qtype)
        stored = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
        assert stored["blk.0.ffn_up.weight"] == stored["token_embd.weight"] == qtype
        assert stored["blk.1.attn_norm.weight"] == "F32"
        loaded = jaxind.load_model(path)
        got = loaded.config
        assert got == cfg.replace(max_positions=got.max_positions, norm_eps=got.norm_eps)
        assert got.norm_eps == pytest.approx(cfg.norm_eps)
        leaves = zip(jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree_util.tree_leaves(params))
        for (where, got), want in leaves:
            err, leaf = _rel(got, want), jax.tree_util.keystr(where)
            assert err <= bound + 1e-7, (qtype, leaf, err)
            if "norm" in leaf or qtype == "F32":
                assert err == 0, (qtype, leaf, err)  # norms stay float32, as llama.cpp keeps them
            else:
                assert err > 0, (qtype, leaf)  # really stored at the type, not as float32


def test_tensors_that_do_not_fit_the_block_fall_back_as_llama_cpp_does(tmp_path):
    """Rows of 96 values (not a multiple of 256) store Q4_K as Q5_0; rows of 40 (not a multiple of 32) as F16;
    q/k/v biases stay F32 (q/k in llama.cpp's RoPE row order, read back in place); tied embeddings stay tied."""
    cfg = jaxind.ModelConfig("llama", 64, 96, 1, 2, 1, 48, 40, qkv_bias=True, tie_embeddings=True)
    params = numpy_params(cfg, 1, std=0.05)
    path = quantize.write_gguf_quantized(cfg, params, str(tmp_path / "m.gguf"), "Q4_K")
    stored = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert stored["blk.0.ffn_up.weight"] == stored["blk.0.attn_q.weight"] == "Q5_0"
    assert stored["blk.0.ffn_down.weight"] == "F16" and stored["output_norm.weight"] == "F32"
    loaded = jaxind.load_model(path)
    assert _rel(loaded.params["layers"]["down"], params["layers"]["down"]) < 1e-3
    assert _rel(loaded.params["layers"]["up"], params["layers"]["up"]) < 0.06
    assert loaded.config.tie_embeddings and "output.weight" not in stored
    for bias in ("q_bias", "k_bias", "v_bias"):
        np.testing.assert_array_equal(loaded.params["layers"][bias], params["layers"][bias])


def test_every_readable_type_loads_as_gguf_dequantises_it(tmp_path):
    """One file holding every type the gguf package dequantises (K-quants, IQ types, ... with random blocks):
    each tensor reads as gguf's own dequantisation of its bytes, and the file loads as a model."""
    types = [t for t in gguf_readable_types() if t != "F32"]
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ4_XS", "IQ1_M"} <= set(types)
    path = str(tmp_path / "mix.gguf")
    written = write_typed_llama_gguf(path, types, layers=2 + len(types) // 8)
    assert {kind for kind, _ in written.values()} == set(types)
    reader = GGUFFileReader(path)
    for name, (kind, data) in written.items():
        want = data.astype(np.float32) if kind == "F16" else quants.dequantize(data, GGMLQuantizationType[kind])
        np.testing.assert_array_equal(reader.load(name), want, err_msg=f"{name} ({kind})")
    loaded = jaxind.load_model(path)
    for layer in range(loaded.config.n_layers):
        kind, data = written[f"blk.{layer}.ffn_up.weight"]
        want = data.astype(np.float32) if kind == "F16" else quants.dequantize(data, GGMLQuantizationType[kind])
        np.testing.assert_array_equal(loaded.params["layers"]["up"][layer], want.T, err_msg=kind)


def test_a_tensor_type_gguf_cannot_dequantise_is_refused_by_name(tmp_path):
    path = str(tmp_path / "q8_1.gguf")
    write_typed_llama_gguf(path, ["Q8_0", "Q8_0", "Q8_1"], d=64, ff=64, vocab=64)
    with pytest.raises(UnsupportedModelError) as e:
        GGUFFileReader(path)
    assert "GGUF tensor blk.0.attn_k.weight" in str(e.value) and "stored as Q8_1" in str(e.value)
    assert "re-quantise" in str(e.value)


def test_unwritable_types_and_models_are_refused_before_writing(float_model, tmp_path):
    cfg, params = float_model
    with pytest.raises(JaxindError, match=r"cannot write GGUF type 'IQ2_XXS': writable types are F32, F16"):
        quantize.write_gguf_quantized(cfg, params, str(tmp_path / "a.gguf"), "IQ2_XXS")
    with pytest.raises(JaxindError, match="plain Llama-family models only"):
        quantize.write_gguf_quantized(cfg.replace(family="qwen3", qk_norm="head"), params, str(tmp_path / "b.gguf"))
    assert not list(tmp_path.iterdir())


def test_readme_lists_the_readable_types():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"GGUF tensor types that load: (.*?)\. ", readme, re.S)
    assert m is not None
    listed = re.findall(r"`([A-Z0-9_]+)`", m.group(1))
    assert listed == list(gguf_readable_types())


@pytest.fixture(scope="module")
def trained():
    """Byte-level one-layer models (d=256, so Q4_K applies to every matrix) trained with AdamW on the bundled
    corpus, all with one optimizer (one compilation): a base, a fine-tuned copy (more steps on the second half)
    and an independently initialised and trained model."""
    from jaxind.cli import demo
    from jaxind.models import train

    cfg = jaxind.ModelConfig("llama", 256, 256, 1, 4, 2, 64, 256)
    corpus = demo.corpus_bytes()
    kw = dict(steps=10, batch_size=8, seq_len=64, learning_rate=1e-4)
    as_numpy = lambda p: jax.tree_util.tree_map(np.asarray, p)  # noqa: E731
    base, _ = train.train(numpy_params(cfg, 0, std=0.05), cfg, corpus, seed=0, **kw)
    tuned, losses = train.train(base, cfg, corpus[corpus.shape[0] // 2 :], seed=1, **kw)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    other, _ = train.train(numpy_params(cfg, 7, std=0.05), cfg, corpus, seed=2, **kw)
    tokens = np.stack([corpus[i * 64 : (i + 1) * 64] for i in range(8)])
    return cfg, as_numpy(base), as_numpy(tuned), as_numpy(other), tokens


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_a_requantized_fine_tune_is_detected_and_an_independent_model_is_not(trained, qtype, tmp_path):
    from jaxind.pair.registry import TESTS, key_for
    from jaxind.pair.token_data import TokenData

    cfg, base, tuned, other, tokens = trained
    source = jaxind.from_params(cfg, base)
    data = TokenData(tokens)
    for name, params, derived in (("tuned", tuned, True), ("other", other, False)):
        path = quantize.write_gguf_quantized(cfg, params, str(tmp_path / f"{name}.gguf"), qtype)
        suspect = jaxind.load_model(path)
        assert 0 < _rel(suspect.params["layers"]["up"], params["layers"]["up"]) < BOUNDS[qtype]
        for test in ("csu", "match"):
            result = TESTS[test](source, suspect, key=key_for(0, test), data=data)
            assert result.error is None, result.error
            if derived:
                assert result.pvalue < 1e-6, (qtype, name, test, result.pvalue)
            else:
                assert result.pvalue > 0.01, (qtype, name, test, result.pvalue)


@pytest.mark.slow  # re-quantises the real SmolLM2 (Q4_1) twice
def test_real_smollm2_requantized_is_detected_against_the_original(smollm2, smollm2_path, tmp_path):
    from jaxind.pair.registry import TESTS, key_for

    source = GGUFFileReader(smollm2_path)  # parsed once (most of it the tokenizer's 49,152 entries)
    for qtype, bound in (("Q8_0", 0.02), ("Q4_K", 0.12)):
        path = quantize.requantize_gguf(source, str(tmp_path / f"{qtype}.gguf"), qtype, tokenizer=False)
        stored = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
        if qtype == "Q4_K":  # rows of 576 values take llama.cpp's fallback, rows of 1536 fit
            assert stored["blk.0.ffn_up.weight"] == "Q5_0" and stored["blk.0.ffn_down.weight"] == "Q4_K"
        else:
            assert stored["blk.0.ffn_up.weight"] == stored["blk.0.ffn_down.weight"] == "Q8_0"
        suspect = jaxind.load_model(path)
        assert suspect.config == smollm2.config
        assert 0 < _rel(suspect.params["layers"]["up"], smollm2.params["layers"]["up"]) < bound
        result = TESTS["csu"](smollm2, suspect, key=key_for(0, "csu"), layers=range(0, 30, 6))
        assert result.error is None and result.pvalue < 1e-6, (qtype, result.pvalue)
