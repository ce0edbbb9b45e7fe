"""P-value arithmetic: agreement with scipy where float64 suffices, finite and correct log10
p-values where it underflows."""

import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from jaxind.stats.pvalues import (
    fisher_combine,
    log10_min_spearman_pvalue,
    permtest_pvalue,
    spearman_test,
)


def log10_t_two_sided_by_quadrature(t: float, dof: float) -> float:
    """Independent reference: log10(2 sf(t)) = log10(2 f(t) * int_t^inf f(u)/f(t) du), with the
    t density f in log space and the (bounded, well-scaled) ratio integrated numerically."""

    def log_pdf(u):
        return (
            special.gammaln((dof + 1) / 2)
            - special.gammaln(dof / 2)
            - 0.5 * math.log(dof * math.pi)
            - (dof + 1) / 2 * math.log1p(u * u / dof)
        )

    lt = log_pdf(t)
    ratio, _ = integrate.quad(lambda u: math.exp(log_pdf(u) - lt), t, np.inf, epsabs=0, epsrel=1e-12, limit=200)
    return (math.log(2.0) + lt + math.log(ratio)) / math.log(10.0)


@pytest.mark.parametrize("n", [5, 12, 50, 300, 2000])
def test_spearman_matches_scipy(n):
    rng = np.random.default_rng(n)
    checked = []
    for noise in (0.3, 1.0, 5.0):
        x = rng.normal(size=n)
        y = x + noise * rng.normal(size=n)
        ours, ref = spearman_test(x, y), stats.spearmanr(x, y)
        np.testing.assert_allclose(ours.rho, ref.statistic, rtol=1e-10, atol=1e-12)
        floor = log10_min_spearman_pvalue(n)
        if ref.pvalue == 0.0:  # scipy underflowed; the deep tail is tested below
            assert math.isfinite(ours.log10_pvalue) and ours.log10_pvalue < -300
            continue
        if ref.pvalue < 10.0**floor:  # t approximation beyond the exact minimum 2/n! (or underflow)
            assert ours.log10_pvalue == floor
            continue
        checked.append(n)
        np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=1e-6)
        np.testing.assert_allclose(ours.log10_pvalue, math.log10(ref.pvalue), rtol=1e-6, atol=1e-10)
    assert checked  # at least one case compared with scipy


def test_spearman_ties_and_negative_correlation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=40).astype(float)
    y = -x + rng.integers(0, 3, size=40)
    ours, ref = spearman_test(x, y), stats.spearmanr(x, y)
    assert ours.rho < -0.5
    np.testing.assert_allclose(ours.rho, ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=1e-6)


def test_spearman_underflow_is_finite_and_correct():
    """n = 11,008 (Llama-2-7B MLP width): strong but imperfect correlation underflows float64
    in scipy; our log10 p-value must match an independent quadrature of the t tail."""
    n = 11008
    rng = np.random.default_rng(1)
    x = np.arange(n, dtype=float)
    y = x.copy()
    swap = rng.choice(n, size=3000, replace=False)  # scramble 3000 positions
    y[swap] = rng.permutation(y[swap])
    ours = spearman_test(x, y)
    assert stats.spearmanr(x, y).pvalue == 0.0  # scipy underflows
    assert ours.pvalue == 0.0 and math.isfinite(ours.log10_pvalue)
    dof = n - 2.0
    t = ours.rho * math.sqrt(dof / ((1 + ours.rho) * (1 - ours.rho)))
    expected = log10_t_two_sided_by_quadrature(t, dof)
    assert expected < -400
    np.testing.assert_allclose(ours.log10_pvalue, expected, rtol=1e-8)


def test_spearman_deep_tail_continuity_with_scipy():
    """Just above the float64 floor scipy and the log-space series must agree."""
    n = 11008
    rng = np.random.default_rng(2)
    x = rng.normal(size=n)
    for noise in (0.9, 0.75, 0.6):
        y = x + noise * rng.normal(size=n)
        ref = stats.spearmanr(x, y).pvalue
        ours = spearman_test(x, y)
        if ref > 0:
            np.testing.assert_allclose(ours.log10_pvalue, math.log10(ref), rtol=1e-8)
        else:
            assert math.isfinite(ours.log10_pvalue) and ours.log10_pvalue < -300


