"""Localized testing: MATCH on every layer pair ``(i, j)`` of two models (docs/DESIGN.md §1).

The p-value matrix ``(L_A, L_B)`` shows which layers of B come from which layers of A (models
may differ in depth and MLP width), and the matched unit indices show which hidden units of A a
pruned B kept (paper: Llama-3.1-8B -> Llama-3.2-3B).

**One pass, chunked.** The statistics of all pairs are accumulated while the data stream through
both models once (:mod:`jaxind.stats.grams`): one MLP-input cross-Gram ``d_A x d_B`` per layer pair,
``L_A * L_B * d_A * d_B * 4`` bytes in float32 (the ``h_A x h_B`` unit Grams are derived one pair at
a time when its LAPs run). 4 x 3 layers of width 32 take 49 KB; Llama-3.1-8B (32 layers, d = 4096)
vs Llama-3.2-3B (28 layers, d = 3072) would take 45 GB. When the estimate exceeds
``memory_budget_bytes`` the B layers are split into chunks of
``max(1, budget // (L_A * d_A * d_B * 4))`` layers, one pass over the data per chunk
(``num_passes`` in the result); peak accumulator memory is then at most the budget, or one B
layer's worth (``L_A * d_A * d_B * 4`` bytes: 1.6 GB for the Llama pair, so the default 2 GiB
budget makes 28 passes; a smaller set of A layers per call, ``layers_a``, makes fewer).

**Threshold.** A layer pair is called dependent when its p-value passes Bonferroni over the
whole matrix: ``p_ij < alpha / (L_A * L_B)``. This bounds the family-wise error rate (any false
pair anywhere in the matrix) by ``alpha`` whatever the dependence between entries, so the layer
map of two independent models is empty with probability at least ``1 - alpha``. (The per-pair
p-values of MATCH are approximate, as in the paper; dependent pairs give p-values far below any
such threshold, e.g. log10 p < -100 for h = 64.) The overall ``pvalue`` is the Bonferroni-adjusted
minimum, a valid global test of "some layer of B depends on some layer of A".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.io import destinations
from jaxind.models.config import ModelConfig
from jaxind.models.layers import check_pairs
from jaxind.stats import grams, pvalues
from jaxind.stats.match import NOTE, UnitMatch, match_units
from jaxind.stats.results import TestResult, timed
from jaxind.types import LayerPair, Params

Batches = Sequence[Any] | Callable[[], Iterable[Any]]


def pair_memory_bytes(cfg_a: ModelConfig, cfg_b: ModelConfig, n_a: int | None = None, n_b: int | None = None) -> int:
    """Bytes of the float32 accumulator for ``n_a x n_b`` layer pairs (default all): the MLP-input
    cross Grams ``d_A x d_B`` per pair (see :class:`jaxind.stats.grams.PassStats`)."""
    n_a = cfg_a.n_layers if n_a is None else n_a
    n_b = cfg_b.n_layers if n_b is None else n_b
    return n_a * n_b * cfg_a.d_model * cfg_b.d_model * 4


def _iterate(batches: Batches) -> Iterable[Any]:
    return batches() if callable(batches) else batches


def _chunks(
    cfg_a: ModelConfig, cfg_b: ModelConfig, la: tuple[int, ...], lb: tuple[int, ...], budget: int, batches: Batches
) -> list[tuple[int, ...]]:
    """The B layers split into chunks whose accumulator fits ``budget`` bytes (one pass each).

    Raises:
      JaxindError: several passes are needed but ``batches`` can be iterated only once.
    """
    per_b_layer = pair_memory_bytes(cfg_a, cfg_b, len(la), 1)
    chunk = max(1, min(len(lb), budget // max(per_b_layer, 1)))
    chunks = [lb[i : i + chunk] for i in range(0, len(lb), chunk)]
    if len(chunks) > 1 and not callable(batches) and iter(batches) is batches:
        raise JaxindError("localized testing needs several passes here; pass batches as a list or a callable")
    return chunks


@dataclasses.dataclass
class _Matrix:
    """Every layer pair's matchings and p-values (rows: layers of A, columns: layers of B)."""

    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    matches: dict[LayerPair, UnitMatch]
    log10: np.ndarray
    rho: np.ndarray
    num_tokens: int = 0


