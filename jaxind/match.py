"""MATCH: the unconstrained-setting test that matches hidden-unit activations (DESIGN.md §1).

For a pair of layers ``(i, j)`` (layer ``i`` of model A, layer ``j`` of model B) MATCH takes the
MLP gate activations ``G_A (h_A, N)``, ``G_B (h_B, N)`` and up activations ``U_A``, ``U_B`` over the
same ``N`` tokens, solves two linear assignment problems on squared Euclidean distances
``D[a, b] = ||G_A[a]||^2 + ||G_B[b]||^2 - 2 <G_A[a], G_B[b]>``, ``pi_gate = LAP(D_gate)`` and
``pi_up = LAP(D_up)``, and tests the two matchings against each other with a two-sided Spearman
test. Per-layer p-values are combined with Fisher's method.

Performance (DESIGN.md §4): the data are read **once** for both models together. Each batch runs
both forwards (activation-only, no LM head), and a jitted step adds the Grams of the MLPs' normed
*inputs* (``d_A x d_B`` per layer pair, ``d x d`` per layer) to a running state; since gate and
up outputs are linear in that input, their ``h_A x h_B`` Grams are derived exactly afterwards, one
layer pair at a time (:class:`PassStats`). No token's activations are stored. :func:`match_test_slow` is the naive baseline (the data re-run per
layer and per projection, activations stored) kept for the benchmark and for cross-checks.

Rectangular pairs (``h_A != h_B``, e.g. a pruned model) are handled by the rectangular LAP: every
unit of the narrower model is matched to a distinct unit of the wider one, and the Spearman test
runs over the narrower model's units on the wider model's matched indices.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import model as model_lib
from jaxind.config import ModelConfig
from jaxind.errors import JaxindError

Params = dict[str, Any]
# --------------------------------------------------------------------------------------------
# One-pass accumulation
# --------------------------------------------------------------------------------------------
#
# Gate and up activations are linear in the MLP's normed input x (B*T, d):  G = x W_gate,
# U = x W_up. So every Gram statistic MATCH and CSH need follows from Grams of the inputs:
#   G_A^T G_B = W_gate_A^T (x_A^T x_B) W_gate_B,   ||G_A[:, i]||^2 = diag(W_A^T (x_A^T x_A) W_A)_i.
# The pass therefore accumulates one d_A x d_B input cross-Gram per layer pair, plus each unit's
# sum of squared outputs (h-vectors; gate and up are computed by the forward pass anyway), instead
# of two h_A x h_B output Grams: for Llama-2-7B (d = 4,096, h = 11,008) 14x less memory and 14x
# fewer multiply-adds per token. The h x h Grams are formed one layer pair at a time, on the
# device, when the LAPs need them (:meth:`PassStats.grams`).


@dataclasses.dataclass
class PassStats:
    """What one pass over the data accumulated, and how to turn it into hidden-unit Grams.

    Attributes:
      cross: ``(*pair_shape, d_A, d_B)`` sums over tokens of ``x_A x_B^T`` per layer pair
        (pair_shape ``(P,)`` for explicit pairs, ``(n_a, n_b)`` for all pairs).
      sq_a, sq_b: ``{"gate": (n_a, h_A), "up": (n_a, h_A)}`` (and ``n_b, h_B``): each unit's sum
        of squared outputs per collected layer.
      count: number of tokens counted.
      weights_a, weights_b: per collected layer ``{"gate": (d, h), "up": (d, h)}`` (references
        into the param trees, not copies).
      pair_index: for explicit pairs, ``(ia, ib)`` positions of each pair in the collected layers.
    """

    cross: jax.Array
    sq_a: dict[str, np.ndarray]
    sq_b: dict[str, np.ndarray]
    count: float
    weights_a: tuple[dict[str, jax.Array], ...]
    weights_b: tuple[dict[str, jax.Array], ...]
    pair_index: tuple[tuple[int, int], ...] = ()

    def grams(self, pair: int | tuple[int, int], proj: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cross (h_A, h_B), sq_norm_a (h_A,), sq_norm_b (h_B,))`` of projection ``proj``
        ("gate" or "up") for a pair: an index into the explicit pairs, or ``(ia, ib)`` for all-pairs
        statistics. Sums over the counted tokens, as float64 numpy."""
        if isinstance(pair, tuple):
            ia, ib = pair
            cross = self.cross[ia, ib]
        else:
            ia, ib = self.pair_index[pair]
            cross = self.cross[pair]
        c = _project(self.weights_a[ia][proj], self.weights_b[ib][proj], cross)
        return (np.asarray(c, np.float64), self.sq_a[proj][ia].astype(np.float64),
                self.sq_b[proj][ib].astype(np.float64))

    def distances(self, pair: int | tuple[int, int], proj: str) -> np.ndarray:
        """Squared Euclidean distances ``(h_A, h_B)`` between hidden units' activation rows."""
        return sq_distances(*self.grams(pair, proj))


