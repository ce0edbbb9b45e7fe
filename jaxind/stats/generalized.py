"""Generalized robust test (docs/DESIGN.md §1): MATCH on GLU MLPs distilled from each model's blocks.

For each MLP block of each model, any family (the block is only ever called, through
:func:`jaxind.models.model.mlp_output` or any function ``x (..., d) -> (..., d)``), a fresh GLU MLP
``x -> (act(x W_g) * (x W_u)) W_d`` of width ``h`` is trained with optax Adam to imitate the block
on Gaussian inputs ``x ~ N(0, input_scale^2 I_d)``; MATCH then compares the two distilled GLUs'
gate and up activations over fresh Gaussian inputs.

Statistical design:
- The two students of a pair start from **independent** random initialisations (keys derived
  from ``key`` and the model index). A shared initialisation would make the students of two
  independent blocks resemble each other through their common starting point (most visibly
  after short training) and break the null. With independent starts, the students of
  independent blocks are independent, and the matched permutations of their units are
  equivariant under relabelling the students' units, as MATCH needs.
- A dependent pair is detected when each block has an (approximately) identifiable GLU
  decomposition: training a GLU of the same width recovers the teacher's units up to
  permutation, whatever the student's init, so the two students agree unit by unit. The fit
  ``r2`` of each distillation is reported; a poor fit (r2 well below 1) weakens the test.
- Each student is canonicalised (:func:`canonicalize_student`: ``||d_i|| = 1``,
  ``<u_i, g_i> >= 0``) before matching, removing the GLU's per-unit scale/sign freedom that
  would otherwise flip up activations at random between two students of the same block.
- Targets are divided by the teacher's output RMS (a scalar; it rescales only the students'
  down projections and leaves gate/up activations, which MATCH compares, unchanged).
- MATCH needs two *views* of each unit whose matchings are independent under the null: for
  GLU teachers the gate and up projections (as in the paper). A student imitating a plain
  (non-GLU, GPT-2 style) MLP learns ``u_i ~ g_i`` for every unit (one direction per teacher
  unit), so gate and up matchings coincide for *any* pair of models and the gate/up Spearman
  p-value collapses to ~0 even for independent models (measured: 66/66 independent plain-MLP
  pairs below 0.05, |cos(g_i, u_i)| = 0.98). ``views="split"`` avoids this: a random orthogonal
  split of the input space ``R^d = V1 + V2``; view 1 = gate activations on Gaussian inputs in
  V1, view 2 = up activations on inputs in V2. They depend on disjoint coordinates of each
  unit's weights, so the matchings are (approximately, for weight directions spread over the
  space) independent under the null whatever the gate/up coupling, and still agree for
  derived blocks (measured at d = 32, h = 64, 4000 Adam steps, 12 teachers = 66 null pairs per
  kind; plain pairs: null KS p = 0.64, child log10 p = -24; GLU pairs: null KS
  p = 0.10, child -4.8 vs -8.8 for gate/up). ``views="auto"`` (default) uses gate/up when
  both students' mean ``|cos(g_i, u_i)|`` is below ``coupling_threshold`` (0.5; independent
  random directions give ~``sqrt(2 / (pi d))``), else split. The choice depends on each
  model separately, not on their relation, so it does not bias the null.
- Gaussian inputs are fed in each model's own residual basis, so this test is not invariant to
  a residual rotation between the models (MATCH on real tokens is); it is robust to an
  adversary who replaces or retrains blocks, or uses non-GLU blocks (GPT-2 style).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxind import progress
from jaxind.errors import JaxindError
from jaxind.models import model as model_lib
from jaxind.models.config import Activation, ModelConfig
from jaxind.models.layer_selection import Layers, resolve_pairs
from jaxind.stats import convention
from jaxind.stats import match as match_lib
from jaxind.stats.results import LayerResult, TestResult, fisher_result, timed
from jaxind.types import LayerPair, Params

__all__ = [
    "BlockFn",
    "DistillSettings",
    "ModelBlocks",
    "NOTE",
    "Views",
    "canonicalize_student",
    "distill_glu",
    "gate_up_coupling",
    "generalized_from_blocks",
    "generalized_test",
    "init_student",
    "model_block_fn",
]

BlockFn = Callable[[Any, jax.Array], jax.Array]  # (block params, x (n, d)) -> (n, d)
Views = Literal["auto", "gate_up", "split"]
NOTE = "approximate: MATCH on distilled students (Spearman's t approximation), calibrated in simulation"


def init_student(key: jax.Array, d: int, h: int) -> Params:
    """Fresh GLU ``{"gate": (d, h), "up": (d, h), "down": (h, d)}``: gate/up ~ N(0, 1/d) (pre-
    activations of order one on unit-variance inputs, so the gate starts nonlinear), down ~ N(0, 1/h)."""
    kg, ku, kd = jax.random.split(key, 3)
    return {
        "gate": jax.random.normal(kg, (d, h)) / np.sqrt(d),
        "up": jax.random.normal(ku, (d, h)) / np.sqrt(d),
        "down": jax.random.normal(kd, (h, d)) / np.sqrt(h),
    }


def canonicalize_student(student: Params) -> Params:
    """Removes the GLU's per-unit symmetry ``(u_i, d_i) -> (c u_i, d_i / c)``, ``c != 0``, which leaves
    the function unchanged but moves the up activations: scales each unit so that ``||d_i|| = 1``
    and flips its sign so that ``<u_i, g_i> >= 0`` (a basis-free choice: it is what fixes the sign
    of the unit's mean output ``E[act(g.x) u.x]`` on centred Gaussian inputs)."""
    norm = jnp.linalg.norm(student["down"], axis=1)  # (h,)
    sign = jnp.where(jnp.sum(student["up"] * student["gate"], axis=0) < 0, -1.0, 1.0)
    c = sign * jnp.maximum(norm, 1e-30)
    return {"gate": student["gate"], "up": student["up"] * c[None, :], "down": student["down"] / c[:, None]}


@functools.partial(jax.jit, static_argnames=("block_fn", "steps", "batch_size", "learning_rate", "act", "d", "h"))
def _train(
    block_fn: BlockFn,
    block_params: Any,
    key: jax.Array,
    input_scale: jax.Array,
    *,
    d: int,
    h: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    act: Activation,
):
    """Whole distillation as one jitted ``lax.scan`` over Adam steps (fixed shapes)."""
    k_init, k_scale, k_data, k_eval = jax.random.split(key, 4)
    x0 = input_scale * jax.random.normal(k_scale, (4096, d))
    y_scale = jnp.sqrt(jnp.mean(block_fn(block_params, x0) ** 2)) + 1e-30
    student = init_student(k_init, d, h)
    sched = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02)
    opt = optax.adam(sched)

    def loss_fn(s, x):
        y = jax.lax.stop_gradient(block_fn(block_params, x)) / y_scale
        pred, _, _ = model_lib.mlp_apply(s, x, act)
        return jnp.mean((pred - y) ** 2)

    def step(carry, k):
        s, opt_state = carry
        x = input_scale * jax.random.normal(k, (batch_size, d))
        loss, grads = jax.value_and_grad(loss_fn)(s, x)
        updates, opt_state = opt.update(grads, opt_state, s)
        return (optax.apply_updates(s, updates), opt_state), loss

    (student, _), losses = jax.lax.scan(step, (student, opt.init(student)), jax.random.split(k_data, steps))
    xe = input_scale * jax.random.normal(k_eval, (8192, d))
    ye = block_fn(block_params, xe) / y_scale
    pe, _, _ = model_lib.mlp_apply(student, xe, act)
    r2 = 1.0 - jnp.sum((pe - ye) ** 2) / jnp.sum((ye - ye.mean(0)) ** 2)
    return student, r2, losses, y_scale


