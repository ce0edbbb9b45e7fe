"""Checkpoint-name -> param-tree-path tables, one per checkpoint family, plus the small
named transforms they use.

The generic loop in :mod:`converters.build` knows nothing of any family: it matches each
checkpoint tensor name against a table, applies the rule's transform and stores the result
at the rule's path (``"layers.{layer}.q"``). Adding a family means adding a table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from jaxind.models.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def keep(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Stored as is (embeddings, norms, biases)."""
    return w


def transpose(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """torch Linear ``(out, in)`` -> jaxind kernel ``(in, out)``."""
    return np.ascontiguousarray(w.T)


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of q/k rows (``(heads*hd, d)``) into HF's half-split RoPE
    layout: within each head, rows ``(hd/2, 2)`` become ``(2, hd/2)``."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_q(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """GGUF llama ``attn_q`` -> kernel ``(d, H*hd)`` in HF RoPE layout."""
    return transpose(_unpermute_rope(w, cfg.n_heads), cfg)


def gguf_k(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """GGUF llama ``attn_k`` -> kernel ``(d, K*hd)`` in HF RoPE layout."""
    return transpose(_unpermute_rope(w, cfg.n_kv_heads), cfg)


def gguf_q_bias(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute_rope(w, cfg.n_heads)


def gguf_k_bias(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute_rope(w, cfg.n_kv_heads)


def minus_one(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """llama.cpp stores Gemma's norm weights with the ``+1`` of its ``1 + w`` folded in; jaxind (like
    transformers) keeps ``w``."""
    return (w - np.float32(1.0)).astype(np.float32)


def split_fused(part: str) -> Transform:
    """One part of a fused projection stored ``(out, in)`` (Phi-3), as a kernel ``(in, n)``: ``"q"``, ``"k"``, ``"v"``
    of ``qkv_proj`` (rows ``H*hd``, ``K*hd``, ``K*hd``) or ``"gate"``, ``"up"`` of ``gate_up_proj`` (``h`` rows each,
    gate first, as transformers' ``chunk(2)`` and llama.cpp's fused SwiGLU split it)."""

    def transform(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        q, kv, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, h), "up": (h, h)}[part]
        if w.shape[0] != (q + 2 * kv if part in "qkv" else 2 * h):
            raise ValueError(f"fused tensor of {w.shape[0]} rows cannot hold {part}")
        return np.ascontiguousarray(w[start : start + size].T)

    transform.__name__ = f"split_fused_{part}"
    return transform


def split_qkv(part: int, bias: bool = False) -> Transform:
    """GPT-2's fused ``c_attn`` (Conv1D, already ``(d, 3d)``; bias ``(3d,)``) -> its q, k or v."""

    def transform(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        d = cfg.d_model
        return np.ascontiguousarray(w[..., part * d : (part + 1) * d])

    transform.__name__ = f"split_qkv_{'qkv'[part]}{'_bias' if bias else ''}"
    return transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, full match; the layer index is group 1) -> ``path`` (``{}`` = layer).

    ``expert``: the tensor is one expert's slice of the stacked leaf at ``path`` (a mixture of experts stores one
    tensor per expert); group 2 of the pattern is its index on the leaf's expert axis (:meth:`Rule.index`)."""

    pattern: str
    path: str
    transform: Transform = keep
    expert: bool = False

    def match(self, name: str) -> str | None:
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        return self.path.format(*m.groups())

    def index(self, name: str) -> int | None:
        """The expert index of ``name`` for an ``expert`` rule (None otherwise)."""
        m = re.fullmatch(self.pattern, name) if self.expert else None
        return None if m is None else int(m.group(2))


_L = r"(\d+)"


