"""The real SmolLM2-135M as transformers itself saves it (GGUF -> transformers -> save_pretrained, float32
safetensors) loads as a Hugging Face directory and matches transformers: its config.json carries keys that
change nothing (``unk_token_id``, ``_model_name_or_path``) and that jaxind once refused."""

import json
import os
import time

import numpy as np
import pytest
from test_parity import rel_err, torch_reference

from converters.sources import load_model


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2_torch):
    """``save_pretrained`` of the session's transformers model (no second load of the 135M model)."""
    out = tmp_path_factory.mktemp("smollm2_hf")
    start = time.perf_counter()
    # transformers marks a GGUF-loaded model as "quantised with gguf" and will not serialise it; its weights are
    # plain dequantised float32 tensors, so save them with the marker lifted for the duration of the save.
    quantizer, quant_config = smollm2_torch.hf_quantizer, getattr(smollm2_torch.config, "quantization_config", None)
    smollm2_torch.hf_quantizer = None
    if quant_config is not None:
        del smollm2_torch.config.quantization_config
    try:
        smollm2_torch.save_pretrained(out)
    finally:
        smollm2_torch.hf_quantizer = quantizer
        if quant_config is not None:
            smollm2_torch.config.quantization_config = quant_config
    print(f"save_pretrained of SmolLM2-135M (float32): {time.perf_counter() - start:.1f}s")
    return str(out)


def test_saved_config_has_keys_that_used_to_be_refused(smollm2_hf_dir):
    from transformers import LlamaConfig

    with open(os.path.join(smollm2_hf_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["model_type"] == "llama"
    # Written by transformers itself, yet not attributes of its own LlamaConfig: the old allowlist refused these.
    assert "unk_token_id" in hf and "unk_token_id" not in LlamaConfig().to_dict()
    assert "quantization_config" not in hf
    from safetensors import safe_open

    with safe_open(os.path.join(smollm2_hf_dir, "model.safetensors"), framework="numpy") as handle:
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


@pytest.fixture(scope="module")
def ours(smollm2_hf_dir):
    start = time.perf_counter()
    model = load_model(smollm2_hf_dir)
    print(f"jaxind.load_model of the saved directory: {time.perf_counter() - start:.1f}s")
    return model


def test_loads_and_matches_transformers(ours, smollm2_torch, smollm2):
    assert ours.meta["format"] == "hf" and ours.config == smollm2.config
    tokens = np.random.default_rng(3).integers(0, ours.config.vocab_size, (2, 20))
    ref_logits, ref_acts = torch_reference(smollm2_torch, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= 1e-3
    acts = ours.mlp_activations(tokens, layers=[0, 29])
    assert rel_err(acts[29]["up"], ref_acts[29]["up"]) <= 1e-3
    ignored = ours.summary()["ignored_config_keys"]
    assert ignored["unk_token_id"] and ignored["use_cache"] == "does not change the function"


def test_ignored_keys_land_in_the_results_json(ours, smollm2):
    from jaxind.io import token_source
    from jaxind.pair import runner

    doc = runner.run_pair(
        ours,
        smollm2,
        runner.Settings(tests=(), data=token_source.DataSpec(num_sequences=1, seq_len=2)),
        log=lambda _: None,
    ).to_json()
    assert "unk_token_id" in doc["model_a"]["ignored_config_keys"]
    assert doc["model_b"]["ignored_config_keys"] == {"llama.context_length": "GGUF metadata jaxind does not use"}
    json.dumps(doc)