@jax.jit
def _project(w_a: jax.Array, w_b: jax.Array, cross: jax.Array) -> jax.Array:
    """Input cross-Gram ``C (d_A, d_B)`` -> output cross-Gram ``W_a^T C W_b (h_A, h_B)``."""
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(jnp.matmul(w_a.astype(jnp.float32).T, cross, precision=hi), w_b.astype(jnp.float32), precision=hi)


def init_state(d_a: int, d_b: int, h_a: int, h_b: int, n_a: int, n_b: int, pair_shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """Zero accumulator: ``{"cross": (*pair_shape, d_a, d_b), "gate_a"/"up_a": (n_a, h_a),
    "gate_b"/"up_b": (n_b, h_b), "count": ()}`` float32."""
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    return {"cross": z((*pair_shape, d_a, d_b)), "gate_a": z((n_a, h_a)), "up_a": z((n_a, h_a)),
            "gate_b": z((n_b, h_b)), "up_b": z((n_b, h_b)), "count": z(())}


def _stack(acts: dict, layers: tuple[int, ...], name: str, mask: jax.Array | None) -> jax.Array:
    """``(n_layers, N, width)`` float32 ``acts[l][name]`` of the collected layers, masked tokens zeroed."""
    out = jnp.stack([acts[l][name].reshape(-1, acts[l][name].shape[-1]) for l in layers]).astype(jnp.float32)
    if mask is not None:
        out = out * mask.reshape(1, -1, 1).astype(jnp.float32)
    return out


@functools.partial(
    jax.jit,
    static_argnames=("cfg_a", "cfg_b", "layers_a", "layers_b", "pair_index", "outer"),
    donate_argnames=("state",),
)
def accumulate_step(
    state: dict[str, jax.Array],
    params_a: Params,
    params_b: Params,
    tokens: jax.Array,
    mask: jax.Array | None,
    *,
    cfg_a: ModelConfig,
    cfg_b: ModelConfig,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
) -> dict[str, jax.Array]:
    """Adds one token batch to the accumulator (jitted; ``state`` is donated).

    Args:
      state: from :func:`init_state`.
      tokens: ``(B, T)`` int token ids, fed to both models.
      mask: ``(B, T)`` bool/0-1 weights of the tokens to count, or None for all.
      layers_a / layers_b: the collected layers of A / B (sorted tuples).
      pair_index: for ``outer=False``, pairs ``(ia, ib)`` of positions into ``layers_a`` /
        ``layers_b``; the cross Gram of pair p is ``state["cross"][p]``.
      outer: accumulate all ``len(layers_a) x len(layers_b)`` pairs instead.

    Returns:
      The updated state.
    """
    hi = jax.lax.Precision.HIGHEST
    _, acts_a = model_lib.forward(params_a, cfg_a, tokens, collect=layers_a, return_logits=False, collect_inputs=True)
    _, acts_b = model_lib.forward(params_b, cfg_b, tokens, collect=layers_b, return_logits=False, collect_inputs=True)
    xa = _stack(acts_a, layers_a, "x", mask)  # (n_a, N, d_a)
    xb = _stack(acts_b, layers_b, "x", mask)  # (n_b, N, d_b)
    if outer:
        cross = jnp.einsum("ind,jne->ijde", xa, xb, precision=hi)
    else:
        ia = jnp.asarray([p[0] for p in pair_index], dtype=jnp.int32)
        ib = jnp.asarray([p[1] for p in pair_index], dtype=jnp.int32)
        cross = jnp.einsum("pnd,pne->pde", xa[ia], xb[ib], precision=hi)
    new = {"cross": state["cross"] + cross}
    for name in ("gate", "up"):
        new[name + "_a"] = state[name + "_a"] + jnp.sum(jnp.square(_stack(acts_a, layers_a, name, mask)), axis=1)
        new[name + "_b"] = state[name + "_b"] + jnp.sum(jnp.square(_stack(acts_b, layers_b, name, mask)), axis=1)
    count = tokens.size if mask is None else jnp.sum(mask.astype(jnp.float32))
    new["count"] = state["count"] + count
    return new


def sq_distances(cross: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(h_A, h_B)`` float64 from a cross Gram ``(h_A, h_B)`` and row
    norms ``(h_A,)``, ``(h_B,)``; clipped at 0 (rounding can make the expansion slightly negative)."""
    d = norm_a.astype(np.float64)[:, None] + norm_b.astype(np.float64)[None, :] - 2.0 * cross.astype(np.float64)
    return np.maximum(d, 0.0)


# --------------------------------------------------------------------------------------------
# Matching and the per-layer statistic
# --------------------------------------------------------------------------------------------


def _solve(cost: np.ndarray, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment with the equivariant random relabelling (ties broken at random)."""
    from jaxind import matching

    rows, cols = matching.solve_lap(cost, maximize=False, key=key)
    return np.asarray(rows), np.asarray(cols)


def match_units(d_gate: np.ndarray, d_up: np.ndarray, key: jax.Array) -> dict[str, Any]:
    """Solves both LAPs for one layer pair and tests the two matchings against each other.

    Args:
      d_gate, d_up: squared distance matrices ``(h_A, h_B)``.
      key: PRNG key (split for the two LAPs' random relabelling).

    Returns:
      ``{"rho", "pvalue", "log10_pvalue", "gate_a", "gate_b", "up_a", "up_b"}``: the Spearman
      statistic and p-value of ``pi_gate`` vs ``pi_up``, and each matching as aligned index arrays
      (``gate_a[k]`` of A matched to ``gate_b[k]`` of B; length ``min(h_A, h_B)``, ordered by the
      narrower model's unit index).
    """
    from jaxind import pvalues

    h_a, h_b = d_gate.shape
    k_gate, k_up = jax.random.split(key)
    out: dict[str, Any] = {}
    vecs = []
    for name, cost, k in (("gate", d_gate, k_gate), ("up", d_up, k_up)):
        rows, cols = _solve(cost, k)
        if h_a <= h_b:  # every unit of A matched; order by A's unit
            order = np.argsort(rows)
            a_idx, b_idx = rows[order], cols[order]
            vecs.append(b_idx)
        else:  # every unit of B matched; order by B's unit
            order = np.argsort(cols)
            a_idx, b_idx = rows[order], cols[order]
            vecs.append(a_idx)
        out[name + "_a"], out[name + "_b"] = a_idx.astype(np.int64), b_idx.astype(np.int64)
    res = pvalues.spearman_test(vecs[0], vecs[1])
    out.update(rho=float(res.rho), pvalue=float(res.pvalue), log10_pvalue=float(res.log10_pvalue))
    return out


def layer_result(layer_a: int, layer_b: int, stat: dict[str, Any], with_units: bool = False) -> dict[str, Any]:
    """JSON-ready per-layer record."""
    out = {"layer_a": int(layer_a), "layer_b": int(layer_b), "pvalue": stat["pvalue"],
           "log10_pvalue": stat["log10_pvalue"], "rho": stat["rho"]}
    if with_units:
        out["matched_units"] = {k: stat[k].tolist() for k in ("gate_a", "gate_b", "up_a", "up_b")}
    return out


def combine(layer_records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Fisher's method over the per-layer p-values (in log space): ``(pvalue, log10_pvalue)``."""
    from jaxind import pvalues

    p, lp = pvalues.fisher_combine(log10_pvalues=np.asarray([r["log10_pvalue"] for r in layer_records]))
    return float(p), float(lp)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def default_layer_pairs(cfg_a: ModelConfig, cfg_b: ModelConfig) -> tuple[tuple[int, int], ...]:
    """Layer ``i`` of A against layer ``i`` of B for ``i < min(L_A, L_B)``."""
    return tuple((i, i) for i in range(min(cfg_a.n_layers, cfg_b.n_layers)))


def _check_pairs(pairs, cfg_a: ModelConfig, cfg_b: ModelConfig) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(a), int(b)) for a, b in pairs)
    if not pairs:
        raise JaxindError("MATCH needs at least one layer pair")
    for a, b in pairs:
        if not (0 <= a < cfg_a.n_layers and 0 <= b < cfg_b.n_layers):
            raise JaxindError(f"layer pair ({a}, {b}) out of range for models with {cfg_a.n_layers} and {cfg_b.n_layers} layers")
    return pairs


def _batches(batches: Iterable) -> Iterable[tuple[jax.Array, jax.Array | None]]:
    """Normalises batches to ``(tokens (B, T), mask (B, T) | None)``."""
    for batch in batches:
        if isinstance(batch, dict):
            yield jnp.asarray(batch["tokens"]), (None if batch.get("mask") is None else jnp.asarray(batch["mask"]))
        elif isinstance(batch, tuple):
            yield jnp.asarray(batch[0]), (None if batch[1] is None else jnp.asarray(batch[1]))
        else:
            yield jnp.asarray(batch), None


def _progress(it, total=None, desc=""):
    try:
        import sys

        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)
    except ImportError:  # pragma: no cover
        return it