def distill_glu(
    block_fn: BlockFn,
    block_params: Any,
    d: int,
    h: int,
    *,
    key: jax.Array,
    steps: int = 4000,
    batch_size: int = 512,
    learning_rate: float = 1e-2,
    input_scale: float = 1.0,
    act: Activation = "silu",
) -> tuple[Params, dict[str, float]]:
    """Trains a width-``h`` GLU to imitate ``block_fn(block_params, x)`` on ``x ~ N(0, input_scale^2 I_d)``.

    Args:
      block_fn: hashable (module-level or cached) function ``(block_params, x (n, d)) -> (n, d)``;
        static under jit, so pass the same object for every block of a family.
      block_params: the block's parameters (any pytree).
      d, h: input width and student hidden width.
      key: PRNG key (student init, training inputs, evaluation inputs).
      steps, batch_size, learning_rate: Adam with cosine decay.

    Returns:
      ``(student, info)``: student ``{"gate": (d, h), "up": (d, h), "down": (h, d)}`` (imitating
      the block divided by ``info["output_scale"]``) and ``info`` with ``r2`` (fit on 8192 fresh
      inputs), ``final_loss``, ``output_scale``.
    """
    student, r2, losses, y_scale = _train(
        block_fn,
        block_params,
        key,
        jnp.float32(input_scale),
        d=d,
        h=h,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        act=act,
    )
    return student, {"r2": float(r2), "final_loss": float(losses[-20:].mean()), "output_scale": float(y_scale)}


@functools.cache
def model_block_fn(cfg: ModelConfig) -> BlockFn:
    """The MLP block of a model family as a ``(layer params, x) -> out`` function (cached per cfg)."""

    def fn(layer: Params, x: jax.Array) -> jax.Array:
        return model_lib.mlp_output(layer, cfg, x)

    return fn


