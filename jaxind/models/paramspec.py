"""The parameter table: one declaration per leaf of the param tree, everything else derived (docs/DESIGN.md §2).

Each :class:`Leaf` says, once, what a parameter is: its shape as a function of the config, whether a config has it,
its logical axes, how it is initialised and which norm's output it reads. From the table come

* the Flax module's parameters and their partitioning metadata (:class:`jaxind.models.model.Decoder`), and
  :func:`jaxind.models.model.init_params`;
* the shapes (:func:`shapes`; :func:`jaxind.models.model.param_shapes_flat`, which the converters check
  tensors against);
* the parameter count (:func:`num_params`, :meth:`jaxind.models.config.ModelConfig.num_params`);
* the sharding axes (:func:`logical_axes`; :data:`jaxind.parallel.sharding.PARAM_AXES`, mapped to mesh axes by
  :data:`jaxind.parallel.sharding.RULES`);
* the permutation spec of the symmetry group (:func:`group_axes`; :data:`jaxind.models.symmetry.LAYER_SPEC`,
  ``TOP_SPEC``, ``NORM_READERS``, :func:`jaxind.models.symmetry.permutation_spec`).

One axis vocabulary serves sharding and symmetry (git-re-basin's "one spec", with MaxText's axes at the definition):

* ``"vocab"``: the vocabulary; ``"heads"``: a q/k/v projection's output (heads x head_dim); ``None``: an axis nothing
  acts on or shards (q/k norms, positions);
* ``"embed"``: the residual stream (``d``). The symmetry group permutes every ``"embed"`` axis with one permutation
  (the group's ``resid`` component) and rotations contract it;
* ``"mlp"``: a dense MLP's hidden units (``h``), permuted per layer;
* ``"experts"``: a mixture of experts' expert axis, permuted per layer; ``"expert_mlp"``: one expert's hidden units,
  permuted per layer and expert;
* ``"layers"``: the stacked layer axis every layer leaf carries first (the table declares one layer's axes).

Order matters and is part of the contract: layer leaves are drawn from their layer's key in table order (the
random draws of every release), and the permutation spec lists leaves in table order (PERMTEST adds the leaves'
Gram matrices in that order).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

__all__ = [
    "Axis",
    "GROUP_AXES",
    "Init",
    "Leaf",
    "Shape",
    "TABLE",
    "check_table",
    "group_axes",
    "init",
    "layer_leaves",
    "leaves",
    "logical_axes",
    "norm_readers",
    "num_params",
    "path",
    "shapes",
    "table_or_default",
    "top_leaves",
]

if TYPE_CHECKING:  # the config's parameter count reads this table
    from jaxind.models.config import ModelConfig

Axis = str | None
Init = Literal["normal", "norm", "zeros"]
Shape = Callable[["ModelConfig"], tuple[int, ...]]

# The symmetry group's name for each logical axis it acts on (its components: Perm.resid, .mlp, .experts, ...).
GROUP_AXES: dict[str, str] = {
    "layers": "layers",
    "embed": "resid",
    "mlp": "mlp",
    "experts": "expert",
    "expert_mlp": "expert_mlp",
}


def _always(cfg: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter leaf.

    Attributes:
      name: its key (``params[name]``, or ``params["layers"][name]`` for a layer leaf).
      axes: logical axis names of one layer's array (layer leaves; the stacked leaf adds ``"layers"`` first) or of
        the array (top-level leaves).
      shape: the shape of that array, from the config.
      present: whether a config has the leaf.
      stacked: a decoder-layer leaf (stacked ``n_layers`` deep) rather than a top-level one.
      init: ``"normal"`` (``std * N(0, 1)``), ``"norm"`` (a norm's neutral scale: 1, or 0 where ``cfg.norm_offset``)
        or ``"zeros"``.
      reads: the norm whose output this linear map reads (folding that norm scales this leaf's ``"embed"`` axis).
      key: top-level random leaves: the index of their key among the model's keys, then ``fold_in`` values.
    """

    name: str
    axes: tuple[Axis, ...]
    shape: Shape
    present: Callable[[ModelConfig], bool] = _always
    stacked: bool = True
    init: Init = "normal"
    reads: str | None = None
    key: tuple[int, ...] = ()

    def full_axes(self) -> tuple[Axis, ...]:
        """The logical axes of the leaf as stored (``"layers"`` first for a layer leaf)."""
        return ("layers", *self.axes) if self.stacked else self.axes

    def full_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The shape of the leaf as stored (``n_layers`` first for a layer leaf)."""
        return (cfg.n_layers, *self.shape(cfg)) if self.stacked else self.shape(cfg)


def _d(cfg: ModelConfig) -> tuple[int, ...]:
    return (cfg.d_model,)


def _q_width(cfg: ModelConfig) -> int:
    return cfg.n_heads * cfg.head_dim


def _kv_width(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads * cfg.head_dim


def _norm_at(*positions: str) -> Callable[[ModelConfig], bool]:
    """Present where the norms carry weights and ``cfg.norm_position`` is one of ``positions``."""
    return lambda cfg: cfg.has_norm_weights and cfg.norm_position in positions


_PRE, _POST = ("pre", "sandwich"), ("sandwich", "post")


def _layer_norm(cfg: ModelConfig) -> bool:
    return cfg.norm_kind == "layer"


def _qk_norm_shape(width: Callable[[ModelConfig], int]) -> Shape:
    return lambda cfg: (cfg.head_dim,) if cfg.qk_norm == "head" else (width(cfg),)


def _has_mlp(cfg: ModelConfig) -> bool:
    return cfg.d_ff > 0


def _moe(cfg: ModelConfig) -> bool:
    return cfg.moe


def _norm(name: str, present: Callable[[ModelConfig], bool]) -> Leaf:
    return Leaf(name, ("embed",), _d, present, init="norm")


def _linear(name: str, axes: tuple[Axis, ...], shape: Shape, present=_always, reads: str | None = None) -> Leaf:
    return Leaf(name, axes, shape, present, reads=reads)


def _bias(name: str, axis: Axis, shape: Shape, present: Callable[[ModelConfig], bool]) -> Leaf:
    return Leaf(name, (axis,), shape, present, init="zeros")


# fmt: off
TABLE: tuple[Leaf, ...] = (
    Leaf("embed", ("vocab", "embed"), lambda c: (c.vocab_size, c.d_model), stacked=False, key=(0,)),
    Leaf("pos_embed", (None, "embed"), lambda c: (c.max_positions, c.d_model), lambda c: not c.rope, stacked=False,
         key=(1, 1)),  # GPT-2's learned positions
    # --- the decoder layers (stacked) ---
    _norm("attn_norm", _norm_at(*_PRE)),
    _linear("q", ("embed", "heads"), lambda c: (c.d_model, _q_width(c)), reads="attn_norm"),
    _linear("k", ("embed", "heads"), lambda c: (c.d_model, _kv_width(c)), reads="attn_norm"),
    _linear("v", ("embed", "heads"), lambda c: (c.d_model, _kv_width(c)), reads="attn_norm"),
    _bias("q_bias", "heads", lambda c: (_q_width(c),), lambda c: c.qkv_bias),
    _bias("k_bias", "heads", lambda c: (_kv_width(c),), lambda c: c.qkv_bias),
    _bias("v_bias", "heads", lambda c: (_kv_width(c),), lambda c: c.qkv_bias),
    _linear("o", ("heads", "embed"), lambda c: (_q_width(c), c.d_model)),
    _bias("o_bias", "embed", _d, lambda c: c.o_bias),
    # q/k norms act on head_dim (Qwen3, Gemma 3) or on the whole projection (OLMo 2): nothing permutes or shards them
    Leaf("q_norm", (None,), _qk_norm_shape(_q_width), lambda c: c.qk_norm != "none", init="norm"),
    Leaf("k_norm", (None,), _qk_norm_shape(_kv_width), lambda c: c.qk_norm != "none", init="norm"),
    _norm("post_attn_norm", _norm_at(*_POST)),  # norms on the attention / MLP outputs (Gemma 2/3, OLMo 2)
    _norm("mlp_norm", _norm_at(*_PRE)),
    _linear("gate", ("embed", "mlp"), lambda c: (c.d_model, c.d_ff), lambda c: c.glu and c.d_ff > 0, "mlp_norm"),
    _linear("up", ("embed", "mlp"), lambda c: (c.d_model, c.d_ff), _has_mlp, "mlp_norm"),
    _linear("down", ("mlp", "embed"), lambda c: (c.d_ff, c.d_model), _has_mlp),
    _norm("post_mlp_norm", _norm_at(*_POST)),
    # GPT-2: LayerNorm biases, MLP biases
    _bias("attn_norm_bias", "embed", _d, _layer_norm),
    _bias("mlp_norm_bias", "embed", _d, _layer_norm),
    _bias("up_bias", "mlp", lambda c: (c.d_ff,), lambda c: c.mlp_bias),
    _bias("down_bias", "embed", _d, lambda c: c.mlp_bias),
    # Mixture of experts (jaxind.models.moe); Qwen2-MoE's shared expert is gate/up/down above
    _linear("router", ("embed", "experts"), lambda c: (c.d_model, c.n_experts), _moe, "mlp_norm"),
    _linear("expert_gate", ("experts", "embed", "expert_mlp"), lambda c: (c.n_experts, c.d_model, c.d_expert), _moe,
            "mlp_norm"),
    _linear("expert_up", ("experts", "embed", "expert_mlp"), lambda c: (c.n_experts, c.d_model, c.d_expert), _moe,
            "mlp_norm"),
    _linear("expert_down", ("experts", "expert_mlp", "embed"), lambda c: (c.n_experts, c.d_expert, c.d_model), _moe),
    _linear("shared_gate", ("embed",), _d, lambda c: c.shared_expert, "mlp_norm"),
    # --- after the layers ---
    Leaf("final_norm", ("embed",), _d, lambda c: c.has_norm_weights, stacked=False, init="norm"),
    Leaf("final_norm_bias", ("embed",), _d, _layer_norm, stacked=False, init="zeros"),  # GPT-2
    Leaf("lm_head", ("embed", "vocab"), lambda c: (c.d_model, c.vocab_size), lambda c: not c.tie_embeddings,
         stacked=False, key=(1,)),
)
# fmt: on


def check_table(table: Iterable[Leaf]) -> None:
    """Refuses a table with repeated names, unknown axis names or readers of a norm that is not in the table
    (checked on import, and for every table passed in)."""
    leaves = list(table)
    names = [leaf.name for leaf in leaves]
    if len(set(names)) != len(names):
        raise ValueError(f"repeated leaf names in the parameter table: {names}")
    known = set(GROUP_AXES) | {"vocab", "heads", None}
    for leaf in leaves:
        if not set(leaf.axes) <= known or "layers" in leaf.axes:
            raise ValueError(f"{leaf.name}: axis names {leaf.axes} (known: {sorted(map(str, known - {None}))})")
        if leaf.reads is not None and leaf.reads not in names:
            raise ValueError(f"{leaf.name} reads {leaf.reads!r}, which is not in the table")


check_table(TABLE)


def table_or_default(table: Iterable[Leaf] | None = None) -> tuple[Leaf, ...]:
    """``table``, or :data:`TABLE` as it is now (read at each call: a test may extend it)."""
    if table is None:
        return TABLE
    table = tuple(table)
    check_table(table)
    return table


def leaves(cfg: ModelConfig, table: Iterable[Leaf] | None = None) -> list[Leaf]:
    """The leaves a config has, in table order."""
    return [leaf for leaf in table_or_default(table) if leaf.present(cfg)]


def layer_leaves(cfg: ModelConfig, table: Iterable[Leaf] | None = None) -> list[Leaf]:
    """The stacked layer leaves a config has, in table order."""
    return [leaf for leaf in leaves(cfg, table) if leaf.stacked]


def top_leaves(cfg: ModelConfig, table: Iterable[Leaf] | None = None) -> list[Leaf]:
    """The top-level leaves a config has, in table order."""
    return [leaf for leaf in leaves(cfg, table) if not leaf.stacked]


def path(leaf: Leaf) -> str:
    """The leaf's dotted path in the param tree: ``"embed"``, ``"layers.q"``."""
    return f"layers.{leaf.name}" if leaf.stacked else leaf.name