def test_spearman_perfect_correlation_floor():
    for n in (8, 11008):
        x = np.arange(n)
        up, down = spearman_test(x, x), spearman_test(x, -x)
        floor = log10_min_spearman_pvalue(n)
        assert up.rho == 1.0 and down.rho == -1.0
        assert up.log10_pvalue == floor == down.log10_pvalue
        np.testing.assert_allclose(floor, math.log10(2.0) - math.log10(math.factorial(n)), rtol=1e-12)
    assert spearman_test(np.arange(8), np.arange(8)).pvalue == pytest.approx(2.0 / math.factorial(8))
    # one adjacent swap at n = 11,008: the t approximation would go below the exact floor
    x = np.arange(11008)
    y = x.copy()
    y[[0, 1]] = y[[1, 0]]
    assert spearman_test(x, y).log10_pvalue == log10_min_spearman_pvalue(11008)


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError):
        spearman_test([1, 2], [1, 2])
    with pytest.raises(ValueError):
        spearman_test([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        spearman_test([1, 2, np.nan], [1, 2, 3])
    assert math.isnan(spearman_test([1, 1, 1], [1, 2, 3]).rho)


@pytest.mark.parametrize("k", [1, 2, 7, 30])
def test_fisher_matches_scipy(k):
    rng = np.random.default_rng(k)
    for scale in (1.0, 0.1, 1e-4):
        p = rng.uniform(size=k) * scale
        ref = stats.combine_pvalues(p, method="fisher").pvalue
        ours = fisher_combine(p)
        np.testing.assert_allclose(ours.pvalue, ref, rtol=1e-6)
        np.testing.assert_allclose(ours.log10_pvalue, math.log10(ref), rtol=1e-6)
        from_logs = fisher_combine(log10_pvalues=np.log10(p))
        np.testing.assert_allclose(from_logs.pvalue, ref, rtol=1e-6)


def test_fisher_single_pvalue_is_identity():
    for p in (0.7, 1e-3, 1e-200):
        np.testing.assert_allclose(fisher_combine([p]).pvalue, p, rtol=1e-9)
    np.testing.assert_allclose(fisher_combine(log10_pvalues=[-5000.0]).log10_pvalue, -5000.0, rtol=1e-12)


def test_fisher_underflowed_layers_still_count():
    logs = np.array([-400.0, -3000.0, -1.0, -0.2])
    res = fisher_combine(log10_pvalues=logs)
    assert res.pvalue == 0.0 and math.isfinite(res.log10_pvalue)
    # independent check: asymptotic upper tail of chi2(2k), Q(k, y) ~ e^-y y^(k-1)/(k-1)! (1 + (k-1)/y + ...)
    k, y = logs.size, -logs.sum() * math.log(10.0)
    series = sum(math.prod(range(k - j, k)) / y**j for j in range(k))  # (k-1)!/(k-1-j)! / y^j
    approx = (-y + (k - 1) * math.log(y) - special.gammaln(k) + math.log(series)) / math.log(10.0)
    np.testing.assert_allclose(res.log10_pvalue, approx, rtol=1e-12)
    # more evidence never gives a larger p-value
    assert fisher_combine(log10_pvalues=np.append(logs, -10.0)).log10_pvalue < res.log10_pvalue
    assert res.log10_pvalue < -3000


def test_fisher_rejects_bad_input():
    with pytest.raises(ValueError):
        fisher_combine()
    with pytest.raises(ValueError):
        fisher_combine([0.1], log10_pvalues=[-1.0])
    with pytest.raises(ValueError):
        fisher_combine([1.5])
    with pytest.raises(ValueError):
        fisher_combine(log10_pvalues=[0.5])
    assert fisher_combine([1.0, 1.0]).pvalue == 1.0


def test_permtest_pvalue():
    p, lp = permtest_pvalue(2.0, [1.0, 3.0, 2.0, 0.5])  # 3.0 and the tie 2.0 count
    assert p == pytest.approx(3 / 5) and lp == pytest.approx(math.log10(3 / 5))
    p, _ = permtest_pvalue(10.0, np.zeros(999))
    assert p == pytest.approx(1 / 1000)
    p, lp = permtest_pvalue(np.array([1.0, -1.0]), np.array([[0.0, 0.0], [2.0, 0.0], [0.5, 0.0]]))
    np.testing.assert_allclose(p, [2 / 4, 4 / 4])
    np.testing.assert_allclose(lp, np.log10([0.5, 1.0]))
    with pytest.raises(ValueError):
        permtest_pvalue(1.0, [np.nan, 0.0])
    with pytest.raises(ValueError):
        permtest_pvalue(np.zeros(2), np.zeros((5, 3)))
