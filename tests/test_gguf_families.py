"""GGUF files of the newer families, written from tiny transformers models the way llama.cpp's converter writes
them (tests/gguf_models.py), read by jaxind: logits and gate/up activations match the source model, and match
transformers' own GGUF loader wherever it reads the architecture (gemma2, gemma3, qwen3, phi3; not olmo, olmo2).

The tiny configs keep to what a GGUF file can express the way both loaders read it: transformers' loader takes
Gemma's query scalar, soft-caps and local RoPE base from its config classes' defaults (256, 50/30, 1e4) and Qwen3's
head size from its default (128), so those models use exactly these values."""

import os

import numpy as np
import pytest
import torch
from gguf_models import write_gguf_from_torch
from hf_models import build_torch_model
from test_parity import TOL, rel_err, torch_reference

from converters.sources import load_model

# family -> (config overrides, sliding window written to the metadata, transformers reads this GGUF architecture)
CASES = {
    "gemma2": (
        dict(
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=5,
        ),
        5,
        True,
    ),
    "gemma3": (
        dict(
            num_hidden_layers=6,  # layer 5 attends globally (llama.cpp's and transformers' period of 6)
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            layer_types=None,
            rope_scaling=None,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            final_logit_softcapping=None,
            sliding_window=4,
        ),
        4,
        True,
    ),
    "qwen3": (dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128, use_sliding_window=False), None, True),
    # Phi-3's window in the metadata: llama.cpp and transformers' GGUF loader both run such files without it.
    "phi3": (dict(sliding_window=None), 5, True),
    "olmo": (dict(), None, False),
    "olmo2": (dict(), None, False),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_gguf_matches_the_source_model_and_transformers_gguf_loader(tmp_path, family):
    overrides, window, transformers_reads_it = CASES[family]
    if family == "qwen3":
        overrides = {**overrides, "attention_bias": False}  # llama.cpp's qwen3 has no attention biases
    source = build_torch_model(family, seed=7, **overrides)
    path = write_gguf_from_torch(source, family, str(tmp_path / f"{family}.gguf"), sliding_window=window)
    ours = load_model(path)
    assert ours.meta["format"] == "gguf" and ours.config.family == family
    tokens = np.random.default_rng(8).integers(0, ours.config.vocab_size, (2, 12))  # longer than the windows
    ref_logits, ref_acts = torch_reference(source, tokens)
    logits = ours.logits(tokens)
    assert rel_err(logits, ref_logits) <= TOL
    acts = ours.mlp_activations(tokens)
    for layer, ref in ref_acts.items():
        for proj in ("gate", "up"):
            assert rel_err(acts[layer][proj], ref[proj]) <= TOL, (layer, proj)
    if family == "phi3":
        assert "phi3.attention.sliding_window" in ours.summary()["ignored_config_keys"]
    from transformers import AutoModelForCausalLM

    if not transformers_reads_it:
        with pytest.raises(ValueError, match="not supported"):
            AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
        return
    # Token ids change nothing, but Phi3Config's default pad id (32000) lies outside the tiny vocabulary.
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32, **ids
    )
    theirs.config._attn_implementation = "eager"
    their_logits, their_acts = torch_reference(theirs.eval(), tokens)
    assert rel_err(logits, their_logits) <= TOL
    assert rel_err(acts[0]["up"], their_acts[0]["up"]) <= TOL
