"""Independence tests on mixture-of-experts layers (docs/DESIGN.md §5.13).

A MoE layer (:mod:`jaxind.models.moe`) has more symmetry than a dense MLP: its ``E`` experts can be reordered (with the
router's columns), and each expert's hidden units permuted on their own. The tests follow the group:

- **PERMTEST** (``l2``, ``mc``): the draws include a uniform expert permutation per layer and a uniform unit
  permutation per expert (:func:`jaxind.models.symmetry.draw_permutations`), so the p-value stays exact. The L2 kernel's
  expert term is :func:`l2_consts` / :func:`l2_inner` (no permuted model is materialised).
- **CSU / CSH / MATCH** per layer pair: first match the experts of A to those of B by a linear assignment over an
  expert-to-expert similarity, then test the hidden units within each matched pair of experts, plus the
  expert matching itself; Fisher over every p-value (and, for Qwen2-MoE, the shared expert as a dense MLP).

Expert similarity (:func:`expert_similarity`): for experts ``i`` of A and ``j`` of B, the cosine similarities
``C (he_A, he_B)`` between their units' rows (up-projection weight columns for CSU; activation rows over the
tokens for CSH and MATCH), and ``S[i, j] = (mean_u max_v C[u, v] + mean_v max_u C[u, v]) / 2``, how well each
unit finds a counterpart. ``S`` does not change when the units of either expert are permuted.

Why CSU and CSH stay exact (the argument of docs/DESIGN.md §5.13): under H0, ``B`` has the law of ``g(B)`` for a
uniform group element ``g``, which splits as ``g = r q`` with ``r`` = (expert permutations ``pi``, unit
permutations ``tau``) uniform and independent of ``q(B)``. ``S`` is invariant under ``tau``, so the expert matching
``sigma`` is a function of ``(A, q(B), pi)``: reordering B's experts by ``pi`` reorders the columns of ``S``, and the
LAP's keyed random relabelling makes ``sigma`` equivariant, so ``sigma`` is uniform; given ``sigma``, the unit
matching inside each matched pair ``(i, sigma(i))`` is ``tau_{sigma(i)}`` composed with a matching of ``q(B)``'s
expert, uniform and independent across ``i`` (distinct experts, independent ``tau``). So the expert-level
Spearman p-value and every within-expert p-value are independent and valid, and Fisher over them (and over
layers, whose group elements are independent) is exact. The expert-level test has only ``E`` observations, so
its p-value is the exact permutation p-value of Spearman's rho for ``E <= 10``
(:func:`jaxind.stats.pvalues.spearman_matching_test`). MATCH's p-values are approximate, as for dense models.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.models import model as model_lib
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.models.symmetry import Perm
from jaxind.stats import assignment, constrained, convention, grams, match, pvalues
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "EXACT_NOTE",
    "ExpertL2",
    "ExpertPass",
    "MATCH_NOTE",
    "Space",
    "WEIGHTS",
    "accumulate",
    "csh_from_pass",
    "csu",
    "expert_similarity",
    "l2_consts",
    "l2_inner",
    "match_from_pass",
    "pass_for_pairs",
    "unit_grams",
]

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

    def layer(carry, xs):  # one layer: gate/up (E, d, he) x4, down (E, he, d) x2, pi (E,), tau (E, he)
        gate_a, gate_b, up_a, up_b, down_a, down_b, pi, tau = xs

        def moved(w: jax.Array, resid: int, unit: int) -> jax.Array:  # g(B)'s experts: w'[e] = w[pi[e]][s, tau[e]]
            w = jnp.take(jnp.take(w, pi, axis=0), s, axis=resid)
            return jnp.take_along_axis(w, jnp.expand_dims(tau, 3 - unit), axis=unit)

        inner = jnp.sum(gate_a * moved(gate_b, 1, 2)) + jnp.sum(up_a * moved(up_b, 1, 2))
        return carry, inner + jnp.sum(down_a * moved(down_b, 2, 1))

    _, experts = jax.lax.scan(layer, None, (*consts[2:], perm.experts, perm.expert_mlp))
    return router + experts


# --------------------------------------------------------------------------------------------
# Units read as rows: weights (CSU), or activations over the tokens from input Grams (CSH, MATCH).


class Space(NamedTuple):
    """Where units' rows live for one layer pair: ``cross (d_A, d_B)`` = sum over tokens of ``x_A x_B^T`` and the
    Grams ``gram_a (d_A, d_A)``, ``gram_b (d_B, d_B)`` of the two models' MLP inputs (activation rows: unit ``u``'s
    row is ``x W[:, u]`` over the tokens); all None for weight rows (unit ``u``'s row is ``W[:, u]``)."""

    cross: jax.Array | None = None
    gram_a: jax.Array | None = None
    gram_b: jax.Array | None = None


WEIGHTS = Space()


def _sq_norms(w: jax.Array, gram: jax.Array | None) -> jax.Array:
    """Squared row norms of the units of ``w (..., d, h)``: ``(..., h)``."""
    if gram is None:
        return jnp.sum(w * w, axis=-2)
    return jnp.maximum(jnp.einsum("...dh,de,...eh->...h", w, gram, w, precision=_HIGHEST), 0.0)


def _inner(w_a: jax.Array, w_b: jax.Array, cross: jax.Array | None) -> jax.Array:
    """Inner products of unit rows ``(h_A, h_B)`` of ``w_a (d_A, h_A)`` and ``w_b (d_B, h_B)``."""
    if cross is not None:
        w_a = jnp.matmul(cross.T, w_a, precision=_HIGHEST)
    return jnp.matmul(w_a.T, w_b, precision=_HIGHEST)


@jax.jit
def unit_grams(w_a: jax.Array, w_b: jax.Array, space: Space) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(inner (h_A, h_B), sq_norm_a (h_A,), sq_norm_b (h_B,))`` of the units of one expert (or MLP) of each
    model, ``w_a (d_A, h_A)``, ``w_b (d_B, h_B)``, read in ``space``."""
    return _inner(w_a, w_b, space.cross), _sq_norms(w_a, space.gram_a), _sq_norms(w_b, space.gram_b)


def _cosines(inner: jax.Array, sq_a: jax.Array, sq_b: jax.Array) -> jax.Array:
    return inner / (jnp.sqrt(jnp.maximum(sq_a, 1e-30))[:, None] * jnp.sqrt(jnp.maximum(sq_b, 1e-30))[None, :])


@jax.jit
def expert_similarity(w_a: jax.Array, w_b: jax.Array, space: Space) -> jax.Array:
    """Expert-to-expert similarity ``S (E_A, E_B)`` of stacked experts ``w_a (E_A, d_A, h_A)``,
    ``w_b (E_B, d_B, h_B)``: with ``C`` the cosine similarities of expert ``i``'s and ``j``'s unit rows,
    ``S[i, j] = (mean_u max_v C[u, v] + mean_v max_u C[u, v]) / 2``. Invariant under permutations of either
    expert's units (what keeps CSU and CSH exact, module doc); one ``(h_A, h_B)`` block at a time."""
    sq_a, sq_b = _sq_norms(w_a, space.gram_a), _sq_norms(w_b, space.gram_b)

    def row(i: jax.Array) -> jax.Array:
        def col(j: jax.Array) -> jax.Array:
            c = _cosines(_inner(w_a[i], w_b[j], space.cross), sq_a[i], sq_b[j])
            return 0.5 * (jnp.mean(jnp.max(c, axis=1)) + jnp.mean(jnp.max(c, axis=0)))

        return jax.lax.map(col, jnp.arange(w_b.shape[0]))

    return jax.lax.map(row, jnp.arange(w_a.shape[0]))


# --------------------------------------------------------------------------------------------
# The one pass over the data: Grams of the MLP inputs (every expert reads the same input).


@dataclasses.dataclass
class ExpertPass:
    """Input Grams of one pass over the data, from which every expert's (and the shared expert's) unit
    activations' Grams follow: a unit's activations are ``x W[:, u]`` on all tokens (the expert as a function of
    its input, routed or not), so ``<x_A W_A[:, u], x_B W_B[:, v]> = W_A[:, u]^T (x_A^T x_B) W_B[:, v]``.

    Attributes:
      cross: ``(P, d_A, d_B)`` per explicit layer pair; gram_a ``(n_a, d_A, d_A)``, gram_b ``(n_b, d_B, d_B)`` per
        collected layer; count: tokens counted; layers_a/layers_b, pair_index as in
        :class:`jaxind.stats.grams.PassStats`.
    """

    cross: jax.Array
    gram_a: jax.Array
    gram_b: jax.Array
    count: float
    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    pair_index: tuple[tuple[int, int], ...]

    def space(self, pair: int) -> Space:
        """The activation space of explicit pair ``pair``."""
        ia, ib = self.pair_index[pair]
        return Space(self.cross[pair], self.gram_a[ia], self.gram_b[ib])


def _collect_inputs(
    params: Params, cfg: ModelConfig, tokens: jax.Array, mask, layers: tuple[int, ...], attention_mask=None
) -> jax.Array:
    """The masked MLP inputs ``(n, N, d)`` float32 of the collected ``layers`` (the scan stops after the last); an
    ``attention_mask`` masks padding in the forward (:func:`jaxind.stats.grams.accumulate_step`)."""

    def keep(out: model_lib.LayerOut) -> dict[str, jax.Array]:
        x = out["x"].reshape(-1, out["x"].shape[-1]).astype(jnp.float32)
        return {"x": x if mask is None else x * mask.reshape(-1, 1).astype(jnp.float32)}

    padding = None if attention_mask is None else model_lib.padding_positions(attention_mask)
    x = model_lib.embed(params, cfg, tokens, None if padding is None else padding["pos"])
    return model_lib.run_layers(params["layers"], cfg, x, layers, keep, max(layers) + 1, padding=padding)[1]["x"]


@functools.partial(
    jax.jit, static_argnames=("cfg_a", "cfg_b", "layers_a", "layers_b", "pair_index"), donate_argnames=("state",)
)
def _accumulate_step(
    state, params_a, params_b, tokens, mask, attention_mask, *, cfg_a, cfg_b, layers_a, layers_b, pair_index
):
    """Adds one token batch's input cross-Grams (per pair) and Grams (per layer) to ``state`` (donated)."""
    xa = _collect_inputs(params_a, cfg_a, tokens, mask, layers_a, attention_mask)
    xb = _collect_inputs(params_b, cfg_b, tokens, mask, layers_b, attention_mask)
    ia = jnp.asarray([p[0] for p in pair_index], jnp.int32)
    ib = jnp.asarray([p[1] for p in pair_index], jnp.int32)
    count = tokens.size if mask is None else jnp.sum(mask.astype(jnp.float32))
    return {
        "cross": state["cross"] + jnp.einsum("pnd,pne->pde", xa[ia], xb[ib], precision=_HIGHEST),
        "gram_a": state["gram_a"] + jnp.einsum("ind,ine->ide", xa, xa, precision=_HIGHEST),
        "gram_b": state["gram_b"] + jnp.einsum("ind,ine->ide", xb, xb, precision=_HIGHEST),
        "count": state["count"] + count,
    }


def accumulate(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Iterable[Any],
    *,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...],
) -> ExpertPass:
    """One pass over ``batches`` (as :func:`jaxind.stats.grams.accumulate`) for two mixture-of-experts models, or a MoE
    and a dense model (:mod:`jaxind.stats.upcycling` reads the dense MLP's units from the same input Grams)."""
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    da, db = cfg_a.d_model, cfg_b.d_model
    state = {
        "cross": z((len(pair_index), da, db)),
        "gram_a": z((len(layers_a), da, da)),
        "gram_b": z((len(layers_b), db, db)),
        "count": z(()),
    }
    n_batches = 0
    for tokens, mask, attention_mask in progress.bar(grams.normalize_batches(batches), desc="MoE pass"):
        state = _accumulate_step(
            state,
            params_a,
            params_b,
            tokens,
            mask,
            attention_mask,
            cfg_a=cfg_a,
            cfg_b=cfg_b,
            layers_a=tuple(layers_a),
            layers_b=tuple(layers_b),
            pair_index=tuple(pair_index),
        )
        n_batches += 1
    if n_batches == 0:
        raise JaxindError("the MoE activation pass got no token batches")
    return ExpertPass(
        state["cross"], state["gram_a"], state["gram_b"], float(state["count"]), layers_a, layers_b, pair_index
    )