def _has_gate(cfg: ModelConfig) -> bool:
    """Whether the family's MLP is gated (every family but GPT-2-style ones)."""
    return cfg.glu


def accumulate(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Iterable,
    *,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
) -> PassStats:
    """One pass over ``batches`` (each ``(B, T)`` tokens, ``(tokens, mask)`` or ``{"tokens", "mask"}``)
    for both models together, accumulating the input Grams; see :class:`PassStats`."""
    for cfg in (cfg_a, cfg_b):
        if not _has_gate(cfg):
            raise JaxindError(f"MATCH needs GLU MLPs (gate and up projections); the {cfg.family!r} family has "
                              "none: use the generalized test (jaxind.generalized) for this pair")
    pair_shape = (len(layers_a), len(layers_b)) if outer else (len(pair_index),)
    state = init_state(cfg_a.d_model, cfg_b.d_model, cfg_a.d_ff, cfg_b.d_ff, len(layers_a), len(layers_b), pair_shape)
    n_batches = 0
    for tokens, mask in _progress(_batches(batches), desc="MATCH pass"):
        state = accumulate_step(state, params_a, params_b, tokens, mask, cfg_a=cfg_a, cfg_b=cfg_b,
                                layers_a=layers_a, layers_b=layers_b, pair_index=pair_index, outer=outer)
        n_batches += 1
    if n_batches == 0:
        raise JaxindError("MATCH got no token batches")
    weights = lambda params, layers: tuple({k: params["layers"][l][k] for k in ("gate", "up")} for l in layers)
    return PassStats(cross=state["cross"],  # stays on the device: the h x h Grams are derived there
                     sq_a={p: np.asarray(state[p + "_a"]) for p in ("gate", "up")},
                     sq_b={p: np.asarray(state[p + "_b"]) for p in ("gate", "up")},
                     count=float(state["count"]), weights_a=weights(params_a, layers_a), weights_b=weights(params_b, layers_b),
                     pair_index=tuple(pair_index))


