"""One pass over the data for both models: the Gram statistics CSH, MATCH and localized testing need.

Gate and up activations are linear in the MLP's normed input ``x (B*T, d)``: ``G = x W_gate``,
``U = x W_up``. So every Gram statistic the activation tests need follows from Grams of the inputs::

    G_A^T G_B = W_gate_A^T (x_A^T x_B) W_gate_B,    ||G_A[:, i]||^2 = diag(W_A^T (x_A^T x_A) W_A)_i.

The pass therefore accumulates one ``d_A x d_B`` input cross-Gram per layer pair, plus each unit's
sum of squared outputs (``h``-vectors; gate and up are computed by the forward pass anyway),
instead of two ``h_A x h_B`` output Grams: for Llama-2-7B (``d = 4,096``, ``h = 11,008``) 14x less
memory and 14x fewer multiply-adds per token. Each batch runs both forwards (activation-only, no
LM head) and one jitted, donated step adds its Grams to the running state; no token's activations
are stored. The ``h x h`` Grams are formed one layer pair at a time, on the device, when the LAPs
need them (:meth:`PassStats.grams`; :meth:`PassStats.project_both` dispatches a pair's two projections
at once, for MATCH to run ahead of its LAPs). Why this design: docs/DESIGN.md §5.1.

Inside the scanned forward (:func:`jaxind.models.model.run_layers`) each collected layer keeps only its
masked MLP input ``(N, d)`` and its units' sums of squares ``(h,)`` in a preallocated buffer, so a
batch holds ``(k + 1) (N d + 2 h)`` floats per model for ``k`` collected layers (no ``(N, h)``
activations at all), whatever the depth.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.io import alignment
from jaxind.models import model as model_lib
from jaxind.models.config import ModelConfig
from jaxind.parallel import sharding
from jaxind.types import Params

__all__ = [
    "Batch",
    "PassStats",
    "accumulate",
    "accumulate_aligned",
    "accumulate_step",
    "aligned_step",
    "init_state",
    "normalize_batches",
    "padded",
    "row_distances",
    "sq_distances",
    "state_shardings",
]

# tokens (B, T), mask (B, T) or None, and the attention mask: the mask again where a sequence is padded, else None
Batch = tuple[jax.Array, jax.Array | None, jax.Array | None]


@dataclasses.dataclass
class PassStats:
    """What one pass over the data accumulated, and how to turn it into hidden-unit Grams.

    Attributes:
      cross: ``(*pair_shape, d_A, d_B)`` sums over tokens of ``x_A x_B^T`` per layer pair
        (pair_shape ``(P,)`` for explicit pairs, ``(n_a, n_b)`` for all pairs), or anything indexed
        the same way (:class:`jaxind.stats.fingerprint.CrossGrams` computes each item from two
        fingerprints on first use).
      sq_a, sq_b: ``{"gate": (n_a, h_A), "up": (n_a, h_A)}`` (and ``n_b, h_B``): each unit's sum
        of squared outputs per collected layer.
      count: number of tokens counted.
      weights_a, weights_b: the stacked ``{"gate": (L, d, h), "up": (L, d, h)}`` kernels (references
        into the param trees, not copies).
      layers_a, layers_b: the collected layers (row ``i`` of ``sq_a`` is layer ``layers_a[i]``).
      pair_index: for explicit pairs, ``(ia, ib)`` positions of each pair in the collected layers.
    """

    cross: Any
    sq_a: dict[str, np.ndarray]
    sq_b: dict[str, np.ndarray]
    count: float
    weights_a: dict[str, jax.Array]
    weights_b: dict[str, jax.Array]
    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    pair_index: tuple[tuple[int, int], ...] = ()

    def grams(self, pair: int | tuple[int, int], proj: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cross (h_A, h_B), sq_norm_a (h_A,), sq_norm_b (h_B,))`` of projection ``proj``
        ("gate" or "up") for a pair: an index into the explicit pairs, or ``(ia, ib)`` for all-pairs
        statistics. Sums over the counted tokens, as float64 numpy."""
        if isinstance(pair, tuple):
            ia, ib = pair
            index: tuple[int, ...] = pair
        else:
            ia, ib = self.pair_index[pair]
            index = (pair,)
        w_a, w_b = self.weights_a[proj], self.weights_b[proj]
        c = _project(w_a, self.layers_a[ia], w_b, self.layers_b[ib], *self._cross_at(index))
        return (
            sharding.to_host(c).astype(np.float64),
            self.sq_a[proj][ia].astype(np.float64),
            self.sq_b[proj][ib].astype(np.float64),
        )

    def _cross_at(self, index: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        """``(crosses, index)`` for the jitted projections: the stacked array and the pair's index, or, for a
        cross that is not an array (:class:`jaxind.stats.fingerprint.CrossGrams`), its item for the pair and ``()``."""
        if isinstance(self.cross, (jax.Array, np.ndarray)):
            return self.cross, index
        return self.cross[index[0] if len(index) == 1 else index], ()

    def distances(self, pair: int | tuple[int, int], proj: str) -> np.ndarray:
        """Squared Euclidean distances ``(h_A, h_B)`` between hidden units' activation rows."""
        return sq_distances(*self.grams(pair, proj))

    def project_both(self, pair: int) -> jax.Array:
        """Dispatches (asynchronously) the gate and up output cross-Grams ``(2, h_A, h_B)`` of explicit pair
        ``pair``, in one device call: a caller starts the next pair's Grams before it solves this pair's LAPs."""
        ia, ib = self.pair_index[pair]
        return _project_both(
            self.weights_a["gate"],
            self.weights_a["up"],
            self.layers_a[ia],
            self.weights_b["gate"],
            self.weights_b["up"],
            self.layers_b[ib],
            *self._cross_at((pair,)),
        )

    def distances_from(self, pair: int, crosses: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """``(d_gate, d_up)`` squared distances of explicit pair ``pair`` from :meth:`PassStats.project_both`'s result:
        the same float64 numbers as :meth:`PassStats.distances` (one transfer for both projections)."""
        ia, ib = self.pair_index[pair]
        host = sharding.to_host(crosses)
        return tuple(  # type: ignore[return-value]
            sq_distances(host[k], self.sq_a[proj][ia], self.sq_b[proj][ib]) for k, proj in enumerate(("gate", "up"))
        )


@jax.jit
def _project(w_a: jax.Array, layer_a, w_b: jax.Array, layer_b, crosses: jax.Array, index) -> jax.Array:
    """Input cross-Gram ``C = crosses[index] (d_A, d_B)`` -> output cross-Gram ``W_a[layer_a]^T C W_b[layer_b]
    (h_A, h_B)`` from the stacked kernels ``(L, d, h)`` (indices traced: one compilation for every pair; nothing
    is sliced out of a sharded array outside the computation)."""
    hi = jax.lax.Precision.HIGHEST
    wa, wb = w_a[layer_a].astype(jnp.float32), w_b[layer_b].astype(jnp.float32)
    return jnp.matmul(jnp.matmul(wa.T, crosses[tuple(index)], precision=hi), wb, precision=hi)


@jax.jit
def _project_both(gate_a, up_a, layer_a, gate_b, up_b, layer_b, crosses: jax.Array, index) -> jax.Array:
    """:func:`_project` for gate and up at once: ``(2, h_A, h_B)``, each computed exactly as :func:`_project`
    computes it (same products in the same order), so the numbers are identical."""
    hi = jax.lax.Precision.HIGHEST
    c = crosses[tuple(index)]
    out = []
    for w_a, w_b in ((gate_a, gate_b), (up_a, up_b)):
        wa, wb = w_a[layer_a].astype(jnp.float32), w_b[layer_b].astype(jnp.float32)
        out.append(jnp.matmul(jnp.matmul(wa.T, c, precision=hi), wb, precision=hi))
    return jnp.stack(out)


def init_state(
    d_a: int,
    d_b: int,
    h_a: int,
    h_b: int,
    n_a: int,
    n_b: int,
    pair_shape: tuple[int, ...],
    layout: sharding.Layout | None = None,
) -> dict[str, jax.Array]:
    """Zero accumulator: ``{"cross": (*pair_shape, d_a, d_b), "gate_a"/"up_a": (n_a, h_a),
    "gate_b"/"up_b": (n_b, h_b), "count": ()}`` float32; with a ``layout``, placed by :func:`state_shardings`."""
    shapes = {
        "cross": (*pair_shape, d_a, d_b),
        "gate_a": (n_a, h_a),
        "up_a": (n_a, h_a),
        "gate_b": (n_b, h_b),
        "up_b": (n_b, h_b),
        "count": (),
    }

    if layout is None:
        return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
    shardings = state_shardings(layout, shapes)
    return {name: sharding.zeros(shape, jnp.float32, shardings[name]) for name, shape in shapes.items()}


def state_shardings(layout: sharding.Layout, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Where the accumulator lives on a mesh: the cross-Grams split over their rows (``embed``: the ``fsdp`` axis),
    the unit sums over ``mlp``; the data-parallel sums over the batch are reduced into them by XLA."""
    names: dict[str, tuple[str | None, ...]] = {
        "cross": (None,) * (len(shapes["cross"]) - 2) + ("embed", None),
        "count": (),
    }
    return {name: layout.sharding(shape, names.get(name, (None, "mlp"))) for name, shape in shapes.items()}


def _layer_stats(mask: jax.Array | None) -> model_lib.Collector:
    """What each collected layer keeps during the scan: its masked MLP input ``"x" (N, d)`` float32 and
    its units' masked sums of squares ``"gate"``/``"up"`` ``(h,)`` (no ``(N, h)`` activation is kept)."""

    def keep(out: model_lib.LayerOut) -> dict[str, jax.Array]:
        weight = None if mask is None else mask.reshape(-1, 1).astype(jnp.float32)
        kept = {}
        for name in ("x", "gate", "up"):
            value = out[name].reshape(-1, out[name].shape[-1]).astype(jnp.float32)
            value = value if weight is None else value * weight
            kept[name] = value if name == "x" else jnp.sum(jnp.square(value), axis=0)
        return kept

    return keep


def _collect(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    mask,
    layers: tuple[int, ...],
    unroll: bool,
    layout,
    attention_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``{"x": (n, N, d), "gate": (n, h), "up": (n, h)}`` for the collected ``layers`` of one model; with an
    ``attention_mask`` the forward masks padding and counts positions over real tokens (:func:`model.forward`)."""
    padding = None if attention_mask is None else model_lib.padding_positions(attention_mask)
    x = model_lib.embed(params, cfg, tokens, None if padding is None else padding["pos"])
    x_sharding = None if layout is None else layout.activations(x.shape[0], x.shape[1], x.shape[2])
    stats = _layer_stats(mask)
    return model_lib.run_layers(
        params["layers"], cfg, x, layers, stats, max(layers) + 1, unroll, x_sharding=x_sharding, padding=padding
    )[1]


@functools.partial(
    jax.jit,
    static_argnames=("cfg_a", "cfg_b", "layers_a", "layers_b", "pair_index", "outer", "unroll", "layout"),
    donate_argnames=("state",),
)
def accumulate_step(
    state: dict[str, jax.Array],
    params_a: Params,
    params_b: Params,
    tokens: jax.Array,
    mask: jax.Array | None,
    attention_mask: jax.Array | None = None,
    *,
    cfg_a: ModelConfig,
    cfg_b: ModelConfig,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
    unroll: bool = False,
    layout: sharding.Layout | None = None,
) -> dict[str, jax.Array]:
    """Adds one token batch to the accumulator (jitted; ``state`` is donated).

    Args:
      state: from :func:`init_state`.
      tokens: ``(B, T)`` int token ids, fed to both models.
      mask: ``(B, T)`` bool/0-1 weights of the tokens to count, or None for all.
      attention_mask: ``(B, T)`` where sequences are padded (:func:`normalize_batches` passes the mask again):
        padding tokens are masked out of attention and positions count real tokens, so a padded sequence's
        statistics are its unpadded ones; None: every row runs as given (rows of padding only are just not counted).
      layers_a / layers_b: the collected layers of A / B (sorted tuples).
      pair_index: for ``outer=False``, pairs ``(ia, ib)`` of positions into ``layers_a`` /
        ``layers_b``; the cross Gram of pair p is ``state["cross"][p]``.
      outer: accumulate all ``len(layers_a) x len(layers_b)`` pairs instead.
      unroll: run the layers as a Python loop instead of a scan (the compile-time benchmark's baseline).
      layout: the mesh the params and batches live on (the new state keeps :func:`state_shardings`).

    Returns:
      The updated state.
    """
    hi = jax.lax.Precision.HIGHEST
    stats_a = _collect(params_a, cfg_a, tokens, mask, layers_a, unroll, layout, attention_mask)
    stats_b = _collect(params_b, cfg_b, tokens, mask, layers_b, unroll, layout, attention_mask)
    xa, xb = stats_a["x"], stats_b["x"]  # (n_a, N, d_a), (n_b, N, d_b)
    if outer:
        cross = jnp.einsum("ind,jne->ijde", xa, xb, precision=hi)
    else:
        ia = jnp.asarray([p[0] for p in pair_index], dtype=jnp.int32)
        ib = jnp.asarray([p[1] for p in pair_index], dtype=jnp.int32)
        cross = jnp.einsum("pnd,pne->pde", xa[ia], xb[ib], precision=hi)
    new = {"cross": state["cross"] + cross}
    for name in ("gate", "up"):
        new[name + "_a"] = state[name + "_a"] + stats_a[name]
        new[name + "_b"] = state[name + "_b"] + stats_b[name]
    count = tokens.size if mask is None else jnp.sum(mask.astype(jnp.float32))
    new["count"] = state["count"] + count
    if layout is not None:
        new = jax.lax.with_sharding_constraint(new, state_shardings(layout, {k: v.shape for k, v in new.items()}))
    return new


def sq_distances(cross: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(h_A, h_B)`` float64 from a cross Gram ``(h_A, h_B)`` and row
    norms ``(h_A,)``, ``(h_B,)``; clipped at 0 (rounding can make the expansion slightly negative)."""
    # the same operations as ``max(norm_a[:, None] + norm_b[None, :] - 2 cross, 0)`` in float64 (doubling is exact),
    # in place: two (h_A, h_B) float64 buffers instead of five
    d = np.add.outer(norm_a.astype(np.float64), norm_b.astype(np.float64))
    twice = cross.astype(np.float64)
    twice *= 2.0
    d -= twice
    return np.maximum(d, 0.0, out=d)


def row_distances(xa: Any, xb: Any) -> np.ndarray:
    """Squared Euclidean distances ``(h_A, h_B)`` float64 between the columns (units) of
    activations ``xa (N, h_A)`` and ``xb (N, h_B)`` over the same N inputs."""
    xa, xb = jnp.asarray(xa, jnp.float32), jnp.asarray(xb, jnp.float32)
    cross = jnp.matmul(xa.T, xb, precision=jax.lax.Precision.HIGHEST)
    return sq_distances(np.asarray(cross), np.asarray(jnp.sum(xa * xa, 0)), np.asarray(jnp.sum(xb * xb, 0)))


def padded(mask: Any, layout: sharding.Layout | None = None) -> bool:
    """Whether some sequence of ``mask (B, T)`` has both counted and uncounted tokens: a padded batch, whose
    forward needs the attention mask. Rows all counted or all uncounted (:func:`jaxind.io.token_source.batches`
    fills the
    last batch with uncounted rows) run unmasked, the computation of earlier releases. On a multi-process mesh
    the processes agree (any process's padding counts), so all of them compile the same program."""
    if mask is None:
        return False
    real = np.asarray(mask).reshape(np.shape(mask)[0], -1) != 0
    answer = bool((real.any(axis=1) & ~real.all(axis=1)).any())
    if layout is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        answer = bool(np.asarray(multihost_utils.process_allgather(np.asarray(answer))).any())
    return answer


def normalize_batches(batches: Iterable[Any], layout: sharding.Layout | None = None) -> Iterator[Batch]:
    """Normalises batches to ``(tokens (B, T), mask (B, T) | None, attention mask)``, on one device or, with a
    ``layout``, split over its ``batch`` axes (each process supplies the rows of its own devices). The attention
    mask is the mask itself where a sequence is padded (:func:`padded`: padding on either side of a sequence,
    mask 0 on its padding), else None."""
    place = jnp.asarray if layout is None else layout.batch
    for batch in batches:
        if isinstance(batch, dict):
            tokens, mask = batch["tokens"], batch.get("mask")
        elif isinstance(batch, tuple):
            tokens, mask = batch
        else:
            tokens, mask = batch, None
        placed = None if mask is None else place(np.asarray(mask))
        yield place(np.asarray(tokens)), placed, (placed if padded(mask, layout) else None)


def accumulate(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    batches: Iterable,
    *,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
) -> PassStats:
    """One pass over ``batches`` (each ``(B, T)`` tokens, ``(tokens, mask)`` or ``{"tokens", "mask"}``)
    for both models together, accumulating the input Grams; see :class:`PassStats`. A mask that pads sequences
    (0 on padding, left or right) is also the forward's attention mask (:func:`normalize_batches`): the
    statistics of a padded batch are those of its unpadded sequences."""
    for cfg in (cfg_a, cfg_b):
        if cfg.moe:
            raise JaxindError(
                f"{cfg.family} is a mixture of experts: its activation statistics are "
                "jaxind.stats.experts.accumulate's "
                "(the registry's csh/match choose them)"
            )
        if not cfg.glu:
            raise JaxindError(
                f"MATCH needs GLU MLPs (gate and up projections); the {cfg.family!r} family has "
                "none: use the generalized test (jaxind.stats.generalized) for this pair"
            )
    if isinstance(batches, alignment.AlignedBatches):  # models with different tokenizers
        return accumulate_aligned(
            batches,
            params_a,
            cfg_a,
            params_b,
            cfg_b,
            layers_a=layers_a,
            layers_b=layers_b,
            pair_index=pair_index,
            outer=outer,
        )
    pair_shape = (len(layers_a), len(layers_b)) if outer else (len(pair_index),)
    layout = sharding.layout_of(params_a)
    state = init_state(
        cfg_a.d_model, cfg_b.d_model, cfg_a.d_ff, cfg_b.d_ff, len(layers_a), len(layers_b), pair_shape, layout
    )
    n_batches = 0
    for tokens, mask, attention_mask in progress.bar(normalize_batches(batches, layout), desc="MATCH pass"):
        state = accumulate_step(
            state,
            params_a,
            params_b,
            tokens,
            mask,
            attention_mask,
            cfg_a=cfg_a,
            cfg_b=cfg_b,
            layers_a=layers_a,
            layers_b=layers_b,
            pair_index=pair_index,
            outer=outer,
            layout=layout,
        )
        n_batches += 1
    if n_batches == 0:
        raise JaxindError("MATCH got no token batches")
    return _pass_stats(state, params_a, params_b, layers_a, layers_b, pair_index)


def _pass_stats(
    state: dict[str, jax.Array],
    params_a: Params,
    params_b: Params,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...],
) -> PassStats:
    """The :class:`PassStats` of a finished pass's accumulator ``state`` (:func:`init_state`'s keys)."""
    return PassStats(
        cross=state["cross"],  # stays on the device: the h x h Grams are derived there
        sq_a={p: sharding.to_host(state[p + "_a"]) for p in ("gate", "up")},
        sq_b={p: sharding.to_host(state[p + "_b"]) for p in ("gate", "up")},
        count=float(sharding.to_host(state["count"])),
        weights_a={k: params_a["layers"][k] for k in ("gate", "up")},
        weights_b={k: params_b["layers"][k] for k in ("gate", "up")},
        layers_a=tuple(layers_a),
        layers_b=tuple(layers_b),
        pair_index=tuple(pair_index),
    )


# --- models with different tokenizers: the pass over aligned positions (jaxind.io.alignment) ---------------


def accumulate_aligned(
    batches: alignment.AlignedBatches,
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    *,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
) -> PassStats:
    """:func:`accumulate` over the aligned positions of two tokenizations (docs/DESIGN.md §5.14)."""
    pair_shape = (len(layers_a), len(layers_b)) if outer else (len(pair_index),)
    state = init_state(cfg_a.d_model, cfg_b.d_model, cfg_a.d_ff, cfg_b.d_ff, len(layers_a), len(layers_b), pair_shape)
    static = dict(cfg_a=cfg_a, cfg_b=cfg_b, layers_a=layers_a, layers_b=layers_b, pair_index=pair_index)
    for batch in progress.bar(iter(batches), desc="MATCH pass (aligned tokens)"):
        state = aligned_step(state, params_a, params_b, batch, outer=outer, **static)
    return _pass_stats(state, params_a, params_b, layers_a, layers_b, pair_index)


@functools.partial(
    jax.jit,
    static_argnames=("cfg_a", "cfg_b", "layers_a", "layers_b", "pair_index", "outer"),
    donate_argnames=("state",),
)
def aligned_step(
    state: dict[str, jax.Array],
    params_a: Params,
    params_b: Params,
    batch: dict[str, jax.Array],
    *,
    cfg_a: ModelConfig,
    cfg_b: ModelConfig,
    layers_a: tuple[int, ...],
    layers_b: tuple[int, ...],
    pair_index: tuple[tuple[int, int], ...] = (),
    outer: bool = False,
) -> dict[str, jax.Array]:
    """:func:`accumulate_step` for aligned batches: each model runs on its own ids, its unit sums of
    squares count its aligned positions (the masks), and the MLP inputs at the aligned positions are gathered in
    the alignment's order before the cross-Grams are summed."""
    hi = jax.lax.Precision.HIGHEST
    stats_a = _collect(params_a, cfg_a, batch["tokens_a"], batch["mask_a"], layers_a, False, None)
    stats_b = _collect(params_b, cfg_b, batch["tokens_b"], batch["mask_b"], layers_b, False, None)
    valid = batch["valid"].reshape(-1)
    xa = _gather_positions(stats_a["x"], batch["pos_a"], batch["tokens_a"].shape[1]) * valid[None, :, None]
    xb = _gather_positions(stats_b["x"], batch["pos_b"], batch["tokens_b"].shape[1]) * valid[None, :, None]
    if outer:
        cross = jnp.einsum("ind,jne->ijde", xa, xb, precision=hi)
    else:
        ia = jnp.asarray([p[0] for p in pair_index], dtype=jnp.int32)
        ib = jnp.asarray([p[1] for p in pair_index], dtype=jnp.int32)
        cross = jnp.einsum("pnd,pne->pde", xa[ia], xb[ib], precision=hi)
    new = {"cross": state["cross"] + cross, "count": state["count"] + jnp.sum(valid)}
    for name in ("gate", "up"):
        new[name + "_a"] = state[name + "_a"] + stats_a[name]
        new[name + "_b"] = state[name + "_b"] + stats_b[name]
    return new


def _gather_positions(x: jax.Array, pos: jax.Array, length: int) -> jax.Array:
    """Rows ``pos (B, K)`` of each sequence from flattened ``x (n, B * length, d)`` -> ``(n, B * K, d)``."""
    flat = (jnp.arange(pos.shape[0])[:, None] * length + pos).reshape(-1)
    return x[:, flat]
