"""Model configuration: one frozen, hashable dataclass for every supported decoder family.

`ModelConfig` is what the forward pass needs and nothing more; it is a static argument of the
jitted functions. `parse_hf_config` reads a Hugging Face ``config.json`` dict precisely: a key is
refused (:class:`UnsupportedModelError`) only when it can change the model's function and jaxind
does not implement its value; keys that cannot (bookkeeping, token ids, dropout, keys transformers'
own config class does not define) are returned as ``ignored`` and never stop a run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any, Literal, cast, get_args

from jaxind.errors import CheckpointError, UnsupportedModelError

# Families and the HF `model_type` values they cover.
Family = Literal["llama", "mistral", "qwen2", "gemma", "gpt2", "mixtral", "qwen2_moe"]
FAMILIES: tuple[Family, ...] = get_args(Family)
# Mixture-of-experts families (routed SwiGLU experts; see jaxind.moe).
MOE_FAMILIES: tuple[Family, ...] = ("mixtral", "qwen2_moe")
# MLP activations: SiLU (SwiGLU) and tanh-approximated GELU (GeGLU, GPT-2).
Activation = Literal["silu", "gelu_tanh"]
# Norms: RMSNorm, or LayerNorm with a bias (GPT-2).
NormKind = Literal["rms", "layer"]

# Keys of every config.json that only say where the file came from; neither used nor recorded.
_PROVENANCE_KEYS = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path"})

# Keys jaxind reads or checks (see `_decoder_config` / `_gpt2_config`), per family. This includes every key that
# transformers' modeling and RoPE code read through `getattr` even where the config class does not declare it
# (`head_dim`, `partial_rotary_factor`, `original_max_position_embeddings`, ...).
_DECODER_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "partial_rotary_factor",
        "original_max_position_embeddings",
        "attention_bias",
        "mlp_bias",
        "tie_word_embeddings",
        "quantization_config",
        "pruned_heads",
    }
)
_READ_KEYS = {
    "llama": _DECODER_KEYS,
    "mistral": _DECODER_KEYS | {"sliding_window"},
    "qwen2": _DECODER_KEYS | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
    "gemma": _DECODER_KEYS | {"hidden_activation", "use_bidirectional_attention"},
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
      n_experts: routed experts per layer (mixture of experts, :mod:`jaxind.moe`); 0 for a dense MLP.
        A MoE config's ``d_ff`` is the width of its shared expert (Qwen2-MoE), or 0 when it has none (Mixtral).
      experts_per_token: the top-k experts each token is routed to.
      d_expert: hidden width of each routed expert.
      norm_topk_prob: the top-k routing weights are renormalised to sum to 1 (Mixtral always; Qwen2-MoE per config).
      shared_expert: the dense MLP (``gate``/``up``/``down``, width ``d_ff``) is a shared expert added to every token,
        scaled by ``sigmoid(x . shared_gate)`` (Qwen2-MoE).
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
    n_experts: int = 0
    experts_per_token: int = 0
    d_expert: int = 0
    norm_topk_prob: bool = True
    shared_expert: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(
                f"unsupported model family {self.family!r}; jaxind supports {', '.join(FAMILIES)}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if name == "d_ff" and self.n_experts and value == 0 and not self.shared_expert:
                continue  # a MoE layer without a dense or shared MLP (Mixtral)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"config field {name} must be a positive integer, got {value!r}")
        self._check_experts()
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )
        if self.mlp_act not in get_args(Activation):
            raise UnsupportedModelError(f"unsupported MLP activation {self.mlp_act!r}")
        if self.norm_kind not in get_args(NormKind):
            raise UnsupportedModelError(f"unsupported norm {self.norm_kind!r}")

    def _check_experts(self) -> None:
        """Refuses inconsistent mixture-of-experts fields (a dense config has them all at their defaults)."""
        e, k, he = self.n_experts, self.experts_per_token, self.d_expert
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (e, k, he)):
            raise UnsupportedModelError(f"expert counts and widths must be non-negative integers, got {e}, {k}, {he}")
        if not e:
            if k or he or self.shared_expert:
                raise UnsupportedModelError("experts_per_token, d_expert and shared_expert need n_experts > 0")
            return
        if not 1 <= k <= e or he <= 0:
            raise UnsupportedModelError(
                f"a mixture of {e} experts needs 1 <= experts_per_token <= {e} (got {k}) and d_expert > 0 (got {he})"
            )
        if not self.glu or self.mlp_act != "silu" or self.mlp_bias:
            raise UnsupportedModelError("mixture-of-experts layers are SwiGLU experts without biases only")

    @property
    def moe(self) -> bool:
        """Mixture-of-experts layers (routed experts, :mod:`jaxind.moe`)."""
        return self.n_experts > 0

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
        mlp += self.n_experts * (d + 3 * d * self.d_expert) + (d if self.shared_expert else 0)  # router, experts
        norm = d if self.norm_kind == "rms" else 2 * d
        per_layer = attn + mlp + 2 * norm
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.max_positions * d + self.n_layers * per_layer + norm + head

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["rope_scaling"] = self.rope_scaling_dict
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """The inverse of :meth:`ModelConfig.to_json`'s dict.

        Raises:
          CheckpointError: not a JSON object, unknown or missing fields.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"a jaxind config must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise CheckpointError(f"unknown jaxind config fields: {sorted(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if required - set(data):
            raise CheckpointError(f"jaxind config lacks fields {sorted(required - set(data))}")
        data = dict(data)
        if data.get("rope_scaling") is not None:
            if not isinstance(data["rope_scaling"], Mapping):
                raise CheckpointError(
                    f"jaxind config field rope_scaling must be an object or null, got {data['rope_scaling']!r}"
                )
            data["rope_scaling"] = _freeze(data["rope_scaling"])
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _freeze(mapping: Mapping[str, Any] | None) -> tuple | None:
    if mapping is None:
        return None
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()))


