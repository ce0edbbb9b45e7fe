"""Model configuration: one frozen, hashable dataclass for every supported decoder family.

`ModelConfig` is what the forward pass needs and nothing more; it is a static argument of the
jitted functions. `from_hf_config` reads a Hugging Face ``config.json`` dict *strictly*: an
attribute that would change the model's function and that jaxind does not implement raises
:class:`UnsupportedModelError` rather than producing a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Mapping, get_args

from jaxind.errors import UnsupportedModelError

# Families and the HF `model_type` values they cover.
Family = Literal["llama", "mistral", "qwen2", "gemma", "gpt2"]
FAMILIES: tuple[Family, ...] = get_args(Family)
# MLP activations: SiLU (SwiGLU) and tanh-approximated GELU (GeGLU, GPT-2).
Activation = Literal["silu", "gelu_tanh"]
# Norms: RMSNorm, or LayerNorm with a bias (GPT-2).
NormKind = Literal["rms", "layer"]

# Config keys that never change the forward function (training, generation, bookkeeping).
_INERT_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "eos_token_id",
        "pad_token_id", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
        "label2id", "initializer_range", "is_encoder_decoder", "output_attentions",
        "output_hidden_states", "pretraining_tp", "problem_type", "return_dict",
        "transformers_version", "use_cache", "model_type", "max_position_embeddings",
        "tie_word_embeddings", "tokenizer_class", "_attn_implementation_autoset",
        "quantization_config", "task_specific_params", "prefix", "finetuning_task",
        "tf_legacy_loss", "use_bfloat16", "pruned_heads", "torchscript", "tokenizer_class",
        "add_cross_attention", "cross_attention_hidden_size", "is_decoder", "num_labels",
        "bad_words_ids", "begin_suppress_tokens", "decoder_start_token_id", "diversity_penalty",
        "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
        "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
        "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
        "output_scores", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
        "sep_token_id", "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
        "tie_encoder_decoder", "transformers.js_config", "max_window_layers",
    }
)
# Keys read by `from_hf_config` (per family extras below).
_CORE_KEYS = frozenset(
    {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "hidden_activation", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "layer_types",
        "use_bidirectional_attention",
    }
)
_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer (Llama-style, pre-norm, GLU MLP).

    Attributes:
      family: one of FAMILIES.
      vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes
        (``d_ff`` is the MLP hidden width h).
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling: ``None`` or a sorted tuple of ``(key, value)`` pairs (hashable), e.g.
        ``(("factor", 8.0), ..., ("rope_type", "llama3"))``.
      tie_embeddings: the LM head reuses the embedding matrix.
      qkv_bias / o_bias: linear biases on q, k, v / on the attention output.
      mlp_act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
      norm_offset: 1.0 where the norm scales by ``1 + w`` (Gemma), else 0.0.
      embed_scale: multiply embeddings by sqrt(d_model) (Gemma).
      sliding_window: attention window (Mistral) or ``None`` for full causal attention.
      glu: gated MLP (gate, up, down) if True; plain MLP (up, act, down) if False (GPT-2).
      norm_kind: "rms" (RMSNorm) or "layer" (LayerNorm with bias, GPT-2).
      max_positions: size of the learned position embedding; 0 means RoPE.
      mlp_bias: biases on the MLP projections (GPT-2).
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_act: Activation = "silu"
    norm_offset: float = 0.0
    embed_scale: bool = False
    sliding_window: int | None = None
    glu: bool = True
    norm_kind: NormKind = "rms"
    max_positions: int = 0
    mlp_bias: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(
                f"unsupported model family {self.family!r}; jaxind supports {', '.join(FAMILIES)}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )
        if self.mlp_act not in get_args(Activation):
            raise UnsupportedModelError(f"unsupported MLP activation {self.mlp_act!r}")
        if self.norm_kind not in get_args(NormKind):
            raise UnsupportedModelError(f"unsupported norm {self.norm_kind!r}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope(self) -> bool:
        """Rotary position embedding (every family but GPT-2)."""
        return self.max_positions == 0

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, h, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.o_bias:
            attn += d
        mlp = (3 if self.glu else 2) * d * h + ((h + d) if self.mlp_bias else 0)
        norm = d if self.norm_kind == "rms" else 2 * d
        per_layer = attn + mlp + 2 * norm
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.max_positions * d + self.n_layers * per_layer + norm + head

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["rope_scaling"] = self.rope_scaling_dict
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise UnsupportedModelError(f"unknown jaxind config fields: {sorted(unknown)}")
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = _freeze(data["rope_scaling"])
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _freeze(mapping: Mapping[str, Any] | None) -> tuple | None:
    if mapping is None:
        return None
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()))


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """Reads RoPE base and scaling from either the v4 (rope_theta/rope_scaling) or the
    v5 (rope_parameters) layout of a HF config."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE)})"
        )
    if rope_type == "default":
        if merged.get("partial_rotary_factor", 1.0) == 1.0:
            merged.pop("partial_rotary_factor", None)
        if merged:
            raise UnsupportedModelError(f"unhandled RoPE parameters {sorted(merged)}")
        return theta, None
    merged["rope_type"] = rope_type
    return theta, _freeze(merged)


