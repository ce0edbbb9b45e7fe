"""Constrained-setting statistics that need no simulation: CSU, CSU-all, CSH; and JSD.

CSU (cosine similarity of up-projection weights): per layer, match the hidden units of A and B
(rows of HF's ``up_proj``, columns of jaxind's ``up``) by a linear assignment maximising cosine
similarity. Under H0 the hidden permutation of B is uniform and independent of A, so the
matched permutation is uniform: the two-sided Spearman test of "matched index vs own index"
is a valid per-layer p-value. Layers (independent permutations under H0) are combined with
Fisher's method.

CSH is the same with activations instead of weights: a unit's row is its up-projection output
over the N input tokens (the cross-Gram is accumulated in the one data pass of :mod:`match`).

CSU-all repeats CSU on every 2-D parameter (same path, same shape in both models) along its
output units. Only the MLP hidden axis is a symmetry of the model, so for other tensors the
matched permutation is not guaranteed uniform under H0: CSU-all's p-value is a heuristic
score, flagged as such in the results (``exact: False``).

JSD (Jensen-Shannon divergence of next-token distributions) is invariant under the symmetry
group, so no test can be built on it here: it is reported as a number, not a p-value.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import matching, model, pvalues
from jaxind.config import ModelConfig
from jaxind.errors import JaxindError

Params = dict[str, Any]
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


def matched_spearman(similarity: np.ndarray, key: jax.Array) -> tuple[pvalues.SpearmanResult, np.ndarray, np.ndarray]:
    """Maximum-similarity matching of ``similarity (h_A, h_B)`` and the Spearman test of the
    matched column index against the row index; returns ``(result, rows, cols)``."""
    rows, cols = matching.solve_lap(np.asarray(similarity, np.float64), maximize=True, key=key)
    return pvalues.spearman_test(rows, cols), rows, cols


def _layer_record(layer_a: int, layer_b: int, result: pvalues.SpearmanResult, **extra) -> dict[str, Any]:
    return {"layer_a": layer_a, "layer_b": layer_b, "pvalue": result.pvalue, "log10_pvalue": result.log10_pvalue,
            "rho": result.rho, **extra}


def _combined(records: list[dict[str, Any]], start: float, **extra) -> dict[str, Any]:
    combined = pvalues.fisher_combine(log10_pvalues=[r["log10_pvalue"] for r in records])
    return {"pvalue": combined.pvalue, "log10_pvalue": combined.log10_pvalue, "layers": records,
            "combine": "fisher", "seconds": time.perf_counter() - start, **extra}


def _check_same_width(cfg_a: ModelConfig, cfg_b: ModelConfig, test: str) -> None:
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(
            f"{test} compares weight rows, so it needs the same residual width (d={cfg_a.d_model} vs {cfg_b.d_model}): "
            "use the unconstrained test --tests=match for models of different shapes"
        )


def csu(params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig, key: jax.Array,
        layers: Iterable[tuple[int, int]] | None = None) -> dict[str, Any]:
    """CSU: per layer pair, Spearman p-value of the cosine matching of up-projection units;
    Fisher-combined. ``layers`` defaults to ``(l, l)`` for the shared depth."""
    start = time.perf_counter()
    _check_same_width(cfg_a, cfg_b, "CSU")
    pairs = list(layers) if layers is not None else [(l, l) for l in range(min(cfg_a.n_layers, cfg_b.n_layers))]
    records = []
    for (la, lb), k in zip(pairs, jax.random.split(key, len(pairs))):
        sim = cosine_matrix(params_a["layers"][la]["up"], params_b["layers"][lb]["up"])
        result, _, _ = matched_spearman(np.asarray(sim), k)
        records.append(_layer_record(la, lb, result))
    return _combined(records, start, exact=True)


def csu_all(params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig, key: jax.Array) -> dict[str, Any]:
    """CSU over every 2-D parameter present in both models with the same shape (heuristic)."""
    start = time.perf_counter()
    _check_same_width(cfg_a, cfg_b, "CSU-all")
    leaves_a = _flat_2d(params_a)
    leaves_b = _flat_2d(params_b)
    common = [p for p in leaves_a if p in leaves_b and leaves_a[p].shape == leaves_b[p].shape]
    if not common:
        raise JaxindError("CSU-all found no equally shaped 2-D parameters in the two models")
    records = []
    for path, k in zip(common, jax.random.split(key, len(common))):
        result, _, _ = matched_spearman(np.asarray(cosine_matrix(leaves_a[path], leaves_b[path])), k)
        layer = int(path.split(".")[1]) if path.startswith("layers.") else -1
        records.append(_layer_record(layer, layer, result, param=path))
    return _combined(records, start, exact=False,
                     note="heuristic: only MLP hidden units are a symmetry, other tensors' matchings need not be uniform under H0")


def _flat_2d(params: Params) -> dict[str, jax.Array]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if leaf.ndim == 2 and name.split(".")[0] not in _SKIP_ALL:
            out[name] = leaf
    return out


def csh_from_pass(stats: Any, pairs: list[tuple[int, int]], key: jax.Array, start: float) -> dict[str, Any]:
    """CSH from one data pass (:class:`jaxind.match.PassStats` over explicit ``pairs``): per pair,
    the cosine similarity of up-projection activation rows ``U_A[i] . U_B[j] / (|U_A[i]| |U_B[j]|)``
    over the tokens, matched and tested like CSU."""
    records = []
    for p, ((la, lb), k) in enumerate(zip(pairs, jax.random.split(key, len(pairs)))):
        cross, sq_a, sq_b = stats.grams(p, "up")
        denom = np.sqrt(np.maximum(sq_a, 1e-30))[:, None] * np.sqrt(np.maximum(sq_b, 1e-30))[None, :]
        result, _, _ = matched_spearman(cross / denom, k)
        records.append(_layer_record(la, lb, result))
    return _combined(records, start, exact=True)


@jax.jit
def _jsd_sum(logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over positions (weighted by ``mask (B, T)``) of the JSD (bits) of two next-token
    distributions ``(B, T, V)``."""
    la = jax.nn.log_softmax(logits_a, axis=-1)
    lb = jax.nn.log_softmax(logits_b, axis=-1)
    lm = jnp.logaddexp(la, lb) - jnp.log(2.0)
    kl_a = jnp.sum(jnp.exp(la) * (la - lm), axis=-1)
    kl_b = jnp.sum(jnp.exp(lb) * (lb - lm), axis=-1)
    return jnp.sum(0.5 * (kl_a + kl_b) * mask) / jnp.log(2.0)