def pass_for_pairs(
    params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig, batches, pairs: Sequence[LayerPair]
) -> ExpertPass:
    """:func:`accumulate` over explicit layer ``pairs``."""
    layers_a = tuple(sorted({a for a, _ in pairs}))
    layers_b = tuple(sorted({b for _, b in pairs}))
    pair_index = tuple((layers_a.index(a), layers_b.index(b)) for a, b in pairs)
    return accumulate(
        params_a, cfg_a, params_b, cfg_b, batches, layers_a=layers_a, layers_b=layers_b, pair_index=pair_index
    )


# --------------------------------------------------------------------------------------------
# The tests, layer pair by layer pair.

EXACT_NOTE = (
    "exact: experts matched by a similarity invariant to each expert's unit order, then Spearman of the expert "
    "matching and of the unit matching inside each matched pair of experts; Fisher over all"
)
MATCH_NOTE = (
    "approximate, as MATCH: experts paired by activation similarity, then gate vs up unit matchings inside each "
    "pair (Spearman's t approximation); Fisher over all"
)


def _require_moe(cfg_a: ModelConfig, cfg_b: ModelConfig, test: str) -> None:
    if not (cfg_a.moe and cfg_b.moe):
        raise JaxindError(
            f"{test} on a mixture of experts compares experts with experts: both models must be mixtures of experts "
            f"(got {cfg_a.family} and {cfg_b.family}); use jaxind.stats.upcycling for a MoE vs a dense model"
        )
    if cfg_a.shared_expert != cfg_b.shared_expert:
        raise JaxindError(
            f"{test}: one model has a shared expert and the other has none ({cfg_a.family} vs {cfg_b.family})"
        )


