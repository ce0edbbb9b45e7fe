"""Mixture-of-experts MLP layers (Mixtral, Qwen2-MoE) as pure functions (docs/DESIGN.md §5.13).

A MoE layer replaces the dense MLP by ``E`` routed SwiGLU experts of width ``he = cfg.d_expert``; its
stacked leaves (layer axis first, linear maps stored ``(in, out)`` as everywhere in jaxind)::

    "router": (L, d, E)              # HF `gate` (Mixtral `block_sparse_moe.gate`), one logit per expert
    "expert_gate": (L, E, d, he)     # expert e's gate_proj (Mixtral w1)
    "expert_up": (L, E, d, he)       # expert e's up_proj (Mixtral w3)
    "expert_down": (L, E, he, d)     # expert e's down_proj (Mixtral w2)
    "shared_gate": (L, d)            # Qwen2-MoE: the shared expert's scalar gate (HF `shared_expert_gate`)

Qwen2-MoE's shared expert is the dense MLP of :mod:`jaxind.models.model` (``gate``/``up``/``down``, width
``cfg.d_ff``), added to every token scaled by ``sigmoid(x . shared_gate)``.

Routing is transformers' (``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``): ``probs = softmax(x @ router)`` in
float32, the top-k probabilities and their experts, renormalised to sum to 1 where ``cfg.norm_topk_prob``
(always for Mixtral). The layer's output is ``sum over the top-k experts e of weight_e * expert_e(x)``.

It is computed densely: every expert runs on every token and is weighted by its routing weight, zero off the
top-k. That is the same function (the sum only adds exact zeros), it differentiates and ``vmap``s everywhere
(PERMTEST's ``mc`` draws), and it costs ``E / k`` times the routed multiply-adds; sparse dispatch
(``jax.lax.ragged_dot``) has no batching rule for PERMTEST's batched draws yet. The dense form also gives what
the activation tests read: each expert as a function of its input, on all tokens (``expert_gate``/``expert_up``
``(..., E, he)``, computed only where a caller keeps them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxind.models.config import ModelConfig
from jaxind.types import Params

__all__ = ["EXPERT_LEAVES", "expert_activations", "experts_output", "layer_shapes", "moe_mlp", "route", "shared_expert"]

# The stacked MoE leaves of one layer, in the order of jaxind.models.symmetry.LAYER_SPEC.
EXPERT_LEAVES = ("expert_gate", "expert_up", "expert_down")


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The MoE leaves of ONE layer and their shapes (no layer axis): ``{"router": (d, E), ...}`` (a view of the
    parameter table, :mod:`jaxind.models.paramspec`)."""
    from jaxind.models import paramspec

    moe_leaves = ("router", *EXPERT_LEAVES, "shared_gate")
    return {leaf.name: leaf.shape(cfg) for leaf in paramspec.layer_leaves(cfg) if leaf.name in moe_leaves}


def route(router: jax.Array, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k softmax routing of ``x (..., d)`` with ``router (d, E)``.

    Returns:
      ``(logits (..., E) float32, top_weights (..., k) float32, top_index (..., k) int32)``: the router logits,
      the top-k softmax probabilities (renormalised where ``cfg.norm_topk_prob``) and their experts, best first.
    """
    logits = (x @ router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, index = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, top, index


def expert_activations(layer: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every expert's gate and up projections of ``x (..., d)``, before the activation, on all tokens:
    ``(gate (..., E, he), up (..., E, he))`` (what each expert's ``gate_proj`` / ``up_proj`` returns)."""
    gate = jnp.einsum("...d,edh->...eh", x, layer["expert_gate"])
    up = jnp.einsum("...d,edh->...eh", x, layer["expert_up"])
    return gate, up


def experts_output(layer: Params, gate: jax.Array, up: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_e weights[..., e] * expert_e(x)`` from the experts' projections ``gate``/``up`` ``(..., E, he)``
    (:func:`expert_activations`) and the routing ``weights (..., E)``: ``(..., d)``."""
    hidden = jax.nn.silu(gate) * up * weights[..., None].astype(gate.dtype)
    return jnp.einsum("...eh,ehd->...d", hidden, layer["expert_down"])


def shared_expert(layer: Params, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Qwen2-MoE's shared expert on ``x (..., d)``: ``(sigmoid(x . shared_gate) * swiglu(x), gate, up)`` with
    ``gate``/``up`` ``(..., d_ff)`` its projections before the activation."""
    gate, up = x @ layer["gate"], x @ layer["up"]
    out = (jax.nn.silu(gate) * up) @ layer["down"]
    scale = jax.nn.sigmoid((x @ layer["shared_gate"]).astype(jnp.float32))[..., None]
    return (out.astype(jnp.float32) * scale).astype(x.dtype), gate, up


def moe_mlp(layer: Params, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One MoE layer's MLP on its normed input ``x (B, T, d)``.

    Returns:
      ``(y (B, T, d), out)``: ``out`` has every expert's ``expert_gate``/``expert_up`` ``(B, T, E, he)`` on all
      tokens, the router ``router_logits`` ``(B, T, E)`` and, with a shared expert, its ``gate``/``up``
      ``(B, T, d_ff)`` (the dense MLP's names). Values a caller does not keep are never computed under jit.
    """
    logits, top, index = route(layer["router"], cfg, x)
    weights = jnp.einsum("...k,...ke->...e", top, jax.nn.one_hot(index, cfg.n_experts, dtype=jnp.float32))
    expert_gate, expert_up = expert_activations(layer, x)
    y = experts_output(layer, expert_gate, expert_up, weights)
    out = {"expert_gate": expert_gate, "expert_up": expert_up, "router_logits": logits}
    if cfg.shared_expert:
        shared, gate, up = shared_expert(layer, x)
        y = y + shared
        out.update(gate=gate, up=up)
    return y, out
