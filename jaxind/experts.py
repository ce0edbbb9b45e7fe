"""Independence tests on mixture-of-experts layers (docs/DESIGN.md §5.10).

A MoE layer (:mod:`jaxind.moe`) has more symmetry than a dense MLP: its ``E`` experts can be reordered (with the
router's columns), and each expert's hidden units permuted on their own. The tests follow the group:

- **PERMTEST** (``l2``, ``mc``): the draws include a uniform expert permutation per layer and a uniform unit
  permutation per expert (:func:`jaxind.symmetry.draw_permutations`), so the p-value stays exact. The L2 kernel's
  expert term is :func:`l2_consts` / :func:`l2_inner` (no permuted model is materialised).
- **CSU / CSH / MATCH** per layer pair: first match the experts of A to those of B by a linear assignment over an
  expert-to-expert similarity, then test the hidden units within each matched pair of experts, plus the
  expert matching itself; Fisher over every p-value (and, for Qwen2-MoE, the shared expert as a dense MLP).

Expert similarity (:func:`expert_similarity`): for experts ``i`` of A and ``j`` of B, the cosine similarities
``C (he_A, he_B)`` between their units' rows (up-projection weight columns for CSU; activation rows over the
tokens for CSH and MATCH), and ``S[i, j] = (mean_u max_v C[u, v] + mean_v max_u C[u, v]) / 2``, how well each
unit finds a counterpart. ``S`` does not change when the units of either expert are permuted.

Why CSU and CSH stay exact (the argument of docs/DESIGN.md §5.10): under H0, ``B`` has the law of ``g(B)`` for a
uniform group element ``g``, which splits as ``g = r q`` with ``r`` = (expert permutations ``pi``, unit
permutations ``tau``) uniform and independent of ``q(B)``. ``S`` is invariant under ``tau``, so the expert matching
``sigma`` is a function of ``(A, q(B), pi)``: reordering B's experts by ``pi`` reorders the columns of ``S``, and the
LAP's keyed random relabelling makes ``sigma`` equivariant, so ``sigma`` is uniform; given ``sigma``, the unit
matching inside each matched pair ``(i, sigma(i))`` is ``tau_{sigma(i)}`` composed with a matching of ``q(B)``'s
expert, uniform and independent across ``i`` (distinct experts, independent ``tau``). So the expert-level
Spearman p-value and every within-expert p-value are independent and valid, and Fisher over them (and over
layers, whose group elements are independent) is exact. The expert-level test has only ``E`` observations, so
its p-value is the exact permutation p-value of Spearman's rho for ``E <= 10``
(:func:`jaxind.pvalues.spearman_exact`). MATCH's p-values are approximate, as for dense models.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxind.config import ModelConfig
from jaxind.symmetry import Perm
from jaxind.types import Params

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# PERMTEST l2: the expert leaves' inner product <A, g(B)> per draw.


class ExpertL2(NamedTuple):
    """The expert leaves of both models (references to the param trees' arrays, float32): routers ``(L, d, E)``,
    expert gate and up ``(L, E, d, he)``, down ``(L, E, he, d)``."""

    router_a: jax.Array
    router_b: jax.Array
    gate_a: jax.Array
    gate_b: jax.Array
    up_a: jax.Array
    up_b: jax.Array
    down_a: jax.Array
    down_b: jax.Array


def l2_consts(params_a: Params, params_b: Params, cfg: ModelConfig) -> ExpertL2 | None:
    """What :func:`l2_inner` needs for a pair of models with ``cfg`` (None for a dense config)."""
    if not cfg.moe:
        return None
    names = ("router", "expert_gate", "expert_up", "expert_down")
    a, b = ([p["layers"][n].astype(jnp.float32) for n in names] for p in (params_a, params_b))
    return ExpertL2(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3])


def l2_inner(consts: ExpertL2, perm: Perm) -> jax.Array:
    """``<A, g(B)>`` over the router and expert leaves, per layer ``(L,)``, for one group element ``g = perm``,
    one layer at a time (memory: one layer's experts per draw in flight)."""
    s = perm.resid
    assert perm.experts is not None and perm.expert_mlp is not None
    router_b = jnp.take_along_axis(jnp.take(consts.router_b, s, axis=1), perm.experts[:, None, :], axis=2)
    router = jnp.sum(consts.router_a * router_b, axis=(1, 2))

    def layer(carry, xs):
        gate_a, gate_b, up_a, up_b, down_a, down_b, pi, tau = (
            xs  # one layer: (E, d, he) x4, (E, he, d) x2, (E,), (E, he)
        )

        def moved(w: jax.Array, resid: int, unit: int) -> jax.Array:  # g(B)'s experts: w'[e] = w[pi[e]][s, tau[e]]
            w = jnp.take(jnp.take(w, pi, axis=0), s, axis=resid)
            return jnp.take_along_axis(w, jnp.expand_dims(tau, 3 - unit), axis=unit)

        inner = jnp.sum(gate_a * moved(gate_b, 1, 2)) + jnp.sum(up_a * moved(up_b, 1, 2))
        return carry, inner + jnp.sum(down_a * moved(down_b, 2, 1))

    _, experts = jax.lax.scan(layer, None, (*consts[2:], perm.experts, perm.expert_mlp))
    return router + experts
