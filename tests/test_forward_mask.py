"""The forward a lab builds on (issue 17, point 3): an attention mask (padding left or right; padded positions change
no real token's logits), positions counted over real tokens, intermediates collected by name through Flax's
``nnx.capture``, negative layer indices normalised, and the Gram pass of MATCH/CSH on padded batches."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import numpy_params
from test_paramspec import MOE
from test_symmetry import CONFIGS

import jaxind
from jaxind.errors import JaxindError
from jaxind.io import token_source
from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.stats import experts, grams

ROOT = Path(__file__).resolve().parent.parent
# RoPE (llama), sliding windows with local/global RoPE bases, sandwich norms and q/k norms (gemma3), learned
# positions (gpt2), a mixture of experts with a shared expert (qwen2_moe)
FAMILIES = {name: CONFIGS[name] for name in ("llama", "gemma3", "gpt2")} | {"qwen2_moe": MOE}
LENGTHS = (5, 8)  # real tokens per sequence; the batch is padded to T = 9 (4 and 1 padding tokens)
T = 9


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """A model of each family, its two sequences and each one's logits run unpadded, on its own."""
    cfg = FAMILIES[request.param]
    m = jaxind.from_params(cfg, numpy_params(cfg, 0))
    seqs = sequences(cfg)
    return cfg, m, seqs, [np.asarray(m.logits(s[None]))[0] for s in seqs]


def sequences(cfg: ModelConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg.vocab_size, n) for n in LENGTHS]


