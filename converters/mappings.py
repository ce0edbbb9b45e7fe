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

from jaxind.config import ModelConfig

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

# Hugging Face names: Llama 1/2/3.x, SmolLM2, Mistral, Qwen2 and Gemma share them.
HF_DECODER = (
    Rule(r"model\.embed_tokens\.weight", "embed"),
    Rule(rf"model\.layers\.{_L}\.input_layernorm\.weight", "layers.{}.attn_norm"),
    Rule(rf"model\.layers\.{_L}\.self_attn\.q_proj\.weight", "layers.{}.q", transpose),
    Rule(rf"model\.layers\.{_L}\.self_attn\.k_proj\.weight", "layers.{}.k", transpose),
    Rule(rf"model\.layers\.{_L}\.self_attn\.v_proj\.weight", "layers.{}.v", transpose),
    Rule(rf"model\.layers\.{_L}\.self_attn\.o_proj\.weight", "layers.{}.o", transpose),
    Rule(rf"model\.layers\.{_L}\.self_attn\.q_proj\.bias", "layers.{}.q_bias"),
    Rule(rf"model\.layers\.{_L}\.self_attn\.k_proj\.bias", "layers.{}.k_bias"),
    Rule(rf"model\.layers\.{_L}\.self_attn\.v_proj\.bias", "layers.{}.v_bias"),
    Rule(rf"model\.layers\.{_L}\.self_attn\.o_proj\.bias", "layers.{}.o_bias"),
    Rule(rf"model\.layers\.{_L}\.post_attention_layernorm\.weight", "layers.{}.mlp_norm"),
    Rule(rf"model\.layers\.{_L}\.mlp\.gate_proj\.weight", "layers.{}.gate", transpose),
    Rule(rf"model\.layers\.{_L}\.mlp\.up_proj\.weight", "layers.{}.up", transpose),
    Rule(rf"model\.layers\.{_L}\.mlp\.down_proj\.weight", "layers.{}.down", transpose),
    Rule(r"model\.norm\.weight", "final_norm"),
    Rule(r"lm_head\.weight", "lm_head", transpose),
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
GGUF_QWEN2 = _GGUF_COMMON + (
    Rule(rf"blk\.{_L}\.attn_q\.weight", "layers.{}.q", transpose),
    Rule(rf"blk\.{_L}\.attn_k\.weight", "layers.{}.k", transpose),
    Rule(rf"blk\.{_L}\.attn_q\.bias", "layers.{}.q_bias"),
    Rule(rf"blk\.{_L}\.attn_k\.bias", "layers.{}.k_bias"),
)
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
    "gemma": HF_DECODER,
    "gpt2": HF_GPT2,
    "mixtral": HF_MOE,
    "qwen2_moe": HF_MOE,
}
# GGUF architecture name -> (jaxind family, table).
GGUF_TABLES = {
    "llama": ("llama", GGUF_LLAMA),
    "qwen2": ("qwen2", GGUF_QWEN2),
    "qwen2moe": ("qwen2_moe", GGUF_QWEN2_MOE),
}
# GGUF architecture -> (family, table) of its mixture-of-experts files (those with `{arch}.expert_count`).
GGUF_MOE_TABLES = {"llama": ("mixtral", GGUF_MIXTRAL), "qwen2moe": ("qwen2_moe", GGUF_QWEN2_MOE)}
