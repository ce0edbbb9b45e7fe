"""Linear assignment (LAP) solvers: a jitted auction for accelerators, exact host solvers.

The LAP is the hot spot of CSU/CSH/MATCH (docs/DESIGN.md §1, §5.5): match ``n`` hidden units of model
A to ``m`` of model B (``n, m`` up to 14,336) minimising a sum of squared distances or
maximising a sum of cosine similarities.

Inside ``jit``/``vmap`` use :func:`lap` (``jaxind/stats/lap.py``, re-exported here): one entry point
returning a :class:`LapResult` pytree; :func:`solve_lap` below is the host entry point.

Solvers (``method=``)
  * ``"scipy"`` - :func:`scipy.optimize.linear_sum_assignment` (shortest augmenting path,
    exact, float64, host only).
  * ``"auction"`` - Bertsekas' auction algorithm with epsilon-scaling, written in JAX
    (:func:`auction_lap`): every unassigned row bids in parallel for its best column, which is
    one gather plus one top-2 reduction per iteration, the shape of work accelerators like.
    Static shapes, ``jit``/``vmap`` friendly.
  * ``"hungarian"`` - :func:`optax.assignment.hungarian_algorithm` (exact, jittable, but its
    loops are sequential: O(n^3) small steps, only sensible for small ``n``).
  * ``"lapjv"`` - Jonker-Volgenant from the optional ``lap`` package (``pip install
    "jaxind[fast]"``; exact, host only; 2-5x faster than scipy on random costs in our CPU runs).
  * ``"warm"`` - a short CPU auction for column prices, then the exact host solver (LAPJV,
    else scipy) on the price-reduced cost (see "Warm start" below). Square costs; rectangular
    ones go straight to the host solver.
  * ``"auto"`` - :func:`default_method`: on a CPU backend "warm" for square costs of side >= 512
    whose rows compete for few columns (:func:`competition` < 0.4: MATCH's costs of unrelated
    models; CSU's weight cosines look like random costs, 0.63), else the host solver (LAPJV
    where ``lap`` is installed, else scipy); the auction on GPU/TPU for square costs, the host
    solver for rectangular ones. On a 2-core
    CPU the host solvers beat the jitted auction at every size we measured (see
    ``benchmarks/bench_lap.py``); the auction is the one that can use an accelerator.

Warm start (``"warm"``): why the costs of independent models are slow, and what helps
  MATCH's costs are squared distances between hidden units' activations, ``D = a 1^T + 1 b^T -
  2 G_A^T G_B`` with ``G`` of rank <= d (576 for SmolLM2, h = 1,536). With row and column means
  removed they are nearly rank one (89-100% of the energy on SmolLM2's layers: activations
  share a common direction), so most rows prefer the same few columns (2-35% distinct row
  minima, against 63% on uniform random costs), the optimal column of a row sits a median
  8-600 places down its reduced row, and a shortest augmenting path solver started from zero
  duals scans 7-16x more columns than on uniform costs (scipy and LAPJV take 3-20x their
  uniform-cost time). Given the optimal duals, the same solvers finish in 10-30 ms.
  "warm" gets close prices in three cheap steps: the exact optimal prices of the rank-one part
  (:func:`rank_one_prices`: a sort and a cumulative sum), a Gauss-Seidel-like auction from
  there (:func:`queue_auction_prices`: a FIFO queue of free rows, 8 bidding per round, each
  round touching only their rows; epsilon from the typical gap between a row's candidate
  columns down to 1/100 of it, :func:`warm_schedule`), then the host solver on
  ``cost - u - v``. Subtracting row and column constants changes every permutation's total by
  the same amount, so the optimum is the host solver's, whatever the prices: they only decide
  the speed (bids are capped at ``50 n``). Rectangular costs would need padding rows that make
  the auction slow, so "warm" hands them to the host solver. The gate and up costs of one layer
  do not share prices usefully for independent models (their matchings agree on 0.1% of units,
  and the gate prices slow the up solve down), so each solve starts afresh.

Exactness of the auction (the guarantee)
  The auction ends with an assignment and column prices ``p`` that satisfy eps-complementary
  slackness, so the assignment is within ``max(n, m) * eps`` of optimal.
  :func:`solve_lap` does not rely on that bound alone: it builds the dual solution implied by
  the prices *in float64* (``u_i = max_j (a_ij - q_j)``) and computes the duality gap
  ``dual - primal``, which by weak LP duality bounds the distance to the optimum. The result is
  returned only when ``gap <= rtol * |objective| + atol`` (``rtol = 1e-6`` by default,
  ``atol = 1e-12 * cost range * max(n, m)``, which only matters for an optimum near 0), i.e.
  the objective is *certified* within ``rtol`` of the exact optimum. Float32 prices (the fast
  path on GPUs) are not always precise enough for that at ``n ~ 10^4`` with costs whose optimum
  is tiny compared with their range (uniform random costs: optimum ~ 1.6 whatever ``n``), so
  when the float32 certificate fails the auction continues in float64 (``jax.enable_x64``),
  warm-started from the float32 prices and assignment, down to ``eps = tol / max(n, m)``,
  where the certificate holds by construction (on uniform random costs this is the usual path:
  the float64 stage adds ~10-20% rounds). If the auction hits its iteration cap the solver falls
  back to scipy with a warning. Costs are first reduced (row, and for square matrices column,
  minima subtracted) so prices stay small and float32 resolves them finely.

  On near-permutation costs (the dependent-models case) the optimum is unique with a large gap
  to the runner-up, and the auction returns exactly scipy's assignment (tested).

Rectangular problems
  The auction runs from the smaller side (``n <= m`` after an optional transpose). The ``m - n``
  missing rows are implicit dummy rows of benefit 0; all dummies are alike, so the unassigned
  ones bid together for the cheapest columns (one sort of the prices per iteration) instead of
  fighting one at a time. This is correct (certified like the square case) but slow: dummies
  and real rows raise the prices of the cheap columns by about eps per round, so rectangular
  problems take many more rounds (a known weakness of the forward auction on asymmetric
  problems). "auto" therefore sends rectangular costs to scipy.

Equivariance
  With ``key`` given, rows and columns are relabelled by independent uniform random
  permutations before solving and the labels are mapped back afterwards, so tie-breaking
  (and the path the auction takes) cannot depend on index order: the output's law is
  equivariant under relabelling of the input. With ``key=None`` no relabelling is done
  (deterministic, like scipy); for continuous costs the optimum is unique with probability one,
  so every exact solver is then equivariant anyway. Statistics that need exact equivariance in
  the presence of ties should pass a key.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from jaxind.errors import JaxindError

__all__ = [
    "AuctionResult",
    "CostMatrixError",
    "DEFAULT_RTOL",
    "METHODS",
    "WARM_MAX_COMPETITION",
    "WARM_MIN_N",
    "assignment_cost",
    "auction_lap",
    "competition",
    "default_method",
    "duality_gap",
    "eps_schedule",
    "have_lapjv",
    "lapjv_exact",
    "queue_auction_prices",
    "rank_one_prices",
    "solve_auction",
    "solve_lap",
    "solve_lap_batched",
    "solve_warm",
    "warm_prices",
    "warm_schedule",
]

METHODS = ("auto", "scipy", "auction", "hungarian", "lapjv", "warm")
DEFAULT_RTOL = 1e-6
# Last float32 epsilon, relative to the cost range; the float64 stage continues from there.
_REL_EPS32 = 2.0**-20


class CostMatrixError(JaxindError, ValueError):
    """A cost matrix with the wrong rank, a non-numeric dtype, or NaN/inf entries."""


class AuctionResult(NamedTuple):
    """Output of :func:`auction_lap` (``n`` rows, ``m`` columns, ``n <= m``).

    col_of_row: (n,) int32, column assigned to each row (-1 if not converged).
    prices: (m,) column prices (the dual variables).
    num_iters: () int32, bidding rounds used over all phases.
    converged: () bool, every row assigned.
    """

    col_of_row: jax.Array
    prices: jax.Array
    num_iters: jax.Array
    converged: jax.Array


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_cost(cost, ndim: int, name: str = "cost"):
    """Return ``cost`` as a jax or numpy array after checking rank, dtype and finiteness."""
    if isinstance(cost, jax.core.Tracer):
        raise JaxindError(
            f"solve_lap runs on the host and cannot take a traced {name} (inside jit/vmap/grad); "
            "use jaxind.stats.assignment.lap, which works under jit and vmap"
        )
    if not isinstance(cost, (np.ndarray, jax.Array)):
        cost = np.asarray(cost)
    if cost.ndim != ndim:
        what = "a 2-D (n, m) matrix" if ndim == 2 else "a 3-D (batch, n, m) array"
        raise CostMatrixError(f"{name} must be {what}, got shape {tuple(cost.shape)}")
    if not (jnp.issubdtype(cost.dtype, jnp.floating) or jnp.issubdtype(cost.dtype, jnp.integer) or cost.dtype == bool):
        raise CostMatrixError(f"{name} must be real numeric, got dtype {cost.dtype}")
    if cost.size and jnp.issubdtype(cost.dtype, jnp.floating):
        xp = np if isinstance(cost, np.ndarray) else jnp
        finite = bool(xp.isfinite(cost).all())
        if not finite:
            raise CostMatrixError(
                f"{name} contains NaN or inf entries; the assignment is undefined "
                "(replace them by large finite costs or drop those rows/columns)"
            )
    return cost


def _check_method(method: str, shape: tuple[int, ...]) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return default_method(shape=shape)
    return method


# Smallest side for which "auto" considers "warm": below it the host solvers take milliseconds
# and the auction kernel's one-off compilation (about a second) would not pay for itself.
WARM_MIN_N = 512
# "auto" sends square costs whose competition() is below this to "warm".
WARM_MAX_COMPETITION = 0.4


def default_method(
    backend: str | None = None, shape: tuple[int, ...] | None = None, cost=None, maximize: bool = False
) -> str:
    """The fastest exact solver for ``backend`` (default: JAX's default backend), ``shape`` and,
    when given, the ``cost`` itself.

    CPU: "warm" for square costs of side >= ``WARM_MIN_N`` whose :func:`competition` is below
    ``WARM_MAX_COMPETITION`` (MATCH's costs of unrelated models: 5.1x faster than scipy and 3.1x
    than LAPJV there, medians in BENCHMARKS.md); otherwise LAPJV when the ``lap`` package
    is installed (2-5x faster than scipy on random costs, exact), else scipy. Without ``cost`` the
    competition is unknown and the host solver is returned. GPU/TPU: the jitted auction for square
    problems. Rectangular problems go to the host solver everywhere: the auction's dummy rows make
    it slow there (see "Rectangular problems" above).
    """
    backend = backend or jax.default_backend()
    host = "lapjv" if have_lapjv() else "scipy"
    side = shape[-1] if shape is not None and len(shape) >= 2 and shape[-1] == shape[-2] else 0
    if backend == "cpu":
        if cost is not None and side >= WARM_MIN_N:
            if competition(cost, maximize) < WARM_MAX_COMPETITION:
                return "warm"
        return host
    if shape is not None and shape[-1] != shape[-2]:
        return host
    return "auction"


@functools.lru_cache(maxsize=1)
def have_lapjv() -> bool:
    try:
        import lap  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The auction kernel (pure JAX, static shapes)
# --------------------------------------------------------------------------------------------


def eps_schedule(rel_start: float = 0.05, rel_final: float = 2.0**-20, factor: float = 0.125) -> np.ndarray:
    """Geometric epsilon-scaling schedule, relative to the cost range.

    Returns a float64 numpy array ``[rel_start, rel_start*factor, ..., rel_final]`` (the last
    entry exactly ``rel_final``); multiply by the range of the (reduced) costs.
    """
    if not (0 < factor < 1) or rel_final <= 0:
        raise ValueError("need 0 < factor < 1 and rel_final > 0")
    rel_start = max(rel_start, rel_final)
    k = max(0, math.ceil(math.log(rel_final / rel_start) / math.log(factor)))
    sched = rel_start * factor ** np.arange(k + 1, dtype=np.float64)
    sched[-1] = rel_final
    return sched


def _top2(vals: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best value, its column, and second-best value along the last axis."""
    j1 = jnp.argmax(vals, axis=-1)
    v1 = jnp.take_along_axis(vals, j1[..., None], axis=-1)[..., 0]
    masked = jnp.where(jnp.arange(vals.shape[-1]) == j1[..., None], -jnp.inf, vals)
    v2 = jnp.max(masked, axis=-1)
    return v1, j1, v2


def _start_phase(benefit: jax.Array, prices: jax.Array, person_obj: jax.Array, e: jax.Array) -> jax.Array:
    """Keeps only the pairs that satisfy e-complementary slackness and frees the others.

    ``person_obj (m,)`` is the column held by each of the ``m`` persons (``n`` real rows, then the
    dummies), -1 when free.
    """
    n, m = benefit.shape
    arange_m = jnp.arange(m, dtype=jnp.int32)
    best = jnp.max(benefit - prices, axis=1)
    obj = person_obj[:n]
    cur = benefit[jnp.arange(n), jnp.maximum(obj, 0)] - prices[jnp.maximum(obj, 0)]
    keep = jnp.concatenate(
        [
            (obj >= 0) & (cur >= best - e),
            (person_obj[n:] >= 0) & (-prices[jnp.maximum(person_obj[n:], 0)] >= -jnp.min(prices) - e),
        ]
    )
    person_obj = jnp.where(keep, person_obj, -1)
    # Repair double ownership from a stale warm start: later persons lose.
    owner = jnp.full((m,), m, jnp.int32).at[jnp.where(person_obj >= 0, person_obj, m)].min(arange_m, mode="drop")
    ok = (person_obj >= 0) & (owner[jnp.maximum(person_obj, 0)] == arange_m)
    return jnp.where(ok, person_obj, -1)


def _dummy_bids(
    prices: jax.Array, person_obj: jax.Array, n: int, e: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bids of the ``m - n`` dummy rows (benefit 0 everywhere): the unassigned ones take the
    cheapest columns together. Returns ``(bidders, targets, bids)``; target ``m`` = no bid."""
    m = prices.shape[0]
    d_un = person_obj[n:] < 0
    num_un = jnp.sum(d_un)
    order = jnp.argsort(prices)
    sorted_p = prices[order]
    rank = jnp.cumsum(d_un) - 1
    d_target = order[jnp.clip(rank, 0, m - 1)]
    d_bid = sorted_p[jnp.minimum(num_un, m - 1)] + e
    d_bid = jnp.maximum(d_bid, jnp.nextafter(prices[d_target], jnp.inf))
    bidders = n + jnp.arange(m - n, dtype=jnp.int32)
    return bidders, jnp.where(d_un, d_target, m), jnp.where(d_un, d_bid, -jnp.inf)


def _bid_round(
    benefit: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array], e: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One bidding round: up to ``size`` unassigned rows (and every unassigned dummy) bid for
    their best column; each column goes to its highest bidder. ``carry = (prices, person_obj, it)``."""
    n, m = benefit.shape
    prices, person_obj, it = carry
    dtype = benefit.dtype
    arange_m = jnp.arange(m, dtype=jnp.int32)
    big = jnp.asarray(m, jnp.int32)  # "no target" sentinel, dropped by scatters
    # Real bidders: up to `size` unassigned rows, each bids for its best column.
    idx = jnp.nonzero(person_obj[:n] < 0, size=size, fill_value=n)[0]
    valid = idx < n
    rows = benefit[jnp.minimum(idx, n - 1)] - prices
    v1, j1, v2 = _top2(rows)
    v2 = jnp.where(jnp.isfinite(v2), v2, v1)  # m == 1
    real_bid = prices[j1] + (v1 - v2) + e
    real_bid = jnp.maximum(real_bid, jnp.nextafter(prices[j1], jnp.inf))
    bidders = [idx]
    targets = [jnp.where(valid, j1, big)]
    bids = [jnp.where(valid, real_bid, -jnp.inf)]
    if m > n:
        d_bidders, d_targets, d_bids = _dummy_bids(prices, person_obj, n, e)
        bidders.append(d_bidders)
        targets.append(d_targets)
        bids.append(d_bids)
    all_bidders = jnp.concatenate(bidders).astype(jnp.int32)
    all_targets = jnp.concatenate(targets).astype(jnp.int32)
    all_bids = jnp.concatenate(bids)
    # Each column goes to its highest bidder (lowest id among equal bids).
    best_bid = jnp.full((m,), -jnp.inf, dtype).at[all_targets].max(all_bids, mode="drop")
    is_win = (all_targets < m) & (all_bids == best_bid[jnp.minimum(all_targets, m - 1)])
    winner = jnp.full((m,), m, jnp.int32).at[all_targets].min(jnp.where(is_win, all_bidders, m), mode="drop")
    sold = winner < m
    owner = jnp.full((m,), m, jnp.int32).at[jnp.where(person_obj >= 0, person_obj, m)].set(arange_m, mode="drop")
    person_obj = person_obj.at[jnp.where(sold, owner, m)].set(-1, mode="drop")
    person_obj = person_obj.at[jnp.where(sold, winner, m)].set(arange_m, mode="drop")
    prices = jnp.where(sold, best_bid, prices)
    return prices, person_obj, it + 1


@functools.partial(jax.jit, static_argnames=("block", "small_block", "max_iter"))
def auction_lap(
    benefit: jax.Array,
    eps: jax.Array,
    init_prices: jax.Array | None = None,
    init_col_of_row: jax.Array | None = None,
    *,
    block: int = 256,
    small_block: int = 16,
    max_iter: int = 200_000,
) -> AuctionResult:
    """Forward auction with epsilon-scaling: maximise ``sum_i benefit[i, col[i]]``.

    Args:
      benefit: (n, m) float array with ``1 <= n <= m`` (transpose first otherwise). Rows beyond
        ``n`` are implicit dummy rows of benefit 0, so rectangular problems are handled.
      eps: (num_phases,) decreasing epsilons (absolute, same units as ``benefit``).
      init_prices: optional (m,) warm-start prices (default zeros).
      init_col_of_row: optional (n,) warm-start assignment (-1 = unassigned); pairs that violate
        eps-complementary slackness at the first phase are dropped.
      block: at most this many unassigned rows bid per round (static; bigger suits GPUs).
      small_block: when at most this many rows are unassigned, rounds use this smaller block.
      max_iter: cap on bidding rounds over all phases (static).

    Returns:
      :class:`AuctionResult`. When ``converged``, the assignment is within ``m * eps[-1]`` of
      optimal (eps-complementary slackness).
    """
    n, m = benefit.shape
    dtype = benefit.dtype
    block = min(block, n)
    small = min(small_block, block)
    prices = jnp.zeros((m,), dtype) if init_prices is None else init_prices.astype(dtype)
    # person_obj: object held by each of the m persons (n real rows, then the dummies).
    person_obj = jnp.full((m,), -1, jnp.int32)
    if init_col_of_row is not None:
        person_obj = person_obj.at[:n].set(init_col_of_row.astype(jnp.int32))

    def phase(carry, e):
        prices, person_obj, it = carry
        person_obj = _start_phase(benefit, prices, person_obj, e)

        def cond(c):
            return jnp.any(c[1] < 0) & (c[2] < max_iter)

        def body(c):
            if small >= block:
                return _bid_round(benefit, c, e, block)
            # Few bidders left (the usual tail): a small block avoids wasted rows.
            return jax.lax.cond(
                jnp.sum(c[1][:n] < 0) > small,
                lambda c: _bid_round(benefit, c, e, block),
                lambda c: _bid_round(benefit, c, e, small),
                c,
            )

        carry = jax.lax.while_loop(cond, body, (prices, person_obj, it))
        return carry, None

    (prices, person_obj, it), _ = jax.lax.scan(
        phase, (prices, person_obj, jnp.asarray(0, jnp.int32)), eps.astype(dtype)
    )
    converged = jnp.all(person_obj >= 0)
    return AuctionResult(person_obj[:n], prices, it, converged)


def duality_gap(benefit: jax.Array, col_of_row: jax.Array, prices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Primal value and LP duality gap of an assignment, from auction prices.

    Args:
      benefit: (n, m), ``n <= m``, maximisation form.
      col_of_row: (n,) assignment; prices: (m,) column prices.

    Returns:
      (primal, gap): ``primal = sum_i benefit[i, col[i]]``; ``gap >= 0`` bounds how far
      ``primal`` is below the optimum (weak duality), computed in ``benefit``'s dtype. The dual
      is ``q_j = max(p_j - lam, 0)``, ``u_i = max_j (benefit_ij - q_j)``, with ``lam`` the lowest
      price of an assigned column, a feasible dual for the rectangular LP.
    """
    n, m = benefit.shape
    prices = prices.astype(benefit.dtype)
    lam = jnp.min(prices[col_of_row])
    q = jnp.maximum(prices - lam, 0) if n < m else prices - jnp.min(prices)
    u = jnp.max(benefit - q, axis=1)
    primal = jnp.sum(benefit[jnp.arange(n), col_of_row])
    dual = jnp.sum(u) + jnp.sum(q)
    return primal, dual - primal


# --------------------------------------------------------------------------------------------
# Price warm start for the host solvers ("warm")
# --------------------------------------------------------------------------------------------


def _row_top2(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best value, a column holding it, second-best value along the last axis.

    Vectorisable reductions only (max, integer max, sum): on CPU a variadic argmax is several
    times slower than these at the row lengths of interest.
    """
    m = rows.shape[-1]
    w1 = jnp.max(rows, axis=-1)
    top = rows == w1[..., None]
    j1 = jnp.max(jnp.where(top, jnp.arange(m, dtype=jnp.int32), -1), axis=-1)
    ties = jnp.sum(top.astype(jnp.int32), axis=-1) > 1
    w2 = jnp.where(ties, w1, jnp.max(jnp.where(top, -jnp.inf, rows), axis=-1))
    return w1, j1, jnp.where(jnp.isfinite(w2), w2, w1)


def _queue_round(benefit, e, k, state):
    """Pops up to ``k`` free rows off the circular queue; each bids for its best column, each column
    goes to its highest bidder; losers and displaced owners go back on the queue.
    ``state = (prices, owner, queue, head, num_free, bids)``."""
    n, m = benefit.shape
    prices, owner, queue, head, num_free, bids = state
    slots = jnp.arange(k, dtype=jnp.int32)
    count = jnp.minimum(num_free, k)
    valid = slots < count
    rows = queue[(head + slots) % n]
    w1, j1, w2 = _row_top2(benefit[rows] - prices)
    pj = prices[j1]
    bid = jnp.maximum(pj + (w1 - w2 + e), jnp.nextafter(pj, jnp.inf))  # always a strict raise
    bid = jnp.where(valid, bid, -jnp.inf)
    if k > 1:  # a bid wins when no other bid for the same column is higher (lower slot on ties)
        same = (j1[:, None] == j1[None, :]) & valid[None, :]
        beats = (bid[:, None] > bid[None, :]) | ((bid[:, None] == bid[None, :]) & (slots[:, None] <= slots[None, :]))
        win = valid & jnp.all(~same | beats, axis=1)
    else:
        win = valid
    target = jnp.where(win, j1, m)
    displaced = jnp.where(win, owner[jnp.minimum(j1, m - 1)], -1)
    prices = prices.at[target].set(bid, mode="drop")
    owner = owner.at[target].set(rows, mode="drop")
    back = jnp.concatenate([jnp.where(valid & ~win, rows, -1), displaced])
    push = back >= 0
    head = (head + count) % n
    left = num_free - count
    queue = queue.at[jnp.where(push, (head + left + jnp.cumsum(push) - 1) % n, n)].set(back, mode="drop")
    return prices, owner, queue, head, left + jnp.sum(push).astype(jnp.int32), bids + count


@functools.partial(jax.jit, static_argnames=("block",))
def queue_auction_prices(
    benefit: jax.Array,
    eps: jax.Array,
    num_phases: jax.Array,
    max_bids: jax.Array,
    init_prices: jax.Array | None = None,
    *,
    block: int = 8,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gauss-Seidel-like forward auction for column prices (a CPU kernel; square ``benefit``).

    Free rows wait in a FIFO queue; each round the first ``block`` of them bid (one bid at a time
    once fewer are free), so a round touches ``block`` rows of ``benefit`` instead of all of them.
    Assignments that still satisfy eps-complementary slackness are kept from one phase to the next.

    Args:
      benefit: (n, n) float array (maximisation form).
      eps: (P,) epsilons; phases ``0 .. num_phases - 1`` run.
      num_phases: () int, phases to run (traced: one compilation for every schedule length).
      max_bids: () int, stop after this many bids over all phases (traced).
      init_prices: optional (n,) starting prices (default zeros).
      block: rows bidding per round while at least that many are free (static).

    Returns:
      ``(prices (n,), bids (), num_free ())``: the column prices, the bids made, and the rows
      still free when it stopped (0 unless ``max_bids`` was reached).
    """
    n, m = benefit.shape
    dtype = benefit.dtype

    def phase(t, carry):
        prices, owner, bids, _ = carry
        e = eps[t].astype(dtype)
        best = jnp.max(benefit - prices, axis=1)
        held = jnp.maximum(owner, 0)
        keep = (owner >= 0) & (benefit[held, jnp.arange(m)] - prices >= best[held] - e)
        owner = jnp.where(keep, owner, -1)
        free = ~jnp.zeros((n,), bool).at[jnp.where(keep, owner, n)].set(True, mode="drop")
        queue = jnp.nonzero(free, size=n, fill_value=0)[0].astype(jnp.int32)

        def body(state):
            if block == 1:
                return _queue_round(benefit, e, 1, state)
            return jax.lax.cond(
                state[4] >= block,
                functools.partial(_queue_round, benefit, e, block),
                functools.partial(_queue_round, benefit, e, 1),
                state,
            )

        state = (prices, owner, queue, jnp.int32(0), jnp.sum(free).astype(jnp.int32), bids)
        prices, owner, _, _, num_free, bids = jax.lax.while_loop(lambda s: (s[4] > 0) & (s[5] < max_bids), body, state)
        return prices, owner, bids, num_free

    prices = jnp.zeros((m,), dtype) if init_prices is None else init_prices.astype(dtype)
    init = (prices, jnp.full((m,), -1, jnp.int32), jnp.int32(0), jnp.int32(0))
    prices, _, bids, num_free = jax.lax.fori_loop(0, num_phases, phase, init)
    return prices, bids, num_free


def warm_schedule(benefit: np.ndarray, start_at_spread: bool = True) -> np.ndarray:
    """Epsilons for :func:`queue_auction_prices` on a row-reduced benefit (row maxima 0).

    Divides by 5 per phase down to ``spread / 100``, where ``spread`` is the median over a sample
    of rows of the 11th-best value's distance to the best: the scale at which rows tell their
    candidate columns apart. Starts at ``spread`` when the prices are already close (warm start
    from :func:`rank_one_prices`), else at ``max(0.05 * range, spread)``, which keeps the bids per
    phase bounded on heavy-tailed costs. Ending at the spread, not at the range, stops where the
    prices are good enough for the exact solver that follows. At most ``_WARM_MAX_PHASES`` entries.
    """
    n, m = benefit.shape
    rng_ = float(-benefit.min())
    sample = benefit[:: max(1, n // 128)]
    k = min(10, m - 1)
    spread = float(-np.median(np.partition(sample, m - 1 - k, axis=1)[:, m - 1 - k])) if k > 0 else 0.0
    spread = max(spread, rng_ * 1e-6, float(np.finfo(np.float32).tiny))
    start = spread if start_at_spread else max(0.05 * rng_, spread)
    num = 1 + max(0, math.ceil(math.log(spread / 100.0 / start) / math.log(0.2)))
    return start * 0.2 ** np.arange(min(num, _WARM_MAX_PHASES), dtype=np.float64)


@functools.partial(jax.jit, static_argnames=("iters",))
def rank_one_prices(benefit: jax.Array, iters: int = 6) -> tuple[jax.Array, jax.Array]:
    """Exact optimal prices of the rank-one part of ``benefit (n, n)``, and that part's share.

    With row and column means removed, ``benefit`` is ``p q^T`` plus a remainder (``p, q`` from
    a few power iterations); for the rank-one problem alone the optimum pairs rows and columns in
    sorted order (the rearrangement inequality) and its optimal prices follow by cumulative sums
    along that order (for such Monge costs, neighbouring pairs' dual constraints imply all
    others). MATCH's distance matrices are nearly rank one in this sense (89-100% of the centred
    energy on SmolLM2's layers: the activations share a common direction), so these prices
    start the auction close to its end.

    Returns:
      ``(prices (n,), share ())``: prices for maximising ``benefit`` (mean zero), and
      ``||p q^T||^2 / ||centred benefit||^2`` in [0, 1].
    """
    n, m = benefit.shape
    b = benefit
    cm, rm = jnp.mean(b, axis=0), jnp.mean(b, axis=1)
    g = jnp.mean(rm)

    def left(q):  # J q, J = b - 1 cm^T - rm 1^T + g never formed
        return b @ q - jnp.dot(cm, q) - (rm - g) * jnp.sum(q)

    def right(p):  # J^T p
        return p @ b - jnp.dot(rm, p) - (cm - g) * jnp.sum(p)

    def step(_, q):
        q = right(left(q))
        return q / jnp.maximum(jnp.linalg.norm(q), jnp.finfo(b.dtype).tiny)

    q = jax.lax.fori_loop(0, iters, step, jnp.linspace(-1.0, 1.0, m, dtype=b.dtype) + cm / (jnp.abs(cm).max() + 1))
    p = left(q)
    total = jnp.sum(jnp.square(b)) - n * jnp.dot(cm, cm) - m * jnp.dot(rm, rm) + n * m * g * g
    share = jnp.clip(jnp.dot(p, p) / jnp.maximum(total, jnp.finfo(b.dtype).tiny), 0.0, 1.0)
    # Maximise sum p_i q_j: rows by p ascending meet columns by q ascending. Between neighbouring
    # columns the price step lies in [ps[k] dq, ps[k+1] dq] (both constraints); take the midpoint.
    ps, cols = jnp.sort(p), jnp.argsort(q)
    qs = q[cols]
    steps = 0.5 * (ps[1:] + ps[:-1]) * jnp.diff(qs)
    prices = jnp.zeros((m,), b.dtype).at[cols].set(jnp.concatenate([jnp.zeros((1,), b.dtype), jnp.cumsum(steps)]))
    prices = prices + cm
    return prices - jnp.mean(prices), share


_WARM_MAX_PHASES = 16
# Below this rank-one share the rank-one prices are not a useful start: cold schedule instead.
_WARM_MIN_RANK_ONE_SHARE = 0.5
_WARM_MAX_BIDS_PER_ROW = 50
_WARM_BLOCK = 8


def warm_prices(cost: np.ndarray, rank_one: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Approximate column potentials ``v (m,)`` of the minimisation LAP on a square ``cost (n, n)``.

    Runs :func:`queue_auction_prices` (float32, on the CPU device whatever the default backend) on
    the row-reduced benefit ``min_k cost[i, k] - cost[i, j]``, started from :func:`rank_one_prices`
    (``rank_one``) and the :func:`warm_schedule`, capped at ``50 n`` bids. Returns
    ``(v float64, info)`` with the bids, phases, free rows left and the rank-one share; any ``v``
    is valid input to :func:`solve_warm` (only its speed depends on how good it is).
    """
    cpu = jax.devices("cpu")[0]
    benefit = np.array(cost, dtype=np.float32)  # a copy, reduced in place
    np.subtract(benefit.min(axis=1, keepdims=True), benefit, out=benefit)
    info: dict[str, Any] = {}
    benefit_cpu = jax.device_put(benefit, cpu)
    init = None
    if rank_one:  # matrix-vector products in XLA: numpy's threaded BLAS stalls on busy machines
        init, share = rank_one_prices(benefit_cpu)
        info["rank_one_share"] = float(share)
        if info["rank_one_share"] < _WARM_MIN_RANK_ONE_SHARE:
            init = None
    sched = warm_schedule(benefit, start_at_spread=init is not None)
    del benefit
    eps = np.full(_WARM_MAX_PHASES, sched[-1], np.float32)
    eps[: len(sched)] = sched
    n = cost.shape[0]
    prices, bids, num_free = queue_auction_prices(
        benefit_cpu,
        jax.device_put(eps, cpu),
        jax.device_put(np.int32(len(sched)), cpu),
        jax.device_put(np.int32(_WARM_MAX_BIDS_PER_ROW * n), cpu),
        init,
        block=_WARM_BLOCK,
    )
    info.update(bids=int(bids), phases=len(sched), eps_last=float(sched[-1]), free_left=int(num_free))
    return -np.asarray(prices, np.float64), info


def solve_warm(
    cost, maximize: bool = False, rank_one: bool = True, finish: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Exact LAP on a square ``cost (n, n)`` by a host solver started from auction prices.

    The host solver (LAPJV where ``lap`` is installed, else scipy) solves
    ``W = cost - v[None, :] - u[:, None]`` with ``v`` from :func:`warm_prices` and ``u`` the row
    minima of ``cost - v``. Every permutation's total changes by the same constant
    ``-(sum u + sum v)``, so ``W`` and ``cost`` have the same optimal assignments: the result is
    exact, like the host solver's (float64 rounding of ``W`` moves a total by at most about
    ``4 n`` ulps of ``max |cost| + max |v|``). With good prices the optimum is close to the zero
    entries of ``W`` and the solver's augmenting paths are short (module doc, "warm").
    ``rank_one`` starts the auction from :func:`rank_one_prices`; ``finish`` ("lapjv" or "scipy")
    overrides the host solver.

    Returns:
      ``(col_of_row (n,), info)``: ``info`` from :func:`warm_prices` plus ``finish`` (the host solver).
    """
    w = np.array(cost, dtype=np.float64)  # our own copy, reduced in place below
    if maximize:
        np.negative(w, out=w)
    n, m = w.shape
    if n != m:
        raise ValueError(f"solve_warm needs a square cost, got {(n, m)}")
    if n <= 1 or not np.ptp(w) > 0:
        return np.arange(n), {"bids": 0, "phases": 0, "free_left": 0, "finish": "none"}
    v, info = warm_prices(w, rank_one)
    w -= v[None, :]
    w -= w.min(axis=1, keepdims=True)
    info["finish"] = finish or ("lapjv" if have_lapjv() else "scipy")
    if info["finish"] == "lapjv":
        cols = lapjv_exact(w)
    else:
        _, cols = scipy.optimize.linear_sum_assignment(w)
    return np.asarray(cols), info


# Reduced costs the `lap` package's LAPJV handles correctly stay below this (its LARGE = 1e6 is
# the "infinity" of its minimum searches; with costs near or above it, it returns suboptimal
# assignments without warning: 20% of random square 2-60 x 2-60 squared-distance costs with
# entries up to 1e7 in our tests, up to 30% above the optimum).
_LAPJV_SAFE_RANGE = 2.0**13


def lapjv_exact(cost: np.ndarray) -> np.ndarray:
    """LAPJV (``lap`` package) on a float64 ``cost (n, m)``, ``n <= m``, made safe; modifies ``cost``.

    Subtracts the minimum and scales by a power of two so that every entry lies in ``[0, 2^13]``:
    both leave the optimal assignments unchanged (the scaling is exact in float64) and LAPJV's
    path the same, and keep it away from its internal ``LARGE = 1e6`` sentinel, near which it
    returns suboptimal assignments. Returns ``col_of_row (n,)``.
    """
    import lap

    if cost.size:
        np.subtract(cost, cost.min(), out=cost)
        top = float(cost.max())
        if top > 0:
            cost *= 2.0 ** math.floor(math.log2(_LAPJV_SAFE_RANGE / top))
    _, cols, _ = lap.lapjv(cost, extend_cost=cost.shape[0] != cost.shape[1])
    return np.asarray(cols)


def competition(cost, maximize: bool = False) -> float:
    """Fraction of distinct columns among the rows' best columns, in (0, 1].

    About 0.63 for uniform random costs and 1 for near-permutations; 0.02-0.35 on MATCH's
    activation distances of independent models, where many rows prefer the same few columns and
    augmenting paths get long. :func:`default_method` sends costs below 0.4 to "warm".
    """
    c = np.asarray(cost)
    best = c.argmax(axis=1) if maximize else c.argmin(axis=1)
    return float(np.unique(best).size) / max(c.shape[0], 1)


# --------------------------------------------------------------------------------------------
# Host drivers
# --------------------------------------------------------------------------------------------


def _benefit(cost: jax.Array, sign: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(n, m) cost with n <= m -> reduced benefit (row max 0; column max 0 if square), range.

    ``sign`` is +1 to maximise the cost, -1 to minimise (traced: one compile for both).
    """
    a = cost.astype(dtype) * jnp.asarray(sign, dtype)
    a = a - jnp.max(a, axis=1, keepdims=True)
    if a.shape[0] == a.shape[1]:
        a = a - jnp.max(a, axis=0, keepdims=True)
    rng = -jnp.min(a)
    # All-equal costs: every assignment is optimal; any positive scale will do.
    scale = jnp.where(rng > 1e3 * jnp.finfo(dtype).tiny, rng, jnp.ones((), dtype))
    return a, scale


@functools.partial(jax.jit, static_argnames=("block", "max_iter", "dtype"))
def _auction_stage(cost, eps_rel, init_prices, init_cols, sign, *, block, max_iter, dtype):
    a, scale = _benefit(cost, sign, dtype)
    if init_prices is not None:
        init_prices = init_prices.astype(dtype)
    res = auction_lap(a, eps_rel.astype(dtype) * scale, init_prices, init_cols, block=block, max_iter=max_iter)
    return res, scale


@jax.jit
def _certificate64(cost, col_of_row, prices, sign):
    """Primal (of the user's cost) and duality gap, both float64 (call under enable_x64)."""
    a, _ = _benefit(cost, sign, jnp.float64)
    _, gap = duality_gap(a, col_of_row, prices)
    c64 = cost.astype(jnp.float64)
    primal = jnp.sum(c64[jnp.arange(cost.shape[0]), col_of_row])
    return primal, gap


def _default_block(n: int) -> int:
    return min(n, 256 if jax.default_backend() == "cpu" else 2048)


def solve_auction(cost, maximize: bool, rtol: float, block: int | None, max_iter: int) -> tuple[np.ndarray, dict]:
    """The certified auction on an ``(n, m)`` cost with ``n <= m`` (see the module doc).

    Returns:
      ``(col_of_row (n,), info)``: ``info`` has the bidding rounds (``iters32``, ``iters64``), the
      duality gaps reached (``gap32``, ``gap64``), the tolerance ``tol``, and whether the float64
      stage (``refined``) or the scipy fallback (``fallback``) ran.
    """
    n, m = cost.shape
    block = block or _default_block(n)
    cost32 = jnp.asarray(cost, jnp.float32) if not isinstance(cost, jax.Array) else cost
    sched32 = jnp.asarray(eps_schedule(rel_final=_REL_EPS32), jnp.float32)
    sign = 1.0 if maximize else -1.0
    res, scale = _auction_stage(cost32, sched32, None, None, sign, block=block, max_iter=max_iter, dtype=jnp.float32)
    info: dict[str, Any] = {"iters32": int(res.num_iters), "refined": False, "fallback": False}
    with jax.enable_x64(True):
        # float64 copy of the user's cost, on the device that holds it.
        cost64 = cost.astype(jnp.float64) if isinstance(cost, jax.Array) else jnp.asarray(cost, jnp.float64)
        cols, prices = res.col_of_row, res.prices
        ok = bool(res.converged)
        if ok:
            primal, gap = (float(x) for x in _certificate64(cost64, cols, prices.astype(jnp.float64), sign))
            tol = rtol * abs(primal) + 1e-12 * float(scale) * m
            ok = gap <= tol
            info.update(gap32=gap, tol=tol)
        if res.converged and not ok:
            # float64 continuation, warm-started. With eps_final = tol / m every assigned pair
            # has slack <= eps (and dummy-held columns price <= lam + eps), so the gap is
            # <= m * eps = tol: the certificate then holds by construction.
            info["refined"] = True
            rel_final = max(tol / m / float(scale), 1e-15)
            sched64 = jnp.asarray(eps_schedule(rel_start=_REL_EPS32, rel_final=rel_final), jnp.float64)
            res64, scale64 = _auction_stage(
                cost64,
                sched64,
                prices.astype(jnp.float64),
                cols,
                sign,
                block=block,
                max_iter=max_iter,
                dtype=jnp.float64,
            )
            info["iters64"] = int(res64.num_iters)
            cols = res64.col_of_row
            ok = bool(res64.converged)
            if ok:
                primal, gap = (float(x) for x in _certificate64(cost64, cols, res64.prices, sign))
                tol = rtol * abs(primal) + 1e-12 * float(scale64) * m
                info.update(gap64=gap, tol=tol)
                ok = gap <= tol
    if not ok:
        warnings.warn(
            "auction did not reach the certified tolerance; falling back to scipy", RuntimeWarning, stacklevel=3
        )
        info["fallback"] = True
        _, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64), maximize=maximize)
    return np.asarray(cols), info


def _solve_oriented(cost, maximize: bool, method: str, rtol: float, block: int | None, max_iter: int) -> np.ndarray:
    """Dispatch on an (n, m) cost with n <= m; returns col_of_row (n,)."""
    if method == "scipy":
        _, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64), maximize=maximize)
        return cols
    if method == "lapjv":
        if not have_lapjv():
            raise ValueError("method='lapjv' needs the optional package `lap` (pip install lap)")
        c = np.array(cost, dtype=np.float64)
        if maximize:
            np.negative(c, out=c)
        return lapjv_exact(c)
    if method == "warm":
        if cost.shape[0] != cost.shape[1]:  # see the module doc: padding would slow the auction down
            return _solve_oriented(cost, maximize, "lapjv" if have_lapjv() else "scipy", rtol, block, max_iter)
        cols, _ = solve_warm(np.asarray(cost), maximize)
        return cols
    if method == "hungarian":
        from optax import assignment  # local: optional dependency path

        c_dev = jnp.asarray(cost)
        rows, cols = jax.jit(assignment.hungarian_algorithm)(-c_dev if maximize else c_dev)
        out = np.empty(cost.shape[0], np.int64)
        out[np.asarray(rows)] = np.asarray(cols)
        return out
    cols, _ = solve_auction(cost, maximize, rtol, block, max_iter)
    return cols


