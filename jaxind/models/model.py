"""The decoder-only transformer: a Flax NNX module (:class:`Decoder`) over the functions of its layers, and
:func:`forward`, the same pass on a raw param pytree.

One forward pass covers the Llama family (Llama 1/2/3/3.1/3.2, SmolLM2), Mistral, Qwen2/3, Phi-3,
Gemma 1/2/3 and OLMo/OLMo 2: rotary attention with grouped KV heads and a gated (GLU) MLP, with the
variants those families need (``cfg.norm_position``: norms before attention and MLP, also after them
(Gemma 2/3), or after them only (OLMo 2); q/k norms; soft-caps; local/global layers; OLMo's clamp and
weightless LayerNorm); and GPT-2 (LayerNorm, learned positions, plain GELU MLP, biases), the non-GLU
family the generalized test needs. The pass can hand back, for chosen layers, the MLP's gate- and
up-projection outputs (pre-activation, shape ``(B, T, h)``; GPT-2 has "up" only), which is what the
independence tests match, or any named intermediate (:data:`INTERMEDIATES`: the residual stream, the attention
output, the MLP input and hidden state), sown as ``nnx.Intermediate`` by the module. An ``attention_mask``
``(B, T)`` pads sequences on either side; positions then count real tokens only (:func:`padding_positions`).

Param tree (linear weights are stored ``(in, out)``; ``h = d_ff``, ``hd = head_dim``). The decoder
layers are **stacked**: every layer leaf carries a leading layer axis of length ``L = n_layers``,
and the layers run under ``jax.lax.scan`` (docs/DESIGN.md §5.9)::

    {"embed": (V, d),
     "layers": {"attn_norm": (L, d), "q": (L, d, H*hd), "k": (L, d, K*hd), "v": (L, d, K*hd),
                "o": (L, H*hd, d), ["q_bias": (L, H*hd), "k_bias": (L, K*hd), "v_bias": (L, K*hd)],
                ["o_bias": (L, d)], "mlp_norm": (L, d),
                "gate": (L, d, h), "up": (L, d, h), "down": (L, h, d)},
     "final_norm": (d,),
     ["lm_head": (d, V)]}          # absent when cfg.tie_embeddings

Mixture-of-experts families (Mixtral, Qwen2-MoE) add the router and the stacked experts of
:mod:`jaxind.models.moe` (``router (L, d, E)``, ``expert_gate``/``expert_up (L, E, d, he)``,
``expert_down (L, E, he, d)``; Qwen2-MoE's shared expert is the dense ``gate``/``up``/``down`` plus
``shared_gate (L, d)``; Mixtral has no dense MLP, ``d_ff == 0``).

Family variants: ``q_norm``/``k_norm`` ``(L, hd)`` (per head: Qwen3, Gemma 3) or ``(L, H*hd)``/``(L, K*hd)``
(over the projection: OLMo 2); ``post_attn_norm``/``post_mlp_norm`` ``(L, d)`` (Gemma 2/3, OLMo 2, which
has no ``attn_norm``/``mlp_norm``); no norm weights at all for OLMo (no ``final_norm`` either). GPT-2 adds
``pos_embed (P, d)``, ``*_norm_bias (L, d)``, ``up_bias (L, h)``, ``down_bias (L, d)`` (``final_norm_bias
(d,)``) and has no ``gate``.

What differs between layers without being a weight (the attention window, the RoPE frequencies)
is a per-layer **feature** (:func:`layer_features`): an array with the same leading layer axis,
scanned together with the weights and read by :func:`block`.

Hidden unit ``j`` of layer ``l`` is ``gate[l, :, j]``/``up[l, :, j]`` and ``down[l, j, :]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxind.errors import JaxindError
from jaxind.models import moe, paramspec
from jaxind.models.config import Activation, ModelConfig
from jaxind.models.layer_selection import normalize_layers
from jaxind.types import Params

__all__ = [
    "Activations",
    "Collector",
    "Decoder",
    "INTERMEDIATES",
    "LayerOut",
    "Padding",
    "activation",
    "apply_rope",
    "attention",
    "attention_allowed",
    "block",
    "check_intermediates",
    "embed",
    "flatten_paths",
    "forward",
    "forward_jit",
    "forward_logits",
    "init_params",
    "intermediate_names",
    "layer_features",
    "layer_norm",
    "layer_norm_names",
    "layer_slice",
    "mlp",
    "mlp_apply",
    "mlp_output",
    "norm",
    "padding_positions",
    "param_shapes_flat",
    "rms_norm",
    "rope_inv_freq",
    "rope_tables",
    "rope_tables_at",
    "run_layers",
    "unembed",
]

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
    """The family's norm with weight ``params[name]`` (and ``params[name + "_bias"]`` for LayerNorm; no weight
    at all for OLMo's non-parametric LayerNorm)."""
    if cfg.norm_kind == "nonparam":
        return layer_norm(x, jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32), cfg.norm_eps)
    if cfg.norm_kind == "layer":
        return layer_norm(x, params[name], params[name + "_bias"], cfg.norm_eps)
    return rms_norm(x, params[name], cfg.norm_eps, cfg.norm_offset)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` float32, with linear/llama3 scaling applied; ``local``: those
    of the sliding-attention layers where the family gives them their own base (``cfg.rope_local_theta``,
    unscaled)."""
    if local and cfg.rope_local_theta is not None:
        return _inv_freq(cfg.rope_local_theta, cfg.head_dim, None)
    return _inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling_dict)


def _inv_freq(theta: float, hd: int, scaling: dict[str, Any] | None) -> np.ndarray:
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
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


def rope_tables(inv_freq: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables ``(T, head_dim)`` float32 for positions ``0..T-1`` from inverse frequencies
    ``(head_dim // 2,)`` (:func:`rope_inv_freq`)."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rope_tables_at(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables ``(B, T, head_dim)`` float32 for per-sequence ``positions (B, T)`` (a padded batch's
    :func:`padding_positions`); the same values as :func:`rope_tables` where ``positions`` counts ``0..T-1``."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (B, T, heads, hd)`` by position (half-split layout, as in HF Llama); ``cos``/``sin`` are
    ``(T, hd)`` (:func:`rope_tables`, every sequence at positions ``0..T-1``) or ``(B, T, hd)``
    (:func:`rope_tables_at`)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    if cos.ndim == 2:
        c, s = cos[None, :, None, :], sin[None, :, None, :]
    else:
        c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def layer_features(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Per-layer settings that are not weights, each with a leading layer axis, scanned with the layers:

    * ``"window"`` ``(L,)`` int32: causal attention window (``0``: unlimited); ``cfg.sliding_window`` on
      every layer, or on the sliding-attention layers of ``cfg.layer_types`` only (Gemma 2/3, Qwen3);
    * ``"inv_freq"`` ``(L, head_dim // 2)`` float32: RoPE inverse frequencies (RoPE families only); the
      sliding layers' own where the family gives them another base (Gemma 3's ``rope_local_theta``).

    To add a per-layer behaviour, add an entry here and read it in :func:`block` (docs/DESIGN.md §5.9).
    """
    n = cfg.n_layers
    sliding = np.asarray([cfg.sliding(l) for l in range(n)], bool)
    feats = {"window": np.where(sliding, cfg.sliding_window or 0, 0).astype(np.int32)}
    if cfg.rope:
        local = cfg.layer_types is not None and cfg.rope_local_theta is not None
        types = cfg.layer_types or ("full_attention",) * n
        rows = [rope_inv_freq(cfg, local=local and t == "sliding_attention") for t in types]
        feats["inv_freq"] = np.stack(rows).astype(np.float32)
    return feats


# A padded batch as the layers read it (:func:`padding_positions`): ``"real"`` ``(B, T)`` bool, the attention mask
# (True = a real token), and ``"pos"`` ``(B, T)`` int32, each token's position among its sequence's real tokens.
Padding = dict[str, jax.Array]


def padding_positions(attention_mask: jax.Array) -> Padding:
    """The :data:`Padding` of an attention mask ``(B, T)`` (1/True = real token, 0 = padding, on either side).

    A real token's position counts the real tokens before it, so a left-padded sequence's real tokens sit at
    positions ``0, 1, ...`` as they would unpadded; padding tokens get position 0 (left) or repeat the last
    real position (right): they are never attended to, so their positions change nothing."""
    real = jnp.asarray(attention_mask) != 0
    pos = jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=1) - 1, 0)
    return {"real": real, "pos": pos}


def attention_allowed(t: int, window: jax.Array, padding: Padding | None = None) -> jax.Array:
    """Which keys each query may attend to: causal, within ``window`` (``<= 0``: unlimited).

    Without ``padding`` a ``(T, T)`` bool array (every sequence at positions ``0..T-1``). With it
    ``(B, 1, 1, T, T)``: padding keys are masked out, the window is measured in real-token positions, and a
    padding query attends to itself only (its output stays finite and is ignored)."""
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    if padding is None:
        return (ki <= qi) & ((window <= 0) | ((qi - ki) < window))
    pos = padding["pos"]
    dist = pos[:, :, None] - pos[:, None, :]
    allowed = (ki <= qi) & ((window <= 0) | (dist < window)) & padding["real"][:, None, :]
    return (allowed | (qi == ki))[:, None, None]


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _qk_norm(layer: Params, cfg: ModelConfig, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RMSNorm of queries and keys over the last axis (the whole projection or one head, as they come)."""
    return (
        rms_norm(q, layer["q_norm"], cfg.norm_eps, cfg.norm_offset),
        rms_norm(k, layer["k_norm"], cfg.norm_eps, cfg.norm_offset),
    )


def attention(
    layer: Params, feats: dict[str, jax.Array], cfg: ModelConfig, x: jax.Array, padding: Padding | None = None
) -> jax.Array:
    """Causal grouped-query self-attention of one layer: ``x (B, T, d)`` -> ``(B, T, d)``; ``feats`` is the
    layer's slice of :func:`layer_features` (its window; its RoPE frequencies when the family has RoPE);
    ``padding`` (:func:`padding_positions`) masks padding keys and gives RoPE each real token's own position.

    Order, as in transformers: projections (+ biases), OLMo's clamp, q/k norms over the projection (OLMo 2) or
    per head (Qwen3, Gemma 3), RoPE, scores scaled by ``1/sqrt(query_pre_attn_scalar or head_dim)``, Gemma 2's
    soft-capping, the causal (windowed) mask, softmax."""
    b, t, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q, k, v = x @ layer["q"], x @ layer["k"], x @ layer["v"]
    if cfg.qkv_bias:
        q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    if cfg.qk_norm == "proj":
        q, k = _qk_norm(layer, cfg, q, k)
    q, k = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd)
    if cfg.qk_norm == "head":
        q, k = _qk_norm(layer, cfg, q, k)
    if cfg.rope:
        if padding is None:
            cos, sin = rope_tables(feats["inv_freq"], t)
        else:
            cos, sin = rope_tables_at(feats["inv_freq"], padding["pos"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.reshape(b, t, nkv, hd)
    group = nh // nkv
    q = q.reshape(b, t, nkv, group, hd)
    scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar or hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
    scores = _softcap(scores, cfg.attn_softcap)
    scores = jnp.where(attention_allowed(t, feats["window"], padding), scores, jnp.finfo(jnp.float32).min)
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
    return _mlp_parts(layer, x, act, glu, bias)[:3]


def _mlp_parts(
    layer: Params, x: jax.Array, act: Activation, glu: bool, bias: bool
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """:func:`mlp_apply`'s ``(out, gate, up)`` and the hidden state ``act(gate) * up`` (plain: ``act(up)``), the
    input of the down-projection."""
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
    return out, gate, up, hidden


def mlp(layer: Params, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """The family's MLP (:func:`mlp_apply` with ``cfg``'s activation, gating and biases)."""
    return mlp_apply(layer, x, cfg.mlp_act, cfg.glu, cfg.mlp_bias)


def mlp_output(layer: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The MLP block as a function ``x (..., d)`` -> ``(..., d)`` (what distillation imitates; for a mixture
    of experts the whole routed layer, shared expert included)."""
    if cfg.moe:
        return moe.moe_mlp(layer, cfg, x)[0]
    return mlp(layer, cfg, x)[0]


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Token embeddings ``(B, T, d)`` (scaled by sqrt(d) for Gemma); learned positions (GPT-2) at ``0..T-1`` or at
    ``positions (B, T)`` (a padded batch's, :func:`padding_positions`)."""
    x = params["embed"][tokens]
    if not cfg.rope:
        x = x + (params["pos_embed"][: tokens.shape[1]][None] if positions is None else params["pos_embed"][positions])
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype=x.dtype)
    return x


def unembed(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head (and Gemma 2's soft-capping): ``x (B, T, d)`` -> logits ``(B, T, V)`` float32."""
    x = norm(params, "final_norm", cfg, x)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return _softcap((x @ head).astype(jnp.float32), cfg.final_softcap)


# One layer's {"gate": (B, T, h) (GLU only), "up": (B, T, h), "hidden": (B, T, h), "x": (B, T, d) (the MLP input),
# "attn_out": (B, T, d), "resid": (B, T, d)}; a MoE layer has "expert_gate" / "expert_up" (B, T, E, he) and
# "router_logits" (B, T, E) instead of gate/up/hidden, plus "gate"/"up"/"hidden" of its shared expert if any.
# Under jit only what a collector keeps is computed.
LayerOut = dict[str, jax.Array]
Collector = Callable[[LayerOut], dict[str, jax.Array]]

# The intermediates a lab can collect by name (Decoder(..., intermediates=...)), and the LayerOut entry of each.
INTERMEDIATES: dict[str, str] = {
    "resid": "resid",  # the residual stream after the layer (B, T, d)
    "attn_out": "attn_out",  # the attention sublayer's output (o-projection, before any post-norm) (B, T, d)
    "mlp_in": "x",  # the MLP's input (B, T, d): normed, except for "post" norms (OLMo 2)
    "gate": "gate",  # gate projection before the activation (B, T, h); GLU families and shared experts
    "up": "up",  # up projection (B, T, h) (GPT-2: c_fc, with its bias)
    "hidden": "hidden",  # act(gate) * up (plain MLP: act(up)), the down-projection's input (B, T, h)
    "expert_gate": "expert_gate",  # mixtures of experts: every expert's gate projection (B, T, E, he)
    "expert_up": "expert_up",  # every expert's up projection (B, T, E, he)
    "router_logits": "router_logits",  # the router's logits (B, T, E)
}


def intermediate_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The names of :data:`INTERMEDIATES` a model of ``cfg`` has (no ``gate`` without a GLU; a mixture of experts
    has the ``expert_*``/``router_logits`` entries and ``gate``/``up``/``hidden`` only for a shared expert)."""
    names = ["resid", "attn_out", "mlp_in"]
    dense = ("gate", "up", "hidden") if cfg.glu else ("up", "hidden")
    if cfg.moe:
        names += ["expert_gate", "expert_up", "router_logits", *(dense if cfg.shared_expert else ())]
    else:
        names += dense
    return tuple(names)


def block(
    layer: Params, feats: dict[str, jax.Array], cfg: ModelConfig, x: jax.Array, padding: Padding | None = None
) -> tuple[jax.Array, LayerOut]:
    """One decoder block (one layer's slice of the stacked weights and features): norms before attention and
    MLP (``cfg.norm_position`` "pre"), before and after each ("sandwich": Gemma 2/3) or after each ("post":
    OLMo 2, whose attention and MLP read the residual stream itself). ``padding``: see :func:`attention`.

    Returns ``(x_out, out)``: ``out`` (:data:`LayerOut`) holds the MLP's ``gate`` (GLU only) and ``up`` outputs
    ``(B, T, h)`` before the activation, ``hidden``, ``x``, the MLP input ``(B, T, d)`` (normed, except for
    "post"), ``attn_out`` and ``resid`` (``x_out``)."""
    pre, post = cfg.norm_position != "post", cfg.norm_position != "pre"
    a = attention(layer, feats, cfg, norm(layer, "attn_norm", cfg, x) if pre else x, padding)
    x = x + (norm(layer, "post_attn_norm", cfg, a) if post else a)
    mlp_in = norm(layer, "mlp_norm", cfg, x) if pre else x
    if cfg.moe:
        y, out = moe.moe_mlp(layer, cfg, mlp_in)
        if "gate" in out:
            out["hidden"] = jax.nn.silu(out["gate"]) * out["up"]  # the shared expert's (SwiGLU, moe.shared_expert)
        x = x + (norm(layer, "post_mlp_norm", cfg, y) if post else y)
        return x, {**out, "x": mlp_in, "attn_out": a, "resid": x}
    y, gate, up, hidden = _mlp_parts(layer, mlp_in, cfg.mlp_act, cfg.glu, cfg.mlp_bias)
    x = x + (norm(layer, "post_mlp_norm", cfg, y) if post else y)
    out = {"up": up, "hidden": hidden, "x": mlp_in, "attn_out": a, "resid": x}
    if gate is not None:
        out["gate"] = gate
    return x, out


def layer_slice(params: Params, layer: int) -> Params:
    """Layer ``layer`` of a stacked param tree: ``{"q": (d, H*hd), ...}`` (a copy of that layer only)."""
    return jax.tree.map(lambda a: a[layer], params["layers"])


def _row(a: jax.Array, i: int) -> jax.Array:
    return a[i]


def _write_row(buf: jax.Array, value: jax.Array, row: jax.Array) -> jax.Array:
    """``buf`` with row ``row`` (traced) replaced by ``value`` (in place under jit)."""
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), row, 0)


def run_layers(
    layers: Params,
    cfg: ModelConfig,
    x: jax.Array,
    collect: tuple[int, ...] = (),
    collector: Collector | None = None,
    n_run: int | None = None,
    unroll: bool = False,
    feats: dict[str, Any] | None = None,
    x_sharding: Any = None,
    padding: Padding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs layers ``0 .. n_run-1`` (default all) of the stacked ``layers`` on ``x (B, T, d)`` with ``lax.scan``.

    Args:
      collect: distinct layer indices below ``n_run`` whose outputs to keep.
      collector: maps a layer's :data:`LayerOut` to what is kept of it (default: the whole LayerOut);
        reductions (sums over tokens) keep the buffer small.
      unroll: a Python loop over the layers instead of the scan (same values; the compile-time
        benchmark's baseline).
      feats: per-layer features (default :func:`layer_features` of ``cfg``).
      x_sharding: on a mesh, where the residual stream ``(B, T, d)`` lives between layers (split over the
        batch, whole along ``d``): XLA then gathers each layer's weights (FSDP) rather than adding partial
        products across devices, which keeps the numbers the same however the mesh is split between hosts.
      padding: a padded batch's attention mask and positions (:func:`padding_positions`), the same for every
        layer (closed over by the scanned step, not scanned); None: no padding, positions ``0..T-1``.

    Returns:
      ``(x, stored)``: the residual stream after ``n_run`` layers and ``{name: (len(collect), ...)}``,
      row ``i`` from layer ``collect[i]``. The kept values are written into a buffer preallocated with
      ``len(collect) + 1`` rows (layers not collected write to the last, scratch row), so its memory
      is one row per collected layer whatever the depth.
    """
    n_run = cfg.n_layers if n_run is None else n_run
    collector = collector or (lambda out: out)
    feats = {name: jnp.asarray(value[:n_run]) for name, value in (feats or layer_features(cfg)).items()}
    slots = np.full((n_run,), len(collect), np.int32)
    slots[list(collect)] = np.arange(len(collect), dtype=np.int32)
    full = n_run == cfg.n_layers
    xs = (layers if full else jnp.arange(n_run), feats, jnp.asarray(slots))

    def step(carry, xs):
        x, buf = carry
        layer, f, slot = xs
        if not full:  # index the whole stack rather than scan over a slice of it (no copy of the weights)
            layer = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), layers)
        x, out = block(layer, f, cfg, x, padding)
        if x_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, x_sharding)
        if buf is not None:
            kept = collector(out)
            buf = jax.tree.map(
                lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), slot, 0), buf, kept
            )
        return (x, buf), None

    buf = None
    if collect:
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (layers, feats))
        shapes = jax.eval_shape(
            lambda l, f, x: collector(block(l, f, cfg, x)[1]), *one, jax.ShapeDtypeStruct(x.shape, x.dtype)
        )
        buf = jax.tree.map(lambda s: jnp.zeros((len(collect) + 1, *s.shape), s.dtype), shapes)
    if x_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, x_sharding)
    carry = (x, buf)
    if unroll:
        for i in range(n_run):
            carry, _ = step(carry, jax.tree.map(functools.partial(_row, i=i), xs))
    else:
        carry, _ = jax.lax.scan(step, carry, xs)
    x, buf = carry
    return x, ({} if buf is None else jax.tree.map(lambda b: b[: len(collect)], buf))


def _param(value: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter with its logical axes as Flax partitioning metadata (``nnx.get_partition_spec`` reads them;
    placing is left to :class:`jaxind.parallel.sharding.Layout`, which maps them through its rules)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Decoder(nnx.Module):
    """The decoder as a Flax NNX module: every family of this module, mixtures of experts included.

    Its parameters are the leaves of the parameter table (:mod:`jaxind.models.paramspec`), each created with its logical
    axes as partitioning metadata; the decoder layers are stacked (a leading ``"layers"`` axis) and run under
    ``lax.scan`` (:func:`run_layers`). Its pure state is the param tree every kernel, converter and checkpoint
    takes: ``nnx.to_pure_dict(nnx.state(decoder))`` is ``{"embed": ..., "layers": {"q": ...}, ...}`` (the layout
    documented above), and :func:`forward` on that tree is this module's ``__call__``.

    Args:
      cfg: the model config (static: part of the graph definition).
      params: an existing param tree to wrap (no copy); default: random parameters from ``key`` or ``rngs``.
      key: a PRNG key for the random parameters (``init_params(cfg, key)``'s draws).
      rngs: Flax's random streams (``rngs.params()`` is used as ``key``) when no ``key`` is given.
      dtype, std: of the random parameters (:func:`init_params`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params | None = None,
        *,
        key: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        dtype: Any = jnp.float32,
        std: float = 0.02,
    ):
        self.cfg = cfg
        if params is None:
            if key is None:
                key = rngs.params() if rngs is not None else jax.random.key(0)
            params = paramspec.init(cfg, key, dtype, std)
        for leaf in paramspec.top_leaves(cfg):
            setattr(self, leaf.name, _param(params[leaf.name], leaf.full_axes()))
        self.layers = nnx.Dict(
            {leaf.name: _param(params["layers"][leaf.name], leaf.full_axes()) for leaf in paramspec.layer_leaves(cfg)}
        )

    def params(self) -> Params:
        """The module's parameters as the plain param tree (the arrays themselves, no copy)."""
        tree: Params = {leaf.name: getattr(self, leaf.name)[...] for leaf in paramspec.top_leaves(self.cfg)}
        # by name from the table: under nnx.capture the Dict also holds Flax's "__captures__" entry
        tree["layers"] = {leaf.name: self.layers[leaf.name][...] for leaf in paramspec.layer_leaves(self.cfg)}
        return tree

    def __call__(
        self,
        tokens: jax.Array,
        collect: Sequence[int] = (),
        return_logits: bool = True,
        collect_inputs: bool = False,
        unroll: bool = False,
        x_sharding: Any = None,
        *,
        attention_mask: jax.Array | None = None,
        intermediates: Sequence[str] = (),
    ) -> tuple[jax.Array | None, Activations]:
        """Runs the model on ``tokens (B, T)`` int: ``(logits (B, T, V) float32 or None, activations)``; the
        arguments and the result are :func:`forward`'s.

        With ``intermediates``, each named value of the collected layers is also sown as an ``nnx.Intermediate``
        under its name, stacked over those layers in increasing order: ``(k, B, T, ...)``. Read them with
        ``nnx.capture(decoder, nnx.Intermediate)(tokens, ...)``, which returns ``((logits, acts), state)`` with
        ``state[name][0]`` the stack (Flax's sow keeps a tuple of the values sown)."""
        cfg = self.cfg
        params = self.params()
        names = check_intermediates(cfg, intermediates)
        wanted = normalize_layers(cfg, None if names and not collect else collect)
        n_run = wanted[-1] + 1 if wanted and not return_logits else cfg.n_layers
        if not cfg.rope and tokens.shape[1] > cfg.max_positions:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's {cfg.max_positions} positions")
        padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(tokens.shape):
                raise JaxindError(
                    f"attention_mask must have the tokens' shape {tuple(tokens.shape)} (1 = real token, 0 = padding), "
                    f"got {tuple(attention_mask.shape)}"
                )
            padding = padding_positions(attention_mask)
        x = embed(params, cfg, tokens, None if padding is None else padding["pos"])
        keep = _keeper(names, collect_inputs)
        x, stored = run_layers(
            params["layers"], cfg, x, wanted, keep, n_run, unroll, x_sharding=x_sharding, padding=padding
        )
        for name in names:
            self.sow(nnx.Intermediate, name, stored[name])
        acts: Activations = {
            layer: {name: value[i] for name, value in stored.items()} for i, layer in enumerate(wanted)
        }
        return (unembed(params, cfg, x) if return_logits else None), acts


# What forward/Decoder return per collected layer when no intermediates are named (the LayerOut names).
_DEFAULT_KEPT = frozenset({"gate", "up", "expert_gate", "expert_up", "router_logits"})


def check_intermediates(cfg: ModelConfig, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple of distinct intermediate names of ``cfg``'s model (:func:`intermediate_names`).

    Raises:
      JaxindError: a name the model does not have, or a single string instead of a sequence of names.
    """
    if isinstance(names, str):
        raise JaxindError(f"intermediates must be a sequence of names, e.g. ({names!r},), not the string {names!r}")
    valid = intermediate_names(cfg)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise JaxindError(f"unknown intermediates {unknown} for a {cfg.family} model; choose from {list(valid)}")
    return tuple(dict.fromkeys(names))


def _keeper(names: tuple[str, ...], collect_inputs: bool) -> Collector:
    """The collector keeping the named intermediates, or (no names) the gate/up outputs (and ``"x"`` with
    ``collect_inputs``) as :func:`forward` always returned them."""
    if names:
        return lambda out: {name: out[INTERMEDIATES[name]] for name in names}
    kept = _DEFAULT_KEPT | ({"x"} if collect_inputs else set())
    return lambda out: {name: value for name, value in out.items() if name in kept}


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    collect: Sequence[int] = (),
    return_logits: bool = True,
    collect_inputs: bool = False,
    unroll: bool = False,
    x_sharding: Any = None,
    *,
    attention_mask: jax.Array | None = None,
    intermediates: Sequence[str] = (),
) -> tuple[jax.Array | None, Activations]:
    """Runs the model on ``tokens (B, T)`` int: :class:`Decoder` ``__call__`` on a raw param tree (for code that
    holds trees rather than modules; the module wraps the arrays, nothing is copied).

    Args:
      collect: layer indices whose MLP gate/up outputs (or ``intermediates``) to return; negative indices count
        from the end and are normalised, so the keys of ``collect=(0, -1)`` are ``0`` and ``L - 1``.
      return_logits: skip the LM head when False (activation-only passes stop after the last
        collected layer).
      collect_inputs: also return each collected layer's normed MLP input as ``"x"``
        ``(B, T, d)`` (``gate = x @ W_gate``: cross-Gram statistics of the outputs follow from
        those of ``x``, which is ``d``-wide instead of ``h``-wide).
      unroll, x_sharding: see :func:`run_layers`.
      attention_mask: ``(B, T)``, 1 (or True) for a real token, 0 for padding, on either side of each sequence:
        padding keys are masked out and positions (RoPE, GPT-2's learned ones) count real tokens only
        (:func:`padding_positions`), so each real token's logits and intermediates are those of its
        unpadded sequence (to float rounding); padding positions' outputs are meaningless. None: no padding
        (the computation of earlier releases, bit for bit).
      intermediates: names from :func:`intermediate_names` (``"resid"``, ``"attn_out"``, ``"mlp_in"``,
        ``"gate"``, ``"up"``, ``"hidden"``, ...; :data:`INTERMEDIATES` says what each is) to return for the
        ``collect`` layers (every layer when ``collect`` is empty) instead of gate/up; the module sows them as
        ``nnx.Intermediate`` (:class:`Decoder`).

    Returns:
      ``(logits, acts)``: logits ``(B, T, V)`` float32 (or None) and
      ``{layer: {"gate": (B, T, h), "up": (B, T, h)}}`` for each layer in ``collect``
      (no "gate" for a non-GLU family; a mixture of experts adds every expert's ``expert_gate``/``expert_up``
      ``(B, T, E, he)`` on all tokens and ``router_logits`` ``(B, T, E)``, and has "gate"/"up" only for a
      shared expert), or ``{layer: {name: ...}}`` for the named ``intermediates``. Memory for the activations:
      one ``(B, T, ...)`` per kept value per collected layer, plus one scratch layer (:func:`run_layers`).
    """
    decoder = Decoder(cfg, params)
    args = (tokens, collect, return_logits, collect_inputs, unroll, x_sharding)
    if not intermediates:
        return decoder(*args, attention_mask=attention_mask)
    out, _ = nnx.capture(decoder, nnx.Intermediate)(*args, attention_mask=attention_mask, intermediates=intermediates)
    return out


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "collect", "return_logits", "collect_inputs", "unroll", "x_sharding", "intermediates"),
)
def forward_jit(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    collect: tuple[int, ...] = (),
    return_logits: bool = True,
    collect_inputs: bool = False,
    unroll: bool = False,
    x_sharding: Any = None,
    *,
    attention_mask: jax.Array | None = None,
    intermediates: tuple[str, ...] = (),
):
    """Jitted :func:`forward` (``cfg``, ``collect``, the flags, ``x_sharding`` and ``intermediates`` are static;
    ``attention_mask`` is traced)."""
    return forward(
        params,
        cfg,
        tokens,
        collect,
        return_logits,
        collect_inputs,
        unroll,
        x_sharding,
        attention_mask=attention_mask,
        intermediates=intermediates,
    )


def forward_logits(params: Params, cfg: ModelConfig) -> Callable[..., jax.Array]:
    """``(tokens (B, T), attention_mask (B, T) or None) -> logits (B, T, V)`` for a param tree (jitted; the mask
    as in :func:`forward`)."""

    def logits(tokens: Any, attention_mask: Any = None) -> jax.Array:
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return forward_jit(params, cfg, jnp.asarray(tokens, jnp.int32), attention_mask=mask)[0]

    return logits


def layer_norm_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The residual-width norm weights of one layer: ``attn_norm``/``mlp_norm`` (before attention and MLP),
    ``post_attn_norm``/``post_mlp_norm`` (on their outputs), as ``cfg.norm_position`` places them; none for a
    non-parametric norm."""
    if not cfg.has_norm_weights:
        return ()
    pre, post = ("attn_norm", "mlp_norm"), ("post_attn_norm", "post_mlp_norm")
    return {"pre": pre, "sandwich": pre + post, "post": post}[cfg.norm_position]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) weights, unit norms) for a config, layers stacked, built from the parameter
    table (:func:`jaxind.models.paramspec.init`): independent models are ``init_params(cfg, key)`` for
    different keys. The
    same tree as ``nnx.to_pure_dict(nnx.state(Decoder(cfg, key=key)))``."""
    return paramspec.init(cfg, key, dtype, std)


def flatten_paths(tree: Any) -> dict[str, Any]:
    """``{"embed": leaf, "layers.q": leaf, ...}``: every leaf of a param tree by its dotted path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in flat}


def param_shapes_flat(cfg: ModelConfig, per_layer: bool = False) -> dict[str, tuple[int, ...]]:
    """Every leaf's path and shape: ``{"embed": (V, d), "layers.q": (L, d, H*hd), ...}``; with ``per_layer``
    the layer leaves one layer at a time, as checkpoints store them: ``{"layers.0.q": (d, H*hd), ...}`` (from the
    parameter table; what the converters check each tensor against)."""
    tree = jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32),
        paramspec.shapes(cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    flat = {path: tuple(leaf.shape) for path, leaf in flatten_paths(tree).items()}  # the tree's flattening order
    if not per_layer:
        return flat
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in flat.items():
        if path.startswith("layers."):
            out.update({f"layers.{l}.{path[len('layers.') :]}": shape[1:] for l in range(cfg.n_layers)})
        else:
            out[path] = shape
    return out