def _layer(params: Params, name: str, layer: int) -> jax.Array:
    return params["layers"][name][layer]


def _expert_matching(similarity: np.ndarray, key: jax.Array, layer_a: int, layer_b: int) -> tuple[list, np.ndarray]:
    """Matches experts by maximum total similarity; returns ``(records, pairs (k, 2))``: the expert-level
    Spearman record (if there are at least 3 experts) and the matched ``(expert_a, expert_b)`` pairs."""
    rows, cols = assignment.solve_lap(np.asarray(similarity, np.float64), maximize=True, key=key)
    records = []
    if len(rows) >= 3:
        result = pvalues.spearman_matching_test(rows, cols)
        records.append(LayerResult.from_spearman(layer_a, layer_b, result, part="experts", num_experts=len(rows)))
    return records, np.stack([rows, cols], axis=1)


def _constrained_layer(
    params_a: Params, params_b: Params, layer_a: int, layer_b: int, space: Space, key: jax.Array
) -> list[LayerResult]:
    """CSU (``space`` = weights) or CSH (activations) of one layer pair: the expert matching's record, one record
    per matched pair of experts (their up-projection units matched by cosine), the shared expert's record."""
    k_experts, k_units, k_shared = jax.random.split(key, 3)
    up_a, up_b = _layer(params_a, "expert_up", layer_a), _layer(params_b, "expert_up", layer_b)
    records, pairs = _expert_matching(np.asarray(expert_similarity(up_a, up_b, space)), k_experts, layer_a, layer_b)
    for (i, j), k in zip(pairs, jax.random.split(k_units, len(pairs))):
        cos = np.asarray(_cosines(*unit_grams(up_a[i], up_b[j], space)))
        result, _, _ = constrained.matched_spearman(cos, k)
        records.append(
            LayerResult.from_spearman(layer_a, layer_b, result, part="expert", expert_a=int(i), expert_b=int(j))
        )
    if "up" in params_a["layers"] and "up" in params_b["layers"]:
        cos = np.asarray(_cosines(*unit_grams(_layer(params_a, "up", layer_a), _layer(params_b, "up", layer_b), space)))
        result, _, _ = constrained.matched_spearman(cos, k_shared)
        records.append(LayerResult.from_spearman(layer_a, layer_b, result, part="shared"))
    return records


