"""One LAP entry point that works under ``jit`` and ``vmap``: :func:`lap` -> :class:`LapResult`.

``lap(cost, *, maximize=False)`` solves the linear assignment problem of an ``(n, m)`` cost
(square or rectangular, either way round) inside traced code. Where it runs (docs/DESIGN.md §5.5):

* CPU backend (``method="auto"``): the exact host solver of :func:`jaxind.stats.assignment.solve_lap`
  (its ``"auto"``: "warm", LAPJV or scipy), reached from inside ``jit`` through
  :func:`jax.pure_callback` with ``vmap_method="broadcast_all"``, so ``vmap`` of :func:`lap`
  over a batch is ONE host call that solves the batch in a loop, like
  :func:`~jaxind.stats.assignment.solve_lap_batched`. On a CPU the host solvers beat the auction at
  every size we measured (BENCHMARKS.md), and a vmapped auction runs every item for as many
  rounds as the slowest one needs.
* GPU/TPU (``method="auto"``): the on-device forward auction
  (:func:`jaxind.stats.assignment.auction_lap`) with epsilon scaling done here: costs reduced and
  scaled by their range, the schedule of :func:`~jaxind.stats.assignment.eps_schedule`, and the
  duality gap of the final prices as the certificate. No host round trip.

The choice is made per platform when the computation is lowered
(:func:`jax.lax.platform_dependent`), so only the branch for the device that runs it is compiled.
``method="host"`` (or a host solver's name: "scipy", "lapjv", "warm") forces the callback and
``method="auction"`` the device auction, on any backend.

Certificate: ``duality_gap`` bounds ``|objective - optimum|`` and ``certified`` says whether it
is within ``rtol * |objective| + atol``, ``atol = max(n, m) * finfo(dtype).eps * cost range``
(what the working precision resolves in a total; it matters for optima near 0). The host
solvers are exact float64 shortest-augmenting-path algorithms (optimal by construction; they do
not expose their duals), so their gap is reported as 0. The auction's gap is the LP duality gap
of the dual built from its prices (``assignment.duality_gap``), computed in the working dtype
(float32 unless ``jax_enable_x64`` is on and the cost is float64): float32 prices cannot always
certify ``rtol = 1e-6`` on costs whose optimum is small against their range (uniform random
costs), and then ``certified`` is False; integer-valued costs of range below about ``2^20 / m``
come out exact.

A non-finite cost gives :class:`~jaxind.stats.assignment.CostMatrixError` when its values are known
(an eager call); under ``jit`` they are not, and the result is ``assignment = -1``,
``objective = NaN``, ``certified = False``. A cost that is not 2-D or not real numeric is an
error when traced.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxind.errors import JaxindError
from jaxind.stats import assignment
from jaxind.stats.assignment import CostMatrixError

__all__ = ["METHODS", "LapOptionError", "LapResult", "lap"]

METHODS = ("auto", "host", "auction", "scipy", "lapjv", "warm")
# Last epsilon of the device auction, relative to the cost range: float32 prices resolve about
# 2^-24 of it, so smaller steps buy nothing; in float64 the schedule goes on to 2^-40.
_REL_FINAL = {np.dtype(np.float32): 2.0**-23, np.dtype(np.float64): 2.0**-40}


class LapOptionError(JaxindError, ValueError):
    """An unknown ``method`` for :func:`lap` (the message names the valid ones)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LapResult:
    """Result of :func:`lap` (a pytree: returned through ``jit``, stacked by ``vmap``).

    assignment: (n,) int32, the column of each row; -1 for the ``n - m`` unmatched rows when
      ``n > m`` (and everywhere for a non-finite cost under ``jit``).
    objective: () ``sum_i cost[i, assignment[i]]`` over matched rows, in the working dtype.
    duality_gap: () >= 0, a bound on ``|objective - optimum|`` (0 for the exact host solvers).
    certified: () bool, ``duality_gap <= rtol * |objective| + atol`` (module doc): optimal within
      ``rtol`` up to the working precision.
    num_iters: () int32, auction bidding rounds (0 on the host path).

    ``jax.grad`` of ``objective`` with respect to the cost is the assignment's indicator matrix
    (the solvers are not differentiated: the optimum's envelope gradient).
    """

    assignment: jax.Array
    objective: jax.Array
    duality_gap: jax.Array
    certified: jax.Array
    num_iters: jax.Array


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """float32, or float64 for float64/int64 costs when x64 is on; low-precision floats widen."""
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    if dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize == 8:
        return np.dtype(wide)
    return np.dtype(np.float32)