@functools.cache
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


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
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
    theta = float(merged.pop("rope_theta", hf.get("rope_theta") or 10000.0))
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


def _decoder_config(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    """Llama, Mistral, Qwen2 and Gemma: the keys of ``_READ_KEYS`` -> a ModelConfig, or a refusal."""
    d = _int(hf, "hidden_size")
    n_heads = _int(hf, "num_attention_heads")
    if model_type == "gemma":
        # transformers 4.x reads `hidden_activation` (None: the tanh GELU); 5.x maps the legacy "gelu" to tanh.
        act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
        allowed = ("gelu_pytorch_tanh", "gelu") if not hf.get("hidden_activation") else ("gelu_pytorch_tanh",)
    else:
        act, allowed = hf.get("hidden_act", "silu"), ("silu",)
    if act not in allowed:
        raise UnsupportedModelError(
            f"{model_type} with hidden activation {act!r} is not supported (supported: {allowed[0]})"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported (GLU MLPs without biases only)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=True is not supported (causal decoders only)")
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedModelError("qwen2 with use_sliding_window=True (sliding-window layers) is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"{model_type} with per-layer attention types {sorted(set(layer_types))} is not supported"
        )
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=cast(Family, model_type),
        vocab_size=_int(hf, "vocab_size"),
        d_model=d,
        n_layers=_int(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=_int(hf, "num_key_value_heads", n_heads),
        head_dim=_int(hf, "head_dim") if hf.get("head_dim") else d // n_heads,
        d_ff=_int(hf, "intermediate_size"),
        norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_act="gelu_tanh" if model_type == "gemma" else "silu",
        norm_offset=1.0 if model_type == "gemma" else 0.0,
        embed_scale=model_type == "gemma",
        sliding_window=_int(hf, "sliding_window") if sliding else None,
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
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: jaxind converts {', '.join(FAMILIES)} "
            "(Llama 1/2/3.x, SmolLM2, Mistral, Qwen2, Gemma, GPT-2, Mixtral, Qwen2-MoE)"
        )
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
    ignored: dict[str, str] = {}
    refused = []
    for key in sorted(set(hf) - _READ_KEYS[model_type] - _PROVENANCE_KEYS):
        if key in _INERT_KEYS:
            ignored[key] = "does not change the function"
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
    return cfg, ignored


def from_hf_config(hf: Any) -> ModelConfig:
    """:func:`parse_hf_config` without the record of ignored keys."""
    return parse_hf_config(hf)[0]