def _all_pairs(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Batches,
    key: jax.Array,
    la: tuple[int, ...],
    lb: tuple[int, ...],
    chunks: list[tuple[int, ...]],
) -> _Matrix:
    """MATCH on every pair of ``la x lb``, one pass over the data per chunk of B layers."""
    out = _Matrix(la, lb, {}, np.zeros((len(la), len(lb))), np.zeros((len(la), len(lb))))
    keys = jax.random.split(key, len(la) * len(lb)).reshape(len(la), len(lb))
    for sub_b in progress.bar(chunks, total=len(chunks), desc="localized passes"):
        stats = grams.accumulate(
            params_a, cfg_a, params_b, cfg_b, _iterate(batches), layers_a=la, layers_b=sub_b, outer=True
        )
        out.num_tokens = int(stats.count)
        for jb, b in enumerate(sub_b):
            col = lb.index(b)
            for ia, a in enumerate(la):
                unit_match = match_units(
                    stats.distances((ia, jb), "gate"), stats.distances((ia, jb), "up"), keys[ia, col]
                )
                out.matches[(a, b)] = unit_match
                out.log10[ia, col] = unit_match.spearman.log10_pvalue
                out.rho[ia, col] = unit_match.spearman.rho
    return out


def _layer_map(matrix: _Matrix, threshold: float) -> tuple[dict[str, int | None], list[dict[str, Any]]]:
    """Per layer of B, the layer of A with the smallest p-value if it passes ``threshold`` (log10),
    and that pair's matched units."""
    layer_map: dict[str, int | None] = {}
    matched_units = []
    for col, b in enumerate(matrix.layers_b):
        best = int(np.argmin(matrix.log10[:, col]))
        if matrix.log10[best, col] >= threshold:
            layer_map[str(b)] = None
            continue
        a = matrix.layers_a[best]
        layer_map[str(b)] = a
        m = matrix.matches[(a, b)]
        up_map = dict(zip(m.up_b.tolist(), m.up_a.tolist()))
        agree = float(np.mean([up_map.get(ub) == ua for ua, ub in zip(m.gate_a.tolist(), m.gate_b.tolist())]))
        matched_units.append(
            {
                "layer_a": a,
                "layer_b": b,
                "units_a": m.gate_a.tolist(),
                "units_b": m.gate_b.tolist(),
                "up_agreement": agree,
            }
        )
    return layer_map, matched_units