def padded(seqs: list[np.ndarray], side: str, pad_id: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens (B, T), mask (B, T))`` with each sequence padded by ``pad_id`` on ``side``."""
    tokens, mask = np.full((len(seqs), T), pad_id, np.int32), np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        at = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        tokens[i, at], mask[i, at] = s, 1
    return tokens, mask


def real(values: np.ndarray, mask: np.ndarray, row: int) -> np.ndarray:
    return np.asarray(values)[row][mask[row] == 1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_no_real_tokens_logits(family, side):
    cfg, m, seqs, alone = family
    tokens, mask = padded(seqs, side)
    got = np.asarray(m.logits(tokens, attention_mask=mask))
    for row, want in enumerate(alone):
        np.testing.assert_allclose(real(got, mask, row), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if side == "left" and cfg.family == "llama":  # the mask is what makes it hold: unmasked, padding moves logits
        unmasked = np.asarray(m.logits(tokens))
        assert np.abs(real(unmasked, mask, 0) - alone[0]).max() > 1e-2 * np.abs(alone[0]).max()


def test_module_forward_and_forward_logits_take_the_mask():
    cfg = CONFIGS["gemma3"]
    params = numpy_params(cfg, 0)
    tokens, mask = padded(sequences(cfg), "left")
    by_module = jax.jit(lambda p, t, m: model.Decoder(cfg, p)(t, attention_mask=m)[0])(params, tokens, mask != 0)
    by_fn = model.forward_logits(params, cfg)(tokens, mask)
    np.testing.assert_allclose(by_fn, by_module, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        by_fn[0, T - LENGTHS[0] :],
        model.forward_logits(params, cfg)(tokens[:1, T - LENGTHS[0] :])[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_intermediates_by_name_through_nnx_capture():
    cfg = CONFIGS["llama"]
    params = numpy_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    names = ("resid", "attn_out", "mlp_in", "gate", "up", "hidden")
    run = jax.jit(lambda p, t: nnx.capture(model.Decoder(cfg, p), nnx.Intermediate)(t, intermediates=names))
    (logits, acts), sown = run(params, tokens)
    assert sorted(acts) == [0, 1] and set(sown) == set(names)
    for name in names:  # sown: the collected layers stacked in order; returned: per layer
        stack = sown[name][0]
        assert stack.shape[:3] == (2, 2, 7)
        for layer in (0, 1):
            np.testing.assert_array_equal(stack[layer], acts[layer][name])
    one, last = acts[0], acts[1]
    layer1 = model.layer_slice(params, 1)
    # how the named values relate, as the layer computes them
    np.testing.assert_allclose(last["hidden"], jax.nn.silu(last["gate"]) * last["up"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last["gate"], last["mlp_in"] @ layer1["gate"], rtol=1e-4, atol=1e-5)
    mlp_in = model.norm(layer1, "mlp_norm", cfg, one["resid"] + last["attn_out"])
    np.testing.assert_allclose(last["mlp_in"], mlp_in, rtol=1e-4, atol=1e-5)
    mlp_out = last["hidden"] @ layer1["down"]
    np.testing.assert_allclose(last["resid"], one["resid"] + last["attn_out"] + mlp_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.unembed(params, cfg, last["resid"]), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_moe"], indirect=True)
def test_intermediates_of_a_left_padded_sequence_are_its_own(family):
    cfg, m, seqs, _ = family
    names = model.intermediate_names(cfg)
    tokens, mask = padded(seqs, "left")
    got = m.intermediates(tokens, names, layers=[-1], attention_mask=mask)
    want = m.intermediates(seqs[0][None], names, layers=[-1])
    last = cfg.n_layers - 1
    assert list(got) == [last] and sorted(got[last]) == sorted(names)
    for name in names:
        w = np.asarray(want[last][name])[0]
        np.testing.assert_allclose(
            real(got[last][name], mask, 0), w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name
        )


def test_negative_layer_indices_are_normalised():
    cfg = ModelConfig("llama", 32, 16, 3, 4, 2, 4, 24)
    m = jaxind.from_params(cfg, numpy_params(cfg, 0))
    tokens = np.arange(12).reshape(2, 6)
    acts = m.mlp_activations(tokens, layers=[0, -1])
    assert sorted(acts) == [0, 2]  # keys 0 and L - 1
    assert sorted(m.intermediates(tokens, ("resid",), layers=[-2])) == [1]
    _, by_forward = model.forward_jit(m.params, cfg, jnp.asarray(tokens), collect=(-1,), return_logits=False)
    assert sorted(by_forward) == [2]
    np.testing.assert_allclose(by_forward[2]["gate"], acts[2]["gate"], rtol=1e-6, atol=1e-6)


def test_bad_names_layers_and_masks_are_refused():
    m = jaxind.from_params(CONFIGS["gpt2"], numpy_params(CONFIGS["gpt2"], 0))
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(JaxindError, match=r"unknown intermediates \['gate'\] for a gpt2 model; choose from"):
        m.intermediates(tokens, ("resid", "gate"))
    with pytest.raises(JaxindError, match="sequence of names"):
        m.intermediates(tokens, "resid")
    with pytest.raises(JaxindError, match=r"shape \(2, 5\)"):
        m.logits(tokens, attention_mask=np.ones((2, 4)))
    with pytest.raises(JaxindError, match="only 1 .* and 0"):
        m.logits(tokens, attention_mask=np.full((2, 5), 2))
    with pytest.raises(JaxindError, match="out of range"):
        m.intermediates(tokens, ("resid",), layers=[-3])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_padded_batch_gives_the_grams_of_its_unpadded_sequences(moe):
    cfg = MOE if moe else CONFIGS["qwen2_bias"]
    pa, pb = numpy_params(cfg, 1), numpy_params(cfg, 2)
    seqs = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 5))
    tokens, mask = padded(seqs[:1], "left")  # one sequence padded on the left, one on the right, 4 tokens each
    right_tokens, right_mask = padded(seqs[1:], "right")
    batch = (np.concatenate([tokens, right_tokens]), np.concatenate([mask, right_mask]).astype(np.float32))
    kw = {"layers_a": (0, 1), "layers_b": (0, 1), "pair_index": ((0, 0), (1, 1), (0, 1))}
    accumulate = experts.accumulate if moe else grams.accumulate
    got = accumulate(pa, cfg, pb, cfg, [batch], **kw)
    want = accumulate(pa, cfg, pb, cfg, [seqs], **kw)
    assert got.count == want.count == seqs.size
    fields = ("cross", "gram_a", "gram_b") if moe else ("cross",)
    for name in fields:
        w = np.asarray(getattr(want, name))
        np.testing.assert_allclose(np.asarray(getattr(got, name)), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    if not moe:
        for proj in ("gate", "up"):
            np.testing.assert_allclose(got.sq_a[proj], want.sq_a[proj], rtol=1e-4)
            np.testing.assert_allclose(got.sq_b[proj], want.sq_b[proj], rtol=1e-4)


def test_only_padded_sequences_take_the_masked_forward():
    """data.batches' filler rows (all uncounted) and full rows keep the unmasked forward of earlier releases."""
    tokens = np.arange(30).reshape(5, 6) % 7
    filled = list(grams.normalize_batches(token_source.batches(tokens, 4)))
    assert len(filled) == 2 and all(attention is None for _, _, attention in filled)
    mask = np.ones((2, 6))
    mask[1, :2] = 0
    ((_, _, attention),) = grams.normalize_batches([(tokens[:2], mask)])
    np.testing.assert_array_equal(attention, mask)


