"""Hugging Face ``config.json`` -> :class:`jaxind.models.config.ModelConfig`, read precisely.

`parse_hf_config` refuses a key (:class:`UnsupportedModelError`) only when it can change the model's
function and jaxind does not implement its value; keys that cannot (bookkeeping, token ids, dropout,
keys transformers' own config class does not define) are returned as ``ignored`` and never stop a run.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jaxind.errors import CheckpointError, UnsupportedModelError
from jaxind.models.config import MODEL_TYPES, MOE_FAMILIES, Activation, ModelConfig, _freeze

__all__ = ["from_hf_config", "parse_hf_config"]

_PROVENANCE_KEYS = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path"})

# Keys jaxind reads or checks (see `_decoder_config` / `_gpt2_config`), per HF model_type. This includes every key
# that transformers' modeling and RoPE code read through `getattr` even where the config class does not declare it
# (`head_dim`, `partial_rotary_factor`, `original_max_position_embeddings`, ...).
_BASE_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "partial_rotary_factor",
        "original_max_position_embeddings",
        "tie_word_embeddings",
        "quantization_config",
        "pruned_heads",
    }
)
_DECODER_KEYS = _BASE_KEYS | {"hidden_act", "attention_bias", "mlp_bias"}
_GEMMA2_KEYS = _BASE_KEYS | {
    "attention_bias",
    "hidden_activation",
    "use_bidirectional_attention",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
}
_READ_KEYS = {
    "llama": _DECODER_KEYS,
    "mistral": _DECODER_KEYS | {"sliding_window"},
    "qwen2": _DECODER_KEYS | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "gemma": _DECODER_KEYS | {"hidden_activation", "use_bidirectional_attention"},
    "gemma2": _GEMMA2_KEYS,
    # Gemma 3 has no attention soft-capping: transformers' Gemma3Attention never applies `attn_logit_softcapping`.
    "gemma3_text": (_GEMMA2_KEYS - {"attn_logit_softcapping"}) | {"rope_local_base_freq", "sliding_window_pattern"},
    "qwen3": _BASE_KEYS
    | {"hidden_act", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "phi3": _BASE_KEYS | {"hidden_act", "sliding_window"},
    "olmo": (_BASE_KEYS - {"rms_norm_eps"}) | {"hidden_act", "attention_bias", "clip_qkv"},
    "olmo2": _BASE_KEYS | {"hidden_act", "attention_bias"},
    # Mixture of experts (read by `_moe_fields`; Qwen2-MoE's `intermediate_size` sizes only the dense layers that
    # `decoder_sparse_step`/`mlp_only_layers` would create, which are refused).
    "mixtral": _DECODER_KEYS | {"sliding_window", "num_local_experts", "num_experts_per_tok"},
    "qwen2_moe": _DECODER_KEYS
    | {
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "qkv_bias",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    },
    "gpt2": frozenset(
        {
            "vocab_size",
            "n_embd",
            "n_layer",
            "n_head",
            "n_inner",
            "n_positions",
            "activation_function",
            "layer_norm_epsilon",
            "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx",
            "add_cross_attention",
            "tie_word_embeddings",
            "quantization_config",
            "pruned_heads",
        }
    ),
}
# Keys of transformers' config classes that its modeling code never reads, per model_type, and why.
_UNUSED_KEYS = {
    "gemma3_text": {"attn_logit_softcapping": "transformers' Gemma 3 attention does not apply it"},
}
# The multimodal Gemma 3 config: `text_config` is the text model; these keys only concern images.
_GEMMA3_VISION_KEYS = frozenset(
    {"vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index"}
)
# Keys that never change the forward function of these causal LMs: training (dropout, init), caching, token ids,
# dtype of the stored weights, the heads of other tasks, generation defaults, output flags. Checked first, so
# that the usual config.json needs no look-up in transformers (whose import also loads PyTorch where installed).
_INERT_KEYS = frozenset(
    {
        "attention_dropout",
        "initializer_range",
        "use_cache",
        "pretraining_tp",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "torch_dtype",
        "dtype",
        "use_bfloat16",
        "embd_pdrop",
        "attn_pdrop",
        "resid_pdrop",
        "summary_activation",
        "summary_first_dropout",
        "summary_last_dropout",
        "summary_proj_to_labels",
        "summary_type",
        "summary_use_proj",
        "hidden_dropout",
        "classifier_dropout",
        "reorder_and_upcast_attn",
        "n_ctx",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "prefix",
        "is_encoder_decoder",
        "is_decoder",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "tf_legacy_loss",
        "tokenizer_class",
        "_attn_implementation_autoset",
        "transformers.js_config",
        "bad_words_ids",
        "begin_suppress_tokens",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_scores",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict_in_generate",
        "suppress_tokens",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        # mixture of experts: training-time routing settings (auxiliary loss, router noise applied in training only)
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
    }
)
_SUPPORTED_ROPE = ("default", "linear", "llama3")


# The mixture-of-experts fields of ModelConfig (a dense model's JSON leaves them out).
def _base_keys() -> frozenset[str]:
    """Attributes every transformers config has (output flags, label maps, generation defaults in 4.x)."""
    from transformers import PretrainedConfig

    return frozenset(PretrainedConfig().to_dict())


@functools.cache
def _reference(model_type: str) -> tuple[str, dict[str, Any]]:
    """``(class name, default attributes)`` of transformers' config class for ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls.__name__, cls().to_dict()