def shapes(cfg: ModelConfig, table: Iterable[Leaf] | None = None) -> dict[str, Any]:
    """The param tree's shapes: ``{"embed": (V, d), "layers": {"q": (L, d, H*hd), ...}, ...}``."""
    out: dict[str, Any] = {"layers": {}}
    for leaf in leaves(cfg, table):
        (out["layers"] if leaf.stacked else out)[leaf.name] = leaf.full_shape(cfg)
    return out


def num_params(cfg: ModelConfig, table: Iterable[Leaf] | None = None) -> int:
    """The number of parameters of a config (a tied head is the embedding: counted once)."""
    return sum(math.prod(leaf.full_shape(cfg)) for leaf in leaves(cfg, table))


def logical_axes(table: Iterable[Leaf] | None = None) -> dict[str, tuple[Axis, ...]]:
    """Every leaf's logical axes by dotted path (``"layers"`` first for layer leaves), for sharding."""
    return {path(leaf): leaf.full_axes() for leaf in table_or_default(table)}


def group_axes(leaf: Leaf) -> tuple[Axis, ...]:
    """The leaf's axes as the symmetry group names them (``"resid"``, ``"mlp"``, ``"expert"``, ``"expert_mlp"``,
    ``"layers"``; None where the group does not act)."""
    return tuple(GROUP_AXES.get(name) if name is not None else None for name in leaf.full_axes())


