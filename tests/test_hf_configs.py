"""Published config.json files of widely used checkpoints (tests/fixtures/hf_configs/) parse into the published
shapes, or are refused only for a feature that changes the function, named in the error. The expected shapes
below are the published model facts, written independently of the files."""

import glob
import json
import os

import pytest

from jaxind.errors import CheckpointError, UnsupportedModelError
from jaxind.io import hf_config as config_mod
from jaxind.io.hf_config import parse_hf_config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_configs")

# name: (family, vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, tied, rope_theta, rope_type, sliding_window)
PUBLISHED = {
    "meta-llama__Llama-2-7b-hf": ("llama", 32000, 4096, 32, 32, 32, 128, 11008, False, 1e4, None, None),
    "meta-llama__Llama-2-13b-hf": ("llama", 32000, 5120, 40, 40, 40, 128, 13824, False, 1e4, None, None),
    "meta-llama__Meta-Llama-3-8B": ("llama", 128256, 4096, 32, 32, 8, 128, 14336, False, 5e5, None, None),
    "meta-llama__Llama-3.1-8B-Instruct": ("llama", 128256, 4096, 32, 32, 8, 128, 14336, False, 5e5, "llama3", None),
    "meta-llama__Llama-3.2-1B": ("llama", 128256, 2048, 16, 32, 8, 64, 8192, True, 5e5, "llama3", None),
    "meta-llama__Llama-3.2-3B-Instruct": ("llama", 128256, 3072, 28, 24, 8, 128, 8192, True, 5e5, "llama3", None),
    "mistralai__Mistral-7B-v0.1": ("mistral", 32000, 4096, 32, 32, 8, 128, 14336, False, 1e4, None, 4096),
    "mistralai__Mistral-7B-v0.3": ("mistral", 32768, 4096, 32, 32, 8, 128, 14336, False, 1e6, None, None),
    "mistralai__Mistral-Nemo-Base-2407": ("mistral", 131072, 5120, 40, 32, 8, 128, 14336, False, 1e6, None, None),
    "Qwen__Qwen2-0.5B": ("qwen2", 151936, 896, 24, 14, 2, 64, 4864, True, 1e6, None, None),
    "Qwen__Qwen2-7B": ("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, False, 1e6, None, None),
    "Qwen__Qwen2.5-0.5B": ("qwen2", 151936, 896, 24, 14, 2, 64, 4864, True, 1e6, None, None),
    "Qwen__Qwen2.5-1.5B": ("qwen2", 151936, 1536, 28, 12, 2, 128, 8960, True, 1e6, None, None),
    "Qwen__Qwen2.5-1.5B-Instruct__saved-by-transformers-5": (
        "qwen2",
        151936,
        1536,
        28,
        12,
        2,
        128,
        8960,
        True,
        1e6,
        None,
        None,
    ),
    "Qwen__Qwen2.5-7B-Instruct": ("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, False, 1e6, None, None),
    "HuggingFaceTB__SmolLM2-135M": ("llama", 49152, 576, 30, 9, 3, 64, 1536, True, 1e5, None, None),
    "HuggingFaceTB__SmolLM2-1.7B": ("llama", 49152, 2048, 24, 32, 32, 64, 8192, True, 1.3e5, None, None),
    "TinyLlama__TinyLlama-1.1B-Chat-v1.0": ("llama", 32000, 2048, 22, 32, 4, 64, 5632, False, 1e4, None, None),
    "google__gemma-2b": ("gemma", 256000, 2048, 18, 8, 1, 256, 16384, True, 1e4, None, None),
    "google__gemma-7b": ("gemma", 256000, 3072, 28, 16, 16, 256, 24576, True, 1e4, None, None),
    "openai-community__gpt2": ("gpt2", 50257, 768, 12, 12, 12, 64, 3072, True, None, None, None),
    "openai-community__gpt2-medium": ("gpt2", 50257, 1024, 24, 16, 16, 64, 4096, True, None, None, None),
    "google__gemma-2-2b": ("gemma2", 256000, 2304, 26, 8, 4, 256, 9216, True, 1e4, None, 4096),
    "google__gemma-3-270m": ("gemma3", 262144, 640, 18, 4, 1, 256, 2048, True, 1e6, None, 512),
    "google__gemma-3-1b-it": ("gemma3", 262144, 1152, 26, 4, 1, 256, 6912, True, 1e6, None, 512),
    "google__gemma-3-4b-it": ("gemma3", 262208, 2560, 34, 8, 4, 256, 10240, True, 1e6, "linear", 1024),
    "Qwen__Qwen3-0.6B": ("qwen3", 151936, 1024, 28, 16, 8, 128, 3072, True, 1e6, None, None),
    "microsoft__Phi-3-mini-4k-instruct": ("phi3", 32064, 3072, 32, 32, 32, 96, 8192, False, 1e4, None, 2047),
    "microsoft__phi-4": ("phi3", 100352, 5120, 40, 40, 10, 128, 17920, False, 2.5e5, None, None),
    "allenai__OLMo-1B-hf": ("olmo", 50304, 2048, 16, 16, 16, 128, 8192, True, 1e4, None, None),
    "allenai__OLMo-2-1124-7B": ("olmo2", 100352, 4096, 32, 32, 32, 128, 11008, False, 5e5, None, None),
}
# The family features of the newer families, as published (every other family has the ModelConfig defaults).
_GEMMA = dict(norm_offset=1.0, embed_scale=True, norm_position="sandwich", query_pre_attn_scalar=256.0)
_SLIDING_6 = dict(rope_local_theta=1e4, qk_norm="head", final_softcap=None, attn_softcap=None, **_GEMMA)
FEATURES = {
    "google__gemma-2-2b": dict(attn_softcap=50.0, final_softcap=30.0, qk_norm="none", rope_local_theta=None, **_GEMMA),
    "google__gemma-3-270m": _SLIDING_6,
    "google__gemma-3-1b-it": _SLIDING_6,
    "google__gemma-3-4b-it": _SLIDING_6,
    "Qwen__Qwen3-0.6B": dict(qk_norm="head", norm_position="pre"),
    "allenai__OLMo-1B-hf": dict(norm_kind="nonparam", norm_eps=1e-5, clip_qkv=None),
    "allenai__OLMo-2-1124-7B": dict(norm_position="post", qk_norm="proj", norm_eps=1e-6),
}
# Which layers attend globally (Gemma: every second / sixth layer).
GLOBAL_LAYERS = {
    "google__gemma-2-2b": list(range(1, 26, 2)),
    "google__gemma-3-270m": [5, 11, 17],
    "google__gemma-3-1b-it": [5, 11, 17, 23],
    "google__gemma-3-4b-it": [5, 11, 17, 23, 29],
}
# name: (error class, words the message must contain: the feature that changes the function)
REFUSED = {
    "NousResearch__Yarn-Llama-2-7b-64k": (UnsupportedModelError, ["RoPE", "yarn"]),
}


def _load(name: str) -> dict:
    with open(os.path.join(HERE, name + ".json")) as f:
        return json.load(f)


def test_the_fixture_folder_is_covered():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(HERE, "*.json"))}
    assert names == set(PUBLISHED) | set(REFUSED)
    assert len(PUBLISHED) >= 15


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_parses_to_the_published_shapes(name):
    hf = _load(name)
    cfg, ignored = parse_hf_config(hf)
    family, vocab, d, layers, heads, kv, head_dim, d_ff, tied, theta, rope_type, window = PUBLISHED[name]
    got = (
        cfg.family,
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.tie_embeddings,
        cfg.sliding_window,
    )
    assert got == (family, vocab, d, layers, heads, kv, head_dim, d_ff, tied, window)
    if family == "gpt2":
        assert not cfg.rope and cfg.max_positions == 1024 and not cfg.glu
    else:
        assert cfg.rope_theta == theta and (cfg.rope_scaling_dict or {}).get("rope_type") == rope_type
        gemma = family in ("gemma", "gemma2", "gemma3")
        assert cfg.qkv_bias == (family == "qwen2") and cfg.mlp_act == ("gelu_tanh" if gemma else "silu")
    for field, value in FEATURES.get(name, {}).items():
        assert getattr(cfg, field) == value, field
    if name in GLOBAL_LAYERS:
        assert [l for l in range(cfg.n_layers) if not cfg.sliding(l)] == GLOBAL_LAYERS[name]
    # Every key is accounted for: read, provenance, or recorded as ignored with a reason.
    assert all(isinstance(why, str) and why for why in ignored.values())
    assert set(ignored) <= set(hf)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_jaxind_reads_what_transformers_reads(name):
    """The same file through transformers' own config class gives the same sizes, RoPE and window."""
    from transformers import AutoConfig

    hf = _load(name)
    cfg, _ = parse_hf_config(hf)
    ref = AutoConfig.for_model(**hf).get_text_config()  # a multimodal Gemma 3: its text model
    assert (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads) == (
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
    )
    if cfg.family == "gpt2":
        return
    assert ref.intermediate_size == cfg.d_ff and ref.num_key_value_heads == cfg.n_kv_heads
    assert (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads) == cfg.head_dim
    assert bool(ref.tie_word_embeddings) == cfg.tie_embeddings
    rope = getattr(ref, "rope_parameters", None) or {"rope_theta": ref.rope_theta, **(ref.rope_scaling or {})}
    if "full_attention" in rope:  # Gemma 3: one RoPE per layer type
        assert float(rope["sliding_attention"]["rope_theta"]) == cfg.rope_local_theta
        rope = rope["full_attention"]
    assert float(rope["rope_theta"]) == cfg.rope_theta
    ours = (cfg.rope_scaling_dict or {}).get("rope_type", "default")
    assert rope.get("rope_type", rope.get("type", "default")) == ours
    if cfg.family in ("mistral", "phi3"):
        assert ref.sliding_window == cfg.sliding_window
    if getattr(ref, "layer_types", None) and "sliding_attention" in ref.layer_types:
        assert tuple(ref.layer_types) == cfg.layer_types and ref.sliding_window == cfg.sliding_window
    elif cfg.family not in ("mistral", "phi3"):
        assert cfg.sliding_window is None and cfg.layer_types is None
    for field, attribute in (
        ("query_pre_attn_scalar", "query_pre_attn_scalar"),
        ("attn_softcap", "attn_logit_softcapping"),
        ("final_softcap", "final_logit_softcapping"),
        ("clip_qkv", "clip_qkv"),
    ):
        if hasattr(ref, attribute) and not (cfg.family == "gemma3" and field == "attn_softcap"):
            assert getattr(ref, attribute) == getattr(cfg, field), field


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_only_for_a_feature_that_changes_the_function(name):
    error, words = REFUSED[name]
    with pytest.raises(error) as info:
        parse_hf_config(_load(name))
    for word in words:
        assert word in str(info.value)


