"""jaxind checkpoints on disk: orbax param groups plus the config and provenance as JSON.

Layout of a checkpoint directory::

    DIR/jaxind_config.json        ModelConfig
    DIR/jaxind_meta.json          source, format, jaxind version, format_version, groups
    DIR/params/embed/             one orbax (PyTree) checkpoint per group: each top-level
    DIR/params/layers.0/ ...      leaf, and each decoder layer ({"q": (d, H*hd), ...})
    DIR/tokenizer/                optional: the source's tokenizer (save_pretrained)

Groups are written one at a time, so converting streams: only one layer is in memory. On disk the
layers stay one group each; loading copies each group into its row of the stacked leaves
(:func:`converters.build.assemble`), one layer at a time. ``format_version`` (:data:`FORMAT_VERSION`)
is 2 since the param tree became stacked; format 1 (no ``format_version``, jaxind 0.1) has the same
groups and loads unchanged; a newer format is refused with a message to convert again.
The directory appears atomically: written under a hidden temporary name, then renamed into
place without replacing anything unless asked to (see :mod:`converters.publish`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from converters import publish
from jaxind import testhooks
from jaxind.errors import CheckpointError, JaxindError
from jaxind.models.config import ModelConfig

CONFIG_FILE = "jaxind_config.json"
META_FILE = "jaxind_meta.json"
# The checkpoint layout this code writes; it reads every version from 1 (no "format_version" key) up to this.
FORMAT_VERSION = 2


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def groups_of(params: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """An in-memory (stacked) param tree as ``(group, leaves)`` pairs, one group per layer, as
    :func:`converters.build.iter_groups` yields them; each layer is sliced out when its turn comes."""
    for key, value in params.items():
        if key == "layers":
            depth = int(next(iter(value.values())).shape[0])
            for i in range(depth):
                yield f"layers.{i}", {name: leaf[i] for name, leaf in value.items()}
        else:
            yield key, {key: value}


class CheckpointInterrupted(KeyboardInterrupt):
    """Ctrl-C while writing a checkpoint; the message says what was cleaned up."""


def check_replaceable(out_dir: str) -> None:
    """Raises CheckpointError unless ``out_dir`` may be replaced by ``--overwrite``: only a jaxind
    checkpoint or an empty directory is, never a file or a folder of other things."""
    if os.path.isdir(out_dir) and (is_checkpoint(out_dir) or not os.listdir(out_dir)):
        return
    kind = "a directory that is not a jaxind checkpoint" if os.path.isdir(out_dir) else "not a directory"
    raise CheckpointError(
        f"{out_dir} exists and is {kind}: --overwrite replaces only jaxind checkpoints; choose another --out"
    )


def save_checkpoint(
    out_dir: str,
    cfg: ModelConfig,
    groups: Iterable[tuple[str, dict[str, Any]]],
    meta: dict[str, Any],
    overwrite: bool = False,
    write_tokenizer: Callable[[str], None] | None = None,
) -> None:
    """Writes the groups (numpy or jax leaves) one at a time into a hidden directory beside
    ``out_dir``, then publishes it atomically (:mod:`converters.publish`): ``out_dir`` is at every
    instant absent, the old checkpoint, or the complete new one.

    ``write_tokenizer(dir)``, if given, saves a tokenizer into ``dir`` after the weights
    (so its memory peak does not add to the conversion's).

    Raises:
      CheckpointError: ``out_dir`` exists (or appeared while writing) and ``overwrite`` is
        False, or it is not a checkpoint that ``overwrite`` may replace.
      CheckpointInterrupted: Ctrl-C; the partial directory was removed.
    """
    out_dir = os.path.abspath(out_dir)
    publish.clean_stale(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir} already exists: choose another --out or pass --overwrite")
        check_replaceable(out_dir)
    tmp = publish.make_temp_dir(out_dir)
    published = False
    try:
        checkpointer = _checkpointer()
        names = []
        for group, leaves in groups:
            checkpointer.save(os.path.join(tmp, "params", group), {k: np.asarray(v) for k, v in leaves.items()})
            names.append(group)
            if len(names) == 1:
                testhooks.stop_at("first_group_written")
        if write_tokenizer is not None:
            write_tokenizer(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({**meta, "groups": names, "format_version": FORMAT_VERSION}, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:  # last: its presence marks a checkpoint
            f.write(cfg.to_json())
        testhooks.stop_at("written")
        if overwrite and os.path.lexists(out_dir):
            check_replaceable(out_dir)
        try:
            publish.publish(tmp, out_dir, overwrite)
        except publish.DestinationExists:
            raise CheckpointError(
                f"{out_dir} appeared while converting (another convert to the same --out?): "
                "it was left as it is and this conversion discarded; pass --overwrite to "
                "replace it, or choose another --out"
            ) from None
        published = True
    except KeyboardInterrupt:
        if published:
            raise CheckpointInterrupted(f"{out_dir} was written; removing the old copy was cut short") from None
        raise CheckpointInterrupted("partial checkpoint removed") from None
    finally:
        if os.path.lexists(tmp):  # unpublished, or the old copy after a swap
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint written by :func:`save_checkpoint`: ``(config, params, meta)``,
    params as float32 numpy leaves, layers stacked (:func:`converters.build.assemble`).

    Raises:
      CheckpointError: see :func:`open_checkpoint`.
    """
    from converters.build import assemble

    cfg, groups, meta = open_checkpoint(path)
    return cfg, assemble(groups, cfg), meta


def open_checkpoint(path: str) -> tuple[ModelConfig, Iterator[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """``(config, groups, meta)`` of a checkpoint; ``groups`` restores one param group at a time, as float32 numpy
    (``("embed", {...})``, ``("layers.3", {"q": (d, H*hd), ...})``), for whoever places them.

    Before any array is read, the config is checked against what is stored (:func:`check_stored`): the param
    groups on disk, the groups ``jaxind_meta.json`` lists, and every stored array's shape.

    Raises:
      CheckpointError: unreadable config, missing/corrupt param groups, a format this code cannot read, or a
        config that disagrees with the stored weights (naming the array and both shapes).
    """
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path) as f:
            cfg = ModelConfig.from_json(f.read())
        meta_path = os.path.join(path, META_FILE)
        meta = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read jaxind checkpoint {path}: {e}") from None
    except JaxindError as e:  # a malformed ModelConfig (unknown/missing fields, bad values)
        raise CheckpointError(f"{config_path}: {e}; restore the file or convert the model again") from None
    except TypeError as e:
        raise CheckpointError(f"{config_path} is malformed ({e}); restore the file or convert again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not a JSON object; restore the file or convert the model again")
    check_format(path, meta)
    targets = check_stored(path, cfg, meta)
    checkpointer = _checkpointer()

    def restore(group: str, target: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        import orbax.checkpoint as ocp

        location = os.path.abspath(os.path.join(path, "params", group))
        try:
            restored = checkpointer.restore(
                location,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot restore {location}: {type(e).__name__}: {str(e)[:200]} "
                "(incomplete or corrupt checkpoint? convert again)"
            ) from None
        for name, value in restored.items():  # the restore must give what was checked; never a silent reshape
            if tuple(np.shape(value)) != tuple(target[name].shape):
                raise CheckpointError(
                    f"{location}: restored {name} has shape {tuple(np.shape(value))}, expected "
                    f"{tuple(target[name].shape)} (corrupt checkpoint? convert again)"
                )
        return group, restored

    return cfg, (restore(g, t) for g, t in targets.items()), meta


def check_format(path: str, meta: dict[str, Any]) -> None:
    """Refuses a checkpoint format this code cannot read (see the module doc).

    Raises:
      CheckpointError: ``format_version`` is not an integer from 1 to :data:`FORMAT_VERSION`.
    """
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r} in {META_FILE}; this jaxind reads formats 1 to "
            f"{FORMAT_VERSION}: convert the model again with this jaxind (python -m converters.convert --src=... "
            "--out=...) or use the jaxind that wrote it"
        )


def _stored_shapes(checkpointer: Any, location: str) -> dict[str, tuple[int, ...]]:
    """``{leaf: shape}`` of one orbax param group, from its metadata (no array data is read)."""
    try:
        metadata = checkpointer.metadata(location)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {location}: {type(e).__name__}: {str(e)[:200]} "
            "(incomplete or corrupt checkpoint? convert again)"
        ) from None
    tree = getattr(metadata, "item_metadata", metadata)  # orbax >= 0.11.x wraps the tree in StepMetadata
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{location} is not a jaxind param group (unexpected orbax metadata); convert again")
    return {str(name): tuple(getattr(leaf, "shape", ()) or ()) for name, leaf in tree.items()}


