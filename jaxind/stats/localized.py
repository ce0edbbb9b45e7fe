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

**Depth changes.** Several layers of B may map to one layer of A (depth up-scaling, block
duplication): ``duplicated_layers`` names those A layers. Above ``SCREEN_MIN_PAIRS`` pairs a cheap
screen (:mod:`jaxind.stats.layer_screen`) picks the pairs whose LAPs are solved; the threshold still
divides by all pairs, so the map and the overall p-value stay valid (see that module for what the
screen can and cannot lose). :func:`localized_parents` attributes the layers of a layer-stacked
merge to its parents.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.io import destinations
from jaxind.models.config import ModelConfig
from jaxind.models.layer_selection import Layers, check_pairs, resolve_pairs
from jaxind.stats import convention, grams, layer_screen, pvalues
from jaxind.stats.match import NOTE, UnitMatch, match_units
from jaxind.stats.results import TestResult, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "Batches",
    "SCREEN_MIN_PAIRS",
    "duplicated_layers",
    "heatmap_path_for",
    "localized_parents",
    "localized_test",
    "pair_memory_bytes",
    "plot_heatmap",
    "layer_parents",
]

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
    log10: np.ndarray  # NaN where the screen ruled the pair out
    rho: np.ndarray
    num_tokens: int = 0
    excess: np.ndarray | None = None  # the screen's k - k0 per pair (None: no screen)
    tested: np.ndarray | None = None  # bool: pairs that got the full test
    screen_units: int = 0  # units the screen sampled


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
    screen: bool = False,
) -> _Matrix:
    """MATCH on every pair of ``la x lb`` (with ``screen``, only on the pairs
    :mod:`jaxind.stats.layer_screen` keeps), one pass over the data per chunk of B layers."""
    shape = (len(la), len(lb))
    out = _Matrix(la, lb, {}, np.full(shape, np.nan), np.full(shape, np.nan))
    if screen:
        out.excess, out.tested = np.zeros(shape), np.zeros(shape, dtype=bool)
    keys = jax.random.split(key, len(la) * len(lb)).reshape(len(la), len(lb))
    screen_key = jax.random.fold_in(key, 1)  # the pair keys above stay today's
    for sub_b in progress.bar(chunks, total=len(chunks), desc="localized passes"):
        stats = grams.accumulate(
            params_a, cfg_a, params_b, cfg_b, _iterate(batches), layers_a=la, layers_b=sub_b, outer=True
        )
        out.num_tokens = int(stats.count)
        cols = [lb.index(b) for b in sub_b]
        todo = np.ones((len(la), len(sub_b)), dtype=bool)
        if screen:
            screened = layer_screen.screen(stats, screen_key)
            todo = screened.candidates()
            assert out.excess is not None and out.tested is not None
            out.excess[:, cols], out.tested[:, cols] = screened.excess, todo
            out.screen_units = screened.num_units
        for jb, b in enumerate(sub_b):
            for ia, a in enumerate(la):
                if todo[ia, jb]:
                    _test_pair(out, stats, (ia, jb), (a, b), keys[ia, cols[jb]])
    return out


def _test_pair(out: _Matrix, stats: grams.PassStats, index: tuple[int, int], pair: LayerPair, key: jax.Array) -> None:
    """MATCH on one pair (``index`` into the pass's layers), into ``out``."""
    unit_match = match_units(stats.distances(index, "gate"), stats.distances(index, "up"), key)
    row, col = out.layers_a.index(pair[0]), out.layers_b.index(pair[1])
    out.matches[pair] = unit_match
    out.log10[row, col] = unit_match.spearman.log10_pvalue
    out.rho[row, col] = unit_match.spearman.rho


