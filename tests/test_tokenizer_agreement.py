"""Text data is fed to model B as A's ids only if B's tokenizer turns all of it into A's ids: a tokenizer that swaps
two token ids is noticed even when the difference lies beyond the first 2,000 characters (the old check), and the
two tokenizations are then aligned (jaxind.io.alignment). Text files are read window by window
(jaxind.io.token_source.text_windows), and exactly the text fed is compared; JSONL whole."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxind.io import alignment, token_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320


def _corpus() -> str:
    with open(os.path.join(REPO, "jaxind", "data", "demo_corpus.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def tokenizers_and_text(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the demo corpus, a copy with two ids swapped, and a text whose
    first 2,000 characters both tokenise alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = _corpus()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    root = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(root / "a")
    tok_a = AutoTokenizer.from_pretrained(root / "a")
    head = set(tok_a(text[:2000], add_special_tokens=False)["input_ids"])
    ids = tok_a(text, add_special_tokens=False)["input_ids"]
    later = [i for i in dict.fromkeys(ids) if i not in head]  # ids first used after character 2,000
    swap = later[:2]
    spec = json.loads((root / "a" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    names = {v: k for k, v in vocab.items()}
    vocab[names[swap[0]]], vocab[names[swap[1]]] = swap[1], swap[0]
    (root / "b").mkdir()
    for name in os.listdir(root / "a"):
        (root / "b" / name).write_bytes((root / "a" / name).read_bytes())
    (root / "b" / "tokenizer.json").write_text(json.dumps(spec))
    tok_b = AutoTokenizer.from_pretrained(root / "b")
    path = root / "text.txt"
    path.write_text(text, encoding="utf-8")
    return tok_a, tok_b, str(path), swap, root


def test_the_swap_hides_beyond_the_first_2000_characters(tokenizers_and_text):
    tok_a, tok_b, path, _, _ = tokenizers_and_text
    text = open(path, encoding="utf-8").read()
    assert tok_a(text[:2000])["input_ids"] == tok_b(text[:2000])["input_ids"]  # what the old check compared
    assert tok_a(text)["input_ids"] != tok_b(text)["input_ids"]


WINDOWS = dict(num_sequences=32, seq_len=16)  # over the 4.7 KB corpus: the windows reach the swapped ids


def _swapped(ids, swap):
    out = np.array(ids)
    out[np.asarray(ids) == swap[0]], out[np.asarray(ids) == swap[1]] = swap[1], swap[0]
    return out


def test_a_swapped_tokenizer_is_aligned_at_every_token(tokenizers_and_text):
    """B's tokenizer gives other ids to the same spans: B reads its own ids (A's with the two swapped), and every
    position aligns (jaxind.io.alignment); before, the run was refused at the first difference."""
    tok_a, tok_b, path, swap, _ = tokenizers_and_text
    spec = token_source.DataSpec(kind="text", path=path, **WINDOWS)
    cut = token_source.text_windows(spec, tok_a)
    assert any(set(ids) & set(swap) for ids in cut.ids)  # some window is fed a swapped id
    got = token_source.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b)
    assert isinstance(got, alignment.AlignedTokens) and np.array_equal(got.tokens_a, cut.tokens)
    assert np.array_equal(got.tokens_b, _swapped(cut.tokens, swap))
    assert got.count == cut.tokens.size and np.array_equal(got.pos_a, got.pos_b)


def test_only_the_text_fed_is_compared(tokenizers_and_text):
    """A window whose text holds no swapped id is fed as it is: the check covers exactly the windows read."""
    tok_a, tok_b, path, swap, _ = tokenizers_and_text
    for seed in range(50):
        spec = token_source.DataSpec(kind="text", path=path, num_sequences=1, seq_len=16, seed=seed)
        cut = token_source.text_windows(spec, tok_a)
        if not set(cut.ids[0]) & set(swap):
            break
    assert cut.texts[0] and cut.offsets[0] > 0
    assert np.array_equal(token_source.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b), cut.tokens)


def test_windows_read_only_their_bytes(tokenizers_and_text, tmp_path):
    """Windows are cut at whitespace from bytes near seeded offsets: each window is the start of its
    text's ids, the texts lie in the file at their offsets, and of a 235 KB file only a few windows' worth of
    text is tokenised."""
    tok_a, _, path, _, _ = tokenizers_and_text
    text = open(path, encoding="utf-8").read()
    spec = token_source.DataSpec(kind="text", path=path, num_sequences=8, seq_len=16, seed=3)
    cut = token_source.text_windows(spec, tok_a)
    raw = text.encode()
    for k in range(8):
        assert raw[cut.offsets[k] :].startswith(cut.texts[k].encode())
        assert list(cut.tokens[k]) == list(cut.ids[k][:16])
        assert cut.offsets[k] == 0 or raw[cut.offsets[k] - 1 : cut.offsets[k]].isspace()
    big = tmp_path / "big.txt"
    big.write_text(text * 50, encoding="utf-8")
    encoded = []
    original = token_source.tokenizer.encode

    def spy(tok, texts):
        encoded.extend(texts)
        return original(tok, texts)

    token_source.tokenizer.encode = spy
    try:
        tokens = token_source.make_tokens(dataclasses.replace(spec, path=str(big)), VOCAB, VOCAB, tok_a)
    finally:
        token_source.tokenizer.encode = original
    assert tokens.shape == (8, 16) and len(encoded) >= 8
    assert sum(map(len, encoded)) < 8 * (8 * 16 + 64) * 4 < big.stat().st_size / 10  # a few windows' worth


def test_the_same_tokenizer_loaded_twice_passes(tokenizers_and_text):
    from transformers import AutoTokenizer

    tok_a, _, path, _, root = tokenizers_and_text
    spec = token_source.DataSpec(kind="text", path=path, num_sequences=3, seq_len=16)
    again = AutoTokenizer.from_pretrained(root / "a")
    assert again is not tok_a
    both = token_source.make_tokens(spec, VOCAB, VOCAB, tok_a, again)
    assert np.array_equal(both, token_source.make_tokens(spec, VOCAB, VOCAB, tok_a))


def test_jsonl_documents_align_with_their_separators(tokenizers_and_text, tmp_path):
    tok_a, tok_b, path, swap, _ = tokenizers_and_text
    text = open(path, encoding="utf-8").read()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in (text[:1500], text)) + "\n")
    spec = token_source.DataSpec(kind="jsonl", path=str(docs), num_sequences=8, seq_len=64)
    got = token_source.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b)
    assert np.array_equal(got.tokens_a, token_source.make_tokens(spec, VOCAB, VOCAB, tok_a))  # A's windows as before
    assert np.array_equal(got.tokens_b, _swapped(got.tokens_a, swap)) and got.count == got.tokens_a.size
    a, b = alignment.streams([text[:1500], text], tok_a, tok_b)  # the documents' end-of-text tokens align
    eos_a, eos_b = np.flatnonzero(a.ids == tok_a.eos_token_id), np.flatnonzero(b.ids == tok_b.eos_token_id)
    ia, ib = alignment.align(a.ends, b.ends)
    assert len(eos_a) == len(eos_b) == 2 and set(eos_a) <= set(ia) and set(eos_b) <= set(ib)
    assert len(ia) == len(a) == len(b)


def test_the_cli_aligns_the_swapped_tokenizer(tokenizers_and_text, tmp_path):
    """Model B is model A's weights with the swapped tokenizer beside them: the run aligns the two tokenizations,
    reports the aligned positions, and MATCH finds the pair."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, _, path, _, root = tokenizers_and_text
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name / file).write_bytes((root / name / file).read_bytes())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxind.main",
            f"--model_a={tmp_path / 'a'}",
            f"--model_b={tmp_path / 'b'}",
            "--tests=csu,match",
            f"--data=text:{path}",
            "--num_sequences=32",
            "--seq_len=16",
            f"--output={tmp_path / 'out.json'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "different tokenizers: 512 aligned text positions" in r.stdout
    document = json.loads((tmp_path / "out.json").read_text())
    assert document["data"]["alignment"]["aligned_positions"] == 32 * 16
    assert document["tests"]["match"]["log10_pvalue"] < -5, document["tests"]["match"]