def _int(hf: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json lacks {key!r}, which a {hf.get('model_type')} model needs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CheckpointError(f"config.json has {key}={value!r}; it must be an integer")
    return int(value)


def _float(hf: Mapping[str, Any], key: str, default: float) -> float:
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"config.json has {key}={value!r}; it must be a number")
    return float(value)


def _rope(hf: Mapping[str, Any], default_theta: float = 10000.0) -> tuple[float, tuple | None]:
    """RoPE base and scaling from either the v4 (rope_theta/rope_scaling) or the v5 (rope_parameters) layout,
    completed as transformers completes it (top-level ``partial_rotary_factor`` and
    ``original_max_position_embeddings`` move into the RoPE parameters)."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(scaling, Mapping):
        raise CheckpointError("config.json: rope_parameters / rope_scaling must be objects or null")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(f"per-layer-type RoPE parameters ({sorted(params)}) are not supported")
    # transformers lets a legacy `rope_scaling` override `rope_parameters` (its type wins too).
    merged = {**params, **scaling}
    theta = float(merged.pop("rope_theta", hf.get("rope_theta") or default_theta))
    rope_type = (
        scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or params.get("type") or "default"
    )
    merged.pop("rope_type", None)
    merged.pop("type", None)
    partial = merged.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} (RoPE on part of each head) is not supported")
    if rope_type not in _SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE)})"
        )
    if rope_type == "default":
        merged.pop("original_max_position_embeddings", None)  # transformers ignores it without scaling
        if merged:
            raise UnsupportedModelError(f"unhandled parameters {sorted(merged)} for the default RoPE")
        return theta, None
    if rope_type == "llama3":
        merged.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings"),
        )
        needed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    else:
        needed = {"factor"}
    missing = sorted(k for k in needed if merged.get(k) is None)
    if missing:
        raise CheckpointError(f"config.json: {rope_type} RoPE scaling lacks {missing}")
    merged = {k: v for k, v in merged.items() if k in needed}  # what the RoPE code reads; nothing else
    merged["rope_type"] = rope_type
    return theta, _freeze(merged)


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None, float]:
    """Gemma 3's two RoPEs, ``(global theta, global scaling, local theta)``: full-attention layers use
    ``rope_theta`` (default 1e6) and ``rope_scaling``; sliding layers ``rope_local_base_freq`` (default 1e4), unscaled.
    transformers 5 writes them as ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError("config.json: rope_parameters must be an object or null")
    if params and not all(isinstance(v, Mapping) or v is None for v in params.values()):
        raise UnsupportedModelError(
            f"gemma3 rope_parameters without per-layer-type entries ({sorted(params)}) are not supported: "
            "expected {'full_attention': {...}, 'sliding_attention': {...}}"
        )
    unknown = set(params) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModelError(f"gemma3 rope_parameters for layer types {sorted(unknown)} are not supported")
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    theta, scaling = _rope(
        {"rope_parameters": full, "rope_scaling": hf.get("rope_scaling"), "rope_theta": hf.get("rope_theta")}, 1e6
    )
    local_theta, local_scaling = _rope(
        {"rope_parameters": local, "rope_theta": local.get("rope_theta", hf.get("rope_local_base_freq"))}, 1e4
    )
    if local_scaling is not None:
        raise UnsupportedModelError(f"gemma3 RoPE scaling on the sliding-attention layers ({local}) is not supported")
    return theta, scaling, local_theta


