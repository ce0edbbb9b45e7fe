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