def _hf_rules(prefix: str = r"model\.", head: str = r"lm_head\.weight", sandwich: bool = False) -> tuple[Rule, ...]:
    """Hugging Face decoder names under ``prefix``. ``sandwich``: ``post_attention_layernorm`` is the norm of the
    attention output (Gemma 2/3, OLMo 2), not the one before the MLP (``pre_feedforward_layernorm`` there)."""
    layer = rf"{prefix}layers\.{_L}\."
    rules = [
        Rule(rf"{prefix}embed_tokens\.weight", "embed"),
        Rule(rf"{layer}input_layernorm\.weight", "layers.{}.attn_norm"),
        *(Rule(rf"{layer}self_attn\.{n}_proj\.weight", f"layers.{{}}.{n}", transpose) for n in "qkvo"),
        *(Rule(rf"{layer}self_attn\.{n}_proj\.bias", f"layers.{{}}.{n}_bias") for n in "qkvo"),
        Rule(rf"{layer}self_attn\.q_norm\.weight", "layers.{}.q_norm"),
        Rule(rf"{layer}self_attn\.k_norm\.weight", "layers.{}.k_norm"),
        *(Rule(rf"{layer}mlp\.{n}_proj\.weight", f"layers.{{}}.{n}", transpose) for n in ("gate", "up", "down")),
        Rule(rf"{prefix}norm\.weight", "final_norm"),
        Rule(head, "lm_head", transpose),
    ]
    if sandwich:
        rules += [
            Rule(rf"{layer}post_attention_layernorm\.weight", "layers.{}.post_attn_norm"),
            Rule(rf"{layer}pre_feedforward_layernorm\.weight", "layers.{}.mlp_norm"),
            Rule(rf"{layer}post_feedforward_layernorm\.weight", "layers.{}.post_mlp_norm"),
        ]
    else:
        rules.append(Rule(rf"{layer}post_attention_layernorm\.weight", "layers.{}.mlp_norm"))
    return tuple(rules)


# Hugging Face names: Llama 1/2/3.x, SmolLM2, Mistral, Qwen2/3, Gemma and OLMo share them (OLMo has no norm
# weights, Qwen3 adds q/k norms).
HF_DECODER = _hf_rules()
# Gemma 2/3 and OLMo 2: norms on the attention and MLP outputs.
HF_SANDWICH = _hf_rules(sandwich=True)
# Gemma 3, text-only (``model.``) or the text model of a multimodal checkpoint (``language_model.model.`` on the
# hub, ``model.language_model.`` as transformers 5 saves it).
HF_GEMMA3 = _hf_rules(
    r"(?:model\.|model\.language_model\.|language_model\.model\.)", r"(?:language_model\.)?lm_head\.weight", True
)
# Phi-3 (Phi-3.5, Phi-4): fused q/k/v and fused gate/up projections.
_FUSED = ("q", "k", "v", "gate", "up")
HF_PHI3 = tuple(r for r in HF_DECODER if r.path.rsplit(".", 1)[-1] not in _FUSED) + tuple(
    Rule(rf"model\.layers\.{_L}\.{fused}\.weight", f"layers.{{}}.{n}", split_fused(n))
    for fused, parts in ((r"self_attn\.qkv_proj", "qkv"), (r"mlp\.gate_up_proj", ("gate", "up")))
    for n in parts
)