def duplicated_layers(layer_map: dict[str, int | None]) -> dict[str, list[int]]:
    """``{str(layer of A): [layers of B]}`` for every layer of A that two or more layers of B come
    from (depth up-scaling, block duplication), from a layer map ``{str(layer_b): layer_a or None}``."""
    sources: dict[int, list[int]] = {}
    for b, a in layer_map.items():
        if a is not None:
            sources.setdefault(a, []).append(int(b))
    return {str(a): sorted(bs) for a, bs in sorted(sources.items()) if len(bs) > 1}


def _layer_map(matrix: _Matrix, threshold: float) -> tuple[dict[str, int | None], list[dict[str, Any]]]:
    """Per layer of B, the layer of A with the smallest p-value if it passes ``threshold`` (log10),
    and that pair's matched units."""
    layer_map: dict[str, int | None] = {}
    matched_units = []
    for col, b in enumerate(matrix.layers_b):
        column = np.where(np.isnan(matrix.log10[:, col]), np.inf, matrix.log10[:, col])  # NaN: screened out
        best = int(np.argmin(column))
        if not column[best] < threshold:
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


SCREEN_MIN_PAIRS = 64  # screen=None screens when there are more layer pairs than this


@timed
def localized_test(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Batches,
    *,
    key: jax.Array,
    layers: Layers = None,
    alpha: float = 0.01,
    memory_budget_bytes: int = 2 * 2**30,
    heatmap_path: str | os.PathLike | None = None,
    labels: tuple[str, str] = ("model A", "model B"),
    screen: bool | None = None,
    layers_a: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
) -> TestResult:
    """MATCH on every layer pair of A and B.

    Args:
      params_a, cfg_a, params_b, cfg_b: the models (GLU MLPs; depth and width may differ).
      batches: token batches ``(B, T)`` (see :func:`jaxind.stats.match.match_test`); a list, or a
        zero-argument callable returning a fresh iterable (needed only if the Grams are chunked
        into several passes).
      key: PRNG key for the LAPs.
      alpha: family-wise error rate for the layer map (Bonferroni over ``L_A * L_B`` pairs).
      layers: a layer selection (:mod:`jaxind.models.layer_selection`): every layer of A named in it is tested
        against every layer of B named in it (default: all of each).
      layers_a, layers_b: the old form of ``layers`` (each model's layers; a DeprecationWarning, removed in the
        next release).
      memory_budget_bytes: bound on the cross-Gram accumulator; above it, B layers are chunked.
      heatmap_path: where to write the heatmap PNG (e.g. next to the results JSON, see
        :func:`heatmap_path_for`); None writes nothing.
      labels: axis labels for the heatmap.
      screen: solve the LAPs only for the pairs :mod:`jaxind.stats.layer_screen` cannot rule out
        (Bonferroni still over all pairs); None: when there are more than ``SCREEN_MIN_PAIRS``.

    Returns:
      A :class:`TestResult` (``combine="bonferroni_min"``, ``statistic``: the smallest log10 p), a
      record per tested pair (row-major), ``extra``: ``layers_a``, ``layers_b``,
      ``log10_pvalue_matrix`` ``(n_a, n_b)`` (None: screened out), ``rho_matrix``,
      ``threshold_log10``, ``alpha``, ``layer_map`` ``{str(layer_b): layer_a or None}``,
      ``duplicated_layers`` ``{str(layer_a): [layers_b]}``, ``matched_units`` ``[{"layer_a",
      "layer_b", "units_a", "units_b", "up_agreement"}]`` (unit ``units_a[k]`` of A matched by the
      gate LAP to ``units_b[k]`` of B; the fraction on which up agrees), ``num_passes``,
      ``memory_bytes``, ``num_tokens``, ``heatmap``, ``screen`` (None, or ``{"num_units",
      "pairs_tested", "pairs", "excess_matrix"}``).
    """
    layers_a, layers_b = _layer_sets(layers, layers_a, layers_b, cfg_a, cfg_b)
    key = convention.check_key(key, "localized.localized_test")
    la = tuple(range(cfg_a.n_layers)) if layers_a is None else tuple(sorted({int(l) for l in layers_a}))
    lb = tuple(range(cfg_b.n_layers)) if layers_b is None else tuple(sorted({int(l) for l in layers_b}))
    check_pairs([(a, b) for a in la for b in lb], cfg_a, cfg_b, "localized testing")
    if not 0 < alpha < 1:
        raise JaxindError(f"alpha must lie in (0, 1), got {alpha}")
    n_pairs = len(la) * len(lb)
    screen = n_pairs > SCREEN_MIN_PAIRS if screen is None else screen
    chunks = _chunks(cfg_a, cfg_b, la, lb, memory_budget_bytes, batches)
    matrix = _all_pairs(params_a, cfg_a, params_b, cfg_b, batches, key, la, lb, chunks, screen)
    threshold = math.log10(alpha) - math.log10(n_pairs)
    min_log10 = float(np.nanmin(matrix.log10))
    log10_p = min(0.0, min_log10 + math.log10(n_pairs))
    heatmap = None if heatmap_path is None else plot_heatmap(matrix.log10, la, lb, threshold, heatmap_path, labels)
    return TestResult(
        test="localized",
        pvalue=pvalues.pow10(log10_p),
        log10_pvalue=log10_p,
        exact=False,
        statistic=min_log10,
        layers=tuple(matrix.matches[(a, b)].record(a, b) for a in la for b in lb if (a, b) in matrix.matches),
        combine="bonferroni_min",
        note=NOTE,
        extra=_extra(matrix, threshold, alpha, len(chunks), pair_memory_bytes(cfg_a, cfg_b, len(la), len(chunks[0])))
        | {"heatmap": heatmap},
    )


