"""Tests for jaxind.stats.assignment: optimality against scipy, exactness on near-permutations,
equivariance, batching, jit, input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxind.stats import assignment
from jaxind.stats.assignment import assignment_cost, solve_lap, solve_lap_batched

RTOL = 1e-6
# A scipy fallback inside the auction would make these tests vacuous: make it an error.
pytestmark = pytest.mark.filterwarnings("error:auction did not reach:RuntimeWarning")


def scipy_objective(cost: np.ndarray, maximize: bool = False) -> float:
    r, c = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64), maximize=maximize)
    return assignment_cost(cost, r, c)


def assert_valid(cost_shape, rows, cols):
    n, m = cost_shape
    k = min(n, m)
    assert rows.shape == cols.shape == (k,)
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly ascending"
    assert len(np.unique(cols)) == k
    assert rows.min(initial=0) >= 0 and rows.max(initial=0) < max(n, 1)
    assert cols.min(initial=0) >= 0 and cols.max(initial=0) < max(m, 1)


def near_permutation(n: int, seed: int, dim: int = 64, noise: float = 0.5):
    """Negative cosine similarity of a noisy, permuted copy; returns cost and planted cols."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    perm = rng.permutation(n)
    y = x[perm] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return (-(x @ y.T)).astype(np.float32), np.argsort(perm)


@pytest.mark.parametrize("method", ["auction", "scipy", "hungarian"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (5, 5), (37, 37), (13, 29), (29, 13)])
@pytest.mark.parametrize("maximize", [False, True])
def test_small_random_optimal(method, shape, maximize):
    rng = np.random.default_rng(hash((method, shape, maximize)) % 2**32)
    cost = rng.random(shape).astype(np.float32)
    rows, cols = solve_lap(cost, maximize=maximize, method=method)
    assert_valid(shape, rows, cols)
    ref = scipy_objective(cost, maximize)
    assert assignment_cost(cost, rows, cols) == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize(
    "n,m,maximize,dist",
    [
        (512, 512, False, "uniform"),
        (2048, 2048, False, "uniform"),
        (512, 512, True, "normal"),
        (90, 60, False, "uniform"),
        (60, 90, True, "uniform"),
    ],
)
def test_auction_random_matches_scipy(n, m, maximize, dist):
    rng = np.random.default_rng(n * 7 + m)
    cost = rng.random((n, m)) if dist == "uniform" else rng.standard_normal((n, m))
    cost = cost.astype(np.float32)
    rows, cols = solve_lap(cost, maximize=maximize, method="auction")
    assert_valid((n, m), rows, cols)
    got, ref = assignment_cost(cost, rows, cols), scipy_objective(cost, maximize)
    assert abs(got - ref) <= RTOL * abs(ref), (got, ref)


