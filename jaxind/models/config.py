"""Model configuration: one frozen, hashable dataclass for every supported decoder family.

`ModelConfig` is what the forward pass needs and nothing more; it is a static argument of the
jitted functions. Reading a Hugging Face ``config.json`` into one is :mod:`jaxind.io.hf_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any, Literal, get_args

from jaxind.errors import CheckpointError, UnsupportedModelError

__all__ = [
    "Activation",
    "FAMILIES",
    "Family",
    "LayerType",
    "MODEL_TYPES",
    "MOE_FAMILIES",
    "ModelConfig",
    "NormKind",
    "NormPosition",
    "QKNorm",
]

# Families (jaxind's names; `MODEL_TYPES` maps the HF `model_type` values onto them).
Family = Literal[
    "llama", "mistral", "qwen2", "gemma", "gpt2", "gemma2", "gemma3", "qwen3", "phi3", "olmo", "olmo2",
    "mixtral", "qwen2_moe",
]  # fmt: skip
FAMILIES: tuple[Family, ...] = get_args(Family)
# Mixture-of-experts families (routed SwiGLU experts; see jaxind.models.moe).
MOE_FAMILIES: tuple[Family, ...] = ("mixtral", "qwen2_moe")
# HF `model_type` -> family. "gemma3" is the multimodal config: its `text_config` is the text model jaxind reads.
MODEL_TYPES: dict[str, Family] = {
    **{family: family for family in FAMILIES if family != "gemma3"},
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
# MLP activations: SiLU (SwiGLU) and tanh-approximated GELU (GeGLU, GPT-2).
Activation = Literal["silu", "gelu_tanh"]
# Norms: RMSNorm, LayerNorm with a bias (GPT-2), or LayerNorm without weight or bias (OLMo).
NormKind = Literal["rms", "layer", "nonparam"]
# Where a block's norms sit: before attention and MLP (Llama), before and after each (Gemma 2/3: "sandwich"),
# or on the outputs of attention and MLP only (OLMo 2).
NormPosition = Literal["pre", "sandwich", "post"]
# RMSNorm of queries and keys: none, over each head's `head_dim` (Qwen3, Gemma 3), or over the whole q/k
# projection (OLMo 2).
QKNorm = Literal["none", "head", "proj"]
# Attention type of one layer (transformers' `layer_types` values).
LayerType = Literal["full_attention", "sliding_attention"]

# Keys of every config.json that only say where the file came from; neither used nor recorded.
_MOE_FIELDS = ("n_experts", "experts_per_token", "d_expert", "norm_topk_prob", "shared_expert")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer (Llama-style, pre-norm, GLU MLP, and the variants below).

    Attributes:
      family: one of FAMILIES.
      vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes
        (``d_ff`` is the MLP hidden width h).
      norm_eps: norm epsilon.
      rope_theta: RoPE base (of the full-attention layers where ``rope_local_theta`` is set).
      rope_scaling: ``None`` or a sorted tuple of ``(key, value)`` pairs (hashable), e.g.
        ``(("factor", 8.0), ..., ("rope_type", "llama3"))``; on the full-attention layers only where
        ``rope_local_theta`` is set.
      tie_embeddings: the LM head reuses the embedding matrix.
      qkv_bias / o_bias: linear biases on q, k, v / on the attention output.
      mlp_act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
      norm_offset: 1.0 where the norm scales by ``1 + w`` (Gemma), else 0.0.
      embed_scale: multiply embeddings by sqrt(d_model) (Gemma).
      sliding_window: attention window, or ``None`` for full causal attention; on every layer (Mistral, Phi-3)
        or, where ``layer_types`` is set, on the ``"sliding_attention"`` layers only.
      glu: gated MLP (gate, up, down) if True; plain MLP (up, act, down) if False (GPT-2).
      norm_kind: "rms" (RMSNorm), "layer" (LayerNorm with bias, GPT-2) or "nonparam" (LayerNorm without
        weight or bias, OLMo: no norm weights at all).
      max_positions: size of the learned position embedding; 0 means RoPE.
      mlp_bias: biases on the MLP projections (GPT-2).
      norm_position: "pre" (norms before attention and MLP), "sandwich" (also after each, on its output:
        Gemma 2/3) or "post" (after each only: OLMo 2).
      qk_norm: RMSNorm of queries and keys before RoPE: "none", "head" (over each head, weights ``(hd,)``:
        Qwen3, Gemma 3) or "proj" (over the whole projection, weights ``(H*hd,)``/``(K*hd,)``: OLMo 2).
      clip_qkv: clamp q, k and v to ``[-c, c]`` after their projections (OLMo), or ``None``.
      attn_softcap: attention scores become ``c * tanh(s / c)`` (Gemma 2), or ``None``.
      final_softcap: logits become ``c * tanh(z / c)`` (Gemma 2), or ``None``.
      query_pre_attn_scalar: attention scores are scaled by ``1 / sqrt(this)`` (Gemma 2/3); ``None``: head_dim.
      layer_types: per layer, "full_attention" or "sliding_attention" (Gemma 2/3, Qwen3), or ``None``.
      rope_local_theta: RoPE base of the sliding-attention layers, which then use no RoPE scaling (Gemma 3),
        or ``None`` (every layer uses ``rope_theta`` and ``rope_scaling``).
      n_experts: routed experts per layer (mixture of experts, :mod:`jaxind.models.moe`); 0 for a dense MLP.
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
    norm_position: NormPosition = "pre"
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    layer_types: tuple[LayerType, ...] | None = None
    rope_local_theta: float | None = None
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
        for name, literal in (
            ("mlp_act", Activation),
            ("norm_kind", NormKind),
            ("norm_position", NormPosition),
            ("qk_norm", QKNorm),
        ):
            if getattr(self, name) not in get_args(literal):
                raise UnsupportedModelError(f"unsupported {name} {getattr(self, name)!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(get_args(LayerType)):
                raise UnsupportedModelError(
                    f"layer_types must name {self.n_layers} layers, each one of {get_args(LayerType)}, "
                    f"got {list(self.layer_types)}"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise UnsupportedModelError("sliding-attention layers need a sliding_window")

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
        """Mixture-of-experts layers (routed experts, :mod:`jaxind.models.moe`)."""
        return self.n_experts > 0

    @property
    def has_norm_weights(self) -> bool:
        """Whether the norms carry weights (every family but OLMo's non-parametric LayerNorm)."""
        return self.norm_kind != "nonparam"

    def sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends within ``sliding_window`` only."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope(self) -> bool:
        """Rotary position embedding (every family but GPT-2)."""
        return self.max_positions == 0

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once), from the parameter table."""
        from jaxind.models import paramspec  # the table imports this module

        return paramspec.num_params(self)

    def to_json(self) -> str:
        """The config as JSON (a dense model's leaves out the mixture-of-experts fields, at their defaults, so that
        its checkpoints stay readable by jaxind versions before mixtures of experts)."""
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not self.moe:
            for name in _MOE_FIELDS:
                if data[name] == defaults[name]:
                    data.pop(name)
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
        if data.get("layer_types") is not None:
            if not isinstance(data["layer_types"], list):
                raise CheckpointError(
                    f"jaxind config field layer_types must be a list or null, got {data['layer_types']!r}"
                )
            data["layer_types"] = tuple(data["layer_types"])
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
def __getattr__(name: str) -> Any:
    """``from_hf_config``/``parse_hf_config`` moved to :mod:`jaxind.io.hf_config` (kept here for one release)."""
    from jaxind import _compat

    return _compat.moved_name(__name__, name)
