"""PERMTEST as a kernel: ``stat(A, p_t(B))`` for T random group elements at once (docs/DESIGN.md §5.2).

Under H0 (independent initialisations, permutation-invariant init, equivariant training) the
pair ``(A, p(B))`` is distributed as ``(A, B)`` for a uniform group element ``p`` (see
:mod:`jaxind.symmetry`), so ``p = (1 + #{t : stat_t >= stat_0}) / (T + 1)`` is an exact
p-value for any statistic, oriented so that larger = more similar.

Statistics:

- ``"l2"``: minus the L2 distance of the weights, per transformer layer (all of its leaves) and
  in total (every leaf, embeddings and head included). The draws never materialise a permuted
  model: ``||A - p(B)||^2 = ||A||^2 + ||B||^2 - 2 <A, p(B)>`` (a permutation keeps norms), and

  * every leaf whose only permuted axis is the residual one (q, k, v, o, norms, o_bias, embed,
    lm_head) contributes ``sum_i G[i, s_i]`` with the cross-Gram ``G = A ._resid B`` ``(d, d)``
    computed once per layer: ``O(d)`` per draw instead of ``O(V d)`` for the embedding;
  * gate / up / down^T share the axes ``(resid, mlp)`` and are stacked as ``(3, d, h)``; their
    inner product with the permuted B needs one gather of ``B[s][:, t_l]`` per layer per draw,
    done layer by layer (``lax.scan``) so memory stays at one layer per draw in flight.

  The observed ``stat_0`` is computed directly from ``A - B`` (no cancellation when B is close
  to A).
- ``"mc"``: mode connectivity, minus the mean next-token cross-entropy of the weight-averaged
  model ``0.5 (A + p(B))`` on given tokens (:func:`jaxind.model.forward`). Total only.

The draw axis is a batch axis: ``vmap`` over draws, chunked to a memory budget, each chunk
sharded over a 1-D mesh of devices with ``jax.shard_map``. Draw ``t`` always uses the group
element ``draw_permutations(fold_in(key, t))``, whatever the device count or chunk size, so
results for a seed do not depend on the hardware. :func:`permtest_loop` is the plain reference:
a Python loop applying one permutation at a time with :func:`apply_permutation`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxind import experts, progress, pvalues
from jaxind.config import ModelConfig
from jaxind.errors import JaxindError
from jaxind.model import forward
from jaxind.results import LayerResult, TestResult, timed
from jaxind.symmetry import Perm, apply_permutation, check_tree, draw_permutations, get_leaf, permutation_spec
from jaxind.types import Params

Statistic = Literal["l2", "mc"]
STATISTICS: tuple[Statistic, ...] = get_args(Statistic)
_AXIS = "perm"
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PermTestResult(TestResult):
    """Outcome of one PERMTEST: a :class:`TestResult` (``test`` is the statistic, "l2" or "mc";
    ``statistic`` the observed total ``stat(A, B)``; ``combine="permtest"``; per-layer records
    for "l2") that also keeps the draws.

    Attributes:
      stats: ``(T,)`` total statistic of each draw ``stat(A, p_t(B))``.
      stats_layers: ``(T, L)`` per-layer draws (None for "mc").
      stat0_layers: ``(L,)`` per-layer observed statistic (None for "mc").
    """

    stats: np.ndarray
    stats_layers: np.ndarray | None = None
    stat0_layers: np.ndarray | None = None

    @property
    def num_perms(self) -> int:
        """T, the number of random group elements drawn."""
        return int(self.stats.shape[0])

    @property
    def stat0(self) -> float:
        """The observed statistic (``statistic``)."""
        assert self.statistic is not None
        return self.statistic

    @property
    def pvalue_layers(self) -> np.ndarray | None:
        """``(L,)`` per-layer exact p-values (None for "mc")."""
        return np.asarray([r.pvalue for r in self.layers]) if self.layers else None

    @property
    def log10_pvalue_layers(self) -> np.ndarray | None:
        """``(L,)`` their log10 (None for "mc")."""
        return np.asarray([r.log10_pvalue for r in self.layers]) if self.layers else None


# --------------------------------------------------------------------------------------------
# L2: precomputed cross-Grams and MLP stacks.


class L2Consts(NamedTuple):
    """Everything the L2 draw kernel needs (shapes for L layers, width d, hidden h).

    gram_layers ``(L, d, d)``, gram_global ``(d, d)``: cross-Grams over residual-only leaves.
    const_layers ``(L,)``, const_global ``()``: inner products of unpermuted leaves (q/k/v bias).
    mlp_a, mlp_b ``(L, k, d, h)``: the layer's matrices with an MLP axis, as (resid, mlp):
      gate, up, down^T (k = 3; GPT-2: up, down^T, k = 2).
    mlp_vec_a, mlp_vec_b ``(L, m, h)``: vectors on the MLP axis (GPT-2's up_bias; m = 0 or 1).
    sq_a_layers, sq_b_layers ``(L,)``, sq_a_total, sq_b_total ``()``: squared norms.
    experts: a mixture of experts' router and expert leaves (:func:`jaxind.experts.l2_consts`), or None.
    """

    gram_layers: jax.Array
    gram_global: jax.Array
    const_layers: jax.Array
    const_global: jax.Array
    mlp_a: jax.Array
    mlp_b: jax.Array
    mlp_vec_a: jax.Array
    mlp_vec_b: jax.Array
    sq_a_layers: jax.Array
    sq_b_layers: jax.Array
    sq_a_total: jax.Array
    sq_b_total: jax.Array
    experts: experts.ExpertL2 | None = None


def _mlp_stacks(params: Params, spec) -> tuple[jax.Array, jax.Array]:
    """``(L, k, d, h)`` matrices and ``(L, m, h)`` vectors carrying each layer's MLP axis, with
    matrices laid out as (layers, resid, mlp)."""
    mats, vecs = [], []
    for path, axes in spec.items():
        if "mlp" not in axes:
            continue
        leaf = get_leaf(params, path).astype(jnp.float32)
        if axes == ("layers", "mlp"):
            vecs.append(leaf)
        elif axes in (("layers", "resid", "mlp"), ("layers", "mlp", "resid")):
            mats.append(leaf if axes[1] == "resid" else jnp.swapaxes(leaf, 1, 2))
        else:
            raise JaxindError(f"unsupported MLP axes {axes} for {path}")
    if not mats:  # no dense MLP (a mixture of experts without a shared expert): empty stacks
        n, d = get_leaf(params, ("layers", "attn_norm")).shape
        return jnp.zeros((n, 0, d, 0), jnp.float32), jnp.zeros((n, 0, 0), jnp.float32)
    n, h = mats[0].shape[0], mats[0].shape[2]
    return jnp.stack(mats, axis=1), (jnp.stack(vecs, axis=1) if vecs else jnp.zeros((n, 0, h), jnp.float32))


def _resid_gram(a: jax.Array, b: jax.Array, axes: tuple) -> jax.Array:
    """Cross-Gram over the residual axis of two equally shaped leaves, summed over their other axes
    except the layer axis: ``(L, d, d)`` for a layer leaf, ``(d, d)`` for a top-level one."""
    r = axes.index("resid")
    stacked = axes[0] == "layers"
    lead = 1 if stacked else 0
    a2, b2 = jnp.moveaxis(a, r, lead), jnp.moveaxis(b, r, lead)
    a2 = a2.reshape(*a2.shape[: lead + 1], -1)
    b2 = b2.reshape(*b2.shape[: lead + 1], -1)
    return jnp.einsum("...ik,...jk->...ij", a2, b2, precision=_HIGHEST)


def _per_layer_sum(x: jax.Array, axes: tuple) -> jax.Array:
    """Sum of a leaf over every axis but the layer axis: ``(L,)`` for a layer leaf, ``()`` otherwise."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim))) if axes[0] == "layers" else jnp.sum(x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def l2_consts(params_a: Params, params_b: Params, cfg: ModelConfig) -> L2Consts:
    """Precomputes the cross-Grams, MLP stacks and norms of the pair (once per test)."""
    d, n = cfg.d_model, cfg.n_layers
    spec = permutation_spec(cfg)
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    gram = {True: zeros((n, d, d)), False: zeros((d, d))}  # keyed by "is a layer leaf"
    const = {True: zeros((n,)), False: zeros(())}
    sq_a = {True: zeros((n,)), False: zeros(())}
    sq_b = {True: zeros((n,)), False: zeros(())}
    for path, axes in spec.items():
        a = get_leaf(params_a, path).astype(jnp.float32)
        b = get_leaf(params_b, path).astype(jnp.float32)
        stacked = axes[0] == "layers"
        sq_a[stacked] += _per_layer_sum(a * a, axes)
        sq_b[stacked] += _per_layer_sum(b * b, axes)
        if "mlp" in axes or "expert" in axes:
            continue  # gate/up/down (and up_bias): handled by the MLP stacks; router and experts by experts.l2_inner
        if "resid" in axes:
            gram[stacked] += _resid_gram(a, b, axes)
        else:
            const[stacked] += _per_layer_sum(a * b, axes)
    mlp_a, mlp_vec_a = _mlp_stacks(params_a, spec)
    mlp_b, mlp_vec_b = _mlp_stacks(params_b, spec)
    return L2Consts(
        gram_layers=gram[True],
        gram_global=gram[False],
        const_layers=const[True],
        const_global=const[False],
        mlp_a=mlp_a,
        mlp_b=mlp_b,
        mlp_vec_a=mlp_vec_a,
        mlp_vec_b=mlp_vec_b,
        sq_a_layers=sq_a[True],
        sq_b_layers=sq_b[True],
        sq_a_total=sq_a[True].sum() + sq_a[False],
        sq_b_total=sq_b[True].sum() + sq_b[False],
        experts=experts.l2_consts(params_a, params_b, cfg),
    )


def l2_draw(consts: L2Consts, perm: Perm) -> tuple[jax.Array, jax.Array]:
    """L2 statistic of ``(A, p(B))`` for one group element, without materialising ``p(B)``.

    Returns:
      ``(stat_layers (L,), stat_total ())``: minus the L2 distances.
    """
    d = consts.gram_global.shape[0]
    s = perm.resid
    rows = jnp.arange(d)
    resid_layers = consts.gram_layers[:, rows, s].sum(axis=-1)
    resid_global = consts.gram_global[rows, s].sum()

    def layer_inner(carry, xs):
        a, b, av, bv, t = xs  # (k, d, h), (k, d, h), (m, h), (m, h), (h,)
        # B[k, s_i, t_j] for every (k, i, j): a contiguous row gather, then a column gather.
        bp = jnp.take(jnp.take(b, s, axis=1, mode="clip"), t, axis=2, mode="clip")
        return carry, jnp.sum(a * bp) + jnp.sum(av * jnp.take(bv, t, axis=1, mode="clip"))

    xs = (consts.mlp_a, consts.mlp_b, consts.mlp_vec_a, consts.mlp_vec_b, perm.mlp)
    _, mlp_layers = jax.lax.scan(layer_inner, None, xs)
    inner_layers = resid_layers + mlp_layers + consts.const_layers
    if consts.experts is not None:  # a mixture of experts: router and experts under the draw's expert permutations
        inner_layers = inner_layers + experts.l2_inner(consts.experts, perm)
    inner_total = inner_layers.sum() + resid_global + consts.const_global
    dist2_layers = consts.sq_a_layers + consts.sq_b_layers - 2.0 * inner_layers
    dist2_total = consts.sq_a_total + consts.sq_b_total - 2.0 * inner_total
    return -jnp.sqrt(jnp.maximum(dist2_layers, 0.0)), -jnp.sqrt(jnp.maximum(dist2_total, 0.0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def l2_direct(params_a: Params, params_b: Params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Minus the L2 distance between two param trees, computed from the differences.

    Returns:
      ``(stat_layers (L,), stat_total ())``.
    """
    layers = jnp.zeros((cfg.n_layers,), jnp.float32)
    other = jnp.zeros((), jnp.float32)
    for path, axes in permutation_spec(cfg).items():
        diff = get_leaf(params_a, path).astype(jnp.float32) - get_leaf(params_b, path).astype(jnp.float32)
        sq = _per_layer_sum(diff * diff, axes)
        if axes[0] == "layers":
            layers += sq
        else:
            other += sq
    return -jnp.sqrt(layers), -jnp.sqrt(layers.sum() + other)


# --------------------------------------------------------------------------------------------
# MC: loss of the weight-averaged model.


def mc_stat(params_a: Params, params_b: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Minus the mean next-token cross-entropy of ``0.5 (A + B)`` on ``tokens (N, T)``: scalar."""
    avg = jax.tree.map(lambda x, y: 0.5 * (x.astype(jnp.float32) + y.astype(jnp.float32)), params_a, params_b)
    logits, _ = forward(avg, cfg, tokens)
    assert logits is not None
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(nll)


_mc_stat_jit = jax.jit(mc_stat, static_argnames=("cfg",))


class MCConsts(NamedTuple):
    params_a: Params
    params_b: Params
    tokens: jax.Array


def _mc_draw(cfg: ModelConfig, consts: MCConsts, perm: Perm) -> tuple[jax.Array, jax.Array]:
    stat = mc_stat(consts.params_a, apply_permutation(consts.params_b, cfg, perm), cfg, consts.tokens)
    return jnp.zeros((0,), jnp.float32), stat


def _l2_draw(cfg: ModelConfig, consts: L2Consts, perm: Perm) -> tuple[jax.Array, jax.Array]:
    return l2_draw(consts, perm)


_DRAW_FNS: dict[str, Callable] = {"l2": _l2_draw, "mc": _mc_draw}


# --------------------------------------------------------------------------------------------
# The sharded, chunked driver.


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"perm"`` over ``devices`` (default: all devices)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise JaxindError("permtest needs at least one device")
    return Mesh(np.array(devs), (_AXIS,))


@functools.lru_cache(maxsize=64)
def _sharded_draws(statistic: str, cfg: ModelConfig, mesh: Mesh) -> Callable:
    """Jitted ``(consts, key, idx (C,)) -> (stat_layers (C, L), stat_total (C,))`` with ``idx``
    sharded over the mesh; each device draws and evaluates its own slice of indices."""
    draw_fn = functools.partial(_DRAW_FNS[statistic], cfg)

    def local(consts, key, idx):
        perms = jax.vmap(lambda i: draw_permutations(jax.random.fold_in(key, i), cfg))(idx)
        return jax.vmap(lambda p: draw_fn(consts, p))(perms)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(_AXIS)), out_specs=(P(_AXIS), P(_AXIS)))
    return jax.jit(mapped)


def _bytes_per_draw(statistic: str, cfg: ModelConfig, tokens: ArrayLike | None) -> int:
    """Rough peak working memory of one draw in flight (float32)."""
    if statistic == "l2":  # the gathered layer stack and its product (a layer's experts too)
        return 2 * 3 * cfg.d_model * (cfg.d_ff + cfg.n_experts * cfg.d_expert) * 4
    assert tokens is not None  # checked by _check_args
    n_tok = int(np.prod(np.shape(tokens)))
    acts = n_tok * (2 * cfg.vocab_size + 8 * cfg.d_model + 3 * (cfg.d_ff + cfg.n_experts * cfg.d_expert)) * 4
    return 3 * cfg.num_params() * 4 + acts


def _check_pair(params_a: Params, params_b: Params, cfg: ModelConfig) -> None:
    sa = jax.tree.map(lambda x: tuple(x.shape), params_a)
    sb = jax.tree.map(lambda x: tuple(x.shape), params_b)
    if sa != sb:
        raise JaxindError("PERMTEST needs two models of the same architecture and shapes")
    check_tree(params_a, cfg)


def _check_args(statistic: str, num_perms: int, tokens: Any, layers: Sequence[int] | None) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"unknown PERMTEST statistic {statistic!r}; choose from {STATISTICS}")
    if num_perms < 1:
        raise ValueError(f"num_perms must be >= 1, got {num_perms}")
    if statistic == "mc" and (tokens is None or np.ndim(tokens) != 2 or np.shape(tokens)[1] < 2):
        raise ValueError("the mc statistic needs tokens of shape (N, T) with T >= 2")
    if statistic == "mc" and layers is not None:
        raise JaxindError("the mc statistic is the loss of the whole averaged model; it takes no layer selection")


def _result(
    statistic: Statistic,
    stat0_layers: Any,
    stat0_total: Any,
    stats_layers: Any,
    stats_total: Any,
    layers: Sequence[int] | None,
) -> PermTestResult:
    """Exact p-values from the observed and drawn statistics. With ``layers`` the overall statistic
    is minus the L2 distance over those layers only, ``-sqrt(sum_l stat_l^2)``, for the observed
    pair and for every draw alike (so still an exact PERMTEST)."""
    stats_total = np.asarray(stats_total, dtype=np.float64)
    stat0_total = float(stat0_total)
    records: list[LayerResult] = []
    s0l = stl = None
    if statistic == "l2":
        s0l = np.asarray(stat0_layers, dtype=np.float64)
        stl = np.asarray(stats_layers, dtype=np.float64)
        pl, lpl = (np.asarray(x) for x in pvalues.permtest_pvalue(s0l, stl))
        chosen = range(s0l.shape[0]) if layers is None else layers
        records = [
            LayerResult(
                layer_a=int(l), layer_b=int(l), pvalue=float(pl[l]), log10_pvalue=float(lpl[l]), statistic=float(s0l[l])
            )
            for l in chosen
        ]
        if layers is not None:
            index = np.asarray(list(layers))
            stat0_total = float(-np.sqrt(np.sum(s0l[index] ** 2)))
            stats_total = -np.sqrt(np.sum(stl[:, index] ** 2, axis=1))
    p, lp = pvalues.permtest_pvalue(stat0_total, stats_total)
    return PermTestResult(
        test=statistic,
        pvalue=float(p),
        log10_pvalue=float(lp),
        exact=True,
        statistic=stat0_total,
        layers=tuple(records),
        combine="permtest",
        stats=stats_total,
        stats_layers=stl,
        stat0_layers=s0l,
        extra={
            "num_perms": int(stats_total.shape[0]),
            "null_mean": float(np.mean(stats_total)),
            "null_max": float(np.max(stats_total)),
        },
    )


def _observed(statistic: str, params_a: Params, params_b: Params, cfg: ModelConfig, tokens):
    if statistic == "l2":
        return l2_direct(params_a, params_b, cfg)
    return None, _mc_stat_jit(params_a, params_b, cfg, jnp.asarray(tokens, dtype=jnp.int32))


@timed
def permtest(
    params_a: Params,
    params_b: Params,
    cfg: ModelConfig,
    key: jax.Array,
    num_perms: int = 999,
    statistic: Statistic = "l2",
    tokens: ArrayLike | None = None,
    devices: Sequence[jax.Device] | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 512 * 2**20,
    layers: Sequence[int] | None = None,
) -> PermTestResult:
    """PERMTEST(statistic, T) with the draws vmapped, chunked and sharded over devices.

    Args:
      params_a, params_b: two param trees for the same ``cfg``.
      key: PRNG key; draw ``t`` uses ``draw_permutations(fold_in(key, t), cfg)``.
      num_perms: T, the number of random group elements.
      statistic: "l2" or "mc".
      tokens: ``(N, T)`` int tokens for "mc".
      devices: devices to shard the draws over (default: all devices).
      chunk_size: draws per device per step (default: from ``memory_budget_bytes``).
      memory_budget_bytes: working memory per device for draws in flight.
      layers: "l2" only: report these layers and test the distance over them alone (default:
        every layer reported, the distance over every parameter tested).

    Returns:
      PermTestResult with the observed and drawn statistics and exact p-values (per layer and
      total for "l2"; total for "mc").
    """
    _check_args(statistic, num_perms, tokens, layers)
    _check_pair(params_a, params_b, cfg)
    mesh = make_mesh(devices)
    n_dev = mesh.size
    if chunk_size is None:
        chunk_size = max(1, memory_budget_bytes // _bytes_per_draw(statistic, cfg, tokens))
    # Per-device chunk: at most what the budget allows, at most the next power of two above
    # T / n_dev (so that different T reuse the same compiled shapes).
    needed = -(-num_perms // n_dev)
    chunk_size = max(1, min(int(chunk_size), 1 << (needed - 1).bit_length()))
    step = chunk_size * n_dev

    if statistic == "l2":
        consts = l2_consts(params_a, params_b, cfg)
    else:
        consts = MCConsts(params_a, params_b, jnp.asarray(tokens, dtype=jnp.int32))
    replicated = NamedSharding(mesh, P())
    consts = jax.device_put(consts, replicated)
    key_rep = jax.device_put(key, replicated)
    idx_sharding = NamedSharding(mesh, P(_AXIS))
    fn = _sharded_draws(statistic, cfg, mesh)

    layer_chunks, total_chunks = [], []
    bar = progress.bar(total=num_perms, desc=f"PERMTEST-{statistic}", unit="perm")
    for start in range(0, num_perms, step):
        idx = jax.device_put(np.arange(start, start + step, dtype=np.int32), idx_sharding)
        chunk_layers, total = fn(consts, key_rep, idx)
        layer_chunks.append(chunk_layers)
        total_chunks.append(total.block_until_ready() if not bar.disable else total)
        bar.update(min(step, num_perms - start))
    bar.close()
    stats_layers = np.concatenate([np.asarray(c) for c in layer_chunks])[:num_perms]
    stats_total = np.concatenate([np.asarray(c) for c in total_chunks])[:num_perms]
    stat0_layers, stat0_total = _observed(statistic, params_a, params_b, cfg, tokens)
    return _result(statistic, stat0_layers, stat0_total, stats_layers, stats_total, layers)


@functools.lru_cache(maxsize=16)
def _loop_step(statistic: str, cfg: ModelConfig) -> Callable:
    """Jitted ``(A, B, key, t) -> stat(A, apply_permutation(B, draw(fold_in(key, t))))``."""

    def step(params_a, params_b, key, t, tokens):
        permuted = apply_permutation(params_b, cfg, draw_permutations(jax.random.fold_in(key, t), cfg))
        if statistic == "l2":
            return l2_direct(params_a, permuted, cfg)
        return jnp.zeros((0,), jnp.float32), mc_stat(params_a, permuted, cfg, tokens)

    return jax.jit(step)


@timed
def permtest_loop(
    params_a: Params,
    params_b: Params,
    cfg: ModelConfig,
    key: jax.Array,
    num_perms: int = 999,
    statistic: Statistic = "l2",
    tokens: ArrayLike | None = None,
) -> PermTestResult:
    """Reference PERMTEST: a Python loop over draws, each materialising ``p_t(B)`` with
    :func:`apply_permutation` and computing the statistic directly (one jitted step per draw).

    Same draws as :func:`permtest` for the same ``key`` (``fold_in(key, t)``), so the results
    agree up to float rounding.
    """
    _check_args(statistic, num_perms, tokens, None)
    _check_pair(params_a, params_b, cfg)
    step = _loop_step(statistic, cfg)
    toks = None if tokens is None else jnp.asarray(tokens, dtype=jnp.int32)
    layers, totals = [], []
    for t in range(num_perms):  # dispatched asynchronously; read back once at the end
        sl, st = step(params_a, params_b, key, t, toks)
        layers.append(sl)
        totals.append(st)
    stat0_layers, stat0_total = _observed(statistic, params_a, params_b, cfg, tokens)
    return _result(
        statistic, stat0_layers, stat0_total, np.stack(jax.device_get(layers)), np.asarray(jax.device_get(totals)), None
    )