def solve_lap(
    cost,
    *,
    maximize: bool = False,
    method: str = "auto",
    key: jax.Array | None = None,
    rtol: float = DEFAULT_RTOL,
    block: int | None = None,
    max_iter: int = 200_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the linear assignment problem, like :func:`scipy.optimize.linear_sum_assignment`.

    Args:
      cost: (n, m) numpy or jax array, finite, any n, m (rectangular allowed).
      maximize: maximise the total instead of minimising it.
      method: "auto" (:func:`default_method`: on CPU "warm" for large competitive costs, else
        LAPJV or scipy; the auction on GPU/TPU for square costs), "scipy", "auction",
        "hungarian" (optax), "lapjv" (needs the optional ``lap`` package), "warm" (auction
        prices, then the exact host solver; rectangular costs go to the host solver).
      key: optional PRNG key; rows and columns are randomly relabelled before solving and
        mapped back after (equivariance under ties). None: no relabelling.
      rtol: certified relative tolerance on the objective for the auction (see module doc).
      block: auction rows bidding per round (default by backend).
      max_iter: auction cap on bidding rounds (then scipy fallback with a warning).

    Returns:
      (row_ind, col_ind): int64 numpy arrays of length ``min(n, m)``, ``row_ind`` ascending.
    """
    cost = _check_cost(cost, 2)
    if method == "auto" and (isinstance(cost, np.ndarray) or jax.default_backend() == "cpu"):
        method = default_method(shape=cost.shape, cost=cost, maximize=maximize)
    method = _check_method(method, cost.shape)
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if key is not None:
        kr, kc = jax.random.split(key)
        perm_r = np.asarray(jax.random.permutation(kr, n))
        perm_c = np.asarray(jax.random.permutation(kc, m))
        if isinstance(cost, np.ndarray):
            cost = cost[np.ix_(perm_r, perm_c)]  # one pass over the costs
        else:
            cost = jnp.take(jnp.take(cost, perm_r, axis=0), perm_c, axis=1)
    transpose = n > m
    c = cost.T if transpose else cost
    cols = np.asarray(_solve_oriented(c, maximize, method, rtol, block, max_iter), np.int64)
    rows = np.arange(c.shape[0], dtype=np.int64)
    if transpose:
        rows, cols = cols, rows
    if key is not None:
        rows, cols = perm_r[rows].astype(np.int64), perm_c[cols].astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], cols[order]


def solve_lap_batched(
    costs,
    *,
    maximize: bool = False,
    method: str = "auto",
    key: jax.Array | None = None,
    rtol: float = DEFAULT_RTOL,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve a batch of LAPs of one shape.

    Args:
      costs: (b, n, m) array. Other arguments as :func:`solve_lap` (``key`` is split per item).

    Returns:
      (row_ind, col_ind): (b, k) int64 arrays, ``k = min(n, m)``, each row as :func:`solve_lap`.
    """
    costs = _check_cost(costs, 3, "costs")
    b, n, m = costs.shape
    keys = [None] * b if key is None else list(jax.random.split(key, b))
    resolved = _check_method(method, costs.shape)  # "auto" is resolved again per item (costs differ)
    k = min(n, m)
    rows = np.zeros((b, k), np.int64)
    cols = np.zeros((b, k), np.int64)
    if b and k and resolved == "hungarian" and key is None:
        from optax import assignment

        c = jnp.asarray(costs)
        c = jnp.swapaxes(c, 1, 2) if n > m else c
        r, cc = jax.vmap(jax.jit(assignment.hungarian_algorithm))(-c if maximize else c)
        r, cc = np.asarray(r, np.int64), np.asarray(cc, np.int64)
        if n > m:
            r, cc = cc, r
        order = np.argsort(r, axis=1)
        return np.take_along_axis(r, order, 1), np.take_along_axis(cc, order, 1)
    # Items are solved one by one: the auction is already parallel inside one problem, and the
    # host certificate/fallback is per item.
    for i in range(b):
        rows[i], cols[i] = solve_lap(costs[i], maximize=maximize, method=method, key=keys[i], rtol=rtol, block=block)
    return rows, cols


def assignment_cost(cost, row_ind, col_ind) -> float:
    """Total ``sum cost[row_ind, col_ind]`` in float64."""
    c = np.asarray(cost, np.float64)
    return float(c[np.asarray(row_ind), np.asarray(col_ind)].sum())


def __getattr__(name: str) -> Any:
    """:func:`jaxind.stats.lap.lap` and :class:`jaxind.stats.lap.LapResult`, re-exported (imported on first use:
    ``jaxind.stats.lap`` builds on this module)."""
    if name in ("lap", "LapResult"):  # by module path: an import statement here would be an import cycle
        return getattr(importlib.import_module("jaxind.stats.lap"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
