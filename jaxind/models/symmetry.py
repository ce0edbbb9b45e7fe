"""The symmetry group of a decoder-only transformer, as pure functions on param pytrees (docs/DESIGN.md §1).

Everything is driven by one declarative **permutation spec** (git-re-basin style): for every
leaf of the param tree (layout in :mod:`jaxind.models.model`: the decoder layers stacked), which axis
carries which permutation. The spec is a view of the parameter table (:mod:`jaxind.models.paramspec`), where each leaf
declares its logical axes once: the group names the table's ``"embed"`` axis ``"resid"`` and its ``"experts"``
axis ``"expert"``; ``"mlp"``, ``"expert_mlp"`` and ``"layers"`` keep their names.

- ``"resid"``: the residual-stream (``d``) axis. One permutation ``s`` of ``d`` acts on every
  residual axis at once: embedding and LM-head columns/rows, the input axis of q/k/v/gate/up,
  the output axis of o/down, ``o_bias`` and every RMSNorm weight.
- ``"layers"``: the stacked layer axis of a layer leaf. The group does not move it; it says which
  layer each slice belongs to.
- ``"mlp"``: the MLP hidden (``h``) axis. Layer ``l`` has its own permutation ``t_l``, acting on
  the columns of ``gate[l]``/``up[l]``, the rows of ``down[l]`` (and GPT-2's ``up_bias[l]``): on a
  stacked leaf, the slice at position ``l`` of its ``"layers"`` axis takes ``t_l``.

Mixtures of experts (:mod:`jaxind.models.moe`, docs/DESIGN.md §5.13) add two axes:

- ``"expert"``: the expert axis. Layer ``l`` has its own permutation ``pi_l`` of its ``E`` experts,
  acting on the columns of ``router[l]`` and on the expert axis of every expert leaf of layer ``l``.
- ``"expert_mlp"``: an expert's hidden (``he``) axis. Each expert *position* ``e`` of layer ``l`` has
  its own permutation ``tau_{l,e}`` (columns of ``expert_gate[l, e]``/``expert_up[l, e]``, rows of
  ``expert_down[l, e]``), applied after the experts were reordered: ``w'[l, e] = take(w[l, pi_l[e]],
  tau_{l,e})``. A shared expert (Qwen2-MoE) is the dense MLP and keeps ``"mlp"``.

So the spec of ``gate`` reads ``("layers", "resid", "mlp")``: one per-layer MLP permutation,
stated once for the whole stack. Norms on the attention/MLP outputs (``post_attn_norm``,
``post_mlp_norm``: Gemma 2/3, OLMo 2) act on the residual stream and carry ``"resid"``; q/k norm
weights act on ``head_dim`` (Qwen3, Gemma 3) or on the q/k projection (OLMo 2), axes the group does
not move. GPT-2's extra leaves (``pos_embed``, LayerNorm biases,
``down_bias``) carry ``"resid"``; LayerNorm is permutation-equivariant but not
rotation-equivariant, so rotations refuse it.

A group element is a :class:`Perm` ``(resid (d,), mlp (L, h))`` of int32 index arrays (plus
``experts (L, E)`` and ``expert_mlp (L, E, he)`` for a mixture of experts, else None).
Applying it *gathers*: every axis tagged ``"resid"`` becomes ``take(w, s, axis)``, every axis
tagged ``"mlp"`` becomes ``take(w[l], t_l, axis)`` for each layer ``l``. Under this convention

    apply(apply(w, p1), p2) == apply(w, compose(p2, p1)),   compose(p2, p1) = (s1[s2], t1[t2])

and for experts ``pi = pi1[pi2]``, ``tau[l, e] = tau1[l, pi2[l, e]][tau2[l, e]]``.

and ``invert`` is an argsort. Perms are pytrees, so ``draw_permutations``, ``compose``,
``invert`` and ``apply_permutation`` all ``vmap`` over a leading batch axis.

Residual **rotations** (the adversary's larger group) use the same axis names: every
``"resid"`` axis is contracted with an orthogonal ``R``, ``w'[.., i, ..] = sum_k R[k, i]
w[.., k, ..]`` (``R`` = the permutation matrix of ``s`` reproduces the gather). RMSNorm is
equivariant under orthogonal maps only with a neutral scale, so :func:`rotate_residual`
first folds every norm weight into the linear maps that read the normalised stream
(:func:`fold_norms`). Rotations are refused for LayerNorm models (GPT-2, OLMo) and for models with
norms on the attention/MLP outputs (Gemma 2/3, OLMo 2): neither commutes with a rotation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxind.errors import JaxindError
from jaxind.models import paramspec
from jaxind.models.config import ModelConfig
from jaxind.types import Params

__all__ = [
    "AxisName",
    "LAYER_SPEC",
    "NORM_READERS",
    "Path",
    "Perm",
    "TOP_SPEC",
    "apply_permutation",
    "check_tree",
    "compose",
    "draw_permutations",
    "fold_norms",
    "get_leaf",
    "identity",
    "invert",
    "layer_leaf_names",
    "permutation_matrix",
    "permutation_spec",
    "random_orthogonal",
    "rotate_residual",
]

# Axis name of one array axis: "resid", "mlp", "layers" (the stacked layer axis) or None (untouched).
AxisName = str | None

# The permutation spec of the stacked layer leaves (layer axis first) and of the top-level leaves, and the linear
# maps that read each norm's output (for folding): views of the parameter table (jaxind.models.paramspec),
# which declares
# each leaf's axes once.
LAYER_SPEC: dict[str, tuple[AxisName, ...]] = {
    leaf.name: paramspec.group_axes(leaf) for leaf in paramspec.TABLE if leaf.stacked
}
TOP_SPEC: dict[str, tuple[AxisName, ...]] = {
    leaf.name: paramspec.group_axes(leaf) for leaf in paramspec.TABLE if not leaf.stacked
}
NORM_READERS: dict[str, tuple[str, ...]] = paramspec.norm_readers()

Path = tuple[str, ...]  # ("embed",) or ("layers", "q")


class Perm(NamedTuple):
    """One element of the permutation group (or a batch of them, with leading axes).

    Attributes:
      resid: ``(..., d)`` int32, the residual permutation ``s``.
      mlp: ``(..., L, h)`` int32, one hidden-unit permutation ``t_l`` per layer (``h = 0``: no dense MLP).
      experts: ``(..., L, E)`` int32, one expert permutation ``pi_l`` per layer; None for a dense model (None
        leaves a mixture of experts' experts and their units in place).
      expert_mlp: ``(..., L, E, he)`` int32, one hidden-unit permutation per expert position; None likewise.
    """

    resid: jax.Array
    mlp: jax.Array
    experts: jax.Array | None = None
    expert_mlp: jax.Array | None = None


def layer_leaf_names(cfg: ModelConfig) -> list[str]:
    """The names of the stacked layer leaves a model with ``cfg`` has, in the order of :data:`LAYER_SPEC`."""
    return [leaf.name for leaf in paramspec.layer_leaves(cfg)]


def permutation_spec(cfg: ModelConfig) -> dict[Path, tuple[AxisName, ...]]:
    """The spec for ``cfg``: ``{leaf path: axis names}`` for every leaf of the tree.

    Paths are ``(name,)`` for top-level leaves and ``("layers", name)`` for the stacked layer leaves
    (whose first axis is ``"layers"``).
    """
    return {
        (("layers", leaf.name) if leaf.stacked else (leaf.name,)): paramspec.group_axes(leaf)
        for leaf in paramspec.leaves(cfg)
    }


def get_leaf(params: Params, path: Path) -> jax.Array:
    """The leaf of ``params`` at ``path``."""
    node: Any = params
    for part in path:
        node = node[part]
    return node


def check_tree(params: Params, cfg: ModelConfig, spec: dict[Path, tuple[AxisName, ...]] | None = None) -> None:
    """Refuses a param tree whose leaves differ from the permutation spec for ``cfg`` (a silently
    unpermuted leaf would break the group action; a missing one would break any statistic).

    Raises:
      JaxindError: unknown top-level entries, layers that are not stacked ``n_layers`` deep, or leaves
        extra to or missing from the spec.
    """
    spec = permutation_spec(cfg) if spec is None else spec
    top = {leaf.name for leaf in paramspec.table_or_default() if not leaf.stacked}
    unknown_top = set(params) - top - {"layers"}
    if unknown_top:
        raise JaxindError(
            f"param tree has top-level entries the permutation spec does not cover: {sorted(unknown_top)}"
        )
    layers = params.get("layers")
    if not isinstance(layers, dict):
        raise JaxindError(
            "param tree has no stacked layers (params['layers'] must be a dict of arrays with a leading layer axis); "
            "per-layer lists are the layout of jaxind < 0.2: rebuild the tree with "
            "jaxind.models.model.init_params's layout"
        )
    found: set[Path] = {(name,) for name in params if name != "layers"} | {("layers", name) for name in layers}
    if found != set(spec):
        extra, missing = sorted(map(str, found - set(spec))), sorted(map(str, set(spec) - found))
        raise JaxindError(
            f"param tree does not match the permutation spec for this config: extra {extra}, missing {missing}"
        )
    depths = {name: leaf.shape[0] if leaf.ndim else None for name, leaf in layers.items()}
    wrong = {name: depth for name, depth in depths.items() if depth != cfg.n_layers}
    if wrong:
        raise JaxindError(f"param tree stacks {wrong} layers (leading axis), config says {cfg.n_layers}")


def _rebuild(params: Params, new_leaves: dict[Path, jax.Array]) -> Params:
    """A copy of ``params`` with the leaves at the given paths replaced."""
    out = dict(params)
    layers = dict(params["layers"])
    for path, leaf in new_leaves.items():
        if path[0] == "layers":
            layers[path[1]] = leaf
        else:
            out[path[0]] = leaf
    out["layers"] = layers
    return out


def _permute(leaf: jax.Array, axes: tuple[AxisName, ...], perm: Perm) -> jax.Array:
    """Gathers every tagged axis of one leaf (``"mlp"``: each layer's slice with its own ``t_l``)."""
    for axis, name in enumerate(axes):
        if name == "resid":
            leaf = jnp.take(leaf, perm.resid, axis=axis)
        elif name == "mlp":
            if axes[0] != "layers":
                raise JaxindError(f"an MLP axis needs the layer axis first, got {axes}")
            leaf = jax.vmap(lambda w, t, axis=axis: jnp.take(w, t, axis=axis - 1))(leaf, perm.mlp)
        elif name in ("expert", "expert_mlp") and (perm.experts is None or perm.expert_mlp is None):
            continue  # a Perm without expert components leaves the experts where they are
        elif name == "expert":  # per layer: reorder the experts
            leaf = jax.vmap(lambda w, p, axis=axis: jnp.take(w, p, axis=axis - 1))(leaf, perm.experts)
        elif name == "expert_mlp":  # per layer, per expert position (after the reordering): its units
            if axes[:2] != ("layers", "expert"):
                raise JaxindError(f"an expert's hidden axis needs the layer and expert axes first, got {axes}")
            per_expert = jax.vmap(lambda w, t, axis=axis: jnp.take(w, t, axis=axis - 2))
            leaf = jax.vmap(per_expert)(leaf, perm.expert_mlp)
    return leaf


def identity(cfg: ModelConfig) -> Perm:
    """The identity element: ``resid = arange(d)``, ``mlp = arange(h)`` for every layer (and every expert)."""
    experts = expert_mlp = None
    if cfg.moe:
        experts = jnp.broadcast_to(jnp.arange(cfg.n_experts, dtype=jnp.int32), (cfg.n_layers, cfg.n_experts))
        expert_mlp = jnp.broadcast_to(
            jnp.arange(cfg.d_expert, dtype=jnp.int32), (cfg.n_layers, cfg.n_experts, cfg.d_expert)
        )
    return Perm(
        jnp.arange(cfg.d_model, dtype=jnp.int32),
        jnp.broadcast_to(jnp.arange(cfg.d_ff, dtype=jnp.int32), (cfg.n_layers, cfg.d_ff)),
        experts,
        expert_mlp,
    )


def draw_permutations(key: jax.Array, cfg: ModelConfig, layers: jax.Array | None = None) -> Perm:
    """A uniformly random group element (independent uniform ``s`` and ``t_0..t_{L-1}``; for a mixture of
    experts also independent uniform ``pi_l`` and ``tau_{l,e}``).

    Args:
      key: a PRNG key. Deterministic in ``key``; ``vmap`` over keys for a batch.
      layers: draw ``t_l`` only for these layer indices (int array, may be traced; indices past the last
        layer repeat it): the rows equal those of the whole draw, so a device that owns some layers draws
        exactly their part of the element.

    Returns:
      Perm with ``resid (d,)`` and ``mlp (L, h)`` int32 (and ``experts (L, E)``, ``expert_mlp (L, E, he)``);
      ``len(layers)`` rows instead of ``L`` with ``layers``.
    """
    k_resid, k_mlp = jax.random.split(key)
    resid = jax.random.permutation(k_resid, cfg.d_model).astype(jnp.int32)
    mlp_keys = jax.random.split(k_mlp, cfg.n_layers)
    rows = slice(None) if layers is None else jnp.clip(layers, 0, cfg.n_layers - 1)
    mlp_keys = mlp_keys[rows]
    mlp = jax.vmap(lambda k: jax.random.permutation(k, cfg.d_ff))(mlp_keys).astype(jnp.int32)
    if not cfg.moe:
        return Perm(resid, mlp)
    # Keys folded from `key` (the dense draws above stay what they were).
    e_keys = jax.random.split(jax.random.fold_in(key, 1), cfg.n_layers)[rows]
    experts = jax.vmap(lambda k: jax.random.permutation(k, cfg.n_experts))(e_keys).astype(jnp.int32)
    u_keys = jax.random.split(jax.random.fold_in(key, 2), (cfg.n_layers, cfg.n_experts))[rows]
    permute_units = jax.vmap(jax.vmap(lambda k: jax.random.permutation(k, cfg.d_expert)))
    return Perm(resid, mlp, experts, permute_units(u_keys).astype(jnp.int32))


def compose(p2: Perm, p1: Perm) -> Perm:
    """The element "first ``p1``, then ``p2``":
    ``apply_permutation(apply_permutation(w, p1), p2) == apply_permutation(w, compose(p2, p1))``.

    Works on batches (leading axes broadcast per component)."""
    experts = expert_mlp = None
    if p1.experts is not None and p2.experts is not None and p1.expert_mlp is not None and p2.expert_mlp is not None:
        experts = jnp.take_along_axis(p1.experts, p2.experts, axis=-1)
        # position e of the result holds p1's expert at position pi2[e], then tau2[e] on top of its tau1
        moved = jnp.take_along_axis(p1.expert_mlp, p2.experts[..., None], axis=-2)
        expert_mlp = jnp.take_along_axis(moved, p2.expert_mlp, axis=-1)
    return Perm(
        jnp.take_along_axis(p1.resid, p2.resid, axis=-1),
        jnp.take_along_axis(p1.mlp, p2.mlp, axis=-1),
        experts,
        expert_mlp,
    )


def invert(p: Perm) -> Perm:
    """The inverse element: ``compose(invert(p), p) == compose(p, invert(p)) == identity``."""
    experts = expert_mlp = None
    if p.experts is not None and p.expert_mlp is not None:
        experts = jnp.argsort(p.experts, axis=-1).astype(jnp.int32)
        # position e of the inverse undoes the units of the expert p moved from e: tau'[e] = argsort(tau[pi'[e]])
        units = jnp.take_along_axis(p.expert_mlp, experts[..., None], axis=-2)
        expert_mlp = jnp.argsort(units, axis=-1).astype(jnp.int32)
    return Perm(
        jnp.argsort(p.resid, axis=-1).astype(jnp.int32),
        jnp.argsort(p.mlp, axis=-1).astype(jnp.int32),
        experts,
        expert_mlp,
    )


def apply_permutation(params: Params, cfg: ModelConfig, perm: Perm) -> Params:
    """Applies a group element to a param tree; the model's function is unchanged.

    Args:
      params: param tree for ``cfg`` (see :mod:`jaxind.models.model`).
      perm: a single (unbatched) :class:`Perm`; ``vmap`` over perms for batches.

    Returns:
      A new param tree of the same structure; each axis tagged by the spec is gathered with
      its permutation.

    Raises:
      JaxindError: the tree's leaves do not match the spec for ``cfg``.
    """
    spec = permutation_spec(cfg)
    check_tree(params, cfg, spec)
    return _rebuild(params, {path: _permute(get_leaf(params, path), axes, perm) for path, axes in spec.items()})


def random_orthogonal(key: jax.Array, d: int, dtype=jnp.float32) -> jax.Array:
    """A Haar-random orthogonal matrix ``(d, d)`` (QR of a Gaussian matrix, signs fixed)."""
    g = jax.random.normal(key, (d, d), dtype=jnp.float32)
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q.astype(dtype)


def _require_rms(cfg: ModelConfig) -> None:
    """Refuses the models a residual rotation is no symmetry of (permutations are)."""
    if getattr(cfg, "norm_kind", "rms") != "rms":
        raise JaxindError(
            f"residual rotations need RMSNorm models; {cfg.family} uses LayerNorm, whose mean subtraction "
            "does not commute with a rotation (permutations are supported)"
        )
    if cfg.norm_position != "pre":
        raise JaxindError(
            f"residual rotations need pre-norm models; {cfg.family} normalises the attention and MLP outputs it "
            "adds to the residual stream, and those norms' weights scale the stream elementwise, which does not "
            "commute with a rotation (permutations are supported)"
        )


def fold_norms(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """Folds every RMSNorm scale into the linear maps that read the normalised stream.

    ``attn_norm`` goes into the input rows of q/k/v, ``mlp_norm`` into gate/up (and a mixture of
    experts' router, expert gate/up and shared-expert gate), layer by layer along each leaf's
    residual axis; ``final_norm`` into ``lm_head`` (a tied head is untied first: ``lm_head =
    embed.T``). Norm weights are then set to their neutral value (1, or 0 where ``cfg.norm_offset
    == 1``), so the norm becomes a plain ``x / rms(x)``. The function is unchanged (up to rounding).

    Returns:
      ``(params, cfg)``; ``cfg`` has ``tie_embeddings=False`` if the head was untied.
    """
    _require_rms(cfg)
    off = cfg.norm_offset
    neutral = 0.0 if off else 1.0
    layers = dict(params["layers"])
    layer_spec = {leaf.name: paramspec.group_axes(leaf) for leaf in paramspec.layer_leaves(cfg)}
    for norm, readers in paramspec.norm_readers().items():
        scale = off + layers[norm].astype(jnp.float32)  # (L, d)
        for name in (r for r in readers if r in layers):
            leaf, resid = layers[name], layer_spec[name].index("resid")
            shape = [scale.shape[0]] + [1] * (leaf.ndim - 1)
            shape[resid] = scale.shape[1]  # the norm scales the leaf's residual (input) axis, layer by layer
            layers[name] = (scale.reshape(shape) * leaf.astype(jnp.float32)).astype(leaf.dtype)
        layers[norm] = jnp.full_like(layers[norm], neutral)
    out = dict(params)
    out["layers"] = layers
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    scale = (off + params["final_norm"].astype(jnp.float32))[:, None]
    out["lm_head"] = (scale * head.astype(jnp.float32)).astype(head.dtype)
    out["final_norm"] = jnp.full_like(params["final_norm"], neutral)
    return out, (cfg.replace(tie_embeddings=False) if cfg.tie_embeddings else cfg)


def rotate_residual(params: Params, cfg: ModelConfig, rotation: jax.Array) -> tuple[Params, ModelConfig]:
    """Rotates the residual stream by an orthogonal ``R (d, d)``: ``x -> x R`` everywhere.

    Norms are folded first (:func:`fold_norms`); then every axis tagged ``"resid"`` in the
    spec (embed and o/down/o_bias outputs: ``W R``; q/k/v/gate/up/lm_head inputs:
    ``R^T W``) is contracted with ``R``. RMSNorm of ``x R`` equals RMSNorm of ``x`` times
    ``R`` once its scale is neutral, so logits are unchanged (up to rounding). Gemma's
    embedding scale is a scalar and commutes with ``R``.

    Returns:
      ``(params, cfg)``: the rotated tree and its config (``tie_embeddings=False`` when the
      model was tied: a rotated tied model needs its own head).
    """
    _require_rms(cfg)
    d = cfg.d_model
    if rotation.shape != (d, d):
        raise JaxindError(f"rotation must have shape ({d}, {d}), got {rotation.shape}")
    folded, new_cfg = fold_norms(params, cfg)
    spec = permutation_spec(new_cfg)
    check_tree(folded, new_cfg, spec)
    rot = rotation.astype(jnp.float32)
    new = {}
    for path, axes in spec.items():
        if path[-1] in ("attn_norm", "mlp_norm", "final_norm"):
            continue  # neutral after folding; invariant
        leaf = get_leaf(folded, path)
        out = leaf.astype(jnp.float32)
        for axis, name in enumerate(axes):
            if name == "resid":
                # out'[.., i, ..] = sum_k R[k, i] out[.., k, ..]
                out = jnp.moveaxis(
                    jnp.tensordot(out, rot, axes=([axis], [0]), precision=jax.lax.Precision.HIGHEST), -1, axis
                )
        new[path] = out.astype(leaf.dtype)
    return _rebuild(folded, new), new_cfg


def permutation_matrix(p: jax.Array) -> jax.Array:
    """The ``(n, n)`` matrix ``R`` with ``R[p[i], i] = 1``, for which contracting a residual
    axis with ``R`` (as :func:`rotate_residual` does) equals gathering it with ``p``."""
    n = p.shape[-1]
    return jnp.zeros((n, n), jnp.float32).at[p, jnp.arange(n)].set(1.0)
