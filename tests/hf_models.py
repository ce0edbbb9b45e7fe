"""Tiny random Hugging Face checkpoints of every supported family, built by the tests.

Each model gets non-trivial norm weights and biases so that conversion mistakes (a missing
norm offset, an unused bias, a transposed kernel) change the logits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> (transformers config class name, extra config kwargs)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
        ),
    ),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True)),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),
    "gemma": ("GemmaConfig", dict(head_dim=16, hidden_activation="gelu_pytorch_tanh")),
    "gpt2": ("GPT2Config", dict(n_embd=48, n_layer=3, n_head=6, n_inner=80, n_positions=64)),
    # Small soft-caps and a query scalar other than head_dim, so that each changes the logits; sliding layers 0 and 2.
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=5,
        ),
    ),
    # Local layers (0, 2) with window 4 and their own RoPE base; the global layer's RoPE linearly scaled.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=10000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            final_logit_softcapping=3.0,
        ),
    ),
    # q/k norms per head, biases, and sliding windows on layers >= max_window_layers.
    "qwen3": (
        "Qwen3Config",
        dict(head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "phi3": ("Phi3Config", dict(sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo": ("OlmoConfig", dict(clip_qkv=0.5, eos_token_id=2)),  # clamps active at these weight scales
    "olmo2": ("Olmo2Config", dict(eos_token_id=2)),
}
# Mixture-of-experts families (tests/test_moe.py): 8 experts, top-2; Qwen2-MoE with its shared expert.
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe_norm_topk": (
        "Qwen2MoeConfig",
        dict(
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
    ),
}
CAUSAL_LM = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "GemmaConfig": "GemmaForCausalLM",
    "GPT2Config": "GPT2LMHeadModel",
    "Gemma2Config": "Gemma2ForCausalLM",
    "Gemma3TextConfig": "Gemma3ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "Phi3Config": "Phi3ForCausalLM",
    "OlmoConfig": "OlmoForCausalLM",
    "Olmo2Config": "Olmo2ForCausalLM",
    "MixtralConfig": "MixtralForCausalLM",
    "Qwen2MoeConfig": "Qwen2MoeForCausalLM",
}
# Families whose norms scale by 1 + w (their random norm weights are centred on 0).
OFFSET_NORMS = ("gemma", "gemma2", "gemma3")


def build_torch_model(name: str, seed: int = 0, **overrides):
    """A float32 transformers causal LM of family ``name`` with randomised norms and biases."""
    import transformers

    config_cls, extra = {**FAMILIES, **MOE_FAMILIES}[name]
    base = {"vocab_size": TINY["vocab_size"]} if name == "gpt2" else TINY
    config = getattr(transformers, config_cls)(**{**base, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, CAUSAL_LM[config_cls])(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln_" in pname:
                p.copy_((0.0 if name in OFFSET_NORMS else 1.0) + 0.3 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def moe_reference_activations(model, tokens) -> tuple:
    """A MoE transformers model's logits and, per layer, what jaxind's ``mlp_activations`` returns: every expert's
    gate/up projection of the MLP input on ALL tokens (``expert_gate``/``expert_up`` ``(B, T, E, he)``, from the
    fused ``experts.gate_up_proj`` applied to the captured input) and the shared expert's ``gate``/``up``."""
    captured: dict[int, dict] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def grab(module, args, out, i=i):
            captured.setdefault(i, {})["x"] = args[0].detach()

        hooks.append(layer.mlp.register_forward_hook(grab))
        if hasattr(layer.mlp, "shared_expert"):
            for proj in ("gate", "up"):
                hooks.append(
                    getattr(layer.mlp.shared_expert, f"{proj}_proj").register_forward_hook(
                        lambda mod, args, out, i=i, proj=proj: captured.setdefault(i, {}).__setitem__(
                            proj, out.detach().numpy().reshape(*np.shape(tokens), -1)
                        )
                    )
                )
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
        for i, layer in enumerate(model.model.layers):
            x = captured[i].pop("x")
            experts = layer.mlp.experts
            fused = torch.einsum("btd,ehd->bteh", x, experts.gate_up_proj)
            he = experts.gate_up_proj.shape[1] // 2
            captured[i]["expert_gate"] = fused[..., :he].numpy()
            captured[i]["expert_up"] = fused[..., he:].numpy()
    for h in hooks:
        h.remove()
    return logits, captured


def mlp_modules(model) -> list[dict]:
    """Per layer, the transformers modules whose outputs are jaxind's "gate"/"up" activations; Phi-3's fused
    ``gate_up_proj`` is "gate_up" (gate first, then up: see :func:`split_gate_up`)."""
    if hasattr(model, "transformer"):  # GPT-2: c_fc is the (only) hidden-unit projection
        return [{"up": block.mlp.c_fc} for block in model.transformer.h]
    layers = model.model.language_model.layers if hasattr(model.model, "language_model") else model.model.layers
    if hasattr(layers[0].mlp, "gate_up_proj"):
        return [{"gate_up": layer.mlp.gate_up_proj} for layer in layers]
    return [{"gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj} for layer in layers]


def split_gate_up(outputs: dict) -> dict:
    """``{"gate_up": (..., 2h)}`` -> ``{"gate": (..., h), "up": (..., h)}``; other captures unchanged."""
    if "gate_up" not in outputs:
        return outputs
    gate, up = np.split(outputs["gate_up"], 2, axis=-1)
    return {"gate": gate, "up": up}


def save(model, out_dir: str, fmt: str = "safetensors") -> str:
    """Saves as ``safetensors`` (single file), ``sharded`` (several safetensors + index) or
    ``bin`` (legacy pytorch_model.bin); returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(out_dir, max_shard_size="1GB")
    elif fmt == "sharded":
        model.save_pretrained(out_dir, max_shard_size="60KB")
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
    elif fmt == "bin":
        model.config.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    return out_dir


def edit_config(out_dir: str, **changes) -> None:
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