def transpose_experts(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Stacked torch Linear weights ``(E, out, in)`` -> stacked kernels ``(E, in, out)``."""
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def fused_expert_gate(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """transformers 5's fused ``experts.gate_up_proj`` ``(E, 2 he, d)`` -> ``expert_gate`` ``(E, d, he)``."""
    return transpose_experts(w[:, : cfg.d_expert], cfg)


def fused_expert_up(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """transformers 5's fused ``experts.gate_up_proj`` ``(E, 2 he, d)`` -> ``expert_up`` ``(E, d, he)``."""
    return transpose_experts(w[:, cfg.d_expert :], cfg)


def flatten(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A ``(1, d)`` linear map to one output (Qwen2-MoE's ``shared_expert_gate``) -> ``(d,)``."""
    return np.ascontiguousarray(w.reshape(-1))


_E = r"(\d+)"
# Mixture of experts (Mixtral, Qwen2-MoE): one tensor per expert as checkpoints store them (Mixtral's
# `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen2-MoE's `mlp.experts.{e}.gate_proj/up_proj/down_proj`), or the
# fused `mlp.experts.gate_up_proj`/`down_proj` of a transformers 5 state dict; Qwen2-MoE's shared expert is the
# dense MLP (`gate`/`up`/`down`) plus `shared_gate`.
_MOE = rf"model\.layers\.{_L}\.(?:block_sparse_moe|mlp)"
HF_MOE = HF_DECODER + (
    Rule(rf"{_MOE}\.gate\.weight", "layers.{}.router", transpose),
    Rule(rf"{_MOE}\.experts\.{_E}\.(?:w1|gate_proj)\.weight", "layers.{}.expert_gate", transpose, expert=True),
    Rule(rf"{_MOE}\.experts\.{_E}\.(?:w3|up_proj)\.weight", "layers.{}.expert_up", transpose, expert=True),
    Rule(rf"{_MOE}\.experts\.{_E}\.(?:w2|down_proj)\.weight", "layers.{}.expert_down", transpose, expert=True),
    Rule(rf"{_MOE}\.experts\.gate_up_proj", "layers.{}.expert_gate", fused_expert_gate),
    Rule(rf"{_MOE}\.experts\.gate_up_proj", "layers.{}.expert_up", fused_expert_up),
    Rule(rf"{_MOE}\.experts\.down_proj", "layers.{}.expert_down", transpose_experts),
    Rule(rf"{_MOE}\.shared_expert\.gate_proj\.weight", "layers.{}.gate", transpose),
    Rule(rf"{_MOE}\.shared_expert\.up_proj\.weight", "layers.{}.up", transpose),
    Rule(rf"{_MOE}\.shared_expert\.down_proj\.weight", "layers.{}.down", transpose),
    Rule(rf"{_MOE}\.shared_expert_gate\.weight", "layers.{}.shared_gate", flatten),
)

# Tensors some checkpoints carry that hold no parameters.
HF_IGNORED = (
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"transformer\.h\.\d+\.attn\.(masked_)?bias",  # GPT-2's stored causal-mask buffers
)

# GPT-2 (non-GLU MLP, for the generalized test). Conv1D weights are stored (in, out) already.
HF_GPT2 = (
    Rule(r"transformer\.wte\.weight", "embed"),
    Rule(r"transformer\.wpe\.weight", "pos_embed"),
    Rule(rf"transformer\.h\.{_L}\.ln_1\.weight", "layers.{}.attn_norm"),
    Rule(rf"transformer\.h\.{_L}\.ln_1\.bias", "layers.{}.attn_norm_bias"),
    *(
        Rule(rf"transformer\.h\.{_L}\.attn\.c_attn\.weight", f"layers.{{}}.{n}", split_qkv(i))
        for i, n in enumerate("qkv")
    ),
    *(
        Rule(rf"transformer\.h\.{_L}\.attn\.c_attn\.bias", f"layers.{{}}.{n}_bias", split_qkv(i, True))
        for i, n in enumerate("qkv")
    ),
    Rule(rf"transformer\.h\.{_L}\.attn\.c_proj\.weight", "layers.{}.o"),
    Rule(rf"transformer\.h\.{_L}\.attn\.c_proj\.bias", "layers.{}.o_bias"),
    Rule(rf"transformer\.h\.{_L}\.ln_2\.weight", "layers.{}.mlp_norm"),
    Rule(rf"transformer\.h\.{_L}\.ln_2\.bias", "layers.{}.mlp_norm_bias"),
    Rule(rf"transformer\.h\.{_L}\.mlp\.c_fc\.weight", "layers.{}.up"),
    Rule(rf"transformer\.h\.{_L}\.mlp\.c_fc\.bias", "layers.{}.up_bias"),
    Rule(rf"transformer\.h\.{_L}\.mlp\.c_proj\.weight", "layers.{}.down"),
    Rule(rf"transformer\.h\.{_L}\.mlp\.c_proj\.bias", "layers.{}.down_bias"),
    Rule(r"transformer\.ln_f\.weight", "final_norm"),
    Rule(r"transformer\.ln_f\.bias", "final_norm_bias"),
    Rule(r"lm_head\.weight", "lm_head", transpose),
)

# GGUF names (llama.cpp). Llama-architecture files store q/k rows interleaved for RoPE.
_GGUF_COMMON = (
    Rule(r"token_embd\.weight", "embed"),
    Rule(rf"blk\.{_L}\.attn_norm\.weight", "layers.{}.attn_norm"),
    Rule(rf"blk\.{_L}\.attn_v\.weight", "layers.{}.v", transpose),
    Rule(rf"blk\.{_L}\.attn_output\.weight", "layers.{}.o", transpose),
    Rule(rf"blk\.{_L}\.attn_v\.bias", "layers.{}.v_bias"),
    Rule(rf"blk\.{_L}\.ffn_norm\.weight", "layers.{}.mlp_norm"),
    Rule(rf"blk\.{_L}\.ffn_gate\.weight", "layers.{}.gate", transpose),
    Rule(rf"blk\.{_L}\.ffn_up\.weight", "layers.{}.up", transpose),
    Rule(rf"blk\.{_L}\.ffn_down\.weight", "layers.{}.down", transpose),
    Rule(r"output_norm\.weight", "final_norm"),
    Rule(r"output\.weight", "lm_head", transpose),
)
GGUF_LLAMA = _GGUF_COMMON + (
    Rule(rf"blk\.{_L}\.attn_q\.weight", "layers.{}.q", gguf_q),
    Rule(rf"blk\.{_L}\.attn_k\.weight", "layers.{}.k", gguf_k),
    Rule(rf"blk\.{_L}\.attn_q\.bias", "layers.{}.q_bias", gguf_q_bias),
    Rule(rf"blk\.{_L}\.attn_k\.bias", "layers.{}.k_bias", gguf_k_bias),
)
# NEOX-RoPE architectures (llama.cpp's converter leaves their q/k rows in HF order): Qwen2/3, Gemma 2/3, Phi-3,
# OLMo 2.
_GGUF_QK_PLAIN = (
    Rule(rf"blk\.{_L}\.attn_q\.weight", "layers.{}.q", transpose),
    Rule(rf"blk\.{_L}\.attn_k\.weight", "layers.{}.k", transpose),
)
GGUF_QWEN2 = (
    _GGUF_COMMON
    + _GGUF_QK_PLAIN
    + (
        Rule(rf"blk\.{_L}\.attn_q\.bias", "layers.{}.q_bias"),
        Rule(rf"blk\.{_L}\.attn_k\.bias", "layers.{}.k_bias"),
    )
)
_GGUF_QK_NORMS = (
    Rule(rf"blk\.{_L}\.attn_q_norm\.weight", "layers.{}.q_norm"),
    Rule(rf"blk\.{_L}\.attn_k_norm\.weight", "layers.{}.k_norm"),
)
GGUF_QWEN3 = GGUF_QWEN2 + _GGUF_QK_NORMS
# Gemma 2/3: sandwich norms, every norm weight (q/k norms too) stored as 1 + w.
GGUF_GEMMA = tuple(
    Rule(r.pattern, r.path, minus_one) if r.pattern.endswith(r"norm\.weight") else r
    for r in _GGUF_COMMON
    + _GGUF_QK_PLAIN
    + _GGUF_QK_NORMS
    + (
        Rule(rf"blk\.{_L}\.post_attention_norm\.weight", "layers.{}.post_attn_norm"),
        Rule(rf"blk\.{_L}\.post_ffw_norm\.weight", "layers.{}.post_mlp_norm"),
    )
)
# Phi-3: fused attn_qkv and ffn_up (gate and up), as llama.cpp's converter writes them (separate q/k/v also read).
GGUF_PHI3 = tuple(r for r in _GGUF_COMMON if r.path.rsplit(".", 1)[-1] not in ("gate", "up")) + (
    *_GGUF_QK_PLAIN,
    *(Rule(rf"blk\.{_L}\.attn_qkv\.weight", f"layers.{{}}.{n}", split_fused(n)) for n in "qkv"),
    *(Rule(rf"blk\.{_L}\.ffn_up\.weight", f"layers.{{}}.{n}", split_fused(n)) for n in ("gate", "up")),
)
# OLMo 2: no norms before attention and MLP; q/k norms over the whole projection; norms on both outputs.
GGUF_OLMO2 = (
    tuple(r for r in _GGUF_COMMON if r.path.rsplit(".", 1)[-1] not in ("attn_norm", "mlp_norm"))
    + _GGUF_QK_PLAIN
    + _GGUF_QK_NORMS
    + (
        Rule(rf"blk\.{_L}\.post_attention_norm\.weight", "layers.{}.post_attn_norm"),
        Rule(rf"blk\.{_L}\.post_ffw_norm\.weight", "layers.{}.post_mlp_norm"),
    )
)
# OLMo: no norm weights at all; llama.cpp permutes its q/k rows like Llama's.
GGUF_OLMO = tuple(r for r in GGUF_LLAMA if "norm" not in r.path)
GGUF_IGNORED = (r"rope_freqs\.weight",)  # read into the config instead

# GGUF mixtures of experts (llama.cpp): Mixtral is architecture `llama` with `llama.expert_count`, its experts
# stacked in `ffn_{gate,up,down}_exps` (older files: one `ffn_gate.{e}` tensor per expert); Qwen2-MoE is
# `qwen2moe`, whose shared expert is `ffn_*_shexp` with the scalar gate `ffn_gate_inp_shexp`.
_GGUF_EXPERTS = (
    Rule(rf"blk\.{_L}\.ffn_gate_inp\.weight", "layers.{}.router", transpose),
    Rule(rf"blk\.{_L}\.ffn_gate_exps\.weight", "layers.{}.expert_gate", transpose_experts),
    Rule(rf"blk\.{_L}\.ffn_up_exps\.weight", "layers.{}.expert_up", transpose_experts),
    Rule(rf"blk\.{_L}\.ffn_down_exps\.weight", "layers.{}.expert_down", transpose_experts),
    Rule(rf"blk\.{_L}\.ffn_gate\.{_E}\.weight", "layers.{}.expert_gate", transpose, expert=True),
    Rule(rf"blk\.{_L}\.ffn_up\.{_E}\.weight", "layers.{}.expert_up", transpose, expert=True),
    Rule(rf"blk\.{_L}\.ffn_down\.{_E}\.weight", "layers.{}.expert_down", transpose, expert=True),
)
GGUF_MIXTRAL = GGUF_LLAMA + _GGUF_EXPERTS
GGUF_QWEN2_MOE = (
    GGUF_QWEN2
    + _GGUF_EXPERTS
    + (
        Rule(rf"blk\.{_L}\.ffn_gate_inp_shexp\.weight", "layers.{}.shared_gate", flatten),
        Rule(rf"blk\.{_L}\.ffn_gate_shexp\.weight", "layers.{}.gate", transpose),
        Rule(rf"blk\.{_L}\.ffn_up_shexp\.weight", "layers.{}.up", transpose),
        Rule(rf"blk\.{_L}\.ffn_down_shexp\.weight", "layers.{}.down", transpose),
    )
)

HF_TABLES = {
    "llama": HF_DECODER,
    "mistral": HF_DECODER,
    "qwen2": HF_DECODER,
    "qwen3": HF_DECODER,
    "gemma": HF_DECODER,
    "olmo": HF_DECODER,
    "gemma2": HF_SANDWICH,
    "olmo2": HF_SANDWICH,
    "gemma3": HF_GEMMA3,
    "phi3": HF_PHI3,
    "gpt2": HF_GPT2,
    "mixtral": HF_MOE,
    "qwen2_moe": HF_MOE,
}
# Tensors of a multimodal checkpoint outside its text model, per family (text-only inputs never reach them).
HF_OTHER_MODALITIES = {
    "gemma3": (r"(?:model\.)?(?:vision_tower|multi_modal_projector)\..*",),
}
# GGUF architecture name -> (jaxind family, table).
GGUF_TABLES = {
    "llama": ("llama", GGUF_LLAMA),
    "qwen2": ("qwen2", GGUF_QWEN2),
    "qwen3": ("qwen3", GGUF_QWEN3),
    "gemma2": ("gemma2", GGUF_GEMMA),
    "gemma3": ("gemma3", GGUF_GEMMA),
    "phi3": ("phi3", GGUF_PHI3),
    "olmo": ("olmo", GGUF_OLMO),
    "olmo2": ("olmo2", GGUF_OLMO2),
    "qwen2moe": ("qwen2_moe", GGUF_QWEN2_MOE),
}
# GGUF architecture -> (family, table) of its mixture-of-experts files (those with `{arch}.expert_count`).
GGUF_MOE_TABLES = {"llama": ("mixtral", GGUF_MIXTRAL), "qwen2moe": ("qwen2_moe", GGUF_QWEN2_MOE)}