def test_bookkeeping_keys_are_recorded_not_refused():
    _, ignored = parse_hf_config(_load("HuggingFaceTB__SmolLM2-135M"))  # nanotron's bookkeeping
    assert ignored["is_llama_config"] == ignored["rope_interleaved"] == "not a LlamaConfig attribute"
    assert ignored["use_cache"] == "does not change the function"
    _, ignored = parse_hf_config(_load("Qwen__Qwen2.5-0.5B"))
    assert ignored["use_mrope"] == "not a Qwen2Config attribute"
    custom = {**_load("meta-llama__Llama-2-7b-hf"), "my_training_run": {"step": 3}, "unk_token_id": 0}
    _, ignored = parse_hf_config(custom)
    assert set(ignored) >= {"my_training_run", "unk_token_id"}


def _llama(**changes) -> dict:
    return {**_load("meta-llama__Llama-3.2-1B"), **changes}


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "'gelu'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
        ({"num_hidden_layers": "sixteen"}, "num_hidden_layers"),
    ],
)
def test_keys_that_change_the_function_are_refused_by_name(changes, named):
    with pytest.raises((UnsupportedModelError, CheckpointError)) as info:
        parse_hf_config(_llama(**changes))
    assert named in str(info.value)


def test_qwen2_and_gemma_variants_are_refused_by_name():
    qwen = _load("Qwen__Qwen2-7B")
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        parse_hf_config({**qwen, "use_sliding_window": True})
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        parse_hf_config({**qwen, "layer_types": ["full_attention", "sliding_attention"] * 14})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        parse_hf_config({**_load("google__gemma-2b"), "use_bidirectional_attention": True})


