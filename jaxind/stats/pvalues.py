"""P-value arithmetic, in log space, on the host (float64 numpy / scipy; docs/DESIGN.md §5.6).

Strong dependence between two models gives p-values far below the smallest float64
(``~1e-308``): a perfectly matched MLP of width 11,008 has a Spearman p-value near
``1e-38000``. Every function here therefore returns ``log10_pvalue`` next to ``pvalue``;
the log is computed directly, never as ``log10`` of an underflowed zero.

- :func:`spearman_test`: two-sided Spearman rank-correlation test, as
  ``scipy.stats.spearmanr`` (t approximation with ``n - 2`` degrees of freedom), plus a
  finite log10 p-value in the deep tail (exact log-space incomplete-beta series), floored at
  the smallest p-value the exact permutation test can give, ``2 / n!``.
- :func:`fisher_combine`: Fisher's method, ``-2 sum ln p ~ chi2(2k)``, from log p-values, with
  the chi-square survival function in closed form (even degrees of freedom).
- :func:`permtest_pvalue`: the exact PERMTEST p-value ``(1 + #{stat_t >= stat_0}) / (T + 1)``.
- :func:`spearman_matching_test`: Spearman's test of a matching of few items (a mixture of experts' expert
  matching), with the exact permutation p-value for ``n <= 10``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from scipy import special, stats

__all__ = [
    "CombinedPValue",
    "EXACT_SPEARMAN_MAX_N",
    "SpearmanResult",
    "adjust_log10",
    "fisher_combine",
    "log10_min_spearman_pvalue",
    "permtest_pvalue",
    "pow10",
    "spearman_matching_test",
    "spearman_test",
]

_LN10 = math.log(10.0)
# Below this, scipy's float64 survival function is replaced by the log-space series.
_SCIPY_TAIL_FLOOR = 1e-250


class SpearmanResult(NamedTuple):
    """Two-sided Spearman test.

    Attributes:
      rho: Spearman rank correlation in [-1, 1] (nan for constant input).
      pvalue: two-sided p-value as a float64 (0.0 where it underflows).
      log10_pvalue: ``log10`` of the p-value, finite even where ``pvalue`` underflows.
    """

    rho: float
    pvalue: float
    log10_pvalue: float


class CombinedPValue(NamedTuple):
    """A combined p-value: ``pvalue`` (float64, may underflow to 0) and its finite ``log10``."""

    pvalue: float
    log10_pvalue: float


def log10_min_spearman_pvalue(n: int) -> float:
    """``log10(2 / n!)``: the smallest two-sided p-value the exact permutation distribution of
    Spearman's rho can produce for ``n`` untied observations (``P(|rho| = 1) = 2 / n!``)."""
    return float((math.log(2.0) - special.gammaln(n + 1.0)) / _LN10)


def _log_betainc_series(a: float, b: float, x: float) -> float:
    """Natural log of the regularised incomplete beta ``I_x(a, b)`` for ``0 < x < 1``.

    Uses ``I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * sum_k (a + b)_k / (a + 1)_k x^k``; with
    ``b <= 1`` every term ratio is below ``x``, so the series converges geometrically. Meant for
    the deep tail (small ``x``), where ``scipy.special.betainc`` underflows.
    """
    log_prefix = a * math.log(x) + b * math.log1p(-x) - math.log(a) - special.betaln(a, b)
    # Terms t_k = prod_{m<k} r_m, r_m = (a+b+m)/(a+1+m) * x; stop when they fall below 1e-18.
    tol = math.log(1e-18)
    total = 1.0
    m, log_t = 0, 0.0
    block = 1024
    while True:
        ms = np.arange(m, m + block, dtype=np.float64)
        log_r = np.log(a + b + ms) - np.log(a + 1.0 + ms) + math.log(x)
        block_terms = log_t + np.cumsum(log_r)
        total += float(np.exp(block_terms).sum())
        log_t = float(block_terms[-1])
        m += block
        if log_t < tol or m > 10**8:
            break
    return log_prefix + math.log(total)