_Opt = Sequence[int] | None


def _layer_sets(
    layers: Layers, layers_a: _Opt, layers_b: _Opt, cfg_a: ModelConfig, cfg_b: ModelConfig
) -> tuple[_Opt, _Opt]:
    """Each model's layers from ``layers`` (pairs or indices) or, deprecated, from ``layers_a``/``layers_b``."""
    if layers_a is None and layers_b is None:
        if layers is None:
            return None, None
        pairs = resolve_pairs(layers, cfg_a, cfg_b, "localized testing")
        return sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})
    if layers is not None:
        raise JaxindError("localized.localized_test: give layers= only (layers_a=/layers_b= are its deprecated form)")
    warnings.warn(
        "localized.localized_test: layers_a=/layers_b= are deprecated and will be removed in the next release; pass "
        "layers= (pairs (layer_a, layer_b): every named layer of A is tested against every named layer of B)",
        DeprecationWarning,
        stacklevel=4,
    )
    return layers_a, layers_b


def _extra(matrix: _Matrix, threshold: float, alpha: float, num_passes: int, memory_bytes: int) -> dict[str, Any]:
    """The result's ``extra`` (all but ``heatmap``): see :func:`localized_test`."""
    layer_map, matched_units = _layer_map(matrix, threshold)
    return {
        "layers_a": list(matrix.layers_a),
        "layers_b": list(matrix.layers_b),
        "log10_pvalue_matrix": _nested(matrix.log10),
        "rho_matrix": _nested(matrix.rho),
        "threshold_log10": threshold,
        "alpha": alpha,
        "layer_map": layer_map,
        "duplicated_layers": duplicated_layers(layer_map),
        "matched_units": matched_units,
        "num_passes": num_passes,
        "memory_bytes": memory_bytes,
        "num_tokens": matrix.num_tokens,
        "screen": _screen_summary(matrix),
    }


