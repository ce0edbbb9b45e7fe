"""MATCH: the unconstrained-setting test that matches hidden-unit activations (docs/DESIGN.md §1).

For a pair of layers ``(i, j)`` (layer ``i`` of model A, layer ``j`` of model B) MATCH takes the
MLP gate activations ``G_A (h_A, N)``, ``G_B (h_B, N)`` and up activations ``U_A``, ``U_B`` over the
same ``N`` tokens, solves two linear assignment problems on squared Euclidean distances
``D[a, b] = ||G_A[a]||^2 + ||G_B[b]||^2 - 2 <G_A[a], G_B[b]>``, ``pi_gate = LAP(D_gate)`` and
``pi_up = LAP(D_up)``, and tests the two matchings against each other with a two-sided Spearman
test. Per-layer p-values are combined with Fisher's method.

The distances come from one pass over the data for both models (:mod:`jaxind.stats.grams`):
:func:`match_test` runs the pass, :func:`match_from_pass` tests given pass statistics (CSH and
MATCH share one pass in the runner). :func:`match_test_slow` is the naive baseline (the data
re-run per layer and per projection, activations stored) kept for the benchmark and for
cross-checks.

Rectangular pairs (``h_A != h_B``, e.g. a pruned model) are handled by the rectangular LAP: every
unit of the narrower model is matched to a distinct unit of the wider one, and the Spearman test
runs over the narrower model's units on the wider model's matched indices.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.models import model as model_lib
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.stats import assignment, convention, grams, pvalues
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "NOTE",
    "PREFETCH",
    "UnitMatch",
    "match_from_activations",
    "match_from_pass",
    "match_test",
    "match_test_slow",
    "match_units",
]

PREFETCH = 2  # pairs whose Grams are computed ahead of the LAPs
NOTE = "approximate, as in the paper: Spearman's t approximation on LAP matchings, calibrated in simulation"


@dataclasses.dataclass(frozen=True)
class UnitMatch:
    """Both matchings of one layer pair and the Spearman test of one against the other.

    Attributes:
      spearman: the test of ``pi_gate`` vs ``pi_up``.
      gate_a, gate_b: the gate matching as aligned index arrays (unit ``gate_a[k]`` of A matched
        to unit ``gate_b[k]`` of B; length ``min(h_A, h_B)``, ordered by the narrower model's unit).
      up_a, up_b: the up matching, likewise.
    """

    spearman: pvalues.SpearmanResult
    gate_a: np.ndarray
    gate_b: np.ndarray
    up_a: np.ndarray
    up_b: np.ndarray

    def record(self, layer_a: int, layer_b: int, with_units: bool = False, **extra: Any) -> LayerResult:
        """The layer record; ``with_units`` adds ``matched_units`` (the four index lists)."""
        if with_units:
            extra["matched_units"] = {k: getattr(self, k).tolist() for k in ("gate_a", "gate_b", "up_a", "up_b")}
        return LayerResult.from_spearman(layer_a, layer_b, self.spearman, **extra)


def match_units(d_gate: np.ndarray, d_up: np.ndarray, key: jax.Array) -> UnitMatch:
    """Solves both LAPs for one layer pair and tests the two matchings against each other.

    Args:
      d_gate, d_up: squared distance matrices ``(h_A, h_B)``.
      key: PRNG key (split for the two LAPs' random relabelling).
    """
    h_a, h_b = d_gate.shape
    k_gate, k_up = jax.random.split(key)
    matched: dict[str, np.ndarray] = {}
    vecs = []
    for name, cost, k in (("gate", d_gate, k_gate), ("up", d_up, k_up)):
        rows, cols = assignment.solve_lap(cost, maximize=False, key=k)
        order = np.argsort(rows) if h_a <= h_b else np.argsort(cols)  # by the narrower model's unit
        a_idx, b_idx = rows[order], cols[order]
        vecs.append(b_idx if h_a <= h_b else a_idx)
        matched[name + "_a"], matched[name + "_b"] = a_idx.astype(np.int64), b_idx.astype(np.int64)
    return UnitMatch(spearman=pvalues.spearman_test(vecs[0], vecs[1]), **matched)


@timed
def match_test(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Iterable[Any],
    *,
    key: jax.Array,
    layers: Layers = None,
    return_units: bool = False,
    layer_pairs: Layers = None,
) -> TestResult:
    """MATCH between models A and B in one pass over the data.

    Args:
      params_a, cfg_a, params_b, cfg_b: the two models (GLU MLPs; widths may differ).
      batches: iterable of token batches ``(B, T)`` int (or ``(tokens, mask)`` / dicts with
        "tokens" and "mask"); consumed once.
      key: PRNG key for the LAPs' random relabelling (ties / equivariance).
      layers: a layer selection (:mod:`jaxind.models.layer_selection`); default ``(i, i)`` for
        ``i < min(L_A, L_B)``.
      return_units: add each pair's matched unit indices (``matched_units``) to its record.
      layer_pairs: the old name of ``layers`` (a DeprecationWarning; removed in the next release).

    Returns:
      The Fisher-combined :class:`TestResult`; ``extra`` has ``num_tokens``, ``seconds_pass`` (the
      data pass) and ``seconds_lap`` (LAPs and tests).
    """
    layers = convention.renamed("match.match_test", "layer_pairs", "layers", layer_pairs, layers)
    key = convention.check_key(key, "match.match_test")
    start = time.perf_counter()
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "MATCH")
    layers_a = tuple(sorted({a for a, _ in pairs}))
    layers_b = tuple(sorted({b for _, b in pairs}))
    pair_index = tuple((layers_a.index(a), layers_b.index(b)) for a, b in pairs)
    stats = grams.accumulate(
        params_a, cfg_a, params_b, cfg_b, batches, layers_a=layers_a, layers_b=layers_b, pair_index=pair_index
    )
    seconds_pass = time.perf_counter() - start
    result = match_from_pass(stats, pairs, key, return_units)
    return result.replace(extra={**result.extra, "seconds_pass": seconds_pass, "seconds_lap": result.seconds})


@timed
def match_from_pass(
    stats: grams.PassStats, pairs: Sequence[LayerPair], key: jax.Array, return_units: bool = False
) -> TestResult:
    """MATCH from one pass's statistics (:func:`jaxind.stats.grams.accumulate` with explicit pairs):
    per pair, the two LAPs and the Spearman test; Fisher over pairs. ``extra``: ``num_tokens``."""
    records = []
    keys = jax.random.split(key, len(pairs))
    seconds_grams = seconds_lap = 0.0
    # the Grams of the next PREFETCH pairs are dispatched (asynchronous) before this pair's LAPs run on the host
    pending = collections.deque(stats.project_both(p) for p in range(min(PREFETCH, len(pairs))))
    for p, (a, b) in enumerate(pairs):
        start = time.perf_counter()
        if p + PREFETCH < len(pairs):
            pending.append(stats.project_both(p + PREFETCH))
        d_gate, d_up = stats.distances_from(p, pending.popleft())
        middle = time.perf_counter()
        unit_match = match_units(d_gate, d_up, keys[p])
        records.append(unit_match.record(a, b, return_units))
        seconds_grams += middle - start
        seconds_lap += time.perf_counter() - middle
    return fisher_result(
        "match",
        records,
        exact=False,
        note=NOTE,
        num_tokens=int(stats.count),
        seconds_grams=seconds_grams,
        seconds_lap=seconds_lap,
    )


def match_from_activations(gate_a: Any, up_a: Any, gate_b: Any, up_b: Any, *, key: jax.Array) -> UnitMatch:
    """MATCH for one block from activations given as ``(N, h_A)`` / ``(N, h_B)`` arrays (rows =
    inputs). Used by the generalized test and by anything that already holds activations."""
    return match_units(grams.row_distances(gate_a, gate_b), grams.row_distances(up_a, up_b), key)


@timed
def match_test_slow(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Sequence[Any],
    *,
    key: jax.Array,
    layers: Layers = None,
    layer_pairs: Layers = None,
) -> TestResult:
    """Naive baseline for the benchmark: for every layer pair and each projection (gate, up),
    re-run both models over all the data collecting just that layer, store the activations
    ``(N, h)`` and build the distance matrix from them. Same statistic and same LAP keys as
    :func:`match_test`, so results agree up to float rounding. ``extra``: ``seconds_pass`` (the
    data passes) and ``seconds_lap`` (LAPs and tests), as for :func:`match_test`.

    ``batches`` must be re-iterable (a list).
    """
    layers = convention.renamed("match.match_test_slow", "layer_pairs", "layers", layer_pairs, layers)
    start = time.perf_counter()
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "MATCH")
    token_batches = list(grams.normalize_batches(batches))
    records = []
    keys = jax.random.split(key, len(pairs))
    t_lap = 0.0
    for p, (a, b) in enumerate(pairs):
        dists = {
            name: grams.row_distances(*_stored_activations(params_a, cfg_a, params_b, cfg_b, token_batches, a, b, name))
            for name in ("gate", "up")
        }
        t0 = time.perf_counter()
        records.append(match_units(dists["gate"], dists["up"], keys[p]).record(a, b))
        t_lap += time.perf_counter() - t0
    seconds_pass = time.perf_counter() - start - t_lap
    return fisher_result("match", records, exact=False, note=NOTE, seconds_pass=seconds_pass, seconds_lap=t_lap)


def _stored_activations(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    token_batches: Sequence[grams.Batch],
    layer_a: int,
    layer_b: int,
    name: str,
) -> tuple[jax.Array, jax.Array]:
    """Activations ``(N, h_A)``, ``(N, h_B)`` of projection ``name`` of one layer of each model over
    all batches (masked tokens dropped), each batch run again: the slow baseline's data pass."""
    xa, xb = [], []
    for tokens, mask, attention in token_batches:
        _, acts_a = model_lib.forward_jit(
            params_a, cfg_a, tokens, collect=(layer_a,), return_logits=False, attention_mask=attention
        )
        _, acts_b = model_lib.forward_jit(
            params_b, cfg_b, tokens, collect=(layer_b,), return_logits=False, attention_mask=attention
        )
        ga = acts_a[layer_a][name].reshape(-1, cfg_a.d_ff)
        gb = acts_b[layer_b][name].reshape(-1, cfg_b.d_ff)
        if mask is not None:
            keep = np.asarray(mask).reshape(-1).astype(bool)
            ga, gb = ga[keep], gb[keep]
        xa.append(np.asarray(ga))
        xb.append(np.asarray(gb))
    return jnp.asarray(np.concatenate(xa), jnp.float32), jnp.asarray(np.concatenate(xb), jnp.float32)
