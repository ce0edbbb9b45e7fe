"""Text data is fed to model B only if B's tokenizer turns all of it into A's ids: a tokenizer that swaps two
token ids is refused even when the difference lies beyond the first 2,000 characters (the old check). Text files
are read window by window (jaxind.io.data.text_windows), and exactly the text fed is compared; JSONL whole."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxind.errors import JaxindError
from jaxind.io import data

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


def test_a_swapped_tokenizer_is_refused_at_the_first_difference(tokenizers_and_text):
    tok_a, tok_b, path, swap, _ = tokenizers_and_text
    spec = data.DataSpec(kind="text", path=path, **WINDOWS)
    cut = data.text_windows(spec, tok_a)
    hit = next(k for k, ids in enumerate(cut.ids) if set(ids) & set(swap))  # the first window fed a swapped id
    a, b = np.asarray(cut.ids[hit]), np.asarray(tok_b(cut.texts[hit], add_special_tokens=False)["input_ids"])
    first = int(np.flatnonzero(a != b)[0])
    with pytest.raises(JaxindError) as info:
        data.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b)
    message = str(info.value)
    assert f"window {hit + 1} (byte offset {cut.offsets[hit]:,}), token {first:,}" in message, message
    assert f"id {a[first]}" in message and f"id {b[first]}" in message
    assert repr(tok_a.convert_ids_to_tokens(int(a[first]))) in message
    assert {int(a[first]), int(b[first])} == set(swap) and "--data=random" in message


def test_only_the_text_fed_is_compared(tokenizers_and_text):
    """A window whose text holds no swapped id is fed as it is: the check covers exactly the windows read."""
    tok_a, tok_b, path, swap, _ = tokenizers_and_text
    for seed in range(50):
        spec = data.DataSpec(kind="text", path=path, num_sequences=1, seq_len=16, seed=seed)
        cut = data.text_windows(spec, tok_a)
        if not set(cut.ids[0]) & set(swap):
            break
    assert cut.texts[0] and cut.offsets[0] > 0
    assert np.array_equal(data.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b), cut.tokens)


def test_windows_read_only_their_bytes(tokenizers_and_text, tmp_path):
    """Windows are cut at whitespace from bytes near seeded offsets: each window is the start of its
    text's ids, the texts lie in the file at their offsets, and of a 235 KB file only a few windows' worth of
    text is tokenised."""
    tok_a, _, path, _, _ = tokenizers_and_text
    text = open(path, encoding="utf-8").read()
    spec = data.DataSpec(kind="text", path=path, num_sequences=8, seq_len=16, seed=3)
    cut = data.text_windows(spec, tok_a)
    raw = text.encode()
    for k in range(8):
        assert raw[cut.offsets[k] :].startswith(cut.texts[k].encode())
        assert list(cut.tokens[k]) == list(cut.ids[k][:16])
        assert cut.offsets[k] == 0 or raw[cut.offsets[k] - 1 : cut.offsets[k]].isspace()
    big = tmp_path / "big.txt"
    big.write_text(text * 50, encoding="utf-8")
    encoded = []
    original = data.tokenizer.encode

    def spy(tok, texts):
        encoded.extend(texts)
        return original(tok, texts)

    data.tokenizer.encode = spy
    try:
        tokens = data.make_tokens(dataclasses.replace(spec, path=str(big)), VOCAB, VOCAB, tok_a)
    finally:
        data.tokenizer.encode = original
    assert tokens.shape == (8, 16) and len(encoded) >= 8
    assert sum(map(len, encoded)) < 8 * (8 * 16 + 64) * 4 < big.stat().st_size / 10  # a few windows' worth


def test_the_same_tokenizer_loaded_twice_passes(tokenizers_and_text):
    from transformers import AutoTokenizer

    tok_a, _, path, _, root = tokenizers_and_text
    spec = data.DataSpec(kind="text", path=path, num_sequences=3, seq_len=16)
    again = AutoTokenizer.from_pretrained(root / "a")
    assert again is not tok_a
    both = data.make_tokens(spec, VOCAB, VOCAB, tok_a, again)
    assert np.array_equal(both, data.make_tokens(spec, VOCAB, VOCAB, tok_a))


def test_jsonl_names_the_document(tokenizers_and_text, tmp_path):
    tok_a, tok_b, path, _, _ = tokenizers_and_text
    text = open(path, encoding="utf-8").read()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in (text[:1500], text)) + "\n")
    spec = data.DataSpec(kind="jsonl", path=str(docs), num_sequences=2, seq_len=16)
    with pytest.raises(JaxindError, match="document 2"):
        data.make_tokens(spec, VOCAB, VOCAB, tok_a, tok_b)


def test_the_cli_refuses_the_swapped_tokenizer(tokenizers_and_text, tmp_path):
    """Model B is model A's weights with the swapped tokenizer beside them: the run stops with one error line."""
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
            "--tests=csu",
            f"--data=text:{path}",
            "--num_sequences=32",
            "--seq_len=16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "tokenise the data differently" in errors[0]