def _nested(matrix: np.ndarray) -> list[list[float | None]]:
    """A matrix as nested lists, NaN (a screened-out pair) as None."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix.tolist()]


def _screen_summary(matrix: _Matrix) -> dict[str, Any] | None:
    """The ``screen`` entry of the result: None without a screen."""
    if matrix.tested is None or matrix.excess is None:
        return None
    return {
        "num_units": matrix.screen_units,
        "pairs_tested": int(matrix.tested.sum()),
        "pairs": int(matrix.tested.size),
        "excess_matrix": np.round(matrix.excess, 3).tolist(),
    }


def localized_parents(
    parents: Mapping[str, tuple[Params, ModelConfig]],
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Batches,
    *,
    key: jax.Array,
    alpha: float = 0.01,
    screen: bool | None = None,
) -> dict[str, Any]:
    """Which layers of B come from which parent: localized testing of B against each parent, at
    ``alpha / len(parents)`` (Bonferroni over parents, so a false layer anywhere in the answer has
    probability <= ``alpha``); each layer of B goes to the parent with the smallest mapped p-value.
    For a layer-stacked merge ("frankenmerge") of two parents.

    Args:
      parents: ``{name: (params, cfg)}``, at least one.
      params_b, cfg_b: the child. Other arguments as for :func:`localized_test`.

    Returns:
      ``{"layer_parents": {str(layer_b): {"parent", "layer", "log10_pvalue"} or None},
      "alpha_per_parent": float, "results": {name: TestResult}}``.
    """
    if not parents:
        raise JaxindError("localized_parents needs at least one parent model")
    each = alpha / len(parents)
    keys = jax.random.split(key, len(parents))
    results = {
        name: localized_test(p, c, params_b, cfg_b, batches, key=k, alpha=each, screen=screen)
        for (name, (p, c)), k in zip(parents.items(), keys)
    }
    records = {name: res.extra for name, res in results.items()}
    return {"layer_parents": layer_parents(records, each), "alpha_per_parent": each, "results": results}


def layer_parents(records: Mapping[str, Mapping[str, Any]], alpha_each: float) -> dict[str, dict[str, Any] | None]:
    """Per layer of B, the parent whose layer it maps to with the smallest p-value, among the parents where that
    p-value passes Bonferroni over the parent's matrix at ``alpha_each`` (``log10 p < log10(alpha_each / (n_a
    n_b))``, the threshold :func:`localized_test` uses); None where no parent's does.

    Args:
      records: ``{parent name: localized testing's extra}``, a :class:`TestResult`'s ``extra`` or its JSON record
        (both hold ``layers_a``, ``layers_b`` and ``log10_pvalue_matrix``, None or NaN where screened out).
      alpha_each: the family-wise error rate of each parent's map (the caller's alpha over the parents).

    Returns:
      ``{str(layer_b): {"parent", "layer", "log10_pvalue"} or None}`` over every parent's layers of B, in order.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for name, rec in records.items():
        la, lb = rec["layers_a"], rec["layers_b"]
        matrix = np.array(rec["log10_pvalue_matrix"], dtype=np.float64).reshape(len(la), len(lb))  # None -> NaN
        matrix = np.where(np.isnan(matrix), np.inf, matrix)
        threshold = math.log10(alpha_each) - math.log10(len(la) * len(lb))
        for col, b in enumerate(lb):
            row = int(np.argmin(matrix[:, col]))
            best, log10 = out.get(str(b)), float(matrix[row, col])
            out.setdefault(str(b), None)
            if log10 < threshold and (best is None or log10 < best["log10_pvalue"]):
                out[str(b)] = {"parent": name, "layer": int(la[row]), "log10_pvalue": log10}
    return dict(sorted(out.items(), key=lambda item: int(item[0])))


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

    mat = -np.asarray(log10_matrix, dtype=np.float64)  # NaN (a screened-out pair) is drawn blank
    shown = np.minimum(mat, 50.0)  # clip extreme evidence so weak structure stays visible
    la, lb = list(layers_a), list(layers_b)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(lb), 1.0 + 0.35 * len(la)), dpi=100)
    im = ax.imshow(shown, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(np.nanmax(shown)), -threshold_log10))
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