class ModelBlocks(Sequence[tuple[BlockFn, Any]]):
    """A model's MLP blocks as ``(block_fn, layer params)`` pairs, layer ``i`` sliced out of the stacked
    tree only when asked for (so distilling one block at a time holds one layer, not a copy of all)."""

    def __init__(self, fn: BlockFn, params: Params):
        self.fn, self.params = fn, params

    def __len__(self) -> int:
        return int(next(iter(self.params["layers"].values())).shape[0])

    @overload
    def __getitem__(self, index: int) -> tuple[BlockFn, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[BlockFn, Any]]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return self.fn, model_lib.layer_slice(self.params, index)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """How each block is distilled (:func:`distill_glu`): Adam steps, batch, learning rate, input scale."""

    steps: int = 4000
    batch_size: int = 512
    learning_rate: float = 1e-2
    input_scale: float = 1.0


class _Students:
    """Distils each block at most once: block ``i`` of model ``which`` ("a"/"b") with width ``h``
    and key ``fold_in(key_which, i)``."""

    def __init__(
        self,
        blocks: dict[str, Sequence[tuple[BlockFn, Any]]],
        keys: dict[str, jax.Array],
        widths: dict[str, int],
        d: int,
        settings: DistillSettings,
    ):
        self.blocks, self.keys, self.widths, self.d, self.settings = blocks, keys, widths, d, settings
        self.cache: dict[tuple[str, int], tuple[Params, dict[str, float]]] = {}

    def get(self, which: str, index: int) -> tuple[Params, dict[str, float]]:
        if (which, index) not in self.cache:
            fn, params = self.blocks[which][index]
            s = self.settings
            self.cache[(which, index)] = distill_glu(
                fn,
                params,
                self.d,
                self.widths[which],
                key=jax.random.fold_in(self.keys[which], index),
                steps=s.steps,
                batch_size=s.batch_size,
                learning_rate=s.learning_rate,
                input_scale=s.input_scale,
            )
        return self.cache[(which, index)]


def _block_pair(
    sa: Params,
    sb: Params,
    x: jax.Array,
    x1: jax.Array,
    x2: jax.Array,
    views: Views,
    coupling_threshold: float,
    key: jax.Array,
) -> tuple[match_lib.UnitMatch, dict[str, Any]]:
    """MATCH on two canonicalised students over Gaussian inputs ``x`` (or split views ``x1``/``x2``);
    returns the match and the record's extras (couplings, the views used)."""
    coupling_a, coupling_b = gate_up_coupling(sa), gate_up_coupling(sb)
    view = views
    if view == "auto":
        view = "gate_up" if max(coupling_a, coupling_b) < coupling_threshold else "split"
    if view == "gate_up":
        acts = (x @ sa["gate"], x @ sa["up"], x @ sb["gate"], x @ sb["up"])
    else:
        acts = (x1 @ sa["gate"], x2 @ sa["up"], x1 @ sb["gate"], x2 @ sb["up"])
    return match_lib.match_from_activations(*acts, key=key), {
        "coupling_a": coupling_a,
        "coupling_b": coupling_b,
        "views": view,
    }