@timed
def csu(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    *legacy: Any,
    key: jax.Array | None = None,
    layers: Layers = None,
) -> TestResult:
    """CSU on mixtures of experts: per layer pair, experts matched by their up-projection weights' similarity,
    then each matched pair's units by cosine (module doc); Fisher over every record. Exact."""
    key, layers = convention.key_and_layers("experts.csu", legacy, key, layers)
    _require_moe(cfg_a, cfg_b, "CSU")
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(
            f"CSU compares weight rows, so it needs the same residual width ({cfg_a.d_model} vs {cfg_b.d_model})"
        )
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "CSU")
    records: list[LayerResult] = []
    for (la, lb), k in zip(pairs, jax.random.split(key, len(pairs))):
        records += _constrained_layer(params_a, params_b, la, lb, WEIGHTS, k)
    return fisher_result("csu", records, exact=True, note=EXACT_NOTE)


@timed
def csh_from_pass(
    params_a: Params, params_b: Params, stats: ExpertPass, pairs: Sequence[LayerPair], key: jax.Array
) -> TestResult:
    """CSH on mixtures of experts from one pass (:func:`accumulate`): as :func:`csu` with the units' up-projection
    activations over the tokens instead of their weights. Exact."""
    records: list[LayerResult] = []
    for p, ((la, lb), k) in enumerate(zip(pairs, jax.random.split(key, len(pairs)))):
        records += _constrained_layer(params_a, params_b, la, lb, stats.space(p), k)
    return fisher_result("csh", records, exact=True, note=EXACT_NOTE, num_tokens=int(stats.count))


