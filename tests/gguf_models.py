"""Tiny GGUF files written by the tests with the `gguf` package: a 2-layer Llama-architecture model with random
float32 weights and, optionally, the real SmolLM2 tokenizer metadata copied from the shipped GGUF."""

from __future__ import annotations

from typing import Any

import numpy as np

D, H, KV, HD, FF, LAYERS = 16, 2, 1, 8, 24, 2


def write_tiny_llama_gguf(
    path: str,
    tokenizer_from: str | None = None,
    vocab: int = 64,
    metadata: dict[str, Any] | None = None,
    tokenizer_model: str | None = None,
) -> str:
    """Writes ``path``; the vocabulary size is that of ``tokenizer_from``'s tokenizer when given.

    ``metadata``: extra ``{key: int | float | str}`` entries; ``tokenizer_model``: instead of a copied tokenizer,
    a minimal one of ``vocab`` tokens with this ``tokenizer.ggml.model`` (e.g. one no converter knows).
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    writer = GGUFWriter(path, "llama")
    if tokenizer_from is not None:
        source = GGUFReader(tokenizer_from)
        for name, field in source.fields.items():
            if not name.startswith("tokenizer."):
                continue
            value = field.contents()
            types = field.types
            sub_type = types[-1] if types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, types[0], sub_type=sub_type)
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HD)
    writer.add_vocab_size(vocab)
    for key, value in (metadata or {}).items():
        kind = {int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32, str: GGUFValueType.STRING}[type(value)]
        writer.add_key_value(key, value, kind)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, scale: float = 0.2) -> None:
        writer.add_tensor(name, (scale * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", vocab, D)
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        tensor(f"blk.{i}.attn_q.weight", H * HD, D)
        tensor(f"blk.{i}.attn_k.weight", KV * HD, D)
        tensor(f"blk.{i}.attn_v.weight", KV * HD, D)
        tensor(f"blk.{i}.attn_output.weight", D, H * HD)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FF, D)
        tensor(f"blk.{i}.ffn_up.weight", FF, D)
        tensor(f"blk.{i}.ffn_down.weight", D, FF)
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _unpermute_inverse(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split RoPE rows -> llama.cpp's interleaved rows (what convert_hf_to_gguf.py does to q/k)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_moe_gguf(path: str, torch_model, per_expert: bool = False) -> str:
    """Writes a transformers Mixtral (GGUF architecture ``llama`` with ``llama.expert_count``) or Qwen2-MoE
    (``qwen2moe``) model as llama.cpp's converter lays it out: experts stacked in ``ffn_{gate,up,down}_exps``
    ``(E, he, d)`` / ``(E, d, he)`` (or, with ``per_expert``, the older ``ffn_gate.{e}`` tensors), the router as
    ``ffn_gate_inp``, Qwen2-MoE's shared expert as ``*_shexp``; float32, a minimal tokenizer."""
    from gguf import GGUFWriter

    cfg = torch_model.config
    arch = "llama" if cfg.model_type == "mixtral" else "qwen2moe"
    state = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    writer = GGUFWriter(path, arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "llama":
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_expert_count(cfg.num_local_experts)
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _unpermute_inverse(q, cfg.num_attention_heads), _unpermute_inverse(k, cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        for name in ("q", "k", "v"):
            if p + f"self_attn.{name}_proj.bias" in state:
                writer.add_tensor(f"blk.{i}.attn_{name}.bias", state[p + f"self_attn.{name}_proj.bias"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", state[p + "mlp.gate.weight"])
        gate_up, down = state[p + "mlp.experts.gate_up_proj"], state[p + "mlp.experts.down_proj"]
        he = gate_up.shape[1] // 2
        stacked = {"gate": gate_up[:, :he], "up": gate_up[:, he:], "down": down}
        for name, value in stacked.items():
            if per_expert:
                for e in range(value.shape[0]):
                    writer.add_tensor(f"blk.{i}.ffn_{name}.{e}.weight", np.ascontiguousarray(value[e]))
            else:
                writer.add_tensor(f"blk.{i}.ffn_{name}_exps.weight", np.ascontiguousarray(value))
        if arch == "qwen2moe":
            writer.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", state[p + "mlp.shared_expert_gate.weight"][0])
            for name in ("gate", "up", "down"):
                writer.add_tensor(
                    f"blk.{i}.ffn_{name}_shexp.weight", state[p + f"mlp.shared_expert.{name}_proj.weight"]
                )
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
