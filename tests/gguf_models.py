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


# llama.cpp's architecture name of each jaxind family written by `write_gguf_from_torch`.
GGUF_ARCHS = {
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "olmo": "olmo",
    "olmo2": "olmo2",
}


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for interleaved-RoPE architectures (Llama, OLMo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_torch(model: Any, family: str, path: str, sliding_window: int | None = None) -> str:
    """Writes a transformers causal LM of ``family`` as llama.cpp's converter would (float32 tensors): tensor names
    from the ``gguf`` package's own name map, Gemma's norm weights stored as ``1 + w``, OLMo's q/k rows permuted for
    interleaved RoPE, Phi-3's fused projections kept fused, and the metadata the llama.cpp loader reads."""
    from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map

    c = model.config
    arch = GGUF_ARCHS[family]
    names = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), c.num_hidden_layers)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if family == "olmo":
        writer.add_layer_norm_eps(1e-5)
        if c.clip_qkv is not None:
            writer.add_clamp_kqv(float(c.clip_qkv))
    else:
        writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if family == "gemma2":
        writer.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    tied = c.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        w = tensor.detach().float().numpy()
        if family in ("gemma2", "gemma3") and base.endswith("norm"):
            w = w + np.float32(1.0)
        if family == "olmo" and base.endswith(("q_proj", "k_proj")):
            heads = c.num_attention_heads if base.endswith("q_proj") else c.num_key_value_heads
            w = _llama_permute(w, heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
            q, k = _llama_permute(q, cfg.num_attention_heads), _llama_permute(k, cfg.num_key_value_heads)
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


def random_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of ``rows`` rows of ``cols`` values stored as ``qtype``; where the ``gguf`` package dequantises
    the type, blocks whose values come out non-finite (an f16 scale of Inf/NaN) are drawn again."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for _ in range(200):
        try:
            with np.errstate(all="ignore"):
                values = quants.dequantize(data, t).reshape(data.shape[0], block)
        except NotImplementedError:
            break
        bad = ~np.isfinite(values).all(-1)
        if not bad.any():
            break
        data[bad] = rng.integers(0, 256, (int(bad.sum()), size), dtype=np.uint8)
    return data.reshape(rows, cols // block * size)


def write_typed_llama_gguf(
    path: str, types: list[str], d: int = 256, ff: int = 256, layers: int = 2, vocab: int = 256, seed: int = 0
) -> dict[str, tuple[str, np.ndarray]]:
    """A Llama GGUF (4 heads, 2 KV heads) whose 2-D tensors hold random blocks (:func:`random_blocks`) of the
    ``types``, assigned in turn to the tensors in file order (cycled); 1-D norms F32. Returns
    ``{tensor name: (type, stored array)}`` of the 2-D tensors."""
    from gguf import GGMLQuantizationType, GGUFWriter

    heads, kv, hd = 4, 2, d // 4
    writer = GGUFWriter(path, "llama")
    for key, value in (
        ("block_count", layers),
        ("context_length", 256),
        ("embedding_length", d),
        ("feed_forward_length", ff),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("vocab_size", vocab),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(1e-5)
    shapes = [("token_embd.weight", vocab, d)]
    for i in range(layers):
        b = f"blk.{i}."
        shapes += [(b + "attn_q.weight", heads * hd, d), (b + "attn_k.weight", kv * hd, d)]
        shapes += [(b + "attn_v.weight", kv * hd, d), (b + "attn_output.weight", d, heads * hd)]
        shapes += [(b + "ffn_gate.weight", ff, d), (b + "ffn_up.weight", ff, d), (b + "ffn_down.weight", d, ff)]
    shapes.append(("output.weight", vocab, d))
    rng = np.random.default_rng(seed)
    out = {}
    for n, (name, rows, cols) in enumerate(shapes):
        kind = types[n % len(types)]
        if kind in ("F32", "F16"):
            data = rng.standard_normal((rows, cols)).astype(kind.lower().replace("f", "float"))
            writer.add_tensor(name, data)
        else:
            data = random_blocks(rows, cols, kind, rng)
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[kind])
        out[name] = (kind, data)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