def test_auction_offset_costs_squared_distances():
    """Squared Euclidean distances: large common offset, the MATCH use case."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((512, 32))
    b = rng.standard_normal((512, 32)) + 3.0
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).astype(np.float32)
    rows, cols = solve_lap(jnp.asarray(cost), method="auction")
    got, ref = assignment_cost(cost, rows, cols), scipy_objective(cost)
    assert abs(got - ref) <= RTOL * abs(ref)


@pytest.mark.parametrize("n", [37, 2048])
@pytest.mark.parametrize("method", ["auction", "auto"])
def test_near_permutation_exact(n, method):
    cost, planted = near_permutation(n, seed=n)
    rows, cols = solve_lap(cost, method=method)
    r_ref, c_ref = scipy.optimize.linear_sum_assignment(cost.astype(np.float64))
    np.testing.assert_array_equal(rows, np.arange(n))
    np.testing.assert_array_equal(cols, c_ref)
    np.testing.assert_array_equal(cols, planted)


def test_near_permutation_maximize_similarity():
    cost, planted = near_permutation(512, seed=5)
    rows, cols = solve_lap(-cost, maximize=True, method="auction")
    np.testing.assert_array_equal(cols, planted)


@pytest.mark.parametrize("method", ["auction", "scipy"])
def test_equivariance_under_input_permutation(method):
    """Permuting rows/cols of the input permutes the output the same way."""
    rng = np.random.default_rng(11)
    n = 512
    cost = rng.random((n, n)).astype(np.float32)
    pr, pc = rng.permutation(n), rng.permutation(n)
    rows, cols = solve_lap(cost, method=method)
    rows_p, cols_p = solve_lap(cost[pr][:, pc], method=method)
    # Pair (i, j) of the permuted problem is pair (pr[i], pc[j]) of the original.
    mapped = dict(zip(pr[rows_p], pc[cols_p]))
    assert mapped == dict(zip(rows, cols))


@pytest.mark.parametrize("method", ["auction", "scipy"])
def test_key_relabelling_keeps_optimum(method):
    rng = np.random.default_rng(12)
    cost = rng.random((29, 13)).astype(np.float32)
    ref = scipy_objective(cost)
    for seed in range(3):
        rows, cols = solve_lap(cost, method=method, key=jax.random.key(seed))
        assert_valid(cost.shape, rows, cols)
        assert assignment_cost(cost, rows, cols) == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("fill", ["zeros", "ties"])
def test_auction_degenerate_costs(fill):
    """All-equal costs (zero range) and heavy ties (small integers) still terminate, optimal."""
    rng = np.random.default_rng(71)
    cost = np.zeros((37, 37)) if fill == "zeros" else rng.integers(0, 3, (37, 37)).astype(float)
    for maximize in (False, True):
        rows, cols = solve_lap(cost, method="auction", maximize=maximize)
        assert_valid(cost.shape, rows, cols)
        assert assignment_cost(cost, rows, cols) == pytest.approx(scipy_objective(cost, maximize), rel=RTOL, abs=1e-9)


def test_key_relabelling_randomises_ties():
    """All-equal costs: every assignment is optimal; a key makes the choice depend on it."""
    cost = np.zeros((8, 8), np.float32)
    outs = {tuple(solve_lap(cost, method="scipy", key=jax.random.key(s))[1]) for s in range(10)}
    assert len(outs) > 1
    for cols in outs:
        assert sorted(cols) == list(range(8))


@pytest.mark.parametrize("method", ["auction", "hungarian", "scipy"])
@pytest.mark.parametrize("shape", [(3, 37, 37), (2, 13, 29), (2, 29, 13)])
def test_batched_equals_per_item(method, shape):
    rng = np.random.default_rng(21)
    costs = rng.random(shape).astype(np.float32)
    rows, cols = solve_lap_batched(costs, method=method)
    k = min(shape[1:])
    assert rows.shape == cols.shape == (shape[0], k)
    for i in range(shape[0]):
        r, c = solve_lap(costs[i], method=method)
        np.testing.assert_array_equal(rows[i], r)
        np.testing.assert_array_equal(cols[i], c)


def test_auction_kernel_jit_and_vmap():
    """The raw kernel composes with jit and vmap; converged results are eps-optimal."""
    rng = np.random.default_rng(31)
    costs = rng.random((4, 37, 37)).astype(np.float32)
    eps = jnp.asarray(assignment.eps_schedule(rel_final=1e-7), jnp.float32)

    @jax.jit
    def solve(c):
        return jax.vmap(lambda x: assignment.auction_lap(-x, eps))(c)

    res = solve(jnp.asarray(costs))
    assert bool(jnp.all(res.converged))
    for i in range(4):
        cols = np.asarray(res.col_of_row[i])
        assert sorted(cols) == list(range(37))
        got = assignment_cost(costs[i], np.arange(37), cols)
        assert got <= scipy_objective(costs[i]) + 37 * 1e-7 + 1e-6
        primal, gap = assignment.duality_gap(-jnp.asarray(costs[i]), res.col_of_row[i], res.prices[i])
        assert float(gap) >= -1e-4


def test_duality_gap_detects_suboptimal():
    rng = np.random.default_rng(41)
    cost = rng.random((30, 30))
    _, opt = scipy.optimize.linear_sum_assignment(cost)
    with jax.enable_x64(True):
        bad = np.roll(opt, 1)
        _, gap = assignment.duality_gap(-jnp.asarray(cost), jnp.asarray(bad), jnp.zeros(30))
        excess = assignment_cost(cost, np.arange(30), bad) - scipy_objective(cost)
        assert excess > 0 and float(gap) >= excess - 1e-9


def test_auto_is_optimal_and_documented_default():
    host = "lapjv" if assignment.have_lapjv() else "scipy"
    assert assignment.default_method("cpu") == host
    assert assignment.default_method("gpu") == "auction"
    assert assignment.default_method("gpu", (30, 40)) == host
    rng = np.random.default_rng(51)
    cost = rng.random((300, 300)).astype(np.float32)
    rows, cols = solve_lap(cost)
    assert assignment_cost(cost, rows, cols) == pytest.approx(scipy_objective(cost), rel=RTOL)


@pytest.mark.parametrize("shape", [(37, 37), (13, 29), (29, 13)])
def test_lapjv(shape):
    # `lap` is in the test extra, so this always runs in CI.
    cost = np.random.default_rng(61).random(shape)
    for maximize in (False, True):
        rows, cols = solve_lap(cost, method="lapjv", maximize=maximize)
        assert_valid(shape, rows, cols)
        assert assignment_cost(cost, rows, cols) == pytest.approx(scipy_objective(cost, maximize), rel=RTOL)


def test_empty_and_jax_input():
    r, c = solve_lap(np.zeros((0, 5)))
    assert r.shape == c.shape == (0,)
    cost = jnp.asarray(np.random.default_rng(0).random((10, 10)), jnp.float32)
    r, c = solve_lap(cost, method="auction")
    assert isinstance(r, np.ndarray) and isinstance(c, np.ndarray)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or inf"),
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_input_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        solve_lap(bad)


def test_bad_input_batched_and_method():
    with pytest.raises(ValueError, match="3-D"):
        solve_lap_batched(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_lap_batched(jnp.full((2, 3, 3), jnp.nan))
    with pytest.raises(ValueError, match="method"):
        solve_lap(np.zeros((2, 2)), method="magic")


# --------------------------------------------------------------------------------------------
# "warm": auction prices, then the exact host solver
# --------------------------------------------------------------------------------------------


def low_rank_distances(n: int, m: int, seed: int, rank: int = 24, tokens: int = 64) -> np.ndarray:
    """MATCH-like costs of independent models: squared distances between the activation rows of
    two unrelated unit sets reading the same low-rank, non-centred inputs (a common direction),
    one side with heavy-tailed unit scales (trained), the other narrow (random init)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, rank)) + 1.0
    ga = (x @ rng.standard_normal((rank, n))) * np.exp(1.5 * rng.standard_normal(n))
    gb = (x @ rng.standard_normal((rank, m))) * np.exp(0.2 * rng.standard_normal(m))
    return ((ga[:, :, None] - gb[:, None, :]) ** 2).sum(0)