def _checked(cost) -> jax.Array:
    """``cost`` as an array after the checks that need no values (rank, dtype) and, when its
    values are known (not traced), the finiteness check."""
    traced = isinstance(cost, jax.core.Tracer)
    if not traced and not isinstance(cost, (np.ndarray, jax.Array)):
        cost = np.asarray(cost)
    if cost.ndim != 2:
        raise CostMatrixError(
            f"lap: cost must be a 2-D (n, m) matrix, got shape {tuple(cost.shape)} (vmap over leading batch axes)"
        )
    dtype = np.dtype(cost.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or dtype == np.dtype(bool)):
        raise CostMatrixError(f"lap: cost must be real numeric, got dtype {dtype}")
    if not traced and cost.size and jnp.issubdtype(dtype, jnp.floating):
        xp = np if isinstance(cost, np.ndarray) else jnp
        if not bool(xp.isfinite(cost).all()):
            raise CostMatrixError(
                "lap: cost contains NaN or inf entries; the assignment is undefined "
                "(replace them by large finite costs or drop those rows/columns)"
            )
    return jnp.asarray(cost, _working_dtype(dtype))


def lap(
    cost,
    *,
    maximize: bool = False,
    method: str = "auto",
    rtol: float = assignment.DEFAULT_RTOL,
    block: int | None = None,
    max_iter: int = 200_000,
) -> LapResult:
    """Solve the linear assignment problem of ``cost (n, m)``; works under ``jit`` and ``vmap``.

    Args:
      cost: (n, m) real array, any ``n, m`` (rectangular either way); ``vmap`` for batches.
      maximize: maximise the total instead of minimising it.
      method: "auto" (host solver on CPU, device auction on GPU/TPU; see the module doc),
        "host" (the host solver everywhere, through a callback), "scipy" / "lapjv" / "warm" (that
        host solver), "auction" (the device auction everywhere).
      rtol: relative tolerance of ``certified``.
      block: auction rows bidding per round (default by backend); max_iter: auction round cap.

    Returns:
      :class:`LapResult`. ``result.assignment[i]`` is row ``i``'s column (-1: unmatched).

    Raises:
      CostMatrixError: cost not 2-D or not real numeric; NaN/inf entries in an eager call.
      LapOptionError: unknown ``method`` (a ``JaxindError`` and a ``ValueError``).
    """
    if method not in METHODS:
        raise LapOptionError(f"lap: method must be one of {METHODS}, got {method!r}")
    cost = _checked(cost)
    # `maximize` is traced: minimising and maximising share one compilation.
    return _lap(cost, jnp.asarray(maximize, bool), method=method, rtol=float(rtol), block=block, max_iter=int(max_iter))


@functools.partial(jax.jit, static_argnames=("method", "rtol", "block", "max_iter"))
def _lap(
    cost: jax.Array, maximize: jax.Array, *, method: str, rtol: float, block: int | None, max_iter: int
) -> LapResult:
    n, m = cost.shape
    if n == 0 or m == 0:
        zero = jnp.zeros((), cost.dtype)
        return LapResult(jnp.full((n,), -1, jnp.int32), zero, zero, jnp.asarray(True), jnp.asarray(0, jnp.int32))
    host = functools.partial(_host_branch, method="auto" if method == "host" else method)
    device = functools.partial(_auction_branch, rtol=rtol, block=block, max_iter=max_iter)
    # The solvers see a constant: the objective's gradient is then the optimal assignment's
    # indicator matrix (the envelope theorem; a subgradient where the optimum is not unique).
    fixed = jax.lax.stop_gradient(cost)
    if method == "auto":
        cols, gap, certified, iters, finite = jax.lax.platform_dependent(fixed, maximize, cpu=host, default=device)
    elif method == "auction":
        cols, gap, certified, iters, finite = device(fixed, maximize)
    else:
        cols, gap, certified, iters, finite = host(fixed, maximize)
    matched = cols >= 0
    picked = jnp.take_along_axis(cost, jnp.maximum(cols, 0)[:, None], axis=1)[:, 0]
    objective = jnp.sum(jnp.where(matched, picked, 0))
    return LapResult(
        assignment=jnp.where(finite, cols, -1),
        objective=jnp.where(finite, objective, jnp.nan),
        duality_gap=jnp.where(finite, gap, jnp.inf),
        certified=finite & certified,
        num_iters=iters,
    )


