"""Constrained-setting statistics that need no simulation: CSU, CSU-all, CSH (docs/DESIGN.md §1).

CSU (cosine similarity of up-projection weights): per layer, match the hidden units of A and B
(rows of HF's ``up_proj``, columns of jaxind's ``up``) by a linear assignment maximising cosine
similarity. Under H0 the hidden permutation of B is uniform and independent of A, so the
matched permutation is uniform: the two-sided Spearman test of "matched index vs own index"
is a valid per-layer p-value. Layers (independent permutations under H0) are combined with
Fisher's method.

CSH is the same with activations instead of weights: a unit's row is its up-projection output
over the N input tokens (the cross-Gram is accumulated in the one data pass of :mod:`jaxind.stats.grams`).

CSU-all repeats CSU on every 2-D parameter (same path, same shape in both models) along its
output units. Only the MLP hidden axis is a symmetry of the model, so for other tensors the
matched permutation is not guaranteed uniform under H0: CSU-all's p-value is a heuristic
score, flagged as such in the results (``exact: False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.models import model
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.parallel import sharding
from jaxind.stats import assignment, convention, grams, pvalues
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "CSU_ALL_NOTE",
    "cosine_matrix",
    "csh_from_pass",
    "csu",
    "csu_all",
    "layer_cosine_matrix",
    "matched_spearman",
]

CSU_ALL_NOTE = "heuristic: only MLP hidden units are a symmetry, other tensors' matchings need not be uniform under H0"
# Parameters with a vocabulary- or position-sized axis: too large to match, and not hidden units.
_SKIP_ALL = ("embed", "lm_head", "pos_embed")


def _unit_rows(w: jax.Array) -> jax.Array:
    """``(in, out)`` kernel -> ``(out, in)`` rows scaled to unit L2 norm (zero rows stay zero)."""
    rows = jnp.asarray(w, jnp.float32).T
    return rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


@jax.jit
def cosine_matrix(w_a: jax.Array, w_b: jax.Array) -> jax.Array:
    """Cosine similarity of output units: kernels ``(in, h_A)``, ``(in, h_B)`` -> ``(h_A, h_B)``."""
    return jnp.matmul(_unit_rows(w_a), _unit_rows(w_b).T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def layer_cosine_matrix(stack_a: jax.Array, layer_a: jax.Array, stack_b: jax.Array, layer_b: jax.Array) -> jax.Array:
    """:func:`cosine_matrix` of layer ``layer_a`` of stacked kernels ``(L_A, in, h_A)`` against layer ``layer_b``
    of ``(L_B, in, h_B)`` (layer indices traced: one compilation for every pair, no copy of a layer)."""
    return cosine_matrix(stack_a[layer_a], stack_b[layer_b])


def matched_spearman(similarity: np.ndarray, key: jax.Array) -> tuple[pvalues.SpearmanResult, np.ndarray, np.ndarray]:
    """Maximum-similarity matching of ``similarity (h_A, h_B)`` and the Spearman test of the
    matched column index against the row index; returns ``(result, rows, cols)``."""
    rows, cols = assignment.solve_lap(np.asarray(similarity, np.float64), maximize=True, key=key)
    return pvalues.spearman_test(rows, cols), rows, cols


def _check_same_width(cfg_a: ModelConfig, cfg_b: ModelConfig, test: str) -> None:
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(
            f"{test} compares weight rows, so it needs the same residual width (d={cfg_a.d_model} vs {cfg_b.d_model}): "
            "use the unconstrained test --tests=match for models of different shapes"
        )


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
    """CSU: per layer pair, Spearman p-value of the cosine matching of up-projection units;
    Fisher-combined. ``layers``: a layer selection (:mod:`jaxind.models.layer_selection`), default ``(l, l)`` for
    the shared depth."""
    key, layers = convention.key_and_layers("constrained.csu", legacy, key, layers)
    _check_same_width(cfg_a, cfg_b, "CSU")
    if cfg_a.moe or cfg_b.moe:
        raise JaxindError(
            "CSU on a mixture of experts matches experts first: use jaxind.stats.experts.csu (the registry does)"
        )
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "CSU")
    records = []
    for (la, lb), k in zip(pairs, jax.random.split(key, len(pairs))):
        sim = layer_cosine_matrix(params_a["layers"]["up"], la, params_b["layers"]["up"], lb)
        result, _, _ = matched_spearman(sharding.to_host(sim), k)
        records.append(LayerResult.from_spearman(la, lb, result))
    return fisher_result("csu", records, exact=True)


@timed
def csu_all(
    params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig, *legacy: Any, key: Any = None
) -> TestResult:
    """CSU over every 2-D parameter present in both models with the same shape (heuristic); whole models, so no
    ``layers``."""
    new_form = "constrained.csu_all(params_a, cfg_a, params_b, cfg_b, *, key)"
    key = convention.legacy_positional("constrained.csu_all", new_form, legacy, ("key",), {"key": key})["key"]
    key = convention.check_key(key, "constrained.csu_all")
    _check_same_width(cfg_a, cfg_b, "CSU-all")
    leaves_a = _flat_2d(params_a)
    leaves_b = _flat_2d(params_b)
    common = [p for p in leaves_a if p in leaves_b and leaves_a[p].shape == leaves_b[p].shape]
    if not common:
        raise JaxindError("CSU-all found no equally shaped 2-D parameters in the two models")
    records = []
    for path, k in zip(common, jax.random.split(key, len(common))):
        (stack_a, layer), (stack_b, _) = leaves_a[path], leaves_b[path]
        sim = cosine_matrix(stack_a, stack_b) if layer < 0 else layer_cosine_matrix(stack_a, layer, stack_b, layer)
        result, _, _ = matched_spearman(sharding.to_host(sim), k)
        records.append(LayerResult.from_spearman(layer, layer, result, param=path))
    return fisher_result("csu_all", records, exact=False, note=CSU_ALL_NOTE)


class _Matrix(NamedTuple):
    """One 2-D parameter: a top-level leaf (``layer == -1``) or layer ``layer`` of a stacked leaf."""

    leaf: jax.Array
    layer: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.shape[1:] if self.layer >= 0 else self.leaf.shape)


def _flat_2d(params: Params) -> dict[str, _Matrix]:
    """Every 2-D parameter by dotted path (``"layers.3.up"`` for layer 3 of a stacked leaf), except the
    vocabulary- and position-sized ones; layers are indexed when compared, never copied out."""
    out = {}
    for name, leaf in model.flatten_paths(params).items():
        if name.startswith("layers.") and leaf.ndim == 3:
            out.update({f"layers.{l}.{name[len('layers.') :]}": _Matrix(leaf, l) for l in range(leaf.shape[0])})
        elif leaf.ndim == 2 and not name.startswith("layers.") and name not in _SKIP_ALL:
            out[name] = _Matrix(leaf, -1)
    return dict(sorted(out.items(), key=lambda item: (item[1].layer, item[0].rsplit(".", 1)[-1])))  # layer by layer


@timed
def csh_from_pass(stats: grams.PassStats, pairs: Sequence[LayerPair], key: jax.Array) -> TestResult:
    """CSH from one data pass (:class:`jaxind.stats.grams.PassStats` over explicit ``pairs``): per pair,
    the cosine similarity of up-projection activation rows ``U_A[i] . U_B[j] / (|U_A[i]| |U_B[j]|)``
    over the tokens, matched and tested like CSU."""
    records = []
    for p, ((la, lb), k) in enumerate(zip(pairs, jax.random.split(key, len(pairs)))):
        cross, sq_a, sq_b = stats.grams(p, "up")
        denom = np.sqrt(np.maximum(sq_a, 1e-30))[:, None] * np.sqrt(np.maximum(sq_b, 1e-30))[None, :]
        result, _, _ = matched_spearman(cross / denom, k)
        records.append(LayerResult.from_spearman(la, lb, result))
    return fisher_result("csh", records, exact=True, num_tokens=int(stats.count))