WARM_COSTS = {
    "low_rank": lambda: (low_rank_distances(600, 600, 1), False),
    "low_rank_cosine_max": lambda: (-low_rank_distances(400, 400, 2) / 1e3, True),
    "near_ties": lambda: (np.random.default_rng(3).integers(0, 4, (300, 300)).astype(float), False),
    "uniform": lambda: (np.random.default_rng(4).random((300, 300)), False),
    "near_permutation": lambda: (near_permutation(300, seed=5)[0].astype(np.float64), False),
    "all_equal": lambda: (np.full((40, 40), 2.5), False),
    "one": lambda: (np.array([[3.0]]), True),
    "rect_wide": lambda: (low_rank_distances(130, 290, 6), False),
    "rect_tall": lambda: (low_rank_distances(290, 130, 7), True),
}


@pytest.mark.parametrize("name", list(WARM_COSTS))
def test_warm_equals_scipy(name):
    """ "warm" reaches scipy's objective to float64 rounding on hard, tied, easy, degenerate and
    rectangular costs, with a valid assignment."""
    cost, maximize = WARM_COSTS[name]()
    rows, cols = solve_lap(cost, maximize=maximize, method="warm")
    assert_valid(cost.shape, rows, cols)
    ref = scipy_objective(cost, maximize)
    assert abs(assignment_cost(cost, rows, cols) - ref) <= 1e-12 * np.abs(cost).max() * max(cost.shape)