@timed
def generalized_from_blocks(
    blocks_a: Sequence[tuple[BlockFn, Any]],
    blocks_b: Sequence[tuple[BlockFn, Any]],
    d: int,
    *,
    key: jax.Array,
    h: int | Sequence[int],
    layer_pairs: Sequence[LayerPair] | None = None,
    steps: int = 4000,
    batch_size: int = 512,
    learning_rate: float = 1e-2,
    num_inputs: int = 4096,
    input_scale: float = 1.0,
    views: Views = "auto",
    coupling_threshold: float = 0.5,
) -> TestResult:
    """Generalized test on explicit blocks (any functions ``x (n, d) -> (n, d)``).

    Args:
      blocks_a, blocks_b: per layer ``(block_fn, block_params)``.
      d: input/output width (the same for both models: Gaussian inputs are shared).
      key: PRNG key; students of A use ``fold_in(key, 0)``-derived keys, of B ``fold_in(key, 1)``.
      h: student width, an int for both models or ``(h_A, h_B)``.
      layer_pairs: ``(i, j)`` block pairs; default ``(i, i)``.
      num_inputs: Gaussian inputs on which the students' activations are matched.
      views: "gate_up" (paper), "split" (gate on V1 vs up on V2) or "auto" (see module doc).
      coupling_threshold: gate/up coupling above which "auto" switches to "split".

    Returns:
      The Fisher-combined :class:`TestResult`; each layer record has ``r2_a``, ``r2_b``,
      ``coupling_a``, ``coupling_b`` and ``views``; ``extra``: ``student_width`` ``[h_A, h_B]``,
      ``steps``, ``num_inputs``.
    """
    h_a, h_b = (h, h) if isinstance(h, int) else tuple(int(v) for v in h)
    pairs = list(layer_pairs) if layer_pairs is not None else [(i, i) for i in range(min(len(blocks_a), len(blocks_b)))]
    if not pairs:
        raise JaxindError("generalized test needs at least one block pair")
    if views not in ("auto", "gate_up", "split"):
        raise JaxindError(f"views must be 'auto', 'gate_up' or 'split', got {views!r}")
    k_a, k_b, k_x, k_lap = jax.random.split(key, 4)
    students = _Students(
        {"a": blocks_a, "b": blocks_b},
        {"a": k_a, "b": k_b},
        {"a": h_a, "b": h_b},
        d,
        DistillSettings(steps, batch_size, learning_rate, input_scale),
    )
    k_x, k_split = jax.random.split(k_x)
    x = input_scale * jax.random.normal(k_x, (num_inputs, d))
    q = np.asarray(jax.random.orthogonal(k_split, d))
    v1, v2 = q[:, : d // 2], q[:, d // 2 :]
    x1, x2 = x @ (v1 @ v1.T), x @ (v2 @ v2.T)  # Gaussian inputs on V1 / on V2
    records: list[LayerResult] = []
    lap_keys = jax.random.split(k_lap, len(pairs))
    for p, (i, j) in enumerate(progress.bar(pairs, total=len(pairs), desc="generalized")):
        (sa, info_a), (sb, info_b) = students.get("a", i), students.get("b", j)
        unit_match, extra = _block_pair(
            canonicalize_student(sa), canonicalize_student(sb), x, x1, x2, views, coupling_threshold, lap_keys[p]
        )
        records.append(unit_match.record(i, j, r2_a=info_a["r2"], r2_b=info_b["r2"], **extra))
    return fisher_result(
        "generalized", records, exact=False, note=NOTE, student_width=[h_a, h_b], steps=steps, num_inputs=num_inputs
    )


def gate_up_coupling(student: Params) -> float:
    """Mean over units of ``|cos(g_i, u_i)|``: how far a unit's gate and up views are tied
    (1 for students of plain MLPs; about ``sqrt(2 / (pi d))`` for independent directions)."""
    g, u = student["gate"], student["up"]
    cos = jnp.sum(g * u, axis=0) / (jnp.linalg.norm(g, axis=0) * jnp.linalg.norm(u, axis=0) + 1e-30)
    return float(jnp.mean(jnp.abs(cos)))


@timed
def generalized_test(
    params_a: Params,
    cfg_a: ModelConfig,
    params_b: Params,
    cfg_b: ModelConfig,
    *,
    key: jax.Array,
    layers: Layers = None,
    width: int | None = None,
    steps: int = 4000,
    batch_size: int = 512,
    learning_rate: float = 1e-2,
    num_inputs: int = 4096,
    input_scale: float = 1.0,
    views: Views = "auto",
    coupling_threshold: float = 0.5,
    layer_pairs: Layers = None,
) -> TestResult:
    """Generalized robust test between two models' MLP blocks (any family with ``mlp_output``).

    Args:
      layers: a layer selection (:mod:`jaxind.models.layer_selection`); default ``(i, i)``, ``i < min(L_A, L_B)``
        (``layer_pairs``: its old name, a DeprecationWarning; removed in the next release).
      width: student width for both models; None uses each model's own ``d_ff`` (a mixture of experts: its
        shared expert's width plus ``experts_per_token * d_expert``).
      Others: see :func:`generalized_from_blocks`.

    Returns:
      See :func:`generalized_from_blocks`.
    """
    layers = convention.renamed("generalized.generalized_test", "layer_pairs", "layers", layer_pairs, layers)
    key = convention.check_key(key, "generalized.generalized_test")
    if cfg_a.d_model != cfg_b.d_model:
        raise JaxindError(f"generalized test needs equal residual widths (got {cfg_a.d_model} and {cfg_b.d_model})")
    pairs = resolve_pairs(layers, cfg_a, cfg_b, "the generalized test")
    blocks_a = ModelBlocks(model_block_fn(cfg_a), params_a)
    blocks_b = ModelBlocks(model_block_fn(cfg_b), params_b)
    # default: each model's MLP width (for a mixture of experts the hidden units active per token, shared expert too)
    h = (
        (width, width)
        if width is not None
        else tuple(c.d_ff + c.experts_per_token * c.d_expert for c in (cfg_a, cfg_b))
    )
    return generalized_from_blocks(
        blocks_a,
        blocks_b,
        cfg_a.d_model,
        key=key,
        h=h,
        layer_pairs=pairs,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        num_inputs=num_inputs,
        input_scale=input_scale,
        views=views,
        coupling_threshold=coupling_threshold,
    )
