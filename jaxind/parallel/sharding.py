"""Meshes, logical axis names on every param, the rules that map them to mesh axes, and placing
arrays on a mesh (docs/DESIGN.md §5.12).

A device mesh has the axes ``("data", "fsdp", "model")``. Every param leaf names its axes with
logical names (declared where each is defined, in the parameter table :mod:`jaxind.models.paramspec`, and carried by the
Flax module's params as partitioning metadata; :data:`PARAM_AXES` is its view by path: ``vocab``, ``embed``,
``heads``, ``mlp``, ``experts``, ``expert_mlp``, ``layers``), and an
ordered rules table (:data:`RULES`, as in EasyLM and MaxText) maps them to mesh axes. A leaf's
PartitionSpec comes from walking the rules in order: a rule applies to an axis of the leaf with
that logical name when the axis is not yet sharded, its mesh axes are not used elsewhere in the
leaf, and the mesh axes' size divides the axis; mesh axes of size 1 are skipped. Later rules are
fallbacks: ``q_bias (layers, heads)`` on a mesh without a ``model`` axis shards ``heads`` over
``fsdp`` instead, and a leaf with no other divisible axis shards its ``layers`` axis. A leaf the
rules leave without ``fsdp`` (``q_bias`` when ``model`` took ``heads`` and ``fsdp`` does not divide
the depth) gets it on its largest axis it divides, next to what is there. So on a k-way ``fsdp``
axis every leaf's largest shard is at most 1/k of it (where any axis divides) and no device holds
a whole model. Activations use ``batch`` (tokens) and the MATCH accumulators ``embed``/``mlp``.

The kernels read the mesh off the params they are given (:func:`layout_of`): params placed by
:meth:`Layout.place` (or loaded with a layout) make every test run sharded, with no change to how
tests are called.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxind.errors import JaxindError
from jaxind.models import model, paramspec
from jaxind.models.config import ModelConfig
from jaxind.parallel.cluster import MESH_AXES, parse_mesh
from jaxind.types import Params

__all__ = [
    "Layout",
    "MeshLike",
    "Names",
    "PARAM_AXES",
    "RULES",
    "bytes_per_device",
    "largest_shard_fraction",
    "layout_of",
    "logical_spec",
    "make_mesh",
    "mesh_sizes",
    "param_bytes_per_device",
    "param_names",
    "run_layout",
    "sq_distance",
    "to_host",
    "zeros",
]

Names = tuple[str | None, ...]

# Logical axis names of every param leaf, by flat path (layer leaves stacked, "layers" first): a view of the parameter
# table (jaxind.models.paramspec), where each leaf declares its axes once.
PARAM_AXES: dict[str, Names] = paramspec.logical_axes()

# Ordered rules: (logical axis, mesh axes). The first rule that fits an axis shards it.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),  # tokens: data parallel over data x fsdp (FSDP gathers weights per layer)
    ("batch", ("data",)),
    ("vocab", ("model",)),
    ("heads", ("model",)),
    ("experts", ("model",)),  # expert parallel: a mixture of experts' experts split over `model`
    ("mlp", ("model",)),
    ("expert_mlp", ("model",)),  # an expert's hidden units, where `model` did not take the experts
    ("embed", ("fsdp",)),
    ("vocab", ("fsdp",)),  # fallbacks, where the first choice does not divide or is taken
    ("heads", ("fsdp",)),
    ("mlp", ("fsdp",)),
    ("expert_mlp", ("fsdp",)),
    ("layers", ("fsdp",)),
)


def logical_spec(shape: Sequence[int], names: Names, mesh: Mesh | AbstractMesh, rules=RULES) -> P:
    """The PartitionSpec of an array of ``shape`` whose axes have logical ``names`` (see the module doc)."""
    if len(shape) != len(names):
        raise ValueError(f"{len(names)} axis names {names} for an array of shape {tuple(shape)}")
    assigned: list[Any] = [None] * len(shape)
    used: set[str] = set()
    for logical, axes in rules:
        live = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if not live or used & set(live):
            continue
        size = math.prod(mesh.shape[a] for a in live)
        for i, name in enumerate(names):
            if name == logical and assigned[i] is None and shape[i] % size == 0:
                assigned[i] = live[0] if len(live) == 1 else live
                used |= set(live)
                break
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used:  # last resort: fsdp joins the largest axis it divides
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            current = () if assigned[i] is None else (assigned[i],) if isinstance(assigned[i], str) else assigned[i]
            if shape[i] % (fsdp * math.prod(mesh.shape[a] for a in current)) == 0:
                combined = (*current, "fsdp")
                assigned[i] = combined[0] if len(combined) == 1 else combined
                break
    return P(*assigned)


def param_names(cfg: ModelConfig) -> dict[str, Names]:
    """Logical axis names of every leaf of a ``cfg`` param tree, by flat path (in the tree's flattening order)."""
    axes = paramspec.logical_axes()
    return {path: axes[path] for path in model.param_shapes_flat(cfg)}


MeshLike = str | Mapping[str, int] | Mesh | AbstractMesh
"""A mesh in any of the forms every function that takes one accepts: the spec string of ``--mesh``
(``"fsdp:4"``, ``"data:2,fsdp:-1"``), a ``{axis: size}`` mapping, or a :class:`jax.sharding.Mesh` /
:class:`~jax.sharding.AbstractMesh` over the axes ``(data, fsdp, model)``."""


def mesh_sizes(mesh: MeshLike, num_devices: int | None = None) -> dict[str, int]:
    """The one normaliser of a mesh argument (:data:`MeshLike`): ``{axis: size}`` over ``(data, fsdp, model)``,
    every axis present. ``-1`` (the devices left) is resolved against ``num_devices``.

    Raises:
      JaxindError: a malformed spec, an axis outside ``(data, fsdp, model)``, a ``-1`` without ``num_devices`` or
        that does not divide it, or something that is not a mesh.
    """
    if isinstance(mesh, str):
        sizes = parse_mesh(mesh)
    elif isinstance(mesh, Mesh | AbstractMesh):
        sizes = dict(mesh.shape)
    elif isinstance(mesh, Mapping):
        sizes = dict(mesh)
    else:
        raise JaxindError(
            f"mesh {mesh!r}: expected a spec string such as 'fsdp:4' or 'data:2,fsdp:-1', a {{axis: size}} dict or a "
            "jax.sharding.Mesh"
        )
    unknown = sorted(set(sizes) - set(MESH_AXES))
    bad = [a for a, v in sizes.items() if not isinstance(v, int | np.integer) or (v < 1 and v != -1)]
    if unknown or bad or list(sizes.values()).count(-1) > 1:
        raise JaxindError(
            f"mesh {sizes}: axes must be among {', '.join(MESH_AXES)} with sizes >= 1 (at most one -1 for the "
            "devices left), e.g. 'fsdp:4' or {'data': 2, 'fsdp': 4}"
        )
    if -1 in sizes.values():
        if num_devices is None:
            raise JaxindError(f"mesh {sizes}: -1 needs a device count here; give every axis a size, e.g. 'fsdp:8'")
        known = math.prod(v for v in sizes.values() if v != -1)
        if num_devices % known:
            raise JaxindError(f"mesh {sizes}: {num_devices} devices are not a multiple of {known}")
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}


