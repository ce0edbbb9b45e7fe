"""The decoder-only transformer as pure functions over a param pytree.

One forward pass covers the Llama family (Llama 1/2/3/3.1/3.2, SmolLM2), Mistral, Qwen2 and
Gemma: pre-norm blocks with RMSNorm, rotary attention with grouped KV heads, and a gated
(GLU) MLP; and GPT-2 (LayerNorm, learned positions, plain GELU MLP, biases), the non-GLU
family the generalized test needs. The pass can hand back, for chosen layers, the MLP's
gate- and up-projection outputs (pre-activation, shape ``(B, T, h)``; GPT-2 has "up" only),
which is what the independence tests match.

Param tree (linear weights are stored ``(in, out)``; ``h = d_ff``, ``hd = head_dim``)::

    {"embed": (V, d),
     "layers": [ {"attn_norm": (d,), "q": (d, H*hd), "k": (d, K*hd), "v": (d, K*hd),
                  "o": (H*hd, d), ["q_bias": (H*hd,), "k_bias": (K*hd,), "v_bias": (K*hd,)],
                  ["o_bias": (d,)], "mlp_norm": (d,),
                  "gate": (d, h), "up": (d, h), "down": (h, d)}, ... n_layers ],
     "final_norm": (d,),
     ["lm_head": (d, V)]}          # absent when cfg.tie_embeddings

GPT-2 adds ``pos_embed (P, d)``, ``*_norm_bias``, ``up_bias (h,)``, ``down_bias (d,)`` and has
no ``gate``.

Hidden unit ``j`` of layer ``l`` is column ``j`` of ``gate``/``up`` and row ``j`` of ``down``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.config import Activation, ModelConfig
from jaxind.types import Params

Activations = dict[int, dict[str, jax.Array]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, computed in float32; ``offset=1`` scales by ``1 + w`` (Gemma)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(params: Params, name: str, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The family's norm with weight ``params[name]`` (and ``params[name + "_bias"]`` for LayerNorm)."""
    if cfg.norm_kind == "layer":
        return layer_norm(x, params[name], params[name + "_bias"], cfg.norm_eps)
    return rms_norm(x, params[name], cfg.norm_eps, cfg.norm_offset)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` float32, with linear/llama3 scaling applied."""
    hd = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(
        np.float32
    )
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv
    if scaling["rope_type"] == "factors":  # per-frequency divisors (GGUF rope_freqs tensor)
        return (inv / np.asarray(scaling["factors"], np.float32)).astype(np.float32)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv / factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables ``(T, head_dim)`` float32 for positions ``0..T-1``."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (B, T, heads, hd)`` by position (half-split layout, as in HF Llama)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def attention(layer: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
    """Causal grouped-query self-attention: ``x (B, T, d)`` -> ``(B, T, d)`` (RoPE when ``cos`` is given)."""
    b, t, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q, k, v = x @ layer["q"], x @ layer["k"], x @ layer["v"]
    if cfg.qkv_bias:
        q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
    q, k = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd)
    if cos is not None and sin is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.reshape(b, t, nkv, hd)
    group = nh // nkv
    q = q.reshape(b, t, nkv, group, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(hd)
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = ki <= qi
    if cfg.sliding_window is not None:
        allowed &= (qi - ki) < cfg.sliding_window
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, nh * hd)
    out = out @ layer["o"]
    if cfg.o_bias:
        out = out + layer["o_bias"]
    return out


def activation(name: Activation) -> Callable[[jax.Array], jax.Array]:
    """The MLP nonlinearity: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, GPT-2's gelu_new)."""
    if name == "silu":
        return jax.nn.silu
    return functools.partial(jax.nn.gelu, approximate=True)


def mlp_apply(
    layer: Params, x: jax.Array, act: Activation = "silu", glu: bool = True, bias: bool = False
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """An MLP ``{"gate"?, "up", "down"[, "up_bias", "down_bias"]}`` on ``x (..., d)``.

    GLU: ``(act(x W_gate) * (x W_up)) W_down``; plain (``glu=False``): ``act(x W_up) W_down``.
    Returns ``(out (..., d), gate (..., h) or None, up (..., h))``, ``gate``/``up`` before the
    activation, i.e. what ``gate_proj`` / ``up_proj`` (GPT-2: ``c_fc``) return in transformers.
    """
    up = x @ layer["up"]
    if bias:
        up = up + layer["up_bias"]
    fn = activation(act)
    if glu:
        gate = x @ layer["gate"]
        hidden = fn(gate) * up
    else:
        gate, hidden = None, fn(up)
    out = hidden @ layer["down"]
    if bias:
        out = out + layer["down_bias"]
    return out, gate, up


def mlp(layer: Params, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """The family's MLP (:func:`mlp_apply` with ``cfg``'s activation, gating and biases)."""
    return mlp_apply(layer, x, cfg.mlp_act, cfg.glu, cfg.mlp_bias)


def mlp_output(layer: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The MLP block as a function ``x (..., d)`` -> ``(..., d)`` (what distillation imitates)."""
    return mlp(layer, cfg, x)[0]


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Token embeddings ``(B, T, d)`` (scaled by sqrt(d) for Gemma)."""
    x = params["embed"][tokens]
    if not cfg.rope:
        x = x + params["pos_embed"][: tokens.shape[1]][None]
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype=x.dtype)
    return x


def unembed(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``x (B, T, d)`` -> logits ``(B, T, V)`` float32."""
    x = norm(params, "final_norm", cfg, x)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return (x @ head).astype(jnp.float32)


def block(layer: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array | None, sin: jax.Array | None):
    """One pre-norm decoder block; returns ``(x_out, gate, up, mlp_in)`` (``mlp_in``: the normed
    input of the MLP, ``(B, T, d)``)."""
    x = x + attention(layer, cfg, norm(layer, "attn_norm", cfg, x), cos, sin)
    mlp_in = norm(layer, "mlp_norm", cfg, x)
    out, gate, up = mlp(layer, cfg, mlp_in)
    return x + out, gate, up, mlp_in


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    collect: tuple[int, ...] = (),
    return_logits: bool = True,
    collect_inputs: bool = False,
) -> tuple[jax.Array | None, Activations]:
    """Runs the model on ``tokens (B, T)`` int.

    Args:
      collect: layer indices whose MLP gate/up outputs to return.
      return_logits: skip the LM head when False (activation-only passes).
      collect_inputs: also return each collected layer's normed MLP input as ``"x"``
        ``(B, T, d)`` (``gate = x @ W_gate``: cross-Gram statistics of the outputs follow from
        those of ``x``, which is ``d``-wide instead of ``h``-wide).

    Returns:
      ``(logits, acts)``: logits ``(B, T, V)`` float32 (or None) and
      ``{layer: {"gate": (B, T, h), "up": (B, T, h)}}`` for each layer in ``collect``
      (no "gate" for a non-GLU family).
    """
    wanted = frozenset(collect)
    last = max(wanted) if wanted and not return_logits else cfg.n_layers - 1
    if not cfg.rope and tokens.shape[1] > cfg.max_positions:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's {cfg.max_positions} positions")
    cos, sin = rope_tables(cfg, tokens.shape[1]) if cfg.rope else (None, None)
    x = embed(params, cfg, tokens)
    acts: Activations = {}
    for index, layer in enumerate(params["layers"][: last + 1]):
        x, gate, up, mlp_in = block(layer, cfg, x, cos, sin)
        if index in wanted:
            acts[index] = {"up": up} if gate is None else {"gate": gate, "up": up}
            if collect_inputs:
                acts[index]["x"] = mlp_in
    return (unembed(params, cfg, x) if return_logits else None), acts


@functools.partial(jax.jit, static_argnames=("cfg", "collect", "return_logits", "collect_inputs"))
def forward_jit(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    collect: tuple[int, ...] = (),
    return_logits: bool = True,
    collect_inputs: bool = False,
):
    """Jitted :func:`forward` (``cfg``, ``collect`` and the flags are static)."""
    return forward(params, cfg, tokens, collect, return_logits, collect_inputs)


def forward_logits(params: Params, cfg: ModelConfig) -> Callable[[Any], jax.Array]:
    """``tokens (B, T) -> logits (B, T, V)`` for a param tree (jitted)."""
    return lambda tokens: forward_jit(params, cfg, jnp.asarray(tokens, jnp.int32))[0]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) weights, unit norms) for a config: independent models
    are ``init_params(cfg, key)`` for different keys."""
    d, h, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    shapes = {
        "q": (d, cfg.n_heads * hd),
        "k": (d, cfg.n_kv_heads * hd),
        "v": (d, cfg.n_kv_heads * hd),
        "o": (cfg.n_heads * hd, d),
        "gate": (d, h),
        "up": (d, h),
        "down": (h, d),
    }
    if not cfg.glu:
        del shapes["gate"]
    keys = jax.random.split(key, cfg.n_layers + 2)
    norm_init = 0.0 if cfg.norm_offset else 1.0

    def layer(k):
        ks = jax.random.split(k, len(shapes))
        out = {
            name: (std * jax.random.normal(kk, shape)).astype(dtype) for (name, shape), kk in zip(shapes.items(), ks)
        }
        out["attn_norm"] = jnp.full((d,), norm_init, dtype)
        out["mlp_norm"] = jnp.full((d,), norm_init, dtype)
        if cfg.qkv_bias:
            out["q_bias"] = jnp.zeros((cfg.n_heads * hd,), dtype)
            out["k_bias"] = jnp.zeros((cfg.n_kv_heads * hd,), dtype)
            out["v_bias"] = jnp.zeros((cfg.n_kv_heads * hd,), dtype)
        if cfg.o_bias:
            out["o_bias"] = jnp.zeros((d,), dtype)
        if cfg.mlp_bias:
            out["up_bias"] = jnp.zeros((h,), dtype)
            out["down_bias"] = jnp.zeros((d,), dtype)
        if cfg.norm_kind == "layer":
            out["attn_norm_bias"] = jnp.zeros((d,), dtype)
            out["mlp_norm_bias"] = jnp.zeros((d,), dtype)
        return out

    params: Params = {
        "embed": (std * jax.random.normal(keys[0], (cfg.vocab_size, d))).astype(dtype),
        "layers": [layer(k) for k in keys[2:]],
        "final_norm": jnp.full((d,), norm_init, dtype),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (std * jax.random.normal(keys[1], (d, cfg.vocab_size))).astype(dtype)
    if not cfg.rope:
        params["pos_embed"] = (std * jax.random.normal(jax.random.fold_in(keys[1], 1), (cfg.max_positions, d))).astype(
            dtype
        )
    if cfg.norm_kind == "layer":
        params["final_norm_bias"] = jnp.zeros((d,), dtype)
    return params


def flatten_paths(tree: Any) -> dict[str, Any]:
    """``{"embed": leaf, "layers.0.q": leaf, ...}``: every leaf of a param tree by its dotted path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in flat}


def param_shapes_flat(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{"embed": (V, d), "layers.0.q": (d, H*hd), ...}``: every leaf's path and shape."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_paths(tree).items()}
