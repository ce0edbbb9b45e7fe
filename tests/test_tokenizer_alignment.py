"""Models with different tokenizers (jaxind.io.alignment): each model reads the same text with its own tokenizer and
activations are compared where a token of each ends at the same byte. Unit tests of the byte offsets and the
alignment rule, then tiny model pairs on the demo corpus: B = A with added tokens is detected by MATCH, an
independent pair with another (sentencepiece-like, BOS-adding) tokenizer is not, and identical tokenizers keep
today's token array and p-values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import numpy_noise, numpy_params

from jaxind.errors import JaxindError
from jaxind.io import alignment, loaded_model, token_source
from jaxind.models.config import ModelConfig
from jaxind.pair.registry import TESTS, key_for
from jaxind.pair.token_data import TokenData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "jaxind", "data", "demo_corpus.txt")
VOCAB = 320
WORDS = [" model", " models", " tokens", " the", " and", " weights", " test", " independent", " training", " of"]
SPEC = dict(num_sequences=16, seq_len=32)


def _cfg(vocab: int) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
    )


def _corpus() -> str:
    with open(CORPUS, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def tokenizers():
    """A: byte-level BPE trained on the demo corpus; B: A plus whole words as added tokens; C: a sentencepiece-style
    unigram tokenizer (metaspace, its own vocabulary) that puts a BOS before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = _corpus()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=alphabet)
    bpe.train_from_iterator([text], trainer)
    tok_a = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tok_b = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<eos>")
    tok_b.add_tokens(WORDS)
    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    specials = ["<s>", "</s>", "<unk>"]
    sp.train_from_iterator([text], trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    tok_c = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok_a, tok_b, tok_c


# --- alignment unit tests ---


def test_byte_offsets_of_multibyte_text():
    text = "aé€😀b"
    assert alignment.byte_offsets(text).tolist() == [0, 1, 3, 6, 10, 11]
    assert alignment.byte_offsets("").tolist() == [0]


def test_align_takes_the_last_token_at_each_end_and_drops_the_rest():
    ends_a = np.asarray([3, 5, 5, 9, alignment.NO_END, 12])  # two byte pieces of one character end at 5
    ends_b = np.asarray([5, 7, 9, 12, 14])
    ia, ib = alignment.align(ends_a, ends_b)
    assert ia.tolist() == [2, 3, 5] and ib.tolist() == [0, 2, 3]


def test_encode_gives_byte_ends_of_multibyte_characters(tokenizers):
    tok_a, tok_b, _ = tokenizers
    text = "The model: é€😀 and the end"
    raw = text.encode()
    for tok in (tok_a, tok_b):
        enc = alignment.encode(tok, text)
        ends = enc.ends[enc.ends != alignment.NO_END]
        assert ends.max() == len(raw) and np.all(np.diff(ends) >= 0)
        for end in ends:  # every end falls on a character boundary of the UTF-8 text
            raw[:end].decode("utf-8")
    ea, eb = alignment.encode(tok_a, text), alignment.encode(tok_b, text)
    ia, ib = alignment.align(ea.ends, eb.ends)
    assert len(raw) in ea.ends[ia] and np.array_equal(ea.ends[ia], eb.ends[ib])
    emoji_end = len("The model: é€😀".encode())
    assert emoji_end in ea.ends[ia]  # the 4 byte pieces of the emoji: their last is aligned
    assert list(tok_b.convert_ids_to_tokens(eb.ids[ib[:3]].tolist()))[-1] == " model"


def test_a_bos_aligns_with_a_bos_only(tokenizers):
    tok_a, _, tok_c = tokenizers
    assert alignment.bos_id(tok_a) is None and alignment.bos_id(tok_c) == tok_c.bos_token_id
    text = "the model reads the text"
    a, c = alignment.encode(tok_a, text), alignment.encode(tok_c, text)
    both_bos = alignment.cut_window(c, c, 0, 5, (tok_c.bos_token_id, tok_c.bos_token_id))
    assert both_bos.ids_a[0] == tok_c.bos_token_id and both_bos.ids_b[0] == tok_c.bos_token_id
    assert alignment.align(both_bos.ends_a, both_bos.ends_b)[0][0] == 0  # the two BOS tokens are aligned
    one_bos = alignment.cut_window(a, c, 0, 5, (None, tok_c.bos_token_id))
    ia, ib = alignment.align(one_bos.ends_a, one_bos.ends_b)
    assert one_bos.ids_b[0] == tok_c.bos_token_id and 0 not in ib  # C's BOS has no counterpart in A
    assert len(one_bos.ids_a) == 5 and one_bos.ends_b.max() <= one_bos.ends_a.max()


def test_too_few_aligned_positions_name_the_bytes_to_add(tokenizers, tmp_path):
    tok_a, _, tok_c = tokenizers
    path = tmp_path / "short.txt"
    path.write_text(_corpus()[:600], encoding="utf-8")
    spec = token_source.DataSpec(kind="text", path=str(path), num_sequences=2, seq_len=16)
    with pytest.raises(JaxindError) as info:
        token_source.make_tokens(spec, VOCAB, 300, tok_a, tok_c)
    message = str(info.value)
    assert "different tokenizers" in message and f"at least {alignment.MIN_POSITIONS}" in message
    assert "more text bytes" in message and "--num_sequences" in message


# --- tiny models ---


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def models(tokenizers):
    """A: a random initialisation; B: A with the added words' embedding rows set to the mean of each word's pieces,
    then fine-tuned (every weight moved by noise, tests/helpers.py's stand-in for training); C: independently
    initialised (with C's vocabulary); all made with numpy (no compilation)."""
    tok_a, tok_b, tok_c = tokenizers
    cfg_a, cfg_b, cfg_c = _cfg(VOCAB), _cfg(len(tok_b)), _cfg(300)
    params_a = numpy_params(cfg_a, 0)
    pieces = [tok_a(word, add_special_tokens=False)["input_ids"] for word in WORDS]
    rows = np.stack([params_a["embed"][p].mean(0) for p in pieces])
    params_b = dict(params_a, embed=np.concatenate([params_a["embed"], rows]))
    params_b["lm_head"] = np.concatenate([params_a["lm_head"], rows.T], axis=1)
    params_b = numpy_noise(params_b, 1, 0.05)  # the fine-tune after the extension (tests/helpers.py's proxy)
    params_c = numpy_params(cfg_c, 7)
    made = ((cfg_a, params_a, "a"), (cfg_b, params_b, "b"), (cfg_c, params_c, "c"))
    return tuple(loaded_model.from_params(c, p, n) for c, p, n in made)


def _match(x, y, tokens):
    return TESTS["match"](x, y, key=key_for(0, "match"), data=TokenData.wrap(tokens))


def test_added_tokens_are_aligned_and_detected_by_match(tokenizers, models, text_file):
    tok_a, tok_b, _ = tokenizers
    a, b, _ = models
    spec = token_source.DataSpec(kind="text", path=text_file, **SPEC)
    tokens = token_source.make_tokens(spec, a.config.vocab_size, b.config.vocab_size, tok_a, tok_b)
    assert isinstance(tokens, alignment.AlignedTokens)
    assert int(tokens.tokens_b.max()) >= VOCAB  # B reads its added tokens
    assert tokens.count < tokens.tokens_a.size and tokens.count > tokens.tokens_a.size // 2
    result = _match(a, b, tokens)
    assert result.error is None and result.log10_pvalue < -10, result


def test_an_independent_pair_with_other_tokenizers_is_not_rejected(tokenizers, models, text_file):
    tok_a, _, tok_c = tokenizers
    a, _, c = models
    spec = token_source.DataSpec(kind="text", path=text_file, **SPEC)
    tokens = token_source.make_tokens(spec, a.config.vocab_size, c.config.vocab_size, tok_a, tok_c)
    assert isinstance(tokens, alignment.AlignedTokens) and np.all(tokens.tokens_b[:, 0] == tok_c.bos_token_id)
    result = _match(a, c, tokens)
    assert result.error is None and result.pvalue > 0.01, result


def test_aligned_pass_equals_the_plain_pass_on_a_relabelled_vocabulary(tokenizers, models, text_file):
    """B = A with its vocabulary ids permuted (tokenizer and embedding rows alike): every position aligns, and the
    aligned pass gives the Grams the plain pass gives A against itself."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_a, _, _ = tokenizers
    a, _, _ = models
    order = np.random.default_rng(0).permutation(VOCAB)  # new id of old id i: order[i]
    spec = json.loads(tok_a.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {k: int(order[v]) for k, v in spec["model"]["vocab"].items()}
    for t in spec["added_tokens"]:
        t["id"] = int(order[t["id"]])
    backend = Tokenizer.from_str(json.dumps(spec))
    tok_p = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    inverse = np.argsort(order)
    params_p = dict(a.params, embed=a.params["embed"][inverse], lm_head=a.params["lm_head"][:, inverse])
    p = loaded_model.from_params(a.config, params_p, "relabelled")
    dspec = token_source.DataSpec(kind="text", path=text_file, **SPEC)
    plain = token_source.make_tokens(dspec, VOCAB, VOCAB, tok_a)
    aligned = token_source.make_tokens(dspec, VOCAB, VOCAB, tok_a, tok_p)
    assert isinstance(aligned, alignment.AlignedTokens) and aligned.count == plain.size
    pairs = ((0, 0), (1, 1))
    want = TokenData(plain).pass_stats(a.params, a.config, a.params, a.config, pairs)
    got = TokenData.wrap(aligned).pass_stats(a.params, a.config, p.params, p.config, pairs)
    assert got.count == want.count
    for i in range(2):
        for proj in ("gate", "up"):
            for x, y in zip(got.grams(i, proj), want.grams(i, proj)):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3)


def test_identical_tokenizers_keep_the_token_array_and_pvalues(tokenizers, models, text_file):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_a, _, _ = tokenizers
    a, _, _ = models
    backend = Tokenizer.from_str(tok_a.backend_tokenizer.to_str())
    copy = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    spec = token_source.DataSpec(kind="text", path=text_file, **SPEC)
    both = token_source.make_tokens(spec, VOCAB, VOCAB, tok_a, copy)
    alone = token_source.make_tokens(spec, VOCAB, VOCAB, tok_a)
    assert isinstance(both, np.ndarray) and np.array_equal(both, alone)
    assert _match(a, a, both).to_json()["layers"] == _match(a, a, alone).to_json()["layers"]


def test_tests_feeding_one_id_array_are_refused_on_aligned_text(tokenizers, models, text_file):
    tok_a, tok_b, _ = tokenizers
    a, b, _ = models
    spec = token_source.DataSpec(kind="text", path=text_file, **SPEC)
    tokens = TokenData.wrap(token_source.make_tokens(spec, a.config.vocab_size, b.config.vocab_size, tok_a, tok_b))
    with pytest.raises(JaxindError, match="different tokenizers"):
        TESTS["jsd"](a, b, key=key_for(0, "jsd"), data=tokens)
    csu = TESTS["csu"](a, b, key=key_for(0, "csu"), data=tokens)  # weights only: runs whatever the tokenizers
    assert csu.log10_pvalue < -10


@pytest.mark.slow
def test_real_smollm2_with_added_tokens_is_detected_on_text(smollm2, tmp_path):
    """The real SmolLM2 against itself with frequent words of the text added as tokens (embedding
    rows: the mean of each word's pieces): before, refused ("tokenise the data differently"); now MATCH on aligned
    text finds the pair."""
    import collections
    import dataclasses
    import re

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = smollm2.tokenizer
    text = _corpus()
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    spec = token_source.DataSpec(kind="text", path=str(path), num_sequences=4, seq_len=64)
    fed = tok.decode(
        token_source.text_windows(spec, tok).tokens.ravel().tolist()
    )  # the words added occur in the windows
    words = [w for w, _ in collections.Counter(re.findall(r" [A-Za-z]{4,}", fed)).most_common(20)]
    tok_b = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), eos_token=tok.eos_token
    )
    assert tok_b.add_tokens(words) >= 5
    vocab = smollm2.config.vocab_size
    assert len(tok) == vocab
    added = tok_b.convert_ids_to_tokens(list(range(vocab, len(tok_b))))
    embed = np.asarray(smollm2.params["embed"])
    rows = np.stack([embed[tok(w, add_special_tokens=False)["input_ids"]].mean(0) for w in added])
    cfg_b = dataclasses.replace(smollm2.config, vocab_size=len(tok_b))
    b = loaded_model.from_params(cfg_b, dict(smollm2.params, embed=np.concatenate([embed, rows])), "smollm2+words")
    tokens = token_source.make_tokens(spec, smollm2.config.vocab_size, cfg_b.vocab_size, tok, tok_b)
    assert isinstance(tokens, alignment.AlignedTokens) and int(tokens.tokens_b.max()) >= smollm2.config.vocab_size
    result = TESTS["match"](smollm2, b, key=key_for(0, "match"), data=TokenData.wrap(tokens), layers=[0, 10])
    assert result.error is None and result.log10_pvalue < -10, result


def test_a_sweep_still_refuses_a_model_with_another_tokenizer_on_jsonl(tokenizers, tmp_path, monkeypatch):
    """Sweeps share one token array (fingerprints): data.make_tokens now aligns two tokenizers instead of refusing
    them, so the sweep's check must still refuse a model whose tokenizer gives other ids."""
    import types

    from jaxind.io import tokenizer
    from jaxind.many import sweep

    tok_a, tok_b, _ = tokenizers
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in (_corpus()[:1500], _corpus())) + "\n")
    specs = {"/a": tok_a, "/b": tok_b}
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda spec: specs[spec["path"]])
    stored = types.SimpleNamespace(name="extended", meta={"tokenizer": {"kind": "dir", "path": "/b"}})
    d = {"kind": "jsonl", "path": str(docs), "num_sequences": 2, "seq_len": 16, "seed": 0}
    info = {"tokenizer": {"kind": "dir", "path": "/a"}, "tokenizer_model": "base", "vocab": VOCAB}
    with pytest.raises(JaxindError, match="model extended's tokenizer differs from model base's.*document 1"):
        sweep.check_tokenizer(stored, d, info)