def _log10_t_two_sided(t_abs: float, dof: float) -> float:
    """``log10(2 * sf(|t|))`` for Student's t with ``dof`` degrees of freedom, finite in the tail.

    ``2 * sf(|t|) = I_x(dof / 2, 1 / 2)`` with ``x = dof / (dof + t^2)``.
    """
    if math.isinf(t_abs):
        return -math.inf
    p = 2.0 * special.stdtr(dof, -t_abs)
    if p > _SCIPY_TAIL_FLOOR:
        return math.log10(p)
    # x computed without cancellation: dof / (dof + t^2).
    x = dof / (dof + t_abs * t_abs)
    if x <= 0.0:  # t^2 overflowed
        log_x = math.log(dof) - 2.0 * math.log(t_abs)
        a = dof / 2.0
        log_prefix = a * log_x - math.log(a) - special.betaln(a, 0.5)
        return log_prefix / _LN10
    return _log_betainc_series(dof / 2.0, 0.5, x) / _LN10


def spearman_test(x, y) -> SpearmanResult:
    """Two-sided Spearman rank-correlation test of ``x`` against ``y``.

    Args:
      x, y: 1-D arrays of the same length ``n >= 3`` (ties get average ranks).

    Returns:
      SpearmanResult(rho, pvalue, log10_pvalue). ``rho`` and ``pvalue`` agree with
      ``scipy.stats.spearmanr`` (t approximation, ``n - 2`` dof) wherever the p-value is a
      normal float64. ``log10_pvalue`` is computed in log space, so it stays finite where
      float64 underflows, and it is floored at ``log10(2 / n!)``: no outcome can be more
      extreme than a perfect (anti-)correlation, whose exact permutation probability under
      the null is ``2 / n!`` (the t approximation, unbounded as ``|rho| -> 1``, would claim
      more; for ``|rho| = 1`` exactly it gives 0). With that floor ``pvalue`` for ``|rho| = 1``
      is ``2 / n!`` (0.0 once that underflows, e.g. ``n > 170``). Constant input gives nan
      (as scipy does).

    Raises:
      ValueError: shapes differ, input not 1-D, ``n < 3``, or NaN in the input.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"spearman_test needs two 1-D arrays of equal length, got shapes {x.shape} and {y.shape}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"spearman_test needs at least 3 observations, got {n}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("spearman_test input contains NaN")
    if (x == x[0]).all() or (y == y[0]).all():
        return SpearmanResult(math.nan, math.nan, math.nan)
    rx = stats.rankdata(x)
    ry = stats.rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rho = min(1.0, max(-1.0, rho))
    dof = n - 2.0
    with np.errstate(divide="ignore"):
        t = (
            rho * math.sqrt(max(dof / ((rho + 1.0) * (1.0 - rho)), 0.0))
            if abs(rho) < 1.0
            else math.copysign(math.inf, rho)
        )
    log10_p = _log10_t_two_sided(abs(t), dof)
    log10_p = float(min(0.0, max(log10_p, log10_min_spearman_pvalue(n))))
    return SpearmanResult(rho, pow10(log10_p), log10_p)


def pow10(log10_p: float) -> float:
    """``10 ** log10_p`` without overflow warnings (0.0 where it underflows)."""
    if math.isnan(log10_p):
        return math.nan
    if log10_p < -400:
        return 0.0
    return float(10.0**log10_p)


def _log_chi2_sf_even(statistic: float, k: int) -> float:
    """Natural log of the chi-square survival function with ``2k`` degrees of freedom.

    Closed form for even dof: ``sf = exp(-y) * sum_{j<k} y^j / j!`` with ``y = statistic / 2``,
    evaluated with a log-sum-exp, so it never underflows.
    """
    y = statistic / 2.0
    if y <= 0.0:
        return 0.0
    if math.isinf(y):
        return -math.inf
    j = np.arange(k, dtype=np.float64)
    log_terms = j * math.log(y) - special.gammaln(j + 1.0)
    return min(0.0, -y + float(special.logsumexp(log_terms)))


def fisher_combine(pvalues=None, *, log10_pvalues=None) -> CombinedPValue:
    """Fisher's method: ``X = -2 sum_i ln p_i ~ chi2(2k)`` under the joint null.

    Pass either ``pvalues`` (k values in (0, 1]) or, preferably, ``log10_pvalues`` (k values
    <= 0; finite even where the p-values underflowed), so every layer contributes.

    Returns:
      CombinedPValue(pvalue, log10_pvalue); ``pvalue`` agrees with
      ``scipy.stats.combine_pvalues(pvalues, method="fisher").pvalue`` where representable.
      A p-value of exactly 0 (log10 = -inf) gives -inf.

    Raises:
      ValueError: neither or both inputs given, empty input, NaN, or values out of range.
    """
    if (pvalues is None) == (log10_pvalues is None):
        raise ValueError("fisher_combine takes exactly one of pvalues or log10_pvalues")
    if log10_pvalues is None:
        p = np.asarray(pvalues, dtype=np.float64).ravel()
        if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
            raise ValueError("fisher_combine: p-values must lie in [0, 1]")
        with np.errstate(divide="ignore"):
            logs = np.log(p)
    else:
        l10 = np.asarray(log10_pvalues, dtype=np.float64).ravel()
        if np.isnan(l10).any() or (l10 > 0).any():
            raise ValueError("fisher_combine: log10 p-values must be <= 0 and not NaN")
        logs = l10 * _LN10
    k = logs.size
    if k == 0:
        raise ValueError("fisher_combine needs at least one p-value")
    statistic = -2.0 * float(logs.sum())
    log_sf = _log_chi2_sf_even(statistic, k)
    log10_p = log_sf / _LN10
    return CombinedPValue(pow10(log10_p), log10_p)


def permtest_pvalue(stat0, stats_draws) -> CombinedPValue | tuple[np.ndarray, np.ndarray]:
    """Exact PERMTEST p-value ``(1 + #{t : stat_t >= stat_0}) / (T + 1)``.

    Args:
      stat0: observed statistic, scalar or array of shape ``S`` (e.g. per layer);
        oriented so that larger means more similar.
      stats_draws: ``(T, *S)`` statistics of the T random group elements.

    Returns:
      ``(pvalue, log10_pvalue)``: floats for a scalar ``stat0`` (as a CombinedPValue), else
      float64 arrays of shape ``S``.

    Raises:
      ValueError: shape mismatch, no draws, or NaN statistics (a NaN would silently count
        as "less similar" and make the test anti-conservative).
    """
    s0 = np.asarray(stat0, dtype=np.float64)
    st = np.asarray(stats_draws, dtype=np.float64)
    if st.ndim != s0.ndim + 1 or st.shape[1:] != s0.shape:
        raise ValueError(f"permtest_pvalue: stats must have shape (T, *{s0.shape}), got {st.shape}")
    if st.shape[0] == 0:
        raise ValueError("permtest_pvalue needs at least one draw")
    if np.isnan(s0).any() or np.isnan(st).any():
        raise ValueError("permtest_pvalue: NaN statistic")
    count = 1 + (st >= s0).sum(axis=0)
    total = st.shape[0] + 1
    pvalue = count / total
    log10_p = np.log10(count) - math.log10(total)
    if s0.ndim == 0:
        return CombinedPValue(float(pvalue), float(log10_p))
    return pvalue, log10_p


def adjust_log10(log10_pvalues, method: str = "holm") -> np.ndarray:
    """Multiple-testing adjusted p-values, in log10, for ``m`` hypotheses (e.g. a sweep's pairs).

    ``"bonferroni"``: ``min(1, m p_i)``. ``"holm"`` (Holm's step-down, uniformly more powerful and
    also valid under any dependence): with the p-values sorted ascending,
    ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where the adjusted p-value is at
    most ``alpha`` bounds the family-wise error rate (any false rejection) by ``alpha``. Computed in
    log space, so p-values below float64's range keep their order.

    Raises:
      ValueError: an unknown method, NaN, or a value above 0.
    """
    logs = np.asarray(log10_pvalues, dtype=np.float64).ravel()
    if np.isnan(logs).any() or (logs > 0).any():
        raise ValueError("adjust_log10: log10 p-values must be <= 0 and not NaN")
    m = logs.size
    if method == "bonferroni":
        return np.minimum(0.0, logs + math.log10(max(m, 1)))
    if method != "holm":
        raise ValueError(f"adjust_log10: unknown method {method!r} (holm or bonferroni)")
    order = np.argsort(logs, kind="stable")
    stepped = logs[order] + np.log10(m - np.arange(m, dtype=np.float64))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(0.0, np.maximum.accumulate(stepped)) if m else stepped
    return adjusted


# Largest n for which spearman_matching_test enumerates the exact null distribution (10! = 3,628,800 matchings).
EXACT_SPEARMAN_MAX_N = 10


@functools.cache
def _squared_displacement_counts(n: int) -> np.ndarray:
    """``counts[k]`` = how many permutations ``pi`` of ``0..n-1`` have ``sum_i (i - pi(i))^2 == k``: the exact null
    distribution of Spearman's rho for a uniformly random matching, by dynamic programming over the set of values
    already used (``2^n`` subsets)."""
    top = n * (n * n - 1) // 3  # the largest sum, reached by the reversal
    table = np.zeros((1 << n, top + 1), np.int64)
    table[0, 0] = 1
    for mask in range(1 << n):
        row = table[mask]
        if not row.any():
            continue
        i = bin(mask).count("1")  # the position placed next
        for v in range(n):
            if not mask & (1 << v):
                step = (i - v) ** 2
                table[mask | (1 << v), step:] += row[: top + 1 - step]
    return table[-1]


def spearman_matching_test(x, y) -> SpearmanResult:
    """Two-sided Spearman test of a matching: ``x``, ``y`` are ``n`` distinct values each (e.g. matched row and
    column indices), tested for rank correlation against a uniformly random matching.

    For ``n <= EXACT_SPEARMAN_MAX_N`` the p-value is exact: the share of the ``n!`` equally likely matchings whose
    ``|rho|`` is at least the observed one (so at least ``2 / n!``, and valid for any ``n``); above, it is
    :func:`spearman_test`'s t approximation. The expert matching of a mixture of experts has only ``E`` (often
    8) observations, where the t approximation is far off.

    Raises:
      ValueError: shapes differ, ``n < 3``, or repeated values.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[0]
    if x.ndim != 1 or x.shape != y.shape or n < 3:
        raise ValueError(f"spearman_matching_test needs two 1-D arrays of equal length >= 3, got {x.shape}, {y.shape}")
    if len(np.unique(x)) != n or len(np.unique(y)) != n:
        raise ValueError("spearman_matching_test needs distinct values (a matching)")
    if n > EXACT_SPEARMAN_MAX_N:
        return spearman_test(x, y)
    rank_y = np.argsort(np.argsort(y))[np.argsort(x)]  # the ranks of y, ordered by the ranks of x
    observed = int(np.sum((np.arange(n) - rank_y) ** 2))
    counts = _squared_displacement_counts(n)
    centre = n * (n * n - 1) / 6  # the sum at rho = 0
    extreme = np.abs(np.arange(counts.size) - centre) >= abs(observed - centre) - 1e-9
    log10_p = min(0.0, float(math.log10(counts[extreme].sum()) - special.gammaln(n + 1.0) / _LN10))
    rho = 1.0 - 6.0 * observed / (n * (n * n - 1))
    return SpearmanResult(rho, pow10(log10_p), log10_p)