_GPT2_KEYS = frozenset(
    {
        "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "activation_function",
        "layer_norm_epsilon", "vocab_size", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn", "embd_pdrop", "attn_pdrop", "resid_pdrop", "summary_activation",
        "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
    }
)


def _from_gpt2_config(hf: Mapping[str, Any]) -> ModelConfig:
    unknown = set(hf) - _INERT_KEYS - _GPT2_KEYS
    if unknown:
        raise UnsupportedModelError(f"gpt2 config has attributes jaxind does not handle: {sorted(unknown)}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"gpt2 with activation_function={hf.get('activation_function')!r} is not supported (gelu_new only)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention") or hf.get("scale_attn_weights", True) is False:
        raise UnsupportedModelError("gpt2 attention variants (scale_attn_by_inverse_layer_idx, cross attention, unscaled) are not supported")
    d, n_heads = int(hf["n_embd"]), int(hf["n_head"])
    return ModelConfig(
        family="gpt2", vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["n_layer"]),
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d // n_heads, d_ff=int(hf.get("n_inner") or 4 * d),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True, qkv_bias=True, o_bias=True,
        mlp_act="gelu_tanh", glu=False, norm_kind="layer", max_positions=int(hf.get("n_positions", 1024)), mlp_bias=True,
    )


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a HF config dict, refusing anything not implemented.

    Raises:
      UnsupportedModelError: unknown `model_type`, an unhandled attribute, or an unsupported
        value (activation, MLP bias, sliding-window layout, RoPE type).
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _from_gpt2_config(hf)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: jaxind converts {', '.join(FAMILIES)} "
            "(Llama 1/2/3.x, SmolLM2, Mistral, Qwen2, Gemma, GPT-2)"
        )
    unknown = set(hf) - _INERT_KEYS - _CORE_KEYS
    if unknown:
        raise UnsupportedModelError(
            f"{model_type} config has attributes jaxind does not handle: {sorted(unknown)}; "
            "refusing to build a model that could differ from the checkpoint"
        )
    d = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or d // n_heads
    act = hf.get("hidden_act") if model_type != "gemma" else (hf.get("hidden_activation") or hf.get("hidden_act"))
    expected_act = {"gemma": ("gelu_pytorch_tanh", "gelu")}.get(model_type, ("silu",))
    if act not in expected_act:
        raise UnsupportedModelError(f"{model_type} with hidden_act={act!r} is not supported (expected {expected_act[0]})")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported (GLU MLPs without biases only)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=True is not supported (causal decoders only)")
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2 with use_sliding_window=True is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and model_type != "mistral" and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"{model_type} with per-layer attention types {set(layer_types)} is not supported")
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=model_type,
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        d_ff=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_act="gelu_tanh" if model_type == "gemma" else "silu",
        norm_offset=1.0 if model_type == "gemma" else 0.0,
        embed_scale=model_type == "gemma",
        sliding_window=int(sliding) if sliding else None,
    )
