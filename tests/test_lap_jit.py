"""jaxind.stats.assignment.lap: one LAP entry point under jit and vmap (docs/DESIGN.md §5.5).

Exactness is checked against scipy.optimize.linear_sum_assignment in float64 on random and on
tie-heavy (small integer) costs, square and rectangular both ways, minimising and maximising,
through both paths: the host solver behind a callback (CPU's "auto") and the on-device auction
(the accelerators' "auto", forced here with method="auction"). The auction compiles for several
seconds per shape on CPU, so the tests share three shapes and one vmapped batch.
"""

from __future__ import annotations

import dataclasses
import doctest
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxind.stats.lap
from jaxind import JaxindError
from jaxind.stats import assignment
from jaxind.stats.assignment import CostMatrixError, LapResult, lap

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(12, 12), (8, 12), (12, 8)]


def optimum(cost: np.ndarray, maximize: bool) -> float:
    c = np.asarray(cost, np.float64)
    r, k = scipy.optimize.linear_sum_assignment(c, maximize=maximize)
    return float(c[r, k].sum())


def total(cost: np.ndarray, res_assignment) -> float:
    """float64 total of a row -> column assignment, after checking it is a valid matching."""
    a = np.asarray(res_assignment)
    n, m = cost.shape
    rows = np.nonzero(a >= 0)[0]
    assert a.shape == (n,) and rows.size == min(n, m)
    assert np.unique(a[rows]).size == rows.size and a[rows].max() < m
    return float(np.asarray(cost, np.float64)[rows, a[rows]].sum())


def costs(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, 3, shape).astype(np.float32)  # "ties": most assignments tie


# The auction compiles for ~7 s per rectangular shape on a loaded 2-core CPU: those two go to the slow tier.
CASES = [(shape, "auto") for shape in SHAPES] + [
    pytest.param(shape, "auction", marks=[pytest.mark.slow] if shape[0] != shape[1] else [], id=f"{shape}-auction")
    for shape in SHAPES
]


@pytest.mark.parametrize(("shape", "method"), CASES)
def test_exact_against_scipy_square_and_rectangular(method, shape):
    for seed, kind in enumerate(["random", "ties", "ties", "random"]):
        c = costs(kind, shape, seed)
        for maximize in (False, True):
            res = lap(c, maximize=maximize, method=method)
            best = optimum(c, maximize)
            if kind == "ties":  # integer totals: exact, and the certificate says so
                assert total(c, res.assignment) == best
            else:
                assert total(c, res.assignment) == pytest.approx(best, rel=1e-6)
            assert float(res.objective) == pytest.approx(total(c, res.assignment), rel=1e-6)
            assert bool(res.certified)
            assert float(res.duality_gap) >= 0
            # the gap bounds the distance to the optimum (float32 objective: allow its rounding)
            assert abs(float(res.objective) - best) <= float(res.duality_gap) + 1e-5
            if method == "auto":  # CPU: the exact host solver
                assert float(res.duality_gap) == 0 and int(res.num_iters) == 0
            else:
                assert int(res.num_iters) > 0
                assert kind != "ties" or float(res.duality_gap) < 1  # integer optimum certified


def test_jit_returns_a_frozen_pytree_result():
    c = costs("random", (10, 10), 7)
    for maximize in (False, True):
        res = jax.jit(lambda x, mx=maximize: lap(x, maximize=mx))(c)
        assert isinstance(res, LapResult)
        assert total(c, res.assignment) == pytest.approx(optimum(c, maximize), rel=1e-12)
        assert jax.tree_util.tree_structure(res).num_leaves == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.objective = jnp.zeros(())  # type: ignore[misc]


def test_gradient_of_the_optimum_is_the_assignment():
    c = costs("random", (5, 7), 3)
    grad = jax.grad(lambda x: lap(x, maximize=True).objective)(jnp.asarray(c))
    a = np.asarray(lap(c, maximize=True).assignment)
    expected = np.zeros((5, 7), np.float32)
    expected[np.arange(5), a] = 1
    assert np.array_equal(np.asarray(grad), expected)


