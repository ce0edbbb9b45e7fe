"""Pairs across families run every test that applies and report the others as not applicable, with the reason:
Qwen3 vs Llama (tiny random models of the same widths) and the real Gemma 3 270M vs the real SmolLM2-135M."""

import math

import pytest
from helpers import random_params

import jaxind
from jaxind.io import token_source
from jaxind.models.config import ModelConfig
from jaxind.pair import runner
from jaxind.pair.catalog import ALL_TESTS


def run_all(a, b, layer_pairs=None, num_sequences=8, seq_len=16) -> dict:
    settings = runner.Settings(
        tests=ALL_TESTS,
        data=token_source.DataSpec(num_sequences=num_sequences, seq_len=seq_len),
        num_perms=19,
        generalized_steps=40,
        layer_pairs=layer_pairs,
    )
    return runner.run_pair(a, b, settings, log=lambda _: None).to_json()["tests"]


def check(tests: dict, not_applicable: dict[str, str]) -> None:
    """Every test not listed ran (a p-value in [0, 1], no error); the listed ones failed with their reason."""
    assert set(tests) == set(ALL_TESTS)
    for name, record in tests.items():
        if name in not_applicable:
            assert record["error"] and not_applicable[name] in record["error"], (name, record["error"])
        elif name == "jsd":  # a divergence, reported as a number, no p-value
            assert record["error"] is None and record["statistic"] > 0
        else:
            assert record["error"] is None, (name, record["error"])
            assert 0.0 <= record["pvalue"] <= 1.0 and math.isfinite(record["log10_pvalue"]), name


def test_qwen3_vs_llama_runs_every_test_that_applies():
    """Same widths, different families: the weight tests (CSU, CSU-all) apply; L2 and MC need one config."""
    sizes = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
    qwen3 = ModelConfig("qwen3", **sizes, qk_norm="head", qkv_bias=True, o_bias=True, tie_embeddings=True)
    llama = ModelConfig("llama", **sizes, rope_theta=5e5)
    a = jaxind.from_params(qwen3, random_params(qwen3, seed=1, std=0.1, noise=0.05), "qwen3")
    b = jaxind.from_params(llama, random_params(llama, seed=2, std=0.1, noise=0.05), "llama")
    tests = run_all(a, b)
    check(tests, {"l2": "same architecture and config", "mc": "same architecture and config"})
    for name in ("csu", "csh", "match"):  # independent models: nothing detected
        assert tests[name]["pvalue"] > 1e-3, (name, tests[name]["pvalue"])


@pytest.mark.slow
def test_gemma3_vs_smollm2_runs_every_test_that_applies(gemma3, smollm2):
    """d=640 vs 576, h=2048 vs 1536, 18 vs 30 layers, vocabularies of 262,144 vs 49,152 (random ids both share):
    CSU, CSU-all and the generalized test (its distilled students take one residual basis) need one width, L2 and
    MC one config; CSH, MATCH (rectangular LAPs), localized testing and JSD run."""
    tests = run_all(gemma3, smollm2, layer_pairs=((0, 0), (17, 29)), num_sequences=8, seq_len=32)
    print(
        "Gemma 3 270M vs SmolLM2:", {k: (v["log10_pvalue"], v["error"] and v["error"][:60]) for k, v in tests.items()}
    )
    width = "same residual width"
    config = "same architecture and config"
    not_applicable = {
        "csu": width,
        "csu_all": width,
        "csu_aligned": width,
        "l2": config,
        "mc": config,
        "generalized": "equal residual widths",
    }
    check(tests, not_applicable)
    for name in ("csh", "match"):
        assert tests[name]["log10_pvalue"] > -3, (name, tests[name]["log10_pvalue"])  # not detected