@pytest.mark.parametrize("rank_one", [True, False])
def test_warm_prices_are_eps_optimal_duals(rank_one):
    """The auction kernel's prices (from the rank-one start or from zero) give a dual bound within
    n * (last epsilon) of the optimum (eps-complementary slackness), and it is a lower bound."""
    cost = low_rank_distances(300, 300, 8)
    v, info = assignment.warm_prices(cost, rank_one=rank_one)
    assert info["free_left"] == 0 and info["bids"] >= 300
    assert ("rank_one_share" in info) == rank_one
    u = (cost - v[None, :]).min(axis=1)
    opt = scipy_objective(cost)
    slack = 1e-5 * np.abs(cost).max() * 300  # float32 prices
    assert u.sum() + v.sum() <= opt + 1e-9 * abs(opt)
    assert opt - (u.sum() + v.sum()) <= 300 * info["eps_last"] + slack


def test_rank_one_prices_exact_on_rank_one_costs():
    """On a rank-one benefit (plus row and column terms) the prices are optimal duals: with them
    every row's best column is its sorted partner, and the dual bound equals the optimum."""
    rng = np.random.default_rng(16)
    p, q = rng.standard_normal(200), rng.standard_normal(200)
    benefit = np.outer(p, q) + rng.standard_normal(200)[:, None] + rng.standard_normal(200)[None, :]
    prices, share = assignment.rank_one_prices(jnp.asarray(benefit, jnp.float32))
    assert float(share) > 0.99
    prices = np.asarray(prices, np.float64)
    dual = (benefit - prices[None, :]).max(axis=1).sum() + prices.sum()
    opt = -scipy_objective(-benefit)
    assert dual >= opt - 1e-6 * abs(opt)
    assert dual - opt <= 1e-4 * np.abs(benefit).max() * 200


@pytest.mark.parametrize("warm", [True, False])
def test_warm_schedule_scales(warm):
    """Starts at the spread (warm) or 5% of the range (cold), divides by 5, ends below spread / 100."""
    rng = np.random.default_rng(9)
    benefit = -rng.random((200, 200)) * 1000.0
    benefit -= benefit.max(1, keepdims=True)
    sched = assignment.warm_schedule(benefit, start_at_spread=warm)
    spread = -np.median(np.sort(benefit, axis=1)[:, -11])
    assert sched[0] == pytest.approx(spread if warm else 0.05 * -benefit.min())
    np.testing.assert_allclose(sched[1:] / sched[:-1], 0.2)
    assert sched[-1] <= spread / 100 < sched[-2]


def test_warm_bid_cap_stays_exact(monkeypatch):
    """Prices from an auction stopped by its bid cap are worse, the result is still exact."""
    monkeypatch.setattr(assignment, "_WARM_MAX_BIDS_PER_ROW", 1)
    cost = low_rank_distances(300, 300, 10)
    cols, info = assignment.solve_warm(cost)
    assert info["bids"] < 300 + assignment._WARM_BLOCK and info["free_left"] > 0
    assert assignment_cost(cost, np.arange(300), cols) == pytest.approx(scipy_objective(cost), rel=1e-12)


def test_auto_picks_warm_on_competitive_costs():
    hard = low_rank_distances(600, 600, 11)
    easy = np.random.default_rng(12).random((600, 600))
    host = "lapjv" if assignment.have_lapjv() else "scipy"
    assert assignment.competition(hard) < assignment.WARM_MAX_COMPETITION < assignment.competition(easy)
    assert assignment.default_method("cpu", hard.shape, hard) == "warm"
    assert assignment.default_method("cpu", easy.shape, easy) == host
    assert assignment.default_method("cpu", (300, 300), hard[:300, :300]) == host  # below WARM_MIN_N
    assert assignment.default_method("gpu", hard.shape, hard) == "auction"
    rows, cols = solve_lap(hard, key=jax.random.key(0))
    assert assignment_cost(hard, rows, cols) == pytest.approx(scipy_objective(hard), rel=1e-12)