def check_stored(path: str, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Checks the config against the stored weights; returns the restore targets ``{group: {leaf: struct}}``.

    Raises:
      CheckpointError: a group the config needs is missing, a stored group the config does not have (e.g.
        ``n_layers`` lowered: a layer would be dropped silently), groups that disagree with ``jaxind_meta.json``,
        or an array whose stored shape differs from the config's (named, with both shapes).
    """
    from converters.build import group_of
    from jaxind.models import model

    fix = f"the config ({CONFIG_FILE}) and the stored weights disagree: restore the original config or convert again"
    try:
        expected = model.param_shapes_flat(cfg, per_layer=True)
    except Exception as e:  # a config whose shapes cannot even be formed
        raise CheckpointError(f"{path}: invalid config ({type(e).__name__}: {e}); {fix}") from None
    targets: dict[str, dict[str, Any]] = {}
    for leaf_path, shape in expected.items():
        targets.setdefault(group_of(leaf_path), {})[leaf_path.split(".")[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    params_dir = os.path.join(path, "params")
    stored = sorted(os.listdir(params_dir)) if os.path.isdir(params_dir) else []
    stored = [g for g in stored if not g.startswith(".") and os.path.isdir(os.path.join(params_dir, g))]
    listed = meta.get("groups")
    if listed is not None and sorted(listed) != stored:
        problems = []
        gone, extra = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
        if gone:
            problems.append(f"listed in {META_FILE} but missing from params/: {', '.join(gone)}")
        if extra:
            problems.append(f"in params/ but not listed in {META_FILE}: {', '.join(extra)}")
        raise CheckpointError(f"{path} is incomplete or mixed (param groups {'; '.join(problems)}); convert again")
    missing = [g for g in targets if g not in stored]
    if missing:
        raise CheckpointError(
            f"{path}: the config needs param groups {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} that are not stored (n_layers={cfg.n_layers} "
            f"in {CONFIG_FILE}, or an incomplete checkpoint); {fix}"
        )
    unused = [g for g in stored if g not in targets]
    if unused:
        raise CheckpointError(
            f"{path} stores param groups {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''} "
            f"that the config (n_layers={cfg.n_layers}) does not have; they would be dropped "
            f"silently; {fix}"
        )
    checkpointer = _checkpointer()
    for group, target in targets.items():
        shapes = _stored_shapes(checkpointer, os.path.abspath(os.path.join(params_dir, group)))
        prefix = f"{group}." if group.startswith("layers.") else ""
        if set(shapes) != set(target):
            gone, extra = sorted(set(target) - set(shapes)), sorted(set(shapes) - set(target))
            raise CheckpointError(
                f"{path}: param group {group} stores arrays {sorted(shapes)}; the config needs "
                f"{sorted(target)} (missing: {gone or 'none'}, unexpected: {extra or 'none'}); {fix}"
            )
        wrong = [
            f"{prefix}{name} is stored with shape {shapes[name]} but the config implies {tuple(struct.shape)}"
            for name, struct in sorted(target.items())
            if shapes[name] != tuple(struct.shape)
        ]
        if wrong:
            more = "; ..." if len(wrong) > 4 else ""
            raise CheckpointError(f"{path}: array {'; array '.join(wrong[:4])}{more}; {fix}")
    return targets
