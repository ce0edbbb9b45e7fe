"""GGUF files without PyTorch: the tokenizer is rebuilt from the file's metadata with no torch import, equals
transformers' own GGUF tokenizer, and the converter never drops a tokenizer silently. GGUF metadata keys that
jaxind does not use never block; those that change the function are refused by name."""

import json
import logging
import os
import subprocess
import sys

import pytest
from gguf_models import write_tiny_llama_gguf

from converters.convert import convert
from converters.readers import GGUFFileReader
from converters.sources import load_model
from jaxind.errors import CheckpointError, JaxindError, UnsupportedModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    TEXTS = [
        "The quick brown fox jumps over the lazy dog.",
        "  two  spaces,\ttabs\nand newlines\n\n",
        "<|im_start|>user\nünïcødé 日本語 🙂 1234567<|im_end|>",
        _f.read()[:3000],
    ]


# Makes PyTorch unfindable, as in a plain install: `import torch` fails and importlib.util.find_spec("torch") (what
# transformers and scipy consult) returns None, while every other package imports as usual.
NO_TORCH = """
import importlib.machinery, importlib.util, sys
class _NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name == "torch" or name.startswith("torch.") else super().find_spec(name, path, target)
sys.meta_path = [_NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert importlib.util.find_spec("torch") is None
"""
# In that process: the GGUF's tokenizer as the runner gets it (text data), a conversion (which must save the
# tokenizer), the converted checkpoint's tokenizer, and a run on text data.
WITHOUT_TORCH_SCRIPT = """
import json
import jaxind
from converters.convert import convert
from converters.sources import load_model
from jaxind import data, runner
from transformers.utils import is_torch_available
assert not is_torch_available()
tiny, out, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = load_model(tiny)
direct = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
meta = convert(tiny, out, progress=False)
saved = load_model(out).tokenizer(texts, add_special_tokens=False)["input_ids"]
spec = data.DataSpec(kind="text", path="README.md", num_sequences=2, seq_len=16)
settings = runner.Settings(tests=("csu",), data=spec)
doc = runner.run_pair(model, model, settings, log=lambda _: None).to_json()
print(json.dumps({"direct": direct, "saved": saved, "meta_tokenizer": meta["tokenizer"],
                  "torch_loaded": "torch" in sys.modules, "data_kind": doc["data"]["kind"],
                  "tokens_shape": doc["data"]["tokens_shape"], "csu_log10_p": doc["tests"]["csu"]["log10_pvalue"]}))
"""


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_path):
    """transformers' own GGUF tokenizer (AutoTokenizer with gguf_file=..., which reads the file with PyTorch)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_path):
    """A 2-layer Llama GGUF carrying the real SmolLM2 tokenizer metadata (5 MB)."""
    return write_tiny_llama_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"), tokenizer_from=smollm2_path)


def test_without_torch_the_tokenizer_is_read_and_saved(tiny_gguf, reference_tokenizer, tmp_path):
    """In a process where `import torch` fails: the GGUF's tokenizer loads (what --data=text uses) and the converter
    saves it; both give exactly the ids of transformers' own (PyTorch-based) GGUF tokenizer."""
    out = tmp_path / "converted"
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH + WITHOUT_TORCH_SCRIPT, tiny_gguf, str(out), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["torch_loaded"] and got["meta_tokenizer"]["kind"] == "gguf"
    expected = reference_tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert got["direct"] == expected and got["saved"] == expected
    assert os.path.isfile(out / "tokenizer" / "tokenizer.json")
    assert got["data_kind"] == "text" and got["tokens_shape"] == [2, 16] and got["csu_log10_p"] < -10


def test_the_torch_free_builder_equals_transformers_gguf_tokenizer(smollm2_path, reference_tokenizer):
    from jaxind.io.tokenizer import gguf_tokenizer_without_torch

    ours, ref = gguf_tokenizer_without_torch(smollm2_path), reference_tokenizer
    assert ours.get_vocab() == ref.get_vocab()
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        ref.bos_token,
        ref.eos_token,
        ref.unk_token,
        ref.pad_token,
    )
    for special in (True, False):
        assert (
            ours(TEXTS, add_special_tokens=special)["input_ids"] == ref(TEXTS, add_special_tokens=special)["input_ids"]
        )


def test_a_source_without_tokenizer_is_converted_with_a_recorded_reason(tmp_path, caplog):
    src = write_tiny_llama_gguf(str(tmp_path / "bare.gguf"))
    with caplog.at_level(logging.WARNING):
        meta = convert(src, str(tmp_path / "out"), progress=False)
    assert meta["tokenizer"] is None and "has no tokenizer" in meta["tokenizer_missing"]
    assert any("tokenizer not saved" in r.getMessage() for r in caplog.records)
    with open(tmp_path / "out" / "jaxind_meta.json") as f:
        assert json.load(f)["tokenizer_missing"] == meta["tokenizer_missing"]
    with pytest.raises(JaxindError, match="has no tokenizer"):
        _ = load_model(str(tmp_path / "out")).tokenizer


def test_an_unreadable_tokenizer_stops_the_conversion_before_any_work(tmp_path):
    src = write_tiny_llama_gguf(str(tmp_path / "odd.gguf"), tokenizer_model="no-such-tokenizer")
    with pytest.raises(CheckpointError, match="--notokenizer"):
        convert(src, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["odd.gguf"]  # nothing written, not even a temporary directory
    meta = convert(src, str(tmp_path / "out"), with_tokenizer=False, progress=False)
    assert meta["tokenizer_missing"] == "converted with --notokenizer"
    with pytest.raises(JaxindError, match="--notokenizer"):
        _ = load_model(str(tmp_path / "out")).tokenizer


def test_unknown_gguf_metadata_never_blocks_and_is_recorded(tmp_path):
    src = write_tiny_llama_gguf(str(tmp_path / "m.gguf"), metadata={"llama.some_future_key": 7, "general.note": "x"})
    reader = GGUFFileReader(src)
    assert reader.config.n_layers == 2
    assert reader.ignored_config_keys == {
        "llama.context_length": "GGUF metadata jaxind does not use",
        "llama.some_future_key": "GGUF metadata jaxind does not use",
    }
    assert load_model(src).summary()["ignored_config_keys"] == reader.ignored_config_keys


@pytest.mark.parametrize(
    "metadata, named",
    [
        ({"llama.rope.dimension_count": 4}, "rope.dimension_count"),
        ({"llama.rope.scaling.type": "yarn"}, "yarn"),
    ],
)
def test_gguf_metadata_that_changes_the_function_is_refused(tmp_path, metadata, named):
    src = write_tiny_llama_gguf(str(tmp_path / "m.gguf"), metadata=metadata)
    with pytest.raises(UnsupportedModelError, match=named):
        GGUFFileReader(src)