def jsd(logits_fn_a: Callable, logits_fn_b: Callable, batches: Iterable[tuple[np.ndarray, np.ndarray]], vocab: int) -> dict[str, Any]:
    """Mean Jensen-Shannon divergence (bits, in [0, 1]) of the next-token distributions over
    all positions; distributions are restricted to the shared vocabulary prefix ``[0, vocab)``.

    ``batches``: ``(tokens (B, T), mask (B, T))`` pairs (see :func:`jaxind.data.batches`)."""
    start = time.perf_counter()
    total, count = 0.0, 0.0
    for tokens, mask in batches:
        total += float(_jsd_sum(logits_fn_a(tokens)[..., :vocab], logits_fn_b(tokens)[..., :vocab], jnp.asarray(mask)))
        count += float(mask.sum())
    return {"pvalue": None, "log10_pvalue": None, "statistic": total / count, "seconds": time.perf_counter() - start,
            "exact": False, "note": "JSD is invariant under the symmetry group: a similarity number, not a test"}


def forward_logits(params: Params, cfg: ModelConfig) -> Callable[[np.ndarray], jax.Array]:
    """``tokens -> logits`` for a param tree (jitted)."""
    return lambda tokens: model.forward_jit(params, cfg, jnp.asarray(tokens, jnp.int32))[0]