def norm_readers(table: Iterable[Leaf] | None = None) -> dict[str, tuple[str, ...]]:
    """``{layer norm: the layer's linear maps that read its output}``, in table order (for folding norms)."""
    out: dict[str, tuple[str, ...]] = {}
    for leaf in table_or_default(table):
        if leaf.stacked and leaf.reads is not None:
            out[leaf.reads] = (*out.get(leaf.reads, ()), leaf.name)
    return out


def _constant(leaf: Leaf, cfg: ModelConfig, dtype: Any) -> jax.Array:
    value = 0.0 if leaf.init == "zeros" or cfg.norm_offset else 1.0
    return jnp.full(leaf.shape(cfg), value, dtype)


def init(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02, table=None) -> dict:
    """Random parameters of a config as a nested dict of arrays (layers stacked): ``"normal"`` leaves
    ``std * N(0, 1)``, norms at their neutral scale, biases zero.

    Keys: ``split(key, n_layers + 2)``; top-level random leaves take theirs by :attr:`Leaf.key`, layer ``l`` splits
    ``keys[2 + l]`` into one key per random layer leaf, in table order (the draws of every release)."""
    keys = jax.random.split(key, cfg.n_layers + 2)
    layer_table = layer_leaves(cfg, table)
    random = [leaf for leaf in layer_table if leaf.init == "normal"]

    def layer(k: jax.Array) -> dict[str, jax.Array]:
        ks = jax.random.split(k, len(random))
        out = {leaf.name: (std * jax.random.normal(kk, leaf.shape(cfg))).astype(dtype) for leaf, kk in zip(random, ks)}
        out.update({leaf.name: _constant(leaf, cfg, dtype) for leaf in layer_table if leaf.init != "normal"})
        return out

    params: dict[str, Any] = {"layers": jax.vmap(layer)(keys[2:])}  # one call per layer key, stacked
    for leaf in top_leaves(cfg, table):
        if leaf.init != "normal":
            params[leaf.name] = _constant(leaf, cfg, dtype)
            continue
        k = keys[leaf.key[0]]
        for data in leaf.key[1:]:
            k = jax.random.fold_in(k, data)
        params[leaf.name] = (std * jax.random.normal(k, leaf.shape(cfg))).astype(dtype)
    return params