def test_readme_masked_forward_example_runs_as_a_doctest():
    import doctest

    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "attention_mask" in b and ">>>" in b]
    assert blocks, "README has no doctested masked-forward example"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(blocks[0], {}, "README", "README.md", 0)
    assert len(test.examples) >= 5
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


def test_the_mask_on_a_mesh_gives_the_one_device_logits():
    from jaxind.parallel import sharding

    cfg = CONFIGS["llama"]
    params = numpy_params(cfg, 0)
    placed = jaxind.from_params(cfg, params, layout=sharding.Layout(sharding.make_mesh("data:2,fsdp:4")))
    tokens, mask = padded(sequences(cfg) * 2, "left")  # 4 sequences, split over the data axis
    want = np.asarray(jaxind.from_params(cfg, params).logits(tokens, attention_mask=mask))
    np.testing.assert_allclose(np.asarray(placed.logits(tokens, attention_mask=mask)), want, rtol=1e-4, atol=1e-4)


def test_match_and_csh_on_a_tokenizers_padded_output_equal_the_unpadded_sequences():
    """A tokenizer's padded output (``input_ids`` + ``attention_mask``, padding left on some rows and right on
    others) as ``data``: CSH and MATCH give the matchings and p-values of the same sequences unpadded; the tests
    that read no mask refuse it in one line."""
    cfg = CONFIGS["qwen2_bias"]
    a, b = (jaxind.from_params(cfg, numpy_params(cfg, s)) for s in (1, 2))
    seqs = np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 6))
    left, left_mask = padded(list(seqs[:2]), "left")
    right, right_mask = padded(list(seqs[2:]), "right")
    data = {"input_ids": np.concatenate([left, right]), "attention_mask": np.concatenate([left_mask, right_mask])}
    for name in ("csh", "match"):
        key = jaxind.key_for(0, name)
        got, want = jaxind.TESTS[name](a, b, key=key, data=data), jaxind.TESTS[name](a, b, key=key, data=seqs)
        assert got.error is None and want.error is None, (got.error, want.error)
        assert [r.statistic for r in got.layers] == pytest.approx([r.statistic for r in want.layers], abs=1e-9)
        assert got.log10_pvalue == pytest.approx(want.log10_pvalue, rel=1e-9), name
    for name in ("mc", "jsd"):
        with pytest.raises(JaxindError, match="takes no padding mask"):
            jaxind.TESTS[name](a, b, key=0, data=data)
    with pytest.raises(JaxindError, match="padding mask must have the tokens' shape"):
        jaxind.TESTS["match"](a, b, key=0, data={"input_ids": seqs, "attention_mask": np.ones((4, 5))})
