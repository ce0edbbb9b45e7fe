"""The generic conversion loop: checkpoint tensors -> jaxind param tree (numpy, float32).

Family-agnostic: it matches names against the reader's table (:mod:`converters.mappings`),
applies each rule's transform, checks shape and finiteness against the config, and fills the
tree. Work is done group by group -- each top-level leaf, then one decoder layer at a time --
so a caller that writes each group out (the converter) never holds the whole model. Checkpoint
tensors name one layer each (``"layers.3.q"``); :func:`assemble` writes each layer group into its
row of the stacked leaves of :mod:`jaxind.models.model` (``"layers" -> {"q": (L, d, H*hd), ...}``).
A mixture of experts stores one tensor per expert: an ``expert`` rule writes it into its row of the layer's
stacked expert leaf (``expert_gate (E, d, he)``), and a layer is complete once every expert arrived.
Every problem becomes a :class:`CheckpointError` naming the tensor and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from converters.mappings import Rule
from jaxind.errors import CheckpointError
from jaxind.models import model
from jaxind.models.config import ModelConfig


class Reader(Protocol):
    """What the conversion loop needs of a checkpoint reader (read-only, so any reader's own tables fit)."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def table(self) -> tuple[Rule, ...]: ...

    @property
    def ignored(self) -> tuple[str, ...]: ...

    def names(self) -> list[str]: ...

    def load(self, name: str) -> np.ndarray: ...


def group_of(path: str) -> str:
    """``"layers.3.q"`` -> ``"layers.3"``; top-level leaves are their own group."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def plan(reader: Reader, source: str, expected: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, Rule, str]]]:
    """Maps every checkpoint tensor to ``(name, rule, path)`` by group, before any data is read.

    Raises:
      CheckpointError: unknown tensors, tensors the config does not have, or missing ones.
    """
    cfg = reader.config
    groups: dict[str, list[tuple[str, Rule, str]]] = {}
    found = set()
    experts: dict[str, set[int]] = {}  # stacked expert leaves stored one tensor per expert: the experts seen
    for name in reader.names():
        matches = [(r, p) for r in reader.table if (p := r.match(name)) is not None]  # a fused tensor has several
        if not matches:
            if any(re.fullmatch(pattern, name) for pattern in reader.ignored):
                continue
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r}: it is not part of a {cfg.family} model as jaxind defines it"
            )
        for rule, path in matches:
            if path == "lm_head" and cfg.tie_embeddings:
                continue  # a tied head stored explicitly: the embedding is the head
            if path not in expected:
                raise CheckpointError(
                    f"{source}: tensor {name!r} maps to {path}, which a {cfg.family} model with this config "
                    "does not have "
                    "(layer count or bias settings in the config disagree with the weights)"
                )
            groups.setdefault(group_of(path), []).append((name, rule, path))
            if rule.expert:
                experts.setdefault(path, set()).add(_expert_index(rule, name, path, expected, source))
            else:
                found.add(path)
    found |= {path for path, seen in experts.items() if len(seen) == expected[path][0]}
    missing = sorted(set(expected) - found, key=_path_order)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source}: {len(missing)} tensors the config needs are missing: {shown} (incomplete checkpoint?)"
        )
    return dict(sorted(groups.items(), key=lambda kv: _path_order(kv[0])))


def _expert_index(rule: Rule, name: str, path: str, expected: dict[str, tuple[int, ...]], source: str) -> int:
    """The expert a per-expert tensor fills in the stacked leaf ``path`` (checked against the expert count)."""
    index = rule.index(name)
    assert index is not None  # an expert rule's pattern has the expert as group 2
    if index >= expected[path][0]:
        raise CheckpointError(
            f"{source}: tensor {name!r} is expert {index} of {path}, but the config has {expected[path][0]} experts: "
            "the config and the weights disagree"
        )
    return index


def _path_order(path: str) -> tuple:
    parts = path.split(".")
    return (1, int(parts[1]), path) if parts[0] == "layers" else (0 if parts[0] == "embed" else 2, 0, path)


def iter_groups(
    reader: Reader, dtype: Any = np.float32, source: str = "checkpoint", progress: bool = False
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yields ``(group, {leaf_name: array})`` in order: embed, layers.0 .. layers.L-1, the rest."""
    cfg = reader.config
    expected = model.param_shapes_flat(cfg, per_layer=True)
    groups = plan(reader, source, expected)
    for group, entries in tqdm(
        groups.items(), desc=f"converting {source}", unit="group", disable=not progress, leave=False
    ):
        out: dict[str, np.ndarray] = {}
        for name, rule, path in entries:
            value = rule.transform(reader.load(name), cfg)
            index = rule.index(name)  # one expert's slice of a stacked expert leaf, or None for a whole leaf
            want = expected[path] if index is None else expected[path][1:]
            if value.shape != want:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(value.shape)} (as {path}) but the config implies "
                    f"{want}: "
                    "the config and the weights disagree; fix config.json or use the matching checkpoint"
                )
            if not np.isfinite(value).all():
                raise CheckpointError(
                    f"{source}: tensor {name!r} contains NaN or Inf values: the checkpoint is corrupt or diverged"
                )
            leaf = path.split(".")[-1]
            if index is None:
                out[leaf] = value.astype(dtype, copy=False)
            else:
                out.setdefault(leaf, np.empty(expected[path], dtype))[index] = value
        yield group, out


def assemble(groups: Iterable[tuple[str, dict[str, Any]]], cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """Collects :func:`iter_groups` output into the stacked param tree of :mod:`jaxind.models.model`: each
    ``layers.l`` group is copied into row ``l`` of the stacked numpy leaves (allocated once, when the
    first layer arrives), so the tree never holds a layer twice.

    Raises:
      CheckpointError: a layer group is missing or a leaf is absent from some layers.
    """
    tree: dict[str, Any] = {}
    stacked: dict[str, np.ndarray] = {}
    seen: dict[str, set[int]] = {}
    for group, leaves in groups:
        if not group.startswith("layers."):
            tree.update(leaves)
            continue
        layer = int(group.split(".")[1])
        for name, value in leaves.items():
            if name not in stacked:
                stacked[name] = np.empty((cfg.n_layers, *np.shape(value)), dtype)
            stacked[name][layer] = value
            seen.setdefault(name, set()).add(layer)
    incomplete = sorted(name for name, layers in seen.items() if len(layers) != cfg.n_layers)
    if incomplete:
        raise CheckpointError(f"layers missing for {incomplete}: incomplete checkpoint; convert again")
    tree["layers"] = stacked
    return tree


def build_params(
    reader: Reader, dtype: Any = np.float32, source: str = "checkpoint", progress: bool = False
) -> dict[str, Any]:
    """The whole param tree of ``reader.config`` as numpy leaves."""
    return assemble(iter_groups(reader, dtype, source, progress), reader.config, dtype)
