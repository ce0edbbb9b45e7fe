"""Converter CLI: round trip through orbax, memory use while converting, and clear errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from helpers import run_module, run_python
from hf_models import build_torch_model, edit_config, save

from converters import sources


def run_cli(*args, module="converters.convert"):
    return run_module(module, *args)


def peak_rss_mb(*args) -> tuple[subprocess.CompletedProcess, float]:
    """Runs a command in a fresh child process; returns its result and peak RSS in MB
    (measured with a wrapper process so earlier children do not count)."""
    wrapper = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout);"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    result = run_python("-c", wrapper, *args)
    peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK")]
    return result, int(peak[-1].split()[1]) / 1024


def assert_identical(p1, p2):
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("family", ["llama_tied", "qwen2"])
def test_round_trip_is_bit_identical(tmp_path, family):
    src = save(build_torch_model(family), str(tmp_path / "hf"), "sharded")
    result = run_cli(f"--src={src}", f"--out={tmp_path / 'ckpt'}")
    assert result.returncode == 0, result.stderr
    cfg1, p1, _ = sources.read_model(src)
    cfg2, p2, meta = sources.read_model(str(tmp_path / "ckpt"))
    assert cfg1 == cfg2 and meta["format"] == "jaxind"
    assert_identical(p1, p2)
    assert (
        os.path.isfile(tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json")
        or "tokenizer not saved" in result.stderr
    )
    # A second conversion to the same place is refused unless --overwrite.
    again = run_cli(f"--src={src}", f"--out={tmp_path / 'ckpt'}")
    assert again.returncode != 0 and "already exists" in again.stderr


@pytest.mark.slow
def test_smollm2_gguf_round_trip_and_peak_memory(tmp_path, smollm2_path, smollm2):
    out = tmp_path / "smol"
    result, peak = peak_rss_mb(sys.executable, "-m", "converters.convert", f"--src={smollm2_path}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    model_mb = smollm2.config.num_params() * 4 / 2**20
    print(f"SmolLM2 GGUF conversion: peak RSS {peak:.0f} MB, model float32 {model_mb:.0f} MB ({peak / model_mb:.2f}x)")
    assert peak < 2 * model_mb
    _, params, _ = sources.read_model(str(out))
    assert_identical(jax.tree.map(np.asarray, smollm2.params), params)


@pytest.mark.slow
def test_sharded_safetensors_peak_memory(tmp_path):
    """A 100M-parameter (400 MB float32) sharded checkpoint converts in < 2x its size."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    src = tmp_path / "big"
    src.mkdir()
    cfg.save_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32000, 768), "lm_head.weight": (32000, 768), "model.norm.weight": (768,)}
    for i in range(8):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (768,),
                p + "post_attention_layernorm.weight": (768,),
                p + "self_attn.q_proj.weight": (768, 768),
                p + "self_attn.k_proj.weight": (256, 768),
                p + "self_attn.v_proj.weight": (256, 768),
                p + "self_attn.o_proj.weight": (768, 768),
                p + "mlp.gate_proj.weight": (2048, 768),
                p + "mlp.up_proj.weight": (2048, 768),
                p + "mlp.down_proj.weight": (768, 2048),
            }
        )
    names = sorted(shapes)
    shards = [names[i::4] for i in range(4)]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        save_file({n: torch.randn(shapes[n], generator=gen) * 0.02 for n in shard}, str(src / fname))
        weight_map.update({n: fname for n in shard})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model_mb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 2**20
    result, peak = peak_rss_mb(
        sys.executable, "-m", "converters.convert", f"--src={src}", f"--out={tmp_path / 'ckpt'}", "--notokenizer"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    print(
        f"sharded safetensors conversion: peak RSS {peak:.0f} MB, model float32 {model_mb:.0f} MB "
        f"({peak / model_mb:.2f}x)"
    )
    assert peak < 2 * model_mb


def _one_error_line(result):
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = save(build_torch_model("llama"), str(root / "good"))
    cases = {}
    cases["missing"] = (str(root / "does_not_exist"), "does not exist")
    unsupported = save(build_torch_model("llama"), str(root / "unsupported"))
    edit_config(unsupported, model_type="mamba")
    cases["unsupported"] = (unsupported, "unsupported model_type 'mamba'")
    truncated = save(build_torch_model("llama"), str(root / "truncated"))
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    cases["truncated"] = (truncated, "truncated or corrupt")
    mismatch = save(build_torch_model("llama"), str(root / "mismatch"))
    edit_config(mismatch, intermediate_size=64)
    cases["mismatch"] = (mismatch, "config and the weights disagree")
    nan = build_torch_model("llama")
    with torch.no_grad():
        nan.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    cases["nan"] = (save(nan, str(root / "nan")), "NaN")
    extra = save(build_torch_model("llama"), str(root / "extra"))
    edit_config(extra, mlp_bias=True)
    cases["unhandled_attribute"] = (extra, "mlp_bias")
    corrupt_gguf = root / "broken.gguf"
    corrupt_gguf.write_bytes(b"GGUF" + os.urandom(64))
    cases["corrupt_gguf"] = (str(corrupt_gguf), "cannot read GGUF")
    cases["hub_id_offline"] = ("meta-llama/Llama-2-7b-hf", "does not exist")
    return good, cases


@pytest.mark.parametrize(
    "case",
    ["missing", "unsupported", "truncated", "mismatch", "nan", "unhandled_attribute", "corrupt_gguf", "hub_id_offline"],
)
def test_bad_input_gives_one_clear_error_line(tmp_path, bad_inputs, case):
    _, cases = bad_inputs
    src, expected = cases[case]
    line = _one_error_line(run_cli(f"--src={src}", f"--out={tmp_path / 'out'}", "--notokenizer"))
    assert expected in line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("case", ["missing", "mismatch", "truncated"])
def test_main_cli_reports_bad_models_clearly(bad_inputs, case):
    good, cases = bad_inputs
    src, expected = cases[case]
    line = _one_error_line(run_cli(f"--model_a={good}", f"--model_b={src}", module="jaxind.main"))
    assert expected in line