def test_match_and_csu_pvalues_unchanged_by_warm(monkeypatch):
    """MATCH's and CSU's per-layer tests give identical statistics whether the LAPs are solved by
    scipy or by "warm", on a fixed seed and competitive costs."""
    from jaxind.stats import constrained, match

    d_gate, d_up = low_rank_distances(520, 520, 13), low_rank_distances(520, 520, 14)
    sim = -low_rank_distances(520, 520, 15)
    orig = assignment.solve_lap
    out = {}
    for method in ("scipy", "warm", "auto"):
        monkeypatch.setattr(assignment, "solve_lap", lambda c, method=method, **kw: orig(c, method=method, **kw))
        unit = match.match_units(d_gate, d_up, jax.random.key(1))
        csu, _, _ = constrained.matched_spearman(sim, jax.random.key(2))
        out[method] = (unit.spearman.pvalue, unit.gate_b.tolist(), unit.up_b.tolist(), csu.pvalue)
    assert out["warm"] == out["scipy"] == out["auto"]


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_lapjv_large_costs_exact(offset):
    """Regression: the `lap` package's LAPJV returned assignments up to 30% above the optimum on
    squared-distance costs with entries near or above its internal 1e6 sentinel (MATCH's costs
    grow with the number of tokens); the shifted, power-of-two-scaled call is exact."""
    for seed in range(12):
        n = 20 + 3 * seed
        for shape in ((n, n), (n, n + 7)):
            cost = low_rank_distances(*shape, seed) + offset
            rows, cols = solve_lap(cost, method="lapjv")
            assert_valid(shape, rows, cols)
            ref = scipy_objective(cost)
            assert abs(assignment_cost(cost, rows, cols) - ref) <= 1e-12 * np.abs(cost).max() * n, (seed, shape)


@pytest.mark.slow
def test_real_smollm2_match_and_csu_unchanged_by_warm(smollm2, monkeypatch):
    """On the real SmolLM2 against an independently initialised model (the issue's case), "auto"
    picks "warm" for MATCH's distance matrices, and MATCH's and CSU's matchings and p-values are
    identical to scipy's on a fixed seed."""
    from jaxind.io import token_source
    from jaxind.models import model
    from jaxind.stats import constrained, grams, match

    cfg = smollm2.config
    other = model.init_params(cfg, jax.random.key(1))
    tokens = token_source.make_tokens(
        token_source.DataSpec(num_sequences=8, seq_len=128), cfg.vocab_size, cfg.vocab_size
    )
    pairs, layers = ((0, 0), (29, 29)), (0, 29)
    stats = grams.accumulate(
        smollm2.params,
        cfg,
        other,
        cfg,
        list(token_source.batches(tokens, 8)),
        layers_a=layers,
        layers_b=layers,
        pair_index=((0, 0), (1, 1)),
    )
    for p in range(2):
        for proj in ("gate", "up"):
            d = stats.distances(p, proj)
            assert assignment.default_method("cpu", d.shape, d) == "warm"
    orig = assignment.solve_lap
    out = {}
    for method in ("scipy", "auto"):
        monkeypatch.setattr(assignment, "solve_lap", lambda c, method=method, **kw: orig(c, method=method, **kw))
        res = match.match_from_pass(stats, pairs, jax.random.key(3), return_units=True)
        csu = constrained.csu(smollm2.params, cfg, other, cfg, jax.random.key(4), layers=pairs)
        out[method] = (
            [(r.pvalue, r.statistic, r.extra["matched_units"]) for r in res.layers],
            res.pvalue,
            [(r.pvalue, r.statistic) for r in csu.layers],
            csu.pvalue,
        )
    assert out["auto"] == out["scipy"]