def match_test(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Iterable,
    *,
    key: jax.Array,
    layer_pairs: Sequence[tuple[int, int]] | None = None,
    return_units: bool = False,
) -> dict[str, Any]:
    """MATCH between models A and B in one pass over the data.

    Args:
      params_a, cfg_a, params_b, cfg_b: the two models (GLU MLPs; widths may differ).
      batches: iterable of token batches ``(B, T)`` int (or ``(tokens, mask)`` / dicts with
        "tokens" and "mask"); consumed once.
      key: PRNG key for the LAPs' random relabelling (ties / equivariance).
      layer_pairs: ``(layer_a, layer_b)`` pairs to test; default ``(i, i)`` for
        ``i < min(L_A, L_B)``.
      return_units: add each pair's matched unit indices (``matched_units``) to its record.

    Returns:
      ``{"test": "match", "pvalue", "log10_pvalue", "layers": [{"layer_a", "layer_b", "pvalue",
      "log10_pvalue", "rho"[, "matched_units"]}], "num_tokens", "seconds", "seconds_pass",
      "seconds_lap"}``.
    """
    start = time.perf_counter()
    pairs = _check_pairs(layer_pairs if layer_pairs is not None else default_layer_pairs(cfg_a, cfg_b), cfg_a, cfg_b)
    layers_a = tuple(sorted({a for a, _ in pairs}))
    layers_b = tuple(sorted({b for _, b in pairs}))
    pair_index = tuple((layers_a.index(a), layers_b.index(b)) for a, b in pairs)
    stats = accumulate(params_a, cfg_a, params_b, cfg_b, batches, layers_a=layers_a, layers_b=layers_b,
                       pair_index=pair_index)
    t_pass = time.perf_counter()
    out = match_from_pass(stats, pairs, key, return_units)
    end = time.perf_counter()
    return {
        "test": "match", **out, "seconds": end - start, "seconds_pass": t_pass - start,
        "seconds_lap": end - t_pass,
    }