def _distances(w: tuple[jax.Array, jax.Array], space: Space) -> np.ndarray:
    inner, sq_a, sq_b = unit_grams(w[0], w[1], space)
    return grams.sq_distances(np.asarray(inner), np.asarray(sq_a), np.asarray(sq_b))


@timed
def match_from_pass(
    params_a: Params, params_b: Params, stats: ExpertPass, pairs: Sequence[LayerPair], key: jax.Array
) -> TestResult:
    """MATCH on mixtures of experts from one pass: per layer pair, experts paired by maximum total similarity of
    their gate and up activations (:func:`expert_similarity`), then MATCH's gate-vs-up test on the units of each
    pair (and of the shared expert); Fisher over every record. Approximate, as MATCH. The pairing itself is not
    tested: independently trained experts that specialise alike could agree on it."""
    records: list[LayerResult] = []
    for p, ((la, lb), k) in enumerate(zip(pairs, jax.random.split(key, len(pairs)))):
        space = stats.space(p)
        k_experts, k_units, k_shared = jax.random.split(k, 3)
        w = {
            proj: (_layer(params_a, f"expert_{proj}", la), _layer(params_b, f"expert_{proj}", lb))
            for proj in ("gate", "up")
        }
        similarity = sum(np.asarray(expert_similarity(*w[proj], space), np.float64) for proj in ("gate", "up"))
        rows, cols = assignment.solve_lap(similarity, maximize=True, key=k_experts)
        for i, j, kk in zip(rows, cols, jax.random.split(k_units, len(rows))):
            d_gate, d_up = (_distances((w[proj][0][i], w[proj][1][j]), space) for proj in ("gate", "up"))
            records.append(
                match.match_units(d_gate, d_up, kk).record(la, lb, part="expert", expert_a=int(i), expert_b=int(j))
            )
        if "up" in params_a["layers"] and "up" in params_b["layers"]:
            d_gate, d_up = (
                _distances((_layer(params_a, proj, la), _layer(params_b, proj, lb)), space) for proj in ("gate", "up")
            )
            records.append(match.match_units(d_gate, d_up, k_shared).record(la, lb, part="shared"))
    return fisher_result("match", records, exact=False, note=MATCH_NOTE, num_tokens=int(stats.count))