def _host_solve(costs: np.ndarray, maximize: np.ndarray, *, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The host callback: ``costs (..., n, m)``, ``maximize (...)`` -> ``(col_of_row (..., n) int32,
    finite (...) bool)``, one solve per item (a non-finite item is left unassigned)."""
    costs = np.asarray(costs)
    n, m = costs.shape[-2:]
    flat = costs.reshape(-1, n, m)
    flags = np.broadcast_to(np.asarray(maximize), costs.shape[:-2]).reshape(-1)
    out = np.full((flat.shape[0], n), -1, np.int32)
    finite = np.zeros(flat.shape[0], bool)
    for i, c in enumerate(flat):
        finite[i] = np.isfinite(c).all()
        if finite[i]:
            rows, cols = assignment.solve_lap(c, maximize=bool(flags[i]), method=method)
            out[i, rows] = cols
    return out.reshape(costs.shape[:-1]), finite.reshape(costs.shape[:-2])


def _host_branch(cost: jax.Array, maximize: jax.Array, *, method: str):
    """Exact host solver through a callback; a vmapped batch is one call (``broadcast_all``)."""
    n = cost.shape[0]
    cols, finite = jax.pure_callback(
        functools.partial(_host_solve, method=method),
        (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_)),
        cost,
        maximize,
        vmap_method="broadcast_all",
    )
    return cols, jnp.zeros((), cost.dtype), jnp.asarray(True), jnp.asarray(0, jnp.int32), finite


def _slack_gap(benefit: jax.Array, col_of_row: jax.Array, prices: jax.Array) -> jax.Array:
    """The duality gap of :func:`jaxind.stats.assignment.duality_gap`'s dual, summed as slacks.

    ``dual - primal = sum_i (u_i - benefit[i, col_i] + q[col_i]) + sum_{j not assigned} q_j``:
    every term is >= 0 and small, and a row whose column is its best one adds exactly 0, so the
    sum keeps the precision that a difference of two large totals loses in float32.
    """
    n, m = benefit.shape
    lam = jnp.min(prices[col_of_row])
    q = jnp.maximum(prices - lam, 0) if n < m else prices - jnp.min(prices)
    reduced = benefit - q
    u = jnp.max(reduced, axis=1)
    slack = u - jnp.take_along_axis(reduced, col_of_row[:, None], axis=1)[:, 0]
    free = jnp.ones((m,), bool).at[col_of_row].set(False)
    return jnp.sum(slack) + jnp.sum(jnp.where(free, q, 0))


def _auction_branch(cost: jax.Array, maximize: jax.Array, *, rtol: float, block: int | None, max_iter: int):
    """The on-device auction with internal epsilon scaling; returns (cols, gap, certified, iters, finite)."""
    n, m = cost.shape
    finite = jnp.all(jnp.isfinite(cost))
    cost = jnp.where(finite, cost, jnp.zeros((), cost.dtype))  # a NaN must not stall the auction
    transpose = n > m  # the auction runs from the smaller side
    c = cost.T if transpose else cost
    k, mm = c.shape
    a, scale = assignment._benefit(c, jnp.where(maximize, 1.0, -1.0), c.dtype)
    rel = assignment.eps_schedule(rel_final=_REL_FINAL[np.dtype(c.dtype)])
    res = assignment.auction_lap(
        a, jnp.asarray(rel, c.dtype) * scale, block=block or assignment._default_block(k), max_iter=max_iter
    )
    col_of_row = jnp.where(res.converged, res.col_of_row, -1)
    gap = _slack_gap(a, jnp.maximum(col_of_row, 0), res.prices)
    if transpose:  # rows of `c` are the columns of `cost`
        cols = (
            jnp.full((n,), -1, jnp.int32)
            .at[jnp.where(col_of_row >= 0, col_of_row, n)]
            .set(jnp.arange(k, dtype=jnp.int32), mode="drop")
        )
    else:
        cols = col_of_row.astype(jnp.int32)
    primal = jnp.sum(jnp.take_along_axis(c, jnp.maximum(col_of_row, 0)[:, None], axis=1))
    # atol: what the working precision resolves in a total of `mm` entries of the cost range
    tol = rtol * jnp.abs(primal) + mm * jnp.finfo(c.dtype).eps * scale
    return cols, gap, res.converged & (gap <= tol), res.num_iters, finite