@timed
def localized_test(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Batches,
    *,
    key: jax.Array,
    alpha: float = 0.01,
    layers_a: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    memory_budget_bytes: int = 2 * 2**30,
    heatmap_path: str | os.PathLike | None = None,
    labels: tuple[str, str] = ("model A", "model B"),
) -> TestResult:
    """MATCH on every layer pair of A and B.

    Args:
      params_a, cfg_a, params_b, cfg_b: the models (GLU MLPs; depth and width may differ).
      batches: token batches ``(B, T)`` (see :func:`jaxind.stats.match.match_test`); a list, or a
        zero-argument callable returning a fresh iterable (needed only if the Grams are chunked
        into several passes).
      key: PRNG key for the LAPs.
      alpha: family-wise error rate for the layer map (Bonferroni over ``L_A * L_B`` pairs).
      layers_a, layers_b: restrict to these layers (default all).
      memory_budget_bytes: bound on the cross-Gram accumulator; above it, B layers are chunked.
      heatmap_path: where to write the heatmap PNG (e.g. next to the results JSON, see
        :func:`heatmap_path_for`); None writes nothing.
      labels: axis labels for the heatmap.

    Returns:
      A :class:`TestResult` (``combine="bonferroni_min"``, ``statistic``: the smallest log10 p)
      with a record per pair (row-major over ``(layer_a, layer_b)``) and ``extra``:
      ``layers_a``, ``layers_b``, ``log10_pvalue_matrix`` ``(n_a, n_b)`` nested list,
      ``rho_matrix``, ``threshold_log10``, ``alpha``, ``layer_map`` ``{str(layer_b): layer_a or
      None}``, ``matched_units`` ``[{"layer_a", "layer_b", "units_a", "units_b", "up_agreement"}]``,
      ``num_passes``, ``memory_bytes``, ``num_tokens``, ``heatmap``. ``units_a[k]`` is the unit of A
      matched (gate LAP) to unit ``units_b[k]`` of B; when B is the narrower model ``units_b``
      is ``0..h_B-1`` and ``units_a`` lists the A units B kept. ``up_agreement`` is the fraction of
      units on which the up matching agrees with the gate matching.
    """
    la = tuple(range(cfg_a.n_layers)) if layers_a is None else tuple(sorted({int(l) for l in layers_a}))
    lb = tuple(range(cfg_b.n_layers)) if layers_b is None else tuple(sorted({int(l) for l in layers_b}))
    check_pairs([(a, b) for a in la for b in lb], cfg_a, cfg_b, "localized testing")
    if not 0 < alpha < 1:
        raise JaxindError(f"alpha must lie in (0, 1), got {alpha}")
    chunks = _chunks(cfg_a, cfg_b, la, lb, memory_budget_bytes, batches)
    matrix = _all_pairs(params_a, cfg_a, params_b, cfg_b, batches, key, la, lb, chunks)
    n_pairs = len(la) * len(lb)
    threshold = math.log10(alpha) - math.log10(n_pairs)
    layer_map, matched_units = _layer_map(matrix, threshold)
    min_log10 = float(matrix.log10.min())
    log10_p = min(0.0, min_log10 + math.log10(n_pairs))
    heatmap = None if heatmap_path is None else plot_heatmap(matrix.log10, la, lb, threshold, heatmap_path, labels)
    return TestResult(
        test="localized",
        pvalue=pvalues.pow10(log10_p),
        log10_pvalue=log10_p,
        exact=False,
        statistic=min_log10,
        layers=tuple(matrix.matches[(a, b)].record(a, b) for a in la for b in lb),
        combine="bonferroni_min",
        note=NOTE,
        extra={
            "layers_a": list(la),
            "layers_b": list(lb),
            "log10_pvalue_matrix": matrix.log10.tolist(),
            "rho_matrix": matrix.rho.tolist(),
            "threshold_log10": threshold,
            "alpha": alpha,
            "layer_map": layer_map,
            "matched_units": matched_units,
            "num_passes": len(chunks),
            "memory_bytes": pair_memory_bytes(cfg_a, cfg_b, len(la), len(chunks[0])),
            "num_tokens": matrix.num_tokens,
            "heatmap": heatmap,
        },
    )


def heatmap_path_for(json_path: str | os.PathLike) -> str:
    """``results/pair.json`` -> ``results/pair_localized.png`` (the heatmap next to the JSON)."""
    root, _ = os.path.splitext(os.fspath(json_path))
    return root + "_localized.png"


def plot_heatmap(
    log10_matrix: Any,
    layers_a: Sequence[int],
    layers_b: Sequence[int],
    threshold_log10: float,
    path: str | os.PathLike,
    labels: tuple[str, str] = ("model A", "model B"),
) -> str:
    """Writes the ``-log10 p`` matrix ``(n_a, n_b)`` of localized testing as a PNG (Agg backend);
    pairs passing the threshold (log10 p below ``threshold_log10``) are outlined. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mat = -np.asarray(log10_matrix, dtype=np.float64)
    shown = np.minimum(mat, 50.0)  # clip extreme evidence so weak structure stays visible
    la, lb = list(layers_a), list(layers_b)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(lb), 1.0 + 0.35 * len(la)), dpi=100)
    im = ax.imshow(shown, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(shown.max()), -threshold_log10))
    ax.set_xticks(range(len(lb)), [str(l) for l in lb], fontsize=7)
    ax.set_yticks(range(len(la)), [str(l) for l in la], fontsize=7)
    ax.set_xlabel(f"layer of {labels[1]}")
    ax.set_ylabel(f"layer of {labels[0]}")
    ax.set_title("MATCH -log10 p (clipped at 50)", fontsize=9)
    hits = np.argwhere(-mat < threshold_log10)
    for i, j in hits:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = os.fspath(path)
    try:
        destinations.write_file(path, lambda tmp: fig.savefig(tmp, format="png"), "--output (its heatmap)")
    finally:
        plt.close(fig)
    return path