def _activation(hf: Mapping[str, Any], model_type: str) -> Activation:
    """The MLP activation a config names, or a refusal."""
    if model_type == "gemma":
        # transformers 4.x reads `hidden_activation` (None: the tanh GELU); 5.x maps the legacy "gelu" to tanh.
        act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
        allowed = ("gelu_pytorch_tanh", "gelu") if not hf.get("hidden_activation") else ("gelu_pytorch_tanh",)
    elif model_type in ("gemma2", "gemma3_text"):  # these read `hidden_activation` only
        act, allowed = hf.get("hidden_activation") or "gelu_pytorch_tanh", ("gelu_pytorch_tanh",)
    else:
        act, allowed = hf.get("hidden_act", "silu"), ("silu",)
    if act not in allowed:
        raise UnsupportedModelError(
            f"{model_type} with hidden activation {act!r} is not supported (supported: {allowed[0]})"
        )
    return "silu" if allowed[0] == "silu" else "gelu_tanh"


def _layer_types(hf: Mapping[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple | None]:
    """``(sliding_window, layer_types)`` as transformers derives them for ``model_type``."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if model_type in ("mistral", "phi3"):  # one window on every layer
        return (_int(hf, "sliding_window") if window else None), None
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2 with use_sliding_window=True (sliding-window layers) is not supported")
        if types and any(t != "full_attention" for t in types):
            raise UnsupportedModelError(f"qwen2 with per-layer attention types {sorted(set(types))} is not supported")
        return None, None
    if model_type == "qwen3":
        if not hf.get("use_sliding_window") or not window:
            return None, None  # transformers drops the window unless use_sliding_window: full attention everywhere
        if types is None:
            first = _int(hf, "max_window_layers", 28)
            types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n_layers)]
    elif model_type in ("gemma2", "gemma3_text"):
        window = hf.get("sliding_window", 4096)
        if types is None:
            period = 2 if model_type == "gemma2" else _int(hf, "sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers)]
    elif types and any(t != "full_attention" for t in types):
        raise UnsupportedModelError(
            f"{model_type} with per-layer attention types {sorted(set(types))} is not supported"
        )
    else:
        return None, None
    if not isinstance(types, list) or len(types) != n_layers:
        raise CheckpointError(f"config.json: layer_types must list {n_layers} layer types, got {types!r}")
    if set(types) - {"full_attention", "sliding_attention"}:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(set(types))} is not supported")
    if "sliding_attention" not in types:
        return None, None
    if not window:
        raise CheckpointError("config.json: sliding_attention layers need a sliding_window")
    return _int(hf, "sliding_window", window), tuple(types)


def _optional_float(hf: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """A number or null (``default`` when the key is absent)."""
    if key not in hf:
        return default
    return None if hf[key] is None else _float(hf, key, 0.0)


def _family_extras(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields that only some families set."""
    gemma = model_type in ("gemma", "gemma2", "gemma3_text")
    extras: dict[str, Any] = {
        "mlp_act": _activation(hf, model_type),
        "norm_offset": 1.0 if gemma else 0.0,
        "embed_scale": gemma,
    }
    if model_type in ("gemma2", "gemma3_text"):
        extras["norm_position"] = "sandwich"
        extras["query_pre_attn_scalar"] = _optional_float(hf, "query_pre_attn_scalar", 256.0)
        extras["final_softcap"] = _optional_float(
            hf, "final_logit_softcapping", 30.0 if model_type == "gemma2" else None
        )
        if model_type == "gemma2":
            extras["attn_softcap"] = _optional_float(hf, "attn_logit_softcapping", 50.0)
    if model_type in ("qwen3", "gemma3_text"):
        extras["qk_norm"] = "head"
    if model_type == "olmo2":
        extras.update(norm_position="post", qk_norm="proj")
    if model_type == "olmo":
        extras.update(norm_kind="nonparam", norm_eps=1e-5, clip_qkv=_optional_float(hf, "clip_qkv", None))
    return extras


# rms_norm_eps of transformers' config classes where it is not 1e-6.
_EPS_DEFAULTS = {"phi3": 1e-5, "olmo2": 1e-5}


def _decoder_config(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    """Every family but GPT-2: the keys of ``_READ_KEYS[model_type]`` -> a ModelConfig, or a refusal."""
    d = _int(hf, "hidden_size")
    n_heads = _int(hf, "num_attention_heads")
    n_layers = _int(hf, "num_hidden_layers")
    if "mlp_bias" in _READ_KEYS[model_type] and hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported (GLU MLPs without biases only)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=True is not supported (causal decoders only)")
    window, layer_types = _layer_types(hf, model_type, n_layers)
    local_theta = None
    if model_type == "gemma3_text":
        theta, scaling, local_theta = _gemma3_rope(hf)
    else:
        theta, scaling = _rope(hf)
    attention_bias = "attention_bias" in _READ_KEYS[model_type] and bool(hf.get("attention_bias", False))
    extras = _family_extras(hf, model_type)
    return ModelConfig(
        family=MODEL_TYPES[model_type],
        vocab_size=_int(hf, "vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_int(hf, "num_key_value_heads", n_heads),
        head_dim=_int(hf, "head_dim") if hf.get("head_dim") else d // n_heads,
        d_ff=_int(hf, "intermediate_size"),
        norm_eps=extras.pop("norm_eps", None) or _float(hf, "rms_norm_eps", _EPS_DEFAULTS.get(model_type, 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in ("gemma", "gemma2", "gemma3_text"))),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        sliding_window=window,
        layer_types=layer_types,
        rope_local_theta=local_theta,
        **extras,
    )


def _moe_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral / Qwen2-MoE config (ModelConfig changes to the decoder config
    :func:`_decoder_config` read), or a refusal of the layouts jaxind does not implement."""
    if model_type == "mixtral":
        fields: dict[str, Any] = {
            "n_experts": _int(hf, "num_local_experts", 8),
            "experts_per_token": _int(hf, "num_experts_per_tok", 2),
            "d_expert": _int(hf, "intermediate_size"),
            "d_ff": 0,
            "norm_topk_prob": True,  # MixtralTopKRouter always renormalises the top-k weights
            "sliding_window": _int(hf, "sliding_window") if hf.get("sliding_window") else None,
        }
    else:  # qwen2_moe
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "qwen2_moe with use_sliding_window=True (sliding-window layers) is not supported"
            )
        step, dense = _int(hf, "decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        if step != 1 or dense:
            raise UnsupportedModelError(
                f"qwen2_moe with dense MLP layers between the MoE layers (decoder_sparse_step={step}, "
                f"mlp_only_layers={dense}) is not supported: jaxind implements models whose every layer is a MoE layer"
            )
        if not isinstance(hf.get("norm_topk_prob", False), bool) or not isinstance(hf.get("qkv_bias", True), bool):
            raise CheckpointError("config.json: norm_topk_prob and qkv_bias must be true or false")
        shared = _int(hf, "shared_expert_intermediate_size", 5632)
        if shared == 0:
            raise UnsupportedModelError("qwen2_moe with shared_expert_intermediate_size=0 is not supported")
        fields = {
            "n_experts": _int(hf, "num_experts", 60),
            "experts_per_token": _int(hf, "num_experts_per_tok", 4),
            "d_expert": _int(hf, "moe_intermediate_size", 1408),
            "d_ff": shared,
            "norm_topk_prob": hf.get("norm_topk_prob", False),
            "shared_expert": True,
            "qkv_bias": hf.get("qkv_bias", True),
        }
    if fields["n_experts"] < 1:
        raise UnsupportedModelError(f"{model_type} with {fields['n_experts']} experts (a dense model) is not supported")
    return fields


def _gpt2_config(hf: Mapping[str, Any]) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(
            f"gpt2 with activation_function={hf.get('activation_function')!r} is not supported (gelu_new only)"
        )
    if (
        hf.get("scale_attn_by_inverse_layer_idx")
        or hf.get("add_cross_attention")
        or hf.get("scale_attn_weights", True) is False
    ):
        raise UnsupportedModelError(
            "gpt2 attention variants (scale_attn_by_inverse_layer_idx, cross attention, unscaled) are not supported"
        )
    d, n_heads = _int(hf, "n_embd"), _int(hf, "n_head")
    return ModelConfig(
        family="gpt2",
        vocab_size=_int(hf, "vocab_size"),
        d_model=d,
        n_layers=_int(hf, "n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d // n_heads,
        d_ff=_int(hf, "n_inner", 4 * d),
        norm_eps=_float(hf, "layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_act="gelu_tanh",
        glu=False,
        norm_kind="layer",
        max_positions=_int(hf, "n_positions", 1024),
        mlp_bias=True,
    )


def parse_hf_config(hf: Any) -> tuple[ModelConfig, dict[str, str]]:
    """A HF ``config.json`` dict -> ``(ModelConfig, ignored)``, refusing only what changes the function.

    Every key is one of:
      * read by jaxind (sizes, RoPE, biases, activation, sliding window...): an unsupported value is refused;
      * provenance (``model_type``, ``architectures``, ``transformers_version``): skipped;
      * known never to change the forward function (dropout, use_cache, token ids, dtype...): ignored;
      * otherwise checked against transformers' own config class for the ``model_type`` (looked up only here):
        not an attribute of that class (custom bookkeeping, keys of other transformers versions): transformers'
        model never reads it -> ignored; a generic ``PretrainedConfig`` attribute -> ignored; any other
        attribute -> ignored if its value is the class default (what jaxind implements), else refused.
    ``ignored`` maps each ignored key to why.

    Raises:
      CheckpointError: not a JSON object, or a required key is missing or malformed.
      UnsupportedModelError: an unknown ``model_type``, or a key whose value changes the function in a way
        jaxind does not implement (the message names the key, its value and what is supported).
    """
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"config.json must be a JSON object (a dict of settings), got a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: jaxind converts {', '.join(MODEL_TYPES)} "
            "(Llama 1/2/3.x, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1/2/3, Phi-3, OLMo, OLMo 2, GPT-2, "
            "Mixtral, Qwen2-MoE)"
        )
    if model_type == "gemma3":
        return _gemma3_multimodal(hf)
    if model_type == "gpt2":  # GPT2Config's attribute_map: the generic names of its n_* attributes
        aliases = {
            "hidden_size": "n_embd",
            "max_position_embeddings": "n_positions",
            "num_attention_heads": "n_head",
            "num_hidden_layers": "n_layer",
        }
        hf = {aliases.get(k, k): v for k, v in hf.items()}
    if hf.get("quantization_config"):
        quant = hf["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        raise UnsupportedModelError(
            f"quantised checkpoints (quantization_config: {method or '?'}) are not supported: "
            "use the unquantised (float16/bfloat16/float32) checkpoint or its GGUF file"
        )
    if hf.get("pruned_heads"):
        raise UnsupportedModelError(f"pruned_heads={hf['pruned_heads']} (heads removed per layer) is not supported")
    cfg = _gpt2_config(hf) if model_type == "gpt2" else _decoder_config(hf, model_type)
    if model_type in MOE_FAMILIES:
        cfg = cfg.replace(**_moe_fields(hf, model_type))
    return cfg, _unread_keys(hf, model_type, _READ_KEYS[model_type])


def _unread_keys(hf: Mapping[str, Any], model_type: str, read: frozenset[str]) -> dict[str, str]:
    """The keys of ``hf`` jaxind does not read -> why they cannot change the function; refuses any that can."""
    ignored: dict[str, str] = {}
    refused = []
    unused = _UNUSED_KEYS.get(model_type, {})
    class_name = model_type
    for key in sorted(set(hf) - read - _PROVENANCE_KEYS):
        if key in _INERT_KEYS:
            ignored[key] = "does not change the function"
            continue
        if key in unused:
            ignored[key] = unused[key]
            continue
        class_name, defaults = _reference(model_type)  # only for keys jaxind does not know
        if key not in defaults:
            ignored[key] = f"not a {class_name} attribute"
        elif key in _base_keys():
            ignored[key] = "does not change the function"
        elif hf[key] == defaults[key]:
            ignored[key] = f"{class_name} default"
        else:
            refused.append(f"{key}={hf[key]!r} (jaxind implements only {key}={defaults[key]!r})")
    if refused:
        raise UnsupportedModelError(
            f"{model_type} config.json sets {'; '.join(refused)}: transformers' {class_name} uses "
            f"{'this' if len(refused) == 1 else 'these'} and jaxind does not; refusing to build a model that could "
            "differ from the checkpoint"
        )
    return ignored


_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def _gemma3_multimodal(hf: Mapping[str, Any]) -> tuple[ModelConfig, dict[str, str]]:
    """A multimodal Gemma 3 config (``model_type: gemma3``): its ``text_config`` is the text model, read as a
    ``gemma3_text`` config; the image keys are ignored (text-only inputs never reach the vision tower)."""
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise CheckpointError("config.json: a gemma3 config needs its text model's settings under text_config")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise UnsupportedModelError(f"gemma3 text_config of model_type {text.get('model_type')!r} is not supported")
    tie_outer = hf.get("tie_word_embeddings")
    if tie_outer is not None and "tie_word_embeddings" in text and bool(tie_outer) != bool(text["tie_word_embeddings"]):
        raise UnsupportedModelError(
            f"gemma3 config ties embeddings at the top level ({tie_outer}) but not in text_config: not supported"
        )
    # transformers fills the sizes a text_config omits (Gemma 3 4B lists only five keys) from Gemma3TextConfig.
    defaults = _reference("gemma3_text")[1]
    text = {**{key: defaults[key] for key in _SIZE_KEYS if key in defaults}, **text, "model_type": "gemma3_text"}
    if tie_outer is not None:
        text.setdefault("tie_word_embeddings", tie_outer)
    # transformers' multimodal Gemma 3 returns its LM head's logits as they are: no final soft-capping.
    unused = {"final_logit_softcapping": "transformers' Gemma3ForConditionalGeneration does not apply it"}
    cfg, ignored = parse_hf_config({key: value for key, value in text.items() if key not in unused})
    ignored = {f"text_config.{key}": why for key, why in {**ignored, **unused}.items() if key in ignored or key in text}
    image = "image input only; text-only inputs never reach it"
    outer = {key: image for key in hf if key in _GEMMA3_VISION_KEYS}
    read = _GEMMA3_VISION_KEYS | {"text_config", "tie_word_embeddings"}
    return cfg, {**outer, **_unread_keys(hf, "gemma3", read), **ignored}


def from_hf_config(hf: Any) -> ModelConfig:
    """:func:`parse_hf_config` without the record of ignored keys."""
    return parse_hf_config(hf)[0]