def match_from_pass(
    stats: PassStats,
    pairs: Sequence[tuple[int, int]],
    key: jax.Array,
    return_units: bool = False,
) -> dict[str, Any]:
    """MATCH from one pass's statistics (:func:`accumulate` with explicit pairs): per pair, the
    two LAPs and the Spearman test; Fisher over pairs.

    Returns:
      ``{"pvalue", "log10_pvalue", "layers": [...], "num_tokens"}``.
    """
    records = []
    keys = jax.random.split(key, len(pairs))
    for p, (a, b) in enumerate(pairs):
        stat = match_units(stats.distances(p, "gate"), stats.distances(p, "up"), keys[p])
        records.append(layer_result(a, b, stat, return_units))
    pvalue, log10_pvalue = combine(records)
    return {"pvalue": pvalue, "log10_pvalue": log10_pvalue, "layers": records, "num_tokens": int(stats.count)}


def match_from_activations(
    gate_a: jax.Array, up_a: jax.Array, gate_b: jax.Array, up_b: jax.Array, *, key: jax.Array
) -> dict[str, Any]:
    """MATCH for one block from activations given as ``(N, h_A)`` / ``(N, h_B)`` arrays (rows =
    inputs). Used by the generalized test and by anything that already holds activations.

    Returns:
      The :func:`match_units` dict (rho, pvalue, log10_pvalue, matched index arrays).
    """
    def dist(xa, xb):
        xa, xb = jnp.asarray(xa, jnp.float32), jnp.asarray(xb, jnp.float32)
        cross = jnp.matmul(xa.T, xb, precision=jax.lax.Precision.HIGHEST)
        return sq_distances(np.asarray(cross), np.asarray(jnp.sum(xa * xa, 0)), np.asarray(jnp.sum(xb * xb, 0)))

    return match_units(dist(gate_a, gate_b), dist(up_a, up_b), key)


def match_test_slow(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Sequence,
    *,
    key: jax.Array,
    layer_pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Naive baseline for the benchmark: for every layer pair and each projection (gate, up),
    re-run both models over all the data collecting just that layer, store the activations
    ``(N, h)`` and build the distance matrix from them. Same statistic and same LAP keys as
    :func:`match_test`, so results agree up to float rounding.

    ``batches`` must be re-iterable (a list).
    """
    start = time.perf_counter()
    pairs = _check_pairs(layer_pairs if layer_pairs is not None else default_layer_pairs(cfg_a, cfg_b), cfg_a, cfg_b)
    batches = list(_batches(batches))
    records = []
    keys = jax.random.split(key, len(pairs))
    t_lap = 0.0
    for p, (a, b) in enumerate(pairs):
        dists = {}
        for name in ("gate", "up"):
            xa, xb = [], []
            for tokens, mask in batches:
                _, acts_a = model_lib.forward_jit(params_a, cfg_a, tokens, collect=(a,), return_logits=False)
                _, acts_b = model_lib.forward_jit(params_b, cfg_b, tokens, collect=(b,), return_logits=False)
                ga = acts_a[a][name].reshape(-1, cfg_a.d_ff)
                gb = acts_b[b][name].reshape(-1, cfg_b.d_ff)
                if mask is not None:
                    keep = np.asarray(mask).reshape(-1).astype(bool)
                    ga, gb = ga[keep], gb[keep]
                xa.append(np.asarray(ga))
                xb.append(np.asarray(gb))
            xa_all = jnp.asarray(np.concatenate(xa), jnp.float32)
            xb_all = jnp.asarray(np.concatenate(xb), jnp.float32)
            cross = jnp.matmul(xa_all.T, xb_all, precision=jax.lax.Precision.HIGHEST)
            dists[name] = sq_distances(np.asarray(cross), np.asarray(jnp.sum(xa_all**2, 0)), np.asarray(jnp.sum(xb_all**2, 0)))
        t0 = time.perf_counter()
        records.append(layer_result(a, b, match_units(dists["gate"], dists["up"], keys[p])))
        t_lap += time.perf_counter() - t0
    pvalue, log10_pvalue = combine(records)
    end = time.perf_counter()
    return {"test": "match", "pvalue": pvalue, "log10_pvalue": log10_pvalue, "layers": records,
            "seconds": end - start, "seconds_lap": t_lap, "seconds_pass": end - start - t_lap}