@pytest.mark.parametrize(
    "name, changes, named",
    [
        # Phi-3-128k / Phi-3.5-mini: LongRoPE (transformers maps the legacy "su"/"yarn" names onto it)
        (
            "microsoft__Phi-3-mini-4k-instruct",
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48}},
            "longrope",
        ),
        ("microsoft__Phi-3-mini-4k-instruct", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 48}}, "'su'"),
        ("microsoft__phi-4", {"partial_rotary_factor": 0.75}, "partial_rotary_factor"),  # Phi-4-mini
        ("google__gemma-3-1b-it", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("google__gemma-3-1b-it", {"hidden_activation": "gelu"}, "'gelu'"),
        (
            "google__gemma-3-1b-it",
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
            "sliding-attention layers",
        ),
        ("google__gemma-2-2b", {"layer_types": ["full_attention", "chunked_attention"] * 13}, "chunked_attention"),
        ("Qwen__Qwen3-0.6B", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ("allenai__OLMo-2-1124-7B", {"hidden_act": "gelu"}, "'gelu'"),
    ],
)
def test_newer_family_variants_are_refused_by_name(name, changes, named):
    with pytest.raises(UnsupportedModelError) as info:
        parse_hf_config({**_load(name), **changes})
    assert named in str(info.value)


def test_family_settings_that_change_the_function_are_read():
    """OLMo's clamp, Qwen3's sliding layers (from max_window_layers), a multimodal Gemma 3's text model without
    its image keys; and Gemma 3's attention soft-cap, which transformers never applies, is ignored with the reason."""
    assert parse_hf_config({**_load("allenai__OLMo-1B-hf"), "clip_qkv": 8.0})[0].clip_qkv == 8.0
    qwen = parse_hf_config({**_load("Qwen__Qwen3-0.6B"), "use_sliding_window": True, "sliding_window": 4096})[0]
    assert qwen.sliding_window is None  # max_window_layers=28 of 28 layers: none slides
    qwen = parse_hf_config(
        {**_load("Qwen__Qwen3-0.6B"), "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 20}
    )[0]
    assert [l for l in range(28) if qwen.sliding(l)] == list(range(20, 28))
    cfg, ignored = parse_hf_config({**_load("google__gemma-3-1b-it"), "attn_logit_softcapping": 50.0})
    assert cfg.attn_softcap is None and "does not apply" in ignored["attn_logit_softcapping"]
    _, ignored = parse_hf_config(_load("google__gemma-3-4b-it"))
    assert "image" in ignored["vision_config"] and "image" in ignored["mm_tokens_per_image"]
    with pytest.raises(CheckpointError, match="text_config"):
        parse_hf_config({"model_type": "gemma3", "vision_config": {}})


def test_llama3_rope_falls_back_to_max_position_embeddings_as_transformers_does():
    rope = dict(_load("meta-llama__Llama-3.2-1B")["rope_scaling"])
    del rope["original_max_position_embeddings"]
    cfg, _ = parse_hf_config(_llama(rope_scaling=rope, max_position_embeddings=4096))
    assert cfg.rope_scaling_dict["original_max_position_embeddings"] == 4096


def test_a_class_attribute_is_refused_only_when_its_value_differs_from_the_default(monkeypatch):
    """The rule for attributes jaxind does not know (e.g. one a later transformers adds to LlamaConfig)."""
    name, defaults = config_mod._reference("llama")
    extended = {**defaults, "attn_logit_softcapping": None}
    monkeypatch.setattr(config_mod, "_reference", lambda model_type: (name, extended))
    _, ignored = parse_hf_config(_llama(attn_logit_softcapping=None))
    assert ignored["attn_logit_softcapping"] == "LlamaConfig default"
    with pytest.raises(UnsupportedModelError) as info:
        parse_hf_config(_llama(attn_logit_softcapping=30.0))
    assert "attn_logit_softcapping=30.0" in str(info.value) and "attn_logit_softcapping=None" in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"llama"', "null", "42"])
def test_a_config_that_is_not_a_json_object_is_a_clean_error(tmp_path, text):
    from converters.readers import HFDirReader

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="not an object"):
        HFDirReader(str(tmp_path))
    with pytest.raises(CheckpointError, match="JSON object"):
        parse_hf_config(json.loads(text))
