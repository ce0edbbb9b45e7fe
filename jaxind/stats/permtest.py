"""PERMTEST as a kernel: ``stat(A, p_t(B))`` for T random group elements at once (docs/DESIGN.md §5.2).

Under H0 (independent initialisations, permutation-invariant init, equivariant training) the
pair ``(A, p(B))`` is distributed as ``(A, B)`` for a uniform group element ``p`` (see
:mod:`jaxind.models.symmetry`), so ``p = (1 + #{t : stat_t >= stat_0}) / (T + 1)`` is an exact
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
  model ``0.5 (A + p(B))`` on given tokens (:func:`jaxind.models.model.forward`). Total only.

The draw axis is a batch axis: ``vmap`` over draws, chunked to a memory budget, each chunk
split over the ``perm`` axis of a ``(perm, layers)`` mesh with ``jax.shard_map``; for "l2" the
layers' constants are split over ``layers`` and each draw's per-layer inner products are summed
across it (docs/DESIGN.md §5.12). Draw ``t`` always uses the group element
``draw_permutations(fold_in(key, t))``, whatever the mesh, process count or chunk size, so
results for a seed do not depend on the hardware. :func:`permtest_loop` is the plain reference:
a Python loop applying one permutation at a time with :func:`apply_permutation`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.models.config import ModelConfig
from jaxind.models.model import forward
from jaxind.models.symmetry import Perm, apply_permutation, check_tree, draw_permutations, get_leaf, permutation_spec
from jaxind.parallel import sharding
from jaxind.stats import convention, experts, pvalues
from jaxind.stats.results import LayerResult, TestResult, timed
from jaxind.stats.statistics import PermStatistic, check_draw, register_statistic, resolve_statistic
from jaxind.types import Params

__all__ = [
    "CPU_L2_CHUNK",
    "L2",
    "L2Consts",
    "MC",
    "MCConsts",
    "PermTestResult",
    "STATISTICS",
    "Statistic",
    "default_draw_devices",
    "l2_consts",
    "l2_direct",
    "l2_draw",
    "make_mesh",
    "mc_stat",
    "permtest",
    "permtest_loop",
]

# A statistic: a registered name ("l2", "mc", or one of register_statistic's), a function
# (params_a, params_b) -> scalar, or a PermStatistic (jaxind.stats.statistics).
Statistic = str | Callable[[Params, Params], Any] | PermStatistic
STATISTICS: tuple[str, ...] = ("l2", "mc")  # the built-in ones (statistics.registered_statistics(): all)
# Draws per CPU device per step for "l2": on CPU a draw is bound by its gathers (BENCHMARKS.md, PERMTEST-L2), and
# bigger chunks gain nothing but the padding of the last one.
CPU_L2_CHUNK = 8
_AXIS = "perm"
_LAYERS = "layers"
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
    experts: a mixture of experts' router and expert leaves (:func:`jaxind.stats.experts.l2_consts`), or None.
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


class _LayerRow(NamedTuple):
    """One layer's share of :class:`L2Consts`: ``gram (d, d)``, ``const ()``, ``sq_a ()``, ``sq_b ()``,
    ``mlp_a``/``mlp_b`` ``(k, d, h)``, ``vec_a``/``vec_b`` ``(m, h)``."""

    gram: jax.Array
    const: jax.Array
    sq_a: jax.Array
    sq_b: jax.Array
    mlp_a: jax.Array
    mlp_b: jax.Array
    vec_a: jax.Array
    vec_b: jax.Array


def _resid_gram(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """Cross-Gram ``(d, d)`` over the residual ``axis`` of two equally shaped leaves, summed over the others."""
    a2 = jnp.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    b2 = jnp.moveaxis(b, axis, 0).reshape(b.shape[axis], -1)
    return jnp.matmul(a2, b2.T, precision=_HIGHEST)


def _layer_row(layers_a: Params, layers_b: Params, layer: jax.Array, cfg: ModelConfig) -> _LayerRow:
    """Layer ``layer`` (traced) of the stacked trees: its residual cross-Gram, the inner product of its
    unpermuted leaves, squared norms, and its MLP matrices as (resid, mlp) and MLP vectors."""
    d, h = cfg.d_model, cfg.d_ff
    gram, const = jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.float32)
    sq_a, sq_b = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    mats_a, mats_b, vecs_a, vecs_b = [], [], [], []
    for path, axes in permutation_spec(cfg).items():
        if path[0] != "layers":
            continue
        a = layers_a[path[1]][layer].astype(jnp.float32)
        b = layers_b[path[1]][layer].astype(jnp.float32)
        axes = axes[1:]  # this layer's slice
        sq_a, sq_b = sq_a + jnp.sum(a * a), sq_b + jnp.sum(b * b)
        if "expert" in axes:
            continue  # router and experts: experts.l2_inner
        if axes == ("mlp",):
            vecs_a.append(a)
            vecs_b.append(b)
        elif axes in (("resid", "mlp"), ("mlp", "resid")):
            mats_a.append(a if axes[0] == "resid" else a.T)
            mats_b.append(b if axes[0] == "resid" else b.T)
        elif "mlp" in axes:
            raise JaxindError(f"unsupported MLP axes {axes} for {path}")
        elif "resid" in axes:
            gram += _resid_gram(a, b, axes.index("resid"))
        else:
            const += jnp.sum(a * b)
    empty, no_mats = jnp.zeros((0, h), jnp.float32), jnp.zeros((0, d, h), jnp.float32)  # (Mixtral: no dense MLP)
    return _LayerRow(
        gram,
        const,
        sq_a,
        sq_b,
        jnp.stack(mats_a) if mats_a else no_mats,
        jnp.stack(mats_b) if mats_b else no_mats,
        jnp.stack(vecs_a) if vecs_a else empty,
        jnp.stack(vecs_b) if vecs_b else empty,
    )


def _global_terms(params_a: Params, params_b: Params, cfg: ModelConfig) -> tuple[jax.Array, ...]:
    """``(gram_global (d, d), const_global, sq_a_global, sq_b_global)`` over the top-level leaves."""
    d = cfg.d_model
    gram, const = jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.float32)
    sq_a, sq_b = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for path, axes in permutation_spec(cfg).items():
        if path[0] == "layers":
            continue
        a = get_leaf(params_a, path).astype(jnp.float32)
        b = get_leaf(params_b, path).astype(jnp.float32)
        sq_a, sq_b = sq_a + jnp.sum(a * a), sq_b + jnp.sum(b * b)
        if "resid" in axes:
            gram += _resid_gram(a, b, axes.index("resid"))
        else:
            const += jnp.sum(a * b)
    return gram, const, sq_a, sq_b


def _assemble(rows: _LayerRow, glob: tuple[jax.Array, ...], expert_consts: experts.ExpertL2 | None) -> L2Consts:
    gram_global, const_global, sq_a_global, sq_b_global = glob
    return L2Consts(
        gram_layers=rows.gram,
        gram_global=gram_global,
        const_layers=rows.const,
        const_global=const_global,
        mlp_a=rows.mlp_a,
        mlp_b=rows.mlp_b,
        mlp_vec_a=rows.vec_a,
        mlp_vec_b=rows.vec_b,
        sq_a_layers=rows.sq_a,
        sq_b_layers=rows.sq_b,
        sq_a_total=rows.sq_a.sum() + sq_a_global,
        sq_b_total=rows.sq_b.sum() + sq_b_global,
        experts=expert_consts,
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def l2_consts(params_a: Params, params_b: Params, cfg: ModelConfig) -> L2Consts:
    """Precomputes the cross-Grams, MLP stacks and norms of the pair (once per test), on one device
    (:func:`_place_consts` builds the same, layer by layer, split over a mesh)."""
    rows = jax.lax.map(lambda l: _layer_row(params_a["layers"], params_b["layers"], l, cfg), jnp.arange(cfg.n_layers))
    return _assemble(rows, _global_terms(params_a, params_b, cfg), experts.l2_consts(params_a, params_b, cfg))


def _layer_inner(consts: L2Consts, perm: Perm) -> jax.Array:
    """``<A_l, p(B)_l>`` for the layers ``consts`` holds (all, or one device's share): ``(L_held,)`` for the
    group element ``perm`` (its residual permutation ``s (d,)`` and the held layers' MLP permutations
    ``t (L_held, h)``; a mixture of experts' expert permutations too, all layers held)."""
    s, t = perm.resid, perm.mlp
    d = consts.gram_global.shape[0]
    rows = jnp.arange(d)
    resid_layers = consts.gram_layers[:, rows, s].sum(axis=-1)

    def layer_inner(carry, xs):
        a, b, av, bv, t_l = xs  # (k, d, h), (k, d, h), (m, h), (m, h), (h,)
        # B[k, s_i, t_j] for every (k, i, j): a contiguous row gather, then a column gather.
        bp = jnp.take(jnp.take(b, s, axis=1, mode="clip"), t_l, axis=2, mode="clip")
        return carry, jnp.sum(a * bp) + jnp.sum(av * jnp.take(bv, t_l, axis=1, mode="clip"))

    xs = (consts.mlp_a, consts.mlp_b, consts.mlp_vec_a, consts.mlp_vec_b, t)
    _, mlp_layers = jax.lax.scan(layer_inner, None, xs)
    inner = resid_layers + mlp_layers + consts.const_layers
    if consts.experts is not None:  # a mixture of experts: router and experts under the draw's expert permutations
        inner = inner + experts.l2_inner(consts.experts, perm)
    return inner


def _l2_stats(consts: L2Consts, inner_layers: jax.Array, inner_sum: jax.Array, s: jax.Array):
    """Minus the distances from the held layers' inner products and ``inner_sum``, the sum over every layer."""
    d = consts.gram_global.shape[0]
    inner_total = inner_sum + consts.gram_global[jnp.arange(d), s].sum() + consts.const_global
    dist2_layers = consts.sq_a_layers + consts.sq_b_layers - 2.0 * inner_layers
    dist2_total = consts.sq_a_total + consts.sq_b_total - 2.0 * inner_total
    return -jnp.sqrt(jnp.maximum(dist2_layers, 0.0)), -jnp.sqrt(jnp.maximum(dist2_total, 0.0))


def l2_draw(consts: L2Consts, perm: Perm) -> tuple[jax.Array, jax.Array]:
    """L2 statistic of ``(A, p(B))`` for one group element, without materialising ``p(B)``.

    Returns:
      ``(stat_layers (L,), stat_total ())``: minus the L2 distances.
    """
    inner = _layer_inner(consts, perm)
    return _l2_stats(consts, inner, inner.sum(), perm.resid)


def l2_direct(params_a: Params, params_b: Params, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Minus the L2 distance between two param trees, computed from the differences (on a mesh, with sums that
    do not depend on how the mesh is split between processes: :func:`jaxind.parallel.sharding.sq_distance`).

    Returns:
      ``(stat_layers (L,), stat_total ())`` float32 numpy.
    """
    layers = np.zeros((cfg.n_layers,), np.float32)
    other = np.zeros((), np.float32)
    for path, axes in permutation_spec(cfg).items():
        stacked = axes[0] == "layers"
        sq = sharding.to_host(sharding.sq_distance(get_leaf(params_a, path), get_leaf(params_b, path), stacked))
        if stacked:
            layers += sq
        else:
            other += sq
    return -np.sqrt(layers), -np.sqrt(layers.sum() + other)


def _l2_direct_traced(params_a: Params, params_b: Params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """:func:`l2_direct` inside a traced computation (the loop reference's draws)."""
    layers = jnp.zeros((cfg.n_layers,), jnp.float32)
    other = jnp.zeros((), jnp.float32)
    for path, axes in permutation_spec(cfg).items():
        diff = get_leaf(params_a, path).astype(jnp.float32) - get_leaf(params_b, path).astype(jnp.float32)
        if axes[0] == "layers":
            layers += jnp.sum(diff * diff, axis=tuple(range(1, diff.ndim)))
        else:
            other += jnp.sum(diff * diff)
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
    """The "mc" draw's constants: both models (each draw averages a whole model) and the tokens."""

    params_a: Params
    params_b: Params
    tokens: jax.Array


def _mc_prepare(params_a: Params, params_b: Params, cfg: ModelConfig, tokens: Any) -> MCConsts:
    return MCConsts(params_a, params_b, jnp.asarray(tokens, dtype=jnp.int32))


def _mc_draw(consts: MCConsts, perm: Perm, cfg: ModelConfig) -> jax.Array:
    return mc_stat(consts.params_a, apply_permutation(consts.params_b, cfg, perm), cfg, consts.tokens)


def _mc_observed(params_a: Params, params_b: Params, cfg: ModelConfig, tokens: Any) -> np.ndarray:
    return sharding.to_host(_mc_stat_jit(params_a, params_b, cfg, np.asarray(tokens, dtype=np.int32)))


def _mc_bytes_per_draw(cfg: ModelConfig, tokens: ArrayLike) -> int:
    """Rough peak working memory of one "mc" draw in flight (float32): the averaged model, a permuted B, and
    the activations."""
    n_tok = int(np.prod(np.shape(tokens)))
    acts = n_tok * (2 * cfg.vocab_size + 8 * cfg.d_model + 3 * (cfg.d_ff + cfg.n_experts * cfg.d_expert)) * 4
    return 3 * cfg.num_params() * 4 + acts


# --------------------------------------------------------------------------------------------
# The sharded, chunked driver.


def default_draw_devices(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """The devices a one-process PERMTEST draws on when none are given: all of them on accelerators (each has its
    own memory), the first one on CPU. CPU devices share the process's memory and cores: splitting the draws over
    them would hold a copy of the constants per device and add collectives, and no compute."""
    return list(devices) if devices[0].platform != "cpu" else [devices[0]]


def _draw_mesh(params: Params, devices: Sequence[jax.Device] | None, layer_shards: int) -> Mesh:
    """The ``(perm, layers)`` mesh of a :func:`permtest` call: over ``devices``, else the params' devices (all
    devices for unplaced params; with the default ``layer_shards=0`` in one process, :func:`default_draw_devices`)."""
    if devices is None:
        layout = sharding.layout_of(params)
        devices = list(layout.mesh.devices.flat) if layout is not None else jax.devices()
        if layer_shards == 0 and jax.process_count() == 1:
            devices = default_draw_devices(devices)
    return make_mesh(devices, max(layer_shards, 1))


def make_mesh(devices: Sequence[jax.Device] | None = None, layer_shards: int = 1) -> Mesh:
    """A ``(perm, layers)`` mesh over ``devices`` (default: all devices): draws are split over ``perm``,
    the layers' constants over ``layers`` (``layer_shards`` devices per group of draws).

    Raises:
      JaxindError: no devices, or a device count that ``layer_shards`` does not divide.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise JaxindError("permtest needs at least one device")
    if layer_shards < 1 or len(devs) % layer_shards:
        raise JaxindError(
            f"--permtest_layer_shards={layer_shards} must divide the {len(devs)} devices PERMTEST runs on"
        )
    return Mesh(np.array(devs).reshape(len(devs) // layer_shards, layer_shards), (_AXIS, _LAYERS))


# Where each L2 constant lives on the (perm, layers) mesh: layer arrays split over "layers", the rest replicated.
_L2_SPECS: tuple[P, ...] = tuple(
    P(_LAYERS) if name.endswith("layers") or name.startswith("mlp") else P() for name in L2Consts._fields
)


_layer_row_jit = jax.jit(_layer_row, static_argnames=("cfg",))
_global_terms_jit = jax.jit(_global_terms, static_argnames=("cfg",))


def _on(tree: Any, mesh: Mesh) -> Any:
    """``tree`` as it is if it lives on ``mesh``'s devices, else copied there (replicated)."""
    devices = set(mesh.devices.flat)
    if all(leaf.sharding.device_set == devices for leaf in jax.tree.leaves(tree)):
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _piece_on(leaf: jax.Array | None, like: Any, device: jax.Device) -> jax.Array:
    """``leaf`` (zeros shaped ``like`` when None) as an array of its own on ``device``: a copy, never a view of a
    shard (a view keeps every shard of the array it came from alive)."""
    if leaf is None:
        return jax.device_put(np.zeros(like.shape, like.dtype), device)
    if leaf.is_fully_addressable:
        return jax.device_put(leaf, device)
    (shard,) = [s for s in leaf.addressable_shards if s.device == device]
    return jnp.copy(shard.data)


def _stack_rows_split(rows: Callable[[int], _LayerRow | None], depth: int, shapes: _LayerRow, mesh: Mesh) -> _LayerRow:
    """The ``depth`` rows ``rows(l)`` (replicated on ``mesh``; None past the model's depth: zeros) stacked along a
    new first axis split over ``layers``: each of this process's devices keeps only the rows of its own share
    (``depth / layer_shards`` of them) and stacks them itself, so no device ever holds more than its share and one
    row (a stacked update at a traced index would make XLA gather the whole stack on every device)."""
    n_held = depth // mesh.shape[_LAYERS]
    local = [
        (device, j) for (_, j), device in np.ndenumerate(mesh.devices) if device.process_index == jax.process_index()
    ]
    held: dict[Any, list[list[jax.Array]]] = {device: [[] for _ in shapes] for device, _ in local}
    for layer in range(depth):
        row = rows(layer)
        owners = [device for device, j in local if layer // n_held == j]
        for f, leaf in enumerate(row or shapes):
            for device in owners:
                held[device][f].append(_piece_on(leaf if row is not None else None, leaf, device))
    split = NamedSharding(mesh, P(_LAYERS))
    return _LayerRow._make(
        jax.make_array_from_single_device_arrays(
            (depth, *leaf.shape), split, [jnp.stack(held[device][f]) for device, _ in local]
        )
        for f, leaf in enumerate(shapes)
    )


def _place_consts(stat: PermStatistic | str, params_a: Params, params_b: Params, cfg: ModelConfig, tokens, mesh: Mesh):
    """The draw kernel's constants on ``mesh``: the statistic's ``place`` hook ("l2"), else its ``prepare``d
    constants replicated (for "mc" both models: each draw evaluates a whole averaged model)."""
    stat = resolve_statistic(stat)
    if stat.place is not None:
        return stat.place(params_a, params_b, cfg, tokens, mesh)
    return jax.device_put(stat.prepare(params_a, params_b, cfg, tokens), NamedSharding(mesh, P()))


def _place_l2(params_a: Params, params_b: Params, cfg: ModelConfig, tokens: Any, mesh: Mesh) -> L2Consts:
    """The "l2" constants on ``mesh``: the layer constants split over its ``layers`` axis (depth padded with zero
    layers to a multiple of it; a zero layer adds nothing) and built layer by layer, so each device holds
    ``1/layer_shards`` of the MLP stacks and Grams and no device gathers more than one layer."""
    if mesh.size == 1:  # one program for every layer: the same numbers as below, without 2 L dispatches
        return _on(l2_consts(params_a, params_b, cfg), mesh)
    depth = -(-cfg.n_layers // mesh.shape[_LAYERS]) * mesh.shape[_LAYERS]
    shapes = jax.eval_shape(functools.partial(_layer_row, cfg=cfg), params_a["layers"], params_b["layers"], 0)

    def row(layer: int) -> _LayerRow | None:
        if layer >= cfg.n_layers:
            return None
        out = _layer_row_jit(params_a["layers"], params_b["layers"], np.int32(layer), cfg=cfg)
        if all(x.is_fully_addressable for x in out):
            return out
        return jax.device_put(out, NamedSharding(mesh, P()))  # split between processes: replicated first

    stacks = _stack_rows_split(row, depth, shapes, mesh)
    glob = _on(_global_terms_jit(params_a, params_b, cfg=cfg), mesh)
    return _assemble_on(mesh)(stacks, glob, _on(experts.l2_consts(params_a, params_b, cfg), mesh))


@functools.lru_cache(maxsize=64)
def _assemble_on(mesh: Mesh) -> Callable:
    """Jitted :func:`_assemble` whose output lives on ``mesh`` (layer arrays split over ``layers``)."""
    return jax.jit(_assemble, out_shardings=L2Consts._make(NamedSharding(mesh, spec) for spec in _L2_SPECS))


def _l2_sharded(cfg: ModelConfig, mesh: Mesh) -> tuple[Callable, L2Consts]:
    """The "l2" per-device draws: each device evaluates the layers it holds (``L'`` is the depth padded to the
    ``layers`` axis) and the per-layer inner products are summed over the ``layers`` axis."""

    def local(consts, key_data, idx):
        key = jax.random.wrap_key_data(key_data)
        n_held = consts.gram_layers.shape[0]
        held = jax.lax.axis_index(_LAYERS) * n_held + jnp.arange(n_held)

        def inner(i):
            perm = draw_permutations(jax.random.fold_in(key, i), cfg, held)
            return _layer_inner(consts, perm), perm.resid

        inners, resids = jax.vmap(inner)(idx)
        # the sum over every layer, added in mesh order (an all-reduce's order may depend on the process split)
        sums = jnp.sum(jax.lax.all_gather(inners.sum(axis=1), _LAYERS, to="invarying"), axis=0)
        return jax.vmap(functools.partial(_l2_stats, consts))(inners, sums, resids)

    return local, L2Consts._make(_L2_SPECS)


def _generic_local(stat: PermStatistic, cfg: ModelConfig) -> Callable:
    """Per-device draws of a statistic's ``draw`` (constants replicated): ``vmap`` over the device's indices."""

    def local(consts, key_data, idx):
        key = jax.random.wrap_key_data(key_data)
        perms = jax.vmap(lambda i: draw_permutations(jax.random.fold_in(key, i), cfg))(idx)
        out = jax.vmap(lambda p: stat.draw(consts, p, cfg))(perms)
        if stat.per_layer:
            return out[0].astype(jnp.float32), out[1].astype(jnp.float32)
        return jnp.zeros((idx.shape[0], 0), jnp.float32), out.astype(jnp.float32)

    return local


@functools.lru_cache(maxsize=64)
def _sharded_draws(stat: PermStatistic, cfg: ModelConfig, mesh: Mesh) -> Callable:
    """Jitted ``(consts, key data, idx (C,)) -> (stat_layers (C, L'), stat_total (C,))`` with ``idx`` split over
    the ``perm`` axis: each device draws its own indices (the statistic's ``sharded`` hook, else its ``draw``
    vmapped); draw ``t`` is ``draw_permutations(fold_in(key, t))`` on every mesh."""
    local, specs = stat.sharded(cfg, mesh) if stat.sharded is not None else (_generic_local(stat, cfg), P())
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(_AXIS)), out_specs=(P(_AXIS, _LAYERS), P(_AXIS)))
    return jax.jit(mapped)


def _device_budget(mesh: Mesh, memory_budget_bytes: int) -> int:
    """Working memory for draws in flight on one device: ``memory_budget_bytes``, shared out between the CPU
    devices of a process (they share its memory)."""
    devices = list(mesh.devices.flat)
    if devices[0].platform != "cpu":
        return memory_budget_bytes
    return memory_budget_bytes // sum(1 for d in devices if d.process_index == devices[0].process_index)


def _chunk_size(
    stat: PermStatistic,
    cfg: ModelConfig,
    tokens: Any,
    consts: Any,
    mesh: Mesh,
    num_perms: int,
    chunk_size: int | None,
    budget: int,
) -> int:
    """Draws per device per step: ``chunk_size``, else what ``budget`` allows (on CPU at most the statistic's
    ``cpu_chunk``, for "l2" :data:`CPU_L2_CHUNK`); at most the next power of two above ``T / n_groups`` (so that
    different ``T`` reuse the same compiled shapes)."""
    if chunk_size is None:
        chunk_size = max(1, _device_budget(mesh, budget) // _bytes_per_draw(stat, cfg, tokens, consts))
        if stat.cpu_chunk is not None and mesh.devices.flat[0].platform == "cpu":
            chunk_size = min(chunk_size, stat.cpu_chunk)
    needed = -(-num_perms // mesh.shape[_AXIS])
    return max(1, min(int(chunk_size), 1 << (needed - 1).bit_length()))


def _bytes_per_draw(stat: PermStatistic, cfg: ModelConfig, tokens: ArrayLike | None, consts: Any) -> int:
    """Rough peak working memory of one draw in flight: the statistic's estimate, else the bytes of its
    constants (one device's share)."""
    if stat.bytes_per_draw is not None:
        return max(1, int(stat.bytes_per_draw(cfg, tokens)))
    return max(1, sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(consts)))


def _l2_bytes_per_draw(cfg: ModelConfig, tokens: Any) -> int:
    """The gathered layer stack and its product, one layer at a time (a layer's experts too), float32."""
    return 2 * 3 * cfg.d_model * (cfg.d_ff + cfg.n_experts * cfg.d_expert) * 4


def _check_pair(params_a: Params, params_b: Params, cfg: ModelConfig) -> None:
    sa = jax.tree.map(lambda x: tuple(x.shape), params_a)
    sb = jax.tree.map(lambda x: tuple(x.shape), params_b)
    if sa != sb:
        raise JaxindError("PERMTEST needs two models of the same architecture and shapes")
    check_tree(params_a, cfg)


def _check_args(
    statistic: Statistic, num_perms: int, tokens: Any, layers: Sequence[int] | None, layer_shards: int = 0
) -> PermStatistic:
    """The statistic behind ``statistic``, after checking the options it is called with.

    Raises:
      JaxindError: an unknown statistic (naming the registered ones), ``num_perms < 1``, missing tokens, or a
        layer selection or layer sharding the statistic does not take.
    """
    stat = resolve_statistic(statistic)
    if isinstance(num_perms, bool) or not isinstance(num_perms, int | np.integer) or num_perms < 1:
        raise JaxindError(f"num_perms must be an integer >= 1, got {num_perms!r}")
    if stat.needs_tokens and (tokens is None or np.ndim(tokens) != 2 or np.shape(tokens)[1] < 2):
        raise JaxindError(f"the {stat.name} statistic needs tokens of shape (N, T) with T >= 2")
    if layers is not None and stat.combine_layers is None:
        raise JaxindError(
            f"the {stat.name} statistic is one number for the whole pair; it takes no layer selection "
            "(only per-layer statistics such as l2 do)"
        )
    if layer_shards > 1 and stat.sharded is None:
        raise JaxindError(
            f"the {stat.name} statistic keeps its constants whole on every device; it takes no layer sharding "
            "(use layer_shards=1)"
        )
    return stat


def _result(
    stat: PermStatistic,
    stat0_layers: Any,
    stat0_total: Any,
    stats_layers: Any,
    stats_total: Any,
    layers: Sequence[int] | None,
) -> PermTestResult:
    """Exact p-values from the observed and drawn statistics. With ``layers`` the overall statistic is the
    statistic's ``combine_layers`` of those layers' statistics ("l2": minus the L2 distance over those layers
    only, ``-sqrt(sum_l stat_l^2)``), for the observed pair and for every draw alike (so still an exact
    PERMTEST)."""
    stats_total = np.asarray(stats_total, dtype=np.float64)
    stat0_total = float(stat0_total)
    if not (np.isfinite(stat0_total) and np.all(np.isfinite(stats_total))):
        raise JaxindError(
            f"the {stat.name} statistic returned NaN or inf (observed {stat0_total}, "
            f"{int(np.sum(~np.isfinite(stats_total)))} of {stats_total.shape[0]} draws); it must be finite"
        )
    records: list[LayerResult] = []
    s0l = stl = None
    if stat.per_layer:
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
            assert stat.combine_layers is not None  # checked by _check_args
            index = np.asarray(list(layers))
            stat0_total = float(stat.combine_layers(s0l[index]))
            stats_total = np.asarray(stat.combine_layers(stl[:, index]), dtype=np.float64)
    p, lp = pvalues.permtest_pvalue(stat0_total, stats_total)
    return PermTestResult(
        test=stat.name,
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


def _observed(stat: PermStatistic, params_a: Params, params_b: Params, cfg: ModelConfig, tokens):
    """``(stat0_layers or None, stat0_total)`` on the host: the statistic's ``observed`` hook, else its ``direct``
    form (or the identity's draw) jitted."""
    if stat.observed is not None:
        out = stat.observed(params_a, params_b, cfg, tokens)
    else:
        out = sharding.to_host(_observed_jit(stat, cfg)(params_a, params_b, tokens))
    layers, total = out if stat.per_layer else (None, out)
    if np.ndim(total) != 0:
        raise JaxindError(
            f"PERMTEST statistic {stat.name!r} must return one float scalar for a pair of trees, got shape "
            f"{np.shape(total)}"
        )
    return layers, total


@functools.lru_cache(maxsize=64)
def _observed_jit(stat: PermStatistic, cfg: ModelConfig) -> Callable:
    return jax.jit(lambda a, b, tokens: stat.direct_or_draw(a, b, cfg, tokens))


_NEW_FORM = "permtest.permtest(params_a, cfg_a, params_b, cfg_b, *, key, layers=None, **options)"


@timed
def permtest(
    params_a: Params,
    cfg_a: Any = None,
    params_b: Any = None,
    cfg_b: Any = None,
    *legacy: Any,
    key: jax.Array | None = None,
    layers: Sequence[int] | None = None,
    num_perms: int = 999,
    statistic: Statistic = "l2",
    tokens: ArrayLike | None = None,
    devices: Sequence[jax.Device] | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 512 * 2**20,
    layer_shards: int = 0,
    cfg: ModelConfig | None = None,
) -> PermTestResult:
    """PERMTEST(statistic, T) with the draws vmapped, chunked and sharded over devices, called as
    ``permtest(params_a, cfg_a, params_b, cfg_b, *, key, layers=None, **options)`` (docs/DESIGN.md §5.3; the old
    form ``permtest(params_a, params_b, cfg, key, ...)`` works for one release with a DeprecationWarning).

    Args:
      params_a, cfg_a, params_b, cfg_b: two param trees of one config (``cfg_a == cfg_b``).
      key: PRNG key; draw ``t`` uses ``draw_permutations(fold_in(key, t), cfg)``.
      num_perms: T, the number of random group elements.
      statistic: larger = more similar: "l2", "mc", a name given to
        :func:`jaxind.stats.statistics.register_statistic`, a function ``(params_a, params_b) -> scalar``, or a
        :class:`jaxind.stats.statistics.PermStatistic` (precomputed constants and a cheap draw).
      tokens: ``(N, T)`` int tokens for "mc" (and statistics that read them).
      devices: devices to shard the draws over (default: all devices).
      chunk_size: draws per device per step (default: from ``memory_budget_bytes``; for "l2" on CPU at most
        :data:`CPU_L2_CHUNK`).
      memory_budget_bytes: working memory per device for draws in flight (on CPU, for the devices of a
        process together: they share its memory).
      layers: "l2" only: report these layers and test the distance over them alone (default:
        every layer reported, the distance over every parameter tested).
      layer_shards: "l2" only: split the layers' constants (MLP stacks, Grams) over this many devices
        per group of draws (mesh ``(perm, layers)``); the statistics of a draw are summed over them.
        0 (default): 1, and in one process without ``devices`` the draws run on :func:`default_draw_devices`
        (one device on CPU).

    Returns:
      PermTestResult with the observed and drawn statistics and exact p-values (per layer and
      total for "l2"; total for the others); ``test`` is the statistic's name.

    Raises:
      JaxindError: an unknown statistic or bad option (the message names the valid ones), a pair of trees that
        do not match ``cfg``, or a statistic that does not return one finite float scalar per draw.
    """
    params_a, params_b, cfg, key = convention.one_config_pair(
        "permtest.permtest", _NEW_FORM, (params_a, cfg_a, params_b, cfg_b), legacy, key, cfg
    )
    key = convention.check_key(key, "permtest.permtest")
    stat = _check_args(statistic, num_perms, tokens, layers, layer_shards)
    _check_pair(params_a, params_b, cfg)
    if cfg.moe and layer_shards > 1:
        raise JaxindError(
            f"{cfg.family} is a mixture of experts: PERMTEST-L2 keeps its experts whole on every device; "
            "use --permtest_layer_shards=1"
        )
    mesh = _draw_mesh(params_a, devices, layer_shards)
    consts = _place_consts(stat, params_a, params_b, cfg, tokens, mesh)
    if stat.sharded is None:
        check_draw(stat, consts, cfg)
    n = _chunk_size(stat, cfg, tokens, consts, mesh, num_perms, chunk_size, memory_budget_bytes)
    stats_layers, stats_total = _run_draws(stat, cfg, consts, key, mesh, num_perms, n * mesh.shape[_AXIS])
    stat0_layers, stat0_total = _observed(stat, params_a, params_b, cfg, tokens)
    return _result(stat, stat0_layers, stat0_total, stats_layers, stats_total, layers)


def _run_draws(
    stat: PermStatistic, cfg: ModelConfig, consts: Any, key: jax.Array, mesh: Mesh, num_perms: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``0 .. T-1``, ``step`` at a time over ``mesh``: ``(stats_layers (T, L or 0), stats_total (T,))``."""
    key_data = jax.device_put(jax.random.key_data(key), NamedSharding(mesh, P()))
    idx_sharding = NamedSharding(mesh, P(_AXIS))
    fn = _sharded_draws(stat, cfg, mesh)
    layer_chunks, total_chunks = [], []
    bar = progress.bar(total=num_perms, desc=f"PERMTEST-{stat.name}", unit="perm")
    for start in range(0, num_perms, step):
        idx = np.arange(start, start + step, dtype=np.int32)
        chunk_layers, total = fn(
            consts, key_data, jax.make_array_from_callback(idx.shape, idx_sharding, idx.__getitem__)
        )
        layer_chunks.append(chunk_layers)
        # one chunk in flight at a time: concurrent executions of the collectives of a multi-device CPU mesh can
        # deadlock XLA's in-process rendezvous (each waits for device threads the other holds)
        total_chunks.append(total.block_until_ready())
        bar.update(min(step, num_perms - start))
    bar.close()
    stats_layers = np.concatenate([sharding.to_host(c) for c in layer_chunks])[:num_perms, : cfg.n_layers]
    stats_total = np.concatenate([sharding.to_host(c) for c in total_chunks])[:num_perms]
    return stats_layers, stats_total


@functools.lru_cache(maxsize=16)
def _loop_step(stat: PermStatistic, cfg: ModelConfig) -> Callable:
    """Jitted ``(A, B, key, t) -> stat(A, apply_permutation(B, draw(fold_in(key, t))))``, the statistic computed
    directly from the two trees."""

    def step(params_a, params_b, key, t, tokens):
        permuted = apply_permutation(params_b, cfg, draw_permutations(jax.random.fold_in(key, t), cfg))
        out = stat.direct_or_draw(params_a, permuted, cfg, tokens)
        return out if stat.per_layer else (jnp.zeros((0,), jnp.float32), out)

    return jax.jit(step)


@timed
def permtest_loop(
    params_a: Params,
    cfg_a: Any = None,
    params_b: Any = None,
    cfg_b: Any = None,
    *legacy: Any,
    key: jax.Array | None = None,
    num_perms: int = 999,
    statistic: Statistic = "l2",
    tokens: ArrayLike | None = None,
    cfg: ModelConfig | None = None,
) -> PermTestResult:
    """Reference PERMTEST: a Python loop over draws, each materialising ``p_t(B)`` with
    :func:`apply_permutation` and computing the statistic directly (one jitted step per draw). Called as
    :func:`permtest` is (the old form ``(params_a, params_b, cfg, key)`` with a DeprecationWarning).

    Same draws as :func:`permtest` for the same ``key`` (``fold_in(key, t)``), so the results
    agree up to float rounding.
    """
    params_a, params_b, cfg, key = convention.one_config_pair(
        "permtest.permtest_loop",
        _NEW_FORM.replace("permtest(", "permtest_loop("),
        (params_a, cfg_a, params_b, cfg_b),
        legacy,
        key,
        cfg,
    )
    key = convention.check_key(key, "permtest.permtest_loop")
    stat = _check_args(statistic, num_perms, tokens, None)
    _check_pair(params_a, params_b, cfg)
    step = _loop_step(stat, cfg)
    toks = None if tokens is None else jnp.asarray(tokens, dtype=jnp.int32)
    layers, totals = [], []
    for t in range(num_perms):  # dispatched asynchronously; read back once at the end
        sl, st = step(params_a, params_b, key, t, toks)
        layers.append(sl)
        totals.append(st)
    stat0_layers, stat0_total = _observed(stat, params_a, params_b, cfg, tokens)
    return _result(
        stat, stat0_layers, stat0_total, np.stack(jax.device_get(layers)), np.asarray(jax.device_get(totals)), None
    )


def _combine_l2(stats: Any) -> Any:
    """Minus the L2 distance over a layer selection, from its per-layer statistics (minus distances)."""
    return -np.sqrt(np.sum(stats**2, axis=-1))


L2 = register_statistic(
    "l2",
    PermStatistic(
        name="l2",
        prepare=lambda a, b, cfg, tokens: l2_consts(a, b, cfg),
        draw=lambda consts, perm, cfg: l2_draw(consts, perm),
        direct=lambda a, b, cfg, tokens: _l2_direct_traced(a, b, cfg),
        observed=lambda a, b, cfg, tokens: l2_direct(a, b, cfg),
        per_layer=True,
        combine_layers=_combine_l2,
        bytes_per_draw=_l2_bytes_per_draw,
        cpu_chunk=CPU_L2_CHUNK,
        place=_place_l2,
        sharded=_l2_sharded,
    ),
)
MC = register_statistic(
    "mc",
    PermStatistic(
        name="mc",
        prepare=_mc_prepare,
        draw=_mc_draw,
        direct=mc_stat,
        observed=_mc_observed,
        needs_tokens=True,
        bytes_per_draw=_mc_bytes_per_draw,
    ),
)