def make_mesh(sizes: MeshLike, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, model)`` mesh over ``devices`` (default: every device of every process), laid out
    by :func:`jax.make_mesh` (topology-aware on TPU/GPU); missing axes have size 1. ``sizes`` is any
    :data:`MeshLike`; a :class:`~jax.sharding.Mesh` with no ``devices`` given is returned as it is.

    Raises:
      JaxindError: the sizes do not multiply to the device count (or are not a mesh, :func:`mesh_sizes`).
    """
    if isinstance(sizes, Mesh) and devices is None:
        mesh_sizes(sizes)  # its axes are ours
        return sizes
    devs = list(jax.devices() if devices is None else devices)
    shape = tuple(mesh_sizes(sizes, len(devs)).values())
    if math.prod(shape) != len(devs):
        raise JaxindError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, there are {len(devs)}: "
            "make the sizes multiply to the device count (or use -1 for one axis)"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devs)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where arrays live: a mesh plus the rules table (hashable: a static jit argument)."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = RULES

    def sharding(self, shape: Sequence[int], names: Names) -> NamedSharding:
        return NamedSharding(self.mesh, logical_spec(shape, names, self.mesh, self.rules))

    def param_shardings(self, cfg: ModelConfig) -> dict[str, NamedSharding]:
        """``{flat path: NamedSharding}`` for every leaf of a ``cfg`` param tree."""
        names = param_names(cfg)
        return {path: self.sharding(shape, names[path]) for path, shape in model.param_shapes_flat(cfg).items()}

    def put(self, value: Any, sharding: NamedSharding, dtype: Any = None) -> jax.Array:
        """A global array from a host array every process holds in full; each process copies only the slices its
        own devices need (``jax.make_array_from_callback``)."""
        host = value if isinstance(value, np.ndarray) else np.asarray(value)
        if dtype is not None:
            host = host.astype(dtype, copy=False)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def place(self, params: Params, cfg: ModelConfig, dtype: Any = None) -> Params:
        """``params`` (numpy or jax leaves) placed on the mesh, each leaf sharded by its logical names."""
        shardings = self.param_shardings(cfg)
        out: Params = {}
        for path, sharding in shardings.items():
            leaf = params[path] if "." not in path else params["layers"][path.split(".", 1)[1]]
            placed = (
                jax.device_put(leaf if dtype is None else leaf.astype(dtype), sharding)
                if isinstance(leaf, jax.Array) and leaf.is_fully_addressable and jax.process_count() == 1
                else self.put(to_host(leaf), sharding, dtype)
            )
            if "." in path:
                out.setdefault("layers", {})[path.split(".", 1)[1]] = placed
            else:
                out[path] = placed
        return out

    def place_groups(
        self, groups: Iterable[tuple[str, dict[str, Any]]], cfg: ModelConfig, dtype: Any = np.float32
    ) -> Params:
        """Builds the stacked, sharded param tree from per-layer groups (``("embed", {...})``, ``("layers.3",
        {"q": (d, H*hd), ...})``, as checkpoints and converters stream them): each stacked leaf is allocated
        sharded on the mesh and each layer's shards are written into its row on their devices, so no host
        holds more than one group and no device more than its shards."""
        shardings = self.param_shardings(cfg)
        shapes = model.param_shapes_flat(cfg)
        out: Params = {"layers": {}}
        done: dict[str, set[int]] = {}
        for group, leaves in groups:
            for name, value in leaves.items():
                if not group.startswith("layers."):
                    out[name] = self.put(value, shardings[name], dtype)
                    continue
                path, layer = f"layers.{name}", int(group.split(".")[1])
                if name not in out["layers"]:
                    out["layers"][name] = zeros(shapes[path], dtype, shardings[path])
                row_sharding = NamedSharding(self.mesh, P(*tuple(shardings[path].spec)[1:]))
                row = self.put(value, row_sharding, dtype)
                out["layers"][name] = _set_row(out["layers"][name], row, np.int32(layer))
                done.setdefault(name, set()).add(layer)
        short = sorted(name for name, rows in done.items() if len(rows) != cfg.n_layers)
        if short:
            raise JaxindError(f"layer groups missing for {short}: incomplete checkpoint; convert again")
        return out

    def activations(self, batch: int, seq: int, width: int) -> NamedSharding:
        """Where the residual stream ``(B, T, d)`` lives: split over the batch axes, whole along ``d``."""
        return self.sharding((batch, seq, width), ("batch", None, None))

    def batch(self, array: Any) -> jax.Array:
        """A host batch ``(B, ...)`` (the same on every process) as a global array sharded over ``batch``: each
        process supplies the rows of its own devices."""
        host = np.asarray(array)
        names: Names = ("batch",) + (None,) * (host.ndim - 1)
        return self.put(host, self.sharding(host.shape, names))


def zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
    """A zero array allocated straight into ``sharding`` (each device allocates only its shard)."""
    return _zeros_fn(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _set_row_jit(stack: jax.Array, row: jax.Array, layer: jax.Array, sharding: NamedSharding) -> jax.Array:
    out = jax.lax.dynamic_update_index_in_dim(stack, row.astype(stack.dtype), layer, 0)
    return jax.lax.with_sharding_constraint(out, sharding)


def _set_row(stack: jax.Array, row: jax.Array, layer: Any) -> jax.Array:
    """``stack`` with row ``layer`` replaced by ``row``, in place (the stack is donated), keeping its sharding."""
    return _set_row_jit(stack, row, layer, stack.sharding)


def param_bytes_per_device(cfg: ModelConfig, sizes: MeshLike, bytes_per_param: int = 4, rules=RULES) -> int:
    """Bytes of one model's params on the fullest device of a ``(data, fsdp, model)`` mesh of ``sizes`` (any
    :data:`MeshLike` without ``-1``: ``"fsdp:4"``, ``{"fsdp": 4}``, a Mesh; no device needed: the rules are applied
    to an abstract mesh), e.g. for planning a pod."""
    mesh = AbstractMesh(tuple(mesh_sizes(sizes).values()), MESH_AXES)
    names = param_names(cfg)
    total = 0
    for path, shape in model.param_shapes_flat(cfg).items():
        spec = logical_spec(shape, names[path], mesh, rules)
        split = [math.prod(mesh.shape[a] for a in _mesh_axes(entry)) for entry in spec]
        total += math.prod(-(-dim // parts) for dim, parts in zip(shape, split + [1] * (len(shape) - len(split))))
    return total * bytes_per_param


def run_layout(mesh: MeshLike | None) -> Layout | None:
    """The layout of a run: ``--mesh`` over every device, or, without it, None (one device, as before) for a single
    process and ``fsdp`` over every device for a multi-process run."""
    if mesh is None and jax.process_count() == 1:
        return None
    return Layout(make_mesh(mesh or "fsdp:-1"))


def layout_of(tree: Any) -> Layout | None:
    """The layout of a placed param tree (its first leaf's mesh), or None for unsharded arrays."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) and sharding.mesh.size > 1:
            return Layout(sharding.mesh)
    return None


def to_host(x: Any) -> np.ndarray:
    """A (possibly global, multi-process) array as a numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@functools.lru_cache(maxsize=256)
def _ordered_sq_diff(mesh: Mesh, spec: P, ndim: int, stacked: bool):
    """Jitted ``(a, b) -> sum((a - b)^2)`` over every axis (but the first when ``stacked``) of leaves with this
    spec: each device sums its own block, and the blocks' sums are all-gathered and added in mesh order."""
    spec = P(*(tuple(spec) + (None,) * (ndim - len(spec))))
    lead = _mesh_axes(spec[0]) if stacked else ()
    summed = tuple(a for entry in spec for a in _mesh_axes(entry) if a not in lead)

    def local(a, b):
        d = a.astype(jnp.float32) - b.astype(jnp.float32)
        part = jnp.sum(d * d, axis=tuple(range(1 if stacked else 0, d.ndim)))
        if summed:
            part = jnp.sum(jax.lax.all_gather(part, summed, to="invarying"), axis=0)
        if lead:
            part = jax.lax.all_gather(part, lead, tiled=True, to="invarying")
        return part

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P()))


def sq_distance(a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
    """``sum((a - b)^2)`` over every axis, or every axis but the first (layers) when ``stacked``, in float32.

    On a mesh the sum is reproducible bit for bit on any split of the same mesh between processes: an all-reduce
    may add the devices' partial sums in an order that depends on the collective implementation (in-process or
    gloo/NCCL across hosts), so the partial sums are all-gathered and added in mesh order instead."""
    sharding = getattr(a, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) and sharding.mesh.size > 1):
        d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
        return jnp.sum(d * d, axis=tuple(range(1 if stacked else 0, d.ndim)))
    return _ordered_sq_diff(sharding.mesh, sharding.spec, a.ndim, stacked)(a, b)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s addressable shards on each device."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def largest_shard_fraction(array: jax.Array) -> float:
    """The largest addressable shard of ``array`` as a fraction of its size (1.0: some device holds all of it)."""
    return max(math.prod(s.data.shape) for s in array.addressable_shards) / max(array.size, 1)
