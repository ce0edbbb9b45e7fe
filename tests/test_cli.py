"""The command line end to end: model summaries, the results JSON contract, the demo, data
sources and their errors."""

import json
import os

import numpy as np
import pytest
import stored_results
from helpers import run_module, run_python
from hf_models import build_torch_model, save

from jaxind.errors import JaxindError
from jaxind.io import token_source


def main_cli(*args):
    return run_module("jaxind.main", *args)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A model, a perturbed copy of it (a stand-in for a fine-tune), and an independent one."""
    import torch

    root = tmp_path_factory.mktemp("cli")
    base = build_torch_model("llama_tied", seed=0, num_hidden_layers=2)
    a = save(base, str(root / "a"))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = save(base, str(root / "b"))
    c = save(build_torch_model("llama_tied", seed=5, num_hidden_layers=2), str(root / "c"))
    return a, b, c


def test_cli_prints_models_and_writes_results_json(tmp_path, pair):
    a, b, _ = pair
    out = tmp_path / "res.json"
    r = main_cli(
        f"--model_a={a}",
        f"--model_b={b}",
        "--tests=csu,l2,jsd,match,csh,mc",
        "--num_perms=49",
        "--num_sequences=8",
        "--seq_len=16",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model_a:" in r.stdout and "family=llama layers=2 d=48 h=80 heads=6/2kv" in r.stdout
    doc = json.loads(out.read_text())
    assert {"jaxind_version", "created", "seed", "model_a", "model_b", "data", "tests", "alpha"} <= set(doc)
    assert doc["model_b"]["source"] == b and doc["data"]["tokens_shape"] == [8, 16]
    assert 0 < doc["tests"]["mc"]["pvalue"] <= 1  # random-init models: MC has no power, but it runs
    for name in ("csu", "l2", "match", "csh"):
        t = doc["tests"][name]
        assert t["log10_pvalue"] <= np.log10(0.05) and t["seconds"] >= 0, name
        assert name in r.stdout
    assert doc["tests"]["l2"]["pvalue"] == pytest.approx(1 / 50)
    assert len(doc["tests"]["csu"]["layers"]) == 2 and {"layer_a", "layer_b", "pvalue", "log10_pvalue"} <= set(
        doc["tests"]["csu"]["layers"][0]
    )
    assert doc["tests"]["jsd"]["pvalue"] is None and doc["tests"]["jsd"]["statistic"] > 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic write left nothing behind


def test_cli_model_cache_converts_once_and_gives_the_same_results(tmp_path, pair):
    """--model_cache (default): the first run stores both converted models, the next reads them back without
    converting (their entries untouched), --nomodel_cache converts again, a cache that cannot be written is
    skipped with a warning; all four give the same results, and each document says where its time went."""
    a, b, _ = pair
    cache = tmp_path / "cache"
    args = [f"--model_a={a}", f"--model_b={b}", "--tests=match,l2", "--num_perms=19", "--num_sequences=4"]
    args += ["--seq_len=16", f"--cache_dir={cache}"]
    docs, stamps = [], []
    for i, extra in enumerate(([], [], ["--nomodel_cache"])):
        out = tmp_path / f"r{i}.json"
        r = main_cli(*args, f"--output={out}", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("stored in the model cache (") == (2 if i == 0 else 0)  # says what it stored, where
        docs.append(json.loads(out.read_text()))
        entries = sorted(os.listdir(cache / "models"))
        assert len([e for e in entries if "." not in e]) == 2
        stamps.append([os.stat(cache / "models" / e / "meta.json").st_mtime_ns for e in entries if "." not in e])
    assert stamps[0] == stamps[1] == stamps[2]  # converted once
    blocked = tmp_path / "a_file"  # a cache that cannot be written: the run goes on without it
    blocked.write_text("")
    r = main_cli(*args[:-1], f"--cache_dir={blocked}", f"--output={tmp_path / 'r3.json'}")
    assert r.returncode == 0 and "model cache not usable" in r.stderr, r.stderr[-3000:]
    docs.append(json.loads((tmp_path / "r3.json").read_text()))
    for doc in docs:
        assert {"load_model_a", "load_model_b", "tokens", "test_match", "test_l2", "trace", "compile"} <= set(
            doc["timing"]
        )
        assert doc["model_a"] == docs[0]["model_a"] and doc["model_b"]["source"] == b
        for name in ("match", "l2"):
            assert doc["tests"][name]["log10_pvalue"] == docs[0]["tests"][name]["log10_pvalue"], name
            assert [x["statistic"] for x in doc["tests"][name]["layers"]] == [
                x["statistic"] for x in docs[0]["tests"][name]["layers"]
            ]


def test_cli_localized_writes_matrix_map_and_heatmap(tmp_path, pair):
    a, b, _ = pair
    out = tmp_path / "loc.json"
    r = main_cli(
        f"--model_a={a}",
        f"--model_b={b}",
        "--tests=match",
        "--localized",
        "--num_sequences=8",
        "--seq_len=16",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    loc = json.loads(out.read_text())["tests"]["localized"]
    assert loc["layer_map"] == {"0": 0, "1": 1}
    assert np.asarray(loc["log10_pvalue_matrix"]).shape == (2, 2)
    assert os.path.getsize(tmp_path / "loc_localized.png") > 1000
    assert "B layer   1 <- A layer   1" in r.stdout


def test_cli_independent_pair_and_flagfile(tmp_path, pair):
    a, _, c = pair
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(
        f"--model_a={a}\n--model_b={c}\n--tests=csu,match\n--num_sequences=8\n--seq_len=16\n"
        f"--output={tmp_path / 'ind.json'}\n"
    )
    r = main_cli(f"--flagfile={flagfile}")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "ind.json").read_text())
    assert doc["tests"]["csu"]["pvalue"] > 1e-3 and doc["tests"]["match"]["pvalue"] > 1e-3


def test_cli_records_tests_that_do_not_apply(tmp_path, pair):
    """L2 needs identical configs; a width mismatch is reported in the table, not a crash."""
    a, _, _ = pair
    other = save(
        build_torch_model("llama_tied", seed=1, num_hidden_layers=2, intermediate_size=64), str(tmp_path / "w")
    )
    r = main_cli(
        f"--model_a={a}",
        f"--model_b={other}",
        "--tests=l2,match",
        "--num_sequences=4",
        "--seq_len=8",
        f"--output={tmp_path / 'r.json'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "same architecture" in doc["tests"]["l2"]["error"]
    assert doc["tests"]["match"]["pvalue"] is not None  # rectangular MATCH still runs


def test_cli_layers_select_the_layers_of_every_layer_wise_test(tmp_path, pair):
    a, b, _ = pair
    out = tmp_path / "layers.json"
    r = main_cli(
        f"--model_a={a}",
        f"--model_b={b}",
        "--tests=csu,l2,match,jsd",
        "--layers=1",
        "--num_perms=19",
        "--num_sequences=4",
        "--seq_len=8",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tests = json.loads(out.read_text())["tests"]
    for name in ("csu", "l2", "match"):
        assert [(r["layer_a"], r["layer_b"]) for r in tests[name]["layers"]] == [(1, 1)], name
    assert tests["jsd"]["error"] is None and tests["jsd"]["statistic"] > 0  # not layer-wise: unaffected
    out = tmp_path / "pairs.json"
    r = main_cli(
        f"--model_a={a}",
        f"--model_b={b}",
        "--tests=csu,match,l2",
        "--layer_pairs=1:0",
        "--num_perms=19",
        "--num_sequences=4",
        "--seq_len=8",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tests = json.loads(out.read_text())["tests"]
    assert [(r["layer_a"], r["layer_b"]) for r in tests["match"]["layers"]] == [(1, 0)]
    assert "cannot compare pairs" in tests["l2"]["error"]  # L2 compares layer l with layer l only


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--tests=bogus"], "unknown test"),
        (["--data=csv:foo"], "not understood"),
        (["--data=text:/nonexistent.txt"], "does not exist"),
        (["--model_a=smollm2"], "pass both"),
        (["--layers=1x"], "--layers"),
        (["--layer_pairs=3"], "--layer_pairs"),
        (["--layers=1", "--layer_pairs=1:1"], "not both"),
    ],
)
def test_cli_flag_errors_are_one_line(args, expected):
    r = main_cli(*args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and expected in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # the quick demo trains its zoo: about a minute
def test_demo_quick_runs_detects_and_gives_the_stored_results(tmp_path):
    """The quick demo (the built-in demo's code path at a smaller size) detects the fine-tune and the disguised
    copy, and its results JSON equals, bit for bit apart from timing and version fields, the copy stored from the
    release before the Flax module and the parameter table (tests/stored_results.py)."""
    docs = stored_results.demo_quick_results(str(tmp_path))
    ft, disguised = docs["base__finetuned.json"], docs["base__permuted_rotated.json"]
    assert ft["tests"]["csu"]["log10_pvalue"] < -10 and ft["tests"]["match"]["log10_pvalue"] < -10
    assert disguised["tests"]["match"]["log10_pvalue"] < -10 and disguised["tests"]["csu"]["pvalue"] > 0.01
    assert docs == stored_results.stored("demo_quick.json")


def test_demo_flagfile_matches_the_defaults():
    """configs/demo.flags is the demo spelled out: every flag it sets equals the built-in default."""
    script = (
        "import jaxind.cli.main; from absl import flags; F = flags.FLAGS;"
        "F(['jaxind', '--flagfile=configs/demo.flags']);"
        "names = [n for n in F if F[n].present and n != 'flagfile'];"
        "print(len(names), all(F[n].value == F[n].default for n in names), F.model_a)"
    )
    r = run_python("-c", script)
    count, same, model_a = r.stdout.split()
    assert int(count) >= 5 and same == "True" and model_a == "None"


# --- data sources -------------------------------------------------------------------------


class ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 10}) for i in range(5)))
    spec = token_source.DataSpec.parse(f"text:{tmp_path / 't.txt'}", num_sequences=4, seq_len=16, seed=1)
    tokens = token_source.make_tokens(spec, 256, 256, ByteTokenizer(), ByteTokenizer())
    assert tokens.shape == (4, 16) and tokens.dtype == np.int32
    assert bytes(tokens[0].astype(np.uint8)).decode() in "hello world " * 50
    again = token_source.make_tokens(spec, 256, 256, ByteTokenizer(), ByteTokenizer())
    assert np.array_equal(tokens, again)  # seeded
    spec = token_source.DataSpec.parse(f"jsonl:{tmp_path / 't.jsonl'}", num_sequences=3, seq_len=8)
    assert token_source.make_tokens(spec, 256, 256, ByteTokenizer()).shape == (3, 8)
    with pytest.raises(JaxindError, match="shared vocabulary"):
        token_source.make_tokens(spec, 256, 100, ByteTokenizer())
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(JaxindError, match="line 1"):
        token_source.make_tokens(
            token_source.DataSpec.parse(f"jsonl:{tmp_path / 'bad.jsonl'}"), 256, 256, ByteTokenizer()
        )


def test_random_tokens_use_the_shared_vocabulary():
    tokens = token_source.make_tokens(token_source.DataSpec(num_sequences=50, seq_len=50), 1000, 37)
    assert tokens.max() < 37 and tokens.min() >= 0


def test_different_tokenizers_are_refused(tmp_path):
    class Shifted(ByteTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + 1 for b in text.encode()]}

    (tmp_path / "t.txt").write_text("some text " * 20)
    with pytest.raises(JaxindError, match="different tokenizers"):
        token_source.make_tokens(
            token_source.DataSpec.parse(f"text:{tmp_path / 't.txt'}", seq_len=8), 300, 300, ByteTokenizer(), Shifted()
        )


def test_batches_cover_every_sequence_once():
    tokens = np.arange(7 * 3).reshape(7, 3)
    seen = []
    for chunk, mask in token_source.batches(tokens, 3):
        assert chunk.shape == (3, 3)
        seen.extend(chunk[mask[:, 0] > 0, 0].tolist())
    assert sorted(seen) == tokens[:, 0].tolist()