def test_vmap_is_one_host_call_and_exact(monkeypatch):
    """vmap(lap) on CPU: the whole batch (nested vmaps too) goes to the host in ONE callback."""
    calls: list[tuple[int, ...]] = []
    solve = jaxind.stats.lap._host_solve

    def counting(c, maximize, *, method):
        calls.append(np.shape(c))
        return solve(c, maximize, method=method)

    monkeypatch.setattr(jaxind.stats.lap, "_host_solve", counting)
    batch = np.stack([costs("random", (9, 11), s) for s in range(3)] + [costs("ties", (9, 11), 9)])
    out = jax.jit(jax.vmap(lap))(batch)
    assert calls == [(4, 9, 11)]
    assert out.assignment.shape == (4, 9) and out.objective.shape == (4,)
    for c, a in zip(batch, out.assignment, strict=True):
        assert total(c, a) == pytest.approx(optimum(c, False), rel=1e-12)
    flags = np.array([True, False, False, True])  # maximize may be batched too
    nested = jax.jit(jax.vmap(jax.vmap(lambda x, mx: lap(x.T, maximize=mx))))(
        batch.reshape(2, 2, 9, 11), flags.reshape(2, 2)
    )
    assert calls[1:] == [(2, 2, 11, 9)] and nested.assignment.shape == (2, 2, 11)
    for c, a, mx in zip(batch, nested.assignment.reshape(4, 11), flags, strict=True):
        assert total(c.T, a) == pytest.approx(optimum(c.T, bool(mx)), rel=1e-12)


def test_vmapped_auction_under_jit_is_exact_and_flags_non_finite_items():
    batch = np.stack([costs("ties", (12, 12), 20), costs("random", (12, 12), 21), costs("ties", (12, 12), 22)])
    batch[2, 3, 4] = np.nan
    out = jax.jit(jax.vmap(lambda x: lap(x, method="auction")))(batch)
    assert total(batch[0], out.assignment[0]) == optimum(batch[0], False)
    assert total(batch[1], out.assignment[1]) == pytest.approx(optimum(batch[1], False), rel=1e-6)
    assert out.certified.tolist() == [True, True, False]
    assert (np.asarray(out.assignment[2]) == -1).all() and np.isnan(float(out.objective[2]))


def test_bad_costs_raise_cost_matrix_error():
    jitted = jax.jit(lap)
    for bad in (np.zeros(4), np.zeros((2, 3, 3))):
        with pytest.raises(CostMatrixError, match="2-D"):
            jitted(bad)  # at trace time
    with pytest.raises(CostMatrixError, match="real numeric"):
        jitted(np.zeros((3, 3), np.complex64))
    with pytest.raises(CostMatrixError, match="NaN or inf"):
        lap(np.array([[1.0, np.inf], [0.0, 1.0]]))
    assert issubclass(CostMatrixError, JaxindError)
    with pytest.raises(JaxindError, match="method must be one of .*'auction'"):
        lap(np.eye(2), method="hungarian")
    # under jit the values are unknown: a non-finite cost comes back uncertified, unassigned
    res = jitted(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32))
    assert not bool(res.certified) and (np.asarray(res.assignment) == -1).all()
    # empty sides
    assert lap(np.zeros((0, 3))).assignment.shape == (0,)
    assert np.asarray(lap(np.zeros((3, 0))).assignment).tolist() == [-1, -1, -1]


def test_solve_lap_under_jit_points_to_lap():
    with pytest.raises(JaxindError, match=r"jaxind\.stats\.assignment\.lap"):
        jax.jit(lambda c: assignment.solve_lap(c, method="auction"))(np.eye(3, dtype=np.float32))


def test_readme_lap_example_runs_as_a_doctest():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "lap(" in b and ">>>" in b]
    assert blocks, "README has no doctested LAP example"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(blocks[0], {}, "README", "README.md", 0)
    assert len(test.examples) >= 4
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)
